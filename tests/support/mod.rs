//! What the integration tests run against: the real daemon binary on port 0 with a temporary
//! store, a local HTTP server standing in for Slack whose answers can be changed mid-test, and a
//! real SMTP server (aiosmtpd) whose received messages are parsed by Python's `email` package.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use warp::Filter;

pub const FIXTURE: &str = include_str!("../fixtures/post_call_data.json");
pub const CAMPAIGN: &str = include_str!("../fixtures/post_call_data_campaign.json");
pub const OUTCOME: &str = include_str!("../fixtures/post_call_outcome.json");
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// The repo's templates directory, for configs that use the shipped templates.
/// Writes `dir/c.yaml` for a daemon built in-process: a listener on a free port, a store in
/// `dir`, templates from `templates`, then `rest` (channels, rules, ...). Returns its path.
pub fn in_process_config(dir: &Path, templates: &Path, rest: &str) -> PathBuf {
    let cfg = dir.join("c.yaml");
    let head = format!(
        "server: {{ listen: \"127.0.0.1:0\" }}\nstore: {{ path: \"{}/store.db\" }}\ntemplates_dir: \"{}\"\n",
        dir.display(),
        templates.display()
    );
    std::fs::write(&cfg, head + rest).unwrap();
    cfg
}

pub fn templates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")
}

/// A fixture body with another sid, so each call is new.
pub fn with_sid(body: &str, sid: &str) -> String {
    let mut v: Value = serde_json::from_str(body).expect("fixture is JSON");
    v["call"]["sid"] = Value::String(sid.into());
    v.to_string()
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The daemon binary, running on a temp dir config.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Writes `config_yaml` (with `{dir}` replaced by the temp dir and `{templates}` by the
    /// repo's templates) and starts `callnotify serve` on it.
    pub fn start(config_yaml: &str) -> Daemon {
        Self::start_with_env(config_yaml, &[])
    }

    pub fn start_with_env(config_yaml: &str, env: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let yaml = config_yaml
            .replace("{dir}", &dir.display().to_string())
            .replace("{templates}", &templates_dir().display().to_string());
        let config = dir.join("callnotify.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let mut d = Daemon {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir,
            config,
            log: PathBuf::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _tmp: Some(tmp),
        };
        d.spawn();
        d
    }

    /// (Re)starts the process on the same config and store.
    pub fn spawn(&mut self) {
        self.launch();
        self.wait_listening();
    }

    /// Starts the process on the same config and store, without waiting for it to listen.
    pub fn launch(&mut self) {
        let n = std::fs::read_dir(&self.dir).map(|r| r.count()).unwrap_or(0);
        self.log = self.dir.join(format!("daemon-{n}.log"));
        let log = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
    }

    /// Waits until the process logs its address, and takes it.
    pub fn wait_listening(&mut self) {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["message"] == "callnotify is listening")
                    .then(|| v["listen"].as_str()?.parse().ok())?
            }) {
                self.addr = addr;
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("daemon exited with {status} before listening:\n{text}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Everything the current process has logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every log file of every process started on this dir.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("daemon-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("daemon did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    /// Runs a CLI command against this daemon's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run the CLI")
    }

    /// Runs a CLI command against this daemon's config with `input` on its standard input.
    pub fn cli_with_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the CLI");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("run the CLI")
    }

    /// The binary with `args`, this daemon's config and environment, and `extra` on top.
    pub fn command_with_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut cmd = self.command(args);
        cmd.envs(extra.iter().copied());
        cmd
    }

    /// The binary with `args`, this daemon's config and environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_callnotify"));
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// POSTs a webhook body with the test token.
    pub async fn post(&self, body: &str) -> (u16, Value) {
        post(&self.url("/webhooks/air"), body, Some(TOKEN)).await
    }

    /// Deliveries as `deliveries list --json` shows them.
    pub fn deliveries(&self, status: Option<&str>) -> Vec<Value> {
        let mut args = vec!["deliveries", "list", "--json", "--limit", "100000"];
        if let Some(s) = status {
            args.extend(["--status", s]);
        }
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until no delivery is pending or sending.
    pub async fn wait_settled(&self, timeout: Duration) -> Vec<Value> {
        eventually("deliveries to settle", timeout, || {
            let all = self.deliveries(None);
            all.iter()
                .all(|d| d["status"] == "done" || d["status"] == "dead")
                .then_some(all)
        })
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn post(url: &str, body: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// One scripted answer of the Slack stand-in.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<u64>,
    /// Wait this long before answering (a response that never comes: longer than the daemon's
    /// request timeout).
    pub delay: Duration,
    /// Further response headers (a redirect's `Location`, say).
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::status(200, "ok")
    }
    pub fn status(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.into(),
            retry_after: None,
            delay: Duration::ZERO,
            headers: Vec::new(),
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Reply {
        self.retry_after = Some(secs);
        self
    }
    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub body: Value,
    pub answered: u16,
    /// The sender's address: one TCP connection of one daemon process.
    pub from: Option<SocketAddr>,
    pub method: String,
    /// The request's headers, names in lower case.
    pub headers: Vec<(String, String)>,
}

#[derive(Default)]
struct SlackState {
    script: VecDeque<Reply>,
    default: Option<Reply>,
    received: Vec<Received>,
}

/// A local HTTP server standing in for a Slack incoming webhook.
#[derive(Clone)]
pub struct FakeSlack {
    pub url: String,
    state: Arc<Mutex<SlackState>>,
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        let state = Arc::new(Mutex::new(SlackState::default()));
        let s = state.clone();
        let route = warp::method()
            .and(warp::header::headers_cloned())
            .and(warp::addr::remote())
            .and(warp::body::bytes())
            .then(
                move |method: warp::http::Method,
                      headers: warp::http::HeaderMap,
                      from: Option<SocketAddr>,
                      body: bytes::Bytes| {
                    let s = s.clone();
                    async move {
                        let reply = {
                            let mut st = s.lock().unwrap();
                            let reply = st
                                .script
                                .pop_front()
                                .or_else(|| st.default.clone())
                                .unwrap_or_else(Reply::ok);
                            let body = serde_json::from_slice(&body)
                                .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()));
                            st.received.push(Received {
                                at: Instant::now(),
                                body,
                                answered: reply.status,
                                from,
                                method: method.to_string(),
                                headers: headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into(),
                                        )
                                    })
                                    .collect(),
                            });
                            reply
                        };
                        if !reply.delay.is_zero() {
                            tokio::time::sleep(reply.delay).await;
                        }
                        let mut r = warp::http::Response::builder().status(reply.status);
                        if let Some(secs) = reply.retry_after {
                            r = r.header("retry-after", secs.to_string());
                        }
                        for (k, v) in &reply.headers {
                            r = r.header(k, v);
                        }
                        r.body(reply.body).unwrap()
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        FakeSlack {
            url: format!("http://{addr}/services/T000/B000/XXXX"),
            state,
        }
    }

    /// Answers to give, in order, before falling back to the default.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        self.state.lock().unwrap().default = Some(reply);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The bodies Slack accepted (2xx).
    pub fn accepted(&self) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .map(|r| r.body)
            .collect()
    }

    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<Value> {
        eventually(&format!("{n} Slack messages"), timeout, || {
            let got = self.accepted();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

/// A real SMTP server (aiosmtpd) on 127.0.0.1.
pub struct Smtp {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Smtp {
    pub fn start() -> Smtp {
        let dir = tempfile::tempdir().unwrap();
        let (child, port, _) = python_peer("smtp_server.py", &[dir.path()]);
        Smtp { port, dir, child }
    }

    /// A server that requires STARTTLS and presents the untrusted test certificate.
    pub fn start_starttls() -> Smtp {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = test_certificate();
        let (child, port, _) = python_peer(
            "smtp_server.py",
            &[dir.path(), cert.as_path(), key.as_path()],
        );
        Smtp { port, dir, child }
    }

    /// "ok", "4xx" or "5xx": how the server answers the next messages.
    pub fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.path().join("mode"), mode).unwrap();
    }

    /// The "user:password" logins the server accepts (it refuses every other with 535).
    pub fn set_logins(&self, logins: &[&str]) {
        std::fs::write(self.dir.path().join("logins"), logins.join("\n")).unwrap();
    }

    /// Each login tried so far: "user ok" or "user refused".
    pub fn logins_tried(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("logins.tried"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// The messages received so far, as parsed by Python's `email` package.
    pub fn messages(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for n in 1.. {
            match std::fs::read_to_string(self.dir.path().join(format!("{n}.json"))) {
                Ok(t) => out.push(serde_json::from_str(&t).unwrap()),
                Err(_) => break,
            }
        }
        out
    }

    pub async fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<Value> {
        eventually(&format!("{n} emails"), timeout, || {
            let got = self.messages();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client for talking to the daemon and its peers.
pub fn http() -> reqwest::Client {
    callnotify::notify::install_tls_provider();
    reqwest::Client::new()
}

/// tests/fixtures/tls: a self-signed certificate for 127.0.0.1 that nothing trusts.
pub fn test_certificate() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Starts tests/support/SCRIPT with ARGS; it prints "READY <port>" once listening and exits
/// when its stdin closes (so it never outlives the test).
fn python_peer(script: &str, args: &[&Path]) -> (Child, u16, BufReader<std::process::ChildStdout>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script);
    let mut child = Command::new("python3")
        .arg(path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port = line
        .strip_prefix("READY ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{script} did not start (is aiosmtpd installed? `python3 -m pip install aiosmtpd`): {line:?}"));
    (child, port, out)
}

/// An HTTPS server presenting the untrusted test certificate; records each TLS handshake.
pub struct HttpsPeer {
    pub port: u16,
    child: Child,
    handshakes: Arc<Mutex<Vec<String>>>,
}

impl HttpsPeer {
    pub fn start() -> HttpsPeer {
        let (cert, key) = test_certificate();
        let (child, port, out) = python_peer("https_peer.py", &[cert.as_path(), key.as_path()]);
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line);
            }
        });
        HttpsPeer {
            port,
            child,
            handshakes,
        }
    }

    /// "handshake ok" or "handshake failed: <reason>", one per connection so far.
    pub fn handshakes(&self) -> Vec<String> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for HttpsPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Another process holding SQLite's write lock on a store, as a backup tool or a stray `sqlite3`
/// shell can: the daemon's commits wait (up to its busy timeout) until it is released.
pub struct WriteLock(Child);

impl WriteLock {
    pub fn take(db: &Path) -> WriteLock {
        let mut locker = Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\nc.execute('BEGIN IMMEDIATE')\nprint('LOCKED', flush=True)\nsys.stdin.read()\n",
            ])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(locker.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "LOCKED");
        WriteLock(locker)
    }

    pub fn release(mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
