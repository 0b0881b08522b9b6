//! Delivery: claim due deliveries, render, pace, send, record.
//!
//! One lane per channel claims that channel's due rows (oldest first) and sends them with the
//! channel's concurrency (1: one at a time, oldest first), so a slow or failing destination
//! never delays the others. The backlog lives in the store, not in memory: a lane holds at most
//! a few claimed rows at a time. Each attempt ends in one [`Recorded`] state: done, retry at a
//! computed time (backoff with jitter, never sooner than the destination's `Retry-After`), or
//! dead once the retry window (`give_up_after`) is over or the failure is permanent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::Live;
use crate::clock::SharedClock;
use crate::notify::{self, Meta, Outcome};
use crate::render::{self, Message};
use crate::store::{Attempt, Claimed, Recorded, Store};

/// Claimed rows per lane and unit of concurrency.
const CLAIM_FACTOR: usize = 8;
/// Most outcomes written in one store job.
const RECORD_BATCH: usize = 256;
/// Longest a lane sleeps before looking at the store again (retries fall due, replays arrive
/// from the CLI).
const POLL: Duration = Duration::from_millis(1000);

/// When the next attempt should be, or None to give up. `attempt` is the one just made
/// (1-based); `jitter` in [0, 1) spreads the wait over 80%..120% of the scheduled one.
pub fn next_attempt_at(
    schedule: &[Duration],
    attempt: u32,
    now_ms: i64,
    window_start_ms: i64,
    give_up_after: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Option<i64> {
    let idx = (attempt.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
    let base = schedule
        .get(idx)
        .copied()
        .unwrap_or(Duration::from_secs(60));
    let jittered = base.as_secs_f64() * (0.8 + 0.4 * jitter.clamp(0.0, 1.0));
    let wait = jittered.max(retry_after.map_or(0.0, |d| d.as_secs_f64()));
    // Saturating: config caps the waits at ten years, but nothing here may overflow.
    let next = now_ms.saturating_add((wait * 1000.0) as i64);
    let window = i64::try_from(give_up_after.as_millis()).unwrap_or(i64::MAX);
    let deadline = window_start_ms.saturating_add(window);
    (next <= deadline).then_some(next)
}

/// A token bucket that hands out send times in order: `rate` per second, `burst` at once.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    pub fn new(rate: f64, burst: u32, now: Instant) -> Pacer {
        Pacer {
            rate,
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    pub fn set_rate(&mut self, rate: f64, burst: u32) {
        self.rate = rate;
        self.burst = f64::from(burst.max(1));
        self.tokens = self.tokens.min(self.burst);
    }

    /// Reserves the next slot; returns how long to wait before using it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Destinations that asked us to wait (429 with `Retry-After`, a refused login), by pause key
/// (`ChannelKind::pause_key`).
#[derive(Debug, Default)]
pub struct Pauses(HashMap<String, Instant>);

impl Pauses {
    /// Nothing goes to `key` for `after` from `now`; a longer pause already in force stays.
    pub fn pause(&mut self, key: String, after: Duration, now: Instant) {
        let until = now
            .checked_add(after)
            .unwrap_or_else(|| now + notify::slack::MAX_RATE_LIMIT_WAIT);
        let entry = self.0.entry(key).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// How long `key` is still paused at `now` (zero when it is not).
    pub fn remaining(&mut self, key: &str, now: Instant) -> Duration {
        match self.0.get(key) {
            Some(until) if *until > now => *until - now,
            Some(_) => {
                self.0.remove(key);
                Duration::ZERO
            }
            None => Duration::ZERO,
        }
    }
}

/// Runs `fut`; a panic inside it comes back as `Err` with its message.
async fn unless_it_panics<T>(fut: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into())
        })
}

/// An outcome on its way to the store, holding one of the lane's `ahead` slots until written.
type Unrecorded = (Attempt, tokio::sync::OwnedSemaphorePermit);

/// Where a lane's senders leave outcomes for its recorder.
struct Outbox {
    tx: tokio::sync::mpsc::UnboundedSender<Unrecorded>,
    /// Bounds the outcomes not yet written (what a crash would repeat).
    ahead: Arc<tokio::sync::Semaphore>,
}

pub struct Worker {
    store: Store,
    live: Arc<arc_swap::ArcSwap<Live>>,
    clock: SharedClock,
    pacers: Mutex<HashMap<String, Arc<Mutex<Pacer>>>>,
    /// Destinations that asked us to wait, by pause key (see [`Pauses`]): nothing is
    /// sent to them before this instant, not only the rate-limited message.
    paused: Mutex<Pauses>,
    wake: watch::Sender<u64>,
    /// The replay command a dead delivery's log line names, with the daemon's own `--config`:
    /// the default one, from an operator's shell, is another store or none.
    replay: String,
}

impl Worker {
    pub fn new(
        store: Store,
        live: Arc<arc_swap::ArcSwap<Live>>,
        clock: SharedClock,
        config_path: &std::path::Path,
    ) -> Arc<Worker> {
        let path = config_path.display().to_string();
        let quoted = if path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c))
        {
            path
        } else {
            format!("'{}'", path.replace('\'', r"'\''"))
        };
        Arc::new(Worker {
            store,
            live,
            clock,
            pacers: Mutex::new(HashMap::new()),
            paused: Mutex::new(Pauses::default()),
            wake: watch::channel(0).0,
            replay: format!("callnotify deliveries retry --config {quoted}"),
        })
    }

    /// Tells the lanes there is new work (a call was stored, the config changed).
    pub fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs a lane per configured channel until `shutdown`; lanes come and go with reloads.
    /// Returns when every lane has stopped (in-flight sends finished).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut lanes: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut wake = self.wake.subscribe();
        loop {
            let live = self.live.load_full();
            lanes.retain(|_, h| !h.is_finished());
            for name in live.config.channels.keys() {
                if !lanes.contains_key(name) {
                    let lane = tokio::spawn(self.clone().lane(name.clone(), shutdown.clone()));
                    lanes.insert(name.clone(), lane);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.changed() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        for (_, lane) in lanes {
            let _ = lane.await;
        }
    }

    /// Claims, sends and records one channel's deliveries until shutdown or until a reload
    /// removes the channel. Attempts are recorded by a companion task, so sending goes on while
    /// the previous outcomes commit; the lane returns once every outcome is written.
    async fn lane(self: Arc<Self>, name: String, shutdown: CancellationToken) {
        // Outcomes sent but not yet recorded, at most: the claim size of the channel's
        // concurrency when the lane started. A crash repeats at most these (plus those in flight).
        let ahead = {
            let live = self.live.load();
            let n = live.config.channels.get(&name).map_or(1, |c| c.concurrency);
            n * CLAIM_FACTOR
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let recorder = tokio::spawn(
            self.clone()
                .recorder(rx, shutdown.clone())
                .in_current_span(),
        );
        let outbox = Outbox {
            tx,
            ahead: Arc::new(tokio::sync::Semaphore::new(ahead)),
        };
        self.send_loop(&name, &outbox, &shutdown).await;
        drop(outbox);
        let _ = recorder.await;
    }

    async fn send_loop(
        self: &Arc<Self>,
        name: &str,
        outbox: &Outbox,
        shutdown: &CancellationToken,
    ) {
        let mut wake = self.wake.subscribe();
        // Claims failed in a row: the first is logged, and the claim that works again, not each
        // try in between (one line a second per channel for as long as the store is away).
        let mut failures = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let live = self.live.load_full();
            let Some(channel) = live.config.channels.get(name) else {
                return; // the channel was removed by a reload
            };
            let concurrency = channel.concurrency;
            let now = self.clock.now_ms();
            let batch = match self
                .store
                .claim(name.to_string(), now, concurrency * CLAIM_FACTOR)
                .await
            {
                Ok(b) => {
                    if failures > 0 {
                        tracing::info!(channel = %name, failures, "claiming deliveries again: the store is back");
                        failures = 0;
                    }
                    b
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::error!(channel = %name, error = %e, "cannot claim deliveries; trying again every second");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                let next = self.store.next_due(name.to_string()).await.ok().flatten();
                let wait = next.map_or(POLL, |t| {
                    Duration::from_millis((t - now).clamp(1, POLL.as_millis() as i64) as u64)
                });
                wake.borrow_and_update();
                tokio::select! {
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            futures_util::stream::iter(batch)
                .for_each_concurrent(concurrency, |d| async move {
                    self.deliver(d, shutdown, Some(outbox)).await;
                })
                .await;
        }
    }

    /// Writes a lane's outcomes: whatever finished while the previous write committed goes in
    /// the next one. Runs until the lane has stopped and every outcome is written.
    async fn recorder(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Unrecorded>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
            let (attempts, permits): (Vec<Attempt>, Vec<_>) = batch.drain(..).unzip();
            self.record(attempts, &shutdown).await;
            drop(permits);
        }
    }

    /// Claims one due delivery of any channel and delivers it. For tests and tools that want to
    /// drain the queue step by step.
    pub async fn deliver_next(self: &Arc<Self>) -> Option<(i64, Recorded)> {
        let live = self.live.load_full();
        let now = self.clock.now_ms();
        for name in live.config.channels.keys() {
            if let Ok(mut batch) = self.store.claim(name.clone(), now, 1).await {
                if let Some(d) = batch.pop() {
                    let id = d.id;
                    let recorded = self.deliver(d, &CancellationToken::new(), None).await;
                    return Some((id, recorded?));
                }
            }
        }
        None
    }

    /// One attempt at one delivery, recorded. None when shutdown interrupted it before sending
    /// (the delivery is back in the queue).
    async fn deliver(
        self: &Arc<Self>,
        d: Claimed,
        shutdown: &CancellationToken,
        outbox: Option<&Outbox>,
    ) -> Option<Recorded> {
        let attempt = d.attempts + 1;
        let span = tracing::info_span!("delivery", id = d.id, sid = %d.sid, rule = %d.rule, channel = %d.channel, attempt);
        async move {
            let started = std::time::Instant::now();
            let outcome = match unless_it_panics(self.attempt(&d, shutdown)).await {
                Ok(Some(o)) => o,
                Ok(None) => {
                    let _ = self.store.release(d.id).await;
                    return None;
                }
                // A bug met while rendering or sending: the delivery goes dead with the reason
                // (replayable once fixed) instead of taking the lane down with it and staying
                // `sending` until the next start.
                Err(panic) => Outcome::Permanent {
                    error: format!("internal error, a bug in callnotify (please report it): {panic}"),
                },
            };
            // The config as it is now (a reload may have come during the attempt).
            let live = self.live.load_full();
            if let (Outcome::Retry { after: Some(after), .. }, Some(channel)) =
                (&outcome, live.config.channels.get(&d.channel))
            {
                self.pause(channel.kind.pause_key(&d.channel), *after);
            }
            // A clock step while this was in flight moved the stored window with the clock;
            // the claimed one is on the old timeline.
            let window_start = match &outcome {
                Outcome::Retry { .. } => self
                    .store
                    .window_start(d.id)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(d.window_start),
                _ => d.window_start,
            };
            let now = self.clock.now_ms();
            let latency_ms = started.elapsed().as_millis() as i64;
            let delivery = &live.config.delivery;
            let (recorded, detail, label) = match outcome {
                Outcome::Delivered { detail } => (Recorded::Done, detail, "done"),
                Outcome::Retry { after, error } => {
                    match next_attempt_at(&delivery.retry_schedule, attempt, now, window_start, delivery.give_up_after, after, rand::random::<f64>()) {
                        Some(t) => (Recorded::Retry { next_attempt_at: t }, Some(error), "retried"),
                        None => (
                            Recorded::Dead,
                            Some(format!("gave up after {}: {error}", humantime::format_duration(delivery.give_up_after))),
                            "dead",
                        ),
                    }
                }
                Outcome::Permanent { error } => (Recorded::Dead, Some(error), "dead"),
            };
            crate::metrics::attempt(&d.channel, label);
            match &recorded {
                Recorded::Done => {
                    crate::metrics::delivered_after(&d.channel, (now - d.received_at).max(0) as f64 / 1000.0);
                    tracing::info!(outcome = label, latency_ms, detail = detail.as_deref().unwrap_or(""), "delivered");
                }
                Recorded::Retry { next_attempt_at } => {
                    let wait = Duration::from_millis((next_attempt_at - now).max(0) as u64);
                    // When, as a time: `retry_in` alone leaves the reader to add it to the line's.
                    let at = chrono::DateTime::from_timestamp_millis(*next_attempt_at)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                        .unwrap_or_default();
                    tracing::warn!(outcome = label, latency_ms, error = detail.as_deref().unwrap_or(""), retry_in = %humantime::format_duration(wait), next_attempt_at = %at, "delivery failed; will retry");
                }
                Recorded::Dead => {
                    // The command in a field too, for a runbook or a bot to take as it is.
                    let replay = format!("{} {}", self.replay, d.id);
                    tracing::error!(outcome = label, latency_ms, error = detail.as_deref().unwrap_or(""), replay = %replay, "delivery is dead; replay with `{replay}`");
                }
            }
            let done = Attempt { id: d.id, attempt, at: now, outcome: recorded.clone(), latency_ms, detail };
            match outbox {
                None => self.record(vec![done], shutdown).await,
                Some(outbox) => {
                    // The row stays `sending` until recorded, so nobody claims it twice; the lane
                    // sends its next message meanwhile.
                    let Ok(slot) = outbox.ahead.clone().acquire_owned().await else {
                        unreachable!("the lane's semaphore is never closed")
                    };
                    let _ = outbox.tx.send((done, slot));
                }
            }
            Some(recorded)
        }
        .instrument(span)
        .await
    }

    /// Records attempts. The destinations have answered; until that is recorded the rows stay
    /// `sending`, so keep trying while the store is unavailable (a locked or full disk clears
    /// up). Only a shutdown ends the wait: then the rows are requeued at the next start and sent
    /// again.
    async fn record(&self, attempts: Vec<Attempt>, shutdown: &CancellationToken) {
        let mut failures = 0u32;
        while let Err(e) = self.store.record(attempts.clone()).await {
            failures += 1;
            if shutdown.is_cancelled() {
                tracing::error!(error = %e, n = attempts.len(), "cannot record attempts; their deliveries are repeated after the next start");
                break;
            }
            if failures == 1 {
                tracing::error!(error = %e, "cannot record attempts; trying again every second");
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        if failures > 0 && !shutdown.is_cancelled() {
            tracing::info!(failures, "attempts recorded after the store came back");
        }
    }

    /// Wait for the destination, render and send. None when shutdown came first.
    ///
    /// The waits (a `Retry-After` pause, a pacing slot) can be long, so the channel is looked up
    /// again after each: a 429 that arrived meanwhile holds this send too, and a reload that
    /// removed or changed the channel applies to the message already claimed.
    async fn attempt(&self, d: &Claimed, shutdown: &CancellationToken) -> Option<Outcome> {
        let gone = || Outcome::Permanent {
            error: format!("channel {} is no longer in the config", d.channel),
        };
        let mut slot_taken = false;
        let live = loop {
            let live = self.live.load_full();
            let Some(channel) = live.config.channels.get(&d.channel) else {
                return Some(gone());
            };
            let mut wait = self.paused_for(&channel.kind.pause_key(&d.channel));
            if wait.is_zero() && !slot_taken {
                slot_taken = true;
                let key = channel.kind.pacing_key(&d.channel);
                wait = self.pace(&key, channel.max_per_second, channel.burst);
            }
            if wait.is_zero() {
                break live;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return None,
            }
        };
        if shutdown.is_cancelled() {
            return None;
        }
        let Some(channel) = live.config.channels.get(&d.channel) else {
            return Some(gone());
        };
        let now_type = channel.kind.type_name();
        if let Some(planned) = d.channel_type.as_deref().filter(|t| *t != now_type) {
            // Its template and recipients were written for the other type: rendering them for
            // this one would fail obscurely, or send what was meant for email to Slack.
            return Some(Outcome::Permanent {
                error: format!(
                    "channel {} had type {planned} when this notification was planned and has type {now_type} now; give it its type back and replay, or let this one go",
                    d.channel
                ),
            });
        }
        let call = match serde_json::from_str(&d.call_body)
            .map_err(|e| e.to_string())
            .and_then(|raw| crate::payload::from_call_object(raw).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                return Some(Outcome::Permanent {
                    error: format!("stored call cannot be read: {e}"),
                })
            }
        };
        let ctx = render::context(&call, &d.rule);
        let mut message =
            match live
                .config
                .templates
                .render(channel.kind.type_name(), &d.action, &ctx)
            {
                Ok(m) => m,
                Err(e) => {
                    crate::metrics::template_error();
                    return Some(Outcome::Permanent {
                        error: format!("template {}: {e}", d.action.template),
                    });
                }
            };
        if let Message::Slack { body } = &mut message {
            let cuts = notify::slack::fit(body);
            if cuts > 0 {
                crate::metrics::slack_truncated();
                tracing::info!(cuts, "message cut to fit Slack's limits");
            }
        }
        let meta = Meta {
            channel: &d.channel,
            rule: &d.rule,
            sid: &d.sid,
            event: &d.event,
            delivery_id: d.id,
        };
        let sending = std::time::Instant::now();
        let outcome = live.senders.send(&channel.kind, &message, &meta).await;
        crate::metrics::sent_in(&d.channel, sending.elapsed().as_secs_f64());
        Some(outcome)
    }

    /// Holds every send to a destination for `after` (its `Retry-After`).
    fn pause(&self, key: String, after: Duration) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        paused.pause(key, after, Instant::now());
    }

    /// How long a destination is still paused for.
    fn paused_for(&self, key: &str) -> Duration {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        paused.remaining(key, Instant::now())
    }

    fn pace(&self, key: &str, rate: f64, burst: u32) -> Duration {
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let pacer = {
            let mut pacers = self.pacers.lock().unwrap_or_else(|p| p.into_inner());
            pacers
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(Pacer::new(rate, burst, now))))
                .clone()
        };
        let mut p = pacer.lock().unwrap_or_else(|p| p.into_inner());
        p.set_rate(rate, burst);
        p.reserve(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn backoff_follows_the_schedule_and_repeats_the_last_wait() {
        let schedule = [S(10), S(30), S(120)];
        let at = |attempt| next_attempt_at(&schedule, attempt, 0, 0, S(86_400), None, 0.5).unwrap();
        assert_eq!(at(1), 10_000);
        assert_eq!(at(2), 30_000);
        assert_eq!(at(3), 120_000);
        assert_eq!(at(9), 120_000);
    }

    #[test]
    fn jitter_spreads_waits_between_80_and_120_percent() {
        let lo = next_attempt_at(&[S(100)], 1, 0, 0, S(1000), None, 0.0).unwrap();
        let hi = next_attempt_at(&[S(100)], 1, 0, 0, S(1000), None, 0.999_999).unwrap();
        assert_eq!(lo, 80_000);
        assert!((119_000..=120_000).contains(&hi), "{hi}");
    }

    #[test]
    fn retry_after_is_never_undercut() {
        let t = next_attempt_at(&[S(10)], 1, 5_000, 0, S(1000), Some(S(120)), 0.5).unwrap();
        assert_eq!(t, 125_000);
    }

    #[test]
    fn past_the_give_up_window_the_delivery_dies() {
        // 23h59m into a 24h window, a 10 minute wait would overshoot.
        let now = 86_340_000;
        assert_eq!(
            next_attempt_at(&[S(600)], 7, now, 0, S(86_400), None, 0.5),
            None
        );
        assert!(next_attempt_at(&[S(10)], 7, now, 0, S(86_400), None, 0.5).is_some());
    }

    #[test]
    fn huge_waits_and_windows_saturate_instead_of_overflowing() {
        let now = 1_700_000_000_000;
        let forever = Duration::MAX;
        // A window too long for i64 milliseconds is still open, not wrapped into the past.
        assert!(next_attempt_at(&[S(10)], 1, now, now, forever, None, 0.5).is_some());
        // A wait that long lands at the end of time rather than panicking or wrapping.
        let at = next_attempt_at(&[forever], 1, now, now, forever, None, 0.5).unwrap();
        assert_eq!(at, i64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_sends_at_the_rate_after_the_burst() {
        let start = Instant::now();
        let mut p = Pacer::new(1.0, 3, start);
        let waits: Vec<Duration> = (0..6).map(|_| p.reserve(Instant::now())).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3], S(1));
        assert_eq!(waits[4], S(2));
        assert_eq!(waits[5], S(3));
        tokio::time::advance(S(10)).await;
        // After a quiet spell the bucket is full again, but never above the burst.
        let waits: Vec<Duration> = (0..4).map(|_| p.reserve(Instant::now())).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3], S(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_pauses_the_destination_and_never_shortens() {
        let mut p = Pauses::default();
        p.pause("hook".into(), S(30), Instant::now());
        p.pause("hook".into(), S(5), Instant::now()); // a shorter one does not cut it
        assert_eq!(p.remaining("hook", Instant::now()), S(30));
        assert_eq!(p.remaining("other", Instant::now()), Duration::ZERO);
        tokio::time::advance(S(20)).await;
        assert_eq!(p.remaining("hook", Instant::now()), S(10));
        tokio::time::advance(S(10)).await;
        assert_eq!(p.remaining("hook", Instant::now()), Duration::ZERO);
        assert!(p.0.is_empty(), "an expired pause is forgotten");
        // A pause past what an Instant can hold does not panic the lane.
        p.pause("hook".into(), Duration::MAX, Instant::now());
        assert_eq!(
            p.remaining("hook", Instant::now()),
            notify::slack::MAX_RATE_LIMIT_WAIT
        );
    }

    #[tokio::test]
    async fn a_panic_while_sending_becomes_an_error_not_a_dead_lane() {
        assert_eq!(unless_it_panics(async { 7 }).await, Ok(7));
        let id = 42;
        let err = unless_it_panics(async move {
            if id == 42 {
                panic!("index out of bounds for delivery {id}");
            }
        })
        .await;
        assert_eq!(err, Err("index out of bounds for delivery 42".into()));
        assert_eq!(
            unless_it_panics(async { std::panic::panic_any(3u8) }).await,
            Err::<(), _>("a panic without a message".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unpaced_channel_never_waits() {
        let mut p = Pacer::new(0.0, 1, Instant::now());
        assert!((0..100).all(|_| p.reserve(Instant::now()).is_zero()));
    }
}
