//! The quiet-period alert: when no call has arrived for a while within business hours, notify a
//! channel once, and once more when calls resume. It catches a changed Air URL or token before a
//! day of calls is missed.
//!
//! The alert is queued like any notification (a synthetic call with event `QUIET_ALERT` or
//! `CALLS_RESUMED`), so it is retried and dead-lettered like the rest.

use chrono::{Datelike, TimeZone};

use crate::app::Shared;
use crate::config::QuietAlertConfig;
use crate::render::{duration_human, LocalOffset};
use crate::rules::Action;
use crate::store::NewDelivery;

/// What the alert should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    AlertQuiet,
    AlertResumed,
}

/// Pure decision. `since_ms` is the last call, or the daemon's start when there was none since.
pub fn decide(
    cfg: &QuietAlertConfig,
    alerted: bool,
    since_ms: i64,
    last_call_ms: i64,
    alerted_at_ms: i64,
    now_ms: i64,
) -> Decision {
    if alerted {
        return if last_call_ms > alerted_at_ms {
            Decision::AlertResumed
        } else {
            Decision::Nothing
        };
    }
    let quiet_for = now_ms - since_ms;
    if quiet_for >= cfg.after.as_millis() as i64 && in_business_hours(cfg, now_ms) {
        Decision::AlertQuiet
    } else {
        Decision::Nothing
    }
}

/// Whether `now_ms` falls in the configured days and hours, in the configured time zone.
pub fn in_business_hours(cfg: &QuietAlertConfig, now_ms: i64) -> bool {
    let Some(zone) = LocalOffset::at(&cfg.tz, now_ms) else {
        return false;
    };
    let Some(t) = zone.fixed.timestamp_millis_opt(now_ms).single() else {
        return false;
    };
    if !cfg.days.is_empty() && !cfg.days.contains(&t.weekday()) {
        return false;
    }
    match cfg.hours {
        None => true,
        Some((start, end)) => {
            let time = t.time();
            if start <= end {
                time >= start && time < end
            } else {
                time >= start || time < end
            }
        }
    }
}

/// Where the store keeps when the quiet alert went out (0: calls resumed since), so a restart
/// while it is in force neither repeats it nor loses the "calls resumed" message.
const ALERTED_AT: &str = "quiet_alerted_at";

/// The alert's state in a running daemon.
#[derive(Debug, Default)]
pub struct QuietAlert {
    alerted_at: Option<i64>,
    started_at: Option<i64>,
    /// Whether `alerted_at` was read back from the store.
    loaded: bool,
}

impl QuietAlert {
    /// With the alert turned off, forgets that one is out (once), so turning it on again later
    /// does not open with a "calls are arriving again" nobody was waiting for.
    pub async fn forget(&mut self, shared: &Shared) {
        if self.loaded && self.alerted_at.is_none() {
            return;
        }
        match shared.store.set_meta(ALERTED_AT.into(), "0".into()).await {
            Ok(()) => {
                self.loaded = true;
                self.alerted_at = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot clear the quiet alert's state; trying again")
            }
        }
    }

    pub async fn check(&mut self, shared: &Shared, cfg: &QuietAlertConfig, now_ms: i64) {
        if !self.loaded {
            match shared.store.get_meta(ALERTED_AT.into()).await {
                Ok(at) => {
                    self.loaded = true;
                    self.alerted_at = at.and_then(|v| v.parse().ok()).filter(|t| *t > 0);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the quiet alert's state; trying again");
                    return;
                }
            }
        }
        let started = *self.started_at.get_or_insert(now_ms);
        let last = shared.last_call_ms();
        let since = last.max(started);
        let decision = decide(
            cfg,
            self.alerted_at.is_some(),
            since,
            last,
            self.alerted_at.unwrap_or(0),
            now_ms,
        );
        let quiet = match decision {
            Decision::Nothing => return,
            Decision::AlertQuiet => true,
            Decision::AlertResumed => false,
        };
        let quiet_for = duration_human(((now_ms - since).max(0) / 1000) as f64);
        let last_at = if last > 0 {
            chrono::Utc
                .timestamp_millis_opt(last)
                .single()
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        } else {
            "none since start".into()
        };
        let (event, body, action) = notification(cfg, quiet, &quiet_for, &last_at, now_ms);
        let channel_type = shared
            .live
            .load()
            .config
            .channels
            .get(&action.channel)
            .map(|c| c.kind.type_name());
        let owed = vec![NewDelivery {
            rule: "quiet_alert".into(),
            action_idx: 0,
            action,
            channel_type,
        }];
        let sid = body["sid"].as_str().unwrap_or_default().to_string();
        let alerted_at = quiet.then_some(now_ms);
        let state = (ALERTED_AT.to_string(), alerted_at.unwrap_or(0).to_string());
        match shared
            .store
            .insert_call_noting(sid, event, body.to_string(), now_ms, owed, state)
            .await
        {
            Ok(_) => {
                tracing::warn!(event, quiet_for = %quiet_for, channel = %cfg.channel, "quiet-period alert queued");
                self.alerted_at = alerted_at;
                shared.worker.wake();
            }
            Err(e) => tracing::error!(error = %e, "cannot queue the quiet-period alert"),
        }
    }
}

/// The alert as a notification: its event, the synthetic call it renders against (`quietFor`,
/// `lastCallAt`) and the action sending it. `check` renders it too, so a broken template or
/// recipient shows up before the day it is needed.
pub fn notification(
    cfg: &QuietAlertConfig,
    quiet: bool,
    quiet_for: &str,
    last_at: &str,
    now_ms: i64,
) -> (&'static str, serde_json::Value, Action) {
    let (event, template) = if quiet {
        ("QUIET_ALERT", "builtin/quiet")
    } else {
        ("CALLS_RESUMED", "builtin/resumed")
    };
    let body = serde_json::json!({
        "sid": format!("{}-{now_ms}", event.to_ascii_lowercase()),
        "cachedLeadName": "callnotify",
        "quietFor": quiet_for,
        "lastCallAt": last_at,
    });
    let action = Action {
        channel: cfg.channel.clone(),
        template: template.into(),
        to: cfg.to.clone(),
        subject: Some(if quiet {
            format!("callnotify: no calls for {quiet_for}")
        } else {
            "callnotify: calls are arriving again".into()
        }),
    };
    (event, body, action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(hours: Option<(&str, &str)>) -> QuietAlertConfig {
        QuietAlertConfig {
            after: Duration::from_secs(7200),
            channel: "ops".into(),
            to: vec![],
            hours: hours.map(|(a, b)| {
                (
                    chrono::NaiveTime::parse_from_str(a, "%H:%M").unwrap(),
                    chrono::NaiveTime::parse_from_str(b, "%H:%M").unwrap(),
                )
            }),
            days: vec![
                chrono::Weekday::Mon,
                chrono::Weekday::Tue,
                chrono::Weekday::Wed,
                chrono::Weekday::Thu,
                chrono::Weekday::Fri,
            ],
            tz: crate::render::time_zone("America/New_York").unwrap(),
        }
    }

    /// 2026-11-23 is a Monday; hh:mm in New York (UTC-5 in November).
    fn ny(day: u32, h: u32, m: u32) -> i64 {
        jiff::civil::date(2026, 11, day as i8)
            .at(h as i8, m as i8, 0, 0)
            .in_tz("America/New_York")
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    #[test]
    fn alerts_once_after_the_quiet_period_within_business_hours() {
        let c = cfg(Some(("09:00", "17:00")));
        let last = ny(23, 9, 30);
        assert_eq!(
            decide(&c, false, last, last, 0, ny(23, 11, 29)),
            Decision::Nothing
        );
        assert_eq!(
            decide(&c, false, last, last, 0, ny(23, 11, 30)),
            Decision::AlertQuiet
        );
        assert_eq!(
            decide(&c, true, last, last, ny(23, 11, 30), ny(23, 15, 0)),
            Decision::Nothing
        );
        assert_eq!(
            decide(&c, true, last, ny(23, 15, 5), ny(23, 11, 30), ny(23, 15, 6)),
            Decision::AlertResumed
        );
    }

    #[test]
    fn nights_and_weekends_are_not_quiet_periods() {
        let c = cfg(Some(("09:00", "17:00")));
        let last = ny(23, 16, 0);
        assert_eq!(
            decide(&c, false, last, last, 0, ny(23, 22, 0)),
            Decision::Nothing
        );
        // Saturday 2026-11-28, mid-day.
        assert_eq!(
            decide(&c, false, last, last, 0, ny(28, 12, 0)),
            Decision::Nothing
        );
        // Tuesday morning, well past two hours.
        assert_eq!(
            decide(&c, false, last, last, 0, ny(24, 9, 1)),
            Decision::AlertQuiet
        );
    }
}
