//! The admitting listener over real TCP: connections over an address's cap are closed on
//! arrival and counted, other addresses and admitted connections are not affected, closed
//! connections give their places back; and the open-files limit is raised to the hard one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use zlh_core::net::{open_files, AdmittingListener, ConnectionLimits, Refusal};

const WAIT: Duration = Duration::from_secs(5);

async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// What the server said first: `hi` when admitted; nothing (closed, or reset) when refused.
async fn greeting(conn: &mut TcpStream) -> Vec<u8> {
    let mut buf = [0u8; 2];
    match tokio::time::timeout(WAIT, conn.read_exact(&mut buf)).await.expect("an answer or a close in time") {
        Ok(_) => buf.to_vec(),
        Err(_) => Vec::new(),
    }
}

/// Greets every admitted connection and holds it (and its place) until the client closes it.
/// The refusals are recorded.
async fn greeter(limits: ConnectionLimits) -> (SocketAddr, Arc<Mutex<Vec<Refusal>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(Mutex::new(Vec::new()));
    let counted = refused.clone();
    let mut listener = AdmittingListener::new(listener, &limits).on_refused(move |r| counted.lock().unwrap().push(r));
    tokio::spawn(async move {
        loop {
            let (mut stream, _, admitted) = listener.accept().await;
            tokio::spawn(async move {
                let _ = stream.write_all(b"hi").await;
                let _ = stream.read_to_end(&mut Vec::new()).await;
                drop(admitted);
            });
        }
    });
    (addr, refused)
}

#[tokio::test]
async fn connections_over_an_address_cap_are_closed_on_arrival_and_places_come_back() {
    let (addr, refused) = greeter(ConnectionLimits { per_address: 20, ..Default::default() }).await;
    let mut admitted = Vec::new();
    for _ in 0..20 {
        let mut conn = connect_from([127, 0, 0, 1], addr).await;
        assert_eq!(greeting(&mut conn).await, b"hi");
        admitted.push(conn);
    }
    for _ in 0..30 {
        let mut conn = connect_from([127, 0, 0, 1], addr).await;
        assert_eq!(greeting(&mut conn).await, b"", "over the cap: closed without a word");
    }
    assert_eq!(*refused.lock().unwrap(), [Refusal::PerAddress; 30]);
    let mut other = connect_from([127, 0, 0, 2], addr).await;
    assert_eq!(greeting(&mut other).await, b"hi", "another address has its own share");

    // A closed connection's place comes back once the server has seen it close.
    drop(admitted.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut conn = connect_from([127, 0, 0, 1], addr).await;
        if greeting(&mut conn).await == b"hi" {
            break;
        }
        assert!(Instant::now() < deadline, "the place never came back");
    }
}

#[tokio::test]
async fn the_total_cap_holds_across_addresses() {
    // No health lane here: it is tested with the servers that answer in it.
    let limits = ConnectionLimits { per_address: 5, max: 8, health_reserve: 0, ..Default::default() };
    let (addr, refused) = greeter(limits).await;
    let mut held = Vec::new();
    for i in 0..8u8 {
        let mut conn = connect_from([127, 0, 1, i], addr).await;
        assert_eq!(greeting(&mut conn).await, b"hi");
        held.push(conn);
    }
    let mut ninth = connect_from([127, 0, 1, 8], addr).await;
    assert_eq!(greeting(&mut ninth).await, b"", "the ninth connection is closed, whatever its address");
    assert_eq!(*refused.lock().unwrap(), [Refusal::Total]);
}

#[test]
fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let hard = before.maximum.expect("a finite hard limit");
    // Lowering the soft limit needs no privilege; this binary's other tests need few files.
    setrlimit(Resource::Nofile, Rlimit { current: Some(hard.min(4096) / 2), maximum: before.maximum }).unwrap();
    assert_eq!(open_files::raise_to_hard_limit().unwrap(), hard);
    assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
}
