//! The console WebSocket end to end: a real server on 127.0.0.1, a real WebSocket client, a real
//! supervised game process and a real shell on a PTY.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use zlh_core::supervisor::process::{ProcessOptions, ProcessSupervisor};
use zlh_core::supervisor::{ProcessSpec, Supervisor};
use zlh_core::token::{self, CONSOLE_PURPOSE};

use super::ShellSpec;
use crate::http::auth::{AgentAuth, AgentToken};
use crate::http::console::{router, ConsoleState};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const TOKEN: &str = "agent-token-0123456789abcdef0123456789abcdef";
const OTHER_AGENT_TOKEN: &str = "other-agent-token-0123456789abcdef01234567";
const VMID: u32 = 105;
/// Bound on every wait for something the server should do promptly.
const WAIT: Duration = Duration::from_secs(10);

fn state(game: Option<Arc<dyn Supervisor>>, shell: Option<ShellSpec>) -> ConsoleState {
    let auth = Arc::new(AgentAuth::new(AgentToken::new(TOKEN)).unwrap());
    ConsoleState::new(auth, Arc::new(|| Some(VMID)), Arc::new(move || game.clone()), Arc::new(move || shell.clone()))
}

async fn serve(state: ConsoleState) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    addr
}

/// A console ticket signed with the console key of the agent whose token is `agent_token`.
fn ticket(agent_token: &str, vmid: u32, issued_secs_ago: i64, ttl_secs: u64) -> String {
    let key = token::console_ticket_key(agent_token);
    let issued = chrono::Utc::now() - chrono::Duration::seconds(issued_secs_ago);
    token::issue(&key, CONSOLE_PURPOSE, "user-1", vmid, Duration::from_secs(ttl_secs), issued).unwrap()
}

fn good_ticket() -> String {
    ticket(TOKEN, VMID, 0, 60)
}

async fn connect(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    protocols: &[&str],
) -> Result<(Ws, tokio_tungstenite::tungstenite::handshake::client::Response), WsError> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(b) = bearer {
        req.headers_mut().insert(AUTHORIZATION, format!("Bearer {b}").parse().unwrap());
    }
    if !protocols.is_empty() {
        req.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, protocols.join(", ").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await
}

/// The HTTP status and JSON body of a refused upgrade.
async fn refused(addr: SocketAddr, path: &str, bearer: Option<&str>, protocols: &[&str]) -> (StatusCode, String) {
    match connect(addr, path, bearer, protocols).await {
        Ok(_) => panic!("{path} upgraded; expected a refusal"),
        Err(WsError::Http(resp)) => {
            let body: serde_json::Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            (resp.status(), body["error"].as_str().unwrap().to_owned())
        }
        Err(e) => panic!("unexpected client error: {e}"),
    }
}

/// The next text message, skipping control frames.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("no message in time");
        match msg.expect("socket ended").expect("socket error") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// The close frame the server sends next (after any data messages), as (code, reason).
async fn close_frame(ws: &mut Ws) -> (u16, String) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("no close in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), frame.reason.as_str().to_owned()),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a close frame"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before close: {e}"),
        }
    }
}

/// Waits for `line` among the supervisor's output (recent or live).
async fn wait_for_line(game: &dyn Supervisor, line: &str) {
    let (recent, mut live) = game.subscribe_output();
    if recent.iter().any(|l| l.line == line) {
        return;
    }
    tokio::time::timeout(WAIT, async { while live.next_line().await.map(|l| l.line != line).unwrap_or(true) {} })
        .await
        .unwrap_or_else(|_| panic!("the game never printed {line:?}"));
}

/// A real supervised process that greets, then answers each stdin line with `got:<line>`.
async fn echo_game() -> Arc<ProcessSupervisor> {
    let spec = ProcessSpec::shell("echo hello-from-game; while read l; do echo got:$l; done");
    let game = Arc::new(ProcessSupervisor::new(spec, ProcessOptions::default()).unwrap());
    game.start().await.unwrap();
    wait_for_line(game.as_ref(), "hello-from-game").await;
    game
}

#[tokio::test]
async fn no_credential_wrong_token_and_url_tickets_are_refused_before_upgrade() {
    let game = echo_game().await;
    let addr = serve(state(Some(game.clone()), None)).await;

    // A plain GET, no WebSocket at all.
    let plain = reqwest::get(format!("http://{addr}/console/stream")).await.unwrap();
    assert_eq!(plain.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(plain.headers()["www-authenticate"], "Bearer");

    let (status, error) = refused(addr, "/console/stream", None, &[]).await;
    assert_eq!((status, error.as_str()), (StatusCode::UNAUTHORIZED, "missing or invalid bearer token"));
    let (status, _) = refused(addr, "/console/stream", Some(OTHER_AGENT_TOKEN), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A valid ticket where the bearer token goes is not the token.
    let (status, _) = refused(addr, "/console/stream", Some(&good_ticket()), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Tickets in the URL are refused, even valid ones, even alongside the in-band protocol.
    let in_url = format!("/console/stream?ticket={}", good_ticket());
    let (status, error) = refused(addr, &in_url, None, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error.contains("not accepted in the URL"), "{error}");
    let (status, _) = refused(addr, &in_url, None, &["zlh-console"]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let token_in_url = format!("/console/stream?token={TOKEN}");
    assert_eq!(refused(addr, &token_in_url, None, &[]).await.0, StatusCode::BAD_REQUEST);

    game.stop().await.unwrap();
}

#[tokio::test]
async fn bearer_and_subprotocol_tickets_open_the_console() {
    let game = echo_game().await;
    let addr = serve(state(Some(game.clone()), None)).await;

    let (mut ws, resp) = connect(addr, "/console/stream", Some(TOKEN), &[]).await.unwrap();
    assert!(resp.headers().get(SEC_WEBSOCKET_PROTOCOL).is_none());
    assert_eq!(next_text(&mut ws).await, "hello-from-game");
    ws.close(None).await.unwrap();

    let offered = format!("zlh-ticket.{}", good_ticket());
    let (mut ws, resp) = connect(addr, "/console/stream", None, &["zlh-console", &offered]).await.unwrap();
    assert_eq!(resp.headers()[SEC_WEBSOCKET_PROTOCOL], "zlh-console", "selects the protocol, never the ticket");
    assert_eq!(next_text(&mut ws).await, "hello-from-game");
    ws.close(None).await.unwrap();

    game.stop().await.unwrap();
}

#[tokio::test]
async fn bad_subprotocol_tickets_are_refused_before_upgrade() {
    let game = echo_game().await;
    let addr = serve(state(Some(game.clone()), None)).await;
    let cases = [
        ("expired", ticket(TOKEN, VMID, 120, 30), "console ticket expired"),
        ("other vmid", ticket(TOKEN, VMID + 1, 0, 60), "console ticket is for another container"),
        ("other agent", ticket(OTHER_AGENT_TOKEN, VMID, 0, 60), "invalid console ticket"),
        ("garbage", "not.a.jwt".to_owned(), "invalid console ticket"),
    ];
    for (what, t, why) in cases {
        let offered = format!("zlh-ticket.{t}");
        let (status, error) = refused(addr, "/console/stream", None, &["zlh-console", &offered]).await;
        assert_eq!((status, error.as_str()), (StatusCode::UNAUTHORIZED, why), "{what}");
    }
    // A ticket without the console protocol would leave a browser with no protocol to accept.
    let offered = format!("zlh-ticket.{}", good_ticket());
    assert_eq!(refused(addr, "/console/stream", None, &[&offered]).await.0, StatusCode::UNAUTHORIZED);
    // A wrong bearer token is not rescued by a good ticket.
    let (status, _) = refused(addr, "/console/stream", Some(OTHER_AGENT_TOKEN), &["zlh-console", &offered]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Before provisioning there is no vmid to bind tickets to: tickets fail, the token works.
    let mut unprovisioned = state(Some(game.clone()), None);
    unprovisioned.vmid = Arc::new(|| None);
    let addr = serve(unprovisioned).await;
    let (status, error) = refused(addr, "/console/stream", None, &["zlh-console", &offered]).await;
    assert_eq!((status, error.as_str()), (StatusCode::UNAUTHORIZED, "this agent has no container id yet"));
    let (mut ws, _) = connect(addr, "/console/stream", Some(TOKEN), &[]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello-from-game");
    ws.close(None).await.unwrap();

    game.stop().await.unwrap();
}

#[tokio::test]
async fn a_ticket_in_the_first_message_opens_the_console() {
    let game = echo_game().await;
    let addr = serve(state(Some(game.clone()), None)).await;

    let (mut ws, resp) = connect(addr, "/console/stream", None, &["zlh-console"]).await.unwrap();
    assert_eq!(resp.headers()[SEC_WEBSOCKET_PROTOCOL], "zlh-console");
    let auth = serde_json::json!({ "type": "auth", "ticket": good_ticket() });
    ws.send(Message::text(auth.to_string())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello-from-game");
    ws.close(None).await.unwrap();

    game.stop().await.unwrap();
}

#[tokio::test]
async fn bad_first_messages_close_with_4401() {
    let game = echo_game().await;
    let addr = serve(state(Some(game.clone()), None)).await;
    let auth = |t: String| serde_json::json!({ "type": "auth", "ticket": t }).to_string();
    let cases = [
        (auth(ticket(TOKEN, VMID, 120, 30)), "console ticket expired"),
        (auth(ticket(TOKEN, VMID + 1, 0, 60)), "console ticket is for another container"),
        (auth(ticket(OTHER_AGENT_TOKEN, VMID, 0, 60)), "invalid console ticket"),
        ("say hello".to_owned(), r#"expected {"type":"auth","ticket":"…"} first"#),
        (format!("{{\"type\":\"input\",\"data\":\"{TOKEN}\"}}"), r#"expected {"type":"auth","ticket":"…"} first"#),
    ];
    for (first, why) in cases {
        let (mut ws, _) = connect(addr, "/console/stream", None, &["zlh-console"]).await.unwrap();
        ws.send(Message::text(first)).await.unwrap();
        assert_eq!(close_frame(&mut ws).await, (4401, why.to_owned()));
    }
    game.stop().await.unwrap();
    // Nothing typed before authentication reached the game.
    let (recent, _) = game.subscribe_output();
    assert!(recent.iter().all(|l| !l.line.starts_with("got:")), "{recent:?}");
}

#[tokio::test]
async fn a_ticket_opens_one_console_and_is_refused_after_in_either_form() {
    let game = echo_game().await;
    let addr = serve(state(Some(game.clone()), None)).await;

    // Subprotocol form: the first upgrade works, the same ticket again gets a 401 and no upgrade.
    let offered = format!("zlh-ticket.{}", good_ticket());
    let (mut ws, _) = connect(addr, "/console/stream", None, &["zlh-console", &offered]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello-from-game");
    for _ in 0..2 {
        let (status, error) = refused(addr, "/console/stream", None, &["zlh-console", &offered]).await;
        assert_eq!((status, error.as_str()), (StatusCode::UNAUTHORIZED, "console ticket already used"));
    }
    // Nor does it work in the first message once used in the subprotocol list.
    let ticket = offered.strip_prefix("zlh-ticket.").unwrap().to_owned();
    let auth = serde_json::json!({ "type": "auth", "ticket": ticket }).to_string();
    let (mut replay, _) = connect(addr, "/console/stream", None, &["zlh-console"]).await.unwrap();
    replay.send(Message::text(auth)).await.unwrap();
    assert_eq!(close_frame(&mut replay).await, (4401, "console ticket already used".to_owned()));
    ws.close(None).await.unwrap();

    // First-message form: one console, then 4401 for the same ticket, in either form.
    let ticket = good_ticket();
    let auth = serde_json::json!({ "type": "auth", "ticket": ticket }).to_string();
    let (mut ws, _) = connect(addr, "/console/stream", None, &["zlh-console"]).await.unwrap();
    ws.send(Message::text(auth.clone())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello-from-game");
    let (mut replay, _) = connect(addr, "/console/stream", None, &["zlh-console"]).await.unwrap();
    replay.send(Message::text(auth)).await.unwrap();
    assert_eq!(close_frame(&mut replay).await, (4401, "console ticket already used".to_owned()));
    let offered = format!("zlh-ticket.{ticket}");
    let (status, _) = refused(addr, "/console/stream", None, &["zlh-console", &offered]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    ws.close(None).await.unwrap();

    game.stop().await.unwrap();
}

#[tokio::test]
async fn a_ticket_claiming_more_than_a_minute_is_refused_even_well_signed() {
    let game = echo_game().await;
    let addr = serve(state(Some(game.clone()), None)).await;
    let ten_years = ticket(TOKEN, VMID, 0, 10 * 365 * 86_400);
    let offered = format!("zlh-ticket.{ten_years}");
    let (status, error) = refused(addr, "/console/stream", None, &["zlh-console", &offered]).await;
    assert_eq!((status, error.as_str()), (StatusCode::UNAUTHORIZED, "console ticket lives too long"));
    let auth = serde_json::json!({ "type": "auth", "ticket": ten_years }).to_string();
    let (mut ws, _) = connect(addr, "/console/stream", None, &["zlh-console"]).await.unwrap();
    ws.send(Message::text(auth)).await.unwrap();
    assert_eq!(close_frame(&mut ws).await, (4401, "console ticket lives too long".to_owned()));
    // Issued in the future so as to stay valid longer: refused too.
    let ahead = ticket(TOKEN, VMID, -3600, 60);
    let offered = format!("zlh-ticket.{ahead}");
    let (status, error) = refused(addr, "/console/stream", None, &["zlh-console", &offered]).await;
    assert_eq!((status, error.as_str()), (StatusCode::UNAUTHORIZED, "console ticket is issued in the future"));
    // A 60 s ticket, the longest allowed, works.
    let offered = format!("zlh-ticket.{}", ticket(TOKEN, VMID, 0, 60));
    let (mut ws, _) = connect(addr, "/console/stream", None, &["zlh-console", &offered]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello-from-game");
    ws.close(None).await.unwrap();
    game.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn silence_after_upgrade_closes_with_4401_after_ten_seconds() {
    let addr = serve(state(None, None)).await;
    let (mut ws, _) = connect(addr, "/console/stream", None, &["zlh-console"]).await.unwrap();
    let started = tokio::time::Instant::now();
    let msg = ws.next().await.expect("socket ended").expect("socket error");
    let Message::Close(Some(frame)) = msg else { panic!("expected a close frame, got {msg:?}") };
    assert_eq!((frame.code, frame.reason.as_str()), (CloseCode::from(4401), "authentication timed out"));
    assert!(started.elapsed() >= Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test]
async fn unavailable_modes_are_conflicts() {
    let game = echo_game().await;
    let only_game = serve(state(Some(game.clone()), None)).await;
    let nothing = serve(state(None, None)).await;
    let cases = [
        (only_game, "/console/stream?mode=shell", StatusCode::CONFLICT),
        (nothing, "/console/stream?mode=game", StatusCode::CONFLICT),
        (nothing, "/console/stream", StatusCode::CONFLICT),
        (only_game, "/console/stream?mode=telnet", StatusCode::BAD_REQUEST),
    ];
    for (addr, path, status) in cases {
        assert_eq!(refused(addr, path, Some(TOKEN), &[]).await.0, status, "{path}");
    }
    // Without credentials the answer is 401 whatever the mode.
    assert_eq!(refused(nothing, "/console/stream?mode=game", None, &[]).await.0, StatusCode::UNAUTHORIZED);
    // In-band: the mode is checked after authentication, and refused with 4000 + status.
    let (mut ws, _) = connect(nothing, "/console/stream?mode=game", None, &["zlh-console"]).await.unwrap();
    ws.send(Message::text(serde_json::json!({ "type": "auth", "ticket": good_ticket() }).to_string())).await.unwrap();
    assert_eq!(close_frame(&mut ws).await, (4409, "no game server console in this container".to_owned()));
    game.stop().await.unwrap();
}

#[tokio::test]
async fn game_console_round_trip() {
    let game = echo_game().await;
    let console = state(Some(game.clone()), None);
    let addr = serve(console.clone()).await;

    let (mut ws, _) = connect(addr, "/console/stream?mode=game", Some(TOKEN), &[]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello-from-game", "recent lines first");
    assert_eq!(console.console_sessions(), 1);

    ws.send(Message::text("say hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "got:say hi");
    ws.send(Message::text("one\r\ntwo\n")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "got:one");
    assert_eq!(next_text(&mut ws).await, "got:two");
    ws.send(Message::text(r#"{"type":"input","data":"three"}"#)).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "got:three");

    // A second console sees the history, then the same live lines.
    let (mut other, _) = connect(addr, "/console/stream", Some(TOKEN), &[]).await.unwrap();
    for line in ["hello-from-game", "got:say hi", "got:one", "got:two", "got:three"] {
        assert_eq!(next_text(&mut other).await, line);
    }
    ws.send(Message::text("four")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "got:four");
    assert_eq!(next_text(&mut other).await, "got:four");

    // Oversized input closes that connection (1009), not the game.
    other.send(Message::text("x".repeat(super::MAX_MESSAGE_BYTES + 1))).await.unwrap();
    assert_eq!(close_frame(&mut other).await.0, 1009);

    // Input to a stopped game is answered with a notice, and the console stays open.
    game.stop().await.unwrap();
    ws.send(Message::text("five")).await.unwrap();
    let notice = loop {
        let text = next_text(&mut ws).await;
        if text.starts_with("[zlh]") {
            break text;
        }
    };
    assert!(notice.contains("input not delivered"), "{notice}");
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_lagging_subscriber_is_told_how_many_lines_it_missed() {
    use zlh_core::supervisor::output::{OutputHub, OutputOptions};
    let hub = OutputHub::new(OutputOptions { channel_capacity: 2, ..OutputOptions::default() }).unwrap();
    let (_, mut rx) = hub.subscribe();
    for seq in 0..5 {
        hub.push(&format!("line {seq}"));
    }
    let mut shown = Vec::new();
    while let Some(event) = rx.try_recv() {
        shown.extend(super::game::event_text(&event));
    }
    assert_eq!(shown, ["[zlh] 3 lines skipped (console too slow)", "line 3", "line 4"]);
    drop(hub);
    assert_eq!(rx.recv().await, None);
}

#[test]
fn input_lines_split_on_newlines_and_accept_json_input() {
    use super::game::input_lines;
    assert_eq!(input_lines("list"), ["list"]);
    assert_eq!(input_lines(""), [""]);
    assert_eq!(input_lines("a\r\nb\n"), ["a", "b"]);
    assert_eq!(input_lines("a\n\nb"), ["a", "", "b"]);
    assert_eq!(input_lines(r#"{"type":"input","data":"op alice\nsay hi"}"#), ["op alice", "say hi"]);
    assert!(input_lines(r#"{"type":"resize","cols":80,"rows":24}"#).is_empty());
    // JSON that is not a control message is typed as is.
    assert_eq!(input_lines(r#"{"say":"hi"}"#), [r#"{"say":"hi"}"#]);
}

/// Sends `command` and collects PTY output until `marker` shows up. Markers are computed by the
/// shell (`$((…))`) so the terminal's echo of the command never matches.
async fn run_in_shell(ws: &mut Ws, command: &str, marker: &str) -> String {
    ws.send(Message::binary(format!("{command}\n").into_bytes())).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, async {
        while !out.contains(marker) {
            match ws.next().await.expect("socket ended").expect("socket error") {
                Message::Binary(b) => out.push_str(&String::from_utf8_lossy(&b)),
                Message::Text(t) => panic!("shell output comes as binary, got text {t:?}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {marker:?} in shell output: {out:?}"));
    out
}

/// The value after `key=` in the shell's output (not in the echoed command, which has `$`).
fn field(out: &str, key: &str) -> String {
    let pattern = format!("{key}=");
    out.match_indices(&pattern)
        .map(|(i, _)| &out[i + pattern.len()..])
        .find(|rest| !rest.starts_with(['$', '"']))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
        .to_owned()
}

fn pty_masters_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("ptmx"))
        .count()
}

/// Polls `condition` (no event exists for "a process is gone from /proc") within [`WAIT`].
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pty_shell_runs_as_the_dev_user_resizes_and_leaves_nothing_behind() {
    let root = rustix::process::getuid().is_root();
    // As root (CI, containers) the shell must switch to an unprivileged user: nobody/nogroup.
    let (uid, gid) = if root { (Some(65534), Some(65534)) } else { (None, None) };
    let expected_uid = uid.unwrap_or_else(|| rustix::process::getuid().as_raw());
    let env = BTreeMap::from(
        [("HOME", "/tmp"), ("USER", "dev"), ("LOGNAME", "dev"), ("TERM", "xterm-256color"), ("PATH", "/usr/bin:/bin")]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let spec = ShellSpec { program: "/bin/sh".into(), args: Vec::new(), env, cwd: "/tmp".into(), uid, gid };
    let console = state(None, Some(spec));
    let addr = serve(console.clone()).await;
    assert_eq!(pty_masters_open(), 0);
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some(), "the test runner's env has a variable to leak");

    // With no game server the console defaults to the shell.
    let (mut ws, _) = connect(addr, "/console/stream", Some(TOKEN), &[]).await.unwrap();
    let out = run_in_shell(
        &mut ws,
        r#"echo "uid=$(id -u) gid=$(id -g) groups=$(id -G | tr ' ' ,) pid=$$ tty=$(tty) term=$TERM leak=${CARGO_MANIFEST_DIR:-none}"; echo "end=$((40+2))""#,
        "end=42",
    )
    .await;
    assert_eq!(field(&out, "uid"), expected_uid.to_string(), "{out}");
    if root {
        assert_eq!(field(&out, "gid"), "65534", "{out}");
        assert_eq!(field(&out, "groups"), "65534", "root's supplementary groups are dropped: {out}");
    }
    assert!(field(&out, "tty").starts_with("/dev/pts/"), "a real terminal: {out}");
    assert_eq!(field(&out, "term"), "xterm-256color");
    assert_eq!(field(&out, "leak"), "none", "the agent's environment does not reach the shell: {out}");
    let pid: u32 = field(&out, "pid").parse().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(console.console_sessions(), 1);

    let out = run_in_shell(&mut ws, r#"echo "size=$(stty size | tr ' ' x)""#, "size=24x80").await;
    assert!(out.contains("size=24x80"), "default size: {out}");
    ws.send(Message::text(r#"{"type":"resize","cols":132,"rows":43}"#)).await.unwrap();
    let out = run_in_shell(&mut ws, r#"echo "size=$(stty size | tr ' ' x)""#, "size=43x132").await;
    assert!(out.contains("size=43x132"), "{out}");

    // Closing the socket hangs up the shell; it is reaped (not even a zombie) and its PTY closed.
    ws.close(None).await.unwrap();
    eventually("the shell is gone", || !std::path::Path::new(&format!("/proc/{pid}")).exists()).await;
    eventually("the session is counted out", || console.console_sessions() == 0).await;
    eventually("no PTY is left open", || pty_masters_open() == 0).await;

    // A session leader that ignores the hangup is killed after the grace period.
    let (mut ws, _) = connect(addr, "/console/stream?mode=shell", Some(TOKEN), &[]).await.unwrap();
    let out = run_in_shell(&mut ws, r#"echo "pid=$$ ready=$((2+2))"; trap '' HUP; exec sleep 1000"#, "ready=4").await;
    let pid: u32 = field(&out, "pid").parse().unwrap();
    eventually("the shell became sleep", || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "sleep")
    })
    .await;
    ws.close(None).await.unwrap();
    eventually("the stubborn shell is killed and reaped", || !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .await;
    eventually("no PTY is left open", || pty_masters_open() == 0).await;

    // A shell that exits closes the socket with 1000 and its status.
    let (mut ws, _) = connect(addr, "/console/stream?mode=shell", Some(TOKEN), &[]).await.unwrap();
    let out = run_in_shell(&mut ws, r#"echo "pid=$$ ready=$((1+1))""#, "ready=2").await;
    let pid: u32 = field(&out, "pid").parse().unwrap();
    ws.send(Message::binary(b"echo bye-$((6*7)); exit 3\n".to_vec())).await.unwrap();
    let mut out = String::new();
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("no close in time") {
            Some(Ok(Message::Binary(b))) => out.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Close(Some(frame)))) => break (u16::from(frame.code), frame.reason.as_str().to_owned()),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(out.contains("bye-42"), "output before the exit is delivered: {out:?}");
    assert_eq!(close, (1000, "exit status 3".to_owned()));
    eventually("the exited shell is reaped", || !std::path::Path::new(&format!("/proc/{pid}")).exists()).await;
    eventually("no PTY is left open", || pty_masters_open() == 0).await;
    eventually("the session is counted out", || console.console_sessions() == 0).await;
}
