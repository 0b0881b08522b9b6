//! The load benchmark's baseline (issue 6): the least a webhook receiver can do with the same
//! dependencies as callnotify — a warp server that checks the Bearer token, parses the JSON body
//! with serde_json and answers 200. It stores nothing.
//!
//! With a third argument, FILE, it is also the floor of durable ingest: every parsed body is
//! written to FILE and answered only after an `fdatasync` that covers it, with group commit (a
//! writer thread writes whatever arrived during the previous sync in one `write` + one
//! `fdatasync`). FILE is a ring of 64 MiB written out once at start, so a sync flushes data
//! only, never a growing file's size -- as SQLite's write-ahead log, which is reused after each
//! checkpoint, does. No index, no dedupe, no delivery state: what any durable receiver must at
//! least pay on this machine.
//!
//! With `BENCH_FORWARD=URL` in the environment, it is also the floor of delivery: after the
//! answer is decided, each accepted body is POSTed to URL (the benchmark's Slack stand-in) by a
//! spawned task on one shared `reqwest` client, as callnotify's delivery does, with nothing
//! stored, matched or rendered. It shows what carrying every call on to a local destination at
//! the rate calls arrive costs on this machine, whatever the store.
//!
//! Run: `cargo run --release --example bare_warp -- 127.0.0.1:PORT [TOKEN] [FILE]` (the token
//! defaults to `$BENCH_TOKEN`, then `bench-token`). Stops on Ctrl-C or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

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
    let journal = match args.next() {
        Some(path) => Some(journal(std::fs::File::create(path)?)?),
        None => None,
    };
    let forward = match std::env::var("BENCH_FORWARD") {
        Ok(url) => {
            callnotify::notify::install_tls_provider();
            Some((reqwest::Client::builder().build()?, url))
        }
        Err(_) => None,
    };

    let route = warp::post()
        .and(warp::path!("webhooks" / "air"))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::content_length_limit(1 << 20))
        .and(warp::body::bytes())
        .then(move |auth: Option<String>, body: Bytes| {
            let journal = journal.clone();
            let forward = forward.clone();
            async move {
                if auth.as_deref() != Some(expected) {
                    return warp::reply::with_status("unauthorized", StatusCode::UNAUTHORIZED);
                }
                if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                    return warp::reply::with_status("bad json", StatusCode::BAD_REQUEST);
                }
                if let Some(journal) = journal {
                    let (done, synced) = tokio::sync::oneshot::channel();
                    if journal.send((body.clone(), done)).is_err() || synced.await != Ok(true) {
                        return warp::reply::with_status(
                            "not stored",
                            StatusCode::SERVICE_UNAVAILABLE,
                        );
                    }
                }
                if let Some((client, url)) = forward {
                    tokio::spawn(async move {
                        if let Err(e) = client.post(&url).body(body).send().await {
                            eprintln!("forward: {e}");
                        }
                    });
                }
                warp::reply::with_status("ok", StatusCode::OK)
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

type Entry = (Bytes, tokio::sync::oneshot::Sender<bool>);

/// Size of the journal ring; a batch that would cross its end starts again at offset 0.
const RING: u64 = 64 << 20;

/// Writes FILE out to its full size and syncs it, so later syncs carry data only.
fn preallocate(file: &mut std::fs::File) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..RING >> 20 {
        file.write_all(&zeros)?;
    }
    file.sync_all()
}

/// Starts the group-commit writer for FILE; send it a body and wait for its `true`.
fn journal(mut file: std::fs::File) -> std::io::Result<mpsc::Sender<Entry>> {
    preallocate(&mut file)?;
    let (tx, rx) = mpsc::channel::<Entry>();
    std::thread::spawn(move || {
        let mut at = 0u64;
        let mut buf = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            buf.clear();
            for (body, _) in &batch {
                buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
                buf.extend_from_slice(body);
            }
            if at + buf.len() as u64 > RING {
                at = 0;
            }
            let ok = file
                .write_all_at(&buf, at)
                .and_then(|_| file.sync_data())
                .is_ok();
            at += buf.len() as u64;
            for (_, done) in batch {
                let _ = done.send(ok);
            }
        }
    });
    Ok(tx)
}
