//! The browser IDE proxy under load: requests/s and added p99 latency through zlh, against the
//! same upstream reached directly and through nginx, all in one run.
//!
//! The upstream is a small HTTP/1.1 server answering every request with 1 KiB (a stand-in for
//! code-server's static assets). Four ways to reach it, each over 32 keep-alive connections:
//! - `direct`: no proxy, the baseline every proxy adds to;
//! - `nginx`: Debian's nginx as a reverse proxy (one worker, upstream keep-alive, no access log),
//!   skipped with a note when no `nginx` binary is found;
//! - `zlh`: the whole API with the IDE mounted, as `zlh-apid serve` runs it, on a hosted
//!   `dev-<vmid>.localhost` URL with a session cookie: the lean HTTP/1.1 path (`ide::h1`) with
//!   host parsing, cookie verification, authorisation against the database (SQLite, the embedded
//!   default, memoised for 1 s), header rewriting and the kept code-server connection;
//! - `zlh_proxy_alone`: the hyper-based core proxy (`zlh_core::ide::proxy::Proxy`) with nothing
//!   in front, which WebSockets, HTTP/2 and unusual requests still take.
//!
//! Fairness: nginx gets one worker process, zlh one runtime thread; the load generator and the
//! upstream run on threads of their own. criterion measures requests/s (`ide_proxy/*`); after
//! it, a latency pass per target records every request for a few seconds at saturation and at a
//! fixed 5,000 requests/s, and prints p50/p99, the p99 added over `direct`, the CPU time the
//! proxying thread or process spent per request (user and kernel, from `/proc`), and the ratio
//! of zlh's requests/s to nginx's (the targets: ≥ 1.0× nginx, ≤ 1 ms added p99).
//!
//! Needs Debian's `nginx` for the comparison: `apt-get install nginx`; run with
//! `cargo bench --bench ide_proxy` (`ZLH_IDE_ACCESS_CACHE_MS=0` to turn the access memo off).

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use futures::FutureExt as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use zlh_apid::config::ApiConfig;
use zlh_apid::servers::repo::{self, state, Kind};
use zlh_core::ide::proxy::{Forward, Proxy, ProxyConfig};
use zlh_core::ide::IdeRouter;

// zlh-apid's own allocator, so zlh is measured as the binary runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECTIONS: usize = 32;
const BODY_BYTES: usize = 1024;
const VMID: u32 = 6001;
const LATENCY_RUN: Duration = Duration::from_secs(3);
const PACED_RATE: u64 = 5_000;

/// One way to reach the upstream.
#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    host: String,
    cookie: Option<String>,
    /// `/proc/…/stat` of the thread or process doing the proxying: its CPU time per request.
    cpu: Option<PathBuf>,
}

/// CPU time a thread or process has used, in user space and in the kernel, from its
/// `/proc/…/stat`.
fn cpu_time(stat: &std::path::Path) -> (Duration, Duration) {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    let fields: Vec<&str> =
        text.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime, fields 14 and 15 of stat(5), in clock ticks of 1/100 s on Linux.
    (Duration::from_millis(ticks(11) * 10), Duration::from_millis(ticks(12) * 10))
}

/// The calling thread's `/proc/…/stat`.
fn this_thread_stat() -> PathBuf {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    PathBuf::from("/proc").join(link).join("stat")
}

/// Runs `serve` on a thread of its own with a one-thread runtime; returns what `setup` made.
fn on_own_thread<T, F, Fut>(name: &str, setup: F) -> T
where
    T: Send + 'static,
    F: FnOnce(std::sync::mpsc::Sender<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    on_own_thread_with_stat(name, setup).0
}

/// [`on_own_thread`], also returning the thread's `/proc/…/stat`.
fn on_own_thread_with_stat<T, F, Fut>(name: &str, setup: F) -> (T, PathBuf)
where
    T: Send + 'static,
    F: FnOnce(std::sync::mpsc::Sender<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let (stat_tx, stat_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            stat_tx.send(this_thread_stat()).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(setup(tx));
        })
        .unwrap();
    (rx.recv().expect("the server thread started"), stat_rx.recv().unwrap())
}

/// The stand-in code-server: 1 KiB for every request, keep-alive.
fn upstream() -> SocketAddr {
    on_own_thread("upstream", |ready| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ready.send(listener.local_addr().unwrap()).unwrap();
        let page = Bytes::from(vec![b'x'; BODY_BYTES]);
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let page = page.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let page = page.clone();
                    async move {
                        let mut r = hyper::Response::new(Full::new(page));
                        r.headers_mut().insert("content-type", "text/html".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

/// nginx as a reverse proxy to `upstream`, stopped on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // `-s stop` has the master take its worker down too; killing the master would orphan it.
        let stopped = Command::new(&self.bin)
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.dir.path().join("nginx.conf"))
            .args(["-s", "stop"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// The worker's `/proc/…/stat`: the one process that proxies.
    fn worker_stat(&self) -> Option<PathBuf> {
        let master = self.child.id();
        let began = Instant::now();
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                return Some(PathBuf::from(format!("/proc/{pid}/stat")));
            }
            if began.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::yield_now();
        }
    }
}

fn nginx_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join("nginx")).find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nginx(upstream: SocketAddr) -> Option<Nginx> {
    let Some(bin) = nginx_binary() else {
        println!("ide_proxy: no nginx binary found (Debian package `nginx`): the nginx comparison is skipped");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let root = dir.path().display();
    // What a careful operator would write: one worker, keep-alive both ways, the forwarding
    // headers zlh sets too, no access log (zlh logs no line per proxied request either).
    let user = if running_as_root() { "user root;" } else { "" };
    let conf = format!(
        r#"{user}
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    upstream code_server {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://code_server;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
"#
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new(&bin)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting nginx");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let began = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(began.elapsed() < Duration::from_secs(10), "nginx did not start listening");
        std::thread::yield_now();
    }
    Some(Nginx { child, addr, bin, dir })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// The API with the IDE mounted, as `zlh-apid serve` composes it, on SQLite; one running dev
/// server (vmid 6001) whose code-server is `upstream`, and a session cookie for its owner.
fn zlh(upstream: SocketAddr) -> Target {
    let ((addr, cookie), stat) = on_own_thread_with_stat("zlh", move |ready| async move {
        let t = zlh_apid::db::testing::sqlite().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // `ZLH_IDE_ACCESS_CACHE_MS=0` shows what a database read per request costs.
        let mut config = ApiConfig::default();
        if let Some(ms) = std::env::var("ZLH_IDE_ACCESS_CACHE_MS").ok().and_then(|v| v.parse().ok()) {
            config.ide_access_cache = Duration::from_millis(ms);
        }
        let app = zlh_apid::state::for_tests(t.db.clone(), config.clone());
        let ide = zlh_apid::ide::IdeState::new(&config, &[3u8; 32], addr.port()).unwrap();
        let user = zlh_apid::auth::users::create(
            &t.db,
            "bench@example.com",
            "bench",
            "unused",
            zlh_apid::auth::users::Role::User,
        )
        .await
        .unwrap();
        let s = repo::insert(&t.db, &user.id, Kind::Dev, "bench", "basic", &json!({})).await.unwrap();
        repo::set_vmid(&t.db, &s.id, VMID).await.unwrap();
        repo::set_endpoint(&t.db, &s.id, "http://127.0.0.1:9/", Some(&upstream.to_string())).await.unwrap();
        repo::set_state(&t.db, &s.id, state::RUNNING, None).await.unwrap();
        ide.server_started(VMID, upstream).await;
        let session = ide.router.issue_session(&user.id, zlh_core::Vmid(VMID)).unwrap();
        // Opened from a sign-in, as the bootstrap opens it: an IDE session ends with its sign-in.
        let (_, signed_in) = zlh_apid::auth::session::issue(&app, &user.id, chrono::Utc::now()).await.unwrap();
        zlh_apid::ide::ledger::record_origin(&t.db, &session.id, &signed_in.id, session.expires_at).await.unwrap();
        let cookie = format!("{}={}", ide.cookie_name(), session.value);
        let front = zlh_apid::ide::front(zlh_apid::http::app(app.clone()), app, ide);
        ready.send((addr, cookie)).unwrap();
        let _db = t;
        zlh_apid::http::server::serve(listener, front, std::future::pending()).await.unwrap();
    });
    Target {
        name: "zlh",
        addr,
        host: format!("dev-{VMID}.localhost:{}", addr.port()),
        cookie: Some(cookie),
        cpu: Some(stat),
    }
}

/// The core proxy with nothing in front (straight from hyper): every request forwarded to
/// `upstream`.
fn zlh_proxy_alone(upstream: SocketAddr) -> (SocketAddr, PathBuf) {
    on_own_thread_with_stat("zlh-proxy", move |ready| async move {
        let proxy = Proxy::new(ProxyConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ready.send(listener.local_addr().unwrap()).unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let proxy = proxy.clone();
                    async move {
                        let host =
                            req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
                        let fwd = Forward {
                            target: upstream,
                            host,
                            client_ip: None,
                            proto: "http".into(),
                            path_and_query: None,
                        };
                        Ok::<_, Infallible>(proxy.forward(req, fwd, || futures::future::pending().boxed()).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

type Sender = SendRequest<Empty<Bytes>>;
/// One connection's sender; each is only ever used by one request loop at a time.
type Conn = tokio::sync::Mutex<Sender>;

/// `CONNECTIONS` keep-alive connections to `target`, driven on the current runtime.
async fn connect(target: &Target) -> Vec<Conn> {
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let stream = tokio::net::TcpStream::connect(target.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        senders.push(tokio::sync::Mutex::new(sender));
    }
    senders
}

/// One `GET /` with the target's host and cookie; panics unless the 1 KiB page comes back, so a
/// refusal can never pass for speed.
async fn get(sender: &mut Sender, target: &Target) -> Duration {
    let began = Instant::now();
    let mut req = hyper::Request::get("/static/app.js").header("host", &target.host);
    if let Some(c) = &target.cookie {
        req = req.header("cookie", c);
    }
    sender.ready().await.unwrap();
    let resp = sender.send_request(req.body(Empty::new()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", target.name);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), BODY_BYTES, "{}", target.name);
    began.elapsed()
}

/// `total` requests over the connections, as fast as they answer. Each connection takes the
/// next request from a shared count, as a load generator like wrk keeps every connection busy:
/// a fixed share per connection would leave the last moments of each sample to whichever
/// connections a target happened to serve last, measuring its fairness rather than its speed.
async fn burst(senders: &[Conn], target: &Target, total: u64) -> Duration {
    let began = Instant::now();
    let left = std::cell::Cell::new(total);
    futures::future::join_all(senders.iter().map(|s| {
        let left = &left;
        async move {
            let mut s = s.lock().await;
            while left.get() > 0 {
                left.set(left.get() - 1);
                get(&mut s, target).await;
            }
        }
    }))
    .await;
    began.elapsed()
}

/// Every request's latency for `LATENCY_RUN`, at saturation or at `rate` requests/s in all.
async fn latencies(senders: &[Conn], target: &Target, rate: Option<u64>) -> (Vec<Duration>, f64) {
    let began = Instant::now();
    let all = Rc::new(RefCell::new(Vec::new()));
    futures::future::join_all(senders.iter().enumerate().map(|(i, s)| {
        let all = all.clone();
        async move {
            let mut s = s.lock().await;
            let mut tick = rate.map(|r| {
                let every = Duration::from_secs_f64(CONNECTIONS as f64 / r as f64);
                // Connections start spread over one period so they do not fire together.
                let start = tokio::time::Instant::now() + every * (i as u32) / (CONNECTIONS as u32);
                let mut t = tokio::time::interval_at(start, every);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while began.elapsed() < LATENCY_RUN {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let took = get(&mut s, target).await;
                all.borrow_mut().push(took);
            }
        }
    }))
    .await;
    let mut all = Rc::try_unwrap(all).unwrap().into_inner();
    all.sort_unstable();
    let per_sec = all.len() as f64 / began.elapsed().as_secs_f64();
    (all, per_sec)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn proxies(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let upstream = upstream();
    let nginx = nginx(upstream);
    let mut targets =
        vec![Target { name: "direct", addr: upstream, host: upstream.to_string(), cookie: None, cpu: None }];
    if let Some(n) = &nginx {
        let host = format!("dev-{VMID}.localhost:{}", n.addr.port());
        targets.push(Target { name: "nginx", addr: n.addr, host, cookie: None, cpu: n.worker_stat() });
    }
    targets.push(zlh(upstream));
    let (alone, stat) = zlh_proxy_alone(upstream);
    let host = format!("dev-{VMID}.localhost");
    targets.push(Target { name: "zlh_proxy_alone", addr: alone, host, cookie: None, cpu: Some(stat) });
    let mut connected: Vec<(Target, Vec<Conn>)> = Vec::new();

    let mut group = c.benchmark_group("ide_proxy");
    group.throughput(Throughput::Elements(1)).sample_size(10).warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(5));
    for target in &targets {
        // Connected right before its run: zlh closes a connection that sends no request within
        // its head timeout, as a browser's preconnected socket left unused would be.
        let senders = rt.block_on(connect(target));
        let used = &senders;
        group.bench_function(target.name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move { burst(used, target, iters).await })
        });
        connected.push((target.clone(), senders));
    }
    group.finish();

    println!("\nide_proxy latency: {CONNECTIONS} connections, {BODY_BYTES} B answers, {LATENCY_RUN:?} per target");
    let mut saturated = Vec::new();
    for (target, senders) in &connected {
        let cpu_before = target.cpu.as_deref().map(cpu_time);
        let (all, per_sec) = rt.block_on(latencies(senders, target, None));
        let cpu_per_request = target.cpu.as_deref().zip(cpu_before).map(|(p, (user, sys))| {
            let (user_after, sys_after) = cpu_time(p);
            let n = all.len() as u32;
            ((user_after - user) / n, (sys_after - sys) / n)
        });
        let (paced, _) = rt.block_on(latencies(senders, target, Some(PACED_RATE)));
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let cpu = cpu_per_request
            .map(|(user, sys)| {
                format!("CPU/req {:>5.2} µs (user {:>5.2}, kernel {:>5.2})", us(user + sys), us(user), us(sys))
            })
            .unwrap_or_else(|| " ".repeat(44));
        println!(
            "  {:<16} {:>9.0} req/s  {cpu}  p50 {:.3} ms  p99 {:.3} ms  | at {PACED_RATE}/s: p50 {:.3} ms  p99 {:.3} ms",
            target.name,
            per_sec,
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(percentile(&paced, 0.5)),
            ms(percentile(&paced, 0.99)),
        );
        let cpu_total = cpu_per_request.map(|(user, sys)| user + sys);
        saturated.push((target.name, per_sec, percentile(&all, 0.99), percentile(&paced, 0.99), cpu_total));
    }
    let find = |name: &str| saturated.iter().find(|(n, ..)| *n == name).copied();
    if let Some((_, _, direct_p99, direct_paced, _)) = find("direct") {
        for (name, _, p99, paced, _) in &saturated[1..] {
            println!(
                "  {name:<16} added p99 over direct: {:+.3} ms at saturation, {:+.3} ms at {PACED_RATE}/s",
                ms(*p99) - ms(direct_p99),
                ms(*paced) - ms(direct_paced)
            );
        }
    }
    if let (Some(z), Some(n)) = (find("zlh"), find("nginx")) {
        println!("  zlh / nginx requests/s (latency pass) = {:.3}", z.1 / n.1);
        if let (Some(zc), Some(nc)) = (z.4, n.4) {
            println!(
                "  nginx / zlh CPU per request = {:.3} (above 1: zlh does a request with less CPU)",
                nc.as_secs_f64() / zc.as_secs_f64()
            );
        }
    }
    drop(nginx);
}

criterion_group!(benches, proxies);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let (Some(zlh), Some(nginx)) = (mean("ide_proxy", "zlh"), mean("ide_proxy", "nginx")) else { return };
    // criterion's estimate is time per request at 32 in flight; requests/s is its inverse.
    println!("ide_proxy: zlh / nginx requests/s = {:.3} ({:.0} vs {:.0} req/s)", nginx / zlh, 1e9 / zlh, 1e9 / nginx);
    if let Some(direct) = mean("ide_proxy", "direct") {
        println!("ide_proxy: nginx / direct = {:.3}, zlh / direct = {:.3}", direct / nginx, direct / zlh);
    }
}

/// criterion's mean estimate (ns) of one benchmark of this run.
fn mean(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}
