//! One-shot commands: `check` (validate and render everything), `render` (the dry run),
//! `deliveries list|show|retry` and `send-test`. They print; `main.rs` only parses arguments.

use std::fmt::Write;

use serde_json::{json, Value};

use crate::config::{ChannelKind, Config, Placeholder, Problem, StoreConfig};
use crate::notify::{self, Meta, Outcome, Senders};
use crate::payload::{self, Call};
use crate::render::{self, Message};
use crate::rules::{self, Action};
use crate::store::{AttemptRow, DeliveryRow, Store};

/// Sample payloads shipped inside the binary: Air's documented examples, and edge cases every
/// template must survive.
pub fn samples() -> Vec<(&'static str, Call)> {
    let fixture = |b: &[u8]| payload::parse(b).expect("embedded fixtures parse");
    let data = fixture(include_bytes!("../tests/fixtures/post_call_data.json"));
    let campaign = fixture(include_bytes!(
        "../tests/fixtures/post_call_data_campaign.json"
    ));
    let outcome = fixture(include_bytes!("../tests/fixtures/post_call_outcome.json"));
    let minimal = fixture(br#"{"call":{"sid":"CAminimal"}}"#);
    let nulls = fixture(
        br#"{"call":{"sid":"CAnulls","llmAnsweredBy":null,"promptId":null,"callRecordingUrl":null,"fromNumber":null,
        "toNumber":null,"direction":null,"duration":null,"campaignId":null,"cachedLeadName":null,"transcript":null,
        "createdAt":null,"leadData":null}}"#,
    );
    let mut long = campaign.clone();
    let line = "HUMAN:  yes, I'd like to book the Monday slot & talk about <pricing>, please\n";
    let transcript = line.repeat(100 * 1024 / line.len() + 1);
    long.raw
        .insert("transcript".into(), Value::String(transcript));
    long.sid = "CAlongtranscript".into();
    let mut hostile = campaign.clone();
    let name = "<!channel> <@U123> *Zoë* \"Quotes\" \\ back\\slash & <https://evil.example|click> 🎉\u{202e}RTL\u{0} \r\nBcc: x@evil.example =?utf-8?b?QmNjOg==?= \u{2028}}}";
    hostile.lead_name = name.trim().to_string();
    hostile
        .raw
        .insert("cachedLeadName".into(), Value::String(name.into()));
    hostile.raw.insert(
        "leadData".into(),
        json!({"owner": "jordan@ourteam.example", "source": "<!here> website", "company": "Acme & <Sons>", "tags": ["a|b", "🎉"]}),
    );
    hostile.sid = "CAhostile".into();
    vec![
        ("post_call_data", data),
        ("post_call_outcome", outcome),
        ("post_call_data_campaign", campaign),
        ("minimal", minimal),
        ("all_nulls", nulls),
        ("long_transcript", long),
        ("hostile_names", hostile),
    ]
}

/// What Slack would reject in a body (after [`notify::slack::fit`]).
pub fn slack_rejects(body: &Value) -> Vec<String> {
    use notify::slack::{
        MAX_BLOCKS, MAX_FIELDS, MAX_FIELD_CHARS, MAX_HEADER_CHARS, MAX_SECTION_CHARS,
    };
    let mut out = Vec::new();
    let text = body.get("text").and_then(Value::as_str).unwrap_or_default();
    let blocks = body.get("blocks").and_then(Value::as_array);
    if text.trim().is_empty() && blocks.is_none_or(|b| b.is_empty()) {
        out.push("no text and no blocks (Slack answers no_text)".into());
    }
    if text.chars().count() > 40_000 {
        out.push("text is over 40,000 characters".into());
    }
    let Some(blocks) = blocks else {
        return out;
    };
    if blocks.len() > MAX_BLOCKS {
        out.push(format!("{} blocks (at most {MAX_BLOCKS})", blocks.len()));
    }
    const KNOWN: &[&str] = &[
        "section",
        "header",
        "divider",
        "context",
        "actions",
        "image",
        "rich_text",
        "input",
        "file",
        "video",
        "markdown",
    ];
    for (i, b) in blocks.iter().enumerate() {
        let kind = b.get("type").and_then(Value::as_str).unwrap_or_default();
        if !KNOWN.contains(&kind) {
            out.push(format!("block {i}: unknown type {kind:?}"));
        }
        let t = b
            .pointer("/text/text")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .chars()
            .count();
        let empty = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .is_some_and(|t| t.trim().is_empty())
        };
        if empty(b.pointer("/text/text")) {
            out.push(format!(
                "block {i}: empty text (Slack answers invalid_blocks)"
            ));
        }
        if let Some(fields) = b.get("fields").and_then(Value::as_array) {
            if fields.iter().any(|f| empty(f.get("text"))) {
                out.push(format!(
                    "block {i}: a field with empty text (Slack answers invalid_blocks)"
                ));
            }
            if fields.is_empty() {
                out.push(format!(
                    "block {i}: an empty list of fields (Slack answers invalid_blocks)"
                ));
            }
        }
        if kind == "section" && b.get("text").is_none() && b.get("fields").is_none() {
            out.push(format!(
                "block {i}: a section with neither text nor fields (Slack answers invalid_blocks)"
            ));
        }
        if kind == "section" && t > MAX_SECTION_CHARS {
            out.push(format!(
                "block {i}: section text of {t} characters (at most {MAX_SECTION_CHARS})"
            ));
        }
        if kind == "header" && t > MAX_HEADER_CHARS {
            out.push(format!(
                "block {i}: header of {t} characters (at most {MAX_HEADER_CHARS})"
            ));
        }
        if let Some(fields) = b.get("fields").and_then(Value::as_array) {
            if fields.len() > MAX_FIELDS {
                out.push(format!(
                    "block {i}: {} fields (at most {MAX_FIELDS})",
                    fields.len()
                ));
            }
            for (j, f) in fields.iter().enumerate() {
                let n = f
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, |t| t.chars().count());
                if n > MAX_FIELD_CHARS {
                    out.push(format!(
                        "block {i}: field {j} of {n} characters (at most {MAX_FIELD_CHARS})"
                    ));
                }
            }
        }
    }
    out
}

/// Renders one action as it would be sent: Slack bodies cut to fit, email recipients checked.
pub fn render_action(
    config: &Config,
    rule: &str,
    action: &Action,
    call: &Call,
) -> Result<Message, String> {
    render_fitted(config, rule, action, call, notify::slack::fit)
}

/// Renders one action for `check`: as sent, except that a section keeps every field the
/// template wrote, so that more than 10 is reported rather than quietly cut.
fn render_for_check(
    config: &Config,
    rule: &str,
    action: &Action,
    call: &Call,
) -> Result<Message, String> {
    render_fitted(
        config,
        rule,
        action,
        call,
        notify::slack::fit_keeping_fields,
    )
}

fn render_fitted(
    config: &Config,
    rule: &str,
    action: &Action,
    call: &Call,
    fit: fn(&mut Value) -> usize,
) -> Result<Message, String> {
    let channel = config
        .channels
        .get(&action.channel)
        .ok_or_else(|| format!("unknown channel {:?}", action.channel))?;
    let ctx = render::context(call, rule);
    let mut msg = config
        .templates
        .render(channel.kind.type_name(), action, &ctx)
        .map_err(|e| e.to_string())?;
    if let Message::Slack { body } = &mut msg {
        fit(body);
    }
    Ok(msg)
}

/// Renders every action of every rule against the samples; every failure is a problem. Used by
/// `check` and before a reload is accepted.
pub fn render_problems(config: &Config) -> Vec<Problem> {
    check_report(config).1
}

/// Lines describing what was rendered, and the problems found.
fn check_report(config: &Config) -> (Vec<String>, Vec<Problem>) {
    let samples = samples();
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        let matched: Vec<&str> = samples
            .iter()
            .filter(|(_, c)| rule.check(c).is_ok())
            .map(|(n, _)| *n)
            .collect();
        if matched.is_empty() {
            lines.push(format!("rule {:?}: matches none of the sample payloads; its templates were rendered against all of them", rule.name));
        } else {
            lines.push(format!(
                "rule {:?}: matches {}",
                rule.name,
                matched.join(", ")
            ));
        }
        for (j, action) in rule.actions.iter().enumerate() {
            let at = format!(
                "rules[{i}] ({}).notify[{j}] ({} via {})",
                rule.name, action.template, action.channel
            );
            let mut found: Vec<(&str, String)> = Vec::new();
            for (sample, call) in &samples {
                match render_for_check(config, &rule.name, action, call) {
                    Err(e) => found.push((sample, e.to_string())),
                    Ok(Message::Slack { body }) => {
                        for r in slack_rejects(&body) {
                            found.push((sample, format!("Slack would reject this: {r}")));
                        }
                    }
                    Ok(Message::Email(parts)) => {
                        let (good, _) = notify::email::recipients(&parts.to);
                        if let (ChannelKind::Email { from, .. }, false) =
                            (&config.channels[&action.channel].kind, good.is_empty())
                        {
                            if let Err(e) = notify::email::build(from, &good, &parts, None) {
                                found.push((sample, e.to_string()));
                            }
                        }
                        if good.is_empty() && matched.contains(sample) {
                            found.push((sample, format!("no valid recipient in {:?}", parts.to)));
                        }
                    }
                    Ok(Message::Log { .. }) => {}
                }
            }
            problems.extend(same_problem_once(&at, found));
        }
    }
    for (name, channel) in &config.channels {
        if let ChannelKind::Log { file: Some(path) } = &channel.kind {
            if let Err(e) = can_append(path) {
                problems.push(Problem::new(
                    format!("channels.{name}.file"),
                    format!("cannot open {} for appending: {e}", path.display()),
                ));
            }
        }
    }
    if let Some(q) = &config.quiet_alert {
        let found = quiet_alert_problems(config, q);
        if found.is_empty() {
            lines.push(format!(
                "quiet_alert: both messages rendered for channel {:?}",
                q.channel
            ));
        }
        problems.extend(found);
    }
    (lines, problems)
}

/// Whether a log channel's lane will be able to open its file for appending, so a path that
/// cannot be written is found before the first call, with the OS's reason. An existing file is
/// opened for appending; for a missing one (which the lane creates, with the directories above
/// it), the nearest directory that exists must take a new file: a probe file with a name of its
/// own, removed at once. Nothing else is created, so `check` leaves no trace and two checks side
/// by side do not trip over each other.
fn can_append(path: &std::path::Path) -> std::io::Result<()> {
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop);
    }
    let mut dir = path.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        dir = d.parent();
    }
    let dir = dir
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let probe = dir.join(format!(".callnotify-check-{}-{nanos}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// One problem per distinct message, naming every sample that met it: a template typo is one
/// problem "with samples a, b, c", not seven.
fn same_problem_once(at: &str, found: Vec<(&str, String)>) -> Vec<Problem> {
    let mut grouped: Vec<(String, Vec<&str>)> = Vec::new();
    for (sample, message) in found {
        match grouped.iter_mut().find(|(m, _)| *m == message) {
            Some((_, samples)) => samples.push(sample),
            None => grouped.push((message, vec![sample])),
        }
    }
    grouped
        .into_iter()
        .map(|(message, samples)| {
            let s = if samples.len() == 1 { "" } else { "s" };
            Problem::new(
                at,
                format!("with sample{s} {}: {message}", samples.join(", ")),
            )
        })
        .collect()
}

/// Renders the quiet-period alert and its all-clear as they would be sent, and checks the
/// alert's recipients: a mistake there would surface only on the day calls stop.
fn quiet_alert_problems(config: &Config, q: &crate::config::QuietAlertConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    for quiet in [true, false] {
        let (_, body, action) =
            crate::quiet::notification(q, quiet, "2 hours", "2026-01-05T09:00:00+00:00", 0);
        let at = format!("quiet_alert ({} via {})", action.template, action.channel);
        let rendered = serde_json::from_value(body)
            .map_err(|e| e.to_string())
            .and_then(|raw| payload::from_call_object(raw).map_err(|e| e.to_string()))
            .and_then(|call| render_for_check(config, "quiet_alert", &action, &call));
        match rendered {
            Err(e) => problems.push(Problem::new(&at, e)),
            Ok(Message::Slack { body }) => {
                for r in slack_rejects(&body) {
                    problems.push(Problem::new(&at, format!("Slack would reject this: {r}")));
                }
            }
            Ok(Message::Email(parts)) if quiet => {
                let (good, bad) = notify::email::recipients(&parts.to);
                for b in bad {
                    problems.push(Problem::new("quiet_alert.to", b));
                }
                if good.is_empty() {
                    problems.push(Problem::new("quiet_alert.to", "no valid recipient"));
                }
            }
            Ok(_) => {}
        }
    }
    problems
}

/// The unset variables that placeholders stood in for, each with where it is used
/// (`A (server.tokens[0]), B (...)`); None when every variable was set.
pub fn unset_variables(config: &Config) -> Option<String> {
    listed(&config.placeholders)
}

/// [`unset_variables`] of some placeholders.
fn listed<'a>(placeholders: impl IntoIterator<Item = &'a Placeholder>) -> Option<String> {
    let mut vars: Vec<(&str, Vec<&str>)> = Vec::new();
    for p in placeholders {
        match vars.iter_mut().find(|(v, _)| *v == p.var) {
            Some((_, places)) => places.push(&p.at),
            None => vars.push((&p.var, vec![&p.at])),
        }
    }
    if vars.is_empty() {
        return None;
    }
    let list: Vec<String> = vars
        .iter()
        .map(|(v, places)| format!("{v} ({})", places.join(", ")))
        .collect();
    Some(list.join(", "))
}

/// `1 rule`, `2 rules`.
fn counted(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `callnotify check`: the report and whether all is well.
pub fn check(config: &Config) -> (String, bool) {
    let (lines, problems) = check_report(config);
    let mut out = String::new();
    let templates = config
        .templates
        .names()
        .filter(|n| !n.starts_with("builtin/"))
        .count();
    let _ = writeln!(
        out,
        "{}: {}, {}, {}",
        config.source.display(),
        counted(config.channels.len(), "channel"),
        counted(config.rules.len(), "rule"),
        counted(templates, "template"),
    );
    if let Some(settings) = config.overridden() {
        let _ = writeln!(out, "set by the environment over the file: {settings}");
    }
    if let Some(vars) = unset_variables(config) {
        let _ = writeln!(
            out,
            "not set, so not checked (placeholders stood in): {vars}"
        );
    }
    for w in &config.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "OK: every template the rules use rendered against {} sample payloads",
            samples().len()
        );
    } else {
        let _ = writeln!(
            out,
            "{} problem{}:",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for p in &problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    (out, problems.is_empty())
}

/// `callnotify render`: which rules match the payload, and exactly what would be sent.
/// The report, and whether every notification would go out: false when one fails to render,
/// has no valid recipient, or would be refused by Slack.
pub fn dry_run(config: &Config, body: &[u8], as_json: bool) -> Result<(String, bool), String> {
    let call = payload::parse(body).map_err(|e| format!("the payload is not a call: {e}"))?;
    let verdicts = rules::explain(&config.rules, &call);
    let mut notifications = Vec::new();
    for v in verdicts.iter().filter(|v| v.matched) {
        let rule = config
            .rules
            .iter()
            .find(|r| r.name == v.rule)
            .ok_or("rule vanished")?;
        for action in &rule.actions {
            let kind = config
                .channels
                .get(&action.channel)
                .map(|c| c.kind.type_name())
                .unwrap_or("?");
            let rendered = render_action(config, &rule.name, action, &call);
            let what = match &rendered {
                Ok(Message::Email(parts)) => {
                    let (good, bad) = notify::email::recipients(&parts.to);
                    match &config.channels[&action.channel].kind {
                        // What the daemon would record, instead of lettre's "missing
                        // destination address".
                        ChannelKind::Email { .. } if good.is_empty() => {
                            json!({"error": format!("no valid recipient in {:?}", parts.to), "skipped_recipients": bad})
                        }
                        ChannelKind::Email { from, .. } => {
                            match notify::email::build(from, &good, parts, None) {
                                Ok(m) => {
                                    json!({"mime": String::from_utf8_lossy(&m.formatted()), "skipped_recipients": bad})
                                }
                                Err(e) => json!({"error": e}),
                            }
                        }
                        _ => json!(null),
                    }
                }
                Ok(Message::Slack { body }) => {
                    json!({"body": body, "rejects": slack_rejects(body)})
                }
                Ok(Message::Log { text }) => json!({"text": text}),
                Err(e) => json!({"error": e}),
            };
            notifications.push(json!({"rule": rule.name, "channel": action.channel, "type": kind, "message": what}));
        }
    }
    let all_good = notifications.iter().all(|n| {
        let m = &n["message"];
        m.get("error").is_none() && m["rejects"].as_array().is_none_or(|r| r.is_empty())
    });
    if as_json {
        let out = json!({"sid": call.sid, "event": call.event.as_str(), "rules": verdicts, "notifications": notifications});
        return serde_json::to_string_pretty(&out)
            .map(|text| (text, all_good))
            .map_err(|e| e.to_string());
    }
    let mut out = String::new();
    let _ = writeln!(out, "call {} ({})", call.sid, call.event.as_str());
    for v in &verdicts {
        match &v.reason {
            None => {
                let _ = writeln!(out, "  rule {:?}: MATCHED", v.rule);
            }
            Some(r) => {
                let _ = writeln!(out, "  rule {:?}: not matched: {r}", v.rule);
            }
        }
    }
    if notifications.is_empty() {
        let _ = writeln!(out, "\nnothing would be sent");
    }
    for n in &notifications {
        let _ = writeln!(
            out,
            "\n== rule {} -> channel {} ({}) ==",
            n["rule"].as_str().unwrap_or(""),
            n["channel"].as_str().unwrap_or(""),
            n["type"].as_str().unwrap_or("")
        );
        let m = &n["message"];
        if let Some(e) = m.get("error").and_then(Value::as_str) {
            let _ = writeln!(out, "ERROR: {e}");
        } else if let Some(mime) = m.get("mime").and_then(Value::as_str) {
            let _ = writeln!(out, "{}", mime.replace("\r\n", "\n"));
            if let Some(bad) = m
                .get("skipped_recipients")
                .and_then(Value::as_array)
                .filter(|b| !b.is_empty())
            {
                let _ = writeln!(
                    out,
                    "(skipped: {})",
                    bad.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
        } else if let Some(body) = m.get("body") {
            let _ = writeln!(
                out,
                "POST <the channel's webhook_url>\n{}",
                serde_json::to_string_pretty(body).unwrap_or_default()
            );
            for r in m["rejects"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "WARNING: Slack would reject this: {}",
                    r.as_str().unwrap_or("")
                );
            }
        } else if let Some(text) = m.get("text").and_then(Value::as_str) {
            let _ = writeln!(out, "{text}");
        }
    }
    Ok((out, all_good))
}

/// Formats deliveries as a table. Each column is as wide as its widest value (ids past
/// 999,999, long rule names), so the columns line up whatever the store holds.
pub fn format_deliveries(rows: &[DeliveryRow]) -> String {
    let ts = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default()
    };
    let width = |header: &str, value: fn(&DeliveryRow) -> String| {
        rows.iter()
            .map(|r| value(r).chars().count())
            .chain([header.chars().count()])
            .max()
            .unwrap_or_default()
    };
    let id = width("id", |r| r.id.to_string());
    let status = width("status", |r| r.status.clone());
    let sid = width("sid", |r| r.sid.clone());
    let rule = width("rule", |r| r.rule.clone());
    let channel = width("channel", |r| r.channel.clone());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>id$}  {:<status$}  {:<sid$}  {:<rule$}  {:<channel$}  {:>8}  {:<19}  last error",
        "id", "status", "sid", "rule", "channel", "attempts", "next attempt (UTC)"
    );
    for r in rows {
        let next = if r.status == "pending" {
            ts(r.next_attempt_at)
        } else {
            "-".into()
        };
        let error = shown_error(r);
        let _ = writeln!(
            out,
            "{:>id$}  {:<status$}  {:<sid$}  {:<rule$}  {:<channel$}  {:>8}  {:<19}  {}",
            r.id, r.status, r.sid, r.rule, r.channel, r.attempts, next, error
        );
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no deliveries)");
    }
    out
}

/// A delivery's last error as the tables show it. A delivered row keeps the error of a failed
/// attempt before it: useful (it was retried, and why), but under "last error" alone it reads as
/// a failure. So does a replayed one (`deliveries retry` counts attempts from 0 again) not
/// tried since.
fn shown_error(r: &DeliveryRow) -> String {
    match (r.status.as_str(), r.last_error.as_deref()) {
        (_, None) => String::new(),
        ("done", Some(e)) => format!("earlier attempt: {e}"),
        ("pending" | "sending", Some(e)) if r.attempts == 0 => format!("before the replay: {e}"),
        (_, Some(e)) => e.to_string(),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// `deliveries show`: one delivery and every attempt at it (None: no such delivery).
pub fn show_delivery(
    store: &StoreConfig,
    id: i64,
) -> anyhow::Result<Option<(DeliveryRow, Vec<AttemptRow>)>> {
    must_exist(store)?;
    Ok(crate::store::show_at(&store.path, id)?)
}

/// Formats one delivery and its attempts: what each try met, which `list` (last error only)
/// cannot tell.
pub fn format_delivery(r: &DeliveryRow, attempts: &[AttemptRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "delivery {}: {}", r.id, r.status);
    let _ = writeln!(out, "  call        {} ({})", r.sid, r.event);
    let _ = writeln!(out, "  rule        {} -> channel {}", r.rule, r.channel);
    let _ = writeln!(out, "  created     {}", utc(r.created_at));
    if r.status == "pending" {
        let _ = writeln!(out, "  next try    {}", utc(r.next_attempt_at));
    }
    let error = shown_error(r);
    if !error.is_empty() {
        let _ = writeln!(out, "  last error  {error}");
    }
    if attempts.is_empty() {
        let _ = writeln!(out, "no attempts yet");
        return out;
    }
    let _ = writeln!(
        out,
        "attempts, oldest first (numbered from 1 again after each replay):"
    );
    for a in attempts {
        let latency = a
            .latency_ms
            .map(|ms| format!("{ms} ms"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  #{:<3} {}  {:<5}  {:>8}  {}",
            a.attempt,
            utc(a.at),
            a.outcome,
            latency,
            a.detail.as_deref().unwrap_or("")
        );
    }
    out
}

/// Opens the daemon's existing store for the `deliveries` commands. A store that is not there
/// is an error, not a new empty one: `store.path` is relative to the daemon's working
/// directory, and "(no deliveries)" from the wrong directory would be a lie. Works while the
/// daemon runs.
pub fn open_store(store: &StoreConfig) -> anyhow::Result<Store> {
    must_exist(store)?;
    Ok(Store::open_with(&store.path, store.synchronous)?)
}

/// `deliveries list`: reads the daemon's existing store without taking its write lock (see
/// [`crate::store::list_at`]). The newest `limit` rows, and a note for stderr when there are
/// more: a list cut at `--limit` must not pass for the whole backlog.
pub fn list_deliveries(
    store: &StoreConfig,
    status: Option<&str>,
    sid: Option<&str>,
    limit: usize,
) -> anyhow::Result<(Vec<DeliveryRow>, Option<String>)> {
    must_exist(store)?;
    let mut rows = crate::store::list_at(&store.path, status, sid, limit.saturating_add(1))?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let mut note = more.then(|| {
        format!(
            "only the newest {limit} are shown; there are more: raise --limit, or narrow with --status or --sid"
        )
    });
    // "(no deliveries)" for a call does not say whether it came at all: the first question
    // when a notification was expected and never arrived.
    if let (Some(sid), None, true) = (sid, status, rows.is_empty()) {
        note = Some(call_without_deliveries(
            sid,
            &crate::store::calls_at(&store.path, sid)?,
        ));
    }
    Ok((rows, note))
}

/// Why a call has no deliveries: it matched no rule, or it is not in the store.
fn call_without_deliveries(sid: &str, calls: &[(String, i64)]) -> String {
    if calls.is_empty() {
        return format!(
            "no call {sid} in the store: it never arrived, it was refused (the daemon's log says \
             why, with the sender's address), or it was pruned after delivery.keep_delivered"
        );
    }
    let when: Vec<String> = calls
        .iter()
        .map(|(event, at)| {
            let at = chrono::DateTime::from_timestamp_millis(*at)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default();
            format!("{event} at {at}")
        })
        .collect();
    format!(
        "call {sid} was received ({}) and matched no rule, so it owes no notification; \
         `callnotify render` on its payload shows why each rule did not match",
        when.join(", ")
    )
}

fn must_exist(store: &StoreConfig) -> anyhow::Result<()> {
    if !store.path.exists() {
        let cwd = std::env::current_dir()
            .map(|d| format!(" (relative paths are taken from {})", d.display()))
            .unwrap_or_default();
        anyhow::bail!(
            "no store at {}{cwd}: run this where the daemon runs, or check --config and store.path",
            store.path.display()
        );
    }
    Ok(())
}

/// `callnotify send-test`: renders a sample (or the given payload) for a channel with the first
/// rule action that uses it (or a built-in test message) and really sends it.
pub async fn send_test(
    config: &Config,
    channel: &str,
    body: Option<&[u8]>,
    to: &[String],
) -> Result<(Action, Message, Outcome), String> {
    // Loaded with placeholders for unset variables: what this sends with must be set, while
    // the daemon's own secrets (the Air token) and other channels' need not be.
    let in_channel = |at: &str| {
        at.strip_prefix("channels.")
            .and_then(|rest| rest.strip_prefix(channel))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    };
    let unused = |at: &str| {
        at.starts_with("server.")
            || at.starts_with("admin.")
            || (at.starts_with("channels.") && !in_channel(at))
    };
    if let Some(vars) = listed(config.placeholders.iter().filter(|p| !unused(&p.at))) {
        return Err(format!(
            "not set: {vars}; send-test sends for real, so what the channel and the rules use \
             must be set (the server's settings and other channels' may be left unset)"
        ));
    }
    let ch = config.channels.get(channel).ok_or_else(|| {
        format!(
            "no channel {channel:?} (configured: {})",
            config
                .channels
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let call = match body {
        Some(b) => payload::parse(b).map_err(|e| format!("the payload is not a call: {e}"))?,
        None => samples()
            .into_iter()
            .find(|(n, _)| *n == "post_call_data_campaign")
            .map(|(_, c)| c)
            .ok_or("no sample")?,
    };
    let found = config.rules.iter().find_map(|r| {
        r.actions
            .iter()
            .find(|a| a.channel == channel)
            .map(|a| (r.name.clone(), a.clone()))
    });
    let (rule, mut action) = found.unwrap_or_else(|| {
        (
            "send-test".into(),
            Action {
                channel: channel.into(),
                template: "builtin/test".into(),
                to: vec![],
                subject: matches!(ch.kind, ChannelKind::Email { .. })
                    .then(|| "callnotify test message".into()),
            },
        )
    });
    if !to.is_empty() {
        if !matches!(ch.kind, ChannelKind::Email { .. }) {
            return Err(format!(
                "--to is for email channels; {channel} is a {} channel",
                ch.kind.type_name()
            ));
        }
        action.to = to.to_vec();
    }
    if matches!(ch.kind, ChannelKind::Email { .. }) && action.to.is_empty() {
        return Err("no recipients: no rule sends to this channel; give --to ADDRESS".into());
    }
    let message = render_action(config, &rule, &action, &call)?;
    let senders = Senders::new(config)?;
    let meta = Meta {
        channel,
        rule: &rule,
        sid: &call.sid,
        event: call.event.as_str(),
        delivery_id: 0,
    };
    let outcome = senders.send(&ch.kind, &message, &meta).await;
    Ok((action, message, outcome))
}
