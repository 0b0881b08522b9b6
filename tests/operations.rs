//! Operating the daemon: health, readiness, metrics, reload without restart, send-test, and the
//! quiet-period alert.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn config(slack: &FakeSlack, extra_rule: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  tokens: ["{TOKEN}"]
store:
  path: "{{dir}}/store.db"
templates_dir: "{{templates}}"
channels:
  console: {{ type: log }}
  sales: {{ type: slack, webhook_url: "{url}", max_per_second: 0 }}
rules:
  - name: every_call
    notify:
      - channel: sales
        template: slack/summary
{extra_rule}
"#,
        url = slack.url
    )
}

async fn get(url: &str) -> (u16, String) {
    let r = http().get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `/metrics` as text, read without the async runtime (for `eventually`).
fn scrape(d: &Daemon) -> Option<String> {
    let out = std::process::Command::new("curl")
        .args(["-s", &d.url("/metrics")])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).to_string())
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let (s, body) = get(&d.url("/healthz")).await;
    assert_eq!((s, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (s, body) = get(&d.url("/readyz")).await;
    assert_eq!((s, body.as_str()), (200, r#"{"status":"ready"}"#));
    let (s, _) = get(&d.url("/metrics")).await;
    assert_eq!(s, 200);
}

/// The first line says what this process runs on: the config file it read (several may sit
/// side by side, as in config/examples/), the store it opened, the address, and its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_line_names_the_config_file_the_store_and_the_version() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let line: Value = d
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "callnotify is listening")
        .expect("a start line");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["config"], d.config.display().to_string(), "{line}");
    assert_eq!(
        line["store"],
        d.dir.join("store.db").display().to_string(),
        "{line}"
    );
    assert_eq!(line["listen"], d.addr.to_string(), "{line}");
    assert_eq!(line["version"], env!("CARGO_PKG_VERSION"), "{line}");
}

/// An image or unit that sets `CALLNOTIFY_*` variables wins over the file without a word (the
/// shipped image sets templates_dir, so a mounted config's own templates_dir was ignored):
/// start-up and `check` name each setting the environment set, never its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_the_environment_sets_over_the_file_are_named_not_shown() {
    let slack = FakeSlack::start().await;
    let env = [
        ("CALLNOTIFY_SERVER__TOKENS", TOKEN),
        ("CALLNOTIFY_SERVER__MAX_BODY_BYTES", "65536"),
    ];
    let d = Daemon::start_with_env(&config(&slack, ""), &env);
    let named = "server.max_body_bytes (CALLNOTIFY_SERVER__MAX_BODY_BYTES), server.tokens (CALLNOTIFY_SERVER__TOKENS)";
    let line: Value = d
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "the environment sets these over the config file")
        .unwrap_or_else(|| panic!("no line naming the overrides:\n{}", d.logs()));
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["settings"], named, "{line}");
    let out = d.cli(&["check"]);
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!("set by the environment over the file: {named}")),
        "{report}"
    );
    assert!(!d.logs().contains(TOKEN) && !report.contains(TOKEN));

    // A template missing from the templates_dir the environment chose says so.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = d
        .command_with_env(
            &["check"],
            &[(
                "CALLNOTIFY_TEMPLATES_DIR",
                elsewhere.path().to_str().unwrap(),
            )],
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("(templates_dir set by CALLNOTIFY_TEMPLATES_DIR)"),
        "{err}"
    );
}

/// With `--log-format json`, every line is one JSON object, and a delivery's line carries the
/// delivery's fields once (in `span`), not a second time in a list of spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_a_delivery_said_once() {
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAjsonlog")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    let lines: Vec<Value> = d
        .logs()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let delivered = lines
        .iter()
        .find(|v| v["message"] == "delivered")
        .expect("a delivered line");
    assert_eq!(delivered["span"]["sid"], "CAjsonlog", "{delivered}");
    assert_eq!(delivered["span"]["channel"], "sales", "{delivered}");
    assert_eq!(delivered["span"]["attempt"], 1, "{delivered}");
    assert!(delivered.get("spans").is_none(), "{delivered}");
    assert_eq!(lines.last().unwrap()["message"], "stopped");
}

/// With `--log-format json` (the image's default), why `serve` could not start is a JSON log
/// line like every other, in order after the warnings before it; it used to be plain text,
/// which a reader of JSON lines drops or chokes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_logs_a_failed_start_says_why_in_json() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let dir = tempfile::tempdir().unwrap();
    let serve = |yaml: String| {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let last = lines.last().expect("a line").clone();
        assert_eq!(last["level"], "ERROR", "{last}");
        last["message"].as_str().unwrap().to_string()
    };
    let busy = format!(
        "server: {{ listen: \"{}\" }}\nstore: {{ path: \"{}/s.db\" }}\ntemplates_dir: \"{}\"\n",
        d.addr,
        dir.path().display(),
        templates_dir().display()
    );
    let why = serve(busy.clone());
    assert!(
        why.starts_with(&format!("cannot start: cannot listen on {}", d.addr)),
        "{why}"
    );
    let why = serve(busy.replace("listen:", "lisen:"));
    assert!(why.contains("server.lisen: unknown field"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counters_move_with_calls_and_deliveries() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    for i in 0..3 {
        assert_eq!(d.post(&with_sid(FIXTURE, &format!("CAm{i}"))).await.0, 200);
    }
    d.post(&with_sid(FIXTURE, "CAm0")).await;
    post(&d.url("/webhooks/air"), FIXTURE, Some("wrong")).await;
    post(&d.url("/webhooks/air"), "{}", Some(TOKEN)).await;
    slack.wait_accepted(3, WAIT).await;
    let text = eventually("delivery metrics", WAIT, || {
        let t = scrape(&d)?;
        (metric(
            &t,
            r#"callnotify_deliveries_total{channel="sales",outcome="done"}"#,
        ) == 3.0)
            .then_some(t)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            r#"callnotify_calls_received_total{result="accepted"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            r#"callnotify_calls_received_total{result="duplicate"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"callnotify_calls_received_total{result="unauthorized"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"callnotify_calls_received_total{result="rejected"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"callnotify_rules_matched_total{rule="every_call"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            r#"callnotify_delivery_latency_seconds_count{channel="sales"}"#
        ),
        3.0
    );
    assert!(metric(&text, "callnotify_last_call_received_timestamp_seconds") > 1.7e9);
}

/// Posts a call while another process holds the store's write lock, and hangs up while its
/// commit waits. The caller releases the lock, within the daemon's busy timeout (5 s), which
/// would otherwise refuse the call.
async fn hang_up_during_commit(d: &Daemon, sid: &str) -> WriteLock {
    use tokio::io::AsyncWriteExt;
    let body = with_sid(FIXTURE, sid);
    let request = format!(
        "POST /webhooks/air HTTP/1.1\r\nHost: callnotify\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let lock = WriteLock::take(&d.dir.join("store.db"));
    let addr = d.url("").trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock
}

/// A client that hangs up while its call is being committed drops the request's handler, but the
/// call is stored (Air's retry would be answered `duplicate`), so it must be counted, logged and
/// delivered like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_client_hung_up_during_the_commit_is_counted_logged_and_delivered() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    hang_up_during_commit(&d, "CAhungup").await.release();

    let sent = slack.wait_accepted(1, WAIT).await;
    assert!(
        sent[0].to_string().contains("Call with Tyler"),
        "{}",
        sent[0]
    );
    let text = eventually("the call counted", WAIT, || {
        let t = scrape(&d)?;
        (metric(&t, r#"callnotify_calls_received_total{result="accepted"}"#) == 1.0).then_some(t)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            r#"callnotify_rules_matched_total{rule="every_call"}"#
        ),
        1.0
    );
    let logs = d.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("call accepted") && l.contains("CAhungup")),
        "{logs}"
    );
}

/// SIGTERM while a call whose client hung up is still being committed: shutdown waits for that
/// commit's bookkeeping, so the call is logged and its time is what the next start reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_commit_of_a_call_whose_client_hung_up() {
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start(&config(&slack, ""));
    let lock = hang_up_during_commit(&d, "CAhungupstop").await;
    // The daemon stops while the commit waits for the lock (well within its busy timeout).
    d.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.release();
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    let logs = d.logs();
    let accepted = logs
        .lines()
        .position(|l| l.contains("call accepted") && l.contains("CAhungupstop"));
    let stopped = logs.lines().position(|l| l.contains("\"stopped\""));
    assert!(
        accepted.is_some() && accepted < stopped,
        "accepted at {accepted:?}, stopped at {stopped:?}:\n{logs}"
    );

    tokio::task::block_in_place(|| d.spawn());
    let (_, text) = get(&d.url("/metrics")).await;
    let last = metric(&text, "callnotify_last_call_received_timestamp_seconds");
    assert!(last > 1.7e9, "{text}");
    slack.wait_accepted(1, WAIT).await;
}

/// The series an operator alerts on are there from the start, and the last call's time
/// survives a restart (the README's "no calls lately" alert must not go blind after a deploy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerting_series_exist_from_the_start_and_the_last_call_survives_a_restart() {
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start(&config(&slack, ""));
    let (_, text) = get(&d.url("/metrics")).await;
    for line in [
        r#"callnotify_calls_received_total{result="accepted"} 0"#,
        r#"callnotify_calls_received_total{result="unauthorized"} 0"#,
        "callnotify_template_errors_total 0",
        r#"callnotify_config_reloads_total{result="failure"} 0"#,
        "callnotify_config_last_reload_successful 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    assert!(
        !text.contains("callnotify_last_call_received_timestamp_seconds"),
        "{text}"
    );
    assert_eq!(d.post(&with_sid(FIXTURE, "CAlast")).await.0, 200);
    let (_, text) = get(&d.url("/metrics")).await;
    let before = metric(&text, "callnotify_last_call_received_timestamp_seconds");
    assert!(before > 1.7e9, "{text}");
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    tokio::task::block_in_place(|| d.spawn());
    let (_, text) = get(&d.url("/metrics")).await;
    let after = metric(&text, "callnotify_last_call_received_timestamp_seconds");
    assert!(
        (after - before).abs() < 1.0,
        "{before} before, {after} after\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_a_good_config_and_keeps_the_old_one_when_bad() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let original = std::fs::read_to_string(&d.config).unwrap();

    // A broken config: refused, the old one keeps serving.
    std::fs::write(
        &d.config,
        original.replace("template: slack/summary", "template: slack/nope"),
    )
    .unwrap();
    d.signal("HUP");
    eventually("a refused reload", WAIT, || {
        d.logs().contains("reload refused").then_some(())
    })
    .await;
    assert_eq!(d.post(&with_sid(FIXTURE, "CAr1")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;

    // A good config with a second rule: used for calls after the swap.
    let extra =
        "  - name: second\n    notify:\n      - channel: console\n        template: log/summary\n";
    std::fs::write(&d.config, format!("{original}{extra}")).unwrap();
    d.signal("HUP");
    eventually("a reload", WAIT, || {
        d.logs().contains("config reloaded").then_some(())
    })
    .await;
    let (_, body) = d.post(&with_sid(FIXTURE, "CAr2")).await;
    assert_eq!(body["rules"], serde_json::json!(["every_call", "second"]));

    // The same through the HTTP endpoint.
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    std::fs::write(&d.config, "rules: [").unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "config_invalid");
    let (_, body) = d.post(&with_sid(FIXTURE, "CAr3")).await;
    assert_eq!(body["rules"], serde_json::json!(["every_call", "second"]));
    let metrics = get(&d.url("/metrics")).await.1;
    assert_eq!(
        metric(
            &metrics,
            r#"callnotify_config_reloads_total{result="failure"}"#
        ),
        2.0
    );
    // The refusal stays visible until a reload succeeds.
    assert_eq!(
        metric(&metrics, "callnotify_config_last_reload_successful"),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"callnotify_config_reloads_total{result="success"}"#
        ),
        2.0
    );
    std::fs::write(&d.config, &original).unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let metrics = get(&d.url("/metrics")).await.1;
    assert_eq!(
        metric(&metrics, "callnotify_config_last_reload_successful"),
        1.0
    );
}

/// `systemctl reload` right after `start` sends SIGHUP while the daemon is still starting (here:
/// waiting for a store another process holds locked). It must not end the process (systemd
/// counts death by SIGHUP as a clean exit and does not restart it): it is a reload once the
/// daemon runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_the_daemon_starts_is_a_reload_not_the_end_of_it() {
    let slack = FakeSlack::start().await;
    // No tokens: the warning about an open endpoint is logged before the store is opened.
    let yaml = config(&slack, "").replace(&format!("[\"{TOKEN}\"]"), "[]");
    let mut d = Daemon::start(&yaml);
    assert_eq!(d.terminate(), Some(0));
    let lock = WriteLock::take(&d.dir.join("store.db"));
    d.launch();
    eventually("the daemon to be starting", WAIT, || {
        d.logs()
            .contains("no Bearer tokens configured")
            .then_some(())
    })
    .await;
    d.signal("HUP");
    lock.release();
    d.wait_listening();
    eventually("the reload the SIGHUP asked for", WAIT, || {
        let logs = d.logs();
        (logs.contains("config reloaded") && logs.contains("\"trigger\":\"SIGHUP\"")).then_some(())
    })
    .await;
    assert_eq!(d.post(&with_sid(FIXTURE, "CAhupstart")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
}

/// After a reload, nothing of the config it replaced stays open: a log channel's file that is
/// rotated and deleted afterwards is closed, not kept (and its disk space with it) until the
/// process ends.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lets_go_of_the_files_the_replaced_config_had_open() {
    let slack = FakeSlack::start().await;
    let extra =
        "  - name: logged\n    notify:\n      - channel: console\n        template: log/summary\n";
    let yaml = config(&slack, extra).replace(
        "console: { type: log }",
        "console: { type: log, file: \"{dir}/n.jsonl\" }",
    );
    let d = Daemon::start(&yaml);
    let file = d.dir.join("n.jsonl");
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert_eq!(d.post(&with_sid(FIXTURE, "CAfile1")).await.0, 200);
    eventually("the first line", WAIT, || (lines(&file) == 1).then_some(())).await;
    let rotated = d.dir.join("n.jsonl.1");
    std::fs::rename(&file, &rotated).unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAfile2")).await.0, 200);
    eventually("a line in the new file", WAIT, || {
        (lines(&file) == 1).then_some(())
    })
    .await;
    std::fs::remove_file(&rotated).unwrap();
    let fds = format!("/proc/{}/fd", d.pid());
    eventually("the rotated file to be closed", WAIT, || {
        let open: Vec<String> = std::fs::read_dir(&fds)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|t| t.display().to_string())
            .filter(|t| t.contains("n.jsonl.1"))
            .collect();
        open.is_empty().then_some(())
    })
    .await;
}

/// A reload reads the files again but not the environment, which the daemon cannot re-read: a
/// variable set since start (in systemd's EnvironmentFile, say) is still unset for it. The
/// refusal says so, instead of "set it in the daemon's environment" to someone who just did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_needs_a_new_environment_variable_says_to_restart() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let original = std::fs::read_to_string(&d.config).unwrap();
    let rotating = original.replace(
        &format!("[\"{TOKEN}\"]"),
        &format!("[\"{TOKEN}\", \"${{CALLNOTIFY_TEST_NEXT_TOKEN}}\"]"),
    );
    assert_ne!(rotating, original);
    std::fs::write(&d.config, rotating).unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let v: Value = r.json().await.unwrap();
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("CALLNOTIFY_TEST_NEXT_TOKEN")
            && message.contains("restart it to pick up a variable set since"),
        "{message}"
    );
    // Logs are written by a background thread: the line may follow the answer.
    eventually("the refusal in the log", WAIT, || {
        d.logs()
            .contains("restart it to pick up a variable set since")
            .then_some(())
    })
    .await;
}

/// An empty file is what a config looks like for a moment while it is rewritten in place. Taken
/// for "all defaults" it would open the webhook, drop every channel (their pending deliveries go
/// dead) and every rule: a reload refuses it and the running config stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_an_empty_config_file_is_refused() {
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(500, "internal_error"));
    let d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAempty")).await.0, 200);
    eventually("a first failed attempt", WAIT, || {
        let rows = d.deliveries(Some("pending"));
        (rows.len() == 1 && rows[0]["attempts"] == 1).then_some(())
    })
    .await;
    let original = std::fs::read_to_string(&d.config).unwrap();
    for blank in ["", "\n  \n", "# being rewritten\n---\n"] {
        std::fs::write(&d.config, blank).unwrap();
        let r = http().post(d.url("/-/reload")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 422, "{blank:?}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("no settings"),
            "{v}"
        );
    }
    std::fs::write(&d.config, original).unwrap();
    let unauthenticated = with_sid(FIXTURE, "CAopen");
    assert_eq!(
        post(&d.url("/webhooks/air"), &unauthenticated, None)
            .await
            .0,
        401
    );
    let rows = d.deliveries(None);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "pending", "{rows:?}");
    let metrics = get(&d.url("/metrics")).await.1;
    assert_eq!(
        metric(
            &metrics,
            r#"callnotify_config_reloads_total{result="failure"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_posted_during_reloads_are_all_accepted_and_delivered() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let url = d.url("/webhooks/air");
    let poster = tokio::spawn(async move {
        let mut codes = Vec::new();
        for i in 0..60 {
            codes.push(
                post(&url, &with_sid(FIXTURE, &format!("CAdr{i}")), Some(TOKEN))
                    .await
                    .0,
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        codes
    });
    for _ in 0..10 {
        d.signal("HUP");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let codes = poster.await.unwrap();
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    slack.wait_accepted(60, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_commands_need_only_the_store_and_refuse_one_that_is_not_there() {
    let slack = FakeSlack::start().await;
    let yaml = config(&slack, "").replace(&slack.url, "${OPS_TEST_SLACK_URL}");
    let d = Daemon::start_with_env(&yaml, &[("OPS_TEST_SLACK_URL", &slack.url)]);
    assert_eq!(d.post(FIXTURE).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    let deliveries = |config: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .args(["deliveries", "list", "--json", "--config"])
            .arg(config)
            .env_remove("OPS_TEST_SLACK_URL")
            .current_dir(&d.dir)
            .output()
            .unwrap()
    };
    // An operator's shell without the daemon's secrets can still look at the store.
    let out = deliveries(&d.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    // A store path that is not there (another working directory, a typo) is an error, and
    // nothing is created in its place.
    let elsewhere = d.dir.join("other.yaml");
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&elsewhere, text.replace("/store.db", "/missing/store.db")).unwrap();
    let out = deliveries(&elsewhere);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no store at") && err.contains("missing/store.db"),
        "{err}"
    );
    assert!(!d.dir.join("missing").exists());
}

/// `deliveries list` beside the daemon is a read and takes no write lock: under one, a listing
/// on a large store (a scan by sid or status takes seconds with a cold cache) held every webhook
/// until the daemon's busy timeout answered Air 503. So it works while a writer holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_list_takes_no_write_lock_beside_the_daemon() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(FIXTURE).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    d.wait_settled(WAIT).await;
    let lock = WriteLock::take(&d.dir.join("store.db"));
    let out = d.cli(&["deliveries", "list", "--json", "--status", "done"]);
    lock.release();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_sends_to_slack_and_smtp_and_reports_the_answer() {
    let slack = FakeSlack::start().await;
    let smtp = Smtp::start();
    let dir = tempfile::tempdir().unwrap();
    let run = cli_for(&slack.url, smtp.port, "none", &dir, None);
    let (code, out) = run(&["send-test", "--channel", "sales"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("delivered: HTTP 200"), "{out}");
    assert!(slack.accepted()[0]["text"]
        .as_str()
        .unwrap()
        .contains("callnotify test message: Maria Gonzalez"));

    let (code, out) = run(&["send-test", "--channel", "mail", "--to", "me@example.com"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("delivered: SMTP 250"), "{out}");
    assert_eq!(
        smtp.messages()[0]["rcpt_tos"],
        serde_json::json!(["me@example.com"])
    );

    // --to on a channel that has no recipients is a mistake, not silently ignored.
    let (code, out) = run(&["send-test", "--channel", "sales", "--to", "me@example.com"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("--to is for email channels; sales is a slack channel"),
        "{out}"
    );
    assert_eq!(slack.received().len(), 1, "nothing more was sent");

    slack.set_default(Reply::status(404, "no_service"));
    let (code, out) = run(&["send-test", "--channel", "sales"]);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("failed (permanent") && out.contains("HTTP 404: no_service"),
        "{out}"
    );
}

/// send-test sends with the channel's settings: the daemon's own secrets (the Air token) and
/// other channels' may be unset where it runs, and what it does send with must be set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_needs_only_what_it_sends_with() {
    let slack = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
server: {{ tokens: ["${{SEND_TEST_AIR_TOKEN}}"] }}
store: {{ path: "{dir}/store.db" }}
templates_dir: "{templates}"
channels:
  sales: {{ type: slack, webhook_url: "${{SEND_TEST_SALES_URL}}" }}
  support: {{ type: slack, webhook_url: "${{SEND_TEST_SUPPORT_URL}}" }}
rules: []
"#,
            dir = dir.path().display(),
            templates = templates_dir().display(),
        ),
    )
    .unwrap();
    let run = |sales_url: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"));
        cmd.args(["send-test", "--channel", "sales", "--config"])
            .arg(&cfg)
            .env_remove("SEND_TEST_AIR_TOKEN")
            .env_remove("SEND_TEST_SUPPORT_URL");
        match sales_url {
            Some(url) => cmd.env("SEND_TEST_SALES_URL", url),
            None => cmd.env_remove("SEND_TEST_SALES_URL"),
        };
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, out) = run(Some(&slack.url));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("delivered: HTTP 200"), "{out}");
    assert_eq!(slack.accepted().len(), 1);

    let (code, out) = run(None);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("not set: SEND_TEST_SALES_URL (channels.sales.webhook_url)"),
        "{out}"
    );
    assert!(!out.contains("SEND_TEST_AIR_TOKEN"), "{out}");
    assert_eq!(slack.received().len(), 1, "nothing sent to a placeholder");
}

/// A config in `dir` with a Slack channel `sales` at `slack_url` and an email channel `mail` on
/// the SMTP server at `smtp_port`; the returned closure runs a CLI command against it and gives
/// its exit code and stdout. `trusted`, if given, is the only certificate the command's system
/// trust store holds (through `SSL_CERT_FILE`, which rustls-platform-verifier reads on Linux).
fn cli_for(
    slack_url: &str,
    smtp_port: u16,
    smtp_tls: &str,
    dir: &tempfile::TempDir,
    trusted: Option<PathBuf>,
) -> impl Fn(&[&str]) -> (Option<i32>, String) {
    let yaml = format!(
        r#"
store: {{ path: "{dir}/store.db" }}
templates_dir: "{templates}"
channels:
  sales: {{ type: slack, webhook_url: "{slack_url}" }}
  mail:
    type: email
    smtp: {{ host: "127.0.0.1", port: {smtp_port}, tls: {smtp_tls} }}
    from: "Call Bot <calls@example.com>"
rules: []
"#,
        dir = dir.path().display(),
        templates = templates_dir().display(),
    );
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    move |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"));
        cmd.args(args).arg("--config").arg(&cfg);
        if let Some(cert) = &trusted {
            cmd.env("SSL_CERT_FILE", cert).env_remove("SSL_CERT_DIR");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_whose_certificate_is_not_trusted_are_refused() {
    // Both peers present a self-signed certificate for 127.0.0.1: the TLS stacks (Slack over
    // HTTPS, SMTP with STARTTLS) must handshake, check it and refuse to send.
    let https = HttpsPeer::start();
    let smtp = Smtp::start_starttls();
    let dir = tempfile::tempdir().unwrap();
    let https_url = format!("https://127.0.0.1:{}/hook", https.port);
    let run = cli_for(&https_url, smtp.port, "starttls", &dir, None);

    let (code, out) = run(&["send-test", "--channel", "sales"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid peer certificate"), "{out}");
    // The peer reports the handshake once the client has hung up.
    let seen = eventually("the HTTPS peer's report", WAIT, || {
        let seen = https.handshakes();
        (!seen.is_empty()).then_some(seen)
    })
    .await;
    assert!(
        seen.iter().all(|h| h.starts_with("handshake failed")),
        "{seen:?}"
    );

    let (code, out) = run(&["send-test", "--channel", "mail", "--to", "me@example.com"]);
    assert_eq!(code, Some(1), "{out}");
    // lettre's errors repeat their sources; the report says it once.
    let report = out
        .lines()
        .find(|l| l.starts_with("failed"))
        .unwrap_or_default();
    assert_eq!(
        report.matches("invalid peer certificate").count(),
        1,
        "{out}"
    );
    assert!(smtp.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_whose_certificate_the_system_trusts_are_accepted() {
    // The same peers, with their certificate in the system's trust store: Slack over HTTPS and
    // SMTP with STARTTLS both use that store, so a relay signed by an in-house CA works.
    let https = HttpsPeer::start();
    let smtp = Smtp::start_starttls();
    let dir = tempfile::tempdir().unwrap();
    let https_url = format!("https://127.0.0.1:{}/hook", https.port);
    let (cert, _) = test_certificate();
    let run = cli_for(&https_url, smtp.port, "starttls", &dir, Some(cert));

    let (code, out) = run(&["send-test", "--channel", "sales"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("delivered: HTTP 200"), "{out}");
    // The peer's report comes on its own pipe, maybe after send-test has exited.
    let seen = eventually("the HTTPS peer's report", WAIT, || {
        let seen = https.handshakes();
        (!seen.is_empty()).then_some(seen)
    })
    .await;
    assert_eq!(seen, ["handshake ok"]);

    let (code, out) = run(&["send-test", "--channel", "mail", "--to", "me@example.com"]);
    assert_eq!(code, Some(0), "{out}");
    let got = smtp.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["rcpt_tos"], serde_json::json!(["me@example.com"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quiet_alert_fires_once_and_again_when_calls_resume() {
    use callnotify::clock::{Clock, ManualClock};
    let slack = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = in_process_config(
        dir.path(),
        &templates_dir(),
        &format!(
            "channels:\n  ops: {{ type: slack, webhook_url: \"{}\", max_per_second: 0 }}\nquiet_alert: {{ after: \"2h\", channel: ops }}\n",
            slack.url
        ),
    );
    let t0 = 1_800_000_000_000;
    let clock = ManualClock::new(t0);
    let app = callnotify::app::App::build_with_clock(&cfg, clock.clone())
        .await
        .unwrap();
    let shared = app.shared();
    let live = shared.live.load_full();
    let q = live.config.quiet_alert.as_ref().unwrap();
    let mut alert = callnotify::quiet::QuietAlert::default();

    alert.check(&shared, q, clock.now_ms()).await;
    clock.advance(3_600_000);
    alert.check(&shared, q, clock.now_ms()).await;
    assert!(
        shared.worker.deliver_next().await.is_none(),
        "nothing after 1h"
    );
    clock.advance(3_600_000);
    alert.check(&shared, q, clock.now_ms()).await;
    alert.check(&shared, q, clock.now_ms() + 1000).await;
    assert!(shared.worker.deliver_next().await.is_some());
    assert!(shared.worker.deliver_next().await.is_none(), "alerted once");
    let got = slack.accepted();
    assert!(
        got[0]["text"]
            .as_str()
            .unwrap()
            .contains("No calls received for 2h 00m"),
        "{got:?}"
    );

    // A restart (the alert's state in memory is lost) neither repeats the alert, even once the
    // restarted daemon has itself seen `after` go by without a call...
    let mut alert = callnotify::quiet::QuietAlert::default();
    alert.check(&shared, q, clock.now_ms()).await;
    clock.advance(3 * 3_600_000);
    alert.check(&shared, q, clock.now_ms()).await;
    assert!(
        shared.worker.deliver_next().await.is_none(),
        "alerted again after a restart"
    );
    // ...nor forgets to say that calls resumed.
    clock.advance(60_000);
    shared.note_call(clock.now_ms());
    clock.advance(1000);
    alert.check(&shared, q, clock.now_ms()).await;
    assert!(shared.worker.deliver_next().await.is_some());
    assert!(slack.accepted()[1]["text"]
        .as_str()
        .unwrap()
        .contains("Calls are arriving again"));

    // Alerted again, then the alert is turned off (a reload without `quiet_alert`) and, days
    // later, on again: it starts afresh instead of announcing calls nobody was waiting for.
    clock.advance(3 * 3_600_000);
    alert.check(&shared, q, clock.now_ms()).await;
    assert!(shared.worker.deliver_next().await.is_some(), "alerted");
    alert.forget(&shared).await;
    let mut alert = callnotify::quiet::QuietAlert::default(); // and a restart or two since
    clock.advance(48 * 3_600_000);
    shared.note_call(clock.now_ms());
    alert.check(&shared, q, clock.now_ms()).await;
    assert!(
        shared.worker.deliver_next().await.is_none(),
        "an unprompted 'calls are arriving again'"
    );
}

/// An in-process daemon on a wall clock the test steps (`step`, in ms): Slack channel `sales`,
/// every call a Block Kit message, retries after 60 s (`extra`: more delivery settings).
struct Stepped {
    dir: tempfile::TempDir,
    _app: callnotify::app::App,
    shared: Arc<callnotify::app::Shared>,
    clock: Arc<callnotify::clock::SteadyClock>,
    step: Arc<std::sync::atomic::AtomicI64>,
}

async fn stepped(slack: &FakeSlack, extra: &str) -> Stepped {
    use callnotify::clock::SteadyClock;
    use std::sync::atomic::{AtomicI64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let cfg = in_process_config(
        dir.path(),
        &templates_dir(),
        &format!(
            "delivery: {{ retry_schedule: [\"60s\"]{extra} }}\nchannels:\n  sales: {{ type: slack, webhook_url: \"{}\", max_per_second: 0 }}\nrules:\n  - name: every_call\n    notify: [{{ channel: sales, template: slack/booked }}]\n",
            slack.url
        ),
    );
    let step = Arc::new(AtomicI64::new(0));
    let wall = {
        let step = step.clone();
        move || chrono::Utc::now().timestamp_millis() + step.load(Ordering::SeqCst)
    };
    let clock = SteadyClock::with_wall(Box::new(wall));
    let app = callnotify::app::App::build_with_clock(&cfg, clock.clone())
        .await
        .unwrap();
    Stepped {
        dir,
        shared: app.shared(),
        _app: app,
        clock,
        step,
    }
}

impl Stepped {
    /// The daemon's time now, after checking it caught up with the stepped wall clock.
    fn caught_up(&self) -> i64 {
        use callnotify::clock::Clock;
        use std::sync::atomic::Ordering;
        let now = self.clock.now_ms();
        let wall = chrono::Utc::now().timestamp_millis() + self.step.load(Ordering::SeqCst);
        assert!(
            (now - wall).abs() < 1000,
            "the daemon's clock caught up with the stepped wall clock"
        );
        now
    }

    /// Stores call `sid`, owing the rule's one Slack message, as received now.
    async fn store_call(&self, sid: &str) {
        use callnotify::clock::Clock;
        let action = self.shared.live.load().config.rules[0].actions[0].clone();
        let owed = vec![callnotify::store::NewDelivery {
            rule: "every_call".into(),
            action_idx: 0,
            action,
            channel_type: Some("slack"),
        }];
        let body = serde_json::json!({"sid": sid, "cachedLeadName": "Maria"});
        self.shared
            .store
            .insert_call(
                sid.into(),
                "POST_CALL_DATA",
                body.to_string(),
                self.clock.now_ms(),
                owed,
            )
            .await
            .unwrap();
    }
}

/// The system clock is stepped back an hour. A retry due in a minute stays due in a minute, and
/// a call stored between the step and the moment the daemon notices it is due at once, not an
/// hour ago or an hour from now: everything the store holds is on one timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_system_clock_leaves_retry_waits_as_they_were() {
    use std::sync::atomic::Ordering;
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(500, "internal_error")]);
    let t = stepped(&slack, "").await;
    let (shared, step) = (&t.shared, &t.step);
    t.store_call("CAretry").await;
    assert!(
        shared.worker.deliver_next().await.is_some(),
        "the first attempt"
    );
    assert_eq!(slack.received()[0].answered, 500);

    step.store(-3_600_000, Ordering::SeqCst);
    t.store_call("CAbetween").await; // before the daemon has looked at the clock again
    shared.follow_wall_clock().await;

    let now = t.caught_up();
    let rows = shared.store.list(None, None, 10).await.unwrap();
    let next = |sid: &str| rows.iter().find(|r| r.sid == sid).unwrap().next_attempt_at - now;
    let retry_in = next("CAretry");
    assert!(
        (45_000..=75_000).contains(&retry_in),
        "retry in {retry_in} ms"
    );
    let between = next("CAbetween");
    assert!((-5_000..=0).contains(&between), "due {between} ms from now");
}

/// The clock is stepped while the store cannot commit: the daemon's clock must not move without
/// the retries it moves, so that the next look at the clock, with the store back, moves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_the_store_could_not_follow_is_followed_once_it_can() {
    use std::sync::atomic::Ordering;
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(500, "internal_error")]);
    let t = stepped(&slack, "").await;
    let (dir, shared, step) = (&t.dir, &t.shared, &t.step);
    t.store_call("CAretry").await;
    assert!(shared.worker.deliver_next().await.is_some());
    assert_eq!(slack.received()[0].answered, 500);

    // The store file is away (nothing commits) when the step is noticed.
    let db = dir.path().join("store.db");
    let away = dir.path().join("away.db");
    std::fs::rename(&db, &away).unwrap();
    step.store(-3_600_000, Ordering::SeqCst);
    shared.follow_wall_clock().await;
    std::fs::rename(&away, &db).unwrap();
    shared.follow_wall_clock().await;

    let now = t.caught_up();
    let rows = shared.store.list(None, None, 10).await.unwrap();
    let retry_in = rows[0].next_attempt_at - now;
    assert!(
        (45_000..=75_000).contains(&retry_in),
        "retry in {retry_in} ms"
    );
}

/// The clock steps forward (a host resumed from suspend) while a send is waiting for Slack's
/// answer: its retry window moves with the clock like every other's, so the failure it gets is
/// retried, not taken for the end of a window that has barely begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_during_a_send_does_not_cut_its_retry_window_short() {
    use callnotify::store::Recorded;
    use std::sync::atomic::Ordering;
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(500, "internal_error").delayed(Duration::from_secs(2))]);
    let t = stepped(&slack, ", give_up_after: \"1h\"").await;
    let (shared, step) = (&t.shared, &t.step);
    t.store_call("CAinflight").await;
    let sending = tokio::spawn({
        let shared = shared.clone();
        async move { shared.worker.deliver_next().await }
    });
    eventually("the send to be in flight", Duration::from_secs(20), || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;
    step.store(2 * 3_600_000, Ordering::SeqCst);
    shared.follow_wall_clock().await;
    let (_, recorded) = sending.await.unwrap().expect("one delivery was due");
    assert!(
        matches!(recorded, Recorded::Retry { .. }),
        "one failed attempt, seconds into a 1h window: {recorded:?}"
    );
    let rows = shared.store.list(None, None, 10).await.unwrap();
    assert_eq!(rows[0].status, "pending", "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_config_an_edited_file_is_reloaded() {
    let slack = FakeSlack::start().await;
    let yaml = config(&slack, "").replace("  tokens:", "  watch_config: true\n  tokens:");
    let d = Daemon::start(&yaml);
    let original = std::fs::read_to_string(&d.config).unwrap();
    let extra =
        "  - name: watched\n    notify:\n      - channel: console\n        template: log/summary\n";
    std::fs::write(&d.config, format!("{original}{extra}")).unwrap();
    eventually("a reload on file change", WAIT, || {
        d.logs()
            .contains("\"trigger\":\"file change\"")
            .then_some(())
    })
    .await;
    let (_, body) = d.post(&with_sid(FIXTURE, "CAw1")).await;
    assert_eq!(body["rules"], serde_json::json!(["every_call", "watched"]));

    // A setting read only at start is named, not silently ignored; put back as the daemon
    // started with it, it is not named again.
    let warning = "server.header_read_timeout differs from what the daemon started with";
    let edited = format!("{original}{extra}")
        .replace("  tokens:", "  header_read_timeout: \"3s\"\n  tokens:");
    std::fs::write(&d.config, edited).unwrap();
    eventually("a warning about the restart-only setting", WAIT, || {
        d.logs().contains(warning).then_some(())
    })
    .await;
    std::fs::write(&d.config, original).unwrap();
    eventually("a third reload", WAIT, || {
        (d.logs().matches("config reloaded").count() == 3).then_some(())
    })
    .await;
    assert_eq!(d.logs().matches(warning).count(), 1, "{}", d.logs());
}

/// Links back to a parent inside `templates_dir` (the renderer does not follow them) do not send
/// the watch for edits around in circles: the daemon starts, and reloads on an edit.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_to_a_parent_in_the_templates_dir_do_not_hang_the_daemon() {
    let tpl = tempfile::tempdir().unwrap();
    for (path, text) in [("slack/s.hbs", "{{sid}}"), ("log/s.hbs", "{{sid}}")] {
        let p = tpl.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    std::os::unix::fs::symlink("..", tpl.path().join("slack/all")).unwrap();
    std::os::unix::fs::symlink("..", tpl.path().join("log/all")).unwrap();
    let slack = FakeSlack::start().await;
    let yaml = config(&slack, "")
        .replace("{templates}", &tpl.path().display().to_string())
        .replace("slack/summary", "slack/s")
        .replace("  tokens:", "  watch_config: true\n  tokens:");
    let d = Daemon::start(&yaml);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAlink")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    std::fs::write(tpl.path().join("slack/s.hbs"), "edited {{sid}}").unwrap();
    eventually("a reload on the template edit", WAIT, || {
        d.logs()
            .contains("\"trigger\":\"file change\"")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_admin_listener_serves_the_admin_endpoints_only() {
    let slack = FakeSlack::start().await;
    let yaml = config(&slack, "").replace("store:", "admin:\n  listen: \"127.0.0.1:0\"\nstore:");
    let d = Daemon::start(&yaml);
    let admin: String = d
        .logs()
        .lines()
        .find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            Some(v["admin"].as_str()?.to_string())
        })
        .expect("the admin address is logged");
    let admin = format!("http://{admin}");
    assert_eq!(get(&format!("{admin}/metrics")).await.0, 200);
    assert_eq!(get(&format!("{admin}/readyz")).await.0, 200);
    assert_eq!(
        http()
            .post(format!("{admin}/-/reload"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        post(&format!("{admin}/webhooks/air"), FIXTURE, Some(TOKEN))
            .await
            .0,
        404
    );
    // The public listener takes calls and nothing else: no reloads, and neither metrics (rule
    // and channel names, call volumes) nor probes (a readiness check writes to the store).
    assert_eq!(
        http()
            .post(d.url("/-/reload"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    for path in ["/metrics", "/readyz", "/healthz"] {
        assert_eq!(
            get(&d.url(path)).await.0,
            404,
            "{path} on the public listener"
        );
    }
    assert_eq!(d.post(FIXTURE).await.0, 200);
}

/// A word that is not a level (`warning`, a typo) made the filter read it as a target name
/// and let nothing else through: the daemon ran with no logs at all, its errors and dead
/// letters included. It is refused before anything runs, naming where it came from.
#[test]
fn a_log_level_that_is_not_one_is_refused_instead_of_silencing_the_logs() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let run = |level: &str, rust_log: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"));
        cmd.current_dir(dir)
            .args([
                "render",
                "tests/fixtures/post_call_data.json",
                "--log-level",
                level,
            ])
            .env_remove("RUST_LOG")
            .env_remove("CALLNOTIFY_LOG_LEVEL");
        if let Some(v) = rust_log {
            cmd.env("RUST_LOG", v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for bad in ["warning", "debg", "info,callnotify", "callnotify=warning"] {
        let (code, err) = run(bad, None);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(
            err.contains("--log-level") && err.contains("use error, warn, info"),
            "{bad}: {err}"
        );
    }
    let (code, err) = run("info", Some("warnn"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("RUST_LOG: `warnn` is not a log level"),
        "{err}"
    );
    for good in [
        "warn",
        "WARN",
        "debug",
        "callnotify=debug,warn",
        "info,hyper=off",
        "",
    ] {
        let (code, err) = run(good, None);
        assert_eq!(code, Some(0), "{good:?}: {err}");
    }
    assert_eq!(run("info", Some("callnotify=debug")).0, Some(0));
}

#[test]
fn help_teaches_with_examples() {
    let run = |args: &[&str]| {
        String::from_utf8_lossy(
            &std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
                .args(args)
                .output()
                .unwrap()
                .stdout,
        )
        .to_string()
    };
    let top = run(&["--help"]);
    for cmd in [
        "serve",
        "check",
        "render",
        "deliveries",
        "send-test",
        "Examples:",
    ] {
        assert!(top.contains(cmd), "{cmd} missing from --help:\n{top}");
    }
    for sub in [
        &["render", "--help"][..],
        &["send-test", "--help"],
        &["deliveries", "retry", "--help"],
        &["deliveries", "--help"],
        &["serve", "--help"],
        &["check", "--help"],
    ] {
        assert!(run(sub).contains("Example"), "{sub:?}");
    }
}

/// Under systemd (`Type=notify`, `NOTIFY_SOCKET` set) the daemon says `READY=1` once it takes
/// calls, `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around every reload, taken or
/// refused, and `STOPPING=1` when asked to stop.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_daemon_says_when_it_is_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let next = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a message to systemd");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start_with_env(
        &config(&slack, ""),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let ready = next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=listening on {}", d.addr)),
        "{ready}"
    );
    // Ready means ready: a call is taken at once.
    assert_eq!(d.post(&with_sid(FIXTURE, "CAsd1")).await.0, 200);

    for (i, broken) in [false, true].into_iter().enumerate() {
        if broken {
            std::fs::write(&d.config, "rules: [").unwrap();
        }
        d.signal("HUP");
        let reloading = next();
        let lines: Vec<&str> = reloading.lines().collect();
        assert!(lines.contains(&"RELOADING=1"), "reload {i}: {reloading}");
        let usec = lines
            .iter()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("reload {i}: no MONOTONIC_USEC in {reloading}"));
        assert!(usec.parse::<u64>().unwrap() > 0, "{reloading}");
        let after = next();
        assert!(after.lines().any(|l| l == "READY=1"), "reload {i}: {after}");
    }
    // The log is written by its own thread: the line may come just after READY=1.
    eventually("the refused reload's log line", WAIT, || {
        d.logs().contains("reload refused").then_some(())
    })
    .await;

    let pid = d.pid();
    let stopped = std::thread::spawn(move || {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    });
    let stopping = next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    stopped.join().unwrap();
    assert_eq!(d.terminate(), Some(0));
}

/// In JSON logs the rules a call matched are a JSON list, so a log query on one rule is an
/// exact match on an element, not a substring of a string (`rules` was `"[\"a\", \"b\"]"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_accepted_line_lists_its_rules_as_a_json_list() {
    let slack = FakeSlack::start().await;
    let extra =
        "  - name: logged\n    notify:\n      - channel: console\n        template: log/summary\n";
    let d = Daemon::start(&config(&slack, extra));
    assert_eq!(d.post(&with_sid(FIXTURE, "CArules")).await.0, 200);
    let line = eventually("the call accepted line", WAIT, || {
        d.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "call accepted" && v["sid"] == "CArules")
    })
    .await;
    assert_eq!(
        line["rules"],
        serde_json::json!(["every_call", "logged"]),
        "{line}"
    );
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["deliveries"], 2, "{line}");
}

/// Replaying dead deliveries from hours ago is new work, not a stuck queue: the oldest pending
/// age counts from the replay (the start of the delivery's new retry window), so a replay does
/// not set off the README's `oldest_pending_age_seconds > 600` alert. It used to count from
/// when the delivery was first created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_old_dead_deliveries_does_not_look_like_a_stuck_queue() {
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(404, "no_service"));
    let yaml = config(&slack, "").replace(
        "channels:",
        "delivery: { retry_schedule: [\"1h\"], request_timeout: \"1s\" }\nchannels:",
    );
    let d = Daemon::start(&yaml);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAold")).await.0, 200);
    eventually("the delivery dead", WAIT, || {
        (d.deliveries(Some("dead")).len() == 1).then_some(())
    })
    .await;
    // As if it had died three hours ago, in an outage nobody noticed until now.
    let three_hours = 3 * 3600 * 1000;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], timeout=10)\nms = int(sys.argv[2])\n\
             c.execute('UPDATE deliveries SET created_at = created_at - ?, window_start = window_start - ?, updated_at = updated_at - ?', (ms, ms, ms))\n\
             c.execute('UPDATE calls SET received_at = received_at - ?', (ms,))\nc.commit()\n",
        ])
        .arg(d.dir.join("store.db"))
        .arg(three_hours.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Slack is still down after the replay: the delivery waits for its next attempt.
    slack.set_default(Reply::status(503, "down"));
    let out = d.cli(&["deliveries", "retry", "--all-dead"]);
    assert!(out.status.success(), "{out:?}");
    let text = eventually("the replayed delivery tried and waiting", WAIT, || {
        let t = scrape(&d)?;
        (slack.received().len() == 2
            && metric(&t, r#"callnotify_queue_depth{state="pending"}"#) == 1.0
            && metric(&t, r#"callnotify_queue_depth{state="dead"}"#) == 0.0)
            .then_some(t)
    })
    .await;
    let age = metric(&text, "callnotify_oldest_pending_age_seconds");
    assert!(
        age < 600.0,
        "oldest pending age {age}s right after a replay"
    );
}

/// Every metric says what it is (`# HELP`, which Grafana and Prometheus show beside the series),
/// and its name follows Prometheus' conventions: counters end in `_total`, other names with a
/// unit end in it (`_seconds`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_has_help_and_a_conventional_name() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAhelp")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    let text = eventually("every metric there", WAIT, || {
        let t = scrape(&d)?;
        (t.contains("# TYPE callnotify_delivery_latency_seconds histogram")
            && t.contains("# TYPE callnotify_oldest_pending_age_seconds gauge"))
        .then_some(t)
    })
    .await;
    let types: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split(' ');
            Some((w.next()?, w.next()?))
        })
        .collect();
    assert!(types.len() >= 12, "{text}");
    for (name, kind) in types {
        let help = format!("# HELP {name} ");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&help) && l.len() > help.len() + 10),
            "no help for {name}:\n{text}"
        );
        assert!(name.starts_with("callnotify_"), "{name}");
        assert_eq!(kind == "counter", name.ends_with("_total"), "{name} {kind}");
        if name.contains("latency") || name.contains("age") || name.contains("timestamp") {
            assert!(name.ends_with("_seconds"), "{name}");
        }
    }
}

/// A rejected webhook and a refused reload each log one fixed message with the why in a field,
/// so a log query or alert on the message finds every one of them (the why used to be part of
/// the message: each reason was a different message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_and_refused_reloads_have_one_message_and_the_why_in_a_field() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let (status, _) = d.post("not json").await;
    assert_eq!(status, 400);
    let original = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        original.replace("template: slack/summary", "template: slack/nope"),
    )
    .unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let find = |message: &str| {
        d.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == message)
    };
    let rejected = eventually("a `webhook rejected` line", WAIT, || {
        find("webhook rejected")
    })
    .await;
    assert_eq!(rejected["level"], "WARN", "{rejected}");
    assert_eq!(rejected["status"], 400, "{rejected}");
    assert_eq!(rejected["kind"], "bad_request", "{rejected}");
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{rejected}"
    );
    assert!(
        rejected["from"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{rejected}"
    );
    let refused = eventually("a `reload refused` line", WAIT, || {
        find("reload refused, keeping the running config")
    })
    .await;
    assert_eq!(refused["level"], "ERROR", "{refused}");
    assert_eq!(refused["trigger"], "HTTP", "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("slack/nope"),
        "{refused}"
    );
}

/// A retry's log line says when the next attempt is, as a time (`next_attempt_at`, the one the
/// store holds), beside how long that is from now (`retry_in`), and why (`error`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_logged_with_when_and_why() {
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(503, "down"));
    let yaml = config(&slack, "").replace(
        "channels:",
        "delivery: { retry_schedule: [\"1h\"], request_timeout: \"1s\" }\nchannels:",
    );
    let d = Daemon::start(&yaml);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAwhen")).await.0, 200);
    let line = eventually("a retry line", WAIT, || {
        d.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "delivery failed; will retry")
    })
    .await;
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["span"]["sid"], "CAwhen", "{line}");
    assert!(
        line["error"].as_str().unwrap().contains("HTTP 503"),
        "{line}"
    );
    let at = chrono::DateTime::parse_from_rfc3339(line["next_attempt_at"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {line}"));
    let pending = d.deliveries(Some("pending"));
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        Some(at.timestamp_millis()),
        pending[0]["next_attempt_at"].as_i64(),
        "{line}"
    );
}

/// How slow a destination answers is its own histogram, per channel and whatever the outcome:
/// the receipt-to-delivery latency mixes it with pacing and retry waits, and a destination that
/// only ever fails never shows in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn how_long_each_send_takes_is_measured_per_channel() {
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(503, "down").delayed(Duration::from_millis(300))]);
    let yaml = config(&slack, "").replace(
        "channels:",
        "delivery: { retry_schedule: [\"1s\"], request_timeout: \"5s\" }\nchannels:",
    );
    let d = Daemon::start(&yaml);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAslow")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    let text = eventually("two sends measured", WAIT, || {
        let t = scrape(&d)?;
        (metric(
            &t,
            r#"callnotify_send_duration_seconds_count{channel="sales"}"#,
        ) == 2.0)
            .then_some(t)
    })
    .await;
    // The failed send took at least its 300 ms delay; the second was not delayed.
    let le = |bound: &str| {
        metric(
            &text,
            &format!(r#"callnotify_send_duration_seconds_bucket{{channel="sales",le="{bound}"}}"#),
        )
    };
    assert!(le("0.25") <= 1.0, "{text}");
    assert_eq!(le("+Inf"), 2.0, "{text}");
    assert!(
        metric(
            &text,
            r#"callnotify_send_duration_seconds_sum{channel="sales"}"#
        ) >= 0.3,
        "{text}"
    );
}

/// Each configured channel's delivery series are there from the start, and for a channel a
/// reload adds, at 0, so an alert on `increase(...{outcome="dead"}[1h])` sees its first dead
/// delivery; a reload leaves the counts already made as they were (counters only go up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_series_exist_per_channel_from_the_start_and_survive_a_reload() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let (_, text) = get(&d.url("/metrics")).await;
    for line in [
        r#"callnotify_deliveries_total{channel="sales",outcome="dead"} 0"#,
        r#"callnotify_deliveries_total{channel="console",outcome="retried"} 0"#,
        r#"callnotify_delivery_attempts_total{channel="console"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    assert_eq!(d.post(&with_sid(FIXTURE, "CAseries")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    eventually("the delivery counted", WAIT, || {
        let t = scrape(&d)?;
        (metric(
            &t,
            r#"callnotify_deliveries_total{channel="sales",outcome="done"}"#,
        ) == 1.0)
            .then_some(())
    })
    .await;

    let yaml = std::fs::read_to_string(&d.config).unwrap().replace(
        "  console: { type: log }",
        "  console: { type: log }\n  later: { type: log }",
    );
    std::fs::write(&d.config, yaml).unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, text) = get(&d.url("/metrics")).await;
    for line in [
        r#"callnotify_deliveries_total{channel="later",outcome="dead"} 0"#,
        r#"callnotify_deliveries_total{channel="sales",outcome="done"} 1"#,
        r#"callnotify_calls_received_total{result="accepted"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
}

/// While the store is away, each channel logs that it cannot claim deliveries once, not once a
/// second for as long as it lasts, and says so when claims work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_logged_once_per_channel_and_its_end_too() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let lines = |message: &str| -> Vec<Value> {
        d.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    };
    let path = d.dir.join("store.db");
    let away = d.dir.join("moved-away.db");
    std::fs::rename(&path, &away).unwrap();
    // Two looks of the 5 s housekeeping tick: each lane has tried to claim (once a second)
    // several times meanwhile.
    eventually("two housekeeping ticks", WAIT, || {
        (lines("cannot check for deliveries of removed channels").len() >= 2).then_some(())
    })
    .await;
    std::fs::rename(&away, &path).unwrap();
    let back = eventually("both lanes claiming again", WAIT, || {
        let back = lines("claiming deliveries again: the store is back");
        (back.len() == 2).then_some(back)
    })
    .await;
    assert!(
        back.iter().all(|v| v["failures"].as_u64() > Some(1)),
        "{back:?}"
    );
    let failed = lines("cannot claim deliveries; trying again every second");
    let mut channels: Vec<&str> = failed
        .iter()
        .map(|v| v["channel"].as_str().unwrap())
        .collect();
    channels.sort();
    assert_eq!(channels, ["console", "sales"], "{}", d.logs());
    assert_eq!(failed[0]["level"], "ERROR");
    // Deliveries go on.
    assert_eq!(d.post(&with_sid(FIXTURE, "CAafter")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
}

/// Anyone who can reach the webhook can send bad requests: a flood of them is counted in full
/// but logs at most 30 lines a minute, so it cannot fill the disk or bury the lines that matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_webhooks_is_counted_in_full_but_logged_within_a_budget() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    for _ in 0..40 {
        let (status, _) = post(&d.url("/webhooks/air"), FIXTURE, Some("wrong")).await;
        assert_eq!(status, 401);
    }
    for _ in 0..5 {
        assert_eq!(d.post("not json").await.0, 400);
    }
    // Lines are written in order: once this call's line is there, every refusal's is too.
    assert_eq!(d.post(&with_sid(FIXTURE, "CAafterflood")).await.0, 200);
    eventually("the call accepted line", WAIT, || {
        d.logs()
            .contains(r#""message":"call accepted","sid":"CAafterflood""#)
            .then_some(())
    })
    .await;
    let logs = d.logs();
    let logged = logs
        .lines()
        .filter(|l| l.contains("webhook refused") || l.contains("webhook rejected"))
        .count();
    assert_eq!(logged, 30, "{logs}");
    let (_, text) = get(&d.url("/metrics")).await;
    assert_eq!(
        metric(
            &text,
            r#"callnotify_calls_received_total{result="unauthorized"}"#
        ),
        40.0
    );
    assert_eq!(
        metric(
            &text,
            r#"callnotify_calls_received_total{result="rejected"}"#
        ),
        5.0
    );
}

/// A dead delivery's line says why (`error`) and carries the command that replays it in a field
/// of its own (`replay`), not only inside the message, so a runbook or bot can take it as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_delivery_is_logged_with_why_and_the_replay_command_in_fields() {
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(404, "no_service"));
    let d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAdead")).await.0, 200);
    let line = eventually("a dead line", WAIT, || {
        d.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["outcome"] == "dead")
    })
    .await;
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(
        line["error"].as_str().unwrap().contains("no_service"),
        "{line}"
    );
    let id = d.deliveries(Some("dead"))[0]["id"].as_i64().unwrap();
    assert_eq!(
        line["replay"],
        format!(
            "callnotify deliveries retry --config {} {id}",
            d.config.display()
        ),
        "{line}"
    );
}

/// `/metrics` says it is Prometheus' text format in UTF-8 (a rule named in another language is a
/// label value), and HEAD answers like GET without the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_utf8_prometheus_text_to_get_and_head() {
    let slack = FakeSlack::start().await;
    let extra =
        "  - name: réservé\n    notify:\n      - channel: console\n        template: log/summary\n";
    let d = Daemon::start(&config(&slack, extra));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAutf8")).await.0, 200);
    let r = http().get(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert!(
        text.contains(r#"callnotify_rules_matched_total{rule="réservé"} 1"#),
        "{text}"
    );
    let r = http().head(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(r.bytes().await.unwrap().is_empty());
}

/// A log channel whose file cannot be opened for appending is found by `check` and refused by a
/// reload, naming the path and the OS's reason, instead of at the first delivery; a file that
/// can be written passes, and checking it leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_that_cannot_be_written_is_found_by_check_and_refused_by_reload() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    let original = std::fs::read_to_string(&d.config).unwrap();
    let check = || {
        let out = d.cli(&["check"]);
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    // A directory that does not exist yet is created by the lane: that is fine, and `check`
    // does not leave it (or the file) behind.
    let later = d.dir.join("later/logs/n.jsonl");
    let fine = original.replace(
        "console: { type: log }",
        &format!("console: {{ type: log, file: \"{}\" }}", later.display()),
    );
    std::fs::write(&d.config, &fine).unwrap();
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(!d.dir.join("later").exists(), "check left a trace");

    // A regular file where the directory should be: no user (root included) can write there.
    std::fs::write(d.dir.join("not-a-dir"), "").unwrap();
    let blocked = d.dir.join("not-a-dir/n.jsonl");
    let bad = original.replace(
        "console: { type: log }",
        &format!("console: {{ type: log, file: \"{}\" }}", blocked.display()),
    );
    std::fs::write(&d.config, &bad).unwrap();
    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    let expected = format!(
        "channels.console.file: cannot open {} for appending: Not a directory",
        blocked.display()
    );
    assert!(out.contains(&expected), "{out}");

    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains(&expected), "{v}");
}

/// With `watch_config`, an edit that `POST /-/reload` (or SIGHUP) already applied is not loaded
/// a second time when the watch sees it; the next edit still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_config_an_edit_applied_by_post_reload_is_not_reloaded_again() {
    let slack = FakeSlack::start().await;
    let yaml = config(&slack, "").replace("  tokens:", "  watch_config: true\n  tokens:");
    let d = Daemon::start(&yaml);
    let original = std::fs::read_to_string(&d.config).unwrap();
    let rule = |name: &str| {
        format!("  - name: {name}\n    notify:\n      - channel: console\n        template: log/summary\n")
    };
    std::fs::write(&d.config, format!("{original}{}", rule("by_hand"))).unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The watch looks every 5 s and reloads on the second look that sees the same files: two
    // looks and a margin is when it reloaded the same files again.
    tokio::time::sleep(Duration::from_secs(12)).await;
    // A later edit is still watched; once it is loaded, the watch has seen the first one too.
    std::fs::write(
        &d.config,
        format!("{original}{}{}", rule("by_hand"), rule("watched")),
    )
    .unwrap();
    eventually("a reload on file change", WAIT, || {
        d.logs()
            .contains("\"trigger\":\"file change\"")
            .then_some(())
    })
    .await;
    let (_, body) = d.post(&with_sid(FIXTURE, "CAwatch")).await;
    assert_eq!(
        body["rules"],
        serde_json::json!(["every_call", "by_hand", "watched"])
    );
    let logs = d.logs();
    assert_eq!(logs.matches("config reloaded").count(), 2, "{logs}");
    assert_eq!(
        logs.matches("\"trigger\":\"file change\"").count(),
        1,
        "{logs}"
    );
}

/// A templates dir of the test's own (`slack/s`, `log/summary`, which a test may rename), a
/// Slack stand-in that answers 500, and a config whose rule sends to it with `slack/s`: its
/// deliveries wait, pending.
async fn templates_of_its_own_and_slack_down() -> (tempfile::TempDir, FakeSlack, String) {
    let tpl = tempfile::tempdir().unwrap();
    for (path, text) in [("slack/s.hbs", "{{sid}}"), ("log/summary.hbs", "{{sid}}")] {
        let p = tpl.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(500, "internal_error"));
    let yaml = config(&slack, "")
        .replace("{templates}", &tpl.path().display().to_string())
        .replace("slack/summary", "slack/s");
    (tpl, slack, yaml)
}

/// A reload that renames the template pending deliveries use is accepted (new calls use the new
/// name), and says how many deliveries it strands, why, and how to get them sent: in its log
/// line and in the `POST /-/reload` answer. Put back, they are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_strands_pending_deliveries_says_how_many_and_how_to_replay_them() {
    let (tpl, slack, yaml) = templates_of_its_own_and_slack_down().await;
    let d = Daemon::start(&yaml);
    for sid in ["CAst1", "CAst2"] {
        assert_eq!(d.post(&with_sid(FIXTURE, sid)).await.0, 200);
    }
    eventually("two failed first attempts", WAIT, || {
        let rows = d.deliveries(Some("pending"));
        (rows.len() == 2 && rows.iter().all(|r| r["attempts"] == 1)).then_some(())
    })
    .await;

    // Renamed: the file and the rule together.
    let original = std::fs::read_to_string(&d.config).unwrap();
    std::fs::rename(
        tpl.path().join("slack/s.hbs"),
        tpl.path().join("slack/t.hbs"),
    )
    .unwrap();
    std::fs::write(&d.config, original.replace("slack/s", "slack/t")).unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "reloaded", "{v}");
    let stranded = v["stranded"].as_array().unwrap();
    assert_eq!(stranded.len(), 1, "{v}");
    assert_eq!(stranded[0]["channel"], "sales", "{v}");
    assert_eq!(stranded[0]["template"], "slack/s", "{v}");
    assert_eq!(stranded[0]["deliveries"], 2, "{v}");
    assert!(
        stranded[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no template"),
        "{v}"
    );
    let message = v["message"].as_str().unwrap();
    assert!(message.starts_with("2 unfinished deliveries"), "{v}");
    assert!(message.contains("deliveries retry --all-dead"), "{v}");
    // Logs are written by a background thread: the line may follow the answer.
    eventually("the stranded deliveries' warning", WAIT, || {
        d.logs()
            .contains("unfinished deliveries the new config cannot send")
            .then_some(())
    })
    .await;

    // Put back beside the new name: nothing is stranded, and the waiting deliveries are sent.
    std::fs::write(tpl.path().join("slack/s.hbs"), "{{sid}}").unwrap();
    let r = http().post(d.url("/-/reload")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["stranded"], serde_json::json!([]), "{v}");
    slack.set_default(Reply::ok());
    let out = d.cli(&["deliveries", "retry", "--all-pending"]);
    assert!(out.status.success(), "{out:?}");
    let sent = slack.wait_accepted(2, WAIT).await;
    assert_eq!(sent.len(), 2);
    assert!(d.deliveries(Some("dead")).is_empty());
}

/// The same when the template was renamed while the daemon was stopped: the start says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_config_strands_pending_deliveries_says_so() {
    let (tpl, _slack, yaml) = templates_of_its_own_and_slack_down().await;
    let mut d = Daemon::start(&yaml);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAstart")).await.0, 200);
    eventually("a failed first attempt", WAIT, || {
        let rows = d.deliveries(Some("pending"));
        (rows.len() == 1 && rows[0]["attempts"] == 1).then_some(())
    })
    .await;
    assert_eq!(d.terminate(), Some(0));
    let original = std::fs::read_to_string(&d.config).unwrap();
    std::fs::rename(
        tpl.path().join("slack/s.hbs"),
        tpl.path().join("slack/t.hbs"),
    )
    .unwrap();
    std::fs::write(&d.config, original.replace("slack/s", "slack/t")).unwrap();
    d.spawn();
    let logs = d.logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("unfinished deliveries this config cannot send"))
        .unwrap_or_else(|| panic!("no warning in {logs}"));
    assert!(warning.contains("\"template\":\"slack/s\""), "{warning}");
    assert!(warning.contains("\"deliveries\":1"), "{warning}");
    assert!(warning.contains("deliveries retry --all-dead"), "{warning}");
}

/// Overwrites the first page of the `calls` table's (sid, event) index with garbage, in a store
/// whose daemon is stopped: every new call then fails to commit ("database disk image is
/// malformed"), while writes to other tables (`meta`, where readiness used to write) still work.
fn corrupt_the_call_index(store: &std::path::Path) {
    use std::io::{Seek, SeekFrom, Write};
    let (page_size, root): (i64, i64) = {
        let conn = rusqlite::Connection::open(store).unwrap();
        let size = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        let root = conn
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_calls_1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (size, root)
    };
    let mut f = std::fs::OpenOptions::new().write(true).open(store).unwrap();
    f.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
        .unwrap();
    f.write_all(&vec![0xab; page_size as usize]).unwrap();
    f.sync_all().unwrap();
}

/// A store damaged where calls are written answered 503 to every webhook while `/readyz` said
/// ready (its probe wrote to a table that still worked): a load balancer kept sending calls to a
/// daemon that refused them all. Readiness now tries the webhook's own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_take_calls_is_not_ready() {
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAbeforedamage")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    corrupt_the_call_index(&d.dir.join("store.db"));
    tokio::task::block_in_place(|| d.spawn());

    let (status, body) = d.post(&with_sid(FIXTURE, "CAafterdamage")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    let (status, body) = get(&d.url("/readyz")).await;
    assert_eq!(status, 503, "ready while every call is refused: {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("malformed"),
        "{body}"
    );
    // Asked again (a good answer is reused for a second; a bad one never is): still not ready.
    assert_eq!(get(&d.url("/readyz")).await.0, 503);
}

/// `chattr +i` on a file while alive (even root cannot write it then); undone on drop. None
/// where the file system or the user cannot set it: the test that needs it says so and passes.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Option<Immutable> {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Immutable(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A small tmpfs, unmounted on drop; None where mounting is not allowed.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    fn read_only(&self) {
        let ok = std::process::Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.0.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// A store that cannot be written was reported as "attempt to write a readonly database" (or
/// "unable to open database file"), twice over and without a path: the operator was not told
/// which file to fix. Each message now names what is read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_store_is_reported_with_the_file_that_is_read_only() {
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAreadonly")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    let store = d.dir.join("store.db");
    let store_name = store.display().to_string();

    // The store file itself cannot be written (as when it belongs to another user).
    match Immutable::set(&store) {
        None => println!("skipped: cannot make a file immutable here"),
        Some(_undo) => {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
                .args(["serve", "--config"])
                .arg(&d.config)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(
                err.contains(&format!("{store_name} cannot be written")),
                "{err}"
            );
            assert_eq!(err.matches("readonly database").count(), 0, "{err}");
            let out = d.cli(&["deliveries", "retry", "--all-dead"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(
                err.contains(&format!("{store_name} cannot be written")),
                "{err}"
            );
        }
    }

    // The store on a file system mounted read-only.
    let Some(disk) = Tmpfs::mount() else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let copy = disk.0.path().join("store.db");
    std::fs::copy(&store, &copy).unwrap();
    disk.read_only();
    let copy_name = copy.display().to_string();
    for args in [
        &["deliveries", "list"][..],
        &["deliveries", "retry", "--all-dead"],
    ] {
        let out = d
            .command_with_env(args, &[("CALLNOTIFY_STORE__PATH", &copy_name)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!("{copy_name} is on a read-only file system")),
            "{args:?}: {err}"
        );
    }
}

/// A daemon whose Slack stand-in answers 500 once, then 200, with a retry after 1 s, and `sid`
/// posted to it: delivered on its second attempt. The stand-in, the daemon and its settled rows.
async fn delivered_on_the_second_attempt(sid: &str) -> (FakeSlack, Daemon, Vec<Value>) {
    let slack = FakeSlack::start().await;
    slack.script([Reply::status(500, "briefly down")]);
    let yaml = format!(
        "{}delivery: {{ retry_schedule: [\"1s\"] }}\n",
        config(&slack, "")
    );
    let d = Daemon::start(&yaml);
    assert_eq!(d.post(&with_sid(FIXTURE, sid)).await.0, 200);
    let rows = d.wait_settled(WAIT).await;
    (slack, d, rows)
}

/// `deliveries list` showed a delivered message with the error of an attempt before it, under
/// "last error", as if it had failed. That error is now labelled as an earlier attempt's; the
/// error of a delivery still waiting or dead is shown as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_row_labels_the_error_of_an_earlier_attempt() {
    let (_slack, d, rows) = delivered_on_the_second_attempt("CAretried").await;
    assert_eq!(rows[0]["status"], "done", "{rows:?}");
    assert_eq!(rows[0]["attempts"], 2, "{rows:?}");
    let out = d.cli(&["deliveries", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let line = table
        .lines()
        .find(|l| l.contains("CAretried"))
        .unwrap_or_else(|| panic!("{table}"));
    let error = rows[0]["last_error"].as_str().unwrap();
    assert!(error.contains("500"), "{rows:?}");
    assert!(
        line.ends_with(&format!("  earlier attempt: {error}")),
        "{table}"
    );
}

/// The `id` column of `deliveries list` was six wide: past 999,999 deliveries an id pushed the
/// rest of its row to the right. Columns are now as wide as what they hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_list_columns_line_up_with_large_ids_and_long_names() {
    let slack = FakeSlack::start().await;
    let long_rule = "  - name: a_rule_with_a_name_longer_than_eighteen\n    notify: [{ channel: console, template: log/summary }]\n";
    let d = Daemon::start(&config(&slack, long_rule));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAwide")).await.0, 200);
    d.wait_settled(WAIT).await;
    // As a store that has taken ten million deliveries numbers them.
    rusqlite::Connection::open(d.dir.join("store.db"))
        .unwrap()
        .execute_batch(
            "PRAGMA foreign_keys = OFF;
             UPDATE attempts SET delivery_id = 12345678
                 WHERE delivery_id = (SELECT id FROM deliveries WHERE rule = 'every_call');
             UPDATE deliveries SET id = 12345678 WHERE rule = 'every_call';",
        )
        .unwrap();
    let out = d.cli(&["deliveries", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let col = |line: &str, word: &str| line.find(word).unwrap_or_else(|| panic!("{table}"));
    for row in &lines[1..] {
        assert_eq!(col(row, "done"), col(lines[0], "status"), "{table}");
        assert_eq!(col(row, "CAwide"), col(lines[0], "sid"), "{table}");
        assert_eq!(
            col(row, " 1  "),
            col(lines[0], "attempts") + "attempts".len() - 2,
            "{table}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("12345678  done")),
        "{table}"
    );
}

/// A daemon started on a full disk exited ("disk I/O error", no path), and systemd restarted it
/// in a loop until it gave up: once space was freed, someone had to start it by hand. It now
/// starts, says which disk is full, answers 503 (with Retry-After) and is not ready until the
/// store opens, then takes calls without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_on_a_full_disk_waits_for_room_instead_of_exiting() {
    let Some(disk) = Tmpfs::mount() else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let filler = fill(&disk);
    let slack = FakeSlack::start().await;
    let (d, store) = start_with_store_on(&disk, &config(&slack, ""));
    let full = format!("the disk holding {} is full", store.display());
    assert!(d.logs().contains(&full), "{}", d.logs());

    let r = http()
        .post(d.url("/webhooks/air"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(with_sid(FIXTURE, "CAfullatstart"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "store_unavailable", "{body}");
    let (status, ready) = get(&d.url("/readyz")).await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains(&full), "{ready}");
    assert_eq!(get(&d.url("/healthz")).await.0, 200);

    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = d.post(&with_sid(FIXTURE, "CAfullatstart")).await;
        if status == 200 {
            assert_eq!(body["status"], "accepted", "{body}");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(std::time::Instant::now() < deadline, "never took calls");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slack.wait_accepted(1, WAIT).await;
    assert_eq!(get(&d.url("/readyz")).await.0, 200);
    drop(d);
}

/// `deliveries list` stops at `--limit` (100 by default), newest first, and said nothing about
/// the rest: during an outage with 5,000 deliveries waiting, 100 rows passed for the backlog.
/// When there are more it now says so (on stderr, so `--json` output stays JSON lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_list_says_when_rows_were_left_out_by_the_limit() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    for i in 0..3 {
        assert_eq!(
            d.post(&with_sid(FIXTURE, &format!("CAmore{i}"))).await.0,
            200
        );
    }
    d.wait_settled(WAIT).await;
    let list = |limit: &str, json: bool| {
        let mut args = vec!["deliveries", "list", "--limit", limit];
        if json {
            args.push("--json");
        }
        let out = d.cli(&args);
        assert!(out.status.success());
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (table, note) = list("2", false);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        note.contains("only the newest 2 are shown; there are more"),
        "{note}"
    );
    let (lines, note) = list("2", true);
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(note.contains("there are more"), "{note}");
    // Exactly as many as the limit: nothing was left out.
    let (table, note) = list("3", false);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert_eq!(note, "");
}

/// `deliveries list --sid` for a call that owes nothing printed "(no deliveries)", which does
/// not answer the on-call question "did the call reach us at all?". It now says which: received
/// and matched no rule (with when), or not in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_list_for_a_call_without_deliveries_says_whether_it_was_received() {
    let yaml = format!(
        r#"
server: {{ listen: "127.0.0.1:0", tokens: ["{TOKEN}"] }}
store: {{ path: "{{dir}}/store.db" }}
templates_dir: "{{templates}}"
channels:
  console: {{ type: log }}
rules:
  - name: very_long_calls
    when: {{ duration: {{ gte: 100000 }} }}
    notify: [{{ channel: console, template: log/summary }}]
"#
    );
    let d = Daemon::start(&yaml);
    let (status, body) = d.post(&with_sid(FIXTURE, "CAnomatch")).await;
    assert_eq!(
        (status, body["notifications"].as_u64()),
        (200, Some(0)),
        "{body}"
    );
    let list = |sid: &str| {
        let out = d.cli(&["deliveries", "list", "--sid", sid]);
        assert!(out.status.success());
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (table, why) = list("CAnomatch");
    assert!(table.contains("(no deliveries)"), "{table}");
    assert!(
        why.contains("call CAnomatch was received (POST_CALL_DATA at ")
            && why.contains("matched no rule"),
        "{why}"
    );
    let (_, why) = list("CAnever");
    assert!(why.contains("no call CAnever in the store"), "{why}");
}

/// After `deliveries retry`, a dead delivery is pending again with no attempts, and the table
/// showed the error it died of as its "last error", as if the replay had already failed. A
/// row not tried since its replay now labels that error as from before the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_row_labels_the_error_it_died_of() {
    let slack = FakeSlack::start().await;
    slack.set_default(Reply::status(404, "no_service"));
    let mut d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAreplayed")).await.0, 200);
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows[0]["status"], "dead", "{rows:?}");
    let error = rows[0]["last_error"].as_str().unwrap().to_string();
    // Replayed while the daemon is stopped, so it stays pending, untried, for the list.
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    let out = d.cli(&["deliveries", "retry", "--all-dead"]);
    assert!(out.status.success());
    let out = d.cli(&["deliveries", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let line = table
        .lines()
        .find(|l| l.contains("CAreplayed"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains(" pending "), "{table}");
    assert!(
        line.ends_with(&format!("  before the replay: {error}")),
        "{table}"
    );
}

/// `deliveries list` shows only a delivery's last error; what each attempt met (the 500 before
/// the success, the timeouts before the dead letter) was only in the store, for `sqlite3`.
/// `deliveries show ID` prints the delivery and every attempt at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_show_prints_every_attempt() {
    let (_slack, d, rows) = delivered_on_the_second_attempt("CAshown").await;
    let id = rows[0]["id"].to_string();
    let out = d.cli(&["deliveries", "show", &id]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with(&format!("delivery {id}: done\n")),
        "{text}"
    );
    assert!(text.contains("CAshown (POST_CALL_DATA)"), "{text}");
    assert!(text.contains("every_call -> channel sales"), "{text}");
    let tries: Vec<&str> = text.lines().filter(|l| l.starts_with("  #")).collect();
    assert_eq!(tries.len(), 2, "{text}");
    assert!(
        tries[0].starts_with("  #1 ") && tries[0].contains(" retry "),
        "{text}"
    );
    assert!(tries[0].ends_with("HTTP 500: briefly down"), "{text}");
    assert!(
        tries[1].starts_with("  #2 ") && tries[1].contains(" done "),
        "{text}"
    );

    let out = d.cli(&["deliveries", "show", &id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["delivery"]["sid"], "CAshown", "{v}");
    assert_eq!(v["attempts"][0]["outcome"], "retry", "{v}");
    assert_eq!(v["attempts"][1]["outcome"], "done", "{v}");

    let out = d.cli(&["deliveries", "show", "999999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no delivery 999999"));
    let help = d.cli(&["deliveries", "show", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Example"));
}

/// `deliveries retry` of a delivery left `sending` by a daemon that was killed said "it is
/// being sent now", while nothing was sending it: it waits for the next start. The refusal now
/// says both cases, so the operator knows to start the daemon rather than wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_sending_delivery_says_a_stopped_daemon_requeues_it_at_start() {
    let slack = FakeSlack::start().await;
    let mut d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAinterrupted")).await.0, 200);
    let rows = d.wait_settled(WAIT).await;
    tokio::task::block_in_place(|| d.kill());
    // As a kill -9 during the send leaves it.
    rusqlite::Connection::open(d.dir.join("store.db"))
        .unwrap()
        .execute("UPDATE deliveries SET status = 'sending'", [])
        .unwrap();
    let id = rows[0]["id"].to_string();
    let out = d.cli(&["deliveries", "retry", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "if no daemon is running, it was interrupted and is sent again when the daemon starts"
        ),
        "{err}"
    );
}

/// Fills the tmpfs at `disk` to the last byte with one file, and returns its path (remove it to
/// Starts a daemon on `yaml` with its store (`store.db`) on `disk`; the store's path with it.
fn start_with_store_on(disk: &Tmpfs, yaml: &str) -> (Daemon, PathBuf) {
    let store = disk.0.path().join("store.db");
    let store_name = store.display().to_string();
    let d = Daemon::start_with_env(yaml, &[("CALLNOTIFY_STORE__PATH", &store_name)]);
    (d, store)
}

/// free the space).
fn fill(disk: &Tmpfs) -> PathBuf {
    use std::io::Write;
    let filler = disk.0.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    while f.write_all(&[0u8; 512]).is_ok() {}
    filler
}

/// A daemon killed with a send in flight leaves the store's log and index beside it, so the next
/// start opens the store even on a full disk; requeueing the interrupted delivery is its first
/// write, and it failed: the daemon exited ("cannot start: ... is full") instead of waiting for
/// room as it does when the store itself cannot be opened, and systemd restarted it in a loop.
/// The requeue is now part of opening: the daemon waits, then requeues and sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_full_disk_with_a_send_interrupted_waits_for_room_then_sends_it() {
    let Some(disk) = Tmpfs::mount() else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let slack = FakeSlack::start().await;
    // The first send is held: the process dies before Slack answers it.
    slack.script([Reply::ok().delayed(Duration::from_secs(30))]);
    let store = disk.0.path().join("store.db");
    let store_name = store.display().to_string();
    let yaml = format!(
        "{}delivery: {{ retry_schedule: [\"1s\"], request_timeout: \"60s\" }}\n",
        config(&slack, "")
    );
    let mut d = Daemon::start_with_env(&yaml, &[("CALLNOTIFY_STORE__PATH", &store_name)]);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAinterruptedfull")).await.0, 200);
    eventually("the send to be in flight", WAIT, || {
        (!slack.received().is_empty()).then_some(())
    })
    .await;
    tokio::task::block_in_place(|| d.kill());
    let filler = fill(&disk);

    // Exits before listening without the fix (the helper panics then).
    tokio::task::block_in_place(|| d.spawn());
    let full = format!("the disk holding {store_name} is full");
    assert!(d.logs().contains(&full), "{}", d.logs());
    let (status, ready) = get(&d.url("/readyz")).await;
    assert_eq!(status, 503, "{ready}");

    std::fs::remove_file(&filler).unwrap();
    eventually("the interrupted send made again", WAIT, || {
        (slack.received().len() == 2).then_some(())
    })
    .await;
    let rows = d.wait_settled(WAIT).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "done", "{rows:?}");
    assert!(
        d.logs().contains("the store has room again"),
        "{}",
        d.logs()
    );
    assert_eq!(get(&d.url("/readyz")).await.0, 200);
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
}

/// The last call's time as the store keeps it (`meta.last_call_at`), read with the daemon stopped.
fn stored_last_call_at(store: &std::path::Path) -> Option<String> {
    use rusqlite::OptionalExtension;
    rusqlite::Connection::open(store)
        .unwrap()
        .query_row(
            "SELECT value FROM meta WHERE key = 'last_call_at'",
            [],
            |r| r.get(0),
        )
        .optional()
        .unwrap()
}

/// A daemon started on a full disk could not read the last call's time, so it went on with 0:
/// once the store opened it wrote that 0 over the stored time at its stop (and every hour), and
/// the next start's `last_call_received_timestamp_seconds` (what a "no calls for N hours" alert
/// reads) was gone. It now reads the time once the store opens, and never writes a 0 over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_full_disk_keeps_the_last_calls_time() {
    let Some(disk) = Tmpfs::mount() else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let slack = FakeSlack::start().await;
    let (mut d, store) = start_with_store_on(&disk, &config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAbeforefull")).await.0, 200);
    slack.wait_accepted(1, WAIT).await;
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    let last: i64 = stored_last_call_at(&store).unwrap().parse().unwrap();
    assert!(last > 0);

    let filler = fill(&disk);
    tokio::task::block_in_place(|| d.spawn());
    assert!(d.logs().contains("is full"), "{}", d.logs());
    std::fs::remove_file(&filler).unwrap();
    eventually("the store open", WAIT, || {
        d.logs().contains("the store has room again").then_some(())
    })
    .await;
    eventually("the last call's time restored", WAIT, || {
        let t = scrape(&d)?;
        let at = metric(&t, "callnotify_last_call_received_timestamp_seconds");
        ((at * 1000.0).round() as i64 == last).then_some(())
    })
    .await;
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    assert_eq!(stored_last_call_at(&store), Some(last.to_string()));
}

/// A daemon waiting for room on a full disk stops on SIGTERM as any daemon does: at once, with
/// exit code 0 (systemd counts anything else as a failure), and it takes no call meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_waiting_for_room_stops_cleanly_on_sigterm() {
    let Some(disk) = Tmpfs::mount() else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let slack = FakeSlack::start().await;
    let store = disk.0.path().join("store.db");
    let store_name = store.display().to_string();
    fill(&disk);
    let mut d = Daemon::start_with_env(
        &config(&slack, ""),
        &[("CALLNOTIFY_STORE__PATH", &store_name)],
    );
    assert!(d.logs().contains("is full"), "{}", d.logs());
    assert_eq!(d.post(&with_sid(FIXTURE, "CAwhilewaiting")).await.0, 503);
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    assert!(d.logs().contains("\"stopped\""), "{}", d.logs());
    assert!(slack.received().is_empty());
}

/// A start looks for unfinished deliveries its config cannot send (a template renamed while the
/// daemon was stopped). Started on a full disk, it could not read the store then, and never
/// looked again once the store opened: the warning never came. It now comes once the store
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_full_disk_says_what_its_config_strands_once_the_store_opens() {
    let Some(disk) = Tmpfs::mount() else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let (tpl, _slack, yaml) = templates_of_its_own_and_slack_down().await;
    let store_name = disk.0.path().join("store.db").display().to_string();
    let mut d = Daemon::start_with_env(&yaml, &[("CALLNOTIFY_STORE__PATH", &store_name)]);
    assert_eq!(d.post(&with_sid(FIXTURE, "CAstrandedfull")).await.0, 200);
    eventually("a failed first attempt", WAIT, || {
        let rows = d.deliveries(Some("pending"));
        (rows.len() == 1 && rows[0]["attempts"] == 1).then_some(())
    })
    .await;
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    let original = std::fs::read_to_string(&d.config).unwrap();
    std::fs::rename(
        tpl.path().join("slack/s.hbs"),
        tpl.path().join("slack/t.hbs"),
    )
    .unwrap();
    std::fs::write(&d.config, original.replace("slack/s", "slack/t")).unwrap();
    let filler = fill(&disk);
    tokio::task::block_in_place(|| d.spawn());
    assert!(d.logs().contains("is full"), "{}", d.logs());
    std::fs::remove_file(&filler).unwrap();
    let warning = eventually("the stranded warning", WAIT, || {
        d.logs()
            .lines()
            .find(|l| l.contains("unfinished deliveries this config cannot send"))
            .map(String::from)
    })
    .await;
    assert!(warning.contains("\"template\":\"slack/s\""), "{warning}");
    assert!(warning.contains("\"deliveries\":1"), "{warning}");
}

/// A daemon waiting for room tries to open the store every second. Once the disk has room,
/// something else can keep the store shut (here the store file cannot be written): `/readyz`
/// named it, but the log's only word on the store was still that the disk was full (the new
/// reason showed up at most as the error of some other task's retry). The store now logs each
/// new reason once, as it logged the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_waiting_for_room_logs_what_else_keeps_the_store_shut() {
    let Some(disk) = Tmpfs::mount() else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let slack = FakeSlack::start().await;
    let (mut d, store) = start_with_store_on(&disk, &config(&slack, ""));
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
    let filler = fill(&disk);
    tokio::task::block_in_place(|| d.spawn());
    assert!(d.logs().contains("is full"), "{}", d.logs());
    let Some(_undo) = Immutable::set(&store) else {
        println!("skipped: cannot make a file immutable here");
        return;
    };
    std::fs::remove_file(&filler).unwrap();
    let shut = format!("{} cannot be written by this process", store.display());
    eventually("the new reason logged", WAIT, || {
        d.logs()
            .lines()
            .any(|l| l.contains(&shut) && l.contains("the store still cannot be opened"))
            .then_some(())
    })
    .await;
    let (status, ready) = get(&d.url("/readyz")).await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains(&shut), "{ready}");
    assert_eq!(tokio::task::block_in_place(|| d.terminate()), Some(0));
}

/// What scripts read from `deliveries list --json` and `deliveries show --json`: the same
/// fields for a delivery in both, each attempt's fields, and for an id that is not there
/// nothing on stdout (so no half document is parsed), a line naming it on stderr and exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_json_output_keeps_its_fields_and_a_missing_id_prints_nothing() {
    let slack = FakeSlack::start().await;
    let d = Daemon::start(&config(&slack, ""));
    assert_eq!(d.post(&with_sid(FIXTURE, "CAjsonshape")).await.0, 200);
    let rows = d.wait_settled(WAIT).await;
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let delivery = [
        "attempts",
        "channel",
        "created_at",
        "event",
        "id",
        "last_error",
        "next_attempt_at",
        "rule",
        "sid",
        "status",
        "updated_at",
    ];
    assert_eq!(keys(&rows[0]), delivery);
    let id = rows[0]["id"].to_string();
    let out = d.cli(&["deliveries", "show", &id, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys(&v), ["attempts", "delivery"]);
    assert_eq!(keys(&v["delivery"]), delivery);
    assert_eq!(v["delivery"], rows[0]);
    assert_eq!(
        keys(&v["attempts"][0]),
        ["at", "attempt", "detail", "latency_ms", "outcome"]
    );
    assert_eq!(v["attempts"][0]["outcome"], "done", "{v}");

    let out = d.cli(&["deliveries", "show", "424242", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no delivery 424242"), "{err}");
}

/// `callnotify --help` listed check, render and send-test with their whole descriptions (up to
/// 330 characters on one line), so the list of commands read as a wall; and each command's
/// --help showed --log-format and --log-level between its own options. Now the list has one
/// short line per command, each command's --help still says everything and gives examples,
/// and the global options come after the command's own.
#[test]
fn help_lists_each_command_in_one_short_line_and_each_command_teaches_with_examples() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(commands.len(), 6, "{top}");
    for line in &commands {
        assert!(
            line.chars().count() <= 100,
            "a wall in the command list: {line}"
        );
    }
    assert!(top.contains("callnotify deliveries show 17"), "{top}");
    let long = [
        (
            &["check", "--help"][..],
            "Exit 0 when all is well",
            "--without-secrets",
        ),
        (&["render", "--help"][..], "no secret is needed", "--json"),
        (
            &["send-test", "--help"][..],
            "What it sends with must be set",
            "--payload",
        ),
        (
            &["serve", "--help"][..],
            "SIGHUP reloads the config",
            "--config",
        ),
        (
            &["deliveries", "show", "--help"][..],
            "what the destination",
            "--json",
        ),
        (
            &["deliveries", "retry", "--help"][..],
            "fresh retry window",
            "--all-pending",
        ),
        (
            &["deliveries", "list", "--help"][..],
            "newest first",
            "--json",
        ),
    ];
    for (args, says, own) in long {
        let text = help(args);
        assert!(text.contains(says), "{args:?}:\n{text}");
        assert!(
            text.contains("Examples:\n  callnotify "),
            "{args:?}:\n{text}"
        );
        let options = &text[text.find("Options:").unwrap()..];
        assert!(
            options.find(own).unwrap() <= options.find("--config").unwrap()
                && options.find("--config").unwrap() < options.find("--log-format").unwrap(),
            "global options before the command's own:\n{text}"
        );
    }
}

/// After `cargo install`, `callnotify serve` (or `check`) run from any directory but the one
/// holding `config/` said only "config/callnotify.yaml: cannot read the config file: No such
/// file or directory", which does not say where it looked nor how to point it elsewhere.
#[test]
fn a_missing_relative_config_says_where_it_was_looked_for_and_how_to_name_another() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["check", "serve"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .arg(command)
            .current_dir(dir.path())
            .env_remove("CALLNOTIFY_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        let cwd = dir.path().canonicalize().unwrap();
        assert!(
            err.contains(&format!(
                "a relative path is taken from the working directory, {}",
                cwd.display()
            )) && err.contains("give --config PATH (or CALLNOTIFY_CONFIG)"),
            "{command}: {err}"
        );
    }
}

/// A second `serve` on an address in use (the walk-through's daemon still running, say) said
/// only "Address already in use"; it now says what is likely there and which setting moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_in_use_says_to_stop_the_other_process_or_move_this_one() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (listen, key) in [
        (
            format!("server: {{ listen: \"{addr}\" }}\n"),
            "server.listen",
        ),
        (
            format!("server: {{ listen: \"127.0.0.1:0\" }}\nadmin: {{ listen: \"{addr}\" }}\n"),
            "admin.listen",
        ),
    ] {
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            format!(
                "{listen}store: {{ path: \"{}/s.db\" }}\ntemplates_dir: \"{}\"\n",
                dir.path().display(),
                templates_dir().display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("cannot start: cannot listen on {addr} ({key}): "))
                && err.contains(&format!(
                    "another process listens there (a callnotify started earlier?): stop it, \
                     or change {key}"
                )),
            "{err}"
        );
    }
}
