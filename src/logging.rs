//! Logging: journald when stderr is the journal (or when asked), otherwise text or JSON lines on stderr.
//!
//! The filter can be changed at run time (the admin server's `/proxy-log-level`), through [`LogHandle`].
//! Structured fields such as `vm` and `client_pid` become the journald fields `VM` and `CLIENT_PID`, so
//! `journalctl -u cc-proxy VM=myvm` works; levels become the journal priorities error 3, warn 4, info 6 and
//! debug/trace 7.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::cli::{LogFormat, LogLevel, LogTarget};

/// Where log lines end up, after auto-detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Stderr,
}

/// A handle to change the log filter while running.
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<std::sync::Mutex<String>>,
    /// Where log lines go.
    sink: Sink,
    /// stderr is the journal (so a line printed there is already in the journal).
    stderr_journal: bool,
}

impl LogHandle {
    /// Report an error that stops the daemon from starting, exactly once where the operator looks: on stderr
    /// as one `cc-proxy: ...` line, or as a journal entry at priority 3 when logs go to the journal (and on
    /// stderr as well only when stderr is not the journal too).
    pub fn startup_error(&self, error: &dyn std::fmt::Display) {
        if self.sink == Sink::Journald {
            tracing::error!("{error}");
            if self.stderr_journal {
                return;
            }
        }
        eprintln!("cc-proxy: {error}");
    }

    /// The filter in force, e.g. `info` or `warn,cc_proxy::vm=debug`.
    pub fn current(&self) -> String {
        self.current.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replace the filter; takes effect at once.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(with_dependency_caps(filter))
            .map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
        self.handle.reload(parsed).map_err(|e| e.to_string())?;
        if let Ok(mut cur) = self.current.lock() {
            *cur = filter.to_string();
        }
        Ok(())
    }
}

/// Libraries whose debug and trace output prints what clients sent and what they were answered (request
/// bodies, stream tokens, WebSocket frames), unescaped: they log at most at `info` unless the filter names them.
const DEPENDENCY_CAPS: &[&str] = &["jsonrpsee", "soketto", "h2", "hyper"];

/// `filter` with [`DEPENDENCY_CAPS`] added for every library it does not name itself.
fn with_dependency_caps(filter: &str) -> String {
    let mut out = filter.trim().to_string();
    for lib in DEPENDENCY_CAPS {
        if !out.contains(lib) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(lib);
            out.push_str("=info");
        }
    }
    out
}

/// True when stderr is connected to the journal: `JOURNAL_STREAM` holds stderr's `device:inode`.
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Journal priorities by level: error 3 (err), warn 4 (warning), info 6 (info), debug and trace 7 (debug).
/// (tracing-journald's own default puts info at 5, notice, and debug at 6, so `journalctl -p info` would
/// show the raw I/O dumps.)
fn journal_priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// Install the global subscriber. Returns the reload handle and the sink chosen.
pub fn init(level: LogLevel, format: LogFormat, target: LogTarget) -> (LogHandle, Sink) {
    let (filter, handle) = reload::Layer::new(EnvFilter::new(with_dependency_caps(level.as_str())));
    let stderr_journal = stderr_is_journal();
    let want_journald = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_journal,
    };
    let mut fallback_warning = None;
    let journald = if want_journald {
        match tracing_journald::layer() {
            Ok(layer) => Some(
                layer
                    .with_syslog_identifier("cc-proxy".into())
                    .with_field_prefix(None)
                    .with_priority_mappings(journal_priorities()),
            ),
            Err(e) => {
                fallback_warning = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let sink = if journald.is_some() {
        Sink::Journald
    } else {
        Sink::Stderr
    };
    let stderr_layer = if journald.is_none() {
        let base = tracing_subscriber::fmt::layer().with_target(false);
        Some(match format {
            // Text lines go through OneLine: whatever a field holds, an event is one line.
            LogFormat::Text => base
                .with_writer(|| OneLine(std::io::stderr()))
                .with_ansi(false)
                .boxed(),
            // JSON escapes control characters itself.
            LogFormat::Json => base
                .with_writer(std::io::stderr)
                .json()
                .flatten_event(true)
                .boxed(),
        })
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr_layer)
        .init();
    if let Some(err) = fallback_warning {
        tracing::warn!(error = %err, "journald is not reachable; logging to stderr instead");
    }
    (
        LogHandle {
            handle,
            current: Arc::new(std::sync::Mutex::new(level.as_str().to_string())),
            sink,
            stderr_journal,
        },
        sink,
    )
}

/// The text log's writer: the formatter writes each event as one buffer ending in a newline; any other line
/// break or control character inside it (from a field a client supplied and a call site did not escape) is
/// written escaped, so no field can start a forged line or move the terminal's cursor.
struct OneLine<W>(W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        if !body.iter().any(|b| needs_escape(*b)) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b if needs_escape(b) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// C0 controls but the tab, and DEL.
fn needs_escape(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Escape bytes for a debug dump line: printable ASCII as is, everything else as `\xNN`, capped at `max` bytes.
pub fn escape_bytes(data: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(data.len().min(max) + 16);
    for &b in data.iter().take(max) {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if data.len() > max {
        out.push_str(&format!("...(+{} bytes)", data.len() - max));
    }
    out
}

/// Default of `--max-client-log`: bytes of client-supplied text (a legacy log frame's `msg` and
/// `containerId`) written into one log line; the rest is cut. Legacy log payloads may be 1 MiB.
pub const DEFAULT_CLIENT_LOG_BYTES: usize = 4096;

/// Client-supplied `text` made safe for one log line: backslashes and control characters (newlines, ANSI
/// escapes) escaped as `\\`, `\n`, `\u{1b}`, along with the Unicode line separators and bidirectional
/// overrides that could make a line read as two or reorder it; printable text, non-ASCII included, kept. At
/// most `max` bytes of `text` are used (cut at a character boundary), followed by `...(+N bytes)`.
pub fn escape_client_text(text: &str, max: usize) -> String {
    let (kept, left_out) = cut_text(text, max);
    let mut out = String::with_capacity(kept.len() + 16);
    for c in kept.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                out.extend(c.escape_default())
            }
            c => out.push(c),
        }
    }
    if left_out > 0 {
        out.push_str(&cut_marker(left_out));
    }
    out
}

/// The longest start of `text` of at most `max` bytes that ends on a character boundary, and how many bytes
/// were left out: how client text is cut for a log line or an error answer.
pub fn cut_text(text: &str, max: usize) -> (&str, usize) {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], text.len() - end)
}

/// What follows text cut by [`cut_text`]: `...(+N bytes)`.
pub fn cut_marker(left_out: usize) -> String {
    format!("...(+{left_out} bytes)")
}

#[cfg(test)]
mod tests {
    use super::{escape_bytes, escape_client_text, OneLine};

    #[test]
    fn dependencies_are_capped_unless_named() {
        assert_eq!(
            super::with_dependency_caps("trace"),
            "trace,jsonrpsee=info,soketto=info,h2=info,hyper=info"
        );
        assert_eq!(
            super::with_dependency_caps("debug,jsonrpsee=trace"),
            "debug,jsonrpsee=trace,soketto=info,h2=info,hyper=info"
        );
    }

    #[test]
    fn a_text_event_is_one_line_whatever_its_fields_hold() {
        use std::io::Write;
        let mut w = OneLine(Vec::new());
        let _ =
            w.write(b"INFO legacy command failed error=unknown x\nERROR cc_proxy: forged\x1b[2J\n");
        assert_eq!(
            String::from_utf8_lossy(&w.0),
            "INFO legacy command failed error=unknown x\\nERROR cc_proxy: forged\\x1b[2J\n"
        );
        let mut plain = OneLine(Vec::new());
        let _ = plain.write(b"WARN\tall fine\n");
        assert_eq!(plain.0, b"WARN\tall fine\n");
    }

    #[test]
    fn client_text_stays_on_one_bounded_line() {
        assert_eq!(
            escape_client_text("x\nERROR cc_proxy: forged", 100),
            "x\\nERROR cc_proxy: forged"
        );
        assert_eq!(
            escape_client_text("a\r\t\u{1b}[31mred\\ é 日本\u{2028}\u{202e}", 100),
            "a\\r\\t\\u{1b}[31mred\\\\ é 日本\\u{2028}\\u{202e}"
        );
        assert_eq!(escape_client_text("abcdef", 3), "abc...(+3 bytes)");
        // Cut at a character boundary: "é" is two bytes.
        assert_eq!(escape_client_text("aé", 2), "a...(+2 bytes)");
        assert_eq!(escape_client_text("", 10), "");
        assert_eq!(escape_client_text("abc", 0), "...(+3 bytes)");
    }

    #[test]
    fn escapes_and_caps() {
        assert_eq!(escape_bytes(b"a\n\x00\xff", 100), "a\\n\\x00\\xff");
        assert_eq!(escape_bytes(b"abcdef", 3), "abc...(+3 bytes)");
    }
}
