//! Which agent route a relayed API path reaches. The tail of `/api/servers/<id>/…` is split into
//! segments, each decoded once and checked, matched against the table of agent routes its family
//! may reach, and the agent URL is built from those segments by the URL builder (which encodes
//! them again), never by pasting the user's text into a path. Anything that cannot be mapped
//! this way is refused before a byte goes to the agent.

use percent_encoding::percent_decode_str;

/// The relayed families and the agent routes under each (`*` is one name the caller picks: an
/// upload id, a mod, a runtime id or version). Everything else on the agent (`/config`,
/// `/status`, power, metrics, the console) is reached only by the API's own code.
const ROUTES: &[(&str, &[&str])] = &[
    ("files", &["", "list", "read", "write", "mkdir", "rename", "uploads", "uploads/*"]),
    ("mods", &["", "*", "*/enable", "*/disable"]),
    ("runtimes", &["", "install", "*/rollback", "*/*", "*/*/verify"]),
];

/// Why a relayed path was refused. Messages never repeat the user's bytes (they end up in logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("bad path: {0}")]
    BadSegment(&'static str),
    #[error("no such route")]
    Unknown,
    #[error("the agent's address cannot take a relayed path")]
    BadBase,
}

/// One relayed agent route: its family and decoded segments (the family first), and the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRoute {
    segments: Vec<String>,
    query: Option<String>,
}

impl AgentRoute {
    /// Parses `tail` (`files/uploads/abc`, as it came on the wire, still percent-encoded). The
    /// query goes to the agent as it is: it can only ever be the query.
    pub fn parse(tail: &str, query: Option<&str>) -> Result<Self, RouteError> {
        let segments = tail.split('/').map(segment).collect::<Result<Vec<_>, _>>()?;
        let (family, rest) = segments.split_first().ok_or(RouteError::Unknown)?;
        let (_, patterns) = ROUTES.iter().find(|(f, _)| f == family).ok_or(RouteError::Unknown)?;
        if !patterns.iter().any(|p| matches(p, rest)) {
            return Err(RouteError::Unknown);
        }
        Ok(Self { segments, query: query.map(str::to_owned) })
    }

    /// `files/uploads/<id>`: one resumable upload.
    pub fn is_upload(&self) -> bool {
        matches!(self.segments.as_slice(), [f, u, _] if f == "files" && u == "uploads")
    }

    /// This route under the agent's `base`: the segments appended by the URL builder, then
    /// checked to be where they were meant to go.
    pub fn url(&self, base: &url::Url) -> Result<url::Url, RouteError> {
        let mut url = base.clone();
        url.path_segments_mut().map_err(|()| RouteError::BadBase)?.pop_if_empty().extend(&self.segments);
        url.set_query(self.query.as_deref());
        url.set_fragment(None);
        let prefix = format!("{}/{}", base.path().trim_end_matches('/'), self.segments[0]);
        let under = url.path().strip_prefix(&prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        let depth = url.path_segments().map_or(0, |s| s.count());
        let base_depth = base.path_segments().map_or(0, |s| s.filter(|s| !s.is_empty()).count());
        if !under || depth != base_depth + self.segments.len() || url.origin() != base.origin() {
            return Err(RouteError::BadBase);
        }
        Ok(url)
    }
}

/// Whether `rest` fits `pattern` (`""` is the family itself).
fn matches(pattern: &str, rest: &[String]) -> bool {
    let parts: Vec<&str> = if pattern.is_empty() { Vec::new() } else { pattern.split('/').collect() };
    parts.len() == rest.len() && parts.iter().zip(rest).all(|(p, s)| *p == "*" || p == s)
}

/// One raw segment decoded once, or why it cannot be a name.
fn segment(raw: &str) -> Result<String, RouteError> {
    use RouteError::BadSegment;
    if raw.is_empty() {
        return Err(BadSegment("empty path segments are not allowed"));
    }
    if !well_encoded(raw) {
        return Err(BadSegment("malformed percent-encoding"));
    }
    // Invalid UTF-8 covers overlong spellings of `.` and `/` (`%c0%ae`, `%c0%af`).
    let decoded =
        percent_decode_str(raw).decode_utf8().map_err(|_| BadSegment("path segments must be UTF-8"))?.into_owned();
    if decoded.chars().any(|c| c == '/' || c == '\\') {
        return Err(BadSegment("path separators inside a segment are not allowed"));
    }
    if decoded.chars().any(char::is_control) {
        return Err(BadSegment("control characters are not allowed"));
    }
    if decoded == "." || decoded == ".." {
        return Err(BadSegment("dot segments are not allowed"));
    }
    // Still encoded after one decoding (`%252e`): something downstream might decode it again.
    if decoded.contains('%') && !well_encoded_free(&decoded) {
        return Err(BadSegment("double percent-encoding is not allowed"));
    }
    Ok(decoded)
}

/// Every `%` starts a `%XX` escape.
fn well_encoded(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter()
        .enumerate()
        .filter(|(_, c)| **c == b'%')
        .all(|(i, _)| b.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)))
}

/// No `%XX` escape left in an already decoded segment (a lone `%`, as in `100%.txt`, is fine).
fn well_encoded_free(s: &str) -> bool {
    let b = s.as_bytes();
    !b.iter()
        .enumerate()
        .any(|(i, c)| *c == b'%' && b.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> url::Url {
        "http://10.0.0.5:18888/agents/5000/".parse().unwrap()
    }

    fn built(tail: &str, query: Option<&str>) -> Result<String, RouteError> {
        Ok(AgentRoute::parse(tail, query)?.url(&base())?.to_string())
    }

    #[test]
    fn legit_routes_keep_their_names() {
        let cases = [
            ("files", "/agents/5000/files"),
            ("files/list", "/agents/5000/files/list"),
            ("files/uploads/0123abcd", "/agents/5000/files/uploads/0123abcd"),
            ("mods/a..b.jar", "/agents/5000/mods/a..b.jar"),
            ("mods/my%20mod.jar/enable", "/agents/5000/mods/my%20mod.jar/enable"),
            ("mods/%C3%BCber%E2%9C%93", "/agents/5000/mods/%C3%BCber%E2%9C%93"),
            ("mods/100%25.jar", "/agents/5000/mods/100%25.jar"),
            ("runtimes/node/22.1.0/verify", "/agents/5000/runtimes/node/22.1.0/verify"),
        ];
        for (tail, path) in cases {
            assert_eq!(built(tail, None), Ok(format!("http://10.0.0.5:18888{path}")), "{tail}");
        }
    }

    #[test]
    fn a_query_or_fragment_inside_a_segment_stays_in_the_segment() {
        assert_eq!(built("mods/a%3Fb%23c", None).unwrap(), "http://10.0.0.5:18888/agents/5000/mods/a%3Fb%23c");
        assert_eq!(AgentRoute::parse("files/list%3Fpath=x", None), Err(RouteError::Unknown));
        let url = built("files/list", Some("path=a%2F..%2Fb&x=1")).unwrap();
        assert_eq!(url, "http://10.0.0.5:18888/agents/5000/files/list?path=a%2F..%2Fb&x=1");
    }

    #[test]
    fn escapes_are_refused_in_every_spelling() {
        for tail in [
            "files/..",
            "files/.",
            "files/..\\config",
            "files/%2e%2e",
            "files/%2E.",
            "files/.%2e",
            "files/%2e",
            "mods/%2e%2e%2fconfig",
            "mods/a%2fb",
            "mods/a%2Fb",
            "mods/a%5cb",
            "mods/a%5Cb",
            "mods/%c0%ae%c0%ae",
            "mods/%e0%80%ae",
            "mods/%252e%252e",
            "mods/%25%32%65",
            "mods/a%00b",
            "mods/a%0ab",
            "mods/a%7fb",
            "mods/%zz",
            "mods/a%2",
            "files//list",
            "files/",
            "mods/x/",
        ] {
            assert!(
                matches!(AgentRoute::parse(tail, None), Err(RouteError::BadSegment(_))),
                "{tail}: {:?}",
                AgentRoute::parse(tail, None)
            );
        }
    }

    #[test]
    fn uploads_are_known() {
        assert!(AgentRoute::parse("files/uploads/abc", None).unwrap().is_upload());
        assert!(!AgentRoute::parse("files/uploads", None).unwrap().is_upload());
        assert!(!AgentRoute::parse("mods/uploads/enable", None).unwrap().is_upload());
    }

    #[test]
    fn only_the_table_is_reachable() {
        for tail in ["config", "status", "files/config", "files/uploads/a/b", "mods/a/start", "runtimes/x", "metrics"] {
            assert_eq!(AgentRoute::parse(tail, None), Err(RouteError::Unknown), "{tail}");
        }
    }

    #[test]
    fn the_url_stays_under_the_agent_base() {
        for base in ["http://10.0.0.5:18888/agents/5000", "http://10.0.0.5:18888/", "http://10.0.0.5:18888"] {
            let base: url::Url = base.parse().unwrap();
            let url = AgentRoute::parse("mods/x/enable", None).unwrap().url(&base).unwrap();
            assert!(url.path().starts_with(base.path().trim_end_matches('/')), "{url}");
            assert!(url.path().ends_with("/mods/x/enable"), "{url}");
        }
        let opaque: url::Url = "data:text/plain,hi".parse().unwrap();
        assert_eq!(AgentRoute::parse("mods", None).unwrap().url(&opaque), Err(RouteError::BadBase));
    }
}
