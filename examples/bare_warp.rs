//! The load benchmark's baseline (issue 6): the least a webhook receiver can do with the same
//! dependencies as callnotify — a warp server that checks the Bearer token, parses the JSON body
//! with serde_json and answers 200. It stores nothing.
//!
//! Run: `cargo run --release --example bare_warp -- 127.0.0.1:PORT [TOKEN]` (the token defaults
//! to `$BENCH_TOKEN`, then `bench-token`). Stops on Ctrl-C or SIGTERM.

use std::net::SocketAddr;

use bytes::Bytes;
use warp::http::StatusCode;
use warp::Filter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()?;
    let token = args
        .next()
        .or_else(|| std::env::var("BENCH_TOKEN").ok())
        .unwrap_or_else(|| "bench-token".into());
    let expected: &'static str = Box::leak(format!("Bearer {token}").into_boxed_str());

    let route = warp::post()
        .and(warp::path!("webhooks" / "air"))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::content_length_limit(1 << 20))
        .and(warp::body::bytes())
        .map(move |auth: Option<String>, body: Bytes| {
            if auth.as_deref() != Some(expected) {
                return warp::reply::with_status("unauthorized", StatusCode::UNAUTHORIZED);
            }
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(_) => warp::reply::with_status("ok", StatusCode::OK),
                Err(_) => warp::reply::with_status("bad json", StatusCode::BAD_REQUEST),
            }
        });

    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("bare_warp listening on {}", listener.local_addr()?);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    warp::serve(route)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}
