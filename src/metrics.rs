//! Prometheus metrics: one process-wide recorder, rendered by `GET /metrics`.
//!
//! Names (all prefixed `callnotify_`): `calls_received_total{result}`, `rules_matched_total{rule}`,
//! `deliveries_total{channel,outcome}`, `delivery_attempts_total{channel}`,
//! `delivery_latency_seconds{channel}` (from receipt to done), `send_duration_seconds{channel}`
//! (one send to the destination, any outcome), `template_errors_total`,
//! `slack_truncations_total`, `config_reloads_total{result}`, `config_last_reload_successful`
//! (1, or 0 from a refused reload until one succeeds), `queue_depth{state}`,
//! `oldest_pending_age_seconds` (the longest wait of a pending or sending delivery since it was
//! queued or replayed), `last_call_received_timestamp_seconds`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder on first use and returns the handle that renders it.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("callnotify_delivery_latency_seconds".into()),
                &[
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                    3600.0, 21600.0, 86400.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("callnotify_send_duration_seconds".into()),
                    &[
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ],
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; the handle still renders ours.
        if metrics::set_global_recorder(recorder).is_ok() {
            describe();
        }
        handle
    })
}

/// `# HELP` for every metric: what it counts and in which unit, shown by Prometheus and Grafana
/// next to the series.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "callnotify_calls_received_total",
        "Webhook requests by result: accepted, duplicate, rejected (bad request), unauthorized, unavailable (store down, answered 503)."
    );
    describe_counter!(
        "callnotify_rules_matched_total",
        "Accepted calls each rule matched."
    );
    describe_counter!(
        "callnotify_deliveries_total",
        "Delivery attempts by outcome: done, retried (another attempt is scheduled) or dead (replay with `deliveries retry`); dead also counts deliveries whose channel left the config."
    );
    describe_counter!(
        "callnotify_delivery_attempts_total",
        "Delivery attempts made, by channel."
    );
    describe_histogram!(
        "callnotify_delivery_latency_seconds",
        "Seconds from receiving a call to delivering one of its notifications, retries included."
    );
    describe_histogram!(
        "callnotify_send_duration_seconds",
        "Seconds one send to the destination took (Slack request, SMTP transaction), any outcome, waits excluded."
    );
    describe_counter!(
        "callnotify_template_errors_total",
        "Notifications that could not be rendered (each goes dead with the template's error)."
    );
    describe_counter!(
        "callnotify_slack_truncations_total",
        "Slack messages cut to fit Slack's limits."
    );
    describe_counter!(
        "callnotify_config_reloads_total",
        "Config reloads by result: success or failure (the running config was kept)."
    );
    describe_gauge!(
        "callnotify_config_last_reload_successful",
        "1 when the last reload succeeded (or none was tried), 0 from a refused reload until one succeeds."
    );
    describe_gauge!(
        "callnotify_queue_depth",
        "Unfinished deliveries by state: pending, sending, dead."
    );
    describe_gauge!(
        "callnotify_oldest_pending_age_seconds",
        "Seconds the longest-waiting pending or sending delivery has waited since it was queued or replayed; 0 when none waits."
    );
    describe_gauge!(
        "callnotify_last_call_received_timestamp_seconds",
        "Unix time in seconds of the last accepted call."
    );
}

pub fn call_received(result: &'static str) {
    metrics::counter!("callnotify_calls_received_total", "result" => result).increment(1);
}

pub fn rule_matched(rule: &str) {
    metrics::counter!("callnotify_rules_matched_total", "rule" => rule.to_string()).increment(1);
}

/// The last accepted call was at `unix_ms`.
pub fn last_call_at(unix_ms: i64) {
    metrics::gauge!("callnotify_last_call_received_timestamp_seconds").set(unix_ms as f64 / 1000.0);
}

/// Series that alerts are written against exist from the start, not only after their first
/// event: `calls_received_total` at 0, and the last call's time as the store remembers it
/// (an alert on `time() - last_call_received_timestamp_seconds` works right after a restart).
pub fn at_start(last_call_ms: i64) {
    for result in [
        "accepted",
        "duplicate",
        "rejected",
        "unauthorized",
        "unavailable",
    ] {
        metrics::counter!("callnotify_calls_received_total", "result" => result).increment(0);
    }
    metrics::counter!("callnotify_template_errors_total").increment(0);
    // At 0 from the start, so `increase(...{result="failure"}[1h])` sees the first refused reload
    // (a series that appears at 1 has no increase).
    for result in ["success", "failure"] {
        metrics::counter!("callnotify_config_reloads_total", "result" => result).increment(0);
    }
    metrics::gauge!("callnotify_config_last_reload_successful").set(1.0);
    metrics::counter!("callnotify_slack_truncations_total").increment(0);
    if last_call_ms > 0 {
        last_call_at(last_call_ms);
    }
}

/// Each channel's delivery series exist from when the channel is configured (at start, or by a
/// reload), at 0: `increase(callnotify_deliveries_total{outcome="dead"}[1h]) > 0` then sees a
/// channel's first dead delivery (a series that appears at 1 has no increase). Counters already
/// there keep their values.
pub fn channels<'a>(names: impl IntoIterator<Item = &'a String>) {
    for channel in names {
        metrics::counter!("callnotify_delivery_attempts_total", "channel" => channel.clone())
            .increment(0);
        for outcome in ["done", "retried", "dead"] {
            metrics::counter!("callnotify_deliveries_total", "channel" => channel.clone(), "outcome" => outcome).increment(0);
        }
    }
}

/// Deliveries that went dead without an attempt (their channel left the config).
pub fn dead_without_attempt(channel: &str, n: usize) {
    metrics::counter!("callnotify_deliveries_total", "channel" => channel.to_string(), "outcome" => "dead").increment(n as u64);
}

pub fn attempt(channel: &str, outcome: &'static str) {
    metrics::counter!("callnotify_delivery_attempts_total", "channel" => channel.to_string())
        .increment(1);
    metrics::counter!("callnotify_deliveries_total", "channel" => channel.to_string(), "outcome" => outcome).increment(1);
}

pub fn delivered_after(channel: &str, seconds: f64) {
    metrics::histogram!("callnotify_delivery_latency_seconds", "channel" => channel.to_string())
        .record(seconds);
}

/// One send to a destination (a Slack POST, an SMTP transaction) took `seconds`, whatever its
/// outcome: how slow the destination answers, without pacing and retry waits.
pub fn sent_in(channel: &str, seconds: f64) {
    metrics::histogram!("callnotify_send_duration_seconds", "channel" => channel.to_string())
        .record(seconds);
}

pub fn template_error() {
    metrics::counter!("callnotify_template_errors_total").increment(1);
}

pub fn slack_truncated() {
    metrics::counter!("callnotify_slack_truncations_total").increment(1);
}

/// A reload ended in `result` ("success" or "failure"). The gauge stays 0 from a refused reload
/// until one succeeds: the running config is then not what the file says, however long ago the
/// refusal was (a counter's increase over a window forgets it).
pub fn reload(result: &'static str) {
    metrics::counter!("callnotify_config_reloads_total", "result" => result).increment(1);
    metrics::gauge!("callnotify_config_last_reload_successful").set(if result == "success" {
        1.0
    } else {
        0.0
    });
}

pub fn queue(stats: &crate::store::Stats, now_ms: i64) {
    for (state, n) in [
        ("pending", stats.pending),
        ("sending", stats.sending),
        ("dead", stats.dead),
    ] {
        metrics::gauge!("callnotify_queue_depth", "state" => state).set(n as f64);
    }
    let age = stats
        .oldest_pending_since
        .map(|t| (now_ms - t).max(0) as f64 / 1000.0)
        .unwrap_or(0.0);
    metrics::gauge!("callnotify_oldest_pending_age_seconds").set(age);
}
