//! The YAML config: layered load, `${VAR}` expansion, validation into a ready-to-use [`Config`].
//!
//! Loading goes file -> `CALLNOTIFY_*` environment overrides (through the `config` crate) ->
//! `${VAR}` / `${VAR:-default}` expansion in every string (an unset variable is a problem, or, for
//! the commands that send nothing, a placeholder shaped for its setting) -> strict
//! deserialisation of each section on its own (unknown keys are errors) -> validation (addresses,
//! URLs, rules, templates).
//! Every problem found is reported at once, each with the place it was found.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use lettre::message::Mailbox;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::render::Renderer;
use crate::rules::{self, Action, Rule};
pub use crate::store::Durability;

/// Environment variables that configure the binary itself (or its build: `CALLNOTIFY_NO_RELR`,
/// which `cargo run` passes on) and are not config overrides.
const NOT_OVERRIDES: &[&str] = &[
    "CALLNOTIFY_CONFIG",
    "CALLNOTIFY_LOG_FORMAT",
    "CALLNOTIFY_LOG_LEVEL",
    "CALLNOTIFY_NO_RELR",
];

/// One thing wrong with a config, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A path into the config such as `rules[0].when.duration`, or a file name.
    pub at: String,
    pub message: String,
}

impl Problem {
    pub fn new(at: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            at: at.into(),
            message: message.into(),
        }
    }
}

/// How an unset variable's problem ends; see [`Problem::is_unset_variable`].
const NOT_SET: &str = "is not set: set it in the daemon's environment";

impl Problem {
    /// Whether this is an unset `${VAR}` (which `check --without-secrets` would let pass).
    pub fn is_unset_variable(&self) -> bool {
        self.message.starts_with("environment variable ") && self.message.contains(NOT_SET)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Every problem found in a config; the daemon refuses to start on any.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{} has {} problem{}:",
            self.source.display(),
            n,
            if n == 1 { "" } else { "s" }
        )?;
        // A problem of several lines (a regex error draws its pattern and a caret) stays
        // indented under its dash, so its last line does not read as an error of its own.
        for p in &self.problems {
            write!(f, "\n  - {}", p.to_string().replace('\n', "\n    "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The validated config the daemon runs on. Cheap to share behind an `Arc`; a reload builds a
/// new one and swaps it in whole.
#[derive(Debug)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub store: StoreConfig,
    pub delivery: DeliveryConfig,
    pub channels: IndexMap<String, Channel>,
    pub rules: Vec<Rule>,
    pub quiet_alert: Option<QuietAlertConfig>,
    pub templates: Arc<Renderer>,
    /// Legal but risky settings, logged at start-up (an open webhook endpoint, for example).
    pub warnings: Vec<String>,
    /// The unset `${VAR}`s a placeholder stood in for ([`Unset::Placeholder`]); always empty
    /// for a config the daemon runs on.
    pub placeholders: Vec<Placeholder>,
    /// The `CALLNOTIFY_*` variables that set a setting over the file, each with the setting
    /// (`("CALLNOTIFY_SERVER__LISTEN", "server.listen")`), for start-up and `check` to name:
    /// an image's or a unit's environment silently winning over the file is a puzzle otherwise.
    pub overrides: Vec<(String, String)>,
}

impl Config {
    /// The settings the environment set over the file, `server.listen (CALLNOTIFY_SERVER__LISTEN),
    /// ...`, names only (a token's value is a secret); None when there are none.
    pub fn overridden(&self) -> Option<String> {
        (!self.overrides.is_empty()).then(|| {
            self.overrides
                .iter()
                .map(|(var, at)| format!("{at} ({var})"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

/// What loading does with a `${VAR}` that is unset and has no fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unset {
    /// A problem: the daemon must not run without its secrets.
    Refuse,
    /// A placeholder shaped for its field, so that everything else can be checked and rendered
    /// where the secrets are absent (CI, a laptop). Only for commands that send nothing.
    Placeholder,
}

/// An unset variable, where it is used, and what stood in for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    pub var: String,
    /// The setting it is used in, such as `channels.sales.webhook_url`.
    pub at: String,
    /// Not a secret: made from the variable's name alone.
    pub value: String,
}

#[derive(Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub webhook_path: String,
    /// Bearer tokens accepted; empty means the endpoint is open.
    pub tokens: Vec<SecretString>,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    /// Reload when the config file or a template changes.
    pub watch_config: bool,
}

#[derive(Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Durability,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Waits between attempts; the last one repeats.
    pub retry_schedule: Vec<Duration>,
    pub give_up_after: Duration,
    pub shutdown_grace: Duration,
    pub keep_delivered: Duration,
    pub request_timeout: Duration,
}

#[derive(Debug)]
pub struct QuietAlertConfig {
    pub after: Duration,
    pub channel: String,
    /// Recipients when the channel is an email channel.
    pub to: Vec<String>,
    /// Local business hours (start, end) in `tz`; None means around the clock.
    pub hours: Option<(chrono::NaiveTime, chrono::NaiveTime)>,
    pub days: Vec<chrono::Weekday>,
    pub tz: jiff::tz::TimeZone,
}

#[derive(Debug)]
pub struct Channel {
    pub name: String,
    pub kind: ChannelKind,
    /// Messages per second to this destination; 0 = unpaced.
    pub max_per_second: f64,
    pub burst: u32,
    /// Deliveries in flight at once for this channel (1: one at a time, oldest first).
    pub concurrency: usize,
}

#[derive(Debug)]
pub enum ChannelKind {
    Log { file: Option<PathBuf> },
    Slack { webhook_url: SecretString },
    Email { smtp: SmtpConfig, from: Mailbox },
}

impl ChannelKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            ChannelKind::Log { .. } => "log",
            ChannelKind::Slack { .. } => "slack",
            ChannelKind::Email { .. } => "email",
        }
    }

    /// The key that destinations sharing a rate limit have in common.
    pub fn pacing_key(&self, channel: &str) -> String {
        match self {
            ChannelKind::Slack { webhook_url } => webhook_url.expose_secret().to_string(),
            ChannelKind::Email { smtp, .. } => format!("smtp://{}:{}", smtp.host, smtp.port),
            ChannelKind::Log { .. } => format!("log:{channel}"),
        }
    }

    /// The key of what a destination's request to wait holds back: Slack's `Retry-After` holds
    /// the webhook (its pacing key); a refused SMTP login holds that login on that server, not
    /// another channel's mail to the same server under a login of its own.
    pub fn pause_key(&self, channel: &str) -> String {
        match self {
            ChannelKind::Email { smtp, .. } => format!(
                "smtp://{}@{}:{}",
                smtp.username.as_deref().unwrap_or_default(),
                smtp.host,
                smtp.port
            ),
            _ => self.pacing_key(channel),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

// ---------------------------------------------------------------------------------------------
// Raw, strict serde structs: what the YAML may say.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_webhook_path")]
    webhook_path: String,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    body_read_timeout: Duration,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    watch_config: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_store_path")]
    path: PathBuf,
    #[serde(default)]
    synchronous: Durability,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    #[serde(default = "default_retry_schedule", deserialize_with = "durations")]
    retry_schedule: Vec<Duration>,
    #[serde(default = "default_give_up", with = "humantime_serde")]
    give_up_after: Duration,
    #[serde(default = "default_grace", with = "humantime_serde")]
    shutdown_grace: Duration,
    #[serde(default = "default_keep", with = "humantime_serde")]
    keep_delivered: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    request_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuietAlert {
    #[serde(with = "humantime_serde")]
    after: Duration,
    channel: String,
    /// "09:00-17:00"
    #[serde(default)]
    hours: Option<String>,
    /// ["mon", "tue", ...]; default every day
    #[serde(default)]
    days: Vec<String>,
    #[serde(default = "default_tz")]
    timezone: String,
    #[serde(default)]
    to: Vec<String>,
}

/// A channel as the YAML says it: its `type` picks the struct the other keys must fit. Read by
/// [`channel_section`], not by a serde tagged enum, which loses the path to a mistyped key
/// (`channels.sales` instead of `channels.sales.max_per_second`).
#[derive(Debug)]
enum RawChannel {
    Log(RawLog),
    Slack(RawSlack),
    Email(RawEmail),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    max_per_second: Option<f64>,
    #[serde(default)]
    concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    webhook_url: String,
    #[serde(default)]
    max_per_second: Option<f64>,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default)]
    concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    smtp: RawSmtp,
    from: String,
    #[serde(default)]
    max_per_second: Option<f64>,
    #[serde(default)]
    concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    host: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default = "default_tls")]
    tls: SmtpTls,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default = "default_smtp_timeout", with = "humantime_serde")]
    timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    event: Option<OneOrMany>,
    #[serde(default)]
    when: Option<Value>,
    notify: Vec<Action>,
    #[serde(default)]
    stop: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A list of `10s`-style durations.
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let items: Vec<humantime_serde::Serde<Duration>> = Deserialize::deserialize(d)?;
    Ok(items
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_webhook_path() -> String {
    "/webhooks/air".into()
}
fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    1024
}
fn default_store_path() -> PathBuf {
    PathBuf::from("data/callnotify.db")
}
/// The longest retry wait, retry window or retention: ten years as humantime reads `10y`
/// (years of 365.25 days), so the `10y` the docs suggest for "never give up" is accepted.
pub const MAX_DELIVERY_WAIT: Duration = Duration::from_secs(10 * 31_557_600);

fn default_retry_schedule() -> Vec<Duration> {
    [10, 30, 120, 600, 1800, 3600, 10800]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}
fn default_give_up() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_keep() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_smtp_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_tls() -> SmtpTls {
    SmtpTls::Starttls
}
fn default_tz() -> String {
    "UTC".into()
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_schedule: default_retry_schedule(),
            give_up_after: default_give_up(),
            shutdown_grace: default_grace(),
            keep_delivered: default_keep(),
            request_timeout: default_request_timeout(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Loads, expands and validates the config at `path`, with `CALLNOTIFY_*` overrides taken from
/// the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    load_with_env(path, &env)
}

/// [`load`] with an explicit environment, for tests and for reloads that must not depend on
/// process-global state.
pub fn load_with_env(path: &Path, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    load_with(path, env, Unset::Refuse)
}

/// [`load`], with a placeholder for each unset variable (listed in [`Config::placeholders`]):
/// for `check --without-secrets` and `render`, which send nothing.
pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    load_with(path, &env, Unset::Placeholder)
}

/// [`load_with_env`], choosing what an unset variable is. A file with no settings in it
/// (empty, or only comments) is refused rather than read as "all defaults", which would serve
/// an open webhook that stores every call and sends nothing: an empty file where the config
/// should be (a failed copy, a mount of the wrong file) is a mistake to report, not run.
pub fn load_with(
    path: &Path,
    env: &BTreeMap<String, String>,
    unset: Unset,
) -> Result<Config, ConfigError> {
    let text = read(path)?;
    if is_blank(&text) {
        return Err(ConfigError {
            source: path.to_path_buf(),
            problems: vec![Problem::new(
                path.display().to_string(),
                "the file holds no settings (it is empty or only comments); \
                 config/callnotify.yaml shows a working one",
            )],
        });
    }
    from_text(path, &text, env, unset)
}

/// [`load`] for a reload. A file with no settings in it (empty, or only comments) is refused
/// instead of read as "all defaults": that is what the file looks like for a moment while an
/// editor or a shell redirect rewrites it in place, and as the running config it would open the
/// webhook to anyone, leave every channel and rule out (pending deliveries go dead) and stop
/// `watch_config` from picking up the finished file.
pub fn load_for_reload(path: &Path) -> Result<Config, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let text = read(path)?;
    if is_blank(&text) {
        return Err(ConfigError {
            source: path.to_path_buf(),
            problems: vec![Problem::new(
                path.display().to_string(),
                "the file holds no settings (is it being written?); the running config stays",
            )],
        });
    }
    from_text(path, &text, &env, Unset::Refuse).map_err(|mut e| {
        for p in e.problems.iter_mut().filter(|p| p.is_unset_variable()) {
            p.message.push_str(
                "; a reload reads the files again, not the environment, which stays as the daemon \
                 started with: restart it to pick up a variable set since",
            );
        }
        e
    })
}

/// Whether a YAML text holds nothing but blank lines, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l == "---" || l == "...")
}

fn from_text(
    path: &Path,
    text: &str,
    env: &BTreeMap<String, String>,
    unset: Unset,
) -> Result<Config, ConfigError> {
    let mut tree = layered(path, text, env)?;
    let mut problems = Vec::new();
    let mut placeholders = Vec::new();
    variables_in_keys(&tree, "", &mut problems);
    expand_env(&mut tree, "", env, unset, &mut problems, &mut placeholders);
    type_settings(&mut tree);
    let config = from_tree(path, tree, &placeholders, &mut problems);
    match config {
        Some(mut c) if problems.is_empty() => {
            c.placeholders = placeholders;
            c.overrides = overrides(env);
            Ok(c)
        }
        _ => Err(ConfigError {
            source: path.to_path_buf(),
            problems: name_placeholders(name_overrides(problems, env), &placeholders),
        }),
    }
}

/// Says which unset variable a placeholder stood in for where a setting has a problem: the
/// problem may be the placeholder's, not the file's.
fn name_placeholders(mut problems: Vec<Problem>, placeholders: &[Placeholder]) -> Vec<Problem> {
    for p in &mut problems {
        let mut vars: Vec<&str> = Vec::new();
        for ph in placeholders.iter().filter(|ph| same_setting(&p.at, &ph.at)) {
            if !vars.contains(&ph.var.as_str()) {
                vars.push(&ph.var);
            }
        }
        if !vars.is_empty() {
            p.message = format!(
                "{} (checked with a placeholder for unset {})",
                p.message,
                vars.join(", ")
            );
        }
    }
    problems
}

/// Whether a problem's place is the setting at `path`: problems name a rule after its index,
/// `rules[0] (booked).notify[0].to[0]` for `rules[0].notify[0].to[0]`.
fn same_setting(place: &str, path: &str) -> bool {
    if place == path {
        return true;
    }
    let Some(rest) = path.strip_prefix("rules[") else {
        return false;
    };
    let Some(close) = rest.find(']') else {
        return false;
    };
    let (head, tail) = path.split_at("rules[".len() + close + 1);
    place.strip_prefix(head).is_some_and(|named| {
        named.starts_with(" (") && named.ends_with(tail) && {
            let name = &named[..named.len() - tail.len()];
            name.ends_with(')')
        }
    })
}

/// Says which environment variable set a setting that has a problem: `server.listn` is not in
/// the file when it came from `CALLNOTIFY_SERVER__LISTN`.
fn name_overrides(mut problems: Vec<Problem>, env: &BTreeMap<String, String>) -> Vec<Problem> {
    let overrides = overrides(env);
    for p in &mut problems {
        let set_by: Vec<&str> = overrides
            .iter()
            .filter(|(_, path)| {
                *path == p.at
                    || path
                        .strip_prefix(p.at.as_str())
                        .is_some_and(|r| r.starts_with('.'))
            })
            .map(|(k, _)| k.as_str())
            .collect();
        if !set_by.is_empty() {
            p.message = format!("{} (set by {})", p.message, set_by.join(", "));
        }
        // A template is looked up in templates_dir: where that came from the environment, a
        // template the file's own directory has can be missing from the one in use.
        if p.at.ends_with(".template") {
            if let Some((var, _)) = overrides.iter().find(|(_, at)| at == "templates_dir") {
                p.message = format!("{} (templates_dir set by {var})", p.message);
            }
        }
    }
    problems
}

/// The `CALLNOTIFY_*` variables in `env` that override a setting, each with its path.
fn overrides(env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    env.keys()
        .filter(|k| !NOT_OVERRIDES.contains(&k.as_str()))
        .filter_map(|k| {
            let path = k
                .strip_prefix("CALLNOTIFY_")?
                .to_lowercase()
                .replace("__", ".");
            Some((k.clone(), path))
        })
        .collect()
}

/// Only the `store` section of the config (with its environment overrides), for the commands
/// that read the store: looking at dead letters must not need the Slack URLs and SMTP passwords
/// of the daemon's environment, nor templates that compile.
pub fn load_store(path: &Path) -> Result<StoreConfig, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let fail = |problems: Vec<Problem>| ConfigError {
        source: path.to_path_buf(),
        problems,
    };
    let mut store = layered(path, &read(path)?, &env)?
        .get_mut("store")
        .map(Value::take)
        .unwrap_or_else(|| Value::Object(Default::default()));
    let mut problems = Vec::new();
    expand_env(
        &mut store,
        "store",
        &env,
        Unset::Refuse,
        &mut problems,
        &mut Vec::new(),
    );
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    let raw: RawStore = serde_json::from_value(store)
        .map_err(|e| fail(vec![Problem::new("store", e.to_string())]))?;
    Ok(StoreConfig {
        path: raw.path,
        synchronous: raw.synchronous,
    })
}

/// The config file's text. A relative path that names nothing says where it was looked for:
/// the default, `config/callnotify.yaml`, is found only from the directory that holds `config/`.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        let hint = match std::env::current_dir() {
            Ok(cwd) if e.kind() == std::io::ErrorKind::NotFound && path.is_relative() => format!(
                "; a relative path is taken from the working directory, {}: give --config PATH \
                 (or CALLNOTIFY_CONFIG)",
                cwd.display()
            ),
            _ => String::new(),
        };
        ConfigError {
            source: path.to_path_buf(),
            problems: vec![Problem::new(
                path.display().to_string(),
                format!("cannot read the config file: {e}{hint}"),
            )],
        }
    })
}

/// The config file's `text` with `CALLNOTIFY_...` environment overrides layered on, as a JSON
/// tree (`${VAR}` not yet expanded).
fn layered(path: &Path, text: &str, env: &BTreeMap<String, String>) -> Result<Value, ConfigError> {
    let fail = |problems: Vec<Problem>| ConfigError {
        source: path.to_path_buf(),
        problems,
    };
    let overrides: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("CALLNOTIFY_") && !NOT_OVERRIDES.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let layered = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Yaml))
        .add_source(
            config::Environment::with_prefix("CALLNOTIFY")
                .prefix_separator("_")
                .separator("__")
                // Every override is text here, as a `${VAR}` is: `type_settings` reads numbers
                // and yes/no where a setting holds one, so a password or a token of digits
                // stays what it was (the crate's own parsing made `000123` the number 123).
                .source(Some(overrides)),
        )
        .build()
        .map_err(|e| {
            fail(vec![Problem::new(
                path.display().to_string(),
                plain_yaml_error(e.to_string()),
            )])
        })?;
    let mut tree: Value = layered.try_deserialize().map_err(|e| {
        fail(vec![Problem::new(
            path.display().to_string(),
            e.to_string(),
        )])
    })?;
    if tree.is_null() {
        tree = Value::Object(Default::default());
    }
    // `CALLNOTIFY_SERVER__TOKENS=tok1,tok2`: the list, from one variable. Spaces around a comma
    // (`tok1, tok2`) separate, as a request could never present a token that begins with one.
    if let Some(tokens) = tree.pointer_mut("/server/tokens") {
        if let Value::String(list) = tokens {
            *tokens = list
                .split(',')
                .map(|t| Value::String(t.trim().into()))
                .collect();
        }
    }
    Ok(tree)
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string of the tree; `$$` is a literal `$`.
/// An unset variable without a default is a problem, or with [`Unset::Placeholder`] a
/// placeholder recorded in `placeholders`; never a literal token.
fn expand_env(
    v: &mut Value,
    at: &str,
    env: &BTreeMap<String, String>,
    unset: Unset,
    problems: &mut Vec<Problem>,
    placeholders: &mut Vec<Placeholder>,
) {
    each_string(v, at, &mut |v, at| {
        let Value::String(s) = v else {
            return;
        };
        if !s.contains('$') {
            return;
        }
        let shape = (unset == Unset::Placeholder).then(|| Shape::of(at));
        let mut stood_in = Vec::new();
        let expanded = expand(s, env, shape, &mut stood_in);
        placeholders.extend(stood_in.into_iter().map(|(var, value)| Placeholder {
            var,
            at: at.to_string(),
            value,
        }));
        match expanded {
            Ok(out) => *s = out,
            Err(msg) => problems.push(Problem::new(at, msg)),
        }
    });
}

/// `${VAR}` is replaced in values only: in a key (a channel's name, a `when` field) it would
/// stay a literal `${VAR}`, so it is a problem, never a name no rule can mean.
fn variables_in_keys(v: &Value, at: &str, problems: &mut Vec<Problem>) {
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                variables_in_keys(item, &format!("{at}[{i}]"), problems);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                if k.contains("${") {
                    problems.push(Problem::new(
                        &path,
                        format!("{k:?}: ${{VAR}} is replaced in values, not in keys; write the name itself"),
                    ));
                }
                variables_in_keys(item, &path, problems);
            }
        }
        _ => {}
    }
}

/// Calls `f` with every string in the tree and its place (`rules[0].notify[1].to[0]`).
fn each_string(v: &mut Value, at: &str, f: &mut dyn FnMut(&mut Value, &str)) {
    match v {
        Value::String(_) => f(v, at),
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                each_string(item, &format!("{at}[{i}]"), f);
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                each_string(item, &path, f);
            }
        }
        _ => {}
    }
}

/// What a setting that is not text holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    Number,
    YesNo,
}

/// The settings that hold a number or a yes/no, by their place in the file. Rules' conditions
/// are not among them: a condition compares what it was given.
fn holds(at: &str) -> Option<Holds> {
    let parts: Vec<&str> = at.split('.').collect();
    match parts.as_slice() {
        ["server", "max_body_bytes" | "max_connections"] => Some(Holds::Number),
        ["server", "watch_config"] => Some(Holds::YesNo),
        ["channels", _, "max_per_second" | "burst" | "concurrency"] => Some(Holds::Number),
        ["channels", _, "smtp", "port"] => Some(Holds::Number),
        [rule, "stop"] if rule.starts_with("rules[") => Some(Holds::YesNo),
        _ => None,
    }
}

/// YAML reads `port: 587` as a number, but a value from the environment (a `${VAR}`, a
/// `CALLNOTIFY_*` override) or a quoted one is text. At a setting that holds a number or a
/// yes/no, text that reads as one is taken as one (`port: "${SMTP_PORT}"` works); everywhere
/// else text stays text, so a password of digits keeps its leading zeros.
fn type_settings(tree: &mut Value) {
    each_string(tree, "", &mut |v, at| {
        let Value::String(s) = v else {
            return;
        };
        let text = s.trim();
        let typed = match holds(at) {
            Some(Holds::Number) => text.parse::<u64>().map(Value::from).ok().or_else(|| {
                let n = text.parse::<f64>().ok()?;
                serde_json::Number::from_f64(n).map(Value::Number)
            }),
            Some(Holds::YesNo) => text.parse::<bool>().ok().map(Value::Bool),
            None => None,
        };
        if let Some(typed) = typed {
            *v = typed;
        }
    });
}

/// Expands one string; see [`expand_env`].
pub fn expand_str(s: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    expand(s, env, None, &mut Vec::new())
}

/// What validation a setting gets, so that a placeholder in it passes where the real value
/// would, and the text around it is still checked (`htps://hooks.slack.com/services/${X}`
/// stays a bad URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Url,
    Mailbox,
    SocketAddr,
    Number,
    YesNo,
    Text,
}

impl Shape {
    fn of(at: &str) -> Shape {
        let leaf = at.rsplit('.').next().unwrap_or(at);
        let list_item = |name: &str| {
            leaf.strip_prefix(name)
                .is_some_and(|i| i.starts_with('[') && i.ends_with(']'))
        };
        if at.starts_with("channels.") && leaf == "webhook_url" {
            Shape::Url
        } else if holds(at) == Some(Holds::Number) {
            Shape::Number
        } else if holds(at) == Some(Holds::YesNo) {
            Shape::YesNo
        } else if at == "server.listen" || at == "admin.listen" {
            Shape::SocketAddr
        } else if (at.starts_with("channels.") && leaf == "from")
            || (at.starts_with("rules[") && list_item("to"))
            || (at.starts_with("quiet_alert.") && list_item("to"))
        {
            Shape::Mailbox
        } else {
            Shape::Text
        }
    }

    /// The stand-in for unset `name` between `before` (already expanded) and `after` (not yet).
    /// Made from the name alone, and obvious wherever it shows up in a rendered message.
    fn placeholder(self, name: &str, before: &str, after: &str) -> String {
        let word = format!("unset-{}", name.to_ascii_lowercase().replace('_', "-"));
        let alone = |open: char, close: char| {
            (before.trim().is_empty() || before.ends_with(open))
                && (after.trim().is_empty() || after.starts_with(close))
        };
        match self {
            Shape::Url if before.is_empty() => format!("https://unset.invalid/{word}"),
            Shape::SocketAddr if before.is_empty() && after.is_empty() => "127.0.0.1:0".into(),
            Shape::SocketAddr if before.ends_with(':') => "0".into(),
            Shape::SocketAddr => "127.0.0.1".into(),
            Shape::Mailbox if alone('<', '>') => format!("{word}@unset.invalid"),
            // 1 passes every number setting's bounds (a port, a concurrency, a rate).
            Shape::Number if before.is_empty() && after.is_empty() => "1".into(),
            Shape::YesNo if before.is_empty() && after.is_empty() => "false".into(),
            _ => word,
        }
    }
}

/// [`expand_str`]; with a `shape`, an unset variable becomes a placeholder (pushed onto
/// `stood_in` with its name) instead of an error.
fn expand(
    s: &str,
    env: &BTreeMap<String, String>,
    shape: Option<Shape>,
    stood_in: &mut Vec<(String, String)>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in {s:?}"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{inner}}}` is not a valid variable reference"));
            }
            rest = &body[end + 1..];
            match (env.get(name), default, shape) {
                (Some(v), _, _) if !v.is_empty() || default.is_none() => out.push_str(v),
                (_, Some(d), _) => out.push_str(d),
                (None, None, Some(shape)) => {
                    let value = shape.placeholder(name, &out, rest);
                    out.push_str(&value);
                    stood_in.push((name.to_string(), value));
                }
                (None, None, None) => {
                    return Err(format!(
                        "environment variable {name} {NOT_SET} (or, where a fallback is safe, write ${{{name}:-fallback}})"
                    ))
                }
                (Some(v), None, _) => out.push_str(v),
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserialises one section strictly, recording a problem (with its path) instead of failing.
fn section<T: DeserializeOwned>(v: Value, at: &str, problems: &mut Vec<Problem>) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(t) => Some(t),
        Err(e) => {
            let inner = e.path().to_string();
            let place = if inner == "." || inner.is_empty() {
                at.to_string()
            } else {
                format!("{at}.{inner}")
            };
            problems.push(Problem::new(place, plain_types(e.into_inner().to_string())));
            None
        }
    }
}

/// The YAML parser's `String("console"): duplicated key in mapping at byte 210 line 6 column
/// 24` in an operator's words: which key, where, and why it is refused rather than the last one
/// silently winning.
fn plain_yaml_error(message: String) -> String {
    const DUPLICATE: &str = "): duplicated key in mapping";
    let Some((key, place)) = message.split_once(DUPLICATE) else {
        return message;
    };
    let key = key
        .split_once('(')
        .map_or(key, |(_, inner)| inner)
        .trim_matches('"');
    // The column is where the parser noticed, past the key: the line is what helps.
    let place = match place.split_once(" line ") {
        Some((_, l)) => format!(" (the second on line {})", l.split(' ').next().unwrap_or(l)),
        None => String::new(),
    };
    format!(
        "the key {key:?} appears twice in one mapping{place}; one would silently replace the other, so give each its own name or merge them"
    )
}

/// serde's "expected u64", "expected struct RawSmtp" and the like, in the words of YAML.
fn plain_types(message: String) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("u8", "a whole number from 0 to 255"),
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number, 0 or more"),
        ("usize", "a whole number, 0 or more"),
        ("i64", "a whole number"),
        ("f64", "a number"),
        ("a sequence", "a list"),
        ("a map", "a mapping"),
    ];
    for (rust, words) in WORDS {
        if let Some(head) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{head}expected {words}");
        }
    }
    match message.rsplit_once("expected struct ") {
        Some((head, name)) if !name.contains(' ') => format!("{head}expected a mapping"),
        _ => message,
    }
}

/// One channel: its `type`, then the keys that type takes, each mistake reported at its key.
fn channel_section(v: Value, at: &str, problems: &mut Vec<Problem>) -> Option<RawChannel> {
    const TYPES: &str = "`log`, `slack`, `email`";
    let Value::Object(mut map) = v else {
        problems.push(Problem::new(
            at,
            format!("expected a mapping with a `type` ({TYPES}), found {v}"),
        ));
        return None;
    };
    let kind = match map.remove("type") {
        Some(Value::String(kind)) => kind,
        Some(other) => {
            problems.push(Problem::new(
                format!("{at}.type"),
                format!("expected one of {TYPES}, found {other}"),
            ));
            return None;
        }
        None => {
            problems.push(Problem::new(
                at,
                format!("missing field `type` (one of {TYPES})"),
            ));
            return None;
        }
    };
    let rest = Value::Object(map);
    match kind.as_str() {
        "log" => section(rest, at, problems).map(RawChannel::Log),
        "slack" => section(rest, at, problems).map(RawChannel::Slack),
        "email" => section(rest, at, problems).map(RawChannel::Email),
        _ => {
            problems.push(Problem::new(
                format!("{at}.type"),
                format!("unknown channel type `{kind}`, expected one of {TYPES}"),
            ));
            None
        }
    }
}

const TOP_LEVEL: &[&str] = &[
    "server",
    "admin",
    "store",
    "templates_dir",
    "delivery",
    "channels",
    "rules",
    "quiet_alert",
];

fn from_tree(
    path: &Path,
    tree: Value,
    placeholders: &[Placeholder],
    problems: &mut Vec<Problem>,
) -> Option<Config> {
    let Value::Object(mut top) = tree else {
        problems.push(Problem::new(
            "(top level)",
            "the config must be a mapping of sections",
        ));
        return None;
    };
    for key in top.keys() {
        if !TOP_LEVEL.contains(&key.as_str()) {
            problems.push(Problem::new(
                key.clone(),
                format!(
                    "unknown section (expected one of: {})",
                    TOP_LEVEL.join(", ")
                ),
            ));
        }
    }
    let mut take = |k: &str| top.remove(k).unwrap_or(Value::Object(Default::default()));
    let server: Option<RawServer> = section(take("server"), "server", problems);
    let store: Option<RawStore> = section(take("store"), "store", problems);
    let delivery: Option<RawDelivery> = section(take("delivery"), "delivery", problems);
    let admin_v = take("admin");
    let admin: Option<RawAdmin> = match &admin_v {
        Value::Object(m) if m.is_empty() => None,
        Value::Null => None,
        _ => section(admin_v, "admin", problems),
    };
    let quiet_v = take("quiet_alert");
    let quiet: Option<RawQuietAlert> = match &quiet_v {
        Value::Object(m) if m.is_empty() => None,
        Value::Null => None,
        _ => section(quiet_v, "quiet_alert", problems),
    };
    let templates_dir = match take("templates_dir") {
        Value::String(s) => PathBuf::from(s),
        Value::Object(m) if m.is_empty() => PathBuf::from("templates"),
        other => {
            problems.push(Problem::new(
                "templates_dir",
                format!("expected a path, found {other}"),
            ));
            PathBuf::from("templates")
        }
    };

    let mut warnings = Vec::new();

    // Channels, each on its own so every broken one is reported.
    let mut channels = IndexMap::new();
    // Channels that have problems of their own: actions using them are not reported again.
    let mut broken = HashSet::new();
    match take("channels") {
        Value::Object(map) => {
            for (name, v) in map {
                let at = format!("channels.{name}");
                let built = channel_section(v, &at, problems)
                    .and_then(|raw| build_channel(&name, raw, &at, problems, &mut warnings));
                match built {
                    Some(ch) => {
                        channels.insert(name, ch);
                    }
                    None => {
                        broken.insert(name);
                    }
                }
            }
        }
        Value::Null => {}
        other => problems.push(Problem::new(
            "channels",
            format!("expected a mapping, found {other}"),
        )),
    }

    // Templates: every file under templates_dir, compiled into one registry per output kind.
    let renderer = match Renderer::load(&templates_dir) {
        Ok(r) => Some(r),
        Err(ps) => {
            problems.extend(ps);
            None
        }
    };

    // Rules.
    let mut rules_out = Vec::new();
    let mut names = HashSet::new();
    match take("rules") {
        Value::Array(items) => {
            for (i, v) in items.into_iter().enumerate() {
                // Named from the start: in a list of thirty rules, `rules[17]` alone sends the
                // reader counting.
                let at = match v.get("name").and_then(Value::as_str) {
                    Some(name) => format!("rules[{i}] ({name})"),
                    None => format!("rules[{i}]"),
                };
                let Some(raw) = section::<RawRule>(v, &at, problems) else {
                    continue;
                };
                let at = format!("rules[{i}] ({})", raw.name);
                if raw.name.trim().is_empty() {
                    problems.push(Problem::new(&at, "a rule needs a non-empty name"));
                }
                if !names.insert(raw.name.clone()) {
                    problems.push(Problem::new(
                        &at,
                        "another rule has the same name; names must be unique",
                    ));
                }
                let events = match raw.event {
                    None => None,
                    Some(OneOrMany::One(e)) => Some(vec![e]),
                    Some(OneOrMany::Many(es)) => Some(es),
                };
                if events.as_ref().is_some_and(Vec::is_empty) {
                    problems.push(Problem::new(
                        format!("{at}.event"),
                        "an empty list matches no call; leave `event` out to match both",
                    ));
                }
                let events = events.map(|es| {
                    es.iter()
                        .filter_map(|e| match crate::payload::EventKind::parse(e) {
                            Some(k) => Some(k),
                            None => {
                                problems.push(Problem::new(
                                    format!("{at}.event"),
                                    format!("unknown event {e:?} (expected POST_CALL_DATA or POST_CALL_OUTCOME)"),
                                ));
                                None
                            }
                        })
                        .collect::<Vec<_>>()
                });
                let when = match &raw.when {
                    None | Some(Value::Null) => rules::Condition::All(Vec::new()),
                    Some(v) => rules::compile_when(v, &format!("{at}.when"), problems),
                };
                for path in when.undocumented_paths() {
                    warnings.push(format!(
                        "{at}.when.{path}: `{}` is not one of Air's call fields ({}); the condition holds only if Air sends it",
                        path.split('.').next().unwrap_or(path),
                        crate::payload::AIR_FIELDS.join(", ")
                    ));
                }
                if raw.notify.is_empty() {
                    problems.push(Problem::new(
                        format!("{at}.notify"),
                        "a rule must notify at least one channel",
                    ));
                }
                for (j, action) in raw.notify.iter().enumerate() {
                    if !broken.contains(&action.channel) {
                        let aat = format!("{at}.notify[{j}]");
                        check_action(action, &aat, &channels, renderer.as_ref(), problems);
                    }
                }
                rules_out.push(Rule {
                    name: raw.name,
                    events,
                    when,
                    actions: raw.notify,
                    stop: raw.stop,
                });
            }
        }
        Value::Null => {}
        Value::Object(m) if m.is_empty() => {}
        other => problems.push(Problem::new(
            "rules",
            format!("expected a list of rules, found {other}"),
        )),
    }

    let server = server.and_then(|s| build_server(s, placeholders, problems, &mut warnings));
    let admin = admin.and_then(|a| match a.listen.parse() {
        Ok(listen) => Some(AdminConfig { listen }),
        Err(e) => {
            problems.push(Problem::new(
                "admin.listen",
                format!("{:?} is not an address:port ({e}){LISTEN_FORM}", a.listen),
            ));
            None
        }
    });
    if let (Some(s), Some(a)) = (&server, &admin) {
        if listeners_collide(s.listen, a.listen) {
            problems.push(Problem::new(
                "admin.listen",
                format!(
                    "{} takes the port server.listen ({}) listens on; the daemon could not start: give the admin endpoints a port of their own",
                    a.listen, s.listen
                ),
            ));
        }
    }
    let delivery = delivery.and_then(|d| {
        if d.retry_schedule.is_empty() {
            problems.push(Problem::new(
                "delivery.retry_schedule",
                "needs at least one wait",
            ));
            return None;
        }
        // A wait under a second would retry a failing destination in a tight loop.
        if let Some(w) = d
            .retry_schedule
            .iter()
            .find(|w| *w < &Duration::from_secs(1))
        {
            problems.push(Problem::new(
                "delivery.retry_schedule",
                format!(
                    "{} is too short: each wait must be at least 1s",
                    humantime::format_duration(*w)
                ),
            ));
        }
        // Past ten years a wait means "never": refused, rather than overflowing the schedule.
        let too_long = |at: &str, d: Duration, problems: &mut Vec<Problem>| {
            if d > MAX_DELIVERY_WAIT {
                problems.push(Problem::new(
                    at,
                    format!(
                        "{} is too long: at most 10 years",
                        humantime::format_duration(d)
                    ),
                ));
            }
        };
        if let Some(w) = d.retry_schedule.iter().max() {
            too_long("delivery.retry_schedule", *w, problems);
        }
        too_long("delivery.give_up_after", d.give_up_after, problems);
        too_long("delivery.keep_delivered", d.keep_delivered, problems);
        // Zero would time out every request, some of them after Slack took the message.
        if d.request_timeout.is_zero() {
            problems.push(Problem::new(
                "delivery.request_timeout",
                "must be greater than 0",
            ));
        }
        Some(DeliveryConfig {
            retry_schedule: d.retry_schedule,
            give_up_after: d.give_up_after,
            shutdown_grace: d.shutdown_grace,
            keep_delivered: d.keep_delivered,
            request_timeout: d.request_timeout,
        })
    });
    let quiet_alert = quiet.and_then(|q| build_quiet(q, &channels, problems));

    if rules_out.is_empty() && problems.is_empty() {
        warnings.push("no rules are configured: calls are stored but nothing is sent".into());
    }

    Some(Config {
        source: path.to_path_buf(),
        server: server?,
        admin,
        store: store.map(|s| StoreConfig {
            path: s.path,
            synchronous: s.synchronous,
        })?,
        delivery: delivery?,
        channels,
        rules: rules_out,
        quiet_alert,
        templates: Arc::new(renderer?),
        warnings,
        placeholders: Vec::new(),
        overrides: Vec::new(),
    })
}

/// Whether two listeners could not both bind: the same port (not 0, which picks a free one) on
/// the same address, or on an address the other's wildcard covers (`0.0.0.0` covers IPv4; `[::]`
/// covers both, as Linux binds it dual-stack).
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// What a listen address must look like, said after a parse error.
const LISTEN_FORM: &str =
    ": an IP address and a port, such as 127.0.0.1:8080 or 0.0.0.0:8080 (a host name such as \
     localhost is not looked up)";

fn build_server(
    s: RawServer,
    placeholders: &[Placeholder],
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<String>,
) -> Option<ServerConfig> {
    let listen = match s.listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push(Problem::new(
                "server.listen",
                format!("{:?} is not an address:port ({e}){LISTEN_FORM}", s.listen),
            ));
            None
        }
    };
    if !s.webhook_path.starts_with('/') {
        problems.push(Problem::new("server.webhook_path", "must start with `/`"));
    }
    let mut tokens = Vec::new();
    for (i, t) in s.tokens.into_iter().enumerate() {
        if t.trim().is_empty() {
            problems.push(Problem::new(
                format!("server.tokens[{i}]"),
                "an empty token would accept anyone; remove it or set the variable it comes from",
            ));
        } else if t != t.trim() || t.chars().any(char::is_control) {
            // HTTP drops the spaces around a header's value and allows no line breaks in it.
            problems.push(Problem::new(
                format!("server.tokens[{i}]"),
                "begins or ends with a space or holds a line break or other control character \
                 (a secret file's trailing newline?); no request can present such a token, so \
                 every call would be refused: remove it from the value",
            ));
        } else {
            let at = format!("server.tokens[{i}]");
            // A placeholder's length says nothing about the token's.
            if t.len() < 16 && !placeholders.iter().any(|p| p.at == at) {
                warnings.push(format!(
                    "{at} is shorter than 16 characters (Air requires 16 or more)"
                ));
            }
            tokens.push(SecretString::from(t));
        }
    }
    if tokens.is_empty() {
        warnings.push(format!(
            "no Bearer tokens configured: anyone who can reach {} may post calls",
            s.webhook_path
        ));
    }
    if s.max_body_bytes == 0 {
        problems.push(Problem::new(
            "server.max_body_bytes",
            "must be greater than 0",
        ));
    }
    if s.max_connections == 0 {
        problems.push(Problem::new(
            "server.max_connections",
            "must be greater than 0",
        ));
    }
    // Zero would close every connection (or time out every body) at once.
    for (key, d) in [
        ("server.header_read_timeout", s.header_read_timeout),
        ("server.body_read_timeout", s.body_read_timeout),
    ] {
        if d.is_zero() {
            problems.push(Problem::new(key, "must be greater than 0"));
        }
    }
    Some(ServerConfig {
        listen: listen?,
        webhook_path: s.webhook_path,
        tokens,
        max_body_bytes: usize::try_from(s.max_body_bytes).unwrap_or(usize::MAX),
        header_read_timeout: s.header_read_timeout,
        body_read_timeout: s.body_read_timeout,
        max_connections: s.max_connections,
        watch_config: s.watch_config,
    })
}

fn build_channel(
    name: &str,
    raw: RawChannel,
    at: &str,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<String>,
) -> Option<Channel> {
    let check_rate = |r: Option<f64>, default: f64, problems: &mut Vec<Problem>| -> f64 {
        let r = r.unwrap_or(default);
        if !r.is_finite() || r < 0.0 {
            problems.push(Problem::new(
                format!("{at}.max_per_second"),
                "must be 0 (unpaced) or more",
            ));
            return default;
        }
        r
    };
    let (kind, rate, burst, concurrency) = match raw {
        RawChannel::Log(RawLog {
            file,
            max_per_second,
            concurrency,
        }) => (
            ChannelKind::Log { file },
            check_rate(max_per_second, 0.0, problems),
            1,
            concurrency.unwrap_or(1),
        ),
        RawChannel::Slack(RawSlack {
            webhook_url,
            max_per_second,
            burst,
            concurrency,
        }) => {
            match reqwest::Url::parse(&webhook_url) {
                // An unset variable was reported already; don't report its placeholder too.
                _ if webhook_url.contains("${") => {}
                Ok(u) if u.scheme() == "https" => {}
                // Plain http sends the URL (a secret) and the call's data in clear. Slack
                // takes webhooks over HTTPS only, so for its hosts it is a typo; elsewhere it
                // may be a Slack-compatible receiver that speaks only http (or a stand-in on
                // this host, which crosses no network).
                Ok(u) if u.scheme() == "http" => {
                    let host = u.host_str().unwrap_or("").to_ascii_lowercase();
                    let here = host == "localhost"
                        || host
                            .trim_matches(['[', ']'])
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback());
                    if host == "slack.com" || host.ends_with(".slack.com") {
                        problems.push(Problem::new(
                            format!("{at}.webhook_url"),
                            "must start with https:// (Slack takes webhooks over HTTPS only; \
                             over http the URL, a secret, and every message would cross the \
                             network unencrypted)",
                        ));
                    } else if !here {
                        warnings.push(format!(
                            "{at}.webhook_url is plain http to another host: the URL (a secret) \
                             and every message cross the network unencrypted; use https"
                        ));
                    }
                }
                // The URL is a secret: say what is wrong without echoing it.
                Ok(_) => problems.push(Problem::new(
                    format!("{at}.webhook_url"),
                    "must be an https:// URL",
                )),
                Err(e) => problems.push(Problem::new(
                    format!("{at}.webhook_url"),
                    format!("not a URL ({e})"),
                )),
            }
            // An empty bucket would never send; quietly reading 0 as 1 hid the mistake.
            if burst == Some(0) {
                problems.push(Problem::new(
                    format!("{at}.burst"),
                    "must be at least 1 (messages sent at once before pacing starts)",
                ));
            }
            (
                ChannelKind::Slack {
                    webhook_url: SecretString::from(webhook_url),
                },
                check_rate(max_per_second, 1.0, problems),
                burst.unwrap_or(3),
                concurrency.unwrap_or(1),
            )
        }
        RawChannel::Email(RawEmail {
            smtp,
            from,
            max_per_second,
            concurrency,
        }) => {
            let from = match from.parse::<Mailbox>() {
                Ok(m) => Some(m),
                Err(e) => {
                    problems.push(Problem::new(
                        format!("{at}.from"),
                        format!("{from:?} is not an address ({e})"),
                    ));
                    None
                }
            };
            if smtp.host.trim().is_empty() {
                problems.push(Problem::new(format!("{at}.smtp.host"), "must not be empty"));
            } else if smtp
                .host
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            {
                // Every connection would fail and be retried until give_up_after.
                problems.push(Problem::new(
                    format!("{at}.smtp.host"),
                    format!(
                        "{:?} holds a space or a line break (a secret file's trailing newline?); \
                         no server has such a name",
                        smtp.host
                    ),
                ));
            }
            if smtp.timeout.is_zero() {
                problems.push(Problem::new(
                    format!("{at}.smtp.timeout"),
                    "must be greater than 0",
                ));
            }
            // Empty is absent: `${SMTP_USER:-}` / `${SMTP_PASSWORD:-}` make login optional. A
            // login with an empty name or password can only be refused (and retried for a day).
            let empty = |v: &Option<String>| v.as_deref().is_some_and(str::is_empty);
            let (empty_user, empty_password) = (empty(&smtp.username), empty(&smtp.password));
            let username = smtp.username.filter(|u| !u.is_empty());
            let password = smtp.password.filter(|p| !p.is_empty());
            match (&username, &password) {
                (Some(_), None) if empty_password => problems.push(Problem::new(
                    format!("{at}.smtp.password"),
                    "is empty while a username is set (is the variable it comes from set to nothing?)",
                )),
                (None, Some(_)) if empty_user => problems.push(Problem::new(
                    format!("{at}.smtp.username"),
                    "is empty while a password is set (is the variable it comes from set to nothing?)",
                )),
                (Some(_), None) | (None, Some(_)) => problems.push(Problem::new(
                    format!("{at}.smtp"),
                    "username and password go together",
                )),
                _ => {}
            }
            for (key, value) in [("username", &username), ("password", &password)] {
                if value
                    .as_deref()
                    .is_some_and(|v| v.chars().any(char::is_control))
                {
                    problems.push(Problem::new(
                        format!("{at}.smtp.{key}"),
                        "holds a line break or other control character (a secret file's trailing \
                         newline?); no server would accept it: remove it from the value",
                    ));
                }
            }
            let port = smtp.port.unwrap_or(match smtp.tls {
                SmtpTls::None => 25,
                SmtpTls::Starttls => 587,
                SmtpTls::Tls => 465,
            });
            (
                ChannelKind::Email {
                    smtp: SmtpConfig {
                        host: smtp.host,
                        port,
                        tls: smtp.tls,
                        username,
                        password: password.map(SecretString::from),
                        timeout: smtp.timeout,
                    },
                    from: from?,
                },
                check_rate(max_per_second, 0.0, problems),
                1,
                concurrency.unwrap_or(4),
            )
        }
    };
    if concurrency == 0 {
        problems.push(Problem::new(
            format!("{at}.concurrency"),
            "must be at least 1",
        ));
    }
    Some(Channel {
        name: name.to_string(),
        kind,
        max_per_second: rate,
        burst,
        concurrency: concurrency.max(1),
    })
}

/// "unknown channel", and the names there are to choose from.
fn unknown_channel(name: &str, channels: &IndexMap<String, Channel>) -> String {
    if channels.is_empty() {
        format!("unknown channel {name:?} (no channel is configured under `channels`)")
    } else {
        let known: Vec<&str> = channels.keys().map(String::as_str).collect();
        format!(
            "unknown channel {name:?} (configured: {})",
            known.join(", ")
        )
    }
}

fn check_action(
    action: &Action,
    at: &str,
    channels: &IndexMap<String, Channel>,
    renderer: Option<&Renderer>,
    problems: &mut Vec<Problem>,
) {
    let Some(channel) = channels.get(&action.channel) else {
        problems.push(Problem::new(
            format!("{at}.channel"),
            unknown_channel(&action.channel, channels),
        ));
        return;
    };
    match &channel.kind {
        ChannelKind::Email { .. } => {
            if action.to.is_empty() {
                problems.push(Problem::new(
                    format!("{at}.to"),
                    "an email action needs at least one recipient",
                ));
            }
            for (i, to) in action.to.iter().enumerate() {
                match crate::render::check_recipient(to) {
                    Err(e) => problems.push(Problem::new(format!("{at}.to[{i}]"), e)),
                    Ok(crate::render::RecipientEntry::Literal) => {
                        for part in to.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                            if let Err(e) = part.parse::<Mailbox>() {
                                problems.push(Problem::new(
                                    format!("{at}.to[{i}]"),
                                    format!("{part:?} is not an address ({e})"),
                                ));
                            }
                        }
                    }
                    Ok(_) => {}
                }
            }
            match &action.subject {
                None => problems.push(Problem::new(
                    format!("{at}.subject"),
                    "an email action needs a subject",
                )),
                Some(s) => {
                    if let Err(e) = crate::render::check_inline(s) {
                        problems.push(Problem::new(format!("{at}.subject"), e));
                    }
                }
            }
        }
        ChannelKind::Slack { .. } | ChannelKind::Log { .. } => {
            if !action.to.is_empty() {
                problems.push(Problem::new(
                    format!("{at}.to"),
                    format!(
                        "`to` is for email channels; {:?} is a {} channel",
                        action.channel,
                        channel.kind.type_name()
                    ),
                ));
            }
            if action.subject.is_some() {
                problems.push(Problem::new(
                    format!("{at}.subject"),
                    format!(
                        "`subject` is for email channels; {:?} is a {} channel",
                        action.channel,
                        channel.kind.type_name()
                    ),
                ));
            }
        }
    }
    if let Some(r) = renderer {
        if let Err(e) = r.resolve(channel.kind.type_name(), &action.template) {
            problems.push(Problem::new(format!("{at}.template"), e));
        }
    }
}

fn build_quiet(
    q: RawQuietAlert,
    channels: &IndexMap<String, Channel>,
    problems: &mut Vec<Problem>,
) -> Option<QuietAlertConfig> {
    let mut ok = true;
    match channels.get(&q.channel) {
        None => {
            problems.push(Problem::new(
                "quiet_alert.channel",
                unknown_channel(&q.channel, channels),
            ));
            ok = false;
        }
        Some(ch) if matches!(ch.kind, ChannelKind::Email { .. }) && q.to.is_empty() => {
            problems.push(Problem::new(
                "quiet_alert.to",
                "an email channel needs recipients",
            ));
            ok = false;
        }
        // As in a rule's action: recipients for a channel that has none are a mistake (the
        // channel meant was an email one), not something to drop without a word.
        Some(ch) if !matches!(ch.kind, ChannelKind::Email { .. }) && !q.to.is_empty() => {
            problems.push(Problem::new(
                "quiet_alert.to",
                format!(
                    "`to` is for email channels; {:?} is a {} channel",
                    q.channel,
                    ch.kind.type_name()
                ),
            ));
            ok = false;
        }
        Some(_) => {}
    }
    let tz = match crate::render::time_zone(&q.timezone) {
        Some(tz) => tz,
        None => {
            problems.push(Problem::new(
                "quiet_alert.timezone",
                format!("unknown time zone {:?}", q.timezone),
            ));
            ok = false;
            jiff::tz::TimeZone::UTC
        }
    };
    let hours = match q.hours.as_deref() {
        None => None,
        Some(h) => {
            let parsed = h.split_once('-').and_then(|(a, b)| {
                let a = chrono::NaiveTime::parse_from_str(a.trim(), "%H:%M").ok()?;
                let b = chrono::NaiveTime::parse_from_str(b.trim(), "%H:%M").ok()?;
                Some((a, b))
            });
            if parsed.is_none() {
                problems.push(Problem::new(
                    "quiet_alert.hours",
                    format!("{h:?} is not of the form \"09:00-17:00\""),
                ));
                ok = false;
            }
            parsed
        }
    };
    let mut days = Vec::new();
    for d in &q.days {
        match d.parse::<chrono::Weekday>() {
            Ok(w) => days.push(w),
            Err(_) => {
                problems.push(Problem::new(
                    "quiet_alert.days",
                    format!("{d:?} is not a weekday"),
                ));
                ok = false;
            }
        }
    }
    if q.after.is_zero() {
        problems.push(Problem::new("quiet_alert.after", "must be longer than 0s"));
        ok = false;
    }
    ok.then_some(QuietAlertConfig {
        after: q.after,
        channel: q.channel,
        to: q.to,
        hours,
        days,
        tz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variables `GOOD` needs.
    const GOOD_VARS: &[(&str, &str)] = &[
        ("TOKEN", "0123456789abcdef"),
        ("URL", "https://hooks.slack.com/services/T/B/X"),
    ];

    /// `GOOD_VARS` and `extra`.
    fn good_env(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut e = env(GOOD_VARS);
        e.extend(env(extra));
        e
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_variables_and_defaults() {
        let e = env(&[("A", "x"), ("EMPTY", "")]);
        assert_eq!(expand_str("${A}-${B:-dflt}", &e).unwrap(), "x-dflt");
        assert_eq!(expand_str("$$5 and ${EMPTY:-d}", &e).unwrap(), "$5 and d");
        assert_eq!(expand_str("cost: $5", &e).unwrap(), "cost: $5");
        let err = expand_str("Bearer ${MISSING}", &e).unwrap_err();
        assert!(err.contains("MISSING"), "{err}");
        assert!(expand_str("${A", &e).is_err());
        assert!(expand_str("${a b}", &e).is_err());
    }

    /// Loads `yaml` with `vars` as the environment; it must be refused. Where each problem is,
    /// and the error.
    fn refused(yaml: &str, vars: &[(&str, &str)]) -> (Vec<String>, ConfigError) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), yaml);
        let err = load_with_env(&p, &env(vars)).unwrap_err();
        (err.problems.iter().map(|p| p.at.clone()).collect(), err)
    }

    fn write(dir: &Path, yaml: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join("t/slack")).unwrap();
        std::fs::write(dir.join("t/slack/x.hbs"), "{{lead_name}}").unwrap();
        let p = dir.join("c.yaml");
        std::fs::write(
            &p,
            yaml.replace("{t}", &dir.join("t").display().to_string()),
        )
        .unwrap();
        p
    }

    const GOOD: &str = r#"
templates_dir: "{t}"
server: { tokens: ["${TOKEN}"] }
channels:
  s: { type: slack, webhook_url: "${URL}" }
rules:
  - name: r
    when: { campaignId: 8812 }
    notify: [{ channel: s, template: slack/x }]
"#;

    #[test]
    fn a_lone_variable_in_a_number_or_yes_no_setting_gives_a_number_or_a_yes_no() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = r#"
templates_dir: "{t}"
server: { tokens: ["0123456789abcdef"], max_connections: "${CONNS}", watch_config: "${WATCH}" }
channels:
  mail:
    type: email
    smtp: { host: "${SMTP_HOST}", port: "${SMTP_PORT}", username: "u", password: "${SMTP_PASSWORD}" }
    from: "calls@example.com"
    max_per_second: "${RATE:-0.5}"
    concurrency: "${MAIL_CONCURRENCY}"
rules:
  - name: r
    stop: "${STOP}"
    notify: [{ channel: mail, template: slack/x, to: ["a@example.com"], subject: "s" }]
"#;
        let p = write(dir.path(), yaml);
        let e = env(&[
            ("CONNS", "64"),
            ("WATCH", "true"),
            ("SMTP_HOST", "12345"),
            ("SMTP_PORT", "2525"),
            ("SMTP_PASSWORD", "000123"),
            ("MAIL_CONCURRENCY", "3"),
            ("STOP", "true"),
        ]);
        let c = load_with_env(&p, &e).unwrap();
        assert_eq!(c.server.max_connections, 64);
        assert!(c.server.watch_config);
        let mail = &c.channels["mail"];
        assert_eq!((mail.max_per_second, mail.concurrency), (0.5, 3));
        let ChannelKind::Email { smtp, .. } = &mail.kind else {
            panic!("{:?}", mail.kind.type_name())
        };
        assert_eq!(smtp.port, 2525);
        // Text settings stay text, leading zeros and all.
        assert_eq!(smtp.host, "12345");
        assert_eq!(smtp.password.as_ref().unwrap().expose_secret(), "000123");
        assert!(c.rules[0].stop);

        // A value that is not a number is still named as the setting's problem.
        let e = env(&[
            ("CONNS", "many"),
            ("WATCH", "true"),
            ("SMTP_HOST", "h"),
            ("SMTP_PORT", "2525"),
            ("SMTP_PASSWORD", "p"),
            ("MAIL_CONCURRENCY", "3"),
            ("STOP", "false"),
        ]);
        let err = load_with_env(&p, &e).unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.at.starts_with("server")),
            "{err}"
        );

        // check --without-secrets: an unset number setting gets a placeholder that is a number.
        let err_free = load_with(&p, &env(&[]), Unset::Placeholder).unwrap();
        assert_eq!(err_free.server.max_connections, 1);

        // Overrides are read the same way: numbers where a setting holds one, text elsewhere.
        let e = env(&[
            ("CONNS", "64"),
            ("WATCH", "true"),
            ("SMTP_HOST", "h"),
            ("SMTP_PORT", "2525"),
            ("SMTP_PASSWORD", "p"),
            ("MAIL_CONCURRENCY", "3"),
            ("STOP", "false"),
            ("CALLNOTIFY_CHANNELS__MAIL__SMTP__PASSWORD", "000123"),
            ("CALLNOTIFY_CHANNELS__MAIL__SMTP__PORT", "587"),
            (
                "CALLNOTIFY_SERVER__TOKENS",
                "1234567890123456,0123456789abcdef",
            ),
            ("CALLNOTIFY_SERVER__WATCH_CONFIG", "false"),
        ]);
        let c = load_with_env(&p, &e).unwrap();
        let ChannelKind::Email { smtp, .. } = &c.channels["mail"].kind else {
            panic!("not email")
        };
        assert_eq!(smtp.port, 587);
        assert_eq!(smtp.password.as_ref().unwrap().expose_secret(), "000123");
        let tokens: Vec<&str> = c.server.tokens.iter().map(|t| t.expose_secret()).collect();
        assert_eq!(tokens, ["1234567890123456", "0123456789abcdef"]);
        assert!(!c.server.watch_config);
    }

    #[test]
    fn only_settings_that_hold_a_number_or_a_yes_no_are_read_as_one() {
        let mut tree = serde_json::json!({
            "server": { "max_connections": " 64 ", "webhook_path": "123" },
            "channels": { "m": { "smtp": { "port": "25", "password": "007" }, "burst": "x" } },
            "rules": [{ "stop": "true", "when": { "port": "587", "campaignId": "8812" } }],
        });
        type_settings(&mut tree);
        assert_eq!(
            tree,
            serde_json::json!({
                "server": { "max_connections": 64, "webhook_path": "123" },
                "channels": { "m": { "smtp": { "port": 25, "password": "007" }, "burst": "x" } },
                "rules": [{ "stop": true, "when": { "port": "587", "campaignId": "8812" } }],
            })
        );
    }

    #[test]
    fn a_rule_for_no_event_is_refused() {
        let yaml = GOOD.replace("    when:", "    event: []\n    when:");
        let (places, err) = refused(&yaml, GOOD_VARS);
        assert_eq!(places, ["rules[0] (r).event"], "{err}");
    }

    #[test]
    fn a_rule_on_a_field_air_does_not_send_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &GOOD.replace("campaignId", "durration"));
        let e = env(GOOD_VARS);
        let c = load_with_env(&p, &e).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("rules[0] (r).when.durration: `durration` is not one")),
            "{:?}",
            c.warnings
        );
        let c = load_with_env(&write(dir.path(), GOOD), &e).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let (places, _) = refused(&GOOD.replace("campaignId", "campaignID"), GOOD_VARS);
        assert_eq!(places, ["rules[0] (r).when.campaignID"]);
    }

    #[test]
    fn environment_overrides_and_secrets_that_look_like_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), GOOD);
        let e = env(&[
            ("TOKEN", "tok: with # yaml [chars] 0123456789"),
            ("URL", "https://hooks.slack.com/services/T/B/X"),
            ("CALLNOTIFY_SERVER__LISTEN", "127.0.0.1:9999"),
            ("CALLNOTIFY_SERVER__MAX_BODY_BYTES", "2048"),
            ("CALLNOTIFY_CONFIG", "ignored: not an override"),
        ]);
        let c = load_with_env(&p, &e).unwrap();
        assert_eq!(c.server.listen.port(), 9999);
        assert_eq!(c.server.max_body_bytes, 2048);
        assert_eq!(
            c.server.tokens[0].expose_secret(),
            "tok: with # yaml [chars] 0123456789"
        );
        assert_eq!(c.rules[0].name, "r");
        // Secrets never reach Debug output.
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hooks.slack.com") && !debug.contains("yaml [chars]"),
            "{debug}"
        );
    }

    /// A token no request can present (HTTP drops the spaces around a header's value and allows
    /// no line break in it) would refuse every call: it is refused, without being echoed. In the
    /// one-variable list, spaces after a comma separate.
    #[test]
    fn a_token_that_no_request_can_present_is_refused() {
        let token = "0123456789abcdef";
        for bad in [
            format!("{token}\n"),
            format!("{token}\r\n"),
            format!(" {token}"),
            format!("{token} "),
            "0123\n456789abcdef".to_string(),
        ] {
            let (places, err) = refused(GOOD, &[("TOKEN", &bad), ("URL", "https://x.example/h")]);
            assert_eq!(places, ["server.tokens[0]"], "{bad:?}: {err}");
            assert!(err.to_string().contains("trailing newline"), "{err}");
            assert!(!err.to_string().contains("456789"), "echoed: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), GOOD);
        let e = good_env(&[(
            "CALLNOTIFY_SERVER__TOKENS",
            "old-token-0123456789, new-token-0123456789",
        )]);
        let c = load_with_env(&p, &e).unwrap();
        let tokens: Vec<&str> = c.server.tokens.iter().map(|t| t.expose_secret()).collect();
        assert_eq!(tokens, ["old-token-0123456789", "new-token-0123456789"]);
    }

    /// An empty SMTP username and password mean no login (`${SMTP_USER:-}` makes it optional);
    /// one empty beside the other set, or either holding a line break, could only be refused
    /// by the server, and is refused here instead, without echoing the secret.
    #[test]
    fn smtp_credentials_that_no_server_would_accept_are_refused() {
        let yaml = GOOD.replace(
            "channels:\n",
            "channels:\n  mail: { type: email, from: a@example.com, smtp: { host: h, username: \"${SMTP_USER:-}\", password: \"${SMTP_PASSWORD:-}\" } }\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &yaml);
        let c = load_with_env(&p, &good_env(&[])).unwrap();
        let ChannelKind::Email { smtp, .. } = &c.channels["mail"].kind else {
            panic!("not email")
        };
        assert!(smtp.username.is_none() && smtp.password.is_none());

        let cases: [(&[(&str, &str)], &str); 4] = [
            (&[("SMTP_USER", "bot")], "channels.mail.smtp.password"),
            (
                &[("SMTP_PASSWORD", "s3cret-pw")],
                "channels.mail.smtp.username",
            ),
            (
                &[("SMTP_USER", "bot"), ("SMTP_PASSWORD", "s3cret-pw\n")],
                "channels.mail.smtp.password",
            ),
            (
                &[("SMTP_USER", "bot\r"), ("SMTP_PASSWORD", "s3cret-pw")],
                "channels.mail.smtp.username",
            ),
        ];
        let host = yaml.replace("host: h,", "host: \"${SMTP_HOST}\",");
        let other = tempfile::tempdir().unwrap();
        let q = write(other.path(), &host);
        for bad in [
            "mail.example.com\n",
            " mail.example.com",
            "mail example.com",
        ] {
            let err = load_with_env(&q, &good_env(&[("SMTP_HOST", bad)])).unwrap_err();
            let places: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
            assert_eq!(places, ["channels.mail.smtp.host"], "{bad:?}: {err}");
        }
        load_with_env(&q, &good_env(&[("SMTP_HOST", "mail.example.com")])).unwrap();
        for (vars, at) in cases {
            let err = load_with_env(&p, &good_env(vars)).unwrap_err();
            let places: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
            assert_eq!(places, [at], "{vars:?}: {err}");
            assert!(!err.to_string().contains("s3cret"), "echoed: {err}");
        }
    }

    /// `check` said OK to an admin listener on the main listener's port, and the daemon then
    /// could not start.
    #[test]
    fn an_admin_listener_on_the_main_listeners_port_is_refused() {
        for (main, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("[::]:8080", "127.0.0.1:8080"),
        ] {
            let yaml = GOOD.replace(
                "server: {",
                &format!("admin: {{ listen: \"{admin}\" }}\nserver: {{ listen: \"{main}\", "),
            );
            let (places, err) = refused(&yaml, GOOD_VARS);
            assert_eq!(places, ["admin.listen"], "{main} {admin}: {err}");
        }
        for (main, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:9090"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:8080", "10.0.0.1:8080"),
            ("0.0.0.0:8080", "[::1]:8080"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let yaml = GOOD.replace(
                "server: {",
                &format!("admin: {{ listen: \"{admin}\" }}\nserver: {{ listen: \"{main}\", "),
            );
            let p = write(dir.path(), &yaml);
            load_with_env(&p, &good_env(&[])).unwrap();
        }
    }

    #[test]
    fn the_build_switch_is_not_a_config_override() {
        // README: `CALLNOTIFY_NO_RELR=1` for a build; `cargo run` hands it to the binary too.
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), GOOD);
        let e = good_env(&[("CALLNOTIFY_NO_RELR", "1")]);
        load_with_env(&p, &e).unwrap();
    }

    #[test]
    fn a_mistyped_override_names_its_environment_variable() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), GOOD);
        let e = good_env(&[
            ("CALLNOTIFY_SERVR__LISTEN", "127.0.0.1:9999"),
            ("CALLNOTIFY_SERVER__LISTN", "127.0.0.1:9999"),
        ]);
        let err = load_with_env(&p, &e).unwrap_err().to_string();
        for want in [
            "unknown section (expected one of: ",
            "(set by CALLNOTIFY_SERVR__LISTEN)",
            "(set by CALLNOTIFY_SERVER__LISTN)",
        ] {
            assert!(err.contains(want), "no {want:?} in {err}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let (places, err) = refused(
            r#"
templates_dir: "{t}"
bogus_section: 1
server: { tokens: [""], listen: "nowhere" }
channels:
  s: { type: slack, webhook_url: "https://hooks.slack.com/x", colour: red }
  e: { type: email, smtp: { host: "h", tls: sometimes }, from: "x" }
  ok: { type: slack, webhook_url: "ftp://x" }
rules:
  - name: r
    notify: [{ channel: ok, template: slack/nope, to: ["a@b.c"] }, { channel: s, template: slack/x }]
  - { name: q, notify: [{ channel: s, template: slack/x }], extra: 1 }
"#,
            &[],
        );
        for want in [
            "bogus_section",
            "server.tokens[0]",
            "server.listen",
            "channels.s",
            "channels.e",
            "channels.ok.webhook_url",
            "rules[0] (r).notify[0].to",
            "rules[0] (r).notify[0].template",
            "rules[1] (q).extra",
        ] {
            assert!(
                places.iter().any(|p| p.starts_with(want)),
                "{want} not in {places:?}"
            );
        }
        // A broken channel is reported once, not again at every rule that uses it.
        assert!(
            !places
                .iter()
                .any(|p| p.starts_with("rules[0] (r).notify[1]")),
            "{places:?}"
        );
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn timeouts_of_zero_and_retries_in_a_tight_loop_are_refused() {
        let (places, err) = refused(
            r#"
templates_dir: "{t}"
server: { tokens: ["0123456789abcdef"] }
delivery: { request_timeout: "0s", retry_schedule: ["5s", "200ms"] }
channels:
  e: { type: email, smtp: { host: "h", timeout: "0s" }, from: "x@example.com" }
rules: []
"#,
            &[],
        );
        assert_eq!(
            places,
            [
                "channels.e.smtp.timeout",
                "delivery.retry_schedule",
                "delivery.request_timeout"
            ],
            "{err}"
        );
        assert!(err.to_string().contains("200ms is too short"), "{err}");
    }

    /// An empty config (or one of comments) used to start an open webhook with no rules and
    /// pass `check`: every call stored, nothing sent, Air told all is well.
    #[test]
    fn a_file_with_no_settings_is_refused_not_read_as_all_defaults() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "\n", "# server:\n#   listen: x\n---\n"] {
            let p = write(dir.path(), text);
            for unset in [Unset::Refuse, Unset::Placeholder] {
                let err = load_with(&p, &env(&[]), unset).unwrap_err();
                assert_eq!(err.problems.len(), 1, "{err}");
                assert!(
                    err.to_string().contains("the file holds no settings"),
                    "{err}"
                );
            }
        }
        // One setting is enough: the rest has defaults (and warnings).
        let p = write(dir.path(), "templates_dir: \"{t}\"\n");
        assert!(load_with(&p, &env(&[]), Unset::Refuse).is_ok());
    }

    /// Slack takes webhooks over HTTPS only: `http://hooks.slack.com/...` is a typo that would
    /// send the secret URL and the call in clear (and then fail), and used to pass `check`.
    #[test]
    fn a_plain_http_slack_url_is_refused_and_plain_http_elsewhere_is_warned_about() {
        let with_url = |url: &str| {
            GOOD.replace(
                r#"webhook_url: "${URL}" }"#,
                &format!(r#"webhook_url: "{url}" }}"#),
            )
        };
        for url in [
            "http://hooks.slack.com/services/T/B/X",
            "HTTP://Hooks.Slack.com/services/T/B/X",
        ] {
            let (places, err) = refused(&with_url(url), GOOD_VARS);
            assert_eq!(places, ["channels.s.webhook_url"], "{err}");
            assert!(
                err.to_string().contains("must start with https://"),
                "{err}"
            );
            assert!(
                !err.to_string().contains("services/T"),
                "the URL is a secret: {err}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let warned = |url: &str| {
            let p = write(dir.path(), &with_url(url));
            let c = load_with_env(&p, &env(GOOD_VARS)).unwrap();
            c.warnings
                .into_iter()
                .filter(|w| w.contains("webhook_url"))
                .collect::<Vec<_>>()
        };
        let w = warned("http://chat.internal.example/hooks/abc");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("channels.s.webhook_url is plain http"),
            "{w:?}"
        );
        assert!(!w[0].contains("hooks/abc"), "the URL is a secret: {w:?}");
        for quiet in [
            "https://hooks.slack.com/services/T/B/X",
            "http://127.0.0.1:9/hook",
            "http://[::1]:9/hook",
            "http://localhost:9/hook",
        ] {
            assert_eq!(warned(quiet), Vec::<String>::new(), "{quiet}");
        }
    }

    /// The regex crate's error is several lines, the last of them `error: ...` at the margin,
    /// which read as a second problem (or an error of the program) after the list.
    #[test]
    fn a_problem_of_several_lines_stays_under_its_dash() {
        let yaml = GOOD.replace(
            "when: { campaignId: 8812 }",
            r#"when: { transcript: { matches: "(unclosed" } }"#,
        );
        let (places, err) = refused(&yaml, GOOD_VARS);
        assert_eq!(places, ["rules[0] (r).when.transcript.matches"], "{err}");
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > 3, "{text}");
        assert!(lines[1].starts_with("  - rules[0]"), "{text}");
        for l in &lines[2..] {
            assert!(l.starts_with("    "), "{l:?} in\n{text}");
        }
        assert!(text.contains("    error: unclosed group"), "{text}");
    }

    /// `localhost:8080` (or `:8080`) is refused with what to write instead (an admin listener
    /// on the main listener's port: `an_admin_listener_on_the_main_listeners_port_is_refused`).
    #[test]
    fn listen_addresses_are_explained() {
        let with = |server: &str, admin: &str| {
            GOOD.replace(
                r#"server: { tokens: ["${TOKEN}"] }"#,
                &format!(
                    "server: {{ tokens: [\"${{TOKEN}}\"], listen: \"{server}\" }}\nadmin: {{ listen: \"{admin}\" }}"
                ),
            )
        };
        let (places, err) = refused(&with("localhost:8080", ":9090"), GOOD_VARS);
        assert_eq!(places, ["server.listen", "admin.listen"], "{err}");
        assert_eq!(
            err.to_string()
                .matches("such as 127.0.0.1:8080 or 0.0.0.0:8080")
                .count(),
            2,
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        for (server, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:9090"),
            ("127.0.0.1:8080", "10.0.0.1:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            let p = write(dir.path(), &with(server, admin));
            assert!(
                load_with_env(&p, &env(GOOD_VARS)).is_ok(),
                "{server} {admin}"
            );
        }
    }

    /// An unknown channel is named with the ones there are, for a rule and for the quiet
    /// alert alike; with none at all (a misspelt `channels:` section) the list was just empty.
    #[test]
    fn an_unknown_channel_is_named_with_the_channels_there_are() {
        let yaml = GOOD.replace("channel: s,", "channel: sales,")
            + "quiet_alert: { after: 2h, channel: slaes }\n";
        let (places, err) = refused(&yaml, GOOD_VARS);
        assert_eq!(
            places,
            ["rules[0] (r).notify[0].channel", "quiet_alert.channel"],
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(r#"unknown channel "sales" (configured: s)"#),
            "{text}"
        );
        assert!(
            text.contains(r#"unknown channel "slaes" (configured: s)"#),
            "{text}"
        );
        let (_, err) = refused(&yaml.replace("channels:", "chanels:"), GOOD_VARS);
        assert!(
            err.to_string()
                .contains(r#"unknown channel "sales" (no channel is configured under `channels`)"#),
            "{err}"
        );
    }

    /// A value of the wrong type in a channel is reported at its own key, in YAML's words: a
    /// channel with three numbers used to say only `channels.s: ... expected f64`.
    #[test]
    fn a_channel_setting_of_the_wrong_type_is_named_by_its_key() {
        let yaml = GOOD.replace(
            r#"webhook_url: "${URL}" }"#,
            r#"webhook_url: "${URL}", max_per_second: fast }
  l: { type: log, concurrency: many }
  m: { type: email, from: a@example.com, smtp: 5 }
  n: { type: lgo }
  o: { file: x }"#,
        );
        let (places, err) = refused(&yaml, GOOD_VARS);
        assert_eq!(
            places,
            [
                "channels.s.max_per_second",
                "channels.l.concurrency",
                "channels.m.smtp",
                "channels.n.type",
                "channels.o",
            ],
            "{err}"
        );
        let text = err.to_string();
        for words in [
            r#"invalid type: string "fast", expected a number"#,
            r#"invalid type: string "many", expected a whole number, 0 or more"#,
            "invalid type: integer `5`, expected a mapping",
            "unknown channel type `lgo`, expected one of `log`, `slack`, `email`",
            "missing field `type` (one of `log`, `slack`, `email`)",
        ] {
            assert!(text.contains(words), "no {words:?} in\n{text}");
        }
        for rust in ["f64", "usize", "struct", "Raw"] {
            assert!(!text.contains(rust), "{rust:?} in\n{text}");
        }
    }

    #[test]
    fn a_burst_of_zero_is_refused_not_read_as_one() {
        let yaml = GOOD.replace(
            r#"webhook_url: "${URL}" }"#,
            r#"webhook_url: "${URL}", burst: 0 }"#,
        );
        let (places, err) = refused(&yaml, GOOD_VARS);
        assert_eq!(places, ["channels.s.burst"], "{err}");
        assert!(err.to_string().contains("must be at least 1"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let yaml = GOOD.replace(
            r#"webhook_url: "${URL}" }"#,
            r#"webhook_url: "${URL}", burst: 1 }"#,
        );
        let c = load_with_env(&write(dir.path(), &yaml), &env(GOOD_VARS)).unwrap();
        assert_eq!(c.channels["s"].burst, 1);
    }

    #[test]
    fn a_log_channel_takes_max_per_second_and_concurrency() {
        // Both work on a log channel (its own pacing bucket, its own lane): no warning.
        let dir = tempfile::tempdir().unwrap();
        let yaml = GOOD.replace(
            "channels:\n",
            "channels:\n  console: { type: log, max_per_second: 2, concurrency: 3 }\n",
        );
        let c = load_with_env(&write(dir.path(), &yaml), &env(GOOD_VARS)).unwrap();
        let log = &c.channels["console"];
        assert_eq!(
            (log.max_per_second, log.burst, log.concurrency),
            (2.0, 1, 3)
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn ten_years_is_accepted_as_never_giving_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"
templates_dir: "{t}"
server: { tokens: ["0123456789abcdef"] }
delivery: { retry_schedule: ["1s", "10y"], give_up_after: "10y", keep_delivered: "10y" }
rules: []
"#,
        );
        let c = load_with_env(&p, &env(&[])).unwrap();
        assert_eq!(c.delivery.give_up_after, MAX_DELIVERY_WAIT);
    }

    #[test]
    fn waits_past_ten_years_are_refused_rather_than_overflowing() {
        let (places, err) = refused(
            r#"
templates_dir: "{t}"
server: { tokens: ["0123456789abcdef"] }
delivery: { retry_schedule: ["1s", "1000000000y"], give_up_after: "1000000000y", keep_delivered: "11y" }
rules: []
"#,
            &[],
        );
        assert_eq!(
            places,
            [
                "delivery.retry_schedule",
                "delivery.give_up_after",
                "delivery.keep_delivered"
            ],
            "{err}"
        );
        assert!(
            err.to_string().contains("too long: at most 10 years"),
            "{err}"
        );
    }

    #[test]
    fn an_unset_secret_is_reported_once_not_again_as_a_bad_url() {
        let (places, err) = refused(GOOD, &[("TOKEN", "0123456789abcdef")]);
        assert_eq!(places, ["channels.s.webhook_url"], "{err}");
        assert!(err.problems[0].message.contains("URL is not set"), "{err}");
    }

    #[test]
    fn without_secrets_a_placeholder_stands_in_and_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), GOOD);
        let c = load_with(&p, &env(&[]), Unset::Placeholder).unwrap();
        let stood_in: Vec<(&str, &str, &str)> = c
            .placeholders
            .iter()
            .map(|p| (p.var.as_str(), p.at.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(
            stood_in,
            [
                ("TOKEN", "server.tokens[0]", "unset-token"),
                (
                    "URL",
                    "channels.s.webhook_url",
                    "https://unset.invalid/unset-url"
                ),
            ]
        );
        // A placeholder's length says nothing about the token's: no warning about it.
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // The same file is still refused when the daemon loads it.
        assert!(load_with_env(&p, &env(&[])).is_err());
    }

    #[test]
    fn placeholders_fit_their_setting_and_the_text_around_them_is_still_checked() {
        let dir = tempfile::tempdir().unwrap();
        let shaped = r#"
templates_dir: "{t}"
server: { listen: "${HOST}:${PORT}", tokens: ["${TOKEN}"] }
admin: { listen: "${ADMIN_LISTEN}" }
channels:
  s: { type: slack, webhook_url: "https://hooks.slack.com/services/${SLACK_PATH}" }
  m: { type: email, smtp: { host: "${SMTP_HOST}", username: "${U}", password: "${P}" }, from: "Calls <${FROM}>" }
  n: { type: email, smtp: { host: "h" }, from: "calls@${MAIL_DOMAIN}" }
rules:
  - name: r
    notify:
      - { channel: s, template: slack/x }
      - { channel: m, template: slack/x, subject: s, to: ["${LEADS}", "owner@${MAIL_DOMAIN}"] }
"#;
        let p = write(dir.path(), shaped);
        let c = load_with(&p, &env(&[]), Unset::Placeholder).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.placeholders.len(), 12, "{:?}", c.placeholders);

        // A typo in what is not secret is still a problem, and says a placeholder was used.
        for (typo, at) in [
            ("https://hooks", "htps://hooks"),
            ("https://hooks", "https//hooks"),
            ("Calls <${FROM}>", "Calls <${FROM}"),
            ("${HOST}:${PORT}", "${HOST}${PORT}"),
        ] {
            let p = write(dir.path(), &shaped.replace(typo, at));
            let err = load_with(&p, &env(&[]), Unset::Placeholder).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{at}: {err}");
            assert!(
                err.problems[0].message.contains("placeholder for unset"),
                "{err}"
            );
        }
        // ...and on a rule, found where the problem names the rule.
        let p = write(dir.path(), &shaped.replace("owner@", "owner@@"));
        let err = load_with(&p, &env(&[]), Unset::Placeholder).unwrap_err();
        assert_eq!(err.problems[0].at, "rules[0] (r).notify[1].to[1]", "{err}");
        assert!(
            err.problems[0]
                .message
                .ends_with("(checked with a placeholder for unset MAIL_DOMAIN)"),
            "{err}"
        );
    }

    #[test]
    fn an_unset_variable_is_reported_with_where_it_is_used() {
        let mut tree = serde_json::json!({"server": {"tokens": ["${NOPE_TOKEN}"]}});
        let mut problems = Vec::new();
        expand_env(
            &mut tree,
            "",
            &env(&[]),
            Unset::Refuse,
            &mut problems,
            &mut Vec::new(),
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].at, "server.tokens[0]");
        assert!(problems[0].message.contains("NOPE_TOKEN"));
    }

    #[test]
    fn a_key_written_twice_is_refused_naming_the_key_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "channels:\n  console: { type: log }\n  console: { type: log, file: x }\n";
        let path = write(dir.path(), yaml);
        let e = load_with_env(&path, &good_env(&[])).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(
                "the key \"console\" appears twice in one mapping (the second on line 3);"
            ),
            "{text}"
        );
        assert!(!text.contains("String("), "{text}");
    }

    #[test]
    fn a_rule_that_cannot_be_read_is_named_in_its_problem() {
        let yaml = GOOD.replace("    notify:", "    stopp: true\n    notify:");
        let (places, e) = refused(&yaml, GOOD_VARS);
        assert_eq!(places, ["rules[0] (r).stopp"], "{e}");
    }

    #[test]
    fn quiet_alert_recipients_for_a_channel_that_is_not_email_are_refused() {
        let yaml =
            format!("{GOOD}quiet_alert: {{ after: 2h, channel: s, to: [\"ops@example.com\"] }}\n");
        let (places, e) = refused(&yaml, GOOD_VARS);
        assert_eq!(places, ["quiet_alert.to"], "{e}");
        assert!(
            e.to_string()
                .contains("`to` is for email channels; \"s\" is a slack channel"),
            "{e}"
        );
    }

    #[test]
    fn a_variable_in_a_key_is_refused_not_kept_as_a_literal_name() {
        let yaml = GOOD
            .replace("  s: { type: slack", "  ${CH}: { type: slack")
            .replace("channel: s,", "channel: \"${CH}\",");
        let (places, e) = refused(&yaml, &[("CH", "s"), GOOD_VARS[0], GOOD_VARS[1]]);
        assert!(places.contains(&"channels.${CH}".to_string()), "{e}");
        assert!(
            e.to_string()
                .contains("is replaced in values, not in keys; write the name itself"),
            "{e}"
        );
    }
}
