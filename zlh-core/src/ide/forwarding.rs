//! What code-server is told about a request and what it never sees: the header rules both proxy
//! paths apply, the hyper one ([`super::proxy`]) on `HeaderMap`s and the lean one ([`super::h1`])
//! on the bytes as they came. Names compare without regard to case.

use std::net::IpAddr;

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
];

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

/// The `X-Forwarded-For` code-server gets: the chain the browser's side sent, then the peer.
/// `None` when both are empty.
pub fn forwarded_for<'a>(values: impl Iterator<Item = &'a [u8]>, client: Option<IpAddr>) -> Option<Vec<u8>> {
    let mut chain: Vec<u8> = Vec::new();
    for hop in values.flat_map(tokens) {
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
    fn the_peer_is_appended_to_the_chain() {
        let ip = Some("10.0.0.9".parse().unwrap());
        let values: [&[u8]; 2] = [b"1.2.3.4, ,5.6.7.8", b"9.9.9.9"];
        assert_eq!(forwarded_for(values.iter().copied(), ip).unwrap(), b"1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.9");
        assert_eq!(forwarded_for(std::iter::empty(), ip).unwrap(), b"10.0.0.9");
        assert!(forwarded_for(std::iter::empty(), None).is_none());
    }

    #[test]
    fn zlh_cookies_cannot_be_set_in_any_case() {
        let names = vec!["zlh_ide".to_owned()];
        assert!(sets_session_cookie(b"ZLH_IDE=x; Path=/", &names));
        assert!(sets_session_cookie(b" zlh_ide =x", &names));
        assert!(!sets_session_cookie(b"zlh_ide2=x", &names));
    }
}
