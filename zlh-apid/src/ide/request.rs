//! What the IDE's checks read of a request, whichever server parsed it: hyper's request (its `Parts`)
//! or the lean path's head ([`zlh_core::ide::h1::Head`]). One set of checks serves both.

use axum::http::header::HeaderName;
use zlh_core::ide::h1::Head;
use zlh_core::ide::proxy;

pub trait Seen {
    fn method(&self) -> &str;
    fn path(&self) -> &str;
    fn query(&self) -> Option<&str>;
    /// Every value of header `name` (lowercase), as text; `None` for one that is not tab and
    /// visible ASCII (as `HeaderValue::to_str` says).
    fn header_strs<'s>(&'s self, name: &'static str) -> impl Iterator<Item = Option<&'s str>> + 's;
    /// Asks for a WebSocket.
    fn is_websocket_upgrade(&self) -> bool;
}

impl Seen for http::request::Parts {
    fn method(&self) -> &str {
        self.method.as_str()
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    fn header_strs<'s>(&'s self, name: &'static str) -> impl Iterator<Item = Option<&'s str>> + 's {
        self.headers.get_all(HeaderName::from_static(name)).iter().map(|v| v.to_str().ok())
    }

    fn is_websocket_upgrade(&self) -> bool {
        proxy::is_websocket_upgrade(&self.method, &self.headers)
    }
}

impl Seen for Head<'_> {
    fn method(&self) -> &str {
        self.method
    }

    fn path(&self) -> &str {
        Head::path(self)
    }

    fn query(&self) -> Option<&str> {
        Head::query(self)
    }

    fn header_strs<'s>(&'s self, name: &'static str) -> impl Iterator<Item = Option<&'s str>> + 's {
        // `HeaderValue::to_str`'s rule: tab and visible ASCII only.
        self.values(name).map(|v| {
            v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)).then(|| std::str::from_utf8(v).ok()).flatten()
        })
    }

    /// The lean path hands upgrades to the full server: never one here.
    fn is_websocket_upgrade(&self) -> bool {
        false
    }
}
