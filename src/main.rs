//! The `callnotify` binary: parse the command line, set up logging, call the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::filter::LevelFilter;

use callnotify::{app, commands, config, notify::Outcome};

#[derive(Parser)]
#[command(
    name = "callnotify",
    version,
    about = "Turns answered Air AI phone calls into Slack messages and emails, by YAML rules.",
    long_about = "callnotify receives Air's POST_CALL_DATA / POST_CALL_OUTCOME webhooks, stores each call \
on disk, decides by the rules in a YAML file which notifications it owes, renders them from Handlebars \
templates and delivers them to Slack and email, retrying until they are delivered or dead-lettered.",
    after_help = "Examples:\n  callnotify serve                                   # run on config/callnotify.yaml\n  callnotify check --config /etc/callnotify/callnotify.yaml\n  callnotify render tests/fixtures/post_call_data.json\n  callnotify deliveries list --status dead\n  callnotify deliveries show 17\n  callnotify deliveries retry --all-dead\n  callnotify send-test --config config/examples/slack.yaml --channel sales\n\n`callnotify COMMAND --help` explains each command, with examples."
)]
struct Cli {
    /// The config file.
    // The global options come after each command's own in its --help.
    #[arg(
        long,
        short,
        global = true,
        display_order = 100,
        env = "CALLNOTIFY_CONFIG",
        default_value = "config/callnotify.yaml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, env = "CALLNOTIFY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, display_order = 101)]
    log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `callnotify=debug,warn`); RUST_LOG wins when set.
    #[arg(
        long,
        global = true,
        display_order = 102,
        env = "CALLNOTIFY_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: receive webhooks, deliver notifications.
    ///
    /// SIGTERM or Ctrl-C stops it cleanly; SIGHUP reloads the config.
    #[command(
        after_help = "Examples:\n  callnotify serve                    the shipped config: no secrets, every call logged\n  AIR_WEBHOOK_TOKEN=... SLACK_SALES_WEBHOOK=https://hooks.slack.com/... \\\n    callnotify serve --config config/examples/slack.yaml"
    )]
    Serve,
    /// Validate the config and render the rules' templates against sample calls.
    ///
    /// Every template is compiled; those the rules and the quiet alert use are rendered against
    /// built-in sample payloads. Exit 0 when all is well, 1 with every problem listed otherwise.
    /// An unset ${VAR} is a problem, as it is for serve; --without-secrets checks the rest where
    /// secrets are absent.
    #[command(
        after_help = "Examples:\n  callnotify check --config config/examples/slack.yaml                     on the host, secrets set\n  callnotify check --without-secrets --config config/examples/slack.yaml   in CI, secrets unset"
    )]
    Check {
        /// Let unset ${VAR}s pass: a placeholder shaped for its setting (a URL for a
        /// webhook_url) stands in for each, everything else is checked, and the report names
        /// the variables it did not check.
        #[arg(long)]
        without_secrets: bool,
    },
    /// Dry run: which rules a payload matches (and why not), and exactly what would be sent.
    ///
    /// Nothing is sent, so no secret is needed: a placeholder stands in for each unset ${VAR},
    /// and one line on stderr names them. Exit 0 when every notification would go out (matching
    /// nothing is fine), 1 when one would fail (a template error, no valid recipient, a message
    /// Slack refuses).
    #[command(
        after_help = "Examples:\n  callnotify render tests/fixtures/post_call_data_campaign.json\n  curl -s https://... | callnotify render -"
    )]
    Render {
        /// The webhook body, as Air sends it; `-` reads standard input.
        payload: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and replay deliveries (works while the daemon runs).
    #[command(
        subcommand,
        after_help = "Examples:\n  callnotify deliveries list --status dead\n  callnotify deliveries show 17\n  callnotify deliveries retry 17 18\n  callnotify deliveries retry --all-dead"
    )]
    Deliveries(Deliveries),
    /// Really send a sample call to one channel, and print what the destination answered.
    ///
    /// The message is the first rule's that uses the channel (or a built-in test message),
    /// rendered for a sample call (or --payload). What it sends with must be set; the Air token
    /// and other channels' settings need not be.
    #[command(
        after_help = "Examples:\n  callnotify send-test --config config/examples/slack.yaml --channel sales\n  callnotify send-test --config config/examples/email.yaml --channel managers --to me@example.com \\\n    --payload tests/fixtures/post_call_data.json"
    )]
    SendTest {
        /// The channel to send to.
        #[arg(long)]
        channel: String,
        /// A webhook body to render instead of the built-in sample.
        #[arg(long)]
        payload: Option<PathBuf>,
        /// Email recipients instead of the rule's.
        #[arg(long)]
        to: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Deliveries {
    /// List deliveries, newest first.
    #[command(
        after_help = "Examples:\n  callnotify deliveries list --status dead\n  callnotify deliveries list --sid CAec7g2x30425ba039a83ffb4286754983"
    )]
    List {
        /// Only deliveries in this state.
        #[arg(long, value_parser = ["pending", "sending", "dead", "done"])]
        status: Option<String>,
        /// Only the deliveries of this call.
        #[arg(long)]
        sid: Option<String>,
        /// At most this many, newest first; a line on stderr says when there are more.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Show one delivery and every attempt at it.
    ///
    /// For each attempt: when it ended, its outcome, how long it took and what the destination
    /// answered (`list` shows only the last error).
    #[command(after_help = "Examples:\n  callnotify deliveries show 17")]
    Show {
        /// The delivery's id (from `deliveries list`).
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Requeue dead deliveries, or make pending ones due now.
    ///
    /// Dead ones go back in the queue, due now, with a fresh retry window; pending ones (waiting
    /// out the retry schedule) become due now, keeping their attempts.
    #[command(
        after_help = "Examples:\n  callnotify deliveries retry 12 13\n  callnotify deliveries retry --all-dead\n  callnotify deliveries retry --all-pending     after an outage is fixed"
    )]
    Retry {
        /// Delivery ids (from `deliveries list`): dead ones are requeued, pending ones made due.
        ids: Vec<i64>,
        /// Every dead delivery.
        #[arg(long, conflicts_with = "ids")]
        all_dead: bool,
        /// Every pending delivery, due now: its attempts and retry window are kept, and a
        /// destination's own request to wait (Slack's Retry-After) is still honoured.
        #[arg(long, conflicts_with = "ids")]
        all_pending: bool,
    },
}

/// Logs go to stderr through a writer thread, so a burst of calls never waits on the terminal or
/// the journal; nothing is dropped (the writer blocks when its buffer is full). The thread writes
/// every line waiting in the queue into a buffer and flushes once the queue is empty: one
/// `write` for a burst of lines, and a lone line still goes out at once. Keep the guard until
/// exit: dropping it flushes what is buffered.
fn init_logging(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(4096)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            // One span deep (a delivery's): `span` has its fields, and a list of the same
            // span would repeat them on every line.
            .with_current_span(true)
            .with_span_list(false)
            .map_event_format(ListFields)
            .init(),
    }
    guard
}

/// Fields that hold a list, logged as its JSON text (`rules=["booked","vip"]` in text logs). In
/// JSON logs they become real JSON lists, so a query on one rule is `rules[] == "booked"`, not a
/// substring match that also finds `booked_late`.
const LIST_FIELDS: &[&str] = &["rules"];

/// The JSON event format, with [`LIST_FIELDS`] turned from strings into lists. Only lines whose
/// event has such a field are parsed again; every other line is written as formatted.
struct ListFields<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for ListFields<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let fields = event.metadata().fields();
        if !LIST_FIELDS.iter().any(|f| fields.field(f).is_some()) {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        writer.write_str(&lists_in_json_line(line))
    }
}

/// One JSON log line with each of [`LIST_FIELDS`] that holds a JSON list's text made that list;
/// anything else (a line that is not an object, a field that is not a list) is left as it is.
fn lists_in_json_line(line: String) -> String {
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str(&line) else {
        return line;
    };
    for field in LIST_FIELDS {
        let list = match object.get(*field) {
            Some(serde_json::Value::String(text)) => serde_json::from_str(text).ok(),
            _ => None,
        };
        if let Some(list @ serde_json::Value::Array(_)) = list {
            object.insert((*field).to_string(), list);
        }
    }
    let mut out = serde_json::Value::Object(object).to_string();
    out.push('\n');
    out
}

/// The log filter: `RUST_LOG` when set, else `--log-level`. A word that is not a level
/// (`warning`, `debg`) is refused: the filter would read it as a target's name and let nothing
/// else through, so the daemon would run with no logs at all, its errors and dead letters
/// included.
fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let (spec, from) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
        _ if level.trim().is_empty() => ("info".to_string(), "--log-level (CALLNOTIFY_LOG_LEVEL)"),
        _ => (level.to_string(), "--log-level (CALLNOTIFY_LOG_LEVEL)"),
    };
    let help = "use error, warn, info, debug, trace or off, or TARGET=LEVEL (callnotify=debug)";
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains('=') && !d.contains('[') && d.parse::<LevelFilter>().is_err() {
            return Err(format!("{from}: `{d}` is not a log level: {help}"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&spec)
        .map_err(|e| format!("{from}: `{spec}` is not a log filter ({e}): {help}"))
}

/// The loaded config, or exit 1 after printing every problem.
fn loaded(config: Result<config::Config, config::ConfigError>) -> Result<config::Config, ExitCode> {
    config.map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match log_filter(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let format = cli.log_format;
    let _flush_logs_at_exit = init_logging(format, filter);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            failed(format, "error: ", &e);
            ExitCode::from(1)
        }
    }
}

/// Says why the command failed: as a log line when the log is JSON, so that whatever reads
/// the daemon's stderr line by line as JSON (the image's default) gets this line too and in
/// order with the others; as plain text otherwise.
fn failed(format: LogFormat, prefix: &str, e: &anyhow::Error) {
    match format {
        LogFormat::Json => tracing::error!("{prefix}{e:#}"),
        LogFormat::Human => eprintln!("{prefix}{e:#}"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve => runtime()?.block_on(async {
            let app = match app::App::build(&cli.config).await {
                Ok(a) => a,
                Err(e) => {
                    failed(cli.log_format, "cannot start: ", &e);
                    return Ok(ExitCode::from(1));
                }
            };
            app.run(app::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Check { without_secrets } => {
            let config = if without_secrets {
                config::load_without_secrets(&cli.config)
            } else {
                config::load(&cli.config)
            };
            let config = match config {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    if e.problems.iter().any(config::Problem::is_unset_variable) {
                        eprintln!("(where the secrets are absent, `check --without-secrets` checks everything else)");
                    }
                    return Ok(ExitCode::from(1));
                }
            };
            let (report, ok) = commands::check(&config);
            print!("{report}");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Render { payload, json } => {
            let config = match loaded(config::load_without_secrets(&cli.config)) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if let Some(vars) = commands::unset_variables(&config) {
                eprintln!("not set, placeholders used: {vars}");
            }
            let mut body = Vec::new();
            if payload.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut body)?;
            } else {
                body = std::fs::read(&payload)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", payload.display()))?;
            }
            match commands::dry_run(&config, &body, json) {
                Ok((out, all_good)) => {
                    print!("{out}");
                    Ok(if all_good {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    })
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Deliveries(d) => {
            let store_config = match config::load_store(&cli.config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(1));
                }
            };
            match d {
                Deliveries::List {
                    status,
                    sid,
                    limit,
                    json,
                } => {
                    let (rows, more) = commands::list_deliveries(
                        &store_config,
                        status.as_deref(),
                        sid.as_deref(),
                        limit as usize,
                    )?;
                    if json {
                        for r in rows {
                            println!("{}", serde_json::to_string(&r)?);
                        }
                    } else {
                        print!("{}", commands::format_deliveries(&rows));
                    }
                    if let Some(more) = more {
                        eprintln!("{more}");
                    }
                }
                Deliveries::Show { id, json } => {
                    let Some((row, attempts)) = commands::show_delivery(&store_config, id)? else {
                        eprintln!("no delivery {id} (see `deliveries list`)");
                        return Ok(ExitCode::from(1));
                    };
                    if json {
                        let out = serde_json::json!({"delivery": row, "attempts": attempts});
                        println!("{out}");
                    } else {
                        print!("{}", commands::format_delivery(&row, &attempts));
                    }
                }
                Deliveries::Retry {
                    ids,
                    all_dead,
                    all_pending,
                } => {
                    if ids.is_empty() && !all_dead && !all_pending {
                        eprintln!("name delivery ids, or --all-dead, or --all-pending");
                        return Ok(ExitCode::from(2));
                    }
                    let by_id = !ids.is_empty();
                    let store = commands::open_store(&store_config)?;
                    let rt = runtime()?;
                    let done = rt.block_on(async {
                        let now = chrono::Utc::now().timestamp_millis();
                        let retried = store.retry(ids, all_dead, all_pending, now).await;
                        store.close().await;
                        retried
                    })?;
                    let plural = |n: usize| if n == 1 { "y" } else { "ies" };
                    if by_id || all_dead {
                        let n = done.requeued;
                        println!("{n} dead deliver{} requeued", plural(n));
                    }
                    if by_id || all_pending {
                        let n = done.made_due;
                        println!("{n} pending deliver{} made due now", plural(n));
                    }
                    if !done.untouched.is_empty() {
                        for (id, status) in done.untouched {
                            let why = match status.as_deref() {
                                None => "there is no such delivery".to_string(),
                                Some("done") => "it is done: it was delivered".into(),
                                Some(s) => format!(
                                    "it is {s}: the daemon is sending it now (see `deliveries show {id}`); \
                                     if no daemon is running, it was interrupted and is sent again when the daemon starts"
                                ),
                            };
                            eprintln!("delivery {id} was not retried: {why}");
                        }
                        return Ok(ExitCode::from(1));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::SendTest {
            channel,
            payload,
            to,
        } => {
            // What the test does not use may be unset (see `commands::send_test`).
            let config = match loaded(config::load_without_secrets(&cli.config)) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let body = payload
                .map(|p| {
                    std::fs::read(&p)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
                })
                .transpose()?;
            runtime()?.block_on(async {
                match commands::send_test(&config, &channel, body.as_deref(), &to).await {
                    Err(e) => {
                        eprintln!("{e}");
                        Ok(ExitCode::from(1))
                    }
                    Ok((action, _message, outcome)) => {
                        println!(
                            "tried {} (template {}) on channel {channel}",
                            if action.template.starts_with("builtin/") {
                                "a test message"
                            } else {
                                "the rule's message"
                            },
                            action.template
                        );
                        match outcome {
                            Outcome::Delivered { detail } => {
                                println!("delivered: {}", detail.unwrap_or_else(|| "ok".into()));
                                Ok(ExitCode::SUCCESS)
                            }
                            Outcome::Retry { error, .. } => {
                                println!("failed (temporary; the daemon would retry): {error}");
                                Ok(ExitCode::from(1))
                            }
                            Outcome::Permanent { error } => {
                                println!(
                                    "failed (permanent; the daemon would dead-letter it): {error}"
                                );
                                Ok(ExitCode::from(1))
                            }
                        }
                    }
                }
            })
        }
    }
}
