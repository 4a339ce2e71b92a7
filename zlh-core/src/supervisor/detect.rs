//! Finding a service that is already running (a code-server started before the agent, or by hand)
//! so the agent adopts its address instead of starting a second copy on the same port. Linux only:
//! scans `/proc/<pid>/cmdline`, whose arguments are NUL-separated.

use std::fs;
use std::path::Path;

/// Every process whose arguments satisfy `matcher`, as `(pid, args)`. Processes that vanish or
/// cannot be read during the scan (kernel threads have an empty cmdline) are skipped.
pub fn find_processes(matcher: impl Fn(&[String]) -> bool) -> Vec<(u32, Vec<String>)> {
    find_processes_in(Path::new("/proc"), matcher)
}

fn find_processes_in(proc_root: &Path, matcher: impl Fn(&[String]) -> bool) -> Vec<(u32, Vec<String>)> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args = split_cmdline(&raw);
        if !args.is_empty() && matcher(&args) {
            found.push((pid, args));
        }
    }
    found.sort_by_key(|(pid, _)| *pid);
    found
}

/// NUL-separated arguments; the trailing NUL does not make an empty last argument.
fn split_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// A code-server serving HTTP: one argument is the `code-server` program (or its entry script)
/// and the process was given `--bind-addr`.
pub fn is_code_server(args: &[String]) -> bool {
    let program = args.iter().any(|a| a.ends_with("code-server") || a.ends_with("code-server/out/node/entry"));
    let bound = args.iter().any(|a| a == "--bind-addr" || a.starts_with("--bind-addr="));
    program && bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_split() {
        assert_eq!(split_cmdline(b"a\0b c\0\0d\0"), vec!["a", "b c", "", "d"]);
        assert!(split_cmdline(b"").is_empty());
    }

    #[test]
    fn code_server_matcher() {
        let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert!(is_code_server(&args(&["/usr/bin/code-server", "--bind-addr", "0.0.0.0:6000"])));
        assert!(is_code_server(&args(&["node", "/usr/lib/code-server", "--bind-addr=127.0.0.1:6000"])));
        assert!(!is_code_server(&args(&["/usr/bin/code-server", "--help"])));
        assert!(!is_code_server(&args(&["vim", "--bind-addr"])));
    }
}
