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
        tracing::info!(
            channel = meta.channel,
            rule = meta.rule,
            sid = meta.sid,
            "notification: {}",
            text.lines().next().unwrap_or("")
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
