//! What code-server is told about a request and what it never sees: the header rules both proxy
//! paths apply, the hyper one ([`super::proxy`]) on `HeaderMap`s and the lean one ([`super::h1`])
//! on the bytes as they came. Names compare without regard to case.
//!
//! Where a request came from (`X-Forwarded-For`, `X-Real-IP`) is the peer's address unless the
//! peer is one of the configured proxies in front ([`TrustedProxies`]): a browser's own values
//! would otherwise reach code-server as if zlh vouched for them.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus the ones
/// only a proxy in front may set.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Headers of the browser's request that stay behind besides the hop-by-hop ones: credentials
/// meant for zlh, forwarding headers only the proxy may set, and ones the proxy writes itself.
const STAYS_BEHIND: &[&str] = &[
    "host",
    "authorization",
    "cookie",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// The proxies in front (a load balancer, the edge) whose `X-Forwarded-For` and `X-Real-IP` are
/// believed, as address ranges; empty by default, so every peer is the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// From CIDR ranges (`10.0.0.0/8`) or single addresses (`10.0.0.1`, `::1`).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let net = |entry: &str| {
            IpNet::from_str(entry)
                .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                .map_err(|_| format!("{entry:?} is not an address or CIDR range"))
        };
        entries.iter().map(|e| net(e.as_ref().trim())).collect::<Result<_, _>>().map(Self)
    }

    /// Whether `peer` is one of them; an IPv4 peer seen on an IPv6 socket (`::ffff:10.0.0.1`)
    /// counts as its IPv4 address.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.0.iter().any(|net| net.contains(&peer))
    }
}

/// Whether `name` is hop-by-hop: one of [`HOP_BY_HOP`] or named by the message's `Connection`.
pub fn is_hop_by_hop<'a>(name: &str, mut connection: impl Iterator<Item = &'a [u8]>) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
        || connection.any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
}

/// Whether code-server must not get the browser's header `name`; `connection` gives the
/// request's `Connection` values.
pub fn request_header_stays_behind<'a>(name: &str, connection: impl Iterator<Item = &'a [u8]>) -> bool {
    STAYS_BEHIND.iter().any(|h| h.eq_ignore_ascii_case(name)) || is_hop_by_hop(name, connection)
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// Every `Cookie` pair of `values` except zlh's own (`names`, exact), joined as one header
/// value; `None` if none are left.
pub fn cookies_without<'a>(values: impl Iterator<Item = &'a [u8]>, names: &[String]) -> Option<Vec<u8>> {
    let mut kept: Vec<u8> = Vec::new();
    for value in values {
        for pair in value.split(|b| *b == b';').map(<[u8]>::trim_ascii).filter(|p| !p.is_empty()) {
            let name = pair.split(|b| *b == b'=').next().unwrap_or_default().trim_ascii();
            if !names.iter().any(|n| n.as_bytes() == name) {
                if !kept.is_empty() {
                    kept.extend_from_slice(b"; ");
                }
                kept.extend_from_slice(pair);
            }
        }
    }
    (!kept.is_empty()).then_some(kept)
}

/// The `X-Forwarded-For` code-server gets: the peer; after the chain sent with the request only
/// when the peer is a trusted proxy (`trusted`). `None` when there is nothing to say.
pub fn forwarded_for<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    client: Option<IpAddr>,
    trusted: bool,
) -> Option<Vec<u8>> {
    let mut chain: Vec<u8> = Vec::new();
    for hop in values.filter(|_| trusted).flat_map(tokens) {
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(hop);
    }
    if let Some(ip) = client {
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        std::io::Write::write_fmt(&mut chain, format_args!("{ip}")).expect("writing to a Vec");
    }
    (!chain.is_empty()).then_some(chain)
}

/// The `X-Real-IP` code-server gets: a trusted proxy's own (one value that is an address), else
/// the peer. `None` when there is nothing to say.
pub fn real_ip<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
    client: Option<IpAddr>,
    trusted: bool,
) -> Option<Vec<u8>> {
    if trusted {
        if let (Some(value), None) = (values.next(), values.next()) {
            let value = value.trim_ascii();
            if std::str::from_utf8(value).is_ok_and(|v| IpAddr::from_str(v).is_ok()) {
                return Some(value.to_vec());
            }
        }
    }
    client.map(|ip| ip.to_string().into_bytes())
}

/// Whether a `Set-Cookie` value from code-server would set one of zlh's own cookies (any case:
/// browsers treat cookie names case-sensitively, but nothing of code-server's is called that).
pub fn sets_session_cookie(value: &[u8], names: &[String]) -> bool {
    let cookie = value.split(|b| *b == b'=').next().unwrap_or_default().trim_ascii();
    names.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names_more_hop_by_hop_headers() {
        let conn: [&[u8]; 2] = [b"keep-alive, X-Private", b" ,other"];
        assert!(is_hop_by_hop("x-private", conn.iter().copied()));
        assert!(is_hop_by_hop("Other", conn.iter().copied()));
        assert!(is_hop_by_hop("Transfer-Encoding", std::iter::empty()));
        assert!(!is_hop_by_hop("accept", conn.iter().copied()));
        assert!(request_header_stays_behind("X-Forwarded-Host", std::iter::empty()));
        assert!(request_header_stays_behind("X-Real-IP", std::iter::empty()));
        assert!(!request_header_stays_behind("origin", std::iter::empty()));
    }

    #[test]
    fn only_zlh_cookies_leave() {
        let names = vec!["zlh_ide".to_owned(), "__Host-zlh_ide".to_owned()];
        let values: [&[u8]; 2] = [b"zlh_ide=secret; a=1;;b=2 ", b"__Host-zlh_ide=x;ZLH_IDE=kept"];
        assert_eq!(cookies_without(values.iter().copied(), &names).unwrap(), b"a=1; b=2; ZLH_IDE=kept");
        assert!(cookies_without([&b"zlh_ide=a"[..]].into_iter(), &names).is_none());
    }

    #[test]
    fn a_trusted_proxys_chain_gets_the_peer_appended() {
        let ip = Some("10.0.0.9".parse().unwrap());
        let values: [&[u8]; 2] = [b"1.2.3.4, ,5.6.7.8", b"9.9.9.9"];
        assert_eq!(forwarded_for(values.iter().copied(), ip, true).unwrap(), b"1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.9");
        assert_eq!(forwarded_for(std::iter::empty(), ip, true).unwrap(), b"10.0.0.9");
        assert!(forwarded_for(std::iter::empty(), None, true).is_none());
    }

    #[test]
    fn anyone_elses_chain_is_replaced_by_the_peer() {
        let ip = Some("203.0.113.7".parse().unwrap());
        let values: [&[u8]; 1] = [b"127.0.0.1, 10.0.0.1"];
        assert_eq!(forwarded_for(values.iter().copied(), ip, false).unwrap(), b"203.0.113.7");
        assert!(forwarded_for(values.iter().copied(), None, false).is_none());
    }

    #[test]
    fn real_ip_is_the_peer_unless_a_trusted_proxy_names_one_address() {
        let ip = Some("203.0.113.7".parse().unwrap());
        let one: [&[u8]; 1] = [b" 198.51.100.2 "];
        assert_eq!(real_ip(one.iter().copied(), ip, true).unwrap(), b"198.51.100.2");
        assert_eq!(real_ip(one.iter().copied(), ip, false).unwrap(), b"203.0.113.7");
        let two: [&[u8]; 2] = [b"198.51.100.2", b"198.51.100.3"];
        assert_eq!(real_ip(two.iter().copied(), ip, true).unwrap(), b"203.0.113.7");
        let junk: [&[u8]; 1] = [b"127.0.0.1\r\nx-evil: 1"];
        assert_eq!(real_ip(junk.iter().copied(), ip, true).unwrap(), b"203.0.113.7");
        assert_eq!(real_ip(std::iter::empty(), ip, true).unwrap(), b"203.0.113.7");
    }

    #[test]
    fn trusted_proxies_are_ranges_or_addresses() {
        let t = TrustedProxies::parse(&["10.0.0.1/32", "192.168.0.0/16", "::1"]).unwrap();
        assert!(t.contains("10.0.0.1".parse().unwrap()));
        assert!(!t.contains("10.0.0.2".parse().unwrap()));
        assert!(t.contains("192.168.44.5".parse().unwrap()));
        assert!(t.contains("::1".parse().unwrap()));
        assert!(t.contains("::ffff:10.0.0.1".parse().unwrap()), "an IPv4 peer on an IPv6 socket");
        assert!(!TrustedProxies::default().contains("127.0.0.1".parse().unwrap()));
        let err = TrustedProxies::parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(TrustedProxies::parse(&["example.com"]).is_err());
    }

    #[test]
    fn zlh_cookies_cannot_be_set_in_any_case() {
        let names = vec!["zlh_ide".to_owned()];
        assert!(sets_session_cookie(b"ZLH_IDE=x; Path=/", &names));
        assert!(sets_session_cookie(b" zlh_ide =x", &names));
        assert!(!sets_session_cookie(b"zlh_ide2=x", &names));
    }
}
