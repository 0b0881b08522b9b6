//! End to end, with the real binary: an answered call becomes Slack messages, emails and log
//! lines by the rules in the config; bad requests change nothing; `check` and `render` tell the
//! truth about a config.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn full_config(slack: &FakeSlack, smtp: &Smtp) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  tokens: ["{TOKEN}", "the-next-token-0123456789"]
store:
  path: "{{dir}}/store.db"
templates_dir: "{{templates}}"
delivery:
  retry_schedule: ["1s"]
channels:
  console: {{ type: log, file: "{{dir}}/notifications.jsonl" }}
  sales: {{ type: slack, webhook_url: "{slack}", max_per_second: 0 }}
  managers:
    type: email
    smtp: {{ host: "127.0.0.1", port: {port}, tls: none }}
    from: "Call Bot <calls@example.com>"
rules:
  - name: booked
    when:
      duration: {{ gte: 60 }}
      transcript: {{ contains_any: ["book", "appointment"] }}
      campaignId: [8812, 8813]
      leadData.source: website
    notify:
      - channel: sales
        template: slack/booked
      - channel: managers
        to: ["sales-leads@example.com", "{{{{call.leadData.owner}}}}"]
        subject: "Booked: {{{{lead_name}}}} ({{{{duration_human}}}})"
        template: email/booked
  - name: everything
    notify:
      - channel: console
        template: log/summary
  - name: outcomes
    event: POST_CALL_OUTCOME
    notify:
      - channel: sales
        template: slack/summary
"#,
        slack = slack.url,
        port = smtp.port
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booked_call_reaches_slack_email_and_the_log() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));

    let (status, body) = d.post(CAMPAIGN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["notifications"], 3);
    assert_eq!(body["rules"], serde_json::json!(["booked", "everything"]));

    let got = slack.wait_accepted(1, WAIT).await;
    let text = got[0]["text"].as_str().unwrap();
    assert!(
        text.contains("*Maria Gonzalez* wants to book (3m 07s, campaign 8812)"),
        "{text}"
    );
    assert!(
        text.contains("<https://api.twilio.com/2010-04-01/Accounts/"),
        "{text}"
    );
    assert!(text.contains("|Listen to the call>"), "{text}");

    let mails = smtp.wait_messages(1, WAIT).await;
    let m = &mails[0];
    assert_eq!(m["subject"], "Booked: Maria Gonzalez (3m 07s)");
    assert_eq!(
        m["rcpt_tos"],
        serde_json::json!(["sales-leads@example.com", "jordan@ourteam.example"])
    );
    assert_eq!(m["content_type"], "multipart/alternative");
    let types: Vec<&str> = m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["text/plain", "text/html"]);
    assert!(m["parts"][0]["body"]
        .as_str()
        .unwrap()
        .contains("Company:   Acme Roofing"));
    assert!(m["parts"][1]["body"]
        .as_str()
        .unwrap()
        .contains("<strong>Maria Gonzalez</strong>"));
    assert_eq!(m["defects"], serde_json::json!([]));

    let lines = eventually("a log line", WAIT, || {
        let t = std::fs::read_to_string(d.dir.join("notifications.jsonl")).ok()?;
        (!t.is_empty()).then_some(t)
    })
    .await;
    let line: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(line["rule"], "everything");
    assert!(line["text"]
        .as_str()
        .unwrap()
        .starts_with("POST_CALL_DATA CA0b6d1f9e2c3a4b5c6d7e8f90a1b2c3d4: Maria Gonzalez (3m 07s)"));

    let settled = d.wait_settled(WAIT).await;
    assert_eq!(settled.len(), 3);
    assert!(settled.iter().all(|x| x["status"] == "done"), "{settled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_call_posted_twice_is_stored_and_notified_once() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let (s1, b1) = d.post(CAMPAIGN).await;
    let (s2, b2) = d.post(CAMPAIGN).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1["status"], "accepted");
    assert_eq!(b2["status"], "duplicate");
    d.wait_settled(WAIT).await;
    slack.wait_accepted(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slack.received().len(), 1);
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(d.deliveries(None).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_body_is_its_own_event_and_matches_event_rules() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let (_, data) = d.post(FIXTURE).await;
    let (_, outcome) = d.post(OUTCOME).await;
    assert_eq!(data["event"], "POST_CALL_DATA");
    assert_eq!(data["rules"], serde_json::json!(["everything"]));
    assert_eq!(
        outcome["status"], "accepted",
        "same sid, other event: not a duplicate"
    );
    assert_eq!(outcome["event"], "POST_CALL_OUTCOME");
    assert_eq!(
        outcome["rules"],
        serde_json::json!(["everything", "outcomes"])
    );
    // The outcome rule's Block Kit template arrives as blocks with a text fallback.
    let got = slack.wait_accepted(1, WAIT).await;
    assert_eq!(got[0]["blocks"][0]["type"], "header");
    assert_eq!(got[0]["blocks"][0]["text"]["text"], "Call with Tyler");
    assert_eq!(got[0]["text"], "Call with Tyler (44s)\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_outcome_fields_do_not_take_the_real_outcomes_place() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let (_, early) = d
        .post(r#"{"call":{"sid":"CAnullout","duration":30,"outcome":null,"notes":null}}"#)
        .await;
    assert_eq!(early["status"], "accepted", "{early}");
    assert_eq!(early["event"], "POST_CALL_DATA", "{early}");
    let (_, outcome) = d.post(&with_sid(OUTCOME, "CAnullout")).await;
    assert_eq!(outcome["status"], "accepted", "{outcome}");
    assert_eq!(outcome["event"], "POST_CALL_OUTCOME", "{outcome}");
    assert_eq!(
        outcome["rules"],
        serde_json::json!(["everything", "outcomes"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_tokens_get_401_and_change_nothing() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let url = d.url("/webhooks/air");
    for token in [
        None,
        Some("wrong"),
        Some("test-token-0123456789abcdeX"),
        Some(""),
    ] {
        let (status, body) = post(&url, CAMPAIGN, token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["error"], "unauthorized");
    }
    // The second configured token works too (rotation).
    let (status, _) = post(&url, CAMPAIGN, Some("the-next-token-0123456789")).await;
    assert_eq!(status, 200);
    assert_eq!(d.deliveries(None).len(), 3);
    assert!(!d.logs().contains(TOKEN));
    // Each refusal names where it came from, so a sender with a stale token can be found.
    let logs = d.logs();
    let refusals: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("webhook refused"))
        .collect();
    assert_eq!(refusals.len(), 4, "{logs}");
    assert!(
        refusals.iter().all(|l| l.contains(r#""from":"127.0.0.1:"#)),
        "{refusals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_precise_error_and_store_nothing() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let url = d.url("/webhooks/air");
    let client = http();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "application/json",
            b"not json".to_vec(),
            400,
            "not valid JSON",
        ),
        ("application/json", b"{}".to_vec(), 400, "no `call`"),
        (
            "application/json",
            br#"{"call":{"duration":5}}"#.to_vec(),
            400,
            "sid` is missing",
        ),
        (
            "text/plain",
            CAMPAIGN.as_bytes().to_vec(),
            415,
            "application/json",
        ),
        // 413 is covered in tests/hostile.rs with raw sockets: a client still writing a body
        // the daemon refused may see its connection reset before it reads the answer.
    ];
    for (ct, body, want, reason) in cases {
        let r = client
            .post(&url)
            .bearer_auth(TOKEN)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{reason}");
        let v: Value = r.json().await.unwrap();
        assert!(v["message"].as_str().unwrap().contains(reason), "{v}");
    }
    assert!(d.deliveries(None).is_empty());
    // Still serving.
    assert_eq!(d.post(CAMPAIGN).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_named_like_a_ping_arrives_as_text() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let mut v: Value = serde_json::from_str(CAMPAIGN).unwrap();
    v["call"]["cachedLeadName"] = "<!channel> & <@U123>".into();
    v["call"]["callRecordingUrl"] = "https://rec.example/a|evil>x".into();
    assert_eq!(d.post(&v.to_string()).await.0, 200);
    let got = slack.wait_accepted(1, WAIT).await;
    let text = got[0]["text"].as_str().unwrap();
    assert!(
        text.contains("*&lt;!channel&gt; &amp; &lt;@U123&gt;*"),
        "{text}"
    );
    assert!(!text.contains("<!channel>"));
    assert!(
        text.contains("<https://rec.example/a%7Cevil&gt;x|Listen to the call>"),
        "{text}"
    );
}

/// Every call by email to `to` (a YAML list), with the lead's name as the subject.
fn mail_config(smtp: &Smtp, to: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  tokens: ["{TOKEN}"]
store:
  path: "{{dir}}/store.db"
templates_dir: "{{templates}}"
delivery:
  retry_schedule: ["1s"]
channels:
  mail:
    type: email
    smtp: {{ host: "127.0.0.1", port: {port}, tls: none }}
    from: "Call Bot <calls@example.com>"
rules:
  - name: every-call
    notify:
      - channel: mail
        to: {to}
        subject: "{{{{lead_name}}}}"
        template: email/booked
"#,
        port = smtp.port
    )
}

/// `${SMTP_USER:-}` and `${SMTP_PASSWORD:-}`, both unset, mean "no login": the email goes to a
/// relay that offers none, instead of waiting for a day on a login it cannot make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_login_left_empty_is_no_login() {
    let smtp = Smtp::start();
    let yaml = mail_config(&smtp, r#"["sales@ourteam.example"]"#).replace(
        "tls: none }",
        r#"tls: none, username: "${SMTP_USER:-}", password: "${SMTP_PASSWORD:-}" }"#,
    );
    let d = Daemon::start(&yaml);
    assert_eq!(d.post(CAMPAIGN).await.0, 200);
    let mails = smtp.wait_messages(1, WAIT).await;
    assert_eq!(
        mails[0]["rcpt_tos"],
        serde_json::json!(["sales@ourteam.example"])
    );
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows[0]["status"], "done", "{rows:?}");
    assert_eq!(rows[0]["attempts"], 1, "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_in_a_value_inside_an_address_adds_no_recipient() {
    let smtp = Smtp::start();
    let d = Daemon::start(&mail_config(
        &smtp,
        r#"["sales+{{call.campaignId}}@ourteam.example", "{{call.leadData.owner}}"]"#,
    ));
    let mut v: Value = serde_json::from_str(CAMPAIGN).unwrap();
    v["call"]["campaignId"] = "x@evil.example, y".into();
    assert_eq!(d.post(&v.to_string()).await.0, 200);
    let mails = smtp.wait_messages(1, WAIT).await;
    assert_eq!(
        mails[0]["rcpt_tos"],
        serde_json::json!(["jordan@ourteam.example"])
    );
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows[0]["status"], "done", "{rows:?}");
    // The refused recipient is named in the delivery's log line, as a bad address is.
    let log = d.logs();
    let line = log
        .lines()
        .find(|l| l.contains("\"delivered\"") && l.contains("skipped"))
        .unwrap_or_else(|| panic!("no delivered line with a skipped recipient:\n{log}"));
    assert!(
        line.contains("sales+x@evil.example, y@ourteam.example"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_owners_with_long_addresses_all_get_the_email() {
    let smtp = Smtp::start();
    let d = Daemon::start(&mail_config(
        &smtp,
        r#"["regional-sales-director@northeast.ourteam.example", "{{call.leadData.owners}}"]"#,
    ));
    // 20 recipients (the most a message has) of 50 characters: a To header of over 1000 bytes.
    let owners: Vec<String> = (1..20)
        .map(|i| format!("regional-sales-manager.{i}@northeast.ourteam.example"))
        .collect();
    let mut v: Value = serde_json::from_str(CAMPAIGN).unwrap();
    v["call"]["leadData"]["owners"] = owners.clone().into();
    let mut owners = owners;
    owners.insert(
        0,
        "regional-sales-director@northeast.ourteam.example".into(),
    );
    assert_eq!(d.post(&v.to_string()).await.0, 200);
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows[0]["status"], "done", "{rows:?}");
    let mails = smtp.messages();
    assert_eq!(mails[0]["rcpt_tos"], serde_json::json!(owners));
    let to = mails[0]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "To")
        .unwrap();
    assert_eq!(to[1].as_str().unwrap(), owners.join(", "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_name_of_5000_characters_still_gets_the_email_out() {
    let smtp = Smtp::start();
    let d = Daemon::start(&mail_config(&smtp, r#"["ops@ourteam.example"]"#));
    let mut v: Value = serde_json::from_str(CAMPAIGN).unwrap();
    v["call"]["cachedLeadName"] = "M".repeat(5000).into();
    assert_eq!(d.post(&v.to_string()).await.0, 200);
    let mails = smtp.wait_messages(1, WAIT).await;
    let subject = mails[0]["subject"].as_str().unwrap();
    assert_eq!(subject, format!("{}…", "M".repeat(199)));
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows[0]["status"], "done", "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_is_retried_and_one_owed_at_a_stop_is_sent_after_restart() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    slack.script([Reply::status(500, "boom")]);
    let mut d = Daemon::start(&full_config(&slack, &smtp));
    assert_eq!(d.post(CAMPAIGN).await.0, 200);
    // 500 first, then (1s later) accepted.
    let got = slack.wait_accepted(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(slack.received()[0].answered, 500);

    // Now Slack is down while the daemon stops; the next process delivers.
    slack.set_default(Reply::status(503, "down"));
    assert_eq!(d.post(&with_sid(CAMPAIGN, "CAsecond")).await.0, 200);
    eventually("a failed attempt", WAIT, || {
        (slack.received().len() >= 3).then_some(())
    })
    .await;
    assert_eq!(d.terminate(), Some(0));
    slack.set_default(Reply::ok());
    d.spawn();
    let got = slack.wait_accepted(2, WAIT).await;
    assert_eq!(got.len(), 2);
    let attempts = d
        .deliveries(None)
        .into_iter()
        .find(|x| x["sid"] == "CAsecond" && x["channel"] == "sales")
        .unwrap();
    assert_eq!(attempts["status"], "done");
    assert!(attempts["attempts"].as_u64().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_the_shipped_configs() {
    let root = env!("CARGO_MANIFEST_DIR");
    for cfg in [
        "config/callnotify.yaml",
        "config/examples/slack.yaml",
        "config/examples/email.yaml",
        "config/examples/full.yaml",
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .current_dir(root)
            .args(["check", "--config", cfg])
            .env("AIR_WEBHOOK_TOKEN", "abcdefghijklmnopqrstuvwxyz")
            .env(
                "SLACK_SALES_WEBHOOK",
                "https://hooks.slack.com/services/T/B/X",
            )
            .env("SMTP_USER", "u")
            .env("SMTP_PASSWORD", "p")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cfg}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("OK: every template the rules use rendered"),
            "{stdout}"
        );
        if cfg == "config/callnotify.yaml" {
            assert!(stdout.contains(": 1 channel, 2 rules, "), "{stdout}");
        }
    }
}

/// A temporary folder with `templates` (path under `t/`, text) and a config `c.yaml` holding
/// `yaml`, in which `DIR` stands for the folder. Returns the folder and the config's path.
fn one_off_config(
    templates: &[(&str, &str)],
    yaml: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in templates {
        let path = dir.path().join("t").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let cfg = dir.path().join("c.yaml");
    let dir_text = dir.path().display().to_string();
    std::fs::write(&cfg, yaml.replace("DIR", &dir_text)).unwrap();
    (dir, cfg)
}

fn check_config(cfg: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
        .args(["check", "--config"])
        .arg(cfg)
        .output()
        .unwrap()
}

/// `callnotify render` of the fixture call (given on stdin) with the config `cfg`.
fn render_fixture(cfg: &std::path::Path, flags: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
        .arg("--config")
        .arg(cfg)
        .arg("render")
        .args(flags)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(FIXTURE.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_every_problem_and_exits_1() {
    let (_dir, cfg) = one_off_config(
        &[("slack/typo.hbs", "{{lead_nmae}}")],
        r#"
templates_dir: "DIR/t"
server: { tokens: ["${UNSET_TOKEN_VAR}"], listn: "x" }
channels:
  s: { type: slack, webhook_url: "https://hooks.slack.com/x" }
  m: { type: email, smtp: { host: "127.0.0.1" }, from: "calls@example.com" }
rules:
  - name: a
    when: { duration: { gtee: 5 } }
    notify: [{ channel: nope, template: slack/typo }]
  - name: b
    notify: [{ channel: s, template: slack/typo }]
  - name: c
    notify: [{ channel: m, template: slack/typo, subject: x, to: ["a@example.com, {{call.leadData.owner}}"] }]
"#,
    );
    let out = check_config(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "UNSET_TOKEN_VAR",
        "server.listn",
        "rules[0] (a).when.duration.gtee",
        "rules[0] (a).notify[0].channel",
        "rules[2] (c).notify[0].to[0]: mixes text and placeholders and holds a comma",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    // With the structural problems fixed, the template typo is what check reports.
    let fixed = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[\"${UNSET_TOKEN_VAR}\"], listn: \"x\"", "[]")
        .replace("gtee", "gte")
        .replace("channel: nope", "channel: s")
        .replace("\"a@example.com, {{", "\"{{");
    std::fs::write(&cfg, fixed).unwrap();
    let out = check_config(&cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // The typo is one problem per rule using the template, naming every sample that met it.
    let typo: Vec<&str> = stdout.lines().filter(|l| l.contains("lead_nmae")).collect();
    assert_eq!(typo.len(), 3, "{stdout}");
    assert!(
        typo.iter()
            .all(|l| l.contains("with samples post_call_data, ")),
        "{stdout}"
    );
    // The dry run of a call that meets the typo fails the same way, for scripts and CI.
    let out = render_fixture(&cfg, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("rule \"b\": MATCHED")
            && stdout.contains("ERROR")
            && stdout.contains("lead_nmae"),
        "{stdout}"
    );
}

#[test]
fn check_names_a_section_with_more_than_ten_fields_that_delivery_would_cut() {
    let fields: Vec<String> = (1..=12)
        .map(|i| format!(r#"{{"type": "mrkdwn", "text": "*F{i}*\n{{{{call.sid}}}}"}}"#))
        .collect();
    let many = format!(
        r#"{{"blocks": [{{"type": "section", "fields": [{}]}}]}}"#,
        fields.join(", ")
    );
    let (_dir, cfg) = one_off_config(
        &[("slack/many.json.hbs", &many)],
        r#"
templates_dir: "DIR/t"
server: { tokens: [] }
channels:
  s: { type: slack, webhook_url: "https://hooks.slack.com/x" }
rules:
  - name: many
    notify: [{ channel: s, template: slack/many }]
"#,
    );
    let out = check_config(&cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("Slack would reject this: block 0: 12 fields (at most 10)"),
        "{stdout}"
    );

    // What would be sent keeps the first 10 and says so: Slack takes it.
    let out = render_fixture(&cfg, &["--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let message = &report["notifications"][0]["message"];
    assert_eq!(message["rejects"], serde_json::json!([]), "{stdout}");
    let blocks = message["body"]["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["fields"].as_array().unwrap().len(), 10);
    assert_eq!(
        blocks[1]["elements"][0]["text"],
        "… 2 more fields not shown"
    );
}

#[test]
fn check_renders_the_quiet_alert_and_checks_its_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t");
    std::fs::create_dir_all(tpl.join("builtin")).unwrap();
    let cfg = dir.path().join("c.yaml");
    let check = |quiet_alert: &str| {
        std::fs::write(
            &cfg,
            format!(
                r#"
templates_dir: "{}"
server: {{ tokens: ["0123456789abcdef"] }}
channels:
  ops_mail: {{ type: email, smtp: {{ host: "127.0.0.1" }}, from: "calls@example.com" }}
  ops_slack: {{ type: slack, webhook_url: "https://hooks.slack.com/x" }}
rules: []
quiet_alert: {quiet_alert}
"#,
                tpl.display()
            ),
        )
        .unwrap();
        let out = check_config(&cfg);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = check(r#"{ after: "2h", channel: ops_mail, to: ["ops@example.com"] }"#);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("quiet_alert: both messages rendered"),
        "{text}"
    );

    let (code, text) =
        check(r#"{ after: "2h", channel: ops_mail, to: ["ops@example.com", "ops@@example.com"] }"#);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("quiet_alert.to") && text.contains("ops@@example.com"),
        "{text}"
    );
    assert!(!text.contains("both messages rendered"), "{text}");

    // A mistyped override of the alert's template is caught now, not on the quiet day.
    std::fs::write(tpl.join("builtin/quiet.hbs"), "No calls for {{quietFro}}").unwrap();
    let (code, text) = check(r#"{ after: "2h", channel: ops_slack }"#);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("quiet_alert (builtin/quiet via ops_slack)") && text.contains("quietFro"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_shows_what_would_be_sent_and_sends_nothing() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let payload = d.dir.join("call.json");
    std::fs::write(&payload, FIXTURE).unwrap();
    let out = d.cli(&["render", payload.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rule \"booked\": not matched: duration is 44, not >= 60"),
        "{text}"
    );
    assert!(text.contains("rule \"everything\": MATCHED"), "{text}");
    assert!(
        text.contains("rule \"outcomes\": not matched: event is POST_CALL_DATA"),
        "{text}"
    );

    let campaign = d.dir.join("campaign.json");
    std::fs::write(&campaign, CAMPAIGN).unwrap();
    let out = d.cli(&["render", "--json", campaign.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = v["notifications"].as_array().unwrap();
    assert_eq!(n.len(), 3);
    assert!(n[0]["message"]["body"]["text"]
        .as_str()
        .unwrap()
        .contains("Maria Gonzalez"));
    let mime = n[1]["message"]["mime"].as_str().unwrap();
    assert!(
        mime.contains("Subject: Booked: Maria Gonzalez (3m 07s)"),
        "{mime}"
    );
    assert!(
        mime.contains("To: sales-leads@example.com,\r\n jordan@ourteam.example\r\n"),
        "{mime}"
    );
    // `-` reads the body from standard input, as in `curl ... | callnotify render -`.
    let out = d.cli_with_stdin(&["render", "--json", "-"], CAMPAIGN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let piped: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(piped["rules"], v["rules"]);
    let p = piped["notifications"].as_array().unwrap();
    assert_eq!(p.len(), 3);
    assert_eq!(p[0]["message"], n[0]["message"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(slack.received().is_empty());
    assert!(smtp.messages().is_empty());
    assert!(d.deliveries(None).is_empty());
}

#[test]
fn the_daemon_refuses_to_start_on_a_config_that_would_fail_a_call() {
    let (_dir, cfg) = one_off_config(
        &[("typo.hbs", "{{lead_nmae}}")],
        r#"
server: { listen: "127.0.0.1:0" }
store: { path: "DIR/s.db" }
templates_dir: "DIR/t"
channels:
  c: { type: log }
rules:
  - name: r
    notify: [{ channel: c, template: typo }]
"#,
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rules[0] (r).notify[0]") && err.contains("lead_nmae"),
        "{err}"
    );
}

/// The variables the shipped example configs take their secrets from.
const SECRETS: &[&str] = &[
    "AIR_WEBHOOK_TOKEN",
    "SLACK_SALES_WEBHOOK",
    "SMTP_HOST",
    "SMTP_USER",
    "SMTP_PASSWORD",
];

/// `callnotify ARGS`, run to the end from the repository root, with none of [`SECRETS`] set.
fn without_secrets<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args(args);
    for var in SECRETS {
        cmd.env_remove(var);
    }
    cmd.output().unwrap()
}

#[test]
fn render_needs_no_secrets_and_names_the_unset_ones() {
    let campaign = format!(
        "{}/tests/fixtures/post_call_data_campaign.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = without_secrets(&["render", "--config", "config/examples/full.yaml", &campaign]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("rule \"booked\": MATCHED"), "{stdout}");
    assert!(
        stdout.contains("POST <the channel's webhook_url>")
            && stdout.contains("Subject: Booked: Maria Gonzalez (3m 07s)"),
        "{stdout}"
    );
    // Said once, on stderr, naming each unset variable and where it is used.
    let notes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("not set, placeholders used: "))
        .collect();
    assert_eq!(notes.len(), 1, "{stderr}");
    for var in [
        "AIR_WEBHOOK_TOKEN (server.tokens[0])",
        "SLACK_SALES_WEBHOOK (channels.sales.webhook_url)",
        "SMTP_USER (channels.managers.smtp.username)",
        "SMTP_PASSWORD (channels.managers.smtp.password)",
    ] {
        assert!(notes[0].contains(var), "no {var} in {stderr}");
    }
    // stdout stays what scripts parse.
    let out = without_secrets(&[
        "render",
        "--json",
        "--config",
        "config/examples/slack.yaml",
        &campaign,
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["notifications"][0]["channel"], "sales");

    // A template that fails is still exit 1, secrets or not.
    let (_dir, cfg) = one_off_config(
        &[("slack/typo.hbs", "{{lead_nmae}}")],
        r#"
templates_dir: "DIR/t"
channels:
  s: { type: slack, webhook_url: "${SLACK_SALES_WEBHOOK}" }
rules:
  - name: r
    notify: [{ channel: s, template: slack/typo }]
"#,
    );
    let out = without_secrets(&[
        "render".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        campaign.as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("lead_nmae"), "{stdout}");
}

#[test]
fn check_refuses_unset_secrets_and_says_how_to_check_the_rest() {
    let out = without_secrets(&["check", "--config", "config/examples/slack.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("server.tokens[0]: environment variable AIR_WEBHOOK_TOKEN is not set")
            && stderr.contains(
                "channels.sales.webhook_url: environment variable SLACK_SALES_WEBHOOK is not set"
            ),
        "{stderr}"
    );
    assert!(stderr.contains("check --without-secrets"), "{stderr}");
}

#[test]
fn check_without_secrets_passes_the_shipped_configs_and_names_what_it_did_not_check() {
    for (cfg, unchecked) in [
        ("config/callnotify.yaml", &[][..]),
        (
            "config/examples/slack.yaml",
            &["AIR_WEBHOOK_TOKEN", "SLACK_SALES_WEBHOOK"][..],
        ),
        (
            "config/examples/email.yaml",
            &["AIR_WEBHOOK_TOKEN", "SMTP_USER", "SMTP_PASSWORD"][..],
        ),
        (
            "config/examples/full.yaml",
            &[
                "AIR_WEBHOOK_TOKEN",
                "SLACK_SALES_WEBHOOK",
                "SMTP_USER",
                "SMTP_PASSWORD",
            ][..],
        ),
    ] {
        let out = without_secrets(&["check", "--without-secrets", "--config", cfg]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{cfg}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("OK: every template the rules use rendered"),
            "{stdout}"
        );
        let note = stdout
            .lines()
            .find(|l| l.starts_with("not set, so not checked"));
        match note {
            None => assert!(unchecked.is_empty(), "{cfg}: {stdout}"),
            Some(note) => {
                for var in unchecked {
                    assert!(note.contains(var), "{cfg}: no {var} in {note}");
                }
                // SMTP_HOST has a fallback in email.yaml: it was checked.
                assert!(!note.contains("SMTP_HOST"), "{note}");
            }
        }
        // A placeholder's length is not the token's: no warning about a short token.
        assert!(!stdout.contains("shorter than 16"), "{cfg}: {stdout}");
    }
}

#[test]
fn check_without_secrets_still_finds_real_problems_and_serve_still_refuses() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("t/slack")).unwrap();
    std::fs::write(dir.path().join("t/slack/typo.hbs"), "{{lead_nmae}}").unwrap();
    std::fs::write(dir.path().join("t/slack/fine.hbs"), "{{lead_name}}").unwrap();
    let cfg = dir.path().join("c.yaml");
    let write = |url: &str, template: &str| {
        std::fs::write(
            &cfg,
            format!(
                r#"
server: {{ listen: "127.0.0.1:0", tokens: ["${{AIR_WEBHOOK_TOKEN}}"] }}
store: {{ path: "{d}/s.db" }}
templates_dir: "{d}/t"
channels:
  s: {{ type: slack, webhook_url: "{url}" }}
rules:
  - name: r
    notify: [{{ channel: s, template: {template} }}]
"#,
                d = dir.path().display()
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = without_secrets(&[
            "check".as_ref(),
            "--without-secrets".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let url = "https://hooks.slack.com/services/${SLACK_SALES_WEBHOOK}";

    // A template error is found in the same run that lets the secrets pass.
    write(url, "slack/typo");
    let (code, text) = check();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("rules[0] (r).notify[0]") && text.contains("lead_nmae"),
        "{text}"
    );
    assert!(
        text.contains("AIR_WEBHOOK_TOKEN (server.tokens[0])"),
        "{text}"
    );

    // A typo in the part of a URL that is not secret is still caught.
    write(&url.replace("https:", "htps:"), "slack/fine");
    let (code, text) = check();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("channels.s.webhook_url: must be an https:// URL (checked with a placeholder for unset SLACK_SALES_WEBHOOK)"),
        "{text}"
    );

    write(url, "slack/fine");
    let (code, text) = check();
    assert_eq!(code, Some(0), "{text}");

    // Placeholders are for what sends nothing: serve still refuses the same file, and
    // send-test refuses to send with a placeholder (it may go without the Air token).
    let refused = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        all.extend(["--config".as_ref(), cfg.as_os_str()]);
        let out = without_secrets(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = refused(&["serve"]);
    assert!(
        stderr.contains("environment variable AIR_WEBHOOK_TOKEN is not set")
            && stderr.contains("environment variable SLACK_SALES_WEBHOOK is not set"),
        "{stderr}"
    );
    let stderr = refused(&["send-test", "--channel", "s"]);
    assert!(
        stderr.contains("not set: SLACK_SALES_WEBHOOK (channels.s.webhook_url)")
            && !stderr.contains("AIR_WEBHOOK_TOKEN"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_named_with_ampersand_and_brackets_reads_as_written_in_the_slack_header() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let d = Daemon::start(&full_config(&slack, &smtp));
    let mut v: Value = serde_json::from_str(OUTCOME).unwrap();
    v["call"]["cachedLeadName"] = "Tom & Jerry <x@y>".into();
    v["call"]["createdAt"] = Value::Null;
    let (status, body) = d.post(&v.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let got = slack.wait_accepted(1, WAIT).await;
    // The header is plain_text: Slack shows entities there as entities, so none are sent.
    assert_eq!(got[0]["blocks"][0]["type"], "header");
    assert_eq!(
        got[0]["blocks"][0]["text"]["text"],
        "Call with Tom & Jerry <x@y>"
    );
    // mrkdwn (the fallback text) still escapes: there `<` would start a link or a mention.
    assert_eq!(
        got[0]["text"],
        "Call with Tom &amp; Jerry &lt;x@y&gt; (44s)\n"
    );
    // A call without a start time says so instead of an empty field.
    assert_eq!(
        got[0]["blocks"][1]["fields"][2]["text"],
        "*Started*\nunknown"
    );
}
