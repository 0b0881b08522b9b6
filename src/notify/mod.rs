//! Channels: send one rendered message and classify what the destination answered.
//!
//! [`slack`] POSTs JSON to an incoming webhook, [`email`] speaks SMTP through lettre, [`log`]
//! writes a JSON line. Each turns the destination's answer into an [`Outcome`] with one small pure
//! function, so the worker decides retry / give up without knowing the protocol.

pub mod email;
pub mod log;
pub mod slack;

use std::collections::HashMap;
use std::time::Duration;

use crate::config::{ChannelKind, Config};
use crate::render::Message;

/// What a destination made of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Accepted; `detail` is what the destination said, if anything useful.
    Delivered { detail: Option<String> },
    /// Worth trying again, no sooner than `after` when the destination said so.
    Retry {
        after: Option<Duration>,
        error: String,
    },
    /// Retrying will not help: the delivery goes to `dead` with this reason.
    Permanent { error: String },
}

/// Who a message is about, for the log channel and email headers.
#[derive(Debug, Clone)]
pub struct Meta<'a> {
    pub channel: &'a str,
    pub rule: &'a str,
    pub sid: &'a str,
    pub event: &'a str,
    pub delivery_id: i64,
}

/// Makes ring the process's TLS crypto provider, shared by Slack (reqwest) and SMTP (lettre).
/// Must run before any `reqwest::Client` is built; running it again is a no-op.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The clients for every configured channel, built once per config load.
pub struct Senders {
    http: reqwest::Client,
    /// `delivery.request_timeout`, the HTTP client's: named in the error of a send it ended.
    request_timeout: Duration,
    smtp: HashMap<String, email::Transport>,
    logs: log::Files,
}

impl Senders {
    pub fn new(config: &Config) -> Result<Senders, String> {
        install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(config.delivery.request_timeout)
            .connect_timeout(config.delivery.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("callnotify/", env!("CARGO_PKG_VERSION")))
            // A webhook URL answers, it does not redirect (see `slack::redirected`).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let mut smtp = HashMap::new();
        for (name, ch) in &config.channels {
            if let ChannelKind::Email { smtp: s, .. } = &ch.kind {
                smtp.insert(
                    name.clone(),
                    email::transport(s).map_err(|e| format!("channels.{name}.smtp: {e}"))?,
                );
            }
        }
        Ok(Senders {
            http,
            request_timeout: config.delivery.request_timeout,
            smtp,
            logs: log::Files::default(),
        })
    }

    /// Sends one message to one channel.
    pub async fn send(&self, kind: &ChannelKind, message: &Message, meta: &Meta<'_>) -> Outcome {
        match (kind, message) {
            (ChannelKind::Slack { webhook_url }, Message::Slack { body }) => {
                slack::send(&self.http, webhook_url, body, self.request_timeout).await
            }
            (ChannelKind::Email { from, .. }, Message::Email(parts)) => {
                let Some(transport) = self.smtp.get(meta.channel) else {
                    return Outcome::Retry {
                        after: None,
                        error: format!("no SMTP transport for channel {}", meta.channel),
                    };
                };
                email::send(transport, from, parts, meta).await
            }
            (ChannelKind::Log { file }, Message::Log { text }) => {
                self.logs.write(file.as_deref(), text, meta).await
            }
            _ => Outcome::Permanent {
                error: "message does not fit the channel type".into(),
            },
        }
    }
}

/// An error and its causes, `outer: inner: innermost`, as the last error of a delivery.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some errors already print their source; say each part once.
        let part = s.to_string();
        if !out.contains(&part) {
            out.push_str(": ");
            out.push_str(&part);
        }
        source = s.source();
    }
    out
}

/// A destination's answer as one line: control characters (the line breaks of an HTML error
/// page, a terminal escape) become spaces, and runs of white space one. Kept as it came, it made
/// a row of `deliveries list` several and could write lines of its own into a text log.
pub fn as_one_line(s: &str) -> String {
    s.split(|c: char| c.is_control() || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shortens a destination's answer for storage and logs.
pub fn excerpt(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}
