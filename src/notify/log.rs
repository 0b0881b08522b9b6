//! The log channel: the rendered text as a log line, and optionally as one JSON line in a file,
//! so the shipped default config does something visible with no Slack or SMTP at all.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Meta, Outcome};

/// Open append handles, one per file.
#[derive(Default)]
pub struct Files(Mutex<HashMap<PathBuf, File>>);

impl Files {
    pub fn write(&self, file: Option<&Path>, text: &str, meta: &Meta<'_>) -> Outcome {
        // All of the text on one line: line breaks and other control characters escaped, so a
        // value cannot forge a log line or rewrite the terminal.
        tracing::info!(
            channel = meta.channel,
            rule = meta.rule,
            sid = meta.sid,
            "notification: {}",
            one_line(text)
        );
        let Some(path) = file else {
            return Outcome::Delivered { detail: None };
        };
        let line = serde_json::json!({
            "at": chrono::Utc::now().to_rfc3339(),
            "channel": meta.channel,
            "rule": meta.rule,
            "sid": meta.sid,
            "event": meta.event,
            "delivery": meta.delivery_id,
            "text": text,
        });
        let mut line = line.to_string();
        line.push('\n');
        let mut files = match self.0.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        let result = (|| {
            if !files.contains_key(path) {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let f = OpenOptions::new().create(true).append(true).open(path)?;
                files.insert(path.to_path_buf(), f);
            }
            let f = files
                .get_mut(path)
                .ok_or_else(|| std::io::Error::other("file handle missing"))?;
            f.write_all(line.as_bytes())
        })();
        match result {
            Ok(()) => Outcome::Delivered { detail: None },
            Err(e) => {
                files.remove(path);
                Outcome::Retry {
                    after: None,
                    error: format!("cannot write {}: {e}", path.display()),
                }
            }
        }
    }
}

/// `text` with its control characters (line breaks, escape sequences) written as escapes and
/// everything else as it is, quotes and backslashes included.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a text-format subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_whole_text_is_one_log_line_and_cannot_forge_another() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let meta = Meta {
            channel: "console",
            rule: "r",
            sid: "CA1",
            event: "POST_CALL_DATA",
            delivery_id: 1,
        };
        let text = "Call with O'Brien \"Eve\" \\o/\r\n2026-01-01T00:00:00Z  INFO forged: all is well\n\u{1b}[2Jlast words";
        tracing::subscriber::with_default(subscriber, || {
            Files::default().write(None, text, &meta);
        });
        let logged = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert!(
            logged.contains(r#"Call with O'Brien "Eve" \o/\r\n2026-01-01T00:00:00Z  INFO forged: all is well\n\u{1b}[2Jlast words"#),
            "{logged}"
        );
    }
}
