//! Templates: one Handlebars registry per output kind, each with its own escaping; pure rendering.
//!
//! Every `*.hbs` file under `templates_dir` is registered in every registry under its path
//! without `.hbs` (`slack/booked.hbs` -> `slack/booked`, `email/booked.html.hbs` ->
//! `email/booked.html`), so any template can be used as a partial. What differs per registry is
//! how a `{{value}}` is escaped:
//!
//! - Slack mrkdwn: `&`, `<`, `>` become entities, so `<!channel>` arrives as text, and `|`
//!   becomes `%7C` in a URL and `∣` (U+2223) elsewhere, so a value cannot relabel a link;
//! - Slack Block Kit (`*.json.hbs`): the same, then escaped for a JSON string; once the body
//!   parses, `plain_text` objects and `url` / `image_url` / `alt_text` get the characters back,
//!   since Slack shows entities there as they are;
//! - email HTML (`*.html.hbs`): HTML escaping;
//! - plain (email text, subjects, recipients, the log channel): nothing.
//!
//! All registries are strict: a misspelled variable is an error, which `callnotify check` finds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use handlebars::{
    handlebars_helper, no_escape, Context, Handlebars, Helper, HelperResult, Output, RenderContext,
    RenderErrorReason, Template,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Problem;
use crate::payload::{parse_timestamp, Call};
use crate::rules::Action;

/// Why a message could not be rendered. At delivery time this is permanent: retrying the same
/// template on the same call gives the same answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RenderError(pub String);

impl From<handlebars::RenderError> for RenderError {
    /// Handlebars' own words for a missing variable ("Failed to access variable in strict mode
    /// Some(\"lead_nmae\")") say neither what went wrong nor what to write instead.
    fn from(e: handlebars::RenderError) -> Self {
        let at = match (&e.template_name, e.line_no, e.column_no) {
            (Some(t), Some(line), Some(col)) => format!("{t} line {line}, col {col}: "),
            (Some(t), _, _) => format!("{t}: "),
            _ => String::new(),
        };
        let path = match e.reason() {
            RenderErrorReason::MissingVariable(path) => path,
            // `{{upper call.leadData.nope}}`: the macro-made helpers see no argument at all.
            RenderErrorReason::ParamNotFoundForName(helper, _)
            | RenderErrorReason::ParamNotFoundForIndex(helper, _) => {
                return RenderError(format!(
                    "{at}{helper} was given no value: its argument is missing, misspelled, or \
                     a key this call lacks (write {{{{{helper} (default call.leadData.x \"\")}}}}, \
                     or test it with {{{{#if …}}}} first)"
                ))
            }
            RenderErrorReason::ParamTypeMismatchForName(helper, name, expected) => {
                let expected = if expected.starts_with('u') || expected.starts_with('i') {
                    "a whole number"
                } else {
                    expected.as_str()
                };
                return RenderError(format!(
                    "{at}{helper}: its argument {name} must be {expected}"
                ));
            }
            _ => return RenderError(e.to_string()),
        };
        RenderError(match path {
            Some(p) => format!(
                "{at}\"{p}\" is not in this call: a misspelled variable, or a key this call \
                 lacks (write {{{{default {p} \"…\"}}}}, or test it with {{{{#if {p}}}}}…{{{{/if}}}})"
            ),
            None => format!(
                "{at}a value this template reads is not in this call: a misspelled variable, \
                 or a key this call lacks (test it with {{{{#if …}}}} first)"
            ),
        })
    }
}

/// The template files behind an action, resolved for its channel type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    SlackText {
        text: String,
    },
    SlackBlocks {
        blocks: String,
        text: Option<String>,
    },
    Email {
        text: Option<String>,
        html: Option<String>,
    },
    Log {
        text: String,
    },
}

/// A rendered notification, ready for a channel to send.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    /// The JSON body POSTed to the Slack webhook.
    Slack {
        body: Value,
    },
    Email(EmailParts),
    Log {
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmailParts {
    /// Rendered recipients, not yet validated as addresses.
    pub to: Vec<String>,
    /// One line: line breaks are replaced by spaces.
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

pub struct Renderer {
    slack: Handlebars<'static>,
    slack_json: Handlebars<'static>,
    html: Handlebars<'static>,
    plain: Handlebars<'static>,
    /// For recipients only: a missing value renders empty and that recipient is skipped.
    lenient: Handlebars<'static>,
    names: BTreeSet<String>,
    dir: PathBuf,
    /// Each `to` entry's kind, worked out once (compiling the entry for every message made
    /// rendering an email 15 % slower). Bounded by the config's entries: a reload builds a new
    /// renderer.
    recipient_kinds: std::sync::RwLock<std::collections::HashMap<String, RecipientEntry>>,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("dir", &self.dir)
            .field("templates", &self.names)
            .finish()
    }
}

const BUILTINS: &[(&str, &str)] = &[
    (
        "builtin/quiet",
        ":warning: No calls received for {{call.quietFor}} (last call: {{call.lastCallAt}}). \
         Check that Air's webhook still points here and that its token is accepted.",
    ),
    (
        "builtin/resumed",
        ":white_check_mark: Calls are arriving again.",
    ),
    (
        "builtin/test",
        "callnotify test message: {{lead_name}}, {{duration_human}}, rule {{rule}}.",
    ),
];

/// Escapes a value for Slack mrkdwn: `&`, `<`, `>` become entities, and no `|` is left, since
/// inside a template's `<url|label>` a value's `|` would end the URL and start a label of the
/// value's choosing (`<https://crm.example/leads/{{id}}|Open>` with id `42|Verify payroll`).
/// Slack has no escape for `|`, so: in a value that is a URL (`http://` or `https://`, any
/// case, no whitespace) it is percent-encoded, `%7C`, which keeps the link working; in any
/// other value it becomes U+2223 `∣`, which reads the same and means nothing to Slack.
/// `@here`, `@channel` and `@everyone` get a word joiner (U+2060) after the `@`: Block Kit text
/// that is not `verbatim` parses such mentions even without `<!...>`, and a value must not ping.
pub fn escape_slack(s: &str) -> String {
    let is_url = ["https://", "http://"].iter().any(|scheme| {
        s.get(..scheme.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
    }) && !s.contains(char::is_whitespace);
    let mut out = String::with_capacity(s.len() + 8);
    for (i, c) in s.char_indices() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '|' if is_url => out.push_str("%7C"),
            '|' => out.push('\u{2223}'),
            '@' => {
                out.push('@');
                if is_mention(&s[..i], &s[i + 1..]) {
                    out.push('\u{2060}');
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether the `@` between `before` and `after` starts a `@here`, `@channel` or `@everyone`
/// that stands as a word: not an address or a domain (`jo@here.example`,
/// `reception@channel4.com`) nor a longer handle (`@channels`).
fn is_mention(before: &str, after: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    if before
        .chars()
        .next_back()
        .is_some_and(|c| word(c) || matches!(c, '.' | '+' | '@'))
    {
        return false;
    }
    ["here", "channel", "everyone"].iter().any(|m| {
        let Some(rest) = after
            .get(..m.len())
            .filter(|head| head.eq_ignore_ascii_case(m))
            .map(|_| &after[m.len()..])
        else {
            return false;
        };
        let mut next = rest.chars();
        match next.next() {
            Some(c) if word(c) => false,
            Some('.') => !next.next().is_some_and(|c| c.is_ascii_alphanumeric()),
            _ => true,
        }
    })
}

/// Escapes a value for the inside of a JSON string in a Block Kit template, after Slack escaping.
pub fn escape_slack_json(s: &str) -> String {
    let quoted = serde_json::to_string(&escape_slack(s)).unwrap_or_default();
    quoted[1..quoted.len() - 1].to_string()
}

/// Undoes the mrkdwn escaping in every `plain_text` object of a Block Kit body (a header, a
/// button's label, a plain section): Slack parses neither links nor mentions there, and shows
/// an entity as the entity, so a lead named `Tom & Jerry <x@y>` would read
/// `Tom &amp; Jerry &lt;x@y&gt;`. Raw text reads as written. `∣` goes back to `|`, which
/// relabels nothing where there are no links; the word joiner after `@here` stays, and one goes
/// after a `<` that would start `<!`, `<@` or `<#` (both are invisible). One pass, so a value
/// that itself spells `&amp;` still reads `&amp;`.
fn show_plain_text_as_written(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(show_plain_text_as_written),
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("plain_text") {
                if let Some(Value::String(text)) = map.get_mut("text") {
                    *text = unescape_slack(text);
                }
            }
            // A button's `url`, an image's `image_url` and `alt_text` are plain strings too:
            // `?a=1&amp;b=2` would be a broken link. Only entities are undone there (`%7C`
            // from a URL value is a valid way to write `|`), and the word joiner after an
            // `@here` goes: Slack looks for no mention there, and in
            // `https://social.example/@here` it made another address.
            for key in ["url", "image_url", "alt_text"] {
                if let Some(Value::String(text)) = map.get_mut(key) {
                    *text = unescape_entities(text).replace("@\u{2060}", "@");
                }
            }
            map.values_mut().for_each(show_plain_text_as_written);
        }
        _ => {}
    }
}

/// `&amp;`, `&lt;` and `&gt;` back to `&`, `<` and `>`, in one pass.
fn unescape_entities(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The inverse of [`escape_slack`] for text that Slack shows without parsing.
fn unescape_slack(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(['&', '\u{2223}']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let (plain, len) = if rest.starts_with('\u{2223}') {
            ('|', '\u{2223}'.len_utf8())
        } else if rest.starts_with("&amp;") {
            ('&', 5)
        } else if rest.starts_with("&lt;") {
            // Should Slack ever parse `<!here>`, `<@U1>` or `<#C1>` in plain text, an
            // invisible word joiner keeps such text from being one.
            if rest[4..].starts_with(['!', '@', '#']) {
                out.push_str("<\u{2060}");
                rest = &rest[4..];
                continue;
            }
            ('<', 4)
        } else if rest.starts_with("&gt;") {
            ('>', 4)
        } else {
            ('&', 1)
        };
        out.push(plain);
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

/// `end` (a char boundary of `s`), moved back to the start of the user-perceived character
/// (extended grapheme cluster, UAX #29) it falls in: a cut there never splits an emoji and its
/// skin tone or ZWJ sequence, a flag, a letter and its accents, a Devanagari or Thai syllable
/// with its vowel sign, or a Hangul syllable spelled in jamo. Only called when a cut is needed.
pub fn grapheme_start(s: &str, end: usize) -> usize {
    let mut cursor = unicode_segmentation::GraphemeCursor::new(end, s.len(), true);
    // The whole string is the one chunk, so the cursor never asks for more context.
    if cursor.is_boundary(s, 0).unwrap_or(true) {
        return end;
    }
    match cursor.prev_boundary(s, 0) {
        Ok(start) => start.unwrap_or(0),
        Err(_) => end,
    }
}

/// The longest prefix of `s` of at most `max` characters that ends between user-perceived
/// characters.
pub fn char_prefix(s: &str, max: usize) -> &str {
    let end = s.char_indices().nth(max).map_or(s.len(), |(i, _)| i);
    &s[..grapheme_start(s, end)]
}

/// Formats seconds as `44s`, `3m 07s`, `1h 02m`.
///
/// ```
/// assert_eq!(callnotify::render::duration_human(187.0), "3m 07s");
/// ```
pub fn duration_human(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A value as `{{value}}` prints it (a list as `[hot, roofing]`), so that a helper's output
/// reads like the variable's.
fn value_text(v: &Value) -> String {
    handlebars::JsonRender::render(v)
}

/// `{{duration call.duration}}`: seconds as "3m 07s". Without an argument, `{{duration}}` is the
/// `duration` variable, which the helper's name would otherwise hide: read where it stands, as
/// any variable is (a leg's own inside `{{#each legs}}`), and the call's seconds at the top level
/// or in a block that has no `duration`.
fn duration_helper<'reg, 'rc>(
    h: &Helper<'rc>,
    r: &'reg Handlebars<'reg>,
    ctx: &'rc Context,
    rc: &mut RenderContext<'reg, 'rc>,
    out: &mut dyn Output,
) -> HelperResult {
    let text = match h.param(0) {
        Some(p) => crate::payload::as_number(p.value())
            .map(duration_human)
            .unwrap_or_default(),
        // An error here is a block over an array of arrays, where "duration" is no index.
        None => match rc.evaluate(ctx, "duration") {
            Ok(own) if !own.is_missing() => value_text(own.as_json()),
            _ => value_text(&ctx.data()["duration"]),
        },
    };
    write_escaped(r, rc, out, &text)
}
handlebars_helper!(upper: |v: Json| value_text(v).to_uppercase());
handlebars_helper!(lower: |v: Json| value_text(v).to_lowercase());
handlebars_helper!(truncate: |v: Json, n: u64| {
    let s = value_text(v);
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if s.chars().count() <= n { s } else { format!("{}…", char_prefix(&s, n)) }
});
handlebars_helper!(last_lines: |v: Json, n: u64| {
    let s = value_text(v);
    let lines: Vec<&str> = s.lines().collect();
    let n = usize::try_from(n).unwrap_or(usize::MAX).min(lines.len());
    lines[lines.len() - n..].join("\n")
});

/// `{{default value "fallback"}}`: the fallback when the value is missing, null, empty or only
/// blanks, or an empty list or object (`tags: []`).
fn default_helper(
    h: &Helper<'_>,
    r: &Handlebars<'_>,
    _: &Context,
    rc: &mut RenderContext<'_, '_>,
    out: &mut dyn Output,
) -> HelperResult {
    let pick = |i: usize| {
        h.param(i)
            .map(|p| match p.value() {
                Value::Array(a) if a.is_empty() => String::new(),
                Value::Object(o) if o.is_empty() => String::new(),
                v => value_text(v),
            })
            .unwrap_or_default()
    };
    let v = pick(0);
    let text = if v.trim().is_empty() { pick(1) } else { v };
    write_escaped(r, rc, out, &text)
}

/// `{{date created_at "%Y-%m-%d %H:%M %Z" "Europe/Berlin"}}`; empty for a missing date, or one
/// outside the years -9999..=9999.
fn date_helper(
    h: &Helper<'_>,
    r: &Handlebars<'_>,
    _: &Context,
    rc: &mut RenderContext<'_, '_>,
    out: &mut dyn Output,
) -> HelperResult {
    let value = h
        .param(0)
        .map(|p| value_text(p.value()))
        .unwrap_or_default();
    let fmt = h
        .param(1)
        .map(|p| value_text(p.value()))
        .unwrap_or_else(|| "%Y-%m-%d %H:%M %Z".into());
    let tz_name = h
        .param(2)
        .map(|p| value_text(p.value()))
        .unwrap_or_else(|| "UTC".into());
    let Some(t) = parse_timestamp(&value) else {
        return Ok(());
    };
    let tz = time_zone(&tz_name)
        .ok_or_else(|| RenderErrorReason::Other(format!("date: unknown time zone {tz_name:?}")))?;
    // Outside the zone database's years the date is as unreadable as a malformed one.
    let Some(zone) = LocalOffset::at(&tz, t.timestamp_millis()) else {
        return Ok(());
    };
    let Some(local) = t.naive_utc().checked_add_offset(zone.fixed) else {
        return Ok(());
    };
    let items = chrono::format::StrftimeItems::new(&fmt);
    let mut s = String::new();
    use std::fmt::Write;
    let shown = chrono::format::DelayedFormat::new_with_offset(
        Some(local.date()),
        Some(local.time()),
        &zone,
        items,
    );
    write!(s, "{shown}")
        .map_err(|_| RenderErrorReason::Other(format!("date: bad format {fmt:?}")))?;
    write_escaped(r, rc, out, &s)
}

/// An IANA time zone by name in any case (`Europe/Berlin`, `utc`), from the system's zoneinfo
/// database (kept up to date by the OS), else from the copy built into the binary: a minimal
/// image (distroless, scratch) has no zoneinfo, and some systems leave out old names such as
/// `US/Eastern`. `UTC`
/// needs neither, so the shipped templates load no database.
///
/// Only names the built-in copy knows are zones, wherever the data comes from: the same names
/// pass `check` on every host, as with chrono-tz. A zoneinfo directory also holds files that are
/// not zones one names (`localtime` is the host's own zone, `posixrules`, `zone.tab`), and the
/// name can come from call data. jiff's own `Etc/Unknown` (UTC) is not an IANA zone either.
///
/// The built-in copy is TZif bytes read on demand; chrono-tz, used before, compiled every
/// transition into pointer-bearing statics that cost 1.4 MB of private memory in every process.
pub fn time_zone(name: &str) -> Option<jiff::tz::TimeZone> {
    time_zone_in(jiff::tz::db(), name)
}

fn time_zone_in(system: &jiff::tz::TimeZoneDatabase, name: &str) -> Option<jiff::tz::TimeZone> {
    if name.eq_ignore_ascii_case("UTC") {
        return Some(jiff::tz::TimeZone::UTC);
    }
    if !is_built_in_zone_name(name) {
        return None;
    }
    system
        .get(name)
        .or_else(|_| jiff::tz::TimeZoneDatabase::bundled().get(name))
        .ok()
}

fn is_built_in_zone_name(name: &str) -> bool {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let mut names: Vec<String> = jiff::tz::TimeZoneDatabase::bundled()
            .available()
            .map(|n| n.as_str().to_ascii_lowercase())
            .collect();
        names.sort_unstable();
        names
    });
    names.binary_search(&name.to_ascii_lowercase()).is_ok()
}

/// A zone's offset from UTC at one instant, with its abbreviation (`CET`, `EDT`), which is what
/// `%Z` prints.
#[derive(Debug, Clone)]
pub struct LocalOffset {
    pub fixed: chrono::FixedOffset,
    abbreviation: String,
}

impl LocalOffset {
    /// None outside the years jiff knows (-9999..=9999); chrono reads dates far beyond them.
    pub fn at(tz: &jiff::tz::TimeZone, unix_ms: i64) -> Option<LocalOffset> {
        let instant = jiff::Timestamp::from_millisecond(unix_ms).ok()?;
        let info = tz.to_offset_info(instant);
        Some(LocalOffset {
            fixed: chrono::FixedOffset::east_opt(info.offset().seconds())?,
            abbreviation: info.abbreviation().to_owned(),
        })
    }
}

impl chrono::Offset for LocalOffset {
    fn fix(&self) -> chrono::FixedOffset {
        self.fixed
    }
}

impl std::fmt::Display for LocalOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.abbreviation)
    }
}

/// Writes helper output through the registry's escaping, as `{{value}}` would be.
fn write_escaped(
    r: &Handlebars<'_>,
    rc: &RenderContext<'_, '_>,
    out: &mut dyn Output,
    text: &str,
) -> HelperResult {
    if rc.is_disable_escape() {
        out.write(text)?;
    } else {
        out.write(&r.get_escape_fn()(text))?;
    }
    Ok(())
}

fn lenient() -> Handlebars<'static> {
    let mut h = registry(no_escape);
    h.set_strict_mode(false);
    h
}

fn registry(escape: fn(&str) -> String) -> Handlebars<'static> {
    let mut h = Handlebars::new();
    h.set_strict_mode(true);
    h.register_escape_fn(escape);
    h.register_helper("duration", Box::new(duration_helper));
    h.register_helper("upper", Box::new(upper));
    h.register_helper("lower", Box::new(lower));
    h.register_helper("truncate", Box::new(truncate));
    h.register_helper("last_lines", Box::new(last_lines));
    h.register_helper("default", Box::new(default_helper));
    h.register_helper("date", Box::new(date_helper));
    h
}

/// Checks that an inline template (a subject) compiles; recipients go through
/// [`check_recipient`].
pub fn check_inline(s: &str) -> Result<(), String> {
    Template::compile(s)
        .map(|_| ())
        .map_err(|e| format!("template does not compile: {e}"))
}

pub use crate::payload::AIR_FIELDS;

/// The data every template sees, wrapped once for handlebars (rendering with a `&Value` would
/// deep-copy the whole call, transcript included, for every template).
pub fn context(call: &Call, rule: &str) -> Context {
    let mut raw = call.raw.clone();
    for f in AIR_FIELDS {
        if !raw.contains_key(*f) {
            raw.insert(f.to_string(), Value::Null);
        }
    }
    Context::from(json!({
        "call": raw,
        "event": call.event.as_str(),
        "rule": rule,
        "sid": call.sid,
        "lead_name": if call.lead_name.is_empty() { "Unknown caller" } else { call.lead_name.as_str() },
        // Whole seconds (Air's) print as `187`, not `187.0`.
        "duration": call.duration.map(|d| if d.fract() == 0.0 { json!(d as u64) } else { json!(d) }),
        "duration_human": call.duration.map(duration_human).unwrap_or_else(|| "unknown".into()),
        "recording_url": call.recording_url,
        "created_at": call.created_at.map(|t| t.to_rfc3339()),
    }))
}

impl Renderer {
    /// Compiles every `*.hbs` under `dir`; every file that does not compile is a problem.
    pub fn load(dir: &Path) -> Result<Renderer, Vec<Problem>> {
        let mut r = Renderer {
            slack: registry(escape_slack),
            slack_json: registry(escape_slack_json),
            html: registry(handlebars::html_escape),
            plain: registry(no_escape),
            lenient: lenient(),
            names: BTreeSet::new(),
            dir: dir.to_path_buf(),
            recipient_kinds: Default::default(),
        };
        let mut problems = Vec::new();
        r.register_builtins();
        let mut files = Vec::new();
        if let Err(e) = walk(dir, &mut files) {
            return Err(vec![Problem::new(
                "templates_dir",
                format!("cannot read {}: {e}", dir.display()),
            )]);
        }
        files.sort();
        for file in files {
            let rel = file.strip_prefix(dir).unwrap_or(&file);
            let rel = rel.to_string_lossy().replace('\\', "/");
            let Some(name) = rel.strip_suffix(".hbs") else {
                continue;
            };
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Problem::new(
                        file.display().to_string(),
                        format!("cannot read: {e}"),
                    ));
                    continue;
                }
            };
            if let Err(e) = r.register(name, &text) {
                problems.push(Problem::new(file.display().to_string(), e));
            }
        }
        if problems.is_empty() {
            Ok(r)
        } else {
            Err(problems)
        }
    }

    /// Registers one template under `name` in every registry.
    pub fn register(&mut self, name: &str, text: &str) -> Result<(), String> {
        for reg in [
            &mut self.slack,
            &mut self.slack_json,
            &mut self.html,
            &mut self.plain,
        ] {
            reg.register_template_string(name, text)
                .map_err(|e| format!("template does not compile: {e}"))?;
        }
        self.names.insert(name.to_string());
        Ok(())
    }

    /// [`recipient_entry`], remembered per entry.
    fn recipient_kind(&self, t: &str) -> Result<RecipientEntry, String> {
        let known = self
            .recipient_kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(t)
            .copied();
        if let Some(kind) = known {
            return Ok(kind);
        }
        let kind = recipient_entry(t)?;
        self.recipient_kinds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.to_string(), kind);
        Ok(kind)
    }

    /// A renderer with only the built-in templates, for tests that register their own.
    pub fn empty() -> Renderer {
        let mut r = Renderer {
            slack: registry(escape_slack),
            slack_json: registry(escape_slack_json),
            html: registry(handlebars::html_escape),
            plain: registry(no_escape),
            lenient: lenient(),
            names: BTreeSet::new(),
            dir: PathBuf::new(),
            recipient_kinds: Default::default(),
        };
        r.register_builtins();
        r
    }

    /// Messages the daemon sends on its own behalf (`builtin/...`): the quiet-period alert and
    /// the `send-test` fallback. A file of the same name under `templates_dir` overrides them.
    fn register_builtins(&mut self) {
        for (name, text) in BUILTINS {
            // Built-ins are constants that compile; a failure here is a bug caught by tests.
            let _ = self.register(name, text);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Finds the template files an action's `template` means for a channel type. A name
    /// written with its file's extension (`log/summary.hbs`) that finds nothing is told to
    /// leave it out, rather than left to puzzle over `log/summary.hbs.hbs`.
    pub fn resolve(&self, channel_type: &str, name: &str) -> Result<Resolved, String> {
        self.resolve_as_written(channel_type, name).map_err(|e| {
            let stem = name.strip_suffix(".hbs").map(|n| {
                [".json", ".txt", ".html"]
                    .iter()
                    .find_map(|kind| n.strip_suffix(kind))
                    .unwrap_or(n)
            });
            match stem {
                Some(stem) => format!(
                    "{e}; `template` names a template without its extension: write {stem:?}"
                ),
                None => e,
            }
        })
    }

    fn resolve_as_written(&self, channel_type: &str, name: &str) -> Result<Resolved, String> {
        let file = |n: &str| format!("{}/{n}.hbs", self.dir.display());
        let opt = |n: String| self.has(&n).then_some(n);
        match channel_type {
            "slack" => {
                let json = format!("{name}.json");
                if self.has(&json) {
                    Ok(Resolved::SlackBlocks {
                        blocks: json,
                        text: opt(name.to_string()),
                    })
                } else if self.has(name) {
                    Ok(Resolved::SlackText { text: name.into() })
                } else {
                    Err(format!("no template {} or {}", file(name), file(&json)))
                }
            }
            "email" => {
                let text = opt(format!("{name}.txt")).or_else(|| opt(name.to_string()));
                let html = opt(format!("{name}.html"));
                if text.is_none() && html.is_none() {
                    return Err(format!(
                        "no template {} (plain text) or {} (HTML)",
                        file(&format!("{name}.txt")),
                        file(&format!("{name}.html"))
                    ));
                }
                Ok(Resolved::Email { text, html })
            }
            _ => opt(name.to_string())
                .or_else(|| opt(format!("{name}.txt")))
                .map(|text| Resolved::Log { text })
                .ok_or_else(|| format!("no template {}", file(name))),
        }
    }

    /// Renders an action for a channel type against a template context.
    pub fn render(
        &self,
        channel_type: &str,
        action: &Action,
        ctx: &Context,
    ) -> Result<Message, RenderError> {
        match self
            .resolve(channel_type, &action.template)
            .map_err(RenderError)?
        {
            Resolved::SlackText { text } => {
                let text = self.slack.render_with_context(&text, ctx)?;
                Ok(Message::Slack {
                    body: json!({ "text": text }),
                })
            }
            Resolved::SlackBlocks { blocks, text } => {
                let raw = self.slack_json.render_with_context(&blocks, ctx)?;
                let mut body: Value = serde_json::from_str(&raw).map_err(|e| {
                    RenderError(format!("{blocks} did not render to valid JSON: {e}"))
                })?;
                if let Value::Array(_) = body {
                    body = json!({ "blocks": body });
                }
                show_plain_text_as_written(&mut body);
                let Value::Object(map) = &mut body else {
                    return Err(RenderError(format!(
                        "{blocks} must render to a JSON object or a list of blocks"
                    )));
                };
                if !map.contains_key("text") {
                    let fallback = match text {
                        Some(t) => self.slack.render_with_context(&t, ctx)?,
                        None => {
                            let data = ctx.data();
                            let lead = data["lead_name"].as_str().unwrap_or_default();
                            let dur = data["duration_human"].as_str().unwrap_or_default();
                            let rule = data["rule"].as_str().unwrap_or_default();
                            escape_slack(&format!("{rule}: {lead} ({dur})"))
                        }
                    };
                    map.insert("text".into(), Value::String(fallback));
                }
                Ok(Message::Slack { body })
            }
            Resolved::Email { text, html } => {
                let subject_tpl = action
                    .subject
                    .as_deref()
                    .unwrap_or("Call from {{lead_name}}");
                let subject = self.plain.render_template_with_context(subject_tpl, ctx)?;
                let subject = subject
                    .split(['\r', '\n'])
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut to = Vec::new();
                for t in &action.to {
                    let entry = self.recipient_kind(t).map_err(RenderError)?;
                    let rendered = self.lenient.render_template_with_context(t, ctx)?;
                    let trimmed = rendered.trim();
                    let listed = match entry {
                        // Kept whole even if a value put a comma in it: `recipients()` refuses
                        // it, so a value inside an address cannot add recipients.
                        RecipientEntry::One => {
                            if !trimmed.is_empty() {
                                to.push(trimmed.to_string());
                            }
                            continue;
                        }
                        RecipientEntry::Literal => trimmed,
                        // A JSON list in the call (`leadData.owners: ["a@x", "b@y"]`) renders
                        // as "[a@x, b@y]": its elements are the recipients.
                        RecipientEntry::List => trimmed
                            .strip_prefix('[')
                            .and_then(|r| r.strip_suffix(']'))
                            .unwrap_or(trimmed),
                    };
                    to.extend(
                        listed
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from),
                    );
                }
                let text = text
                    .map(|t| self.plain.render_with_context(&t, ctx))
                    .transpose()?;
                let html = html
                    .map(|h| self.html.render_with_context(&h, ctx))
                    .transpose()?;
                Ok(Message::Email(EmailParts {
                    to,
                    subject,
                    text,
                    html,
                }))
            }
            Resolved::Log { text } => Ok(Message::Log {
                text: self.plain.render_with_context(&text, ctx)?,
            }),
        }
    }
}

/// What one `to` entry may render to. Only the operator's own text, or a value that is the
/// whole entry, may list several addresses; a value inside an address
/// (`sales+{{call.campaignId}}@ourteam.example`) must not add recipients with a comma.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientEntry {
    /// No placeholders: a comma-separated list the config spells out.
    Literal,
    /// One placeholder and nothing else (`{{call.leadData.owners}}`): its value is the list,
    /// comma-separated or a JSON list.
    List,
    /// Text and placeholders, or several placeholders: exactly one address.
    One,
}

/// Compiles a `to` entry and says which kind it is.
pub fn recipient_entry(t: &str) -> Result<RecipientEntry, String> {
    Ok(recipient_parts(t)?.0)
}

/// [`recipient_entry`] for config validation: an entry that mixes text and placeholders and
/// whose own text holds a comma could never render to one address, so it is refused at load.
pub fn check_recipient(t: &str) -> Result<RecipientEntry, String> {
    match recipient_parts(t)? {
        (RecipientEntry::One, true) => Err("mixes text and placeholders and holds a comma, \
             but such an entry must render to one address: give each address its own entry"
            .into()),
        (entry, _) => Ok(entry),
    }
}

/// The entry's kind, and whether its own text (not a value) holds a comma.
fn recipient_parts(t: &str) -> Result<(RecipientEntry, bool), String> {
    use handlebars::template::TemplateElement::{Comment, Expression, HtmlExpression, RawString};
    let compiled = Template::compile(t).map_err(|e| format!("template does not compile: {e}"))?;
    let parts: Vec<_> = compiled
        .elements
        .iter()
        .filter(|e| match e {
            RawString(s) => !s.trim().is_empty(),
            Comment(_) => false,
            _ => true,
        })
        .collect();
    let entry = match parts.as_slice() {
        [Expression(_) | HtmlExpression(_)] => RecipientEntry::List,
        p if p.iter().all(|e| matches!(e, RawString(_))) => RecipientEntry::Literal,
        _ => RecipientEntry::One,
    };
    let comma = parts
        .iter()
        .any(|e| matches!(e, RawString(s) if s.contains(',')));
    Ok((entry, comma))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_call() -> Call {
        crate::payload::parse(include_bytes!(
            "../tests/fixtures/post_call_data_campaign.json"
        ))
        .unwrap()
    }

    fn action(template: &str) -> Action {
        Action {
            channel: "c".into(),
            template: template.into(),
            to: vec![],
            subject: None,
        }
    }

    #[test]
    fn durations_read_like_a_person_wrote_them() {
        assert_eq!(duration_human(44.0), "44s");
        assert_eq!(duration_human(187.0), "3m 07s");
        assert_eq!(duration_human(3720.0), "1h 02m");
        assert_eq!(duration_human(0.0), "0s");
    }

    #[test]
    fn the_duration_variable_is_not_hidden_by_the_duration_helper() {
        // `{{duration}}` names the helper as well as the documented `duration` variable.
        let mut r = Renderer::empty();
        r.register(
            "d",
            "{{duration}} / {{duration call.duration}} / {{duration_human}}",
        )
        .unwrap();
        let render = |call: &Call| match r.render("log", &action("d"), &context(call, "r")) {
            Ok(Message::Log { text }) => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(render(&fixture_call()), "187 / 3m 07s / 3m 07s");
        let mut call = fixture_call();
        call.duration = Some(2.5);
        assert_eq!(render(&call), "2.5 / 3m 07s / 3s");
        call.duration = None;
        assert_eq!(render(&call), " / 3m 07s / unknown");
    }

    #[test]
    fn duration_in_a_block_is_the_blocks_own() {
        let mut r = Renderer::empty();
        r.register(
            "d",
            "{{#each call.leadData.legs}}{{duration}} {{/each}}\
             | {{#with call.leadData.transfer}}{{duration}}{{/with}} \
             | {{#each call.leadData.tags}}{{duration}} {{/each}}\
             | {{#each call.leadData.grid}}{{duration}} {{/each}}\
             | {{duration}}",
        )
        .unwrap();
        let mut call = fixture_call();
        let lead_data = serde_json::json!({
            "legs": [{"duration": 30}, {"duration": 157.5}, {"duration": null}, {}],
            "transfer": {"duration": 12},
            "tags": ["a"],
            "grid": [[1]],
        });
        call.raw.insert("leadData".into(), lead_data);
        let text = match r.render("log", &action("d"), &context(&call, "r")) {
            Ok(Message::Log { text }) => text,
            other => panic!("{other:?}"),
        };
        // A leg without one, a string and an array have no `duration`: the call's is read.
        assert_eq!(text, "30 157.5  187 | 12 | 187 | 187 | 187");
    }

    #[test]
    fn slack_values_cannot_ping_or_relink() {
        assert_eq!(
            escape_slack("<!channel> & <@U1>"),
            "&lt;!channel&gt; &amp; &lt;@U1&gt;"
        );
        assert_eq!(
            escape_slack("https://x.example/a|evil"),
            "https://x.example/a%7Cevil"
        );
        assert_eq!(
            escape_slack("HTTPS://x.example/a|evil"),
            "HTTPS://x.example/a%7Cevil"
        );
        assert_eq!(escape_slack("Smith | Jones"), "Smith \u{2223} Jones");
        assert_eq!(escape_slack("42|Verify here"), "42\u{2223}Verify here");
        assert_eq!(escape_slack("https://x|a b"), "https://x\u{2223}a b");
        assert_eq!(escape_slack("|"), "\u{2223}");
        assert_eq!(escape_slack_json("a\"b\\c\n<"), "a\\\"b\\\\c\\n&lt;");
        assert_eq!(escape_slack_json("42|x\n"), "42\u{2223}x\\n");
        assert_eq!(escape_slack_json("Http://x/a|b"), "Http://x/a%7Cb");
        // Bare mentions, which Block Kit parses in text that is not verbatim, are broken up;
        // an email address or a handle is left alone.
        assert_eq!(
            escape_slack("hi @here, @Channel and @EVERYONE"),
            "hi @\u{2060}here, @\u{2060}Channel and @\u{2060}EVERYONE"
        );
        for untouched in [
            "jo@example.com @jordan",
            "reception@channel4.com",
            "jo@here.example",
            "@channels @hereafter",
            "https://www.youtube.com/@ChannelNewsAsia",
        ] {
            assert_eq!(escape_slack(untouched), untouched);
        }
        // A sentence's punctuation after the mention does not save it.
        assert_eq!(escape_slack("ping @here."), "ping @\u{2060}here.");
    }

    #[test]
    fn a_value_in_a_link_url_cannot_set_the_label() {
        let mut r = Renderer::empty();
        let link = "<https://crm.example.com/leads/{{call.leadData.id}}|Open {{lead_name}} in CRM>";
        r.register("t", link).unwrap();
        r.register(
            "b.json",
            &format!(
                r#"{{"blocks":[{{"type":"section","text":{{"type":"mrkdwn","text":"{link}"}}}}]}}"#
            ),
        )
        .unwrap();
        let payload = serde_json::json!({"call": {
            "sid": "CAlink", "cachedLeadName": "Bob",
            "leadData": {"id": "42|Your payroll is on hold - verify here"},
        }});
        let call = crate::payload::parse(payload.to_string().as_bytes()).unwrap();
        for (template, pointer) in [("t", "/text"), ("b", "/blocks/0/text/text")] {
            let Message::Slack { body } = r
                .render("slack", &action(template), &context(&call, "r"))
                .unwrap()
            else {
                panic!()
            };
            let text = body.pointer(pointer).and_then(Value::as_str).unwrap();
            assert_eq!(text.matches('|').count(), 1, "{text}");
            assert_eq!(
                text,
                "<https://crm.example.com/leads/42\u{2223}Your payroll is on hold - verify here|Open Bob in CRM>"
            );
        }
    }

    #[test]
    fn slack_text_template_escapes_values_but_keeps_its_own_links() {
        let mut r = Renderer::empty();
        r.register("s", "*{{lead_name}}* <{{recording_url}}|Listen>")
            .unwrap();
        let mut call = fixture_call();
        call.lead_name = "<!channel> Bob".into();
        let Message::Slack { body } = r
            .render("slack", &action("s"), &context(&call, "r"))
            .unwrap()
        else {
            panic!()
        };
        let text = body["text"].as_str().unwrap();
        assert!(
            text.starts_with("*&lt;!channel&gt; Bob* <https://api.twilio.com/"),
            "{text}"
        );
        assert!(text.ends_with("|Listen>"));
    }

    #[test]
    fn block_kit_template_yields_json_with_a_text_fallback() {
        let mut r = Renderer::empty();
        r.register(
            "b.json",
            r#"{"blocks":[{"type":"section","text":{"type":"mrkdwn","text":"{{lead_name}} said {{call.transcript}}"}}]}"#,
        )
        .unwrap();
        let mut call = fixture_call();
        call.lead_name = "Quote\" Back\\slash\nNewline <x>".into();
        let Message::Slack { body } = r
            .render("slack", &action("b"), &context(&call, "booked"))
            .unwrap()
        else {
            panic!()
        };
        let text = body["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(text.starts_with("Quote\" Back\\slash\nNewline &lt;x&gt; said BOT:"));
        assert_eq!(
            body["text"],
            "booked: Quote\" Back\\slash\nNewline &lt;x&gt; (3m 07s)"
        );
    }

    #[test]
    fn plain_text_objects_show_a_value_exactly_as_written() {
        let mut r = Renderer::empty();
        r.register(
            "b.json",
            r#"{"blocks":[
                {"type":"header","text":{"type":"plain_text","text":"Call with {{lead_name}}"}},
                {"type":"section","text":{"type":"plain_text","text":"{{lead_name}} | {{call.campaignId}}"},
                 "accessory":{"type":"button","text":{"type":"plain_text","text":"Open {{upper lead_name}}"},"url":"https://crm.example/"}},
                {"type":"context","elements":[{"type":"plain_text","text":"{{default call.leadData.nope lead_name}}"},
                                              {"type":"mrkdwn","text":"*{{lead_name}}*"}]}
            ]}"#,
        )
        .unwrap();
        let mut call = fixture_call();
        call.lead_name = "Tom & Jerry <x@y> | &amp; @here <!channel>".into();
        let Message::Slack { body } = r
            .render("slack", &action("b"), &context(&call, "r"))
            .unwrap()
        else {
            panic!()
        };
        let shown = "Tom & Jerry <x@y> | &amp; @\u{2060}here <\u{2060}!channel>";
        assert_eq!(
            body["blocks"][0]["text"]["text"],
            format!("Call with {shown}")
        );
        assert_eq!(body["blocks"][1]["text"]["text"], format!("{shown} | 8812"));
        assert_eq!(
            body["blocks"][1]["accessory"]["text"]["text"],
            "Open TOM & JERRY <X@Y> | &AMP; @\u{2060}HERE <\u{2060}!CHANNEL>"
        );
        assert_eq!(body["blocks"][2]["elements"][0]["text"], shown);
        // mrkdwn still needs the entities: there `<` starts a link or a mention.
        assert_eq!(
            body["blocks"][2]["elements"][1]["text"],
            "*Tom &amp; Jerry &lt;x@y&gt; \u{2223} &amp;amp; @\u{2060}here &lt;!channel&gt;*"
        );
    }

    #[test]
    fn no_field_and_no_helper_lets_a_value_ping_or_link() {
        let evil = "<!channel> <!here> @here @channel <@U123> <#C1> <!subteam^S1> \
                    <https://evil.example|click> | *b* _i_ ~s~ `c`";
        let mut v: Value = serde_json::from_slice(include_bytes!(
            "../tests/fixtures/post_call_data_campaign.json"
        ))
        .unwrap();
        for f in AIR_FIELDS
            .iter()
            .filter(|f| !["sid", "duration", "createdAt"].contains(f))
        {
            v["call"][f] = evil.into();
        }
        v["call"]["callRecordingUrl"] = "https://rec.example/a|evil>x".into();
        v["call"]["leadData"] = json!({"note": evil, evil: evil, "list": [evil, {"k": evil}]});
        let call = crate::payload::parse(v.to_string().as_bytes()).unwrap();
        let fields = [
            "lead_name",
            "sid",
            "event",
            "call.cachedLeadName",
            "call.transcript",
            "call.campaignId",
            "call.fromNumber",
            "call.llmAnsweredBy",
            "call.leadData.note",
            "call.leadData.list",
            "call.createdAt",
            "recording_url",
            "call.callRecordingUrl",
        ];
        let mut uses = Vec::new();
        for f in fields {
            uses.extend([
                format!("{{{{{f}}}}}"),
                format!("{{{{upper {f}}}}}"),
                format!("{{{{lower {f}}}}}"),
                format!("{{{{truncate {f} 40}}}}"),
                format!("{{{{last_lines {f} 2}}}}"),
                format!("{{{{default {f} \"x\"}}}}"),
                format!("{{{{default call.leadData.missing {f}}}}}"),
                format!("{{{{#if {f}}}}}{{{{{f}}}}}{{{{else}}}}-{{{{/if}}}}"),
                format!("{{{{date \"2024-01-01T00:00:00Z\" {f}}}}}"),
                format!("{{{{#with {f}}}}}{{{{this}}}}{{{{duration}}}}{{{{/with}}}}"),
            ]);
        }
        uses.push("{{#each call.leadData}}{{@key}}={{this}};{{/each}}".into());
        uses.push("{{lookup call.leadData \"note\"}} {{lookup call \"transcript\"}}".into());
        uses.push("{{#each call.leadData.list}}{{this}}{{@index}};{{/each}}".into());
        uses.push("{{call.leadData.list.[1].k}} {{duration call.transcript}}".into());
        let mut r = Renderer::empty();
        for (i, u) in uses.iter().enumerate() {
            r.register(
                &format!("t{i}"),
                &format!("<https://crm.example/{u}|Open> {u}"),
            )
            .unwrap();
            r.register(
                &format!("b{i}.json"),
                &format!(
                    r#"{{"blocks":[{{"type":"section","text":{{"type":"mrkdwn","text":"<https://crm.example/{u}|Open> {u}"}}}}]}}"#
                ),
            )
            .unwrap();
            for (name, pointer) in [
                (format!("t{i}"), "/text"),
                (format!("b{i}"), "/blocks/0/text/text"),
            ] {
                let Message::Slack { body } = r
                    .render("slack", &action(&name), &context(&call, "r"))
                    .unwrap_or_else(|e| panic!("{u}: {e}"))
                else {
                    panic!()
                };
                let text = body.pointer(pointer).and_then(Value::as_str).unwrap();
                // Only the template's own link: one `<`, one `|`, one `>`.
                for c in ['<', '|', '>'] {
                    assert_eq!(text.matches(c).count(), 1, "{c} from {u}: {text}");
                }
                assert!(
                    text.starts_with("<https://crm.example/") && text.contains("|Open> "),
                    "{u}: {text}"
                );
                let mention = ["@here", "@channel", "@HERE", "@CHANNEL"];
                assert!(!mention.iter().any(|m| text.contains(m)), "{u}: {text}");
            }
        }
    }

    #[test]
    fn shipped_templates_read_sensibly_when_the_call_lacks_fields() {
        let r = Renderer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")).unwrap();
        // No createdAt, recording, transcript, campaign, name or leadData.
        let bare =
            crate::payload::parse(br#"{"call": {"sid": "CAbare", "duration": 75}}"#).unwrap();
        let mut texts = Vec::new();
        for (kind, template) in [
            ("email", "email/booked"),
            ("slack", "slack/booked"),
            ("slack", "slack/summary"),
            ("log", "log/summary"),
            ("log", "log/long_call"),
        ] {
            match r
                .render(kind, &action(template), &context(&bare, "r"))
                .unwrap()
            {
                Message::Email(e) => texts.extend([e.text.unwrap(), e.html.unwrap()]),
                Message::Slack { body } => {
                    let mut all = vec![body.to_string()];
                    crate::notify::slack::fit(&mut body.clone());
                    if let Some(Value::Array(blocks)) = body.get("blocks") {
                        for b in blocks {
                            for f in b["fields"].as_array().into_iter().flatten() {
                                all.push(f["text"].as_str().unwrap().to_string());
                            }
                        }
                    }
                    texts.extend(all);
                }
                Message::Log { text } => texts.push(text),
            }
        }
        for text in &texts {
            for line in text.lines() {
                // "Started:   " or a Block Kit field "*Started*\n" with nothing after.
                let label_only = line.trim_end().ends_with(':')
                    && !line.ends_with("Last words:")
                    && !line.ends_with("(last lines):");
                assert!(!label_only, "a label with no value: {line:?} in\n{text}");
            }
            assert!(!text.ends_with("*\n") && !text.ends_with("*"), "{text}");
            for empty in [
                "<td></td>",
                "<pre></pre>",
                "Last words:\n\n",
                "(last lines):\n\n",
            ] {
                assert!(!text.contains(empty), "{empty} in\n{text}");
            }
            assert!(!text.trim_end().ends_with("Last words:"), "{text}");
            assert!(!text.trim_end().ends_with("(last lines):"), "{text}");
        }
        let mail = &texts[0];
        assert!(
            mail.contains("Started:   unknown\nRecording: none"),
            "{mail}"
        );
        assert!(mail.trim_end().ends_with("(no transcript)"), "{mail}");
        assert!(
            texts[1].contains("<td>Started</td><td>unknown</td>"),
            "{}",
            texts[1]
        );
        assert!(texts[1].contains("<p>No transcript.</p>"), "{}", texts[1]);
        assert!(texts.iter().any(|t| t == "*Started*\nunknown"), "{texts:?}");
    }

    #[test]
    fn a_button_url_keeps_its_ampersands() {
        let mut r = Renderer::empty();
        r.register(
            "b.json",
            r#"{"blocks":[
                {"type":"actions","elements":[{"type":"button","text":{"type":"plain_text","text":"Listen"},"url":"{{recording_url}}"}]},
                {"type":"image","image_url":"{{call.leadData.photo}}","alt_text":"{{lead_name}}"},
                {"type":"section","text":{"type":"mrkdwn","text":"<{{recording_url}}|Listen>"}}
            ]}"#,
        )
        .unwrap();
        let mut call = fixture_call();
        call.recording_url = Some("https://rec.example/r?a=1&b=<2>|3".into());
        call.lead_name = "Tom & Jerry".into();
        call.raw["leadData"]["photo"] = "https://img.example/p.png?w=1&amp;h=2".into();
        let Message::Slack { body } = r
            .render("slack", &action("b"), &context(&call, "r"))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            body["blocks"][0]["elements"][0]["url"],
            "https://rec.example/r?a=1&b=<2>%7C3"
        );
        // A value that itself spells an entity keeps it.
        assert_eq!(
            body["blocks"][1]["image_url"],
            "https://img.example/p.png?w=1&amp;h=2"
        );
        assert_eq!(body["blocks"][1]["alt_text"], "Tom & Jerry");
        // In mrkdwn Slack reads the entities itself.
        assert_eq!(
            body["blocks"][2]["text"]["text"],
            "<https://rec.example/r?a=1&amp;b=&lt;2&gt;%7C3|Listen>"
        );
    }

    #[test]
    fn a_missing_variable_is_named_with_where_it_is_and_what_to_do() {
        let mut r = Renderer::empty();
        let cases = [
            (
                "slack/a",
                "Hi\n  {{lead_nmae}}",
                "lead_nmae",
                "line 2, col 3",
            ),
            (
                "slack/b",
                "{{upper call.leadData.nope}}",
                "call.leadData.nope",
                "line 1, col 1",
            ),
            (
                "slack/c",
                "{{#each call.leadData.nope}}x{{/each}}",
                "call.leadData.nope",
                "line 1, col 1",
            ),
            (
                "slack/d",
                "{{#with call.leadData.nope}}x{{/with}}",
                "call.leadData.nope",
                "line 1, col 1",
            ),
            (
                "slack/e",
                "{{lookup call.leadData \"nope\"}}",
                "",
                "line 1, col 1",
            ),
            (
                "slack/f",
                "{{truncate lead_name \"ten\"}}",
                "",
                "line 1, col 1",
            ),
        ];
        for (name, text, _, _) in cases {
            r.register(name, text).unwrap();
        }
        for (name, _, var, at) in cases {
            let err = r
                .render("slack", &action(name), &context(&fixture_call(), "r"))
                .unwrap_err()
                .0;
            assert!(err.contains(name) && err.contains(at), "{err}");
            assert!(!err.contains("Some(") && !err.contains("None"), "{err}");
            assert!(!err.contains("Helper/Decorator"), "{err}");
            if name == "slack/b" {
                assert!(err.contains("upper was given no value"), "{err}");
                assert!(
                    err.contains("{{upper (default call.leadData.x \"\")}}"),
                    "{err}"
                );
            } else if name == "slack/f" {
                assert!(
                    err.ends_with("truncate: its argument n must be a whole number"),
                    "{err}"
                );
            } else if !var.is_empty() {
                assert!(
                    err.contains(&format!("\"{var}\" is not in this call")),
                    "{err}"
                );
                assert!(err.contains(&format!("{{{{default {var} \"")), "{err}");
            }
        }
    }

    #[test]
    fn default_takes_the_fallback_for_blank_values_and_empty_lists() {
        let mut r = Renderer::empty();
        r.register(
            "l",
            "{{default call.leadData.company \"unknown\"}}|{{default call.leadData.tags \"none\"}}|\
             {{default call.leadData.extra \"none\"}}|{{default call.leadData.hot \"none\"}}|\
             {{call.leadData.hot}}|{{default call.leadData.hot \"none\"}}|{{upper call.leadData.hot}}|\
             {{default call.leadData.zero \"none\"}}",
        )
        .unwrap();
        let mut call = fixture_call();
        call.raw.insert(
            "leadData".into(),
            json!({"company": "  \n", "tags": [], "extra": {}, "hot": ["a", "b"], "zero": 0}),
        );
        let text = match r.render("log", &action("l"), &context(&call, "r")).unwrap() {
            Message::Log { text } => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(text, "unknown|none|none|[a, b]|[a, b]|[a, b]|[A, B]|0");
    }

    #[test]
    fn truncate_never_cuts_an_emoji_in_half() {
        let mut r = Renderer::empty();
        r.register(
            "l",
            "{{truncate call.leadData.note 4}}|{{truncate call.leadData.note 6}}|{{truncate call.leadData.note 9}}",
        )
        .unwrap();
        let mut call = fixture_call();
        // "ok " and a family emoji of 5 code points.
        let note = "ok \u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467} bye";
        call.raw.insert("leadData".into(), json!({ "note": note }));
        let text = match r.render("log", &action("l"), &context(&call, "r")).unwrap() {
            Message::Log { text } => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            text,
            "ok …|ok …|ok \u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467} …"
        );
        // Four code points would have been "ok " and a lone woman.
        assert_eq!(char_prefix(note, 4), "ok ");
    }

    #[test]
    fn cuts_fall_between_grapheme_clusters_in_every_script() {
        // Each case: text, and what a cut after "ab" and one more character keeps. The first
        // four were split by the hand-written approximation this replaced, which knew only
        // combining accents, emoji modifiers, ZWJ and flags.
        let cases = [
            ("ab\u{0915}\u{093F}cd", "ab"), // कि: KA + vowel sign I (a SpacingMark)
            ("ab\u{1100}\u{1161}\u{11A8}cd", "ab"), // 각 as Hangul jamo L + V + T
            ("ab\u{0628}\u{064E}cd", "ab"), // بَ: BEH + FATHA (a haraka)
            ("ab\u{0E01}\u{0E33}cd", "ab"), // กำ: KO KAI + SARA AM
            ("ab\u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467}cd", "ab"), // 👩‍👩‍👧
            ("ab\u{1F44D}\u{1F3FD}cd", "ab"), // 👍🏽
            ("ab\u{1F1E9}\u{1F1EA}\u{1F1EB}\u{1F1F7}", "ab"), // 🇩🇪🇫🇷
            ("abe\u{0301}cd", "ab"),        // é as e + combining acute
            ("ab1\u{FE0F}\u{20E3}cd", "ab"), // 1️⃣ keycap
            ("abcd", "abc"),
        ];
        for (text, kept) in cases {
            assert_eq!(char_prefix(text, 3), kept, "{text:?}");
        }
        // A whole cluster that fits is kept, and the cut never moves past one.
        assert_eq!(char_prefix("ab\u{0915}\u{093F}cd", 4), "ab\u{0915}\u{093F}");
        assert_eq!(
            char_prefix("ab\u{1100}\u{1161}\u{11A8}cd", 4),
            "ab",
            "L + V is still not the syllable"
        );
        assert_eq!(
            char_prefix("ab\u{1F1E9}\u{1F1EA}\u{1F1EB}\u{1F1F7}", 5),
            "ab\u{1F1E9}\u{1F1EA}"
        );
        assert_eq!(char_prefix("\u{0915}\u{093F}", 1), "");
        assert_eq!(char_prefix("abc", 10), "abc");

        // What a template's truncate shows: whole syllables, never a bare consonant.
        let mut r = Renderer::empty();
        r.register("l", "{{truncate call.leadData.note 3}}")
            .unwrap();
        let mut call = fixture_call();
        call.raw.insert(
            "leadData".into(),
            json!({ "note": "\u{0915}\u{093F}\u{0924}\u{093E}\u{092C}" }), // किताब
        );
        let text = match r.render("log", &action("l"), &context(&call, "r")).unwrap() {
            Message::Log { text } => text,
            other => panic!("{other:?}"),
        };
        // किताब cut at 3 characters: कि and then त without its vowel sign ा would split.
        assert_eq!(text, "\u{0915}\u{093F}…");
    }

    #[test]
    fn strict_mode_catches_a_misspelled_variable() {
        let mut r = Renderer::empty();
        r.register("s", "{{lead_nmae}}").unwrap();
        let err = r
            .render("slack", &action("s"), &context(&fixture_call(), "r"))
            .unwrap_err();
        assert!(err.0.contains("lead_nmae"), "{err}");
    }

    /// Template `name` rendered for the log channel with the fixture call.
    fn log_text(r: &Renderer, name: &str) -> String {
        match r
            .render("log", &action(name), &context(&fixture_call(), "r"))
            .unwrap()
        {
            Message::Log { text } => text,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn helpers_cover_what_template_authors_need() {
        let mut r = Renderer::empty();
        r.register(
            "l",
            "{{duration call.duration}}|{{upper lead_name}}|{{lower \"ABC\"}}|{{truncate lead_name 5}}|\
             {{default call.leadData.missing \"n/a\"}}|{{default call.campaignId \"none\"}}|\
             {{date call.createdAt \"%Y-%m-%d %H:%M\" \"America/New_York\"}}|{{last_lines call.transcript 1}}",
        )
        .unwrap();
        let text = log_text(&r, "l");
        assert_eq!(
            text,
            "3m 07s|MARIA GONZALEZ|abc|Maria…|n/a|8812|2024-03-05 11:40|BOT: Which one works best for you?\""
        );
    }

    #[test]
    fn date_names_the_zone_by_its_abbreviation_in_summer_and_winter() {
        let mut r = Renderer::empty();
        r.register(
            "l",
            "{{date \"2024-07-01T12:00:00Z\" \"%H:%M %Z\" \"Europe/Berlin\"}}|\
             {{date \"2024-01-01T12:00:00Z\" \"%H:%M %Z\" \"Europe/Berlin\"}}|\
             {{date \"2024-07-01T12:00:00Z\" \"%H:%M %Z %z\" \"America/New_York\"}}|\
             {{date \"2024-07-01 12:00:00+00\" \"%H:%M %Z\" \"utc\"}}",
        )
        .unwrap();
        let text = log_text(&r, "l");
        assert_eq!(text, "14:00 CEST|13:00 CET|08:00 EDT -0400|12:00 UTC");

        r.register("bad", "{{date call.createdAt \"%H\" \"Europe/Nowhere\"}}")
            .unwrap();
        let err = r
            .render("log", &action("bad"), &context(&fixture_call(), "r"))
            .unwrap_err();
        assert!(
            err.0.contains("unknown time zone \"Europe/Nowhere\""),
            "{err}"
        );
    }

    #[test]
    fn a_date_at_the_end_of_chronos_range_renders_empty_instead_of_panicking() {
        // The call's createdAt is the caller's: chrono reads years up to 262142, jiff's zones
        // know -9999..=9999. East of UTC the local time would pass chrono's end.
        let mut r = Renderer::empty();
        r.register(
            "l",
            "[{{date \"+262142-12-31T23:59:59Z\" \"%Y %H %Z\" \"Europe/Berlin\"}}]\
             [{{date \"+20000-07-01T12:00:00Z\" \"%H %Z\" \"America/New_York\"}}]\
             [{{date \"9999-12-30T20:00:00Z\" \"%Y-%m-%d %H %Z\" \"Asia/Tokyo\"}}]",
        )
        .unwrap();
        assert_eq!(log_text(&r, "l"), "[][][9999-12-31 05 JST]");
    }

    #[test]
    fn a_zone_the_system_database_lacks_comes_from_the_built_in_copy() {
        let none = jiff::tz::TimeZoneDatabase::none();
        let berlin = time_zone_in(&none, "Europe/Berlin").expect("built in");
        let july = LocalOffset::at(&berlin, 1_719_835_200_000).unwrap(); // 2024-07-01T12:00:00Z
        assert_eq!(
            (july.fixed.local_minus_utc(), july.to_string()),
            (7200, "CEST".into())
        );
        // An old alias, as some systems no longer install them.
        assert!(time_zone_in(&none, "US/Eastern").is_some());
        assert!(time_zone_in(&none, "Europe/Nowhere").is_none());
    }

    /// A one-type TZif file: always `utoff` seconds east of UTC, called `abbr` (three letters).
    fn tzif(utoff: i32, abbr: &str) -> Vec<u8> {
        let mut b = b"TZif\0".to_vec(); // version 1: no 64-bit block, no footer
        b.extend([0; 15]);
        for count in [0u32, 0, 0, 0, 1, 4] {
            b.extend(count.to_be_bytes());
        }
        b.extend(utoff.to_be_bytes());
        b.extend([0, 0]);
        b.extend(abbr.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn only_iana_names_are_zones_whatever_the_system_directory_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("Europe")).unwrap();
        // Newer rules from the system win over the built-in copy for a real name ...
        std::fs::write(dir.path().join("Europe/Berlin"), tzif(3600, "SYS")).unwrap();
        // ... but these are files of a zoneinfo directory, not zones: `localtime` is the host's
        // own zone, and neither exists in a container without tzdata, where `check` would fail.
        std::fs::write(dir.path().join("localtime"), tzif(7200, "LOC")).unwrap();
        std::fs::write(dir.path().join("posixrules"), tzif(7200, "LOC")).unwrap();
        std::fs::write(
            dir.path().join("zone.tab"),
            "DE\t+5230+01322\tEurope/Berlin\n",
        )
        .unwrap();
        let system = jiff::tz::TimeZoneDatabase::from_dir(dir.path()).unwrap();

        let berlin = time_zone_in(&system, "europe/berlin").expect("any case");
        assert_eq!(LocalOffset::at(&berlin, 0).unwrap().to_string(), "SYS");
        for name in [
            "localtime",
            "posixrules",
            "zone.tab",
            "Etc/Unknown",
            "",
            "../Europe/Berlin",
        ] {
            assert!(time_zone_in(&system, name).is_none(), "{name:?}");
        }
        let tokyo = time_zone_in(&system, "Asia/Tokyo").expect("built in");
        assert_eq!(LocalOffset::at(&tokyo, 0).unwrap().to_string(), "JST");
    }

    #[test]
    fn a_list_of_addresses_in_the_call_gives_one_recipient_each() {
        let mut r = Renderer::empty();
        r.register("e.txt", "hi").unwrap();
        let call = crate::payload::parse(
            br#"{"call": {"sid": "CAlist", "leadData": {"owners": ["a@example.com", "b@example.com"], "one": ["c@example.com"]}}}"#,
        )
        .unwrap();
        let a = Action {
            channel: "m".into(),
            template: "e".into(),
            to: vec![
                "{{call.leadData.owners}}".into(),
                " {{call.leadData.one}} ".into(),
                "d@[192.0.2.1]".into(),
            ],
            subject: None,
        };
        let Message::Email(e) = r.render("email", &a, &context(&call, "r")).unwrap() else {
            panic!()
        };
        assert_eq!(
            e.to,
            [
                "a@example.com",
                "b@example.com",
                "c@example.com",
                "d@[192.0.2.1]"
            ]
        );
    }

    #[test]
    fn a_value_inside_an_address_cannot_add_recipients() {
        let mut r = Renderer::empty();
        r.register("e.txt", "hi").unwrap();
        let call = crate::payload::parse(
            br#"{"call": {"sid": "CAinject", "campaignId": "x@evil.example, y", "leadData": {"owners": "a@example.com, b@example.com"}}}"#,
        )
        .unwrap();
        let a = Action {
            channel: "m".into(),
            template: "e".into(),
            to: vec![
                "sales+{{call.campaignId}}@ourteam.example".into(),
                "{{call.leadData.owners}}".into(),
                "a@example.com, c@example.com".into(),
            ],
            subject: None,
        };
        let Message::Email(e) = r.render("email", &a, &context(&call, "r")).unwrap() else {
            panic!()
        };
        let (good, bad) = crate::notify::email::recipients(&e.to);
        let good: Vec<String> = good.iter().map(|m| m.email.to_string()).collect();
        assert_eq!(
            good,
            [
                "a@example.com",
                "b@example.com",
                "a@example.com",
                "c@example.com"
            ]
        );
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].contains("sales+x@evil.example, y@ourteam.example")
                && bad[0].contains("holds a comma"),
            "{bad:?}"
        );
    }

    #[test]
    fn only_a_lone_placeholder_or_plain_text_may_list_recipients() {
        use RecipientEntry::*;
        let kind = |t: &str| check_recipient(t);
        assert_eq!(kind("a@x.example, b@x.example"), Ok(Literal));
        assert_eq!(kind(" {{call.leadData.owners}} "), Ok(List));
        assert_eq!(kind("{{{call.leadData.owners}}}"), Ok(List));
        assert_eq!(
            kind(r#"{{default call.leadData.owner "team@x.example"}}"#),
            Ok(List)
        );
        assert_eq!(kind("sales+{{call.campaignId}}@x.example"), Ok(One));
        assert_eq!(kind("{{call.a}}{{call.b}}"), Ok(One));
        assert_eq!(kind("{{#if call.a}}a@x.example{{/if}}"), Ok(One));
        let err = kind("a@x.example, {{call.leadData.owner}}").unwrap_err();
        assert!(err.contains("its own entry"), "{err}");
        assert_eq!(
            recipient_entry("a@x.example, {{call.leadData.owner}}"),
            Ok(One)
        );
        assert!(kind("{{call.a").is_err());
    }

    #[test]
    fn email_subject_is_one_line_and_recipients_are_templated() {
        let mut r = Renderer::empty();
        r.register("e.txt", "Hi {{lead_name}} <b>").unwrap();
        r.register("e.html", "<p>{{lead_name}}</p>").unwrap();
        let mut call = fixture_call();
        call.lead_name = "Eve\r\nBcc: x@evil.example <script>".into();
        let a = Action {
            channel: "m".into(),
            template: "e".into(),
            to: vec!["a@example.com".into(), "{{call.leadData.owner}}".into()],
            subject: Some("Booked: {{lead_name}}".into()),
        };
        let Message::Email(e) = r.render("email", &a, &context(&call, "r")).unwrap() else {
            panic!()
        };
        assert_eq!(e.subject, "Booked: Eve Bcc: x@evil.example <script>");
        assert_eq!(e.to, ["a@example.com", "jordan@ourteam.example"]);
        assert_eq!(
            e.text.as_deref(),
            Some("Hi Eve\r\nBcc: x@evil.example <script> <b>")
        );
        assert_eq!(
            e.html.as_deref(),
            Some("<p>Eve\r\nBcc: x@evil.example &lt;script&gt;</p>")
        );
    }

    #[test]
    fn resolve_names_the_files_it_looked_for() {
        let r = Renderer::empty();
        let err = r.resolve("slack", "slack/nope").unwrap_err();
        assert!(
            err.contains("slack/nope.hbs") && err.contains("slack/nope.json.hbs"),
            "{err}"
        );
        assert!(!err.contains("extension"), "{err}");
        for (channel_type, written) in [
            ("log", "log/summary.hbs"),
            ("slack", "slack/summary.json.hbs"),
            ("email", "email/booked.txt.hbs"),
        ] {
            let err = r.resolve(channel_type, written).unwrap_err();
            let stem = written.split('.').next().unwrap();
            assert!(
                err.ends_with(&format!("without its extension: write {stem:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_url_value_with_an_at_mention_in_its_path_is_kept_as_sent() {
        let mut r = Renderer::empty();
        r.register(
            "b.json",
            r#"{"blocks":[
                {"type":"actions","elements":[{"type":"button","text":{"type":"plain_text","text":"Profile"},"url":"{{call.leadData.profile}}"}]},
                {"type":"image","image_url":"{{call.leadData.profile}}/avatar.png","alt_text":"{{call.leadData.profile}}"},
                {"type":"section","text":{"type":"mrkdwn","text":"{{call.leadData.profile}}"}}
            ]}"#,
        )
        .unwrap();
        let mut call = fixture_call();
        let profile = "https://social.example/@here?tab=posts&lang=en";
        call.raw["leadData"]["profile"] = profile.into();
        let Message::Slack { body } = r
            .render("slack", &action("b"), &context(&call, "r"))
            .unwrap()
        else {
            panic!()
        };
        // The button led to https://social.example/@%E2%81%A0here: a word joiner in the path.
        assert_eq!(body["blocks"][0]["elements"][0]["url"], profile);
        assert_eq!(
            body["blocks"][1]["image_url"],
            format!("{profile}/avatar.png")
        );
        assert_eq!(body["blocks"][1]["alt_text"], profile);
        // In mrkdwn, which Slack parses, the value still cannot ping.
        assert_eq!(
            body["blocks"][2]["text"]["text"],
            "https://social.example/@\u{2060}here?tab=posts&amp;lang=en"
        );
    }
}
