//! Slack incoming webhooks: POST the JSON body, classify the answer.

use std::time::Duration;

use reqwest::header::{LOCATION, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{as_one_line, error_chain, excerpt, Outcome};

/// Wait used for a 429 that names no `Retry-After`.
pub const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(30);
/// The longest `Retry-After` taken at its word (Slack asks for seconds); a larger one, up to
/// `u64::MAX`, would otherwise overflow the pause's deadline.
pub const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(3600);

/// POSTs `body` to the webhook; `timeout` is the client's request timeout, named in the error
/// when it ends the request.
pub async fn send(
    client: &reqwest::Client,
    url: &SecretString,
    body: &Value,
    timeout: Duration,
) -> Outcome {
    let response = client.post(url.expose_secret()).json(body).send().await;
    match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let header = |name| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if r.status().is_redirection() {
                return redirected(status, header(LOCATION).as_deref());
            }
            let retry_after = header(RETRY_AFTER);
            let text = head_of_body(r).await;
            classify(status, retry_after.as_deref(), &text)
        }
        // The error's URL is the secret webhook address: never let it into a message.
        Err(e) => classify_error(&e.without_url(), timeout),
    }
}

/// Most of an answer's body that is read: Slack's answers are a word (`ok`,
/// `channel_not_found`), and only an excerpt is kept. Read whole, a peer that sends a body
/// without end filled memory at the link's speed until `request_timeout`.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// The start of the answer's body, at most [`MAX_ANSWER_BYTES`]; what arrived before an error
/// or the timeout when the rest does not come (the status decides the outcome).
async fn head_of_body(mut r: reqwest::Response) -> String {
    let mut head = Vec::new();
    while head.len() < MAX_ANSWER_BYTES {
        match r.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ANSWER_BYTES - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A redirect: permanent, named by the host it pointed to. The client does not follow
/// redirects (see `Senders::new`): a 301, 302 or 303 would turn the POST into a GET whose `200`
/// counted as delivered with nothing posted, and a followed redirect sends the webhook URL
/// along as the `Referer`. Only the host is said: the rest of the target can hold the
/// webhook's secret path (an `http://` URL redirected to its `https://` twin).
pub fn redirected(status: u16, location: Option<&str>) -> Outcome {
    let host = location
        .and_then(|l| reqwest::Url::parse(l).ok())
        .and_then(|u| u.host_str().map(|h| format!(" to {h}")))
        .unwrap_or_default();
    Outcome::Permanent {
        error: format!(
            "HTTP {status}: a redirect{host}, not followed; check the channel's webhook_url"
        ),
    }
}

/// Slack's answer -> what to do: 2xx done, unless its body is `{"ok": false, ...}`; 429 retry
/// after `Retry-After`; 5xx, 408, 421 and 425 retry, no sooner than a `Retry-After` they carry;
/// any other 4xx (`invalid_payload`, `channel_not_found`, `channel_is_archived`, ...) permanent.
///
/// 408 (Request Timeout), 421 (Misdirected Request: the connection reached a server that does
/// not serve this host, a CDN or proxy's routing) and 425 (Too Early: TLS early data refused)
/// say nothing about the message; HTTP has the client send it again (RFC 9110 15.5.9, 15.5.20;
/// RFC 8470 5.2). A proxy in maintenance answers 503 with the time to come back in `Retry-After`
/// (RFC 9110 10.2.3).
pub fn classify(status: u16, retry_after: Option<&str>, body: &str) -> Outcome {
    let body = as_one_line(body);
    let said = if body.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {}", excerpt(&body, 300))
    };
    // How long the destination asked to be left alone (`Retry-After`), at most an hour.
    let asked_to_wait = || {
        retry_after
            .and_then(rate_limit_wait)
            .map(|wait| wait.min(MAX_RATE_LIMIT_WAIT))
    };
    match status {
        200..=299 => match refusal(&body) {
            None => Outcome::Delivered { detail: Some(said) },
            // Slack's Web API and workflow triggers answer a refusal with 200 and
            // `{"ok": false, "error": "..."}`: nothing was posted.
            Some(error) => match error.as_str() {
                "ratelimited" | "rate_limited" => Outcome::Retry {
                    after: Some(asked_to_wait().unwrap_or(DEFAULT_RATE_LIMIT_WAIT)),
                    error: said,
                },
                "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout" => {
                    Outcome::Retry {
                        after: None,
                        error: said,
                    }
                }
                _ => Outcome::Permanent {
                    error: format!("{said} (a refusal, though with a 2xx status)"),
                },
            },
        },
        429 => Outcome::Retry {
            after: Some(asked_to_wait().unwrap_or(DEFAULT_RATE_LIMIT_WAIT)),
            error: said,
        },
        408 | 421 | 425 | 500..=599 => Outcome::Retry {
            after: asked_to_wait(),
            error: said,
        },
        _ => Outcome::Permanent { error: said },
    }
}

/// The `error` of a JSON answer that says `"ok": false` (`"unknown"` when it names none); None
/// for any other answer (`ok`, an empty body, a page).
///
/// Read as far as it goes rather than as a whole document: the body is cut at
/// [`MAX_ANSWER_BYTES`], and a refusal with a long `response_metadata` (one message per
/// invalid block), or with anything after its closing brace, failed to parse whole and counted
/// as delivered. The `ok` and `error` that come before the cut (Slack writes `ok` first) say
/// what the answer is.
fn refusal(body: &str) -> Option<String> {
    let mut said = Said::default();
    let _ = serde::de::DeserializeSeed::deserialize(
        &mut said,
        &mut serde_json::Deserializer::from_str(body),
    );
    (said.ok == Some(false)).then(|| said.error.unwrap_or_else(|| "unknown".into()))
}

/// The top-level `ok` and `error` of a JSON object, noted as they are read, so that what came
/// before an error (the end of a cut body) is kept.
#[derive(Default)]
struct Said {
    ok: Option<bool>,
    error: Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Said {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Said {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "ok" => self.ok = map.next_value::<Value>()?.as_bool(),
                "error" => self.error = map.next_value::<Value>()?.as_str().map(str::to_string),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A `Retry-After` value as a wait: seconds (what Slack sends), or an HTTP date (RFC 9110
/// 10.2.3, what a proxy in between may send), a date already past being no wait. None when it
/// is neither.
fn rate_limit_wait(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// A request that got no answer. Only a connection that was never made says the message was
/// not posted: once the request may have reached Slack (no answer within `timeout`, or the
/// connection lost while waiting), Slack may have posted it, and the error says the retry may
/// show it twice (incoming webhooks have no idempotency key).
fn classify_error(e: &reqwest::Error, timeout: Duration) -> Outcome {
    const TWICE: &str = "Slack may have posted it, so the retry may show it twice";
    let chain = || excerpt(&as_one_line(&error_chain(e)), 300);
    let error = if e.is_connect() {
        format!("connection failed: {}", chain())
    } else if e.is_timeout() {
        format!(
            "no answer within {}; {TWICE}",
            humantime::format_duration(timeout)
        )
    } else if e.is_builder() {
        return Outcome::Permanent {
            error: format!("cannot build the request: {e}"),
        };
    } else {
        format!("request failed: {}; {TWICE}", chain())
    };
    Outcome::Retry { after: None, error }
}

/// Slack's limits, and ours for the top-level text (Slack truncates at 40,000 characters).
pub const MAX_SECTION_CHARS: usize = 3000;
pub const MAX_FIELD_CHARS: usize = 2000;
pub const MAX_HEADER_CHARS: usize = 150;
pub const MAX_BLOCKS: usize = 50;
pub const MAX_FIELDS: usize = 10;
pub const MAX_TEXT_CHARS: usize = 35_000;

/// Makes a body fit Slack's limits instead of being rejected: long sections are split at line
/// boundaries into several, headers and section fields are shortened (ending in "…"), a
/// section's fields past the 10th are left out with a "… N more fields not shown" line after
/// it, and what still does not fit is cut with a visible "… truncated, N more lines" marker.
/// Returns how many cuts were made.
pub fn fit(body: &mut Value) -> usize {
    fit_with(body, true)
}

/// [`fit`], except that sections keep all their fields: what `check` looks at, so that a
/// template that itself writes more than 10 fields in a section is still named there.
pub fn fit_keeping_fields(body: &mut Value) -> usize {
    fit_with(body, false)
}

fn fit_with(body: &mut Value, cap_fields: bool) -> usize {
    let mut cuts = 0;
    if let Some(Value::String(text)) = body.get_mut("text") {
        if let Some((kept, dropped)) = cut_lines(text, MAX_TEXT_CHARS) {
            *text = kept;
            cuts += usize::from(dropped > 0);
        }
    }
    let Some(Value::Array(blocks)) = body.get_mut("blocks") else {
        return cuts;
    };
    let mut out: Vec<Value> = Vec::with_capacity(blocks.len());
    for mut block in std::mem::take(blocks) {
        let kind = block
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "header" => {
                let plain = block.get("text").is_some_and(is_plain_text);
                if let Some(Value::String(t)) = block.pointer_mut("/text/text") {
                    if t.chars().count() > MAX_HEADER_CHARS {
                        *t = format!("{}…", prefix(t, MAX_HEADER_CHARS - 1, plain));
                        cuts += 1;
                    }
                }
                out.push(block);
            }
            "section" => {
                if let Some(Value::Array(fields)) = block.get_mut("fields") {
                    for f in fields {
                        let plain = is_plain_text(f);
                        if let Some(Value::String(t)) = f.get_mut("text") {
                            cuts += usize::from(shorten_field(t, MAX_FIELD_CHARS, plain));
                        }
                    }
                }
                // The long text is taken out of the block, so what is copied for each
                // continuation is only the text object's small keys (`type`, `verbatim`).
                let plain = block.get("text").is_some_and(is_plain_text);
                let text = match block.pointer_mut("/text/text") {
                    Some(Value::String(t)) if t.chars().count() > MAX_SECTION_CHARS => {
                        std::mem::take(t)
                    }
                    _ => {
                        out.push(block);
                        continue;
                    }
                };
                let mut chunks = split_lines(&text, MAX_SECTION_CHARS, plain).into_iter();
                // Only blank lines: the block (its fields, say) is kept without them.
                let first = chunks.next().unwrap_or_default();
                let text_object = block["text"].clone();
                block["text"]["text"] = Value::String(first);
                out.push(block);
                for chunk in chunks {
                    let mut b = serde_json::json!({"type": "section", "text": text_object.clone()});
                    b["text"]["text"] = Value::String(chunk);
                    out.push(b);
                }
            }
            _ => out.push(block),
        }
    }
    // Slack refuses a text object with nothing in it (invalid_blocks): a template field that
    // rendered empty, or the tail of a split. Such text goes, and a block left with nothing
    // to show goes with it, rather than the whole message being refused.
    let before = out.len();
    out.retain_mut(|b| {
        let Some(map) = b.as_object_mut() else {
            return true;
        };
        let blank = |v: &Value| v.as_str().is_some_and(|t| t.trim().is_empty());
        let mut emptied = false;
        if let Some(Value::Array(fields)) = map.get_mut("fields") {
            let n = fields.len();
            fields.retain(|f| !f.get("text").is_some_and(blank));
            if fields.is_empty() && n > 0 {
                map.remove("fields");
                emptied = true;
            }
        }
        if map
            .get("text")
            .and_then(|t| t.get("text"))
            .is_some_and(blank)
        {
            map.remove("text");
            emptied = true;
        }
        // A header needs its text; a section needs text or fields (an accessory alone is not
        // enough). Only what went blank here is dropped: a block the template wrote wrong
        // from the start stays, for `check` to name and Slack to refuse visibly.
        let has = |k: &str| map.contains_key(k);
        match map.get("type").and_then(Value::as_str) {
            Some("header") => has("text") || !emptied,
            Some("section") => has("text") || has("fields") || !emptied,
            _ => true,
        }
    });
    cuts += before - out.len();
    if cap_fields {
        out = drop_extra_fields(out, &mut cuts);
    }
    if out.len() > MAX_BLOCKS {
        let rest = out.split_off(MAX_BLOCKS - 1);
        let lines: usize = rest
            .iter()
            .map(|b| {
                b.pointer("/text/text")
                    .and_then(Value::as_str)
                    .map_or(1, |t| t.lines().count().max(1))
            })
            .sum();
        out.push(serde_json::json!({
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": format!("… truncated, {lines} more lines")}]
        }));
        cuts += 1;
    }
    *blocks = out;
    cuts
}

/// Keeps a section's first [`MAX_FIELDS`] fields (Slack refuses more with invalid_blocks) and
/// says how many were left out in a context block right after it, so the kept fields stay as
/// the template wrote them.
fn drop_extra_fields(blocks: Vec<Value>, cuts: &mut usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(blocks.len());
    for mut block in blocks {
        let section = block.get("type").and_then(Value::as_str) == Some("section");
        let dropped = match block.get_mut("fields") {
            Some(Value::Array(fields)) if section && fields.len() > MAX_FIELDS => {
                let n = fields.len() - MAX_FIELDS;
                fields.truncate(MAX_FIELDS);
                n
            }
            _ => 0,
        };
        out.push(block);
        if dropped > 0 {
            let what = if dropped == 1 { "field" } else { "fields" };
            out.push(serde_json::json!({
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": format!("… {dropped} more {what} not shown")}]
            }));
            *cuts += 1;
        }
    }
    out
}

/// Cuts a field's text longer than `max` characters to a prefix ending in "…", `max` in all.
/// Text that is only blank is left for the blank-text pass to remove. Returns whether it cut.
fn shorten_field(t: &mut String, max: usize, plain: bool) -> bool {
    if t.chars().count() <= max || t.trim().is_empty() {
        return false;
    }
    *t = format!("{}…", prefix(t, max - 1, plain));
    true
}

/// Whether a text object is `plain_text`, where Slack reads no markup: the renderer has given
/// back its `&`, `<` and `>`, so they are characters like any other there.
fn is_plain_text(object: &Value) -> bool {
    object.get("type").and_then(Value::as_str) == Some("plain_text")
}

/// The prefix a cut keeps: [`safe_prefix`] for mrkdwn; for `plain_text` only whole characters
/// ([`crate::render::char_prefix`]). Backing off from a `&` or a `<` there, as if it began an
/// entity or a link, dropped text that fits: a header cut inside `Maria <maria@x.example>`
/// ended at `Maria`, up to 148 characters short.
fn prefix(s: &str, max: usize, plain: bool) -> &str {
    if plain {
        crate::render::char_prefix(s, max)
    } else {
        safe_prefix(s, max)
    }
}

/// The longest prefix of at most `max` characters (Unicode scalar values, as Slack and its
/// SDK's validator count them) that does not end inside an `&...;` entity, inside a
/// `<url|label>` or `<@U1>` that closes further on, or inside what reads as one character (a
/// grapheme cluster: an emoji with a skin tone or joined by U+200D (👩‍👩‍👧), a flag, a letter
/// and its accent, a syllable and its vowel sign).
fn safe_prefix(s: &str, max: usize) -> &str {
    let end = s.char_indices().nth(max).map_or(s.len(), |(i, _)| i);
    let head = &s[..crate::render::grapheme_start(s, end)];
    let head = match head.rfind('&') {
        Some(amp) if !head[amp..].contains(';') && head.len() - amp < 6 => &head[..amp],
        _ => head,
    };
    match head.rfind('<') {
        Some(lt) if lt > 0 && !head[lt..].contains('>') && s[head.len()..].contains('>') => {
            &head[..lt]
        }
        _ => head,
    }
}

/// Splits text into chunks of at most `max` characters, at line boundaries where it can.
fn split_lines(text: &str, max: usize, plain: bool) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0;
    for line in text.split_inclusive('\n') {
        let mut line = line;
        // Counted once per line: recounting the rest after each hard split was quadratic.
        let mut n = line.chars().count();
        loop {
            if cur_len + n <= max {
                cur.push_str(line);
                cur_len += n;
                break;
            }
            if cur_len > 0 {
                let chunk = std::mem::take(&mut cur);
                if !chunk.trim().is_empty() {
                    chunks.push(chunk.trim_end_matches('\n').to_string());
                }
                cur_len = 0;
                continue;
            }
            // One line longer than a whole chunk: hard split.
            let head = prefix(line, max, plain);
            let head = if head.is_empty() {
                &line[..line.char_indices().nth(max).map_or(line.len(), |(i, _)| i)]
            } else {
                head
            };
            chunks.push(head.to_string());
            n -= head.chars().count();
            line = &line[head.len()..];
        }
    }
    if !cur.trim().is_empty() {
        chunks.push(cur.trim_end_matches('\n').to_string());
    }
    chunks
}

/// Cuts text to at most `max` characters at a line boundary, with a marker saying how many
/// lines were dropped. None when it already fits.
fn cut_lines(text: &str, max: usize) -> Option<(String, usize)> {
    if text.chars().count() <= max {
        return None;
    }
    let marker_room = 60;
    let mut kept = String::new();
    let mut len = 0;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut used = 0;
    for line in &lines {
        let n = line.chars().count();
        if len + n > max - marker_room {
            break;
        }
        kept.push_str(line);
        len += n;
        used += 1;
    }
    let marker = if used == 0 {
        // One line longer than the room: cut inside it, and count characters.
        kept = safe_prefix(text, max - marker_room).to_string();
        let rest = text.chars().count() - kept.chars().count();
        format!("… truncated, {rest} more characters")
    } else {
        format!("… truncated, {} more lines", lines.len() - used)
    };
    let dropped = lines.len() - used.max(1);
    if !kept.ends_with('\n') {
        kept.push('\n');
    }
    kept.push_str(&marker);
    Some((kept, dropped.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Slack body `template` (under `templates_dir`) renders for `payload`, before `fit`.
    fn render_slack(templates_dir: &std::path::Path, template: &str, payload: &Value) -> Value {
        let renderer = crate::render::Renderer::load(templates_dir).unwrap();
        let call = crate::payload::parse(payload.to_string().as_bytes()).unwrap();
        let action = crate::rules::Action {
            channel: "c".into(),
            template: template.into(),
            to: vec![],
            subject: None,
        };
        let ctx = crate::render::context(&call, "r");
        match renderer.render("slack", &action, &ctx).unwrap() {
            crate::render::Message::Slack { body } => body,
            other => panic!("not a Slack message: {other:?}"),
        }
    }
    #[test]
    fn no_text_object_is_left_empty() {
        // A split whose tail is only newlines, and a hard split that leaves just "\n".
        for text in [
            "HUMAN: hi there\n".repeat(187) + "BOT: ok\n\n",
            "a".repeat(3000) + "\n",
            "\n".repeat(3001),
        ] {
            let mut body = serde_json::json!({"blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": text}}
            ]});
            fit(&mut body);
            for b in body["blocks"].as_array().unwrap() {
                let t = b["text"]["text"].as_str().unwrap();
                assert!(!t.trim().is_empty(), "{body}");
            }
        }
        // Text a template rendered empty: the block goes, or just its text when it has fields.
        let mut body = serde_json::json!({"text": "fallback", "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": " "}},
            {"type": "section", "text": {"type": "mrkdwn", "text": ""}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n"},
             "fields": [{"type": "mrkdwn", "text": "*Duration*\n44s"}, {"type": "mrkdwn", "text": ""}]},
            {"type": "section", "text": {"type": "mrkdwn", "text": " "},
             "accessory": {"type": "button", "text": {"type": "plain_text", "text": "Open"}}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "kept"},
             "fields": [{"type": "mrkdwn", "text": " "}]},
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n".repeat(3001)},
             "fields": [{"type": "mrkdwn", "text": "*Campaign*\n8812"}]},
            {"type": "divider"},
        ]});
        assert_eq!(fit(&mut body), 3);
        assert_eq!(
            body["blocks"],
            serde_json::json!([
                {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Duration*\n44s"}]},
                {"type": "section", "text": {"type": "mrkdwn", "text": "kept"}},
                {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Campaign*\n8812"}]},
                {"type": "divider"},
            ])
        );
        assert!(crate::commands::slack_rejects(&body).is_empty(), "{body}");

        // A section the template wrote wrong (a typo for "text") is not fit's to hide: it stays,
        // and check names it.
        let mut body = serde_json::json!({"text": "fallback", "blocks": [
            {"type": "section", "txt": {"type": "mrkdwn", "text": "hello"}},
            {"type": "section", "fields": []},
        ]});
        assert_eq!(fit(&mut body), 0);
        assert_eq!(body["blocks"].as_array().unwrap().len(), 2);
        let rejects = crate::commands::slack_rejects(&body);
        assert!(
            rejects
                .iter()
                .any(|r| r.starts_with("block 0: a section with neither text nor fields"))
                && rejects
                    .iter()
                    .any(|r| r.starts_with("block 1: an empty list of fields")),
            "{rejects:?}"
        );
    }

    #[test]
    fn overlong_fields_are_shortened_and_counted() {
        // The shipped summary template with a 5,000-character campaign id: Slack refused the
        // 5,011-character field with invalid_blocks.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let payload = serde_json::json!({"call": {
            "sid": "CAfield", "duration": 61, "campaignId": "8".repeat(5000),
        }});
        let mut body = render_slack(&dir, "slack/summary", &payload);
        let rejects = crate::commands::slack_rejects(&body);
        assert_eq!(
            rejects,
            ["block 1: field 1 of 5011 characters (at most 2000)"],
            "{body}"
        );
        assert_eq!(fit(&mut body), 1);
        let field = body["blocks"][1]["fields"][1]["text"].as_str().unwrap();
        assert_eq!(field.chars().count(), MAX_FIELD_CHARS);
        assert!(field.starts_with("*Campaign*\n8888"), "{field}");
        assert!(field.ends_with("8…"), "{field}");
        assert!(crate::commands::slack_rejects(&body).is_empty(), "{body}");

        // The cut does not end inside an entity; short and blank fields are left alone.
        let mut body = serde_json::json!({"blocks": [{"type": "section", "fields": [
            {"type": "mrkdwn", "text": "*Note*\n".to_string() + &"&amp;".repeat(1000)},
            {"type": "mrkdwn", "text": "*Duration*\n44s"},
        ]}]});
        assert_eq!(fit(&mut body), 1);
        let field = body["blocks"][0]["fields"][0]["text"].as_str().unwrap();
        assert!(field.chars().count() <= MAX_FIELD_CHARS);
        assert!(field.ends_with("&amp;…"), "{}", &field[field.len() - 20..]);
        assert_eq!(body["blocks"][0]["fields"][1]["text"], "*Duration*\n44s");
        assert!(crate::commands::slack_rejects(&body).is_empty(), "{body}");
    }

    #[test]
    fn a_section_keeps_its_first_ten_fields_and_says_how_many_more() {
        // A template that writes 12 fields: Slack refused the section with invalid_blocks.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("slack")).unwrap();
        let fields: Vec<String> = (1..=12)
            .map(|i| format!(r#"{{"type": "mrkdwn", "text": "*F{i}*\n{{{{call.sid}}}}"}}"#))
            .collect();
        std::fs::write(
            dir.path().join("slack/many.json.hbs"),
            format!(
                r#"{{"blocks": [{{"type": "section", "fields": [{}]}}, {{"type": "divider"}}]}}"#,
                fields.join(", ")
            ),
        )
        .unwrap();
        let payload = serde_json::json!({"call": {"sid": "CAmany", "duration": 61}});
        let mut body = render_slack(dir.path(), "slack/many", &payload);
        assert_eq!(body["blocks"][0]["fields"].as_array().unwrap().len(), 12);

        // What check looks at keeps them all, so check still names the template's mistake.
        let mut kept = body.clone();
        assert_eq!(fit_keeping_fields(&mut kept), 0);
        assert_eq!(
            crate::commands::slack_rejects(&kept),
            ["block 0: 12 fields (at most 10)"]
        );

        assert_eq!(fit(&mut body), 1);
        let blocks = body["blocks"].as_array().unwrap();
        let texts: Vec<&str> = blocks[0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        let want: Vec<String> = (1..=10).map(|i| format!("*F{i}*\nCAmany")).collect();
        assert_eq!(texts, want);
        assert_eq!(
            blocks[1],
            serde_json::json!({"type": "context", "elements": [
                {"type": "mrkdwn", "text": "… 2 more fields not shown"}
            ]})
        );
        assert_eq!(blocks[2], serde_json::json!({"type": "divider"}));
        assert!(crate::commands::slack_rejects(&body).is_empty(), "{body}");

        // Blank fields, which are left out anyway, do not count; 11 says "1 more field".
        let field = |t: &str| serde_json::json!({"type": "mrkdwn", "text": t});
        let mut fields: Vec<Value> = (0..11).map(|i| field(&format!("f{i}"))).collect();
        fields.push(field(" "));
        let mut body = serde_json::json!({"blocks": [{"type": "section", "fields": fields}]});
        assert_eq!(fit(&mut body), 1);
        assert_eq!(body["blocks"][0]["fields"].as_array().unwrap().len(), 10);
        assert_eq!(
            body["blocks"][1]["elements"][0]["text"],
            "… 1 more field not shown"
        );
    }

    #[test]
    fn one_overlong_line_is_cut_with_a_count_of_characters() {
        let mut body = serde_json::json!({"text": "b".repeat(50_000)});
        assert_eq!(fit(&mut body), 1);
        let text = body["text"].as_str().unwrap();
        assert!(text.chars().count() <= MAX_TEXT_CHARS, "{}", text.len());
        let kept = text.chars().filter(|c| *c == 'b').count();
        assert!(
            text.ends_with(&format!("… truncated, {} more characters", 50_000 - kept)),
            "{}",
            &text[text.len() - 60..]
        );
    }

    #[test]
    fn long_sections_are_split_at_lines_and_blocks_capped() {
        let line = "HUMAN: yes &amp; no ".repeat(5) + "\n";
        let transcript = line.repeat(2000);
        let mut body = serde_json::json!({
            "text": transcript.clone(),
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "h".repeat(400)}},
                {"type": "section", "text": {"type": "mrkdwn", "text": transcript}},
            ]
        });
        let cuts = fit(&mut body);
        assert!(cuts >= 3, "{cuts}");
        let blocks = body["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), MAX_BLOCKS);
        assert_eq!(
            blocks[0]["text"]["text"].as_str().unwrap().chars().count(),
            MAX_HEADER_CHARS
        );
        for b in &blocks[1..MAX_BLOCKS - 1] {
            let t = b["text"]["text"].as_str().unwrap();
            assert!(t.chars().count() <= MAX_SECTION_CHARS);
            assert!(t.starts_with("HUMAN:"), "split mid-line: {:?}", &t[..20]);
        }
        let last = blocks[MAX_BLOCKS - 1]["elements"][0]["text"]
            .as_str()
            .unwrap();
        assert!(
            last.starts_with("… truncated, ") && last.ends_with(" more lines"),
            "{last}"
        );
        let text = body["text"].as_str().unwrap();
        assert!(text.chars().count() <= MAX_TEXT_CHARS);
        assert!(text.contains("… truncated, "));
    }

    #[test]
    fn a_split_section_keeps_every_line_in_order_and_its_text_object() {
        let text: String = (0..1000)
            .map(|i| format!("line {i:04} of the call\n"))
            .collect();
        let mut body = serde_json::json!({"blocks": [
            {"type": "section", "block_id": "t",
             "text": {"type": "mrkdwn", "verbatim": true, "text": text},
             "fields": [{"type": "mrkdwn", "text": "*Duration*\n44s"}]},
            {"type": "divider"},
        ]});
        assert_eq!(fit(&mut body), 0);
        let blocks = body["blocks"].as_array().unwrap();
        let n = blocks.len() - 1;
        assert!(n >= 7, "{n} sections");
        // The first keeps the block's own keys; continuations carry only the text object's.
        assert_eq!(blocks[0]["block_id"], "t");
        assert_eq!(blocks[0]["fields"][0]["text"], "*Duration*\n44s");
        assert_eq!(blocks[n], serde_json::json!({"type": "divider"}));
        let mut chunks = Vec::new();
        for b in &blocks[..n] {
            let t = b["text"]["text"].as_str().unwrap();
            assert!(t.chars().count() <= MAX_SECTION_CHARS);
            let mut object = b["text"].clone();
            object["text"] = Value::Null;
            assert_eq!(
                object,
                serde_json::json!({"type": "mrkdwn", "verbatim": true, "text": null})
            );
            chunks.push(t);
        }
        for b in &blocks[1..n] {
            let mut keys: Vec<&String> = b.as_object().unwrap().keys().collect();
            keys.sort_unstable();
            assert_eq!(keys, ["text", "type"]);
        }
        // Every line, once, in order: the chunks joined at their cut line breaks are the text.
        assert_eq!(chunks.join("\n") + "\n", text);
    }

    #[test]
    fn one_long_line_is_split_into_whole_entities_in_order() {
        let line = "x&amp;yz".repeat(1000);
        let chunks = split_lines(&format!("head\n{line}\ntail"), 3000, false);
        // Every character once, in order (the line breaks chunks end at are dropped).
        assert!(chunks.concat().replace('\n', "") == format!("head{line}tail"));
        for c in &chunks {
            assert!(c.chars().count() <= 3000);
            if let Some(last) = c.rfind('&') {
                assert!(c[last..].starts_with("&amp;"), "{}", &c[last..]);
            }
        }
        assert_eq!(chunks[0], "head");
        assert!(chunks.last().is_some_and(|c| c.ends_with("yz\ntail")));
    }

    #[test]
    fn small_bodies_are_left_alone() {
        let mut body = serde_json::json!({"text": "hi", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}}]});
        let before = body.clone();
        assert_eq!(fit(&mut body), 0);
        assert_eq!(body, before);
    }

    #[test]
    fn a_cut_never_splits_an_entity() {
        assert_eq!(safe_prefix("ab&amp;cd", 4), "ab");
        assert_eq!(safe_prefix("ab&amp;cd", 7), "ab&amp;");
    }

    #[test]
    fn a_cut_never_splits_an_emoji_a_flag_an_accent_or_a_link() {
        let family = "\u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467}"; // 👩‍👩‍👧, 5 scalars
        let thumb = "\u{1F44D}\u{1F3FD}"; // 👍🏽
        let flags = "\u{1F1E9}\u{1F1EA}\u{1F1EB}\u{1F1F7}"; // 🇩🇪🇫🇷
        let accent = "e\u{0301}"; // é as e + combining acute
        for cut in 1..5 {
            assert_eq!(
                safe_prefix(&format!("ab{family}cd"), 2 + cut),
                "ab",
                "{cut}"
            );
        }
        assert_eq!(
            safe_prefix(&format!("ab{family}cd"), 7),
            format!("ab{family}")
        );
        assert_eq!(safe_prefix(&format!("ab{thumb}"), 3), "ab");
        assert_eq!(safe_prefix(&format!("ab{flags}"), 3), "ab");
        assert_eq!(
            safe_prefix(&format!("ab{flags}"), 5),
            "ab\u{1F1E9}\u{1F1EA}"
        );
        assert_eq!(safe_prefix(&format!("ab{accent}"), 3), "ab");
        // A link or a mention the template wrote is kept whole or left out whole.
        let link = "see <https://rec.example/1|Listen> now";
        for cut in 5..34 {
            assert_eq!(safe_prefix(link, cut), "see ", "{cut}");
        }
        assert_eq!(safe_prefix(link, 34), "see <https://rec.example/1|Listen>");
        // A `<` with no `>` after it is text, and a link longer than the cut cannot be kept.
        assert_eq!(safe_prefix("a <b c", 4), "a <b");
        assert_eq!(safe_prefix("<https://x.example/a|b>", 5), "<http");
        // Characters, not bytes, and not UTF-16 units: 3 of each fits in 3.
        assert_eq!(safe_prefix("ééé", 3), "ééé");
        assert_eq!(safe_prefix("🎉🎉🎉", 3), "🎉🎉🎉");
    }

    #[test]
    fn headers_sections_and_fields_are_cut_between_characters() {
        let family = "\u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467}";
        let header = "h".repeat(MAX_HEADER_CHARS - 3) + family;
        let field = "f".repeat(MAX_FIELD_CHARS - 3) + family;
        let line = "s".repeat(MAX_SECTION_CHARS - 10)
            + " <https://rec.example/1|Listen to the call> after";
        let mut body = serde_json::json!({"blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": header}},
            {"type": "section", "text": {"type": "mrkdwn", "text": line},
             "fields": [{"type": "mrkdwn", "text": field}]},
        ]});
        fit(&mut body);
        let blocks = body["blocks"].as_array().unwrap();
        let text = |i: usize| blocks[i]["text"]["text"].as_str().unwrap();
        assert_eq!(text(0), "h".repeat(MAX_HEADER_CHARS - 3) + "…");
        assert_eq!(
            blocks[1]["fields"][0]["text"],
            "f".repeat(MAX_FIELD_CHARS - 3) + "…"
        );
        assert_eq!(text(1), "s".repeat(MAX_SECTION_CHARS - 10) + " ");
        assert_eq!(text(2), "<https://rec.example/1|Listen to the call> after");
    }

    #[tokio::test]
    async fn a_huge_answer_is_read_only_as_far_as_its_excerpt_needs() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A peer that answers 500 with a 256 MiB body, and counts what it managed to write.
        const HUGE: usize = 256 << 20;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let (mut request, mut buf) = (Vec::new(), [0u8; 4096]);
            let whole = |r: &[u8]| {
                let text = String::from_utf8_lossy(r).to_ascii_lowercase();
                let Some(end) = text.find("\r\n\r\n") else {
                    return false;
                };
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                r.len() >= end + 4 + length
            };
            while !whole(&request) {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            let head =
                format!("HTTP/1.1 500 Internal Server Error\r\ncontent-length: {HUGE}\r\n\r\n");
            sock.write_all(head.as_bytes()).await.unwrap();
            let (chunk, mut written) = (vec![b'x'; 64 << 10], 0);
            while written < HUGE && sock.write_all(&chunk).await.is_ok() {
                written += chunk.len();
            }
            written
        });
        crate::notify::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let url = SecretString::from(format!("http://{addr}/services/T0/B0/secret"));
        let outcome = send(
            &client,
            &url,
            &serde_json::json!({"text": "hi"}),
            Duration::from_secs(120),
        )
        .await;
        match &outcome {
            Outcome::Retry { after: None, error } => {
                assert!(error.starts_with("HTTP 500: xxxx"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        // The client stopped reading and hung up: the peer could not write it all.
        let written = peer.await.unwrap();
        assert!(written < HUGE, "the whole {written}-byte answer was read");
    }

    #[test]
    fn slack_answers_are_classified() {
        assert!(matches!(
            classify(200, None, "ok"),
            Outcome::Delivered { .. }
        ));
        assert_eq!(
            classify(429, Some("7"), "rate_limited"),
            Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                error: "HTTP 429: rate_limited".into()
            }
        );
        assert!(
            matches!(classify(429, None, ""), Outcome::Retry { after: Some(d), .. } if d == DEFAULT_RATE_LIMIT_WAIT)
        );
        // A huge Retry-After is capped: taken as is it overflowed the lane's pause and panicked.
        let huge = classify(429, Some("18446744073709551615"), "");
        assert!(
            matches!(huge, Outcome::Retry { after: Some(d), .. } if d == MAX_RATE_LIMIT_WAIT),
            "{huge:?}"
        );
        // Retry-After may also be an HTTP date (RFC 9110 10.2.3): the wait is until then.
        let in_ten_minutes = (chrono::Utc::now() + chrono::Duration::minutes(10))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let dated = classify(429, Some(&in_ten_minutes), "");
        assert!(
            matches!(dated, Outcome::Retry { after: Some(d), .. } if d > Duration::from_secs(500) && d <= Duration::from_secs(600)),
            "{in_ten_minutes}: {dated:?}"
        );
        let past = classify(429, Some("Wed, 21 Oct 2015 07:28:00 GMT"), "");
        assert!(
            matches!(past, Outcome::Retry { after: Some(d), .. } if d.is_zero()),
            "{past:?}"
        );
        for unreadable in ["soon", "-5", "1.5", ""] {
            let o = classify(429, Some(unreadable), "");
            assert!(
                matches!(o, Outcome::Retry { after: Some(d), .. } if d == DEFAULT_RATE_LIMIT_WAIT),
                "{unreadable:?}: {o:?}"
            );
        }
        assert!(matches!(
            classify(500, None, ""),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(classify(503, None, ""), Outcome::Retry { .. }));
        for status in [400, 403, 404, 410] {
            assert!(
                matches!(
                    classify(status, None, "channel_not_found"),
                    Outcome::Permanent { .. }
                ),
                "{status}"
            );
        }
        // An error page (a proxy's 502) is kept as one line: its line breaks made a row of
        // `deliveries list` several, and in a log line they could forge more log lines.
        let page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n\x1b[2J<body>\n\n\tnginx</body>";
        assert_eq!(
            classify(502, None, page),
            Outcome::Retry {
                after: None,
                error: "HTTP 502: <html> <head><title>502 Bad Gateway</title></head> [2J<body> nginx</body>".into()
            }
        );
        // A redirect names its host only: the path can be the webhook's secret one.
        assert_eq!(
            redirected(301, Some("https://hooks.slack.com/services/T0/B0/secret")),
            Outcome::Permanent {
                error: "HTTP 301: a redirect to hooks.slack.com, not followed; \
                        check the channel's webhook_url"
                    .into()
            }
        );
        assert!(matches!(
            redirected(302, Some("/services/T0/B0/secret")),
            Outcome::Permanent { error } if error.starts_with("HTTP 302: a redirect, not followed")
        ));
        assert_eq!(
            classify(404, None, "channel_not_found"),
            Outcome::Permanent {
                error: "HTTP 404: channel_not_found".into()
            }
        );
    }

    #[test]
    fn every_try_again_status_a_proxy_or_slack_may_answer_is_retried() {
        // 421 and 425 went dead with every other 4xx: they ask for the same request again.
        for status in [408, 421, 425, 500, 502, 503, 504] {
            let outcome = classify(status, None, "");
            assert_eq!(
                outcome,
                Outcome::Retry {
                    after: None,
                    error: format!("HTTP {status}")
                },
                "{status}"
            );
        }
        // A proxy in maintenance that says when to come back is not asked again before.
        assert_eq!(
            classify(503, Some("120"), "maintenance"),
            Outcome::Retry {
                after: Some(Duration::from_secs(120)),
                error: "HTTP 503: maintenance".into()
            }
        );
        assert!(matches!(
            classify(503, Some("99999999"), ""),
            Outcome::Retry { after: Some(d), .. } if d == MAX_RATE_LIMIT_WAIT
        ));
        assert!(matches!(
            classify(502, Some("soon"), ""),
            Outcome::Retry { after: None, .. }
        ));
        // What Slack answers about the message or the webhook stays permanent.
        for status in [400, 401, 403, 404, 405, 410, 413, 422] {
            assert!(
                matches!(classify(status, None, "x"), Outcome::Permanent { .. }),
                "{status}"
            );
        }
    }

    #[tokio::test]
    async fn a_request_slack_never_answered_says_the_retry_may_show_it_twice() {
        use tokio::io::AsyncReadExt;
        // A peer that takes the whole request and never answers: Slack that posted the message
        // and whose answer was lost, as far as the client can tell.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _peer = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            while sock.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        crate::notify::install_tls_provider();
        let timeout = Duration::from_millis(300);
        let client = reqwest::Client::builder().timeout(timeout).build().unwrap();
        let body = serde_json::json!({"text": "hi"});
        let url = SecretString::from(format!("http://{addr}/services/T0/B0/secret"));
        assert_eq!(
            send(&client, &url, &body, timeout).await,
            Outcome::Retry {
                after: None,
                error: "no answer within 300ms; Slack may have posted it, \
                        so the retry may show it twice"
                    .into()
            }
        );

        // A connection never made posted nothing: no such warning.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = SecretString::from(format!("http://127.0.0.1:{port}/services/T0/B0/secret"));
        match send(&client, &url, &body, timeout).await {
            Outcome::Retry { after: None, error } => {
                assert!(error.starts_with("connection failed: "), "{error}");
                assert!(!error.contains("twice"), "{error}");
                assert!(!error.contains("secret"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_2xx_whose_body_says_ok_false_is_not_counted_delivered() {
        // A workflow trigger or a Web API URL pasted as the webhook answers 200 with
        // {"ok": false, ...} when it posts nothing: that was recorded as delivered.
        let refused = classify(
            200,
            None,
            r#"{"ok":false,"error":"invalid_workflow_input"}"#,
        );
        assert_eq!(
            refused,
            Outcome::Permanent {
                error: r#"HTTP 200: {"ok":false,"error":"invalid_workflow_input"} (a refusal, though with a 2xx status)"#
                    .into()
            }
        );
        assert!(matches!(
            classify(200, None, r#"{"ok": false}"#),
            Outcome::Permanent { .. }
        ));
        assert!(matches!(
            classify(200, Some("9"), r#"{"ok":false,"error":"ratelimited"}"#),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(9)
        ));
        assert!(matches!(
            classify(200, None, r#"{"ok":false,"error":"internal_error"}"#),
            Outcome::Retry { after: None, .. }
        ));
        // Everything else a 2xx can carry is a delivery, as before.
        for body in [
            "ok",
            "",
            r#"{"ok":true}"#,
            "<html>posted</html>",
            "[false]",
            r#"{"ok":"false"}"#,
        ] {
            assert!(
                matches!(classify(200, None, body), Outcome::Delivered { .. }),
                "{body:?}"
            );
        }
    }

    #[test]
    fn a_refusal_is_read_even_when_its_body_is_cut_or_followed_by_more() {
        // One message per invalid block: longer than the part of the body that is read.
        let messages: Vec<String> = (0..400)
            .map(|i| format!("[ERROR] must be a valid block [json-pointer:/blocks/{i}/text]"))
            .collect();
        let long = serde_json::json!({
            "ok": false,
            "error": "invalid_blocks",
            "response_metadata": {"messages": messages},
        })
        .to_string();
        assert!(long.len() > MAX_ANSWER_BYTES, "{}", long.len());
        let cut = &long[..MAX_ANSWER_BYTES];
        let outcome = classify(200, None, cut);
        assert!(
            matches!(&outcome, Outcome::Permanent { error }
                if error.starts_with(r#"HTTP 200: {"ok":false,"error":"invalid_blocks""#)
                    && error.ends_with("(a refusal, though with a 2xx status)")),
            "{outcome:?}"
        );
        let cut_rate_limit = format!(
            r#"{{"ok":false,"error":"ratelimited","warning":"{}"#,
            "x".repeat(MAX_ANSWER_BYTES)
        );
        assert!(matches!(
            classify(200, Some("9"), &cut_rate_limit[..MAX_ANSWER_BYTES]),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(9)
        ));
        // Something after the object (a second one, a note a proxy added) does not hide it.
        for body in [
            r#"{"ok":false,"error":"invalid_auth"} {"ok":true}"#,
            r#"{"ok":false,"error":"invalid_auth"}<!-- served by proxy -->"#,
        ] {
            assert!(
                matches!(classify(200, None, body), Outcome::Permanent { .. }),
                "{body:?}"
            );
        }
        // Only the top level speaks: a nested "ok": false, or one cut before it is read,
        // is no refusal; nor is a body nested past the parser's depth.
        for body in [
            r#"{"result":{"ok":false,"error":"x"}}"#,
            r#"{"ok":fa"#,
            &("[".repeat(1000) + "]".repeat(1000).as_str()),
            &format!(r#"{{"ok":true,"error":"{}"#, "y".repeat(MAX_ANSWER_BYTES)),
        ] {
            assert!(
                matches!(classify(200, None, body), Outcome::Delivered { .. }),
                "{}",
                excerpt(body, 80)
            );
        }
    }

    #[test]
    fn plain_text_is_cut_at_its_limit_and_not_before_a_bracket_or_an_ampersand() {
        // The renderer gives plain_text its `&`, `<` and `>` back: there they start nothing.
        let header = format!(
            "Call with {} <maria.gonzalez@bigcorp.example> about roofing",
            "x".repeat(120)
        );
        let field = "f".repeat(MAX_FIELD_CHARS - 5) + " R&D team";
        let line = "p".repeat(MAX_SECTION_CHARS - 4) + " <abc> " + &"q".repeat(100);
        let mut body = serde_json::json!({"blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": header}},
            {"type": "section", "text": {"type": "plain_text", "text": line},
             "fields": [{"type": "plain_text", "text": field},
                        {"type": "mrkdwn", "text": field}]},
        ]});
        fit(&mut body);
        let blocks = body["blocks"].as_array().unwrap();
        let kept: String = header.chars().take(MAX_HEADER_CHARS - 1).collect();
        assert_eq!(blocks[0]["text"]["text"], format!("{kept}…"));
        assert_eq!(
            blocks[1]["fields"][0]["text"],
            "f".repeat(MAX_FIELD_CHARS - 5) + " R&D…"
        );
        assert_eq!(
            blocks[1]["text"]["text"],
            "p".repeat(MAX_SECTION_CHARS - 4) + " <ab"
        );
        assert_eq!(
            blocks[2]["text"]["text"],
            "c> ".to_string() + &"q".repeat(100)
        );
        // mrkdwn still backs off from what may be an entity.
        assert_eq!(
            blocks[1]["fields"][1]["text"],
            "f".repeat(MAX_FIELD_CHARS - 5) + " R…"
        );
        assert!(crate::commands::slack_rejects(&body).is_empty(), "{body}");
    }
}
