//! The running daemon: build (load config, open store, bind listeners), run until shutdown,
//! reload without restart.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{SharedClock, SteadyClock};
use crate::config::{self, Config, ConfigError};
use crate::notify::Senders;
use crate::server::{self, Surface};
use crate::store::{DaemonLock, Store};
use crate::worker::Worker;

/// The config in force and the clients built from it; swapped whole on reload.
pub struct Live {
    pub config: Arc<Config>,
    pub senders: Senders,
}

impl Live {
    pub fn new(config: Config) -> anyhow::Result<Live> {
        let senders = Senders::new(&config).map_err(anyhow::Error::msg)?;
        Ok(Live {
            config: Arc::new(config),
            senders,
        })
    }
}

/// What the HTTP edge, the worker and the background tasks share.
pub struct Shared {
    pub live: Arc<ArcSwap<Live>>,
    /// The config the process started with: what settings read only at start still follow.
    /// Not its clients: those go with the config a reload replaces (a log file's handle, idle
    /// SMTP connections), or a rotated log file stays open, deleted, until the process ends.
    started_with: Arc<Config>,
    pub store: Store,
    pub worker: Arc<Worker>,
    pub clock: SharedClock,
    pub config_path: PathBuf,
    reload_lock: tokio::sync::Mutex<()>,
    /// The config and template files as the last load (at start or a reload by any trigger,
    /// refused or not) read them: `watch_config` reloads only what differs from this, so an
    /// edit applied by SIGHUP or `POST /-/reload` is not loaded again when the watch sees it.
    applied: std::sync::Mutex<Snapshot>,
    last_call_ms: AtomicI64,
    shutting_down: AtomicBool,
    /// The last good readiness probe.
    pub ready: crate::server::ReadyCache,
    /// Webhook commits and their bookkeeping, which outlive a client that hangs up: shutdown
    /// waits for them as it does for open requests.
    pub commits: TaskTracker,
    /// Held while the daemon runs: no second daemon on this store.
    _store_lock: DaemonLock,
}

/// Unfinished deliveries that a reload's config can no longer send, grouped by what they need.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stranded {
    pub channel: String,
    pub template: String,
    pub deliveries: usize,
    /// What is missing, and what becomes of them.
    pub reason: String,
}

/// What a reload that was accepted left behind: deliveries planned under the old config that
/// the new one cannot send (a template renamed or removed, a channel removed or of another type).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reloaded {
    pub stranded: Vec<Stranded>,
}

/// Says how to get stranded deliveries sent after all.
pub const STRANDED_HINT: &str = "put back what they need (the template, or the channel as it was) and reload before their next attempt; once they are dead, put it back, reload and replay them: callnotify deliveries retry --all-dead";

impl Shared {
    /// Loads, validates and render-checks the config file again; swaps it in when good, keeps
    /// the old one (and says why) when not. Calls arriving meanwhile use the old config. A
    /// config swapped in that cannot send some unfinished deliveries (their template or channel
    /// is gone) is still swapped in: they are counted, logged and returned.
    pub async fn reload(&self, trigger: &str) -> Result<Reloaded, ConfigError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let _systemd = crate::systemd::Reloading::start();
        let path = self.config_path.clone();
        let dir = self.live.load().config.templates.dir().to_path_buf();
        let loaded = tokio::task::spawn_blocking(move || {
            // Read before the load: an edit that lands during it differs from this and is
            // loaded again by the watch, rather than taken for applied.
            let files = snapshot(&path, &dir);
            let loaded = config::load_for_reload(&path).and_then(render_checked);
            let files = match &loaded {
                Ok(c) if c.templates.dir() != dir => snapshot(&path, c.templates.dir()),
                _ => files,
            };
            (files, loaded)
        })
        .await;
        let (files, loaded) = loaded.unwrap_or_else(|e| {
            let problem = config::Problem::new("reload", e.to_string());
            (
                self.applied(),
                Err(ConfigError {
                    source: self.config_path.clone(),
                    problems: vec![problem],
                }),
            )
        });
        // Refused or not, these files were tried: the watch waits for the next edit rather
        // than trying them again.
        self.set_applied(files);
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                crate::metrics::reload("failure");
                tracing::error!(trigger, error = %e, "reload refused, keeping the running config");
                return Err(e);
            }
        };
        // Held until this reload's orphan sweep is done, so the outgoing config (its HTTP and
        // SMTP clients) is not last dropped on the store's thread, where the sweep reads it.
        let _outgoing = self.live.load_full();
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let restart_only = restart_only_changes(&self.started_with, &config);
        let live = match Live::new(config) {
            Ok(l) => l,
            Err(e) => {
                crate::metrics::reload("failure");
                tracing::error!(trigger, error = %e, "reload refused, keeping the running config");
                return Err(ConfigError {
                    source: self.config_path.clone(),
                    problems: vec![config::Problem::new("channels", e.to_string())],
                });
            }
        };
        let channels = live.config.channels.len();
        crate::metrics::channels(live.config.channels.keys());
        let config = live.config.clone();
        self.live.store(Arc::new(live));
        crate::metrics::reload("success");
        tracing::info!(trigger, channels, "config reloaded");
        // Before the orphan sweep, which kills those of removed channels.
        let stranded = match self.store.open_needs().await {
            Ok(needs) => stranded(&config, needs),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check whether unfinished deliveries can be sent with the new config");
                Vec::new()
            }
        };
        for s in &stranded {
            tracing::warn!(
                trigger,
                channel = %s.channel,
                template = %s.template,
                deliveries = s.deliveries,
                "unfinished deliveries the new config cannot send: {}; {STRANDED_HINT}",
                s.reason
            );
        }
        for setting in restart_only {
            tracing::warn!(
                setting,
                "{setting} differs from what the daemon started with: it takes effect only after a restart; the rest of the new config applies now"
            );
        }
        self.dead_letter_orphans().await;
        self.worker.wake();
        Ok(Reloaded { stranded })
    }

    /// Pending deliveries whose channel is not in the running config would wait for a lane that
    /// never comes: they go dead, visible and replayable. Runs after each reload and every few
    /// seconds, which also catches rows left by a config changed while the daemon was stopped,
    /// committed by a call matched just before a reload, or replayed before the channel is back.
    pub async fn dead_letter_orphans(&self) {
        let live = self.live.clone();
        let channels = move || live.load().config.channels.keys().cloned().collect();
        match self.store.kill_orphans(channels, self.clock.now_ms()).await {
            Ok(killed) => {
                for (channel, n) in killed.into_iter().filter(|(_, n)| *n > 0) {
                    crate::metrics::dead_without_attempt(&channel, n);
                    tracing::warn!(
                        %channel,
                        deliveries = n,
                        "deliveries for a channel no longer in the config are now dead; replay them after restoring the channel"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot check for deliveries of removed channels"),
        }
    }

    /// Catches the daemon's clock up with the wall clock. A gap over 5 s is a step of the system
    /// clock: pending retry schedules move by it in the store job that moves the clock, so a
    /// retry due in a minute stays due in a minute and nothing is written on two timelines. A
    /// smaller gap (drift) is taken as it is.
    pub async fn follow_wall_clock(&self) {
        let Some(steady) = self.clock.steady() else {
            return;
        };
        let gap = steady.gap_to_wall();
        let was = steady.base();
        let target = was.saturating_add(gap);
        if gap.abs() <= crate::clock::STEP_MS {
            steady.set_base(target);
            return;
        }
        let clock = self.clock.clone();
        let moved = move || {
            if let Some(s) = clock.steady() {
                s.set_base(target);
            }
        };
        match self.store.shift_schedule(gap, moved).await {
            Ok(n) => tracing::warn!(
                step_ms = gap,
                deliveries = n,
                "the system clock was stepped; pending retries moved with it and keep their waits"
            ),
            Err(e) => {
                // The job may have moved the clock before its commit failed: put it back, so the
                // next tick sees the step again and moves clock and retries together.
                steady.set_base(was);
                tracing::error!(step_ms = gap, error = %e, "the system clock was stepped and pending retries could not follow; trying again")
            }
        }
        self.worker.wake();
    }

    fn set_applied(&self, files: Snapshot) {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = files;
    }

    fn applied(&self) -> Snapshot {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn note_call(&self, now_ms: i64) {
        self.last_call_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Unix ms of the last accepted call, or 0.
    pub fn last_call_ms(&self) -> i64 {
        self.last_call_ms.load(Ordering::Relaxed)
    }

    /// Takes the last call's time from the store where it is later than what this process
    /// knows: a daemon started on a full disk could not read it, and went on with 0. True once
    /// the store answered.
    async fn restore_last_call(&self) -> bool {
        let Ok(stored) = self.store.get_meta("last_call_at".into()).await else {
            return false;
        };
        let stored = stored.and_then(|v| v.parse().ok()).unwrap_or(0);
        if self.last_call_ms.fetch_max(stored, Ordering::Relaxed) < stored {
            crate::metrics::last_call_at(stored);
        }
        true
    }

    /// Keeps the last call's time for the next start. Not while none is known: a 0 would
    /// overwrite the time a start that could not read the store left there.
    async fn save_last_call(&self) {
        let last = self.last_call_ms();
        if last > 0 {
            let _ = self
                .store
                .set_meta("last_call_at".into(), last.to_string())
                .await;
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Why a listener could not be bound, naming the setting. An address in use is most often a
/// callnotify started earlier (the walk-through's, or a second `serve`): it says what to do.
fn cannot_listen(e: std::io::Error, addr: SocketAddr, key: &str) -> anyhow::Error {
    let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
        format!("; another process listens there (a callnotify started earlier?): stop it, or change {key}")
    } else {
        String::new()
    };
    anyhow::anyhow!("cannot listen on {addr} ({key}): {e}{hint}")
}

/// Which groups of unfinished deliveries (see [`Store::open_needs`]) `config` cannot send, and
/// why: the worker would find the same when it tries them.
fn stranded(config: &Config, needs: Vec<(String, Option<String>, String, usize)>) -> Vec<Stranded> {
    needs
        .into_iter()
        .filter_map(|(channel, planned, template, deliveries)| {
            let reason = match config.channels.get(&channel) {
                None => format!(
                    "channel {channel} is no longer in the config; pending ones are dead now"
                ),
                Some(c) if planned.as_deref().is_some_and(|p| p != c.kind.type_name()) => format!(
                    "channel {channel} had type {} when they were planned and has type {} now; they go dead at their next attempt",
                    planned.unwrap_or_default(),
                    c.kind.type_name()
                ),
                Some(c) => match config.templates.resolve(c.kind.type_name(), &template) {
                    Ok(_) => return None,
                    Err(e) => format!("template {template}: {e}; they go dead at their next attempt"),
                },
            };
            Some(Stranded {
                channel,
                template,
                deliveries,
                reason,
            })
        })
        .collect()
}

/// Warns of the unfinished deliveries `config` cannot send, as a start finds them.
async fn warn_stranded(config: &Config, store: &Store) -> Result<(), crate::store::StoreError> {
    for s in stranded(config, store.open_needs().await?) {
        tracing::warn!(
            channel = %s.channel,
            template = %s.template,
            deliveries = s.deliveries,
            "unfinished deliveries this config cannot send: {}; {STRANDED_HINT}",
            s.reason
        );
    }
    Ok(())
}

/// Loads and validates a config, then renders the templates the rules and the quiet alert use
/// against the sample payloads: the same bar at start-up and at reload (where a file with no
/// settings is refused too, see [`config::load_for_reload`]), so a template that would fail on a
/// real call is refused.
pub fn load_checked(path: &Path) -> Result<Config, ConfigError> {
    render_checked(config::load(path)?)
}

fn render_checked(config: Config) -> Result<Config, ConfigError> {
    let problems = crate::commands::render_problems(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError {
            source: config.source.clone(),
            problems,
        })
    }
}

pub struct App {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// SIGHUP, handled from the start of [`App::build`]: one that comes while the daemon starts
    /// (a `systemctl reload` just after `start`) is a reload once it runs, not the end of the
    /// process.
    hup: Hangup,
    /// The start could not look for unfinished deliveries its config cannot send (the store
    /// was waiting for room): the background looks once the store answers.
    stranded_unchecked: bool,
}

impl App {
    /// Loads the config, opens the store and binds the listeners (port 0 works).
    pub async fn build(config_path: &Path) -> anyhow::Result<App> {
        Self::build_with_clock(config_path, SteadyClock::new()).await
    }

    pub async fn build_with_clock(config_path: &Path, clock: SharedClock) -> anyhow::Result<App> {
        // First: until this is installed, a SIGHUP ends the process (and systemd counts that as
        // a clean exit, so `Restart=on-failure` does not bring it back).
        let hup = hangup();
        crate::metrics::handle(); // install the recorder before anything counts
        let config = load_checked(config_path)?;
        let applied = snapshot(config_path, config.templates.dir());
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        if let Some(settings) = config.overridden() {
            tracing::info!(%settings, "the environment sets these over the config file");
        }
        // Before anything is requeued: what is `sending` may be another daemon's, in flight.
        let store_lock = DaemonLock::acquire(&config.store.path)?;
        // A full disk is no reason to exit (systemd would restart the daemon in a loop): it
        // starts, answers 503 and is not ready until the store opens.
        let now = {
            let clock = clock.clone();
            move || clock.now_ms()
        };
        let (store, opened) =
            Store::open_or_wait(&config.store.path, config.store.synchronous, now)?;
        match opened {
            Err(why) => tracing::error!(
                store = %config.store.path.display(),
                "{why}: the store cannot be opened; every call is answered 503 and /readyz is not ready until there is room (tried every second)"
            ),
            Ok(requeued) if requeued > 0 => tracing::info!(
                deliveries = requeued,
                "requeued deliveries interrupted by the last stop"
            ),
            Ok(_) => {}
        }
        // The config may have changed while the daemon was stopped, as at a reload.
        let stranded_unchecked = match warn_stranded(&config, &store).await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check whether unfinished deliveries can be sent with this config; checking once the store answers");
                true
            }
        };
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| cannot_listen(e, config.server.listen, "server.listen"))?;
        let admin = match &config.admin {
            Some(a) => Some(
                TcpListener::bind(a.listen)
                    .await
                    .map_err(|e| cannot_listen(e, a.listen, "admin.listen"))?,
            ),
            None => None,
        };
        let live = Arc::new(ArcSwap::from_pointee(Live::new(config)?));
        let worker = Worker::new(store.clone(), live.clone(), clock.clone(), config_path);
        let last = store
            .get_meta("last_call_at".into())
            .await
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        crate::metrics::at_start(last);
        crate::metrics::channels(live.load().config.channels.keys());
        let shared = Arc::new(Shared {
            started_with: live.load().config.clone(),
            live,
            store,
            worker,
            clock,
            config_path: config_path.to_path_buf(),
            reload_lock: tokio::sync::Mutex::new(()),
            applied: std::sync::Mutex::new(applied),
            last_call_ms: AtomicI64::new(last),
            shutting_down: AtomicBool::new(false),
            ready: Default::default(),
            commits: TaskTracker::new(),
            _store_lock: store_lock,
        });
        Ok(App {
            shared,
            listener,
            admin,
            hup,
            stranded_unchecked,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves and delivers until `shutdown` resolves; then stops accepting, gives in-flight
    /// deliveries `delivery.shutdown_grace` to finish, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let App {
            shared,
            listener,
            admin,
            hup,
            stranded_unchecked,
        } = self;
        let stop = CancellationToken::new();
        let cfg = shared.live.load_full().config.clone();
        let limits = server::Limits {
            max_connections: cfg.server.max_connections,
            header_read_timeout: cfg.server.header_read_timeout,
        };
        // Before "listening" is logged: an edit that comes as soon as the daemon is up counts.
        let watched = Watch::new(shared.applied());
        let listener_addr = listener.local_addr()?;
        tracing::info!(
            listen = %listener_addr,
            webhook = %cfg.server.webhook_path,
            admin = %admin.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_else(|| "(on the main listener)".into()),
            rules = cfg.rules.len(),
            channels = cfg.channels.len(),
            store = %cfg.store.path.display(),
            config = %shared.config_path.display(),
            version = %env!("CARGO_PKG_VERSION"),
            "callnotify is listening"
        );
        let mut servers = Vec::new();
        let main_surface = Surface::Main {
            with_admin: admin.is_none(),
        };
        servers.push(tokio::spawn(server::serve(
            listener,
            server::routes(shared.clone(), main_surface),
            limits,
            stop.clone(),
        )));
        if let Some(admin) = admin {
            servers.push(tokio::spawn(server::serve(
                admin,
                server::routes(shared.clone(), Surface::Admin),
                limits,
                stop.clone(),
            )));
        }
        let worker = tokio::spawn(shared.worker.clone().run(stop.clone()));
        let background = tokio::spawn(background(
            shared.clone(),
            stop.clone(),
            watched,
            hup,
            stranded_unchecked,
        ));
        crate::systemd::ready(&format!("listening on {}", listener_addr));

        shutdown.await;
        crate::systemd::stopping();
        tracing::info!("shutting down: no new calls; finishing in-flight deliveries");
        shared.shutting_down.store(true, Ordering::Relaxed);
        stop.cancel();
        let grace = shared.live.load().config.delivery.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            for s in servers {
                let _ = s.await;
            }
            // No request is open any more, so no commit starts after this.
            shared.commits.close();
            shared.commits.wait().await;
            let _ = worker.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = %humantime::format_duration(grace), "grace period over; unfinished deliveries resume at the next start");
        }
        let _ = background.await;
        shared.save_last_call().await;
        // Before the process exits: the write-ahead log goes into the store file, so what was
        // stored is in that one file (a copy of it taken while stopped is complete).
        shared.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The settings read only at start that differ between two configs.
fn restart_only_changes(was: &Config, now: &Config) -> Vec<&'static str> {
    [
        ("server.listen", was.server.listen != now.server.listen),
        ("store.path", was.store.path != now.store.path),
        (
            "store.synchronous",
            was.store.synchronous != now.store.synchronous,
        ),
        (
            "server.max_connections",
            was.server.max_connections != now.server.max_connections,
        ),
        (
            "server.header_read_timeout",
            was.server.header_read_timeout != now.server.header_read_timeout,
        ),
        (
            "admin.listen",
            was.admin.as_ref().map(|a| a.listen) != now.admin.as_ref().map(|a| a.listen),
        ),
    ]
    .into_iter()
    .filter_map(|(setting, changed)| changed.then_some(setting))
    .collect()
}

/// Housekeeping: metrics gauges, pruning, SIGHUP, config file watching, the quiet-period alert.
async fn background(
    shared: Arc<Shared>,
    stop: CancellationToken,
    mut watched: Watch,
    mut hup: Hangup,
    mut stranded_unchecked: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = 0i64;
    let mut quiet = crate::quiet::QuietAlert::default();
    // Whether the last call's time was read from the store (see `Shared::restore_last_call`).
    let mut last_call_read = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = recv_hangup(&mut hup) => {
                let _ = shared.reload("SIGHUP").await;
            }
            _ = tick.tick() => {
                // First, so that `now` below is already on the caught-up timeline.
                shared.follow_wall_clock().await;
                let now = shared.clock.now_ms();
                let live = shared.live.load_full();
                if !last_call_read {
                    last_call_read = shared.restore_last_call().await;
                }
                if stranded_unchecked {
                    stranded_unchecked = warn_stranded(&live.config, &shared.store).await.is_err();
                }
                shared.dead_letter_orphans().await;
                if let Ok(stats) = shared.store.stats().await {
                    crate::metrics::queue(&stats, now);
                }
                if now - last_prune > 3_600_000 {
                    last_prune = now;
                    let before = now - live.config.delivery.keep_delivered.as_millis() as i64;
                    match shared.store.prune(before).await {
                        Ok(n) if n > 0 => tracing::info!(calls = n, "pruned finished calls past retention"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "pruning failed"),
                    }
                    shared.save_last_call().await;
                }
                if live.config.server.watch_config
                    && watched.settled_change(
                        snapshot(&shared.config_path, live.config.templates.dir()),
                        &shared.applied(),
                    )
                {
                    let _ = shared.reload("file change").await;
                }
                match &live.config.quiet_alert {
                    Some(q) => quiet.check(&shared, q, now).await,
                    None => quiet.forget(&shared).await,
                }
            }
        }
    }
}

/// How each watched file reads: the config file and every template (`*.hbs`) under
/// `templates_dir`, by path; None for a file that cannot be read.
type Snapshot = Vec<(PathBuf, Option<Content>)>;

/// What a file holds, as its length and a hash of its bytes. Content, not metadata: a rewrite
/// within one tick of the modification time (or by `cp -p`) is a change, and a file saved again
/// unchanged, or an edit a reload already applied, is not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    len: usize,
    hash: u64,
}

fn content(path: &Path) -> Option<Content> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(Content {
        len: bytes.len(),
        hash: h.finish(),
    })
}

/// Decides when `watch_config` reloads: once the files differ from what the last load read
/// ([`Shared::reload`] records that, whatever triggered it) and look the same on two looks in a
/// row (one tick apart). A file caught while it is being written (empty, or cut off where a
/// valid YAML prefix leaves out rules or channels) is not loaded; the finished file is, once
/// the writer is done.
#[derive(Debug)]
struct Watch {
    /// The files at the previous look.
    seen: Snapshot,
}

impl Watch {
    fn new(now: Snapshot) -> Watch {
        Watch { seen: now }
    }

    /// Takes a new look; true when the files differ from `applied` and have stopped changing.
    fn settled_change(&mut self, now: Snapshot, applied: &Snapshot) -> bool {
        let settled = now == self.seen;
        self.seen = now;
        settled && self.seen != *applied
    }
}

/// The config file and every template file under `templates_dir`, as they are now.
fn snapshot(config_path: &Path, templates_dir: &Path) -> Snapshot {
    let mut files = vec![config_path.to_path_buf()];
    let mut stack = vec![templates_dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                // Not through a symlink to a directory, as the renderer does not: two links to
                // a parent would make the walk endless (before the daemon even listens).
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "hbs") {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let c = content(&p);
            (p, c)
        })
        .collect()
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup() -> Hangup {
    None
}

async fn recv_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    recv_signal(h.as_mut()).await;
    #[cfg(not(unix))]
    {
        let _ = h;
        std::future::pending::<()>().await
    }
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when it is
/// first awaited, so a signal that arrives while the daemon starts up is not lost (nor fatal).
#[cfg(unix)]
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            _ = recv_signal(term.as_mut()) => {}
            _ = recv_signal(int.as_mut()) => {}
        }
    }
}

#[cfg(unix)]
async fn recv_signal(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> impl Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(files: &[(&str, usize)]) -> Snapshot {
        files
            .iter()
            .map(|(p, len)| {
                let c = Content { len: *len, hash: 7 };
                (PathBuf::from(p), Some(c))
            })
            .collect()
    }

    #[test]
    fn a_change_is_reloaded_once_it_has_stopped_changing() {
        let mut applied = look(&[("c.yaml", 100)]);
        let mut w = Watch::new(applied.clone());
        assert!(
            !w.settled_change(look(&[("c.yaml", 100)]), &applied),
            "nothing changed"
        );
        // Caught half-written: not yet.
        assert!(!w.settled_change(look(&[("c.yaml", 0)]), &applied));
        // Still being written: not yet.
        assert!(!w.settled_change(look(&[("c.yaml", 60)]), &applied));
        assert!(!w.settled_change(look(&[("c.yaml", 120)]), &applied));
        // The same on the next look: reload (which records what it read), once.
        assert!(w.settled_change(look(&[("c.yaml", 120)]), &applied));
        applied = look(&[("c.yaml", 120)]);
        assert!(!w.settled_change(look(&[("c.yaml", 120)]), &applied));
        // A template that comes and goes between two looks leaves things as loaded.
        assert!(!w.settled_change(look(&[("c.yaml", 120), ("t/a.hbs", 5)]), &applied));
        assert!(!w.settled_change(look(&[("c.yaml", 120)]), &applied));
        assert!(!w.settled_change(look(&[("c.yaml", 120)]), &applied));
        // A template added for good is a change.
        assert!(!w.settled_change(look(&[("c.yaml", 120), ("t/b.hbs", 5)]), &applied));
        assert!(w.settled_change(look(&[("c.yaml", 120), ("t/b.hbs", 5)]), &applied));
    }

    /// SIGHUP or `POST /-/reload` applied the edit before the watch settled on it: the watch
    /// does not load the same files again.
    #[test]
    fn an_edit_another_reload_applied_is_not_reloaded_again() {
        let mut w = Watch::new(look(&[("c.yaml", 100)]));
        assert!(!w.settled_change(look(&[("c.yaml", 120)]), &look(&[("c.yaml", 100)])));
        let applied = look(&[("c.yaml", 120)]);
        assert!(!w.settled_change(look(&[("c.yaml", 120)]), &applied));
        assert!(!w.settled_change(look(&[("c.yaml", 120)]), &applied));
    }

    #[test]
    fn a_rewrite_that_keeps_the_modification_time_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "server: {}\nrules: [a]\n").unwrap();
        let before = content(&path).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, "server: {}\nrules: [b]\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_ne!(content(&path).unwrap(), before);
        // Saved again as it was: no change.
        std::fs::write(&path, "server: {}\nrules: [a]\n").unwrap();
        assert_eq!(content(&path).unwrap(), before);
    }
}
