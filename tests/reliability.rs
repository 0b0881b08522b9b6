//! Never lose a notification, proven with the real binary: retries, Retry-After, dead letters
//! and their replay, give-up windows, SIGTERM, pacing, isolation between destinations, SIGKILL
//! during a stream of calls, a store that cannot commit, and a lane that sends on while its
//! outcomes wait for the store.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// Templates that render just the call's sid, so every message says which call it is.
fn templates() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for (path, text) in [
        ("slack/sid.hbs", "{{sid}}"),
        ("log/sid.hbs", "{{sid}}"),
        ("email/sid.txt.hbs", "{{sid}}"),
    ] {
        let p = t.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    t
}

/// A config with the given delivery section, channels and one rule notifying `notify`.
fn config(tpl: &Path, delivery: &str, channels: &str, notify: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  tokens: ["{TOKEN}"]
store:
  path: "{{dir}}/store.db"
templates_dir: "{tpl}"
delivery: {delivery}
channels:
{channels}
rules:
  - name: all
    notify: {notify}
"#,
        tpl = tpl.display()
    )
}

const FAST: &str = r#"{ retry_schedule: ["1s"], request_timeout: "1s" }"#;

fn slack_channel(name: &str, slack: &FakeSlack, extra: &str) -> String {
    format!(
        "  {name}: {{ type: slack, webhook_url: \"{}\", max_per_second: 0 {extra} }}\n",
        slack.url
    )
}

/// An email channel `mail` sending to the SMTP server on 127.0.0.1:`port`, without TLS.
fn email_channel(port: u16) -> String {
    format!(
        "  mail:\n    type: email\n    smtp: {{ host: \"127.0.0.1\", port: {port}, tls: none }}\n    from: \"Call Bot <calls@example.com>\"\n"
    )
}

fn slack_only(tpl: &Path, slack: &FakeSlack, delivery: &str) -> String {
    config(
        tpl,
        delivery,
        &slack_channel("sales", slack, ""),
        "[{ channel: sales, template: slack/sid }]",
    )
}

fn sid_of(body: &Value) -> String {
    body["text"].as_str().unwrap_or("").trim().to_string()
}

fn call(sid: &str) -> String {
    with_sid(FIXTURE, sid)
}

async fn accept(d: &Daemon, sid: &str) {
    let (status, body) = d.post(&call(sid)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "accepted", "{body}");
}

fn by_sid<'a>(rows: &'a [Value], sid: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["sid"] == sid)
        .unwrap_or_else(|| panic!("no delivery for {sid}: {rows:?}"))
}

#[tokio::test]
async fn slack_500_then_200_is_delivered_once() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(500, "internal_error")]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CA500").await;
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CA500");
    assert_eq!(row["status"], "done", "{row}");
    assert_eq!(row["attempts"], 2, "{row}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got: Vec<u16> = slack.received().iter().map(|r| r.answered).collect();
    assert_eq!(got, [500, 200]);
    assert_eq!(slack.accepted().len(), 1);
}

#[tokio::test]
async fn slack_429_is_retried_no_sooner_than_retry_after() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(429, "rate_limited").retry_after(2)]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    for sid in ["CA429a", "CA429b", "CA429c"] {
        accept(&d, sid).await;
    }
    slack.wait_accepted(3, WAIT).await;
    let r = slack.received();
    assert_eq!(r.len(), 4);
    assert_eq!(r[0].answered, 429);
    // Slack's rate limit is per webhook: nothing goes to it until Retry-After has passed, not
    // just the rate-limited message.
    for later in &r[1..] {
        let gap = later.at - r[0].at;
        assert!(
            gap >= Duration::from_secs(2),
            "{} sent {gap:?} after a 429 with Retry-After: 2",
            sid_of(&later.body)
        );
    }
    let rows = d.wait_settled(WAIT).await;
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
}

/// The 429 arrives while the next message already waits for its pacing slot: that message
/// waits out the Retry-After too.
#[tokio::test]
async fn a_send_waiting_for_its_pacing_slot_honours_a_retry_after_that_came_meanwhile() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(429, "rate_limited").retry_after(8)]);
    // The second message's slot is 5 s away: the 429 is in long before it, even on a slow machine.
    let channels = format!(
        "  sales: {{ type: slack, webhook_url: \"{}\", max_per_second: 0.2, burst: 1, concurrency: 2 }}\n",
        slack.url
    );
    // One call owes the channel two messages: claimed together, sent by two senders.
    let notify =
        "[{ channel: sales, template: slack/sid }, { channel: sales, template: slack/sid }]";
    let d = Daemon::start(&config(tpl.path(), FAST, &channels, notify));
    accept(&d, "CApaced").await;
    slack.wait_accepted(2, WAIT).await;
    let r = slack.received();
    assert_eq!(r[0].answered, 429);
    for later in &r[1..] {
        let gap = later.at - r[0].at;
        assert!(
            gap >= Duration::from_secs(8),
            "sent {gap:?} after a 429 with Retry-After: 8"
        );
    }
}

/// Two channels on one webhook URL are one destination: a 429 to one holds the other.
#[tokio::test]
async fn channels_sharing_a_webhook_share_its_retry_after() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(429, "rate_limited").retry_after(8)]);
    let channels = ["sales", "sales_vip"]
        .map(|name| {
            format!(
                "  {name}: {{ type: slack, webhook_url: \"{}\", max_per_second: 0.2, burst: 1 }}\n",
                slack.url
            )
        })
        .concat();
    let notify =
        "[{ channel: sales, template: slack/sid }, { channel: sales_vip, template: slack/sid }]";
    let d = Daemon::start(&config(tpl.path(), FAST, &channels, notify));
    accept(&d, "CAshared").await;
    slack.wait_accepted(2, WAIT).await;
    let r = slack.received();
    assert_eq!(r[0].answered, 429);
    let gap = r[1].at - r[0].at;
    assert!(
        gap >= Duration::from_secs(8),
        "sent {gap:?} after a 429 with Retry-After: 8"
    );
}

/// A message the lane holds behind a Retry-After is not sent once a reload removed its channel
/// (say, because it posts to the wrong workspace): it goes dead, visible and replayable.
#[tokio::test]
async fn a_message_held_behind_a_pause_is_not_sent_after_a_reload_removed_its_channel() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(429, "rate_limited").retry_after(4)]);
    let channels = slack_channel("sales", &slack, "") + "  console: { type: log }\n";
    let notify =
        "[{ channel: sales, template: slack/sid }, { channel: sales, template: slack/sid }]";
    let d = Daemon::start(&config(tpl.path(), FAST, &channels, notify));
    accept(&d, "CAremoved").await;
    eventually("the 429", WAIT, || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    let yaml: String = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with("sales:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &d.config,
        yaml.replace(notify, "[{ channel: console, template: log/sid }]"),
    )
    .unwrap();
    d.signal("HUP");
    let rows = eventually("both deliveries dead", WAIT, || {
        let dead = d.deliveries(Some("dead"));
        (dead.len() == 2).then_some(dead)
    })
    .await;
    for row in &rows {
        let error = row["last_error"].as_str().unwrap_or_default();
        assert!(
            error.contains("channel sales is no longer in the config"),
            "{row}"
        );
    }
    assert_eq!(
        slack.received().len(),
        1,
        "sent to a channel a reload removed"
    );
}

#[tokio::test]
async fn slack_404_and_410_go_dead_with_slacks_answer() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([
        Reply::status(404, "channel_not_found"),
        Reply::status(410, "channel_is_archived"),
    ]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CA404").await;
    accept(&d, "CA410").await;
    let rows = d.wait_settled(WAIT).await;
    let (a, b) = (by_sid(&rows, "CA404"), by_sid(&rows, "CA410"));
    assert_eq!(
        (&a["status"], &b["status"]),
        (&"dead".into(), &"dead".into())
    );
    let err = |r: &Value| r["last_error"].as_str().unwrap_or("").to_string();
    assert!(
        err(a).contains("404") && err(a).contains("channel_not_found"),
        "{a}"
    );
    assert!(
        err(b).contains("410") && err(b).contains("channel_is_archived"),
        "{b}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        slack.received().len(),
        2,
        "a permanent failure is not retried"
    );
}

#[tokio::test]
async fn a_slack_redirect_is_not_followed_and_the_webhook_url_goes_nowhere_else() {
    // Followed, a 302 turned the POST into a GET elsewhere whose 200 counted as delivered, and
    // both redirects sent the secret webhook URL to the other host as the Referer.
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let elsewhere = FakeSlack::start().await;
    let target = elsewhere
        .url
        .replace("/services/T000/B000/XXXX", "/landing");
    slack.script([
        Reply::status(302, "").header("location", &target),
        Reply::status(307, "").header("location", &target),
    ]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CA302").await;
    accept(&d, "CA307").await;
    let rows = d.wait_settled(WAIT).await;
    for sid in ["CA302", "CA307"] {
        let row = by_sid(&rows, sid);
        let err = row["last_error"].as_str().unwrap_or("");
        assert_eq!(row["status"], "dead", "{row}");
        assert!(
            err.contains("redirect") && err.contains("127.0.0.1"),
            "{row}"
        );
        assert!(!err.contains("XXXX") && !err.contains("landing"), "{row}");
    }
    let seen: Vec<_> = elsewhere
        .received()
        .into_iter()
        .map(|r| (r.method, r.headers))
        .collect();
    assert!(seen.is_empty(), "the redirect was followed: {seen:?}");
    assert!(!d.all_logs().contains("XXXX"), "{}", d.all_logs());
}

#[tokio::test]
async fn a_response_that_never_comes_is_retried() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::ok().delayed(Duration::from_secs(5))]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAslow").await;
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAslow");
    assert_eq!(row["status"], "done", "{row}");
    assert_eq!(row["attempts"], 2, "{row}");
    let r = slack.received();
    assert_eq!(r.len(), 2);
    assert!(
        r[1].at - r[0].at < Duration::from_secs(4),
        "the timeout did not cut the wait"
    );
}

#[tokio::test]
async fn smtp_4xx_is_retried_and_5xx_is_dead() {
    let tpl = templates();
    let smtp = Smtp::start();
    smtp.set_mode("4xx");
    let channels = email_channel(smtp.port);
    let d = Daemon::start(&config(
        tpl.path(),
        FAST,
        &channels,
        r#"[{ channel: mail, to: ["a@example.com"], subject: "{{sid}}", template: email/sid }]"#,
    ));
    accept(&d, "CA4xx").await;
    let row = eventually("a 451 to be recorded", WAIT, || {
        let rows = d.deliveries(None);
        let r = rows.into_iter().find(|r| r["sid"] == "CA4xx")?;
        (r["attempts"].as_u64()? >= 1).then_some(r)
    })
    .await;
    assert_eq!(row["status"], "pending", "{row}");
    assert!(row["last_error"].as_str().unwrap().contains("451"), "{row}");
    smtp.set_mode("ok");
    let mails = smtp.wait_messages(1, WAIT).await;
    assert_eq!(mails[0]["subject"], "CA4xx");
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(by_sid(&rows, "CA4xx")["status"], "done");

    smtp.set_mode("5xx");
    accept(&d, "CA5xx").await;
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CA5xx");
    assert_eq!(row["status"], "dead", "{row}");
    assert!(row["last_error"].as_str().unwrap().contains("550"), "{row}");
    assert_eq!(row["attempts"], 1, "{row}");
    assert_eq!(smtp.messages().len(), 1);
}

#[tokio::test]
async fn a_recipient_the_server_refuses_does_not_cost_the_others_the_email() {
    let tpl = templates();
    let smtp = Smtp::start();
    let channels = email_channel(smtp.port);
    let d = Daemon::start(&config(
        tpl.path(),
        FAST,
        &channels,
        r#"[{ channel: mail, to: ["a@example.com", "unknown-owner@example.com", "b@example.com"], subject: "{{sid}}", template: email/sid }]"#,
    ));
    accept(&d, "CArcpt").await;
    let mails = smtp.wait_messages(1, WAIT).await;
    assert_eq!(
        mails[0]["rcpt_tos"],
        serde_json::json!(["a@example.com", "b@example.com"])
    );
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CArcpt");
    assert_eq!(row["status"], "done", "{row}");
    assert_eq!(row["attempts"], 1, "{row}");
    // The refusal is in the log line of the delivery, for whoever fixes the address.
    let log = d.logs();
    let line = log
        .lines()
        .find(|l| l.contains("\"delivered\"") && l.contains("CArcpt"))
        .unwrap_or_else(|| panic!("no delivered line for CArcpt:\n{log}"));
    assert!(
        line.contains("unknown-owner@example.com refused") && line.contains("550"),
        "{line}"
    );

    // Every recipient refused: the message is dead with the server's answer, as before.
    let d2 = Daemon::start(&config(
        tpl.path(),
        FAST,
        &channels,
        r#"[{ channel: mail, to: ["unknown@example.com"], subject: "{{sid}}", template: email/sid }]"#,
    ));
    accept(&d2, "CAnobody").await;
    let rows = d2.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAnobody");
    assert_eq!(row["status"], "dead", "{row}");
    assert!(row["last_error"].as_str().unwrap().contains("550"), "{row}");
    assert_eq!(smtp.messages().len(), 1);
}

#[tokio::test]
async fn a_refused_login_holds_that_login_and_not_another_channels_on_the_same_server() {
    // One SMTP server, two channels logging in to it as different users; one password is
    // wrong. Its emails wait for it to be fixed (a 60 s pause per try); the other's must not.
    let tpl = templates();
    let smtp = Smtp::start();
    smtp.set_logins(&["support:right"]);
    let channel = |name: &str, password: &str| {
        format!(
            "  {name}:\n    type: email\n    smtp: {{ host: \"127.0.0.1\", port: {}, tls: none, username: \"{name}\", password: \"{password}\" }}\n    from: \"calls@example.com\"\n",
            smtp.port
        )
    };
    let d = Daemon::start(&config(
        tpl.path(),
        FAST,
        &(channel("sales", "expired") + &channel("support", "right")),
        r#"[{ channel: sales, to: ["s@example.com"], subject: "{{sid}}", template: email/sid },
            { channel: support, to: ["t@example.com"], subject: "{{sid}}", template: email/sid }]"#,
    ));
    accept(&d, "CAlogin1").await;
    eventually("the refusal of sales' login to be recorded", WAIT, || {
        d.deliveries(Some("pending")).into_iter().find(|r| {
            r["channel"] == "sales"
                && r["last_error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("login refused")
        })
    })
    .await;
    accept(&d, "CAlogin2").await;
    let mails = smtp.wait_messages(2, WAIT).await;
    for m in &mails {
        assert_eq!(m["rcpt_tos"], serde_json::json!(["t@example.com"]), "{m}");
    }
    let sales: Vec<Value> = d
        .deliveries(None)
        .into_iter()
        .filter(|r| r["channel"] == "sales")
        .collect();
    // Waiting for their retry, or (claimed) for the pause to end.
    assert!(
        sales
            .iter()
            .all(|r| r["status"] == "pending" || r["status"] == "sending"),
        "{sales:?}"
    );
    assert_eq!(
        smtp.logins_tried()
            .iter()
            .filter(|l| *l == "sales refused")
            .count(),
        1,
        "sales tried again before its pause was over"
    );
}

#[tokio::test]
async fn an_smtp_server_that_is_down_is_retried() {
    let tpl = templates();
    // A port with nothing listening: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let channels = email_channel(port);
    let d = Daemon::start(&config(
        tpl.path(),
        FAST,
        &channels,
        r#"[{ channel: mail, to: ["a@example.com"], subject: "{{sid}}", template: email/sid }]"#,
    ));
    accept(&d, "CAsmtpdown").await;
    let row = eventually("two failed attempts", WAIT, || {
        let r = d.deliveries(None).into_iter().next()?;
        (r["attempts"].as_u64()? >= 2).then_some(r)
    })
    .await;
    assert_eq!(row["status"], "pending", "{row}");
    assert!(!row["last_error"].as_str().unwrap().is_empty(), "{row}");
}

#[tokio::test]
async fn dead_deliveries_are_listed_and_replayed_with_the_cli() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(404, "channel_not_found"));
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    for sid in ["CAdead1", "CAdead2", "CAdead3"] {
        accept(&d, sid).await;
    }
    d.wait_settled(WAIT).await;
    let out = d.cli(&["deliveries", "list", "--status", "dead"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sid in ["CAdead1", "CAdead2", "CAdead3"] {
        assert!(text.contains(sid), "{sid} not listed:\n{text}");
    }
    assert!(text.contains("channel_not_found"), "{text}");
    let dead = d.deliveries(Some("dead"));
    assert_eq!(dead.len(), 3);

    // Slack is fixed; replay one by id while the daemon runs, then the rest.
    slack.set_default(Reply::ok());
    let id = by_sid(&dead, "CAdead2")["id"].to_string();
    let out = d.cli(&["deliveries", "retry", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = slack.wait_accepted(1, WAIT).await;
    assert_eq!(sid_of(&got[0]), "CAdead2");
    assert_eq!(d.deliveries(Some("dead")).len(), 2);

    let out = d.cli(&["deliveries", "retry", "--all-dead"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    slack.wait_accepted(3, WAIT).await;
    let rows = d.wait_settled(WAIT).await;
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
    let sids: HashSet<String> = slack.accepted().iter().map(sid_of).collect();
    assert_eq!(sids.len(), 3);

    // Naming a delivery that is not dead (done, or no such id) says which and exits 1.
    let out = d.cli(&["deliveries", "retry", &id, "999999"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "delivery {id} was not retried: it is done: it was delivered"
        )) && err.contains("delivery 999999 was not retried: there is no such delivery"),
        "{err}"
    );
    assert_eq!(slack.accepted().len(), 3, "nothing was sent again");
}

/// After an outage is fixed, `deliveries retry --all-pending` sends what waits for its next
/// attempt now instead of at the end of the retry schedule (an hour here), once each.
#[tokio::test]
async fn pending_deliveries_are_made_due_now_with_the_cli() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(503, "down"));
    let d = Daemon::start(&slack_only(
        tpl.path(),
        &slack,
        r#"{ retry_schedule: ["1h"], request_timeout: "1s" }"#,
    ));
    for sid in ["CAwait1", "CAwait2"] {
        accept(&d, sid).await;
    }
    eventually("both tried once and waiting", WAIT, || {
        let rows = d.deliveries(Some("pending"));
        (rows.len() == 2 && rows.iter().all(|r| r["attempts"] == 1)).then_some(())
    })
    .await;

    slack.set_default(Reply::ok());
    let out = d.cli(&["deliveries", "retry", "--all-pending"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2 pending deliveries made due now\n"
    );
    slack.wait_accepted(2, WAIT).await;
    let rows = d.wait_settled(WAIT).await;
    assert!(
        rows.iter()
            .all(|r| r["status"] == "done" && r["attempts"] == 2),
        "{rows:?}"
    );
    assert_eq!(slack.accepted().len(), 2, "each sent once");
}

/// The log line of a dead delivery names the command that replays it, and that command works
/// as written from an operator's shell: it names the daemon's config (a daemon run with
/// `--config /etc/callnotify/callnotify.yaml`, as the shipped unit does, is not reached through
/// the default `config/callnotify.yaml`).
#[tokio::test]
async fn the_replay_command_a_dead_delivery_logs_works_as_written_from_elsewhere() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(404, "no_service"));
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAlogged").await;
    d.wait_settled(WAIT).await;
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("delivery is dead"))
        .unwrap_or_else(|| panic!("no dead delivery logged:\n{logs}"));
    let message: Value = serde_json::from_str(line).unwrap();
    let message = message["message"]
        .as_str()
        .or(message["fields"]["message"].as_str())
        .unwrap_or(line);
    let command = message.split('`').nth(1).expect("a command in backquotes");
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[0], "callnotify", "{message}");

    slack.set_default(Reply::ok());
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
        .args(&words[1..])
        .current_dir(elsewhere.path())
        .env_remove("CALLNOTIFY_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{command}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = slack.wait_accepted(1, WAIT).await;
    assert_eq!(sid_of(&got[0]), "CAlogged");
}

/// A daemon on channel `sales` whose Slack answers 500: it takes `sid`, fails its first attempt,
/// schedules the retry `retry` later and is stopped with that retry owed.
async fn stopped_owing_a_retry(
    tpl: &tempfile::TempDir,
    slack: &FakeSlack,
    retry: &str,
    sid: &str,
) -> Daemon {
    slack.set_default(Reply::status(500, "internal_error"));
    let delivery = format!(r#"{{ retry_schedule: ["{retry}"], request_timeout: "1s" }}"#);
    let mut d = Daemon::start(&slack_only(tpl.path(), slack, &delivery));
    accept(&d, sid).await;
    eventually("the first attempt to be recorded", WAIT, || {
        let rows = d.deliveries(Some("pending"));
        (rows.len() == 1 && rows[0]["attempts"] == 1).then_some(())
    })
    .await;
    assert_eq!(d.terminate(), Some(0));
    d
}

#[tokio::test]
async fn deliveries_for_a_channel_no_longer_configured_go_dead_and_stay_visible() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let mut d = stopped_owing_a_retry(&tpl, &slack, "1h", "CAorphan").await;

    // The channel is renamed while the daemon is stopped: its owed delivery has no lane.
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, yaml.replace("sales", "sales_us")).unwrap();
    d.spawn();
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAorphan");
    assert_eq!(row["status"], "dead", "{row}");
    assert_eq!(
        row["last_error"], "channel sales is no longer in the config",
        "{row}"
    );
    // Counted as dead, like any delivery that ends dead.
    let metrics = http()
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"callnotify_deliveries_total{channel="sales",outcome="dead"} 1"#),
        "{metrics}"
    );

    // Replayed before the channel is back: dead again, not stranded in the queue.
    let out = d.cli(&["deliveries", "retry", "--all-dead"]);
    assert!(out.status.success());
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAorphan");
    assert_eq!(row["status"], "dead", "{row}");
    assert_eq!(row["attempts"], 0, "requeued by the replay: {row}");
    assert_eq!(
        slack.received().len(),
        1,
        "nothing was sent to the old channel"
    );
}

#[tokio::test]
async fn a_delivery_planned_for_slack_is_not_sent_once_its_channel_became_a_log_channel() {
    // The action was written for Slack (its template, no recipients); rendered for another type
    // it either fails obscurely or goes where it was never meant to.
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let mut d = stopped_owing_a_retry(&tpl, &slack, "2s", "CAretyped").await;

    // The same channel name, now of another type, while the retry is owed.
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    let retyped: String = yaml
        .lines()
        .map(|l| {
            if l.starts_with("  sales:") {
                "  sales: { type: log }".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&d.config, retyped).unwrap();
    d.spawn();
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAretyped");
    assert_eq!(row["status"], "dead", "{row}");
    assert_eq!(
        row["last_error"],
        "channel sales had type slack when this notification was planned and has type log now; give it its type back and replay, or let this one go",
        "{row}"
    );
    // A call that comes after the change is planned for the log channel and goes out there.
    accept(&d, "CAafter").await;
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(by_sid(&rows, "CAafter")["status"], "done", "{rows:?}");
}

#[tokio::test]
async fn give_up_after_ends_in_dead() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(500, "internal_error"));
    let delivery = r#"{ retry_schedule: ["1s"], give_up_after: "2s", request_timeout: "1s" }"#;
    let d = Daemon::start(&slack_only(tpl.path(), &slack, delivery));
    accept(&d, "CAgiveup").await;
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAgiveup");
    assert_eq!(row["status"], "dead", "{row}");
    let err = row["last_error"].as_str().unwrap();
    assert!(
        err.contains("gave up after 2s") && err.contains("500"),
        "{row}"
    );
    let n = slack.received().len();
    assert!((2..=4).contains(&n), "{n} attempts in a 2s window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_and_exits_0() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::ok().delayed(Duration::from_secs(1)));
    let delivery = r#"{ retry_schedule: ["1s"], request_timeout: "5s" }"#;
    let mut d = Daemon::start(&slack_only(tpl.path(), &slack, delivery));
    let sids = ["CAterm1", "CAterm2", "CAterm3"];
    for sid in sids {
        accept(&d, sid).await;
    }
    eventually("the first send to be in flight", WAIT, || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;
    d.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // While it drains, a new call is refused (503) or finds the listener closed: never a 2xx.
    let late = http()
        .post(d.url("/webhooks/air"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(call("CAlate"))
        .send()
        .await;
    if let Ok(r) = &late {
        assert_eq!(r.status().as_u16(), 503, "a call accepted during shutdown");
    }
    let code = tokio::task::block_in_place(|| d.terminate());
    assert_eq!(code, Some(0), "{}", d.logs());
    // The one in flight finished and was recorded before the exit.
    let rows = d.deliveries(None);
    assert_eq!(by_sid(&rows, "CAterm1")["status"], "done", "{rows:?}");
    let sent_before = slack.received().len();
    assert!(sent_before < 3, "shutdown did not stop the lane");

    tokio::task::block_in_place(|| d.spawn());
    let rows = d.wait_settled(WAIT).await;
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
    let got: Vec<String> = slack.received().iter().map(|r| sid_of(&r.body)).collect();
    assert_eq!(got, sids, "each call exactly once, in order");
}

#[tokio::test]
async fn a_burst_of_50_reaches_a_paced_channel_in_order_without_429() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let channels = format!(
        "  sales: {{ type: slack, webhook_url: \"{}\", max_per_second: 10, burst: 3 }}\n",
        slack.url
    );
    let d = Daemon::start(&config(
        tpl.path(),
        FAST,
        &channels,
        "[{ channel: sales, template: slack/sid }]",
    ));
    let sids: Vec<String> = (0..50).map(|i| format!("CAburst{i:03}")).collect();
    for sid in &sids {
        accept(&d, sid).await;
    }
    slack.wait_accepted(50, WAIT).await;
    let r = slack.received();
    let got: Vec<String> = r.iter().map(|x| sid_of(&x.body)).collect();
    assert_eq!(got, sids, "in order, each once");
    // Token bucket: any run of n consecutive sends spans at least (n - burst) / rate seconds,
    // which is what keeps Slack from answering 429 (less 100 ms for timer and HTTP jitter in a
    // debug build on a busy machine; the schedule itself is unit-tested with a paused clock).
    let (rate, burst, slack_ms) = (10.0, 3.0, 100.0);
    for i in 0..r.len() {
        for j in i + 1..r.len() {
            let n = (j - i + 1) as f64;
            let span = (r[j].at - r[i].at).as_secs_f64() * 1000.0;
            let min = (n - burst) / rate * 1000.0 - slack_ms;
            assert!(
                span >= min,
                "sends {i}..={j} within {span:.0}ms (< {min:.0}ms)"
            );
        }
    }
    let total = (r[49].at - r[0].at).as_secs_f64();
    assert!(total < 10.0, "pacing far slower than 10/s: {total:.1}s");
}

#[tokio::test]
async fn a_log_channel_is_paced_by_its_max_per_second() {
    let tpl = templates();
    let channels = "  console: { type: log, file: \"{dir}/notifications.jsonl\", max_per_second: 5, concurrency: 2 }\n";
    let d = Daemon::start(&config(
        tpl.path(),
        FAST,
        channels,
        "[{ channel: console, template: log/sid }]",
    ));
    for i in 0..6 {
        accept(&d, &format!("CAlogpace{i}")).await;
    }
    let rows = d.wait_settled(WAIT).await;
    assert!(
        rows.len() == 6 && rows.iter().all(|r| r["status"] == "done"),
        "{rows:?}"
    );
    let log = std::fs::read_to_string(d.dir.join("notifications.jsonl")).unwrap();
    let mut at: Vec<chrono::DateTime<chrono::FixedOffset>> = log
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            chrono::DateTime::parse_from_rfc3339(v["at"].as_str().unwrap()).unwrap()
        })
        .collect();
    at.sort();
    assert_eq!(at.len(), 6, "{log}");
    // A log channel's bucket holds one: six writes at 5 per second span at least 1 s (less
    // 100 ms for timer jitter). Unpaced, they land in well under that.
    let span = (at[5] - at[0]).num_milliseconds();
    assert!(span >= 900, "six writes within {span} ms");
}

#[tokio::test]
async fn a_slow_destination_does_not_delay_another_channel() {
    let tpl = templates();
    let slow = FakeSlack::start().await;
    let fast = FakeSlack::start().await;
    slow.set_default(Reply::ok().delayed(Duration::from_secs(30)));
    let channels = slack_channel("slow", &slow, "") + &slack_channel("fast", &fast, "");
    let d = Daemon::start(&config(
        tpl.path(),
        r#"{ retry_schedule: ["1s"], request_timeout: "20s" }"#,
        &channels,
        "[{ channel: slow, template: slack/sid }, { channel: fast, template: slack/sid }]",
    ));
    let start = Instant::now();
    for sid in ["CAiso1", "CAiso2", "CAiso3"] {
        accept(&d, sid).await;
    }
    let got = fast.wait_accepted(3, Duration::from_secs(5)).await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let sids: Vec<String> = got.iter().map(sid_of).collect();
    assert_eq!(sids, ["CAiso1", "CAiso2", "CAiso3"]);
    assert_eq!(
        slow.received().len(),
        1,
        "the slow one is still busy with the first"
    );
}

/// Posts until the daemon (whichever process currently listens) answers 2xx.
async fn post_until_acknowledged(url: Arc<Mutex<String>>, body: String) {
    callnotify::notify::install_tls_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    loop {
        let u = url.lock().unwrap().clone();
        if let Ok(r) = client
            .post(&u)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
        {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_stream_of_calls_loses_nothing() {
    const CALLS: usize = 300;
    const TASKS: usize = 6;
    const KILLS: usize = 3;
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let channels = slack_channel("sales", &slack, "")
        + "  console: { type: log, file: \"{dir}/notifications.jsonl\" }\n";
    let mut d = Daemon::start(&config(
        tpl.path(),
        FAST,
        &channels,
        "[{ channel: sales, template: slack/sid }, { channel: console, template: log/sid }]",
    ));
    let url = Arc::new(Mutex::new(d.url("/webhooks/air")));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut posters = Vec::new();
    for t in 0..TASKS {
        let (url, acked) = (url.clone(), acked.clone());
        posters.push(tokio::spawn(async move {
            for i in (t..CALLS).step_by(TASKS) {
                let sid = format!("CAcrash{i:04}");
                post_until_acknowledged(url.clone(), call(&sid)).await;
                acked.lock().unwrap().push(sid);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let mut kills = Vec::new();
    for k in 0..KILLS {
        // Kill at a different point of the stream each time.
        tokio::time::sleep(Duration::from_millis(700 + 300 * k as u64)).await;
        kills.push(Instant::now());
        tokio::task::block_in_place(|| {
            d.kill();
            d.spawn();
        });
        *url.lock().unwrap() = d.url("/webhooks/air");
    }
    for p in posters {
        p.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), CALLS);
    let rows = d.wait_settled(Duration::from_secs(40)).await;
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");

    let mut slack_counts: HashMap<String, usize> = HashMap::new();
    for b in slack.accepted() {
        *slack_counts.entry(sid_of(&b)).or_default() += 1;
    }
    let log = std::fs::read_to_string(d.dir.join("notifications.jsonl")).unwrap_or_default();
    let mut log_counts: HashMap<String, usize> = HashMap::new();
    for line in log.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            *log_counts
                .entry(v["sid"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    let missing_slack: Vec<&String> = acked
        .iter()
        .filter(|s| !slack_counts.contains_key(*s))
        .collect();
    let missing_log: Vec<&String> = acked
        .iter()
        .filter(|s| !log_counts.contains_key(*s))
        .collect();
    let dups = |c: &HashMap<String, usize>| c.values().map(|n| n - 1).sum::<usize>();
    let (slack_dups, log_dups) = (dups(&slack_counts), dups(&log_counts));
    let started = d.all_logs().matches("callnotify is listening").count();
    println!(
        "crash test: {} calls acknowledged, {} kills ({started} starts); slack: {} delivered, {} duplicates; log: {} delivered, {} duplicates",
        acked.len(),
        KILLS,
        slack_counts.len(),
        slack_dups,
        log_counts.len(),
        log_dups
    );
    assert!(missing_slack.is_empty(), "lost on Slack: {missing_slack:?}");
    assert!(missing_log.is_empty(), "lost on the log: {missing_log:?}");
    // A duplicate is only acceptable for a send confirmed by Slack but not yet recorded when a
    // process died: the two copies come from different processes, so over different connections.
    let received = slack.received();
    for (sid, _) in slack_counts.iter().filter(|(_, n)| **n > 1) {
        let from: Vec<_> = received
            .iter()
            .filter(|r| sid_of(&r.body) == *sid && r.answered == 200)
            .map(|r| r.from)
            .collect();
        let distinct: HashSet<_> = from.iter().collect();
        assert_eq!(
            distinct.len(),
            from.len(),
            "{sid} was sent twice by one process: {from:?}"
        );
    }
    // A kill can catch, per channel and unit of concurrency (1 here), the outcomes the lane's
    // recorder had not yet written (at most 8, the claim size) and the one just confirmed: those,
    // and only those, are sent again (docs/DELIVERY.md).
    const WINDOW: usize = 9;
    assert!(
        slack_dups <= WINDOW * KILLS,
        "{slack_dups} duplicates after {KILLS} kills"
    );
    assert!(log_dups <= WINDOW * KILLS, "{log_dups}");
}

/// Waits for the current process to log `message`.
async fn logged(d: &Daemon, message: &str) {
    eventually(message, WAIT, || d.logs().contains(message).then_some(())).await;
}

#[tokio::test]
async fn kill_9_while_a_send_is_in_flight_sends_it_again_after_the_restart() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    // The first send is held: the process dies before Slack answers it.
    slack.script([Reply::ok().delayed(Duration::from_secs(30))]);
    let delivery = r#"{ retry_schedule: ["1s"], request_timeout: "60s" }"#;
    let mut d = Daemon::start(&slack_only(tpl.path(), &slack, delivery));
    accept(&d, "CAinflight9").await;
    eventually("the send to be in flight", WAIT, || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;
    assert_eq!(d.deliveries(None)[0]["status"], "sending");
    d.kill();
    // Visible as in flight while the daemon is down, and requeued when it starts.
    assert_eq!(d.deliveries(None)[0]["status"], "sending");
    d.spawn();
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAinflight9");
    assert_eq!(row["status"], "done", "{row}");
    let r = slack.received();
    assert_eq!(r.len(), 2, "once by each process");
    assert_ne!(r[0].from, r[1].from);
    assert!(r.iter().all(|r| sid_of(&r.body) == "CAinflight9"));
}

#[tokio::test]
async fn kill_9_after_the_answer_and_before_its_record_sends_it_once_more() {
    // The one window docs/DELIVERY.md admits: Slack confirmed, the store has not recorded it.
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::ok().delayed(Duration::from_secs(2))]);
    let delivery = r#"{ retry_schedule: ["1s"], request_timeout: "10s" }"#;
    let mut d = Daemon::start(&slack_only(tpl.path(), &slack, delivery));
    accept(&d, "CAunrecorded").await;
    eventually("the send to be in flight", WAIT, || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;
    // The store cannot record the answer when it comes.
    let locker = WriteLock::take(&d.dir.join("store.db"));
    logged(&d, "\"delivered\"").await;
    d.kill();
    locker.release();
    d.spawn();
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAunrecorded");
    assert_eq!(row["status"], "done", "{row}");
    assert_eq!(
        row["attempts"], 1,
        "the first attempt was never recorded: {row}"
    );
    let sent: Vec<String> = slack.accepted().iter().map(sid_of).collect();
    assert_eq!(sent, ["CAunrecorded", "CAunrecorded"]);
    // Recorded now: a further restart sends nothing.
    d.kill();
    d.spawn();
    accept(&d, "CAafter").await;
    slack.wait_accepted(3, WAIT).await;
    d.wait_settled(WAIT).await;
    let sent: Vec<String> = slack.accepted().iter().map(sid_of).collect();
    assert_eq!(sent, ["CAunrecorded", "CAunrecorded", "CAafter"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_call_posted_many_times_at_once_is_accepted_once_and_sent_once() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    let url = d.url("/webhooks/air");
    let body = call("CAracing");
    let posts: Vec<_> = (0..20)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { post(&url, &body, Some(TOKEN)).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for p in posts {
        let (status, body) = p.await.unwrap();
        assert_eq!(status, 200, "{body}");
        statuses.push(body["status"].as_str().unwrap().to_string());
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "accepted").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "duplicate").count(),
        19,
        "{statuses:?}"
    );
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(slack.accepted().len(), 1);
}

#[tokio::test]
async fn store_unavailable_answers_503() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAbefore").await;
    // Another process takes SQLite's write lock and holds it: the store cannot commit.
    let locker = WriteLock::take(&d.dir.join("store.db"));
    let (status, body) = d.post(&call("CAlocked")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    let ready = http().get(d.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    locker.release();
    // Nothing was half-written: the refused call is not there, and a retry by the sender works.
    assert!(d.deliveries(None).iter().all(|r| r["sid"] != "CAlocked"));
    accept(&d, "CAlocked").await;
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
    let ready = http().get(d.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}

#[tokio::test]
async fn a_store_file_deleted_under_the_daemon_answers_503_not_accepted() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAbefore").await;
    // The store is moved away while the daemon runs (an operator's `mv`, a cleanup script): a
    // commit would go to a file that is no longer at the store's path, so a restart would not
    // find the call. Nothing may be acknowledged then.
    let path = d.dir.join("store.db");
    let away = d.dir.join("moved-away.db");
    std::fs::rename(&path, &away).unwrap();
    let (status, body) = d.post(&call("CAwhilegone")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    let ready = http().get(d.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    // Put back, it takes commits again, and the refused call can be sent again.
    std::fs::rename(&away, &path).unwrap();
    accept(&d, "CAwhilegone").await;
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
}

/// The store file alone, copied elsewhere as a backup of a stopped daemon is taken: each
/// delivery's (sid, status) as that copy holds them.
fn deliveries_in_a_copy_of(store: &Path) -> Vec<(String, String)> {
    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("copy.db");
    std::fs::copy(store, &copy).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let mut stmt = conn
        .prepare("SELECT c.sid, d.status FROM deliveries d JOIN calls c ON c.id = d.call_id ORDER BY d.id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

#[tokio::test]
async fn a_stopped_daemon_leaves_everything_in_the_store_file_itself() {
    // README: copy the file while stopped; a clean stop leaves no `-wal` file beside it. What
    // was committed must be in the file, not only in a write-ahead log that a copy of the file
    // leaves out (and that an operator tidying up "leftover" files deletes).
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(404, "channel_not_found"));
    let mut d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAstopped").await;
    d.wait_settled(WAIT).await;
    assert_eq!(d.terminate(), Some(0));
    let store = d.dir.join("store.db");
    let wal = d.dir.join("store.db-wal");
    assert!(!wal.exists(), "a clean stop left {}", wal.display());
    assert_eq!(
        deliveries_in_a_copy_of(&store),
        [("CAstopped".to_string(), "dead".to_string())]
    );

    // A replay while the daemon is stopped is in the file too.
    let out = d.cli(&["deliveries", "retry", "--all-dead"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!wal.exists(), "the replay left {}", wal.display());
    assert_eq!(
        deliveries_in_a_copy_of(&store),
        [("CAstopped".to_string(), "pending".to_string())]
    );
}

#[tokio::test]
async fn a_write_ahead_log_deleted_under_the_daemon_answers_503_and_a_clean_stop_keeps_what_it_held(
) {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAbeforewal").await;
    d.wait_settled(WAIT).await;
    // Tidied up as a "leftover" while the daemon runs: SQLite writes on into the deleted log, so
    // a commit now would be in no file a restart reads.
    for suffix in ["-wal", "-shm"] {
        std::fs::remove_file(d.dir.join(format!("store.db{suffix}"))).unwrap();
    }
    let (status, body) = d.post(&call("CAafterwal")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    let ready = http().get(d.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(
        d.logs()
            .contains("store.db-wal beside the store was deleted"),
        "{}",
        d.logs()
    );

    // As the error says: a clean stop writes what the log held into the store file.
    assert_eq!(d.terminate(), Some(0));
    d.spawn();
    accept(&d, "CAafterwal").await;
    let rows = d.wait_settled(WAIT).await;
    let sids: HashSet<&str> = rows.iter().filter_map(|r| r["sid"].as_str()).collect();
    assert_eq!(
        sids,
        HashSet::from(["CAbeforewal", "CAafterwal"]),
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
    assert_eq!(slack.accepted().len(), 2, "each sent once");
}

/// A process killed when dropped, so a failing test leaves nothing running.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_second_daemon_on_the_same_store_does_not_resend_what_the_first_has_in_flight() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::ok().delayed(Duration::from_secs(2)));
    let delivery = r#"{ retry_schedule: ["1s"], request_timeout: "10s" }"#;
    let d = Daemon::start(&slack_only(tpl.path(), &slack, delivery));
    accept(&d, "CAinflight").await;
    eventually("the send to be in flight", WAIT, || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;
    // `callnotify serve` started again by mistake on the same config, hence the same store.
    let mut second = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .args(["serve", "--config"])
            .arg(&d.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // It either refuses to start, or takes the first one's in-flight delivery and sends it again.
    let exit = eventually("the second daemon to exit or to send", WAIT, || {
        if slack.received().len() > 1 {
            return Some(None);
        }
        second.0.try_wait().unwrap().map(Some)
    })
    .await;
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(by_sid(&rows, "CAinflight")["status"], "done", "{rows:?}");
    let sent: Vec<String> = slack.received().iter().map(|r| sid_of(&r.body)).collect();
    assert_eq!(sent, ["CAinflight"], "sent twice");
    let exit = exit.expect("the second daemon ran beside the first");
    assert!(!exit.success());
    let mut err = String::new();
    std::io::Read::read_to_string(second.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("another callnotify daemon"), "{err}");
}

/// A small tmpfs, unmounted on drop. None where mounting is not allowed (not root, no
/// CAP_SYS_ADMIN): the test that needs it then says so and passes.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_and_recovers() {
    let Some(disk) = Tmpfs::mount("4m") else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let tpl = templates();
    let slack = FakeSlack::start().await;
    let store = disk.0.path().join("store.db");
    let yaml = slack_only(tpl.path(), &slack, FAST)
        .replace("{dir}/store.db", &store.display().to_string());
    let d = Daemon::start(&yaml);
    accept(&d, "CAroom").await;
    d.wait_settled(WAIT).await;
    // Fill the disk to the last byte.
    let filler = disk.0.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.flush();
    }
    let mut refused = 0;
    for i in 0..5 {
        let (status, body) = d.post(&call(&format!("CAfull{i}"))).await;
        match status {
            503 => {
                assert_eq!(body["error"], "store_unavailable", "{body}");
                refused += 1;
            }
            200 => {} // SQLite still had room in its write-ahead log: stored for real
            other => panic!("{other}: {body}"),
        }
    }
    assert!(refused > 0, "a full disk never answered 503");
    std::fs::remove_file(&filler).unwrap();
    for i in 0..5 {
        let (status, body) = d.post(&call(&format!("CAfull{i}"))).await;
        assert_eq!(status, 200, "{body}");
    }
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
    let sids: HashSet<String> = slack.accepted().iter().map(sid_of).collect();
    assert_eq!(sids.len(), 6, "each stored call delivered once");
    assert_eq!(slack.accepted().len(), 6);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_keeps_sending_while_its_outcomes_wait_for_the_store() {
    // A lane hands each outcome to its recorder and sends the next message at once; it does not
    // wait for the outcome to commit. Hold the store's writer while the first message is in
    // flight: the other messages must still go out, and every outcome is written afterwards.
    let slack = FakeSlack::start().await;
    slack.script([Reply::ok().delayed(Duration::from_secs(1))]);
    let tpl = templates();
    let dir = tempfile::tempdir().unwrap();
    let cfg = in_process_config(
        dir.path(),
        tpl.path(),
        &format!(
            r#"
channels:
  sales: {{ type: slack, webhook_url: "{}", max_per_second: 0, concurrency: 1 }}
rules:
  - name: all
    notify: [{{ channel: sales, template: slack/sid }}]
"#,
            slack.url
        ),
    );
    let app = callnotify::app::App::build(&cfg).await.unwrap();
    let shared = app.shared();
    let action = shared.live.load().config.rules[0].actions[0].clone();
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    for i in 0..5 {
        let mut call = fixture["call"].clone();
        call["sid"] = Value::String(format!("CApipe{i}"));
        let owed = vec![callnotify::store::NewDelivery {
            rule: "all".into(),
            action_idx: 0,
            action: action.clone(),
            channel_type: Some("slack"),
        }];
        shared
            .store
            .insert_call(
                format!("CApipe{i}"),
                "POST_CALL_DATA",
                call.to_string(),
                0,
                owed,
            )
            .await
            .unwrap();
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(shared.worker.clone().run(shutdown.clone()));
    eventually("the first message", WAIT, || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;

    let (started, holding) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let hold = tokio::spawn({
        let store = shared.store.clone();
        async move {
            store
                .run(move |_| {
                    let _ = started.send(());
                    let _ = released.recv_timeout(Duration::from_secs(60));
                    Ok(())
                })
                .await
        }
    });
    holding.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        slack.received().len(),
        1,
        "the writer must be held before the first answer comes"
    );
    eventually("all five messages while the writer is held", WAIT, || {
        (slack.received().len() == 5).then_some(())
    })
    .await;
    let sids: Vec<String> = slack.received().iter().map(|r| sid_of(&r.body)).collect();
    assert_eq!(
        sids,
        (0..5).map(|i| format!("CApipe{i}")).collect::<Vec<_>>()
    );

    release.send(()).unwrap();
    hold.await.unwrap().unwrap();
    let store = shared.store.clone();
    let mut done = 0;
    for _ in 0..200 {
        done = store
            .run(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM deliveries WHERE status = 'done'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .unwrap();
        if done == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done, 5, "every outcome is written once the writer is free");
    shutdown.cancel();
    worker.await.unwrap();
}

#[tokio::test]
async fn an_smtp_relay_refusing_everyone_in_its_greeting_is_retried_not_dead() {
    use std::io::Write;
    // A relay in maintenance (or at its connection limit): 554 before anything is said.
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = relay.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut sock in relay.incoming().flatten() {
            let _ = sock.write_all(b"554 5.3.2 no service, try later\r\n");
        }
    });
    let tpl = templates();
    let d = Daemon::start(&config(
        tpl.path(),
        FAST,
        &email_channel(port),
        r#"[{ channel: mail, to: ["a@example.com"], subject: "{{sid}}", template: email/sid }]"#,
    ));
    accept(&d, "CAgreeting554").await;
    let row = eventually("two refused attempts", WAIT, || {
        let r = d.deliveries(None).into_iter().next()?;
        (r["attempts"].as_u64()? >= 2).then_some(r)
    })
    .await;
    assert_eq!(row["status"], "pending", "{row}");
    let error = row["last_error"].as_str().unwrap();
    assert!(
        error.contains("refused the connection in its greeting")
            && error.contains("(554)")
            && error.contains("no service, try later"),
        "{row}"
    );
}

#[tokio::test]
async fn slack_421_and_425_from_a_proxy_in_front_are_retried_and_delivered_once() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([
        Reply::status(421, "Misdirected Request"),
        Reply::status(425, "Too Early"),
    ]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CA421").await;
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CA421");
    assert_eq!(row["status"], "done", "{row}");
    assert_eq!(row["attempts"], 3, "{row}");
    let got: Vec<u16> = slack.received().iter().map(|r| r.answered).collect();
    assert_eq!(got, [421, 425, 200]);
    assert_eq!(slack.accepted().len(), 1);
}

#[tokio::test]
async fn a_slack_answer_that_never_came_is_recorded_as_possibly_posted() {
    let tpl = templates();
    let slack = FakeSlack::start().await;
    // Slack takes the message but its answer comes after request_timeout (1s).
    slack.script([Reply::ok().delayed(Duration::from_secs(5))]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAtwice").await;
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAtwice");
    assert_eq!(row["status"], "done", "{row}");
    assert_eq!(row["attempts"], 2, "{row}");
    assert_eq!(
        row["last_error"],
        "no answer within 1s; Slack may have posted it, so the retry may show it twice",
        "{row}"
    );
}

#[tokio::test]
async fn a_long_ok_false_answer_with_a_2xx_status_is_not_counted_delivered() {
    // A Web API URL or workflow trigger pasted as the webhook refuses with 200 and a JSON body;
    // one with a message per invalid block is longer than the part of the body that is read.
    let messages: Vec<String> = (0..400)
        .map(|i| format!("[ERROR] must be a valid block [json-pointer:/blocks/{i}/text]"))
        .collect();
    let refusal = serde_json::json!({
        "ok": false,
        "error": "invalid_blocks",
        "response_metadata": {"messages": messages},
    })
    .to_string();
    assert!(refusal.len() > 20_000);
    let tpl = templates();
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(200, &refusal)]);
    let d = Daemon::start(&slack_only(tpl.path(), &slack, FAST));
    accept(&d, "CAlongrefusal").await;
    let rows = d.wait_settled(WAIT).await;
    let row = by_sid(&rows, "CAlongrefusal");
    assert_eq!(row["status"], "dead", "{row}");
    assert_eq!(row["attempts"], 1, "{row}");
    let error = row["last_error"].as_str().unwrap();
    assert!(
        error.starts_with(r#"HTTP 200: {"ok":false,"error":"invalid_blocks""#)
            && error.ends_with("(a refusal, though with a 2xx status)"),
        "{row}"
    );
}
