//! Which IDE a `Host` header names: `dev-<vmid>.<domain>`, optionally with `:port`.
//!
//! The host decides whose container a browser reaches, so the parser is strict and every vmid has
//! exactly one spelling: one extra label in front of the configured domain, `dev-` and decimal
//! digits without a sign or leading zero, a vmid in `1..=u32::MAX`, ASCII only, compared without
//! case. Anything else — userinfo, IPv6 literals, a trailing dot, more labels, the domain as a
//! prefix of another (`dev-1.localhost.evil.com`) — is refused rather than guessed at.

use super::IdeError;
use crate::types::Vmid;

/// The label in front of the domain: `dev-<vmid>`.
pub const LABEL_PREFIX: &str = "dev-";
/// Longest host header looked at (a DNS name is at most 253 characters, plus `:65535`).
const MAX_HOST_LEN: usize = 253 + 6;

/// `dev-<vmid>.<domain>`, without a port. `domain` is expected normalized ([`normalize_domain`]).
pub fn hosted_host(vmid: Vmid, domain: &str) -> String {
    format!("{LABEL_PREFIX}{}.{domain}", vmid.0)
}

/// The vmid `host` names under `domain` (normalized, see [`normalize_domain`]), or `BadHost`.
pub fn parse_host(host: &str, domain: &str) -> Result<Vmid, IdeError> {
    let bad = || IdeError::BadHost(host.chars().take(64).collect());
    if host.is_empty() || host.len() > MAX_HOST_LEN || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    // Userinfo and IPv6 literals have no place in an IDE host.
    if host.contains(['@', '[', ']', '/', '\\']) {
        return Err(bad());
    }
    let name = match host.split_once(':') {
        None => host,
        Some((name, port)) => {
            parse_port(port).ok_or_else(bad)?;
            name
        }
    };
    let name = name.to_ascii_lowercase();
    let label = name.strip_suffix(domain).and_then(|rest| rest.strip_suffix('.')).ok_or_else(bad)?;
    let digits = label.strip_prefix(LABEL_PREFIX).ok_or_else(bad)?;
    canonical_vmid(digits).ok_or_else(bad)
}

/// `1..=65535` in plain decimal digits: no sign, no leading zero.
fn parse_port(port: &str) -> Option<u16> {
    canonical_digits(port, 5)?.parse::<u16>().ok().filter(|p| *p > 0)
}

/// `1..=u32::MAX` in plain decimal digits: no sign, no leading zero. Also what the legacy path
/// proxy accepts in `/__ide/<vmid>/`.
pub fn canonical_vmid(digits: &str) -> Option<Vmid> {
    canonical_digits(digits, 10)?.parse::<u32>().ok().filter(|v| *v > 0).map(Vmid)
}

/// `s` if it is 1 to `max` ASCII digits without a leading zero.
fn canonical_digits(s: &str, max: usize) -> Option<&str> {
    let ok = !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    ok.then_some(s)
}

/// The configured domain in the one form the parser compares against: lowercase ASCII labels of
/// letters, digits and inner hyphens, no trailing dot, no port. Leaves room for the `dev-` label.
pub fn normalize_domain(domain: &str) -> Result<String, IdeError> {
    let bad = |why: &str| IdeError::Config(format!("IDE domain {domain:?}: {why}"));
    let d = domain.to_ascii_lowercase();
    if d.is_empty() || d.len() > 253 - (LABEL_PREFIX.len() + 11) {
        return Err(bad("must be 1 to 238 characters"));
    }
    for label in d.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad("expected dot-separated labels of letters, digits and inner hyphens (punycode for IDNs)"));
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(host: &str) -> Result<Vmid, IdeError> {
        parse_host(host, "localhost")
    }

    #[test]
    fn accepts_the_one_spelling_with_or_without_a_port() {
        assert_eq!(parse("dev-6001.localhost").unwrap(), Vmid(6001));
        assert_eq!(parse("dev-6001.localhost:4000").unwrap(), Vmid(6001));
        assert_eq!(parse("DEV-6001.LocalHost:4000").unwrap(), Vmid(6001));
        assert_eq!(parse("dev-4294967295.localhost").unwrap(), Vmid(u32::MAX));
        assert_eq!(parse_host("dev-7.ide.example.com:443", "ide.example.com").unwrap(), Vmid(7));
    }

    #[test]
    fn refuses_everything_else() {
        for host in [
            "",
            "localhost",
            "dev-.localhost",
            "dev-0.localhost",
            "dev-007.localhost",
            "dev-+7.localhost",
            "dev--7.localhost",
            "dev-7a.localhost",
            "dev-0x1f.localhost",
            "dev-4294967296.localhost",
            "dev-99999999999.localhost",
            "dev-1.dev-2.localhost",
            "a.dev-1.localhost",
            "dev-1.localhost.",
            "dev-1.localhost.evil.com",
            "dev-1.localhost.evil.com:4000",
            "dev-1.evillocalhost",
            "dev-1localhost",
            "dev-1.localhost:",
            "dev-1.localhost:0",
            "dev-1.localhost:+80",
            "dev-1.localhost:080",
            "dev-1.localhost:65536",
            "dev-1.localhost:80:80",
            "dev-1.localhost:80a",
            "user@dev-1.localhost",
            "user:pw@dev-1.localhost",
            "[::1]",
            "[::1]:4000",
            "dev-1.[::1]",
            "dev-1.localhost/evil",
            "dev-1.localhost\\evil",
            " dev-1.localhost",
            "dev-1.localhost ",
            "dev-1 .localhost",
            "dev-1.localhost\t",
            "dev-\u{661}.localhost",
            "dev-1.locälhost",
            "xn--dev-1-.localhost",
            "dev-1.xn--localhost",
            "ｄev-1.localhost",
        ] {
            assert!(parse(host).is_err(), "{host:?} must be refused");
        }
        assert!(parse(&format!("dev-1.{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn domains_are_normalized_and_checked() {
        assert_eq!(normalize_domain("IDE.Example.COM").unwrap(), "ide.example.com");
        assert_eq!(normalize_domain("xn--bcher-kva.example").unwrap(), "xn--bcher-kva.example");
        for bad in ["", ".", "localhost.", ".localhost", "a..b", "-a.com", "a-.com", "a_b.com", "bücher.de", "a.com:80"]
        {
            assert!(normalize_domain(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn every_vmid_round_trips(vmid in 1u32.., port in proptest::option::of(1u16..)) {
            let host = hosted_host(Vmid(vmid), "localhost");
            prop_assert_eq!(parse(&host).unwrap(), Vmid(vmid));
            let with_port = match port {
                Some(p) => format!("{host}:{p}"),
                None => host.clone(),
            };
            prop_assert_eq!(parse(&with_port).unwrap(), Vmid(vmid));
            prop_assert_eq!(parse(&with_port.to_ascii_uppercase()).unwrap(), Vmid(vmid));
        }

        /// Whatever is accepted is the canonical spelling of its vmid (up to case and port).
        #[test]
        fn only_canonical_spellings_are_accepted(
            host in "(dev|DEV|de|dev-dev)-[+0-9-]{0,12}[.](localhost|LocalHost|localhost[.]|local|x[.]localhost)(:[+0-9]{0,6})?"
        ) {
            if let Ok(vmid) = parse(&host) {
                let name = host.split(':').next().unwrap().to_ascii_lowercase();
                prop_assert_eq!(name, hosted_host(vmid, "localhost"));
            }
        }

        #[test]
        fn arbitrary_text_never_panics(host in ".{0,300}") {
            let _ = parse(&host);
        }
    }
}
