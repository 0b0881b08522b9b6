//! The log channel: the rendered text as a log line, and optionally as one JSON line in a file,
//! so the shipped default config does something visible with no Slack or SMTP at all.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Meta, Outcome};
use crate::store::file_id;

/// An open append handle and the file it was opened on (see [`file_id`]).
type Opened = (File, (u64, u64));

/// Open append handles, one per file.
#[derive(Default)]
pub struct Files(Arc<Mutex<HashMap<PathBuf, Opened>>>);

impl Files {
    pub async fn write(&self, file: Option<&Path>, text: &str, meta: &Meta<'_>) -> Outcome {
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
        let (files, target) = (self.0.clone(), path.to_path_buf());
        // Opening, writing and syncing block: not on the runtime's threads.
        let result = tokio::task::spawn_blocking(move || append(&files, &target, &line))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match result {
            Ok(()) => Outcome::Delivered { detail: None },
            Err(e) => Outcome::Retry {
                after: None,
                error: format!("cannot write {}: {e}", path.display()),
            },
        }
    }
}

/// Appends `line` to the file `path` names now and syncs it, so a line reported delivered is on
/// disk like the store's record of it. A handle whose file was rotated (renamed) or deleted
/// since it was opened is replaced by one on the file the path names now; writing on through
/// the old one would report delivered what lands in a file nobody reads.
fn append(files: &Mutex<HashMap<PathBuf, Opened>>, path: &Path, line: &str) -> std::io::Result<()> {
    let mut files = match files.lock() {
        Ok(f) => f,
        Err(poisoned) => poisoned.into_inner(),
    };
    if files
        .get(path)
        .is_some_and(|(_, id)| file_id(path).ok() != Some(*id))
    {
        files.remove(path);
    }
    let result = (|| {
        if !files.contains_key(path) {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            files.insert(path.to_path_buf(), (f, file_id(path)?));
        }
        let (f, _) = files
            .get_mut(path)
            .ok_or_else(|| std::io::Error::other("file handle missing"))?;
        f.write_all(line.as_bytes())?;
        f.sync_data()
    })();
    if result.is_err() {
        files.remove(path);
    }
    result
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            // tracing caches per call site, for the whole process, whether any subscriber wants
            // it. Another test thread reaching the same log call with none, as this subscriber
            // is set up, can leave it cached as "never": then nothing is written. Once that
            // thread is done, asking every call site again mends it.
            for _ in 0..50 {
                tracing::callsite::rebuild_interest_cache();
                rt.block_on(Files::default().write(None, text, &meta));
                if !out.0.lock().unwrap().is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        let logged = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert!(
            logged.contains(r#"Call with O'Brien "Eve" \o/\r\n2026-01-01T00:00:00Z  INFO forged: all is well\n\u{1b}[2Jlast words"#),
            "{logged}"
        );
    }

    #[tokio::test]
    async fn a_rotated_or_deleted_file_gets_the_next_line_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notifications.jsonl");
        let rotated = dir.path().join("notifications.jsonl.1");
        let files = Files::default();
        let meta = |sid| Meta {
            channel: "audit",
            rule: "r",
            sid,
            event: "POST_CALL_DATA",
            delivery_id: 1,
        };
        let sids = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["sid"].to_string())
                .collect()
        };
        for sid in ["CA1", "CA2"] {
            let out = files.write(Some(&path), "text", &meta(sid)).await;
            assert!(matches!(out, Outcome::Delivered { .. }), "{out:?}");
        }
        // logrotate's default: rename, and the writer is expected to start a new file.
        std::fs::rename(&path, &rotated).unwrap();
        files.write(Some(&path), "text", &meta("CA3")).await;
        assert_eq!(sids(&rotated), [r#""CA1""#, r#""CA2""#]);
        assert_eq!(sids(&path), [r#""CA3""#]);
        // Deleted: the next line starts the file again instead of vanishing with the old one.
        std::fs::remove_file(&path).unwrap();
        files.write(Some(&path), "text", &meta("CA4")).await;
        assert_eq!(sids(&path), [r#""CA4""#]);
    }
}
