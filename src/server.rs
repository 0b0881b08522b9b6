//! The HTTP edge: Air's webhook, health, readiness, metrics and reload.
//!
//! Requests go through one handler that checks, in order: route and method (404/405), the
//! Bearer token before anything else is read (401), content type (415), size while reading
//! (413), the time the body takes (408), then the body itself (400 with the reason). Every error
//! is a small JSON object `{"error": kind, "message": reason}`. The accept loop is ours rather
//! than `warp::serve` so connections can be limited and slow clients cut off.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::app::{Live, Shared};
use crate::store::{Inserted, NewDelivery};
use crate::{metrics, payload, rules};

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The webhook, and the admin endpoints too when there is no separate admin listener.
    Main { with_admin: bool },
    /// Health, readiness, metrics and reload only.
    Admin,
}

/// A JSON error answer.
pub fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": kind, "message": message.into() });
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn ok_json(value: serde_json::Value) -> Response {
    warp::reply::json(&value).into_response()
}

/// The warp filter for one listener.
pub fn routes(
    shared: Arc<Shared>,
    surface: Surface,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::ext::optional::<Peer>())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  headers: HeaderMap,
                  body,
                  peer: Option<Peer>| {
                let shared = shared.clone();
                async move {
                    let from = Origin(peer);
                    handle(shared, surface, method, path.as_str(), headers, body, from).await
                }
            },
        )
}

/// The address a connection came from, put on each of its requests by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Where a request came from, as a log line says it: refusals and rejections name it, so a
/// sender with a stale token can be found. `unknown` where no [`Peer`] was put on the request.
#[derive(Clone, Copy)]
struct Origin(Option<Peer>);

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(Peer(addr)) => write!(f, "{addr}"),
            None => f.write_str("unknown"),
        }
    }
}

async fn handle<S, B>(
    shared: Arc<Shared>,
    surface: Surface,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: S,
    from: Origin,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    // One snapshot of the config per request: a reload meanwhile does not mix two configs.
    let live = shared.live.load_full();
    let admin = matches!(surface, Surface::Admin | Surface::Main { with_admin: true });
    let is_webhook =
        matches!(surface, Surface::Main { .. }) && path == live.config.server.webhook_path;
    let allowed: &[Method] = match path {
        _ if is_webhook => &[Method::POST],
        "/healthz" | "/readyz" | "/metrics" if admin => &[Method::GET, Method::HEAD],
        "/-/reload" if admin => &[Method::POST],
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint at {}", crate::notify::excerpt(path, 100)),
            );
        }
    };
    if !allowed.contains(&method) {
        let allow = allowed
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} accepts {allow}"),
        );
        if let Ok(v) = HeaderValue::from_str(&allow) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    match path {
        _ if is_webhook => ingest(Arc::clone(&shared), &live, &headers, body, from).await,
        "/healthz" => ok_json(json!({"status": "ok"})),
        "/readyz" => ready(&shared).await,
        "/metrics" => {
            let mut r = metrics::handle().render().into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                // Prometheus' text format is UTF-8 (a rule's name in a label may not be ASCII).
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => match shared.reload("HTTP").await {
            Ok(r) if r.stranded.is_empty() => {
                ok_json(json!({"status": "reloaded", "stranded": []}))
            }
            Ok(r) => {
                let n: usize = r.stranded.iter().map(|s| s.deliveries).sum();
                ok_json(json!({
                    "status": "reloaded",
                    "stranded": r.stranded,
                    "message": format!(
                        "{n} unfinished deliveries cannot be sent with the new config; {}",
                        crate::app::STRANDED_HINT
                    ),
                }))
            }
            Err(e) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "config_invalid",
                e.to_string(),
            ),
        },
    }
}

async fn ready(shared: &Shared) -> Response {
    if shared.is_shutting_down() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is shutting down",
        );
    }
    let now = shared.clock.now_ms();
    match shared
        .ready
        .check(|failed| shared.store.probe(now, failed.into_iter().collect()))
        .await
    {
        Ok(()) => ok_json(json!({"status": "ready"})),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the store cannot take a call: {e}"),
        ),
    }
}

/// How long a good store probe answers `/readyz`.
const READY_REUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// `/readyz` tries the webhook's own writes on the store (undone) to prove a call would be
/// taken. It may be reachable from outside (no `admin.listen`), so a good probe is reused for a
/// second: however often it is asked, the store sees at most one probe a second. A failed probe
/// is not reused; the next ask tries again. A webhook whose commit failed is remembered until
/// it or a probe with its sid commits: until then no good answer is reused, and the probe tries
/// that sid too (a store damaged in part can refuse some calls and take the probe's).
#[derive(Debug, Default)]
pub struct ReadyCache {
    good_at: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// The sid of the last webhook whose commit failed, until it commits.
    failed: Mutex<Option<String>>,
}

impl ReadyCache {
    pub async fn check<F, Fut, E>(&self, probe: F) -> Result<(), E>
    where
        F: FnOnce(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        // Held across the probe: callers arriving meanwhile wait for it and reuse its result.
        let mut good_at = self.good_at.lock().await;
        let failed = self.failed().clone();
        if failed.is_none() && good_at.is_some_and(|t| t.elapsed() < READY_REUSE) {
            return Ok(());
        }
        let result = probe(failed.clone()).await;
        *good_at = result.is_ok().then(tokio::time::Instant::now);
        if result.is_ok() && failed.is_some() {
            self.committed(failed.as_deref().unwrap_or_default());
        }
        result
    }

    /// A webhook's commit failed: readiness must not be taken from an earlier good probe.
    pub fn commit_failed(&self, sid: &str) {
        *self.failed() = Some(sid.to_string());
    }

    /// A webhook's commit succeeded: if it was the one that failed, that is over.
    pub fn committed(&self, sid: &str) {
        let mut failed = self.failed();
        if failed.as_deref() == Some(sid) {
            *failed = None;
        }
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Compares a presented token with each configured one. The time taken depends only on the
/// configured tokens, never on how much of a guess was right.
pub fn authorized(headers: &HeaderMap, tokens: &[SecretString]) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| {
            let scheme = v.get(..7)?;
            scheme.eq_ignore_ascii_case(b"bearer ").then(|| &v[7..])
        })
        .unwrap_or_default();
    let mut any = subtle::Choice::from(0u8);
    for token in tokens {
        let want = token.expose_secret().as_bytes();
        let mut diff = 0u8;
        for (i, w) in want.iter().enumerate() {
            diff |= presented.get(i).copied().unwrap_or(0) ^ w;
        }
        let same_len = (presented.len() as u64).ct_eq(&(want.len() as u64));
        any |= same_len & diff.ct_eq(&0u8);
    }
    !presented.is_empty() && bool::from(any)
}

#[derive(Debug)]
enum BodyError {
    TooLarge,
    Timeout,
    Broken(String),
}

async fn read_body<S, B>(
    mut body: S,
    limit: usize,
    timeout: Duration,
) -> Result<BytesMut, BodyError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let read = async {
        let mut out = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(|e| BodyError::Broken(e.to_string()))?;
            if out.len() + chunk.remaining() > limit {
                return Err(BodyError::TooLarge);
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                out.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| BodyError::Timeout)?
}

async fn ingest<S, B>(
    shared: Arc<Shared>,
    live: &Live,
    headers: &HeaderMap,
    body: S,
    from: Origin,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let cfg = &live.config.server;
    if !authorized(headers, &cfg.tokens) {
        metrics::call_received("unauthorized");
        if refusal_logged() {
            tracing::warn!(%from, "webhook refused: missing or wrong Bearer token");
        }
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong Bearer token",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let reject = |status: StatusCode, kind: &str, message: String| {
        metrics::call_received("rejected");
        // One message for every rejection, the why in `reason`: a log query or an alert on
        // "webhook rejected" finds them all.
        if refusal_logged() {
            tracing::warn!(%from, status = status.as_u16(), kind, reason = %message, "webhook rejected");
        }
        error(status, kind, message)
    };
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or_default().trim();
        if mime != "application/json" && !mime.ends_with("+json") {
            return reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be application/json".into(),
            );
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || format!("the body is larger than {} bytes", cfg.max_body_bytes);
    if declared.is_some_and(|n| n > cfg.max_body_bytes as u64) {
        return reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            too_large(),
        );
    }
    let bytes = match read_body(body, cfg.max_body_bytes, cfg.body_read_timeout).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                too_large(),
            )
        }
        Err(BodyError::Timeout) => {
            return reject(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the body took too long to arrive".into(),
            )
        }
        Err(BodyError::Broken(e)) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the body: {e}"),
            )
        }
    };
    let call = match payload::parse(&bytes) {
        Ok(c) => c,
        Err(e) => return reject(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    let matched = rules::matching(&live.config.rules, &call);
    let owed: Vec<NewDelivery> = matched
        .iter()
        .flat_map(|rule| {
            rule.actions.iter().enumerate().map(|(i, a)| NewDelivery {
                rule: rule.name.clone(),
                action_idx: i,
                action: a.clone(),
                channel_type: live
                    .config
                    .channels
                    .get(&a.channel)
                    .map(|c| c.kind.type_name()),
            })
        })
        .collect();
    let now = shared.clock.now_ms();
    let sid = call.sid.clone();
    let event = call.event.as_str();
    let rule_names: Vec<String> = matched.iter().map(|r| r.name.clone()).collect();
    // The commit and what follows it (metrics, the log line, waking delivery) run as a task of
    // their own: a client that hangs up while its commit is in flight drops this handler, but
    // the call is stored all the same and must be counted, logged and delivered like any other.
    let body = call.raw_json();
    // Tracked, so that shutdown waits for it even when its client is gone.
    let commits = shared.commits.clone();
    let commit = commits.spawn(async move {
        let inserted = shared
            .store
            .insert_call(sid.clone(), event, body, now, owed)
            .await;
        note_outcome(&shared, &inserted, &sid, event, &rule_names, now);
        (inserted, sid, rule_names)
    });
    answer_commit(commit.await, event)
}

/// What a sender is told to wait before trying again after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// The webhook's 503: nothing (or nothing known) was stored. Always says when to try again.
fn store_unavailable(message: &str) -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        message,
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    r
}

/// What the commit task returns: the store's answer, the sid and the rules matched.
type Committed = (
    Result<Inserted, crate::store::StoreError>,
    String,
    Vec<String>,
);

/// The webhook's answer once its commit task has finished (or failed to).
fn answer_commit(joined: Result<Committed, tokio::task::JoinError>, event: &str) -> Response {
    let Ok((inserted, sid, rule_names)) = joined else {
        // The task panicked or the runtime is stopping; whether the call was stored is unknown,
        // and Air's retry is answered `duplicate` if it was.
        return store_unavailable("the call could not be stored; please retry");
    };
    match inserted {
        Ok(Inserted::Accepted { deliveries, .. }) => ok_json(
            json!({"status": "accepted", "sid": sid, "event": event, "rules": rule_names, "notifications": deliveries}),
        ),
        Ok(Inserted::Duplicate) => {
            ok_json(json!({"status": "duplicate", "sid": sid, "event": event, "notifications": 0}))
        }
        Err(_) => {
            store_unavailable("the call could not be stored; nothing was accepted, please retry")
        }
    }
}

/// Refused and rejected webhooks logged per minute at most. Anyone who can reach the webhook can
/// send them; unbounded, a flood of bad requests would fill the disk or the log pipeline and
/// bury the lines that matter. Every one is still counted (`calls_received_total`).
const REFUSALS_LOGGED_PER_MINUTE: u32 = 30;

/// How many refusals were logged and left out in the current minute.
#[derive(Debug, Default)]
pub struct RefusalBudget {
    since: Option<Instant>,
    logged: u32,
    left_out: u32,
}

impl RefusalBudget {
    /// Whether a refusal at `now` is logged, and how many were left out in the minute that just
    /// ended (said before the next line, so a flood is never silent in the log).
    pub fn take(&mut self, now: Instant) -> (bool, u32) {
        let mut ended = 0;
        if self
            .since
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60))
        {
            ended = std::mem::take(&mut self.left_out);
            self.since = Some(now);
            self.logged = 0;
        }
        if self.logged < REFUSALS_LOGGED_PER_MINUTE {
            self.logged += 1;
            (true, ended)
        } else {
            self.left_out += 1;
            (false, ended)
        }
    }
}

/// Process-wide, as the log is.
static REFUSALS: Mutex<RefusalBudget> = Mutex::new(RefusalBudget {
    since: None,
    logged: 0,
    left_out: 0,
});

/// Whether to log this refusal; says first how many the last minute left out, if any.
fn refusal_logged() -> bool {
    let (log, left_out) = REFUSALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(Instant::now());
    if left_out > 0 {
        tracing::warn!(
            left_out,
            "more webhooks were refused or rejected in the last minute than are logged (calls_received_total counts them all)"
        );
    }
    log
}

/// Counts and logs a stored (or refused) call, and wakes delivery for what it owes.
fn note_outcome(
    shared: &Shared,
    inserted: &Result<Inserted, crate::store::StoreError>,
    sid: &str,
    event: &str,
    rule_names: &[String],
    now: i64,
) {
    match inserted {
        Ok(Inserted::Accepted { deliveries, .. }) => {
            shared.ready.committed(sid);
            metrics::call_received("accepted");
            metrics::last_call_at(now);
            shared.note_call(now);
            for r in rule_names {
                metrics::rule_matched(r);
            }
            if *deliveries > 0 {
                shared.worker.wake();
            }
            // As JSON text: a list in JSON logs (see `LIST_FIELDS` in main.rs), readable in text.
            let rules = serde_json::to_string(rule_names).unwrap_or_default();
            tracing::info!(sid = %sid, event, rules = %rules, deliveries, "call accepted");
        }
        Ok(Inserted::Duplicate) => {
            shared.ready.committed(sid);
            metrics::call_received("duplicate");
            tracing::info!(sid = %sid, event, "duplicate call ignored");
        }
        Err(e) => {
            shared.ready.commit_failed(sid);
            metrics::call_received("unavailable");
            tracing::error!(sid = %sid, error = %e, "cannot store the call; answering 503");
        }
    }
}

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// The open connections and whether each is between requests, so that at the connection limit
/// the one idle the longest can make room for a new one: idle connections cannot starve real
/// requests.
#[derive(Default)]
struct Conns(Mutex<ConnsInner>);

#[derive(Default)]
struct ConnsInner {
    next: u64,
    open: HashMap<u64, Conn>,
}

struct Conn {
    /// Since when it has had no request in progress (a new connection is idle until it speaks);
    /// None while a request is being served or once it was asked to close.
    idle_since: Option<Instant>,
    evict: Arc<Notify>,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnsInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self) -> (u64, Arc<Notify>) {
        let mut c = self.lock();
        c.next += 1;
        let id = c.next;
        let evict = Arc::new(Notify::new());
        c.open.insert(
            id,
            Conn {
                idle_since: Some(Instant::now()),
                evict: evict.clone(),
            },
        );
        (id, evict)
    }

    fn set_idle(&self, id: u64, idle: bool) {
        if let Some(conn) = self.lock().open.get_mut(&id) {
            conn.idle_since = idle.then(Instant::now);
        }
    }

    fn close(&self, id: u64) {
        self.lock().open.remove(&id);
    }

    /// Asks the connection idle the longest to close; false when none is idle.
    fn evict_longest_idle(&self) -> bool {
        let mut c = self.lock();
        let oldest = c
            .open
            .iter_mut()
            .filter(|(_, conn)| conn.idle_since.is_some())
            .min_by_key(|(_, conn)| conn.idle_since);
        match oldest {
            Some((_, conn)) => {
                conn.idle_since = None;
                conn.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `filter` on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve<F>(listener: TcpListener, filter: F, limits: Limits, shutdown: CancellationToken)
where
    F: Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let conns = Arc::new(Conns::default());
    let local: Option<SocketAddr> = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: close the connection idle the longest and take its place; only when
                // every connection is busy is the new one turned away.
                let evicted = conns.evict_longest_idle();
                let freed = if evicted {
                    tokio::time::timeout(
                        Duration::from_millis(200),
                        permits.clone().acquire_owned(),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                } else {
                    None
                };
                match freed {
                    Some(p) => {
                        tracing::debug!(
                            max = limits.max_connections,
                            "connection limit reached; closed the longest-idle connection"
                        );
                        p
                    }
                    None => {
                        tracing::warn!(
                            max = limits.max_connections,
                            "connection limit reached and every connection busy; closing a new connection"
                        );
                        drop(stream);
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (id, evict) = conns.open();
        let inner = warp::service(filter.clone());
        let track = conns.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(Peer(peer));
            track.set_idle(id, false);
            let mut inner = inner.clone();
            let track = track.clone();
            async move {
                let response = tower_service::Service::call(&mut inner, req).await;
                track.set_idle(id, true);
                response
            }
        });
        let shutdown = shutdown.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Some(limits.header_read_timeout))
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                _ = evict.notified() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            conns.close(id);
            drop(permit);
        });
    }
    drop(listener);
    // Wait for open connections to finish their requests.
    let _ = permits.acquire_many(limits.max_connections as u32).await;
    tracing::debug!(addr = ?local, "listener stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn refusals_are_logged_up_to_a_budget_a_minute_and_the_rest_are_said_to_be_left_out() {
        let mut b = RefusalBudget::default();
        let t0 = Instant::now();
        let first: Vec<(bool, u32)> = (0..REFUSALS_LOGGED_PER_MINUTE + 5)
            .map(|_| b.take(t0 + Duration::from_secs(30)))
            .collect();
        assert!(first[..REFUSALS_LOGGED_PER_MINUTE as usize]
            .iter()
            .all(|x| *x == (true, 0)));
        assert!(first[REFUSALS_LOGGED_PER_MINUTE as usize..]
            .iter()
            .all(|x| *x == (false, 0)));
        // The next minute logs again and first says how many the last one left out.
        assert_eq!(b.take(t0 + Duration::from_secs(95)), (true, 5));
        assert_eq!(b.take(t0 + Duration::from_secs(96)), (true, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_probes_the_store_once_for_many_asks_and_again_after_a_failure() {
        let cache = Arc::new(ReadyCache::default());
        let probes = Arc::new(AtomicUsize::new(0));
        let ask = |fails: bool| {
            let (cache, probes) = (cache.clone(), probes.clone());
            async move {
                cache
                    .check(|_| async {
                        probes.fetch_add(1, Ordering::SeqCst);
                        if fails {
                            Err("locked")
                        } else {
                            Ok(())
                        }
                    })
                    .await
            }
        };
        // A failure is not reused: each ask probes again.
        assert_eq!(ask(true).await, Err("locked"));
        assert_eq!(ask(true).await, Err("locked"));
        assert_eq!(probes.load(Ordering::SeqCst), 2);
        // A hundred asks at once after that: one probe answers them all.
        let asks: Vec<_> = (0..100).map(|_| tokio::spawn(ask(false))).collect();
        for a in asks {
            assert_eq!(a.await.unwrap(), Ok(()));
        }
        assert_eq!(probes.load(Ordering::SeqCst), 3);
        // A second later the good answer is stale: the next ask probes again.
        tokio::time::advance(READY_REUSE).await;
        assert_eq!(ask(false).await, Ok(()));
        assert_eq!(probes.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failed_commit_readiness_probes_with_its_sid_until_one_commits() {
        let cache = ReadyCache::default();
        let seen = Mutex::new(Vec::new());
        let ask = |fails: bool| {
            let (cache, seen) = (&cache, &seen);
            async move {
                cache
                    .check(|failed| async move {
                        seen.lock().unwrap().push(failed);
                        if fails {
                            Err("malformed")
                        } else {
                            Ok(())
                        }
                    })
                    .await
            }
        };
        assert_eq!(ask(false).await, Ok(()));
        // A webhook's commit fails: the good answer of a moment ago is not reused, and the
        // probe tries that call too.
        cache.commit_failed("CAbad");
        assert_eq!(ask(true).await, Err("malformed"));
        assert_eq!(ask(true).await, Err("malformed"));
        // Once the probe with its sid commits, the good answer is reused again.
        assert_eq!(ask(false).await, Ok(()));
        assert_eq!(ask(false).await, Ok(()));
        // The call committing (Air's retry) ends it as well; another call's commit does not.
        cache.commit_failed("CAbad");
        cache.committed("CAother");
        assert_eq!(ask(false).await, Ok(()));
        cache.commit_failed("CAbad");
        cache.committed("CAbad");
        assert_eq!(ask(false).await, Ok(()));
        let bad = Some("CAbad".to_string());
        assert_eq!(
            *seen.lock().unwrap(),
            [None, bad.clone(), bad.clone(), bad.clone(), bad]
        );
    }

    /// Every 503 the webhook answers tells the sender when to try again, including the one for
    /// a commit task that panicked (it had none).
    #[tokio::test]
    async fn every_webhook_503_says_when_to_retry() {
        let panicked = tokio::spawn(async {
            panic!("the commit task failed");
        })
        .await
        .map(|()| unreachable!());
        let refused = Ok((
            Err(crate::store::StoreError::Closed),
            "CA1".to_string(),
            vec![],
        ));
        for joined in [panicked, refused] {
            let r = answer_commit(joined, "POST_CALL_DATA");
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                r.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
                Some(&b"5"[..])
            );
            let once = Arc::new(std::sync::Mutex::new(Some(r)));
            let reply = warp::any().map(move || once.lock().unwrap().take().unwrap());
            let body: serde_json::Value =
                serde_json::from_slice(warp::test::request().reply(&reply).await.body()).unwrap();
            assert_eq!(body["error"], "store_unavailable", "{body}");
            assert!(
                body["message"].as_str().unwrap().contains("retry"),
                "{body}"
            );
        }
    }
}
