//! The HTTP edge under hostile input, against the real daemon binary: a table of bad bodies and
//! headers, each with the status it must get; slow clients and idle connections; and secrets
//! that must never reach the logs.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

fn config() -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  tokens: ["{TOKEN}"]
  header_read_timeout: "1s"
  body_read_timeout: "2s"
  max_connections: 200
store:
  path: "{{dir}}/store.db"
templates_dir: "{{templates}}"
channels:
  console: {{ type: log, file: "{{dir}}/notifications.jsonl" }}
rules:
  - name: everything
    notify:
      - channel: console
        template: log/summary
"#
    )
}

/// What came back on a raw connection: the status (0 when the connection closed without an
/// answer), the head and the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn read_answer(s: &mut TcpStream) -> Answer {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Bounded: at most 10 s per read, and the daemon closes after answering `Connection: close`.
    for _ in 0..10_000 {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A reset after the answer arrived (the daemon closed with our body unread) is fine.
            Err(e) if buf.is_empty() || e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => break,
        }
    }
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(i) => (
            String::from_utf8_lossy(&buf[..i]).into_owned(),
            buf[i + 4..].to_vec(),
        ),
        None => (String::from_utf8_lossy(&buf).into_owned(), Vec::new()),
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer { status, head, body }
}

/// Sends `head` (request line and headers, without the blank line) and `body` on a fresh
/// connection, then reads the answer. With `answer_first`, the answer is read before the body
/// is sent: for requests the daemon must refuse from their headers alone.
fn raw(addr: SocketAddr, head: &str, body: &[u8], answer_first: bool) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = head.as_bytes().to_vec();
    req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    s.write_all(&req).unwrap();
    if answer_first {
        return read_answer(&mut s);
    }
    let mut w = s.try_clone().unwrap();
    let body = body.to_vec();
    // Written from another thread so a daemon that answers early cannot block us.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&body);
    });
    let a = read_answer(&mut s);
    drop(s);
    let _ = writer.join();
    a
}

fn post_head(path: &str, auth: Option<&str>, ct: Option<&str>, extra: &str, len: usize) -> String {
    let mut h = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}");
    if let Some(a) = auth {
        h.push_str(&format!("\r\nAuthorization: {a}"));
    }
    if let Some(c) = ct {
        h.push_str(&format!("\r\nContent-Type: {c}"));
    }
    h.push_str(extra);
    h
}

/// One hostile request and the status it must get.
struct Case {
    name: &'static str,
    head: String,
    body: Vec<u8>,
    status: u16,
    /// The `error` kind of the daemon's JSON answer; None for answers hyper gives itself
    /// (malformed HTTP) that never reach our handler.
    kind: Option<&'static str>,
    answer_first: bool,
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// A body with the valid auth, JSON content type and the given bytes.
fn body_case(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    status: u16,
    kind: &'static str,
) -> Case {
    let body = body.into();
    Case {
        name,
        head: post_head(
            "/webhooks/air",
            Some(&bearer()),
            Some("application/json"),
            "",
            body.len(),
        ),
        body,
        status,
        kind: Some(kind),
        answer_first: false,
    }
}

fn call_with(field: &str, value: &str) -> String {
    format!(
        r#"{{"call":{{"sid":"CAhostile{}","{field}":{value}}}}}"#,
        field.len()
    )
}

fn auth_case(name: &'static str, auth: Option<String>) -> Case {
    Case {
        name,
        head: post_head(
            "/webhooks/air",
            auth.as_deref(),
            Some("application/json"),
            "",
            CAMPAIGN.len(),
        ),
        body: CAMPAIGN.as_bytes().to_vec(),
        status: 401,
        kind: Some("unauthorized"),
        answer_first: false,
    }
}

fn cases() -> Vec<Case> {
    let bad = "bad_request";
    let mut nested = b"{\"call\":".to_vec();
    nested.extend(std::iter::repeat_n(b'[', 100_000));
    let mut nested_obj = Vec::new();
    for _ in 0..100_000 {
        nested_obj.extend_from_slice(b"{\"a\":");
    }
    let mut cases = vec![
        body_case("invalid UTF-8", b"{\"call\":{\"sid\":\"CA\xff\xfe\"}}".to_vec(), 400, bad),
        body_case("invalid JSON", "{\"call\":", 400, bad),
        body_case("trailing garbage", format!("{CAMPAIGN} x"), 400, bad),
        body_case("empty body", "", 400, bad),
        body_case("JSON null", "null", 400, bad),
        body_case("a top-level array", "[1,2]", 400, bad),
        body_case("nested 100,000 arrays", nested, 400, bad),
        body_case("nested 100,000 objects", nested_obj, 400, bad),
        body_case("NUL bytes", b"\0\0\0{}".to_vec(), 400, bad),
        body_case("a UTF-8 BOM", b"\xef\xbb\xbf{\"call\":{\"sid\":\"CAbom\"}}".to_vec(), 400, bad),
        body_case("no call", r#"{"headers":{}}"#, 400, bad),
        body_case("call as a string", r#"{"call":"CA1"}"#, 400, bad),
        body_case("call as an array", r#"{"call":[]}"#, 400, bad),
        body_case("sid missing", r#"{"call":{"duration":5}}"#, 400, bad),
        body_case("sid empty", r#"{"call":{"sid":""}}"#, 400, bad),
        body_case("sid blank", r#"{"call":{"sid":"   "}}"#, 400, bad),
        body_case("sid 10 KB", format!(r#"{{"call":{{"sid":"{}"}}}}"#, "C".repeat(10_240)), 400, bad),
        body_case("sid a number", r#"{"call":{"sid":5}}"#, 400, bad),
        body_case("sid an object", r#"{"call":{"sid":{"a":1}}}"#, 400, bad),
        body_case("sid with NUL", r#"{"call":{"sid":"CA\u0000x"}}"#, 400, bad),
        body_case("sid with a newline", r#"{"call":{"sid":"CA\nBcc: x"}}"#, 400, bad),
        body_case("duration -5", call_with("duration", "-5"), 400, bad),
        body_case("duration 1e309", call_with("duration", "1e309"), 400, bad),
        body_case("duration \"abc\"", call_with("duration", r#""abc""#), 400, bad),
        body_case("duration \"NaN\"", call_with("duration", r#""NaN""#), 400, bad),
        body_case("duration \"inf\"", call_with("duration", r#""inf""#), 400, bad),
        body_case("duration an object", call_with("duration", "{}"), 400, bad),
        body_case("createdAt not a date", call_with("createdAt", r#""yesterday""#), 400, bad),
        body_case("createdAt a number", call_with("createdAt", "1700000000"), 400, bad),
        body_case("leadData a string", call_with("leadData", r#""x""#), 400, bad),
        body_case("leadData an array", call_with("leadData", "[]"), 400, bad),
        Case {
            name: "huge body with Content-Length (answered before it is sent)",
            head: post_head("/webhooks/air", Some(&bearer()), Some("application/json"), "", 2 * 1024 * 1024),
            body: vec![],
            status: 413,
            kind: Some("payload_too_large"),
            answer_first: true,
        },
        Case {
            name: "chunked body over the limit, no Content-Length",
            head: format!(
                "POST /webhooks/air HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked",
                bearer()
            ),
            body: {
                let mut b = Vec::new();
                for _ in 0..18 {
                    b.extend_from_slice(b"10000\r\n");
                    b.extend(std::iter::repeat_n(b' ', 0x10000));
                    b.extend_from_slice(b"\r\n");
                }
                b.extend_from_slice(b"0\r\n\r\n");
                b
            },
            status: 413,
            kind: Some("payload_too_large"),
            answer_first: false,
        },
        Case {
            name: "a body that stops arriving (body_read_timeout 2s)",
            head: post_head("/webhooks/air", Some(&bearer()), Some("application/json"), "", 100),
            body: b"{\"call\":".to_vec(),
            status: 408,
            kind: Some("timeout"),
            answer_first: false,
        },
        Case {
            name: "text/plain",
            head: post_head("/webhooks/air", Some(&bearer()), Some("text/plain"), "", CAMPAIGN.len()),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 415,
            kind: Some("unsupported_media_type"),
            answer_first: false,
        },
        Case {
            name: "form-encoded",
            head: post_head("/webhooks/air", Some(&bearer()), Some("application/x-www-form-urlencoded"), "", CAMPAIGN.len()),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 415,
            kind: Some("unsupported_media_type"),
            answer_first: false,
        },
        Case {
            name: "GET on the webhook",
            head: "GET /webhooks/air HTTP/1.1\r\nHost: localhost".into(),
            body: vec![],
            status: 405,
            kind: Some("method_not_allowed"),
            answer_first: false,
        },
        Case {
            name: "PUT on the webhook",
            head: post_head("/webhooks/air", Some(&bearer()), Some("application/json"), "", CAMPAIGN.len()).replacen("POST", "PUT", 1),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 405,
            kind: Some("method_not_allowed"),
            answer_first: false,
        },
        Case {
            name: "DELETE /healthz",
            head: "DELETE /healthz HTTP/1.1\r\nHost: localhost".into(),
            body: vec![],
            status: 405,
            kind: Some("method_not_allowed"),
            answer_first: false,
        },
        Case {
            name: "unknown path",
            head: post_head("/webhooks/air2", Some(&bearer()), Some("application/json"), "", CAMPAIGN.len()),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 404,
            kind: Some("not_found"),
            answer_first: false,
        },
        Case {
            name: "trailing slash",
            head: post_head("/webhooks/air/", Some(&bearer()), Some("application/json"), "", CAMPAIGN.len()),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 404,
            kind: Some("not_found"),
            answer_first: false,
        },
        Case {
            name: "dot-dot path",
            head: "GET /../../etc/passwd HTTP/1.1\r\nHost: localhost".into(),
            body: vec![],
            status: 404,
            kind: Some("not_found"),
            answer_first: false,
        },
        auth_case("no Authorization", None),
        auth_case("a wrong token", Some("Bearer wrong-token-0123456789abcdef".into())),
        auth_case("the token as a prefix", Some(format!("Bearer {TOKEN}x"))),
        auth_case("a prefix of the token", Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]))),
        auth_case("Bearer without a token", Some("Bearer ".into())),
        auth_case("Bearer without a space", Some(format!("Bearer{TOKEN}"))),
        auth_case("two spaces", Some(format!("Bearer  {TOKEN}"))),
        auth_case("Basic with the token", Some(format!("Basic {TOKEN}"))),
        auth_case("the bare token", Some(TOKEN.into())),
        auth_case("non-UTF-8 in the header", Some("Bearer \u{ff}\u{fe}".into())),
        Case {
            name: "unauthorized and huge: refused before the body is read",
            head: post_head("/webhooks/air", Some("Bearer nope"), Some("application/json"), "", 2 * 1024 * 1024),
            body: vec![],
            status: 401,
            kind: Some("unauthorized"),
            answer_first: true,
        },
        Case {
            name: "unauthorized and text/plain: the token is checked first",
            head: post_head("/webhooks/air", None, Some("text/plain"), "", 2),
            body: b"hi".to_vec(),
            status: 401,
            kind: Some("unauthorized"),
            answer_first: false,
        },
        Case {
            name: "a wrong token then the right one: only the first counts",
            head: post_head(
                "/webhooks/air",
                Some("Bearer wrong-token-0123456789abcdef"),
                Some("application/json"),
                &format!("\r\nAuthorization: {}", bearer()),
                CAMPAIGN.len(),
            ),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 401,
            kind: Some("unauthorized"),
            answer_first: false,
        },
        Case {
            name: "NUL in a header value (refused by the HTTP parser)",
            head: post_head("/webhooks/air", Some(&format!("Bearer {TOKEN}\0")), Some("application/json"), "", CAMPAIGN.len()),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 400,
            kind: None,
            answer_first: false,
        },
        Case {
            name: "Content-Length not a number",
            head: post_head("/webhooks/air", Some(&bearer()), Some("application/json"), "", 0)
                .replace("Content-Length: 0", "Content-Length: abc"),
            body: CAMPAIGN.as_bytes().to_vec(),
            status: 400,
            kind: None,
            answer_first: false,
        },
        Case {
            name: "request smuggling: Content-Length and chunked",
            head: post_head("/webhooks/air", Some(&bearer()), Some("application/json"), "\r\nTransfer-Encoding: chunked", 4),
            body: b"0\r\n\r\n".to_vec(),
            status: 400,
            kind: None,
            answer_first: false,
        },
    ];
    cases.push(Case {
        name: "200 headers (over hyper's limit of 100)",
        head: post_head(
            "/webhooks/air",
            Some(&bearer()),
            Some("application/json"),
            &(0..200)
                .map(|i| format!("\r\nX-Flood-{i}: {i}"))
                .collect::<String>(),
            CAMPAIGN.len(),
        ),
        body: CAMPAIGN.as_bytes().to_vec(),
        status: 431,
        kind: None,
        answer_first: false,
    });
    // The case-insensitive scheme is accepted, and so gets as far as the body.
    cases.push(Case {
        name: "lower-case bearer with a bad body",
        head: post_head(
            "/webhooks/air",
            Some(&format!("bearer {TOKEN}")),
            Some("application/json"),
            "",
            2,
        ),
        body: b"{}".to_vec(),
        status: 400,
        kind: Some("bad_request"),
        answer_first: false,
    });
    cases
}

#[tokio::test]
async fn hostile_requests_get_their_status_and_change_nothing() {
    let d = Daemon::start(&config());
    let addr = d.addr;
    let cases = cases();
    assert!(cases.len() >= 30);
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        for c in &cases {
            let a = raw(addr, &c.head, &c.body, c.answer_first);
            let json: Option<Value> = serde_json::from_slice(&a.body).ok();
            let kind = json
                .as_ref()
                .and_then(|v| v["error"].as_str().map(String::from));
            let ok = a.status == c.status
                && match c.kind {
                    Some(k) => {
                        kind.as_deref() == Some(k)
                            && json.as_ref().is_some_and(|v| v["message"].is_string())
                            && a.head
                                .to_ascii_lowercase()
                                .contains("content-type: application/json")
                    }
                    None => true,
                };
            if !ok {
                failures.push(format!(
                    "{}: want {} {:?}, got {} {}",
                    c.name,
                    c.status,
                    c.kind,
                    a.head.lines().next().unwrap_or("(closed)"),
                    String::from_utf8_lossy(&a.body)
                ));
            }
        }
        failures
    })
    .await
    .unwrap();
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Nothing was stored for any of them.
    assert!(d.deliveries(None).is_empty(), "{:?}", d.deliveries(None));

    // The daemon still answers a valid call correctly, and its `headers` stay out of the logs.
    let mut body: Value = serde_json::from_str(&with_sid(CAMPAIGN, "CAafterthestorm")).unwrap();
    body["headers"] = serde_json::json!({
        "authorization": "Bearer header-secret-4f1d9c",
        "x-api-key": "header-secret-api-key-77aa"
    });
    let (status, answer) = d.post(&body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["sid"], "CAafterthestorm");
    assert_eq!(answer["notifications"], 1);
    let deliveries = d.wait_settled(Duration::from_secs(20)).await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0]["sid"], "CAafterthestorm");
    let logs = d.logs();
    for secret in [TOKEN, "header-secret", "wrong-token-0123", "Bearer nope"] {
        assert!(!logs.contains(secret), "{secret:?} is in the logs:\n{logs}");
    }
    assert!(
        !logs.to_ascii_lowercase().contains("authorization"),
        "{logs}"
    );
}

/// True when the daemon has closed `s` (EOF, reset, or an answer followed by EOF) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // e.g. a 408 answer; keep reading until EOF
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_and_do_not_starve_real_requests() {
    let d = Daemon::start(&config());
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        // One header byte a second: cut off by header_read_timeout (1s), well before the head
        // would be complete.
        let mut slow = TcpStream::connect(addr).unwrap();
        let head = format!("POST /webhooks/air HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n");
        let start = Instant::now();
        let mut cut = false;
        slow.set_read_timeout(Some(Duration::from_millis(1000)))
            .unwrap();
        for b in head.bytes().take(8) {
            if slow.write_all(&[b]).is_err() {
                cut = true;
                break;
            }
            let mut buf = [0u8; 512];
            match slow.read(&mut buf) {
                Ok(0) => {
                    cut = true;
                    break;
                }
                Ok(_) => {} // an answer (408): the close follows
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        assert!(cut, "a client sending a byte a second was not cut off");
        eprintln!("slow client cut off after {:?}", start.elapsed());
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );

        // A connection that never says anything is closed too.
        let mut silent = TcpStream::connect(addr).unwrap();
        assert!(
            closed_within(&mut silent, Duration::from_secs(4)),
            "a silent connection stayed open"
        );

        // A keep-alive connection left idle after its request is closed too.
        let mut kept = TcpStream::connect(addr).unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = kept.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        assert!(
            closed_within(&mut kept, Duration::from_secs(4)),
            "an idle keep-alive connection stayed open"
        );

        // 300 idle connections against max_connections 200: a real request gets through once the
        // idle ones time out.
        // 300 idle connections against max_connections 200: the longest-idle ones make room.
        let idle: Vec<TcpStream> = (0..300)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        assert!(idle.len() >= 250, "only {} connections opened", idle.len());
        let start = Instant::now();
        let mut answered = None;
        while start.elapsed() < Duration::from_secs(10) {
            let a = raw(addr, "GET /healthz HTTP/1.1\r\nHost: localhost", b"", false);
            if a.status == 200 {
                answered = Some(start.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = answered.expect("a real request never got through the idle connections");
        eprintln!(
            "real request answered {took:?} after opening {} idle connections",
            idle.len()
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
        // The idle connections were closed by the daemon, not left to hold their slots.
        let mut idle = idle;
        for s in idle.iter_mut().take(5) {
            assert!(
                closed_within(s, Duration::from_secs(3)),
                "an idle connection stayed open"
            );
        }
        let body = CAMPAIGN.as_bytes();
        let a = raw(
            addr,
            &post_head(
                "/webhooks/air",
                Some(&bearer()),
                Some("application/json"),
                "",
                body.len(),
            ),
            body,
            false,
        );
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        drop(idle);
    })
    .await
    .unwrap();
    assert_eq!(d.deliveries(None).len(), 1);
}

/// With a long header timeout, idle connections would hold every slot for 30 s; the daemon
/// closes the longest-idle ones instead, so a real request is answered at once.
#[tokio::test]
async fn idle_connections_make_room_for_real_requests() {
    let d = Daemon::start(
        &config()
            .replace(
                "header_read_timeout: \"1s\"",
                "header_read_timeout: \"30s\"",
            )
            .replace("max_connections: 200", "max_connections: 50"),
    );
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        let mut idle: Vec<TcpStream> = (0..120)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        assert!(idle.len() >= 100, "only {} connections opened", idle.len());
        let start = Instant::now();
        let a = raw(addr, "GET /healthz HTTP/1.1\r\nHost: localhost", b"", false);
        assert_eq!(a.status, 200, "a real request was turned away");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // The first idle connection was closed long before its 30 s header timeout.
        assert!(
            closed_within(&mut idle[0], Duration::from_secs(3)),
            "the longest-idle connection stayed open"
        );
    })
    .await
    .unwrap();
}
