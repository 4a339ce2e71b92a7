//! Which TCP connections a daemon takes: at most [`ConnectionLimits::per_address`] open from one
//! client address (an IPv6 client by its /64, which one subscriber usually gets whole) and at
//! most [`ConnectionLimits::total`] in all, so that clients which only open connections cannot
//! use up the process's descriptors and starve everyone else. A connection over either cap is
//! accepted and closed at once: the backlog drains and no descriptor stays held for it.
//!
//! Beyond the total, up to [`ConnectionLimits::health_reserve`] more connections are admitted
//! into the health lane ([`Admitted::health_lane`], [`super::health_lane`]): each is answered one
//! request, the health route's or a 503, and closed, so that monitoring still sees a daemon whose
//! total is full. The per-address cap counts lane connections too.
//!
//! Accounting happens only when a connection is accepted and when its [`Admitted`] is dropped;
//! requests on an admitted connection cost nothing here.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// How long accepting pauses when the process or the system is out of descriptors: they come
/// back as connections close, and retrying at once would spin.
const OUT_OF_FILES_BACKOFF: Duration = Duration::from_millis(100);

/// Connection caps and request-head deadlines: `[connections]` in a daemon's TOML config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Connections open at once from one client address (IPv6: one /64).
    pub per_address: usize,
    /// Connections open at once in all; 0 derives it from the open-files limit ([`Self::total`]).
    pub max: usize,
    /// Descriptors kept out of the derived total for everything but client connections: the
    /// database, agents, code-server, files.
    pub reserve: u64,
    /// How long a connection may take to send a complete request head: from being accepted for
    /// its first request, from its first byte for later ones. TOML `head_timeout_ms`.
    #[serde(rename = "head_timeout_ms", with = "millis")]
    pub head_timeout: Duration,
    /// How long a connection may sit idle between requests. TOML `idle_timeout_ms`.
    #[serde(rename = "idle_timeout_ms", with = "millis")]
    pub idle_timeout: Duration,
    /// Connections admitted beyond the total into the health lane; 0 turns it off.
    pub health_reserve: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            per_address: 256,
            max: 0,
            reserve: 512,
            head_timeout: Duration::from_secs(10),
            // nginx's default.
            idle_timeout: Duration::from_secs(75),
            health_reserve: 32,
        }
    }
}

/// A limit given wrongly.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("{name} must be a whole number, not {value:?}")]
    NotANumber { name: String, value: String },
    #[error("connections.{0} must be at least 1")]
    Zero(&'static str),
}

impl ConnectionLimits {
    /// Overrides from the environment: `<prefix>MAX_CONNECTIONS`,
    /// `<prefix>MAX_CONNECTIONS_PER_ADDRESS`, `<prefix>HEAD_TIMEOUT_MS`, `<prefix>IDLE_TIMEOUT_MS`,
    /// `<prefix>HEALTH_RESERVE` (empty values are ignored); then [`Self::validate`]. On an error nothing is changed.
    pub fn apply_env(&mut self, prefix: &str, env: impl Fn(&str) -> Option<String>) -> Result<(), LimitsError> {
        let number = |suffix: &str| -> Result<Option<u64>, LimitsError> {
            let name = format!("{prefix}{suffix}");
            match env(&name).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(value) => value.trim().parse().map(Some).map_err(|_| LimitsError::NotANumber { name, value }),
            }
        };
        let mut next = self.clone();
        if let Some(v) = number("MAX_CONNECTIONS")? {
            next.max = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = number("MAX_CONNECTIONS_PER_ADDRESS")? {
            next.per_address = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = number("HEAD_TIMEOUT_MS")? {
            next.head_timeout = Duration::from_millis(v);
        }
        if let Some(v) = number("IDLE_TIMEOUT_MS")? {
            next.idle_timeout = Duration::from_millis(v);
        }
        if let Some(v) = number("HEALTH_RESERVE")? {
            next.health_reserve = usize::try_from(v).unwrap_or(usize::MAX);
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Refuses limits that would shut every client out or close connections at once.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.per_address == 0 {
            return Err(LimitsError::Zero("per_address"));
        }
        if self.head_timeout.is_zero() {
            return Err(LimitsError::Zero("head_timeout_ms"));
        }
        if self.idle_timeout.is_zero() {
            return Err(LimitsError::Zero("idle_timeout_ms"));
        }
        Ok(())
    }

    /// The cap on all connections with `open_files` descriptors: [`Self::max`] when set, else
    /// half of what the reserve leaves, as a proxied connection holds a second descriptor (its
    /// code-server connection, a console's terminal). The reserve takes at most half.
    pub fn total(&self, open_files: u64) -> usize {
        if self.max > 0 {
            return self.max;
        }
        let reserved = self.reserve.min(open_files / 2);
        usize::try_from((open_files - reserved) / 2).unwrap_or(usize::MAX).max(1)
    }
}

/// Why a connection was closed on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Its address (or /64) already had [`ConnectionLimits::per_address`] open.
    PerAddress,
    /// [`ConnectionLimits::total`] were open, and the health lane was full too.
    Total,
    /// [`ConnectionLimits::total`] were open: admitted into the health lane only.
    HealthLane,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerAddress => "per_address",
            Refusal::Total => "total",
            Refusal::HealthLane => "health_lane",
        }
    }
}

/// A client address as counted: IPv4 whole (IPv4-mapped IPv6 too), IPv6 by its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl AddressKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressKey::V4(v4),
            IpAddr::V6(v6) => AddressKey::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

/// The counts behind the caps.
#[derive(Debug)]
struct Admission {
    per_address: usize,
    total: usize,
    health_reserve: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    /// In the health lane, not in `open`.
    lane: usize,
    by_address: HashMap<AddressKey, usize>,
}

impl Admission {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let key = AddressKey::of(ip);
        let mut counts = self.counts.lock().expect("admission lock");
        let from_address = counts.by_address.get(&key).copied().unwrap_or(0);
        if from_address >= self.per_address {
            return Err(Refusal::PerAddress);
        }
        let health_lane = counts.open >= self.total;
        if health_lane {
            if counts.lane >= self.health_reserve {
                return Err(Refusal::Total);
            }
            counts.lane += 1;
        } else {
            counts.open += 1;
        }
        counts.by_address.insert(key, from_address + 1);
        Ok(Admitted { admission: self.clone(), key, health_lane })
    }

    fn release(&self, key: AddressKey, health_lane: bool) {
        let mut counts = self.counts.lock().expect("admission lock");
        if health_lane {
            counts.lane -= 1;
        } else {
            counts.open -= 1;
        }
        if let Some(n) = counts.by_address.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.by_address.remove(&key);
            }
        }
    }
}

/// An admitted connection's place under the caps, given back when this is dropped: keep it
/// for as long as the connection is open.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    key: AddressKey,
    health_lane: bool,
}

impl Admitted {
    /// Admitted beyond the total: serve it with [`super::health_lane::serve`], not in full.
    pub fn health_lane(&self) -> bool {
        self.health_lane
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.release(self.key, self.health_lane);
    }
}

type RefusalHook = Box<dyn Fn(Refusal) + Send + Sync>;

/// A listener that hands out only connections within the caps, and rides out running out of
/// descriptors.
pub struct AdmittingListener {
    listener: TcpListener,
    admission: Arc<Admission>,
    on_refused: RefusalHook,
    /// Within a run of accept failures for want of descriptors (logged once per run).
    out_of_files: bool,
}

impl AdmittingListener {
    /// Caps connections on `listener` by `limits`, the total sized by the open-files limit now
    /// in force (raise it first: [`super::open_files::raise_to_hard_limit`]).
    pub fn new(listener: TcpListener, limits: &ConnectionLimits) -> Self {
        let total = limits.total(super::open_files::soft_limit());
        tracing::debug!(per_address = limits.per_address, total, "connection caps");
        let admission = Arc::new(Admission {
            per_address: limits.per_address,
            total,
            health_reserve: limits.health_reserve,
            counts: Mutex::default(),
        });
        Self { listener, admission, on_refused: Box::new(|_| {}), out_of_files: false }
    }

    /// Calls `hook` for every connection refused (to count them).
    pub fn on_refused(mut self, hook: impl Fn(Refusal) + Send + Sync + 'static) -> Self {
        self.on_refused = Box::new(hook);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The cap on all connections.
    pub fn total(&self) -> usize {
        self.admission.total
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> usize {
        self.admission.counts.lock().expect("admission lock").open
    }

    /// The next connection within the caps, or in the health lane ([`Admitted::health_lane`]).
    /// Connections over a cap are closed on arrival; failures to accept are waited out, never
    /// returned. Cancel-safe.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr, Admitted) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if std::mem::take(&mut self.out_of_files) {
                        tracing::info!("accepting connections again");
                    }
                    match self.admission.admit(peer.ip()) {
                        Ok(admitted) => {
                            if admitted.health_lane {
                                tracing::debug!(%peer, "connection in the health lane");
                                (self.on_refused)(Refusal::HealthLane);
                            }
                            return (stream, peer, admitted);
                        }
                        Err(refusal) => {
                            // Dropped at once: closes the connection and frees its descriptor.
                            drop(stream);
                            tracing::debug!(%peer, reason = refusal.as_str(), "connection refused");
                            (self.on_refused)(refusal);
                        }
                    }
                }
                Err(e) if is_out_of_resources(&e) => {
                    if !std::mem::replace(&mut self.out_of_files, true) {
                        tracing::warn!(error = %e, "cannot accept connections: out of descriptors or memory");
                    }
                    tokio::time::sleep(OUT_OF_FILES_BACKOFF).await;
                }
                // A connection that went away before it was accepted, and the like.
                Err(e) if is_per_connection(&e) => tracing::debug!(error = %e, "accepting a connection failed"),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(OUT_OF_FILES_BACKOFF).await;
                }
            }
        }
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: nothing can be accepted until something is freed.
fn is_out_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
}

/// The deadline for a connection's first request where the HTTP server keeps none of its own:
/// hyper waits without limit for the bytes that tell HTTP/1 from HTTP/2 and for an HTTP/2
/// preface. Poll [`FirstRequest::expired`] beside the connection; the service calls
/// [`RequestSeen::mark`] for every request.
pub struct FirstRequest {
    seen: RequestSeen,
    deadline: Option<Pin<Box<Sleep>>>,
}

/// Held by a connection's service: marks that a request arrived.
#[derive(Debug, Clone, Default)]
pub struct RequestSeen(Arc<AtomicBool>);

impl RequestSeen {
    pub fn mark(&self) {
        if !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

impl FirstRequest {
    /// A first request is due within `timeout` from now.
    pub fn new(timeout: Duration) -> Self {
        Self { seen: RequestSeen::default(), deadline: Some(Box::pin(tokio::time::sleep(timeout))) }
    }

    pub fn marker(&self) -> RequestSeen {
        self.seen.clone()
    }

    /// True once the deadline passed with no request; until then, wakes `cx` at the deadline.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline.as_mut() else { return false };
        if self.seen.0.load(Ordering::Relaxed) {
            self.deadline = None;
            return false;
        }
        matches!(deadline.as_mut().poll(cx), Poll::Ready(()))
    }
}

/// Durations in TOML as milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(per_address: usize, total: usize) -> Arc<Admission> {
        Arc::new(Admission { per_address, total, health_reserve: 0, counts: Mutex::default() })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_gets_its_share_and_no_more_and_a_closed_connection_frees_its_place() {
        let a = admission(2, 100);
        let first = a.admit(ip("192.0.2.1")).unwrap();
        let _second = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.1")).unwrap_err(), Refusal::PerAddress);
        // The same address written as IPv4-mapped IPv6 is the same client.
        assert_eq!(a.admit(ip("::ffff:192.0.2.1")).unwrap_err(), Refusal::PerAddress);
        let _other = a.admit(ip("192.0.2.2")).expect("another address is not affected");
        drop(first);
        let _again = a.admit(ip("192.0.2.1")).expect("a closed connection gives its place back");
    }

    #[test]
    fn an_ipv6_client_counts_by_its_64_and_the_total_caps_everyone() {
        let a = admission(2, 3);
        let _x = a.admit(ip("2001:db8:1:2::1")).unwrap();
        let _y = a.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(a.admit(ip("2001:db8:1:2::77")).unwrap_err(), Refusal::PerAddress, "same /64");
        let _z = a.admit(ip("2001:db8:1:3::1")).expect("the next /64 is another client");
        assert_eq!(a.admit(ip("198.51.100.7")).unwrap_err(), Refusal::Total);
        assert_eq!(a.counts.lock().unwrap().open, 3);
        drop((_x, _y, _z));
        let counts = a.counts.lock().unwrap();
        assert_eq!((counts.open, counts.by_address.len()), (0, 0), "nothing left behind");
    }

    #[test]
    fn beyond_the_total_the_health_lane_takes_its_reserve_and_the_per_address_cap_still_holds() {
        let a = Arc::new(Admission { per_address: 2, total: 2, health_reserve: 2, counts: Mutex::default() });
        let full = [a.admit(ip("192.0.2.1")).unwrap(), a.admit(ip("192.0.2.2")).unwrap()];
        assert!(full.iter().all(|c| !c.health_lane()));
        let lane = a.admit(ip("192.0.2.1")).expect("the total is full: into the lane");
        assert!(lane.health_lane());
        assert_eq!(a.admit(ip("192.0.2.1")).unwrap_err(), Refusal::PerAddress, "lane places count for the address");
        let _lane2 = a.admit(ip("192.0.2.3")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.4")).unwrap_err(), Refusal::Total, "total and lane full");
        drop(lane);
        assert!(a.admit(ip("192.0.2.4")).unwrap().health_lane(), "a closed lane connection frees its place");
        drop(full);
        assert!(!a.admit(ip("192.0.2.4")).unwrap().health_lane(), "places under the total come first");
        let counts = a.counts.lock().unwrap();
        assert_eq!((counts.open, counts.lane), (0, 1));
    }

    #[test]
    fn the_derived_total_leaves_the_reserve_and_a_descriptor_per_proxied_connection() {
        let limits = ConnectionLimits::default();
        assert_eq!(limits.total(20_000), (20_000 - 512) / 2);
        assert_eq!(limits.total(1024), 256, "the reserve takes at most half");
        assert_eq!(limits.total(1), 1);
        assert_eq!(ConnectionLimits { max: 20, ..limits }.total(20_000), 20);
    }

    #[test]
    fn env_overrides_apply_whole_or_not_at_all() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let mut limits = ConnectionLimits::default();
        limits
            .apply_env(
                "ZLH_X_",
                vars(&[
                    ("ZLH_X_MAX_CONNECTIONS_PER_ADDRESS", "20"),
                    ("ZLH_X_HEAD_TIMEOUT_MS", "250"),
                    ("ZLH_X_HEALTH_RESERVE", "5"),
                ]),
            )
            .unwrap();
        assert_eq!((limits.per_address, limits.head_timeout), (20, Duration::from_millis(250)));
        assert_eq!(limits.health_reserve, 5);

        let before = limits.clone();
        let err = limits
            .apply_env("ZLH_X_", vars(&[("ZLH_X_MAX_CONNECTIONS", "5"), ("ZLH_X_IDLE_TIMEOUT_MS", "soon")]))
            .unwrap_err();
        assert!(err.to_string().contains("ZLH_X_IDLE_TIMEOUT_MS"), "{err}");
        let err = limits.apply_env("ZLH_X_", vars(&[("ZLH_X_MAX_CONNECTIONS_PER_ADDRESS", "0")])).unwrap_err();
        assert!(err.to_string().contains("per_address"), "{err}");
        assert_eq!(limits, before, "a bad value changes nothing");
    }

    #[test]
    fn toml_names_the_timeouts_in_milliseconds() {
        let limits: ConnectionLimits =
            toml::from_str("per_address = 8\nhead_timeout_ms = 1500\nhealth_reserve = 0\n").unwrap();
        assert_eq!(limits.health_reserve, 0);
        assert_eq!((limits.per_address, limits.head_timeout), (8, Duration::from_millis(1500)));
        assert_eq!(limits.idle_timeout, ConnectionLimits::default().idle_timeout);
        assert!(toml::from_str::<ConnectionLimits>("per_adress = 8\n").is_err());
    }
}
