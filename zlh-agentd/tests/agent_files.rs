//! The file manager and uploads of the real agent: a 1 GiB resumable upload in pieces under a
//! 100 MiB proxy cap with the agent's memory bounded, an interrupted upload that leaves nothing
//! visible and resumes, path traversal and symlink escapes refused, and the plan's disk (from the
//! provisioning payload) enforced on uploads and writes before anything is written.

mod support;

use base64::Engine;
use bytes::Bytes;
use futures::stream;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::*;

const MIB: u64 = 1 << 20;
/// Each PATCH stays under a 100 MiB proxy cap.
const PIECE: u64 = 96 * MIB;

async fn dev_agent(fx: &Fixture, name: &str) -> Agent {
    let mut agent = fx.agent(name);
    agent.ready().await;
    agent.post("/config", json!({"vmid": 6020, "container_type": "dev", "runtime": "zrt"})).await;
    agent.wait_status("provisioned", |s| s["provisioningComplete"] == true || s["state"] == "error").await;
    agent
}

/// Deterministic content: byte `i` of the file is a function of `i`, made a block at a time.
fn block(index: u64) -> Bytes {
    let mut b = vec![0u8; MIB as usize];
    let seed = index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed ^ i as u64).to_le_bytes());
    }
    Bytes::from(b)
}

async fn tus_create(agent: &Agent, path: &str, length: u64) -> String {
    let r = tus_create_response(agent, path, length, false).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    agent.url(r.headers()["location"].to_str().unwrap())
}

async fn tus_create_response(agent: &Agent, path: &str, length: u64, overwrite: bool) -> reqwest::Response {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut meta = format!("path {}", b64(path));
    if overwrite {
        meta.push_str(&format!(",overwrite {}", b64("true")));
    }
    agent
        .http
        .post(agent.url("/files/uploads"))
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", length)
        .header("Upload-Metadata", meta)
        .send()
        .await
        .unwrap()
}

async fn tus_offset(agent: &Agent, url: &str) -> u64 {
    let r = agent.http.head(url).bearer_auth(TOKEN).header("Tus-Resumable", "1.0.0").send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["upload-offset"].to_str().unwrap().parse().unwrap()
}

/// PATCHes MiB blocks `first..first+count` at `offset`, streamed (the client holds one block).
async fn tus_patch(agent: &Agent, url: &str, offset: u64, first: u64, count: u64) -> reqwest::Response {
    let body = stream::iter((first..first + count).map(|i| Ok::<_, std::io::Error>(block(i))));
    agent
        .http
        .patch(url)
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", offset)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Content-Length", count * MIB)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn one_gib_upload_in_pieces_with_bounded_agent_memory() {
    let fx = Fixture::new().await;
    let agent = dev_agent(&fx, "big").await;
    let total = 1024 * MIB;
    let before = vm_hwm_kib(agent.child.id());
    let url = tus_create(&agent, "data/big.bin", total).await;
    let mut offset = 0;
    while offset < total {
        let count = (PIECE.min(total - offset)) / MIB;
        let r = tus_patch(&agent, &url, offset, offset / MIB, count).await;
        assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
        offset = r.headers()["upload-offset"].to_str().unwrap().parse().unwrap();
    }
    let file = agent.root.join("home/dev/workspace/data/big.bin");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), total);
    let mut expected = Sha256::new();
    for i in 0..total / MIB {
        expected.update(block(i));
    }
    let mut actual = Sha256::new();
    std::io::copy(&mut std::fs::File::open(&file).unwrap(), &mut actual).unwrap();
    assert_eq!(actual.finalize(), expected.finalize(), "the file is exactly what was sent");
    let growth_mib = (vm_hwm_kib(agent.child.id()) - before) / 1024;
    println!("agent peak RSS grew by {growth_mib} MiB over a 1 GiB upload");
    assert!(growth_mib < 64, "agent memory grew by {growth_mib} MiB for a 1 GiB upload");
    if is_root() {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(&file).unwrap().uid();
        assert_ne!(uid, 0, "the upload belongs to the dev user");
    }
}

#[tokio::test]
async fn an_interrupted_upload_leaves_nothing_visible_and_resumes() {
    let fx = Fixture::new().await;
    let agent = dev_agent(&fx, "resume").await;
    let total = 8 * MIB;
    let url = tus_create(&agent, "notes/upload.bin", total).await;
    // The connection drops after 3 MiB of the body.
    let body =
        stream::iter((0..8u64).map(
            |i| {
                if i < 3 {
                    Ok(block(i))
                } else {
                    Err(std::io::Error::other("connection lost"))
                }
            },
        ));
    let dropped = agent
        .http
        .patch(&url)
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", 0)
        .header("Content-Type", "application/offset+octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    assert!(dropped.is_err() || !dropped.unwrap().status().is_success());
    let saved = tus_offset(&agent, &url).await;
    assert!(saved <= 3 * MIB, "saved {saved}");
    let target = agent.root.join("home/dev/workspace/notes/upload.bin");
    assert!(!target.exists(), "nothing at the target before completion");
    let listing: serde_json::Value = agent.get("/files/list?path=").await.json().await.unwrap();
    assert_eq!(listing["entries"], json!([]), "no partial file is listed: {listing}");

    // Resume from what the agent has (whole blocks are re-sent from the block boundary below it).
    let resume_from = saved / MIB * MIB;
    let r = if resume_from == saved {
        tus_patch(&agent, &url, saved, saved / MIB, (total - saved) / MIB).await
    } else {
        // Finish the partial block first, then the rest.
        let rest = block(saved / MIB).slice((saved - resume_from) as usize..);
        let r = agent
            .http
            .patch(&url)
            .bearer_auth(TOKEN)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", saved)
            .header("Content-Type", "application/offset+octet-stream")
            .body(rest)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let at = resume_from + MIB;
        tus_patch(&agent, &url, at, at / MIB, (total - at) / MIB).await
    };
    assert_eq!(r.status(), 204);
    let mut expected = Vec::new();
    for i in 0..8 {
        expected.extend_from_slice(&block(i));
    }
    assert_eq!(std::fs::read(&target).unwrap(), expected);
}

#[tokio::test]
async fn traversal_and_symlink_escapes_are_refused() {
    let fx = Fixture::new().await;
    let agent = dev_agent(&fx, "escape").await;
    let ws = agent.root.join("home/dev/workspace");
    let outside = fx.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "outside the jail").unwrap();
    std::os::unix::fs::symlink(&outside, ws.join("link-out")).unwrap();
    std::os::unix::fs::symlink("../../../../outside/secret.txt", ws.join("rel-link")).unwrap();

    for path in ["../../../etc/passwd", "/etc/passwd", "a/../../x", "link-out/secret.txt", "rel-link", "%2e%2e/x"] {
        let q = format!("/files/read?path={}", urlencode(path));
        let r = agent.get(&q).await;
        assert!(r.status().is_client_error(), "read {path}: {}", r.status());
        let body = r.text().await.unwrap();
        assert!(!body.contains("outside the jail") && !body.contains("root:"), "{path} leaked: {body}");
    }
    for path in ["../escaped.txt", "link-out/new.txt"] {
        let r = agent
            .http
            .put(agent.url(&format!("/files/write?path={}", urlencode(path))))
            .bearer_auth(TOKEN)
            .body("pwned")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "write {path}: {}", r.status());
    }
    assert!(!outside.join("new.txt").exists() && !agent.root.join("home/dev/escaped.txt").exists());
    let r = agent.post("/files/rename", json!({"from": "link-out/secret.txt", "to": "stolen.txt"})).await;
    assert!(r.status().is_client_error());
    let r =
        agent.http.delete(agent.url("/files?path=link-out&recursive=true")).bearer_auth(TOKEN).send().await.unwrap();
    // Removing the link itself is allowed; what it points to is untouched either way.
    assert!(r.status().is_success() || r.status().is_client_error());
    assert_eq!(std::fs::read_to_string(outside.join("secret.txt")).unwrap(), "outside the jail");
    // A resumable upload aimed outside is refused before any byte is taken.
    let meta = format!("path {}", base64::engine::general_purpose::STANDARD.encode("../../x.bin"));
    let r = agent
        .http
        .post(agent.url("/files/uploads"))
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", 10)
        .header("Upload-Metadata", meta)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    // And inside, everything works.
    assert!(agent.post("/files/mkdir", json!({"path": "ok"})).await.status().is_success());
    let r =
        agent.http.put(agent.url("/files/write?path=ok/hello.txt")).bearer_auth(TOKEN).body("hi").send().await.unwrap();
    assert!(r.status().is_success());
    assert_eq!(agent.get("/files/read?path=ok/hello.txt").await.text().await.unwrap(), "hi");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn the_plans_disk_bounds_uploads_and_writes_before_anything_is_written() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("quota");
    agent.ready().await;
    // A 1 MiB disk, as the API sends a plan's (there in GB, here in MB to keep the test small).
    agent.post("/config", json!({"vmid": 6021, "container_type": "dev", "runtime": "zrt", "disk_mb": 1})).await;
    agent.wait_status("provisioned", |s| s["provisioningComplete"] == true || s["state"] == "error").await;
    let workspace = agent.root.join("home/dev/workspace");
    let write = async |path: &str, body: Vec<u8>| {
        let r = agent.http.put(agent.url(&format!("/files/write?path={path}"))).bearer_auth(TOKEN).body(body);
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(write("keep.txt", b"precious".to_vec()).await.0, 200);

    // 2 MiB can never fit: refused at creation, before a byte is sent.
    let r = tus_create_response(&agent, "big.bin", 2 * MIB, false).await;
    assert_eq!(r.status(), 413);
    let message = r.text().await.unwrap();
    assert!(message.contains("quota"), "{message}");

    // The first 600 KiB upload fits; the second does not.
    let piece = 600 * 1024;
    let url = tus_create(&agent, "one.bin", piece).await;
    let body = vec![7u8; piece as usize];
    let r = agent
        .http
        .patch(&url)
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", 0)
        .header("Content-Type", "application/offset+octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let r = tus_create_response(&agent, "two.bin", piece, false).await;
    assert_eq!(r.status(), 413, "the second 600 KiB upload crosses 1 MiB");
    // Neither may a plain write, nor an overwrite that grows the file across the quota.
    let (status, message) = write("two.bin", body.clone()).await;
    assert_eq!(status, 413, "{message}");
    assert!(message.contains("quota"), "{message}");
    assert_eq!(tus_create_response(&agent, "one.bin", piece * 2, true).await.status(), 413);

    // What was there is intact, and nothing half-written is left.
    assert_eq!(std::fs::read(workspace.join("keep.txt")).unwrap(), b"precious");
    assert_eq!(std::fs::read(workspace.join("one.bin")).unwrap(), body);
    let mut names: Vec<String> =
        std::fs::read_dir(&workspace).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["keep.txt", "one.bin"]);

    // Deleting frees the space again.
    let r = agent.http.delete(agent.url("/files?path=one.bin")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(write("two.bin", body).await.0, 200);
}
