//! Accepting with no descriptor left: the listener waits (it neither spins nor gives up), says
//! so once for the whole run of failures, and takes the waiting connections once descriptors
//! are back. A test binary of its own, as it lowers the process's open-files limit.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tokio::net::{TcpListener, TcpSocket};
use zlh_core::net::{AdmittingListener, ConnectionLimits};

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn count(&self, text: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap()).matches(text).count()
    }
}

#[tokio::test(start_paused = true)]
async fn out_of_descriptors_accepting_waits_logs_once_and_resumes() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut listener = AdmittingListener::new(listener, &ConnectionLimits { max: 1000, ..Default::default() });
    // The clients' sockets exist before the limit drops: connecting needs no new descriptor.
    let sockets: Vec<TcpSocket> = (0..8).map(|_| TcpSocket::new_v4().unwrap()).collect();
    let before = getrlimit(Resource::Nofile);
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    setrlimit(Resource::Nofile, Rlimit { current: Some(open + 2), maximum: before.maximum }).unwrap();
    let mut clients = Vec::new();
    for socket in sockets {
        clients.push(socket.connect(addr).await.unwrap());
    }

    let mut held = Vec::new();
    while let Ok(accepted) = tokio::time::timeout(Duration::from_secs(2), listener.accept()).await {
        held.push(accepted);
    }
    assert!(held.len() < clients.len(), "accepted {} connections with no descriptors left", held.len());
    assert_eq!(logs.count("cannot accept connections"), 1, "one warning for the whole run of failures");

    // Descriptors come back: the waiting connections are taken.
    setrlimit(Resource::Nofile, before).unwrap();
    while held.len() < clients.len() {
        held.push(tokio::time::timeout(Duration::from_secs(2), listener.accept()).await.expect("accepting resumes"));
    }
    assert_eq!(logs.count("accepting connections again"), 1);
}
