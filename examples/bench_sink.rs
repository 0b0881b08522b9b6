//! A local stand-in for Slack's incoming webhooks, for the load benchmark (issue 6).
//!
//! `cargo run --release --example bench_sink -- 127.0.0.1:PORT [ok|hang SECONDS]`
//!
//! `ok` (the default) answers every POST at once with 200 `ok`, as Slack does; `hang` holds each
//! request for SECONDS (default 30) before answering, a Slack that has stopped responding.
//! `GET /count` answers the number of POSTs received so far. Stops on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use warp::Filter;

static RECEIVED: AtomicU64 = AtomicU64::new(0);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8091".into())
        .parse()?;
    let hang = match args.next().as_deref() {
        None | Some("ok") => None,
        Some("hang") => Some(Duration::from_secs(
            args.next().map(|s| s.parse()).transpose()?.unwrap_or(30),
        )),
        Some(other) => return Err(format!("unknown mode {other:?}; ok or hang").into()),
    };

    let post = warp::post()
        .and(warp::body::content_length_limit(1 << 20))
        .and(warp::body::bytes())
        .then(move |_body: Bytes| async move {
            RECEIVED.fetch_add(1, Ordering::Relaxed);
            if let Some(d) = hang {
                tokio::time::sleep(d).await;
            }
            "ok"
        });
    let count = warp::get()
        .and(warp::path("count"))
        .map(|| RECEIVED.load(Ordering::Relaxed).to_string());

    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("bench_sink listening on {}", listener.local_addr()?);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    warp::serve(post.or(count))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}
