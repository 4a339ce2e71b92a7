//! Log output of the daemons: human-readable text, or one JSON object per line for Loki with the
//! fields Loki queries by: `component` (the part of zlh that logged, from the module path) and
//! `vmid` (the container, once known). `ZLH_LOG` filters as `RUST_LOG` does (default `info`).

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The vmid stamped on every JSON line; 0 means not known yet.
static VMID: AtomicU32 = AtomicU32::new(0);

/// Sets the vmid that JSON lines carry from now on.
pub fn set_vmid(vmid: u32) {
    VMID.store(vmid, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber on stderr. `default_filter` applies when `ZLH_LOG` is unset
/// (`off` for none). Text is coloured only when stderr is a terminal: escape codes in a pipe or a
/// log file are noise.
pub fn init(format: LogFormat, daemon: &'static str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZLH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(JsonLines { daemon }).try_init(),
    };
}

/// `zlh_core::supervisor::process` → `supervisor`; `zlh_agentd::http::files` → `http`.
pub fn component(target: &str) -> &str {
    let mut parts = target.split("::");
    let krate = parts.next().unwrap_or(target);
    parts.next().unwrap_or(krate)
}

/// One JSON object per event: time, level, daemon, component, vmid, target, message, fields.
pub struct JsonLines {
    daemon: &'static str,
}

impl JsonLines {
    pub fn line(&self, event: &Event<'_>, now: chrono::DateTime<chrono::Utc>) -> Map<String, Value> {
        let meta = event.metadata();
        let mut obj = Map::new();
        obj.insert("time".into(), now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true).into());
        obj.insert("level".into(), meta.level().as_str().to_ascii_lowercase().into());
        obj.insert("daemon".into(), self.daemon.into());
        obj.insert("component".into(), component(meta.target()).into());
        let vmid = VMID.load(Ordering::Relaxed);
        if vmid != 0 {
            obj.insert("vmid".into(), vmid.into());
        }
        obj.insert("target".into(), meta.target().into());
        event.record(&mut FieldVisitor(&mut obj));
        obj
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let obj = self.line(event, chrono::Utc::now());
        writeln!(writer, "{}", Value::Object(obj))
    }
}

struct FieldVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_come_from_module_paths() {
        assert_eq!(component("zlh_core::supervisor::process"), "supervisor");
        assert_eq!(component("zlh_agentd::http"), "http");
        assert_eq!(component("hyper"), "hyper");
    }

    #[test]
    fn json_lines_carry_vmid_component_and_fields() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::fmt::MakeWriter;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl<'a> MakeWriter<'a> for Buf {
            type Writer = Buf;
            fn make_writer(&'a self) -> Buf {
                self.clone()
            }
        }
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .event_format(JsonLines { daemon: "zlh-agentd" })
            .finish();
        set_vmid(6001);
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "zlh_agentd::agent::provision", step = "runtime", bytes = 5u64, "installing \"x\"");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["vmid"], 6001);
        assert_eq!(v["component"], "agent");
        assert_eq!(v["daemon"], "zlh-agentd");
        assert_eq!(v["level"], "info");
        assert_eq!(v["message"], "installing \"x\"");
        assert_eq!(v["step"], "runtime");
        assert_eq!(v["bytes"], 5);
    }
}
