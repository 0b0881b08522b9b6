//! SMTP throughput (issue 6): sends N emails one after another to a local SMTP server and prints
//! messages/s and ms/message.
//!
//! `cargo run --release --example smtp_bench -- 127.0.0.1:PORT N [MODE]`
//!
//! Modes:
//! - `callnotify` (default): through `callnotify::notify::email::{transport, send}`, exactly as
//!   the daemon sends (pooled, plain SMTP for the loopback server).
//! - `lettre-default`: lettre's `AsyncSmtpTransport::builder_dangerous(host).port(p).build()`, as
//!   commonly configured, with nothing of callnotify's.
//! - `lettre-nodelay`: lettre's `AsyncSmtpConnection` on a tokio `TcpStream` with `TCP_NODELAY`
//!   set, one connection reused: isolates the effect of Nagle's algorithm.
//! - `lettre-delay`: the same connection without `TCP_NODELAY`: the control for the above.
//!
//! Compare with `python3 bench/smtp_smtplib.py 127.0.0.1:PORT N` (smtplib, one connection).

use std::time::{Duration, Instant};

use lettre::message::Mailbox;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use callnotify::config::{SmtpConfig, SmtpTls};
use callnotify::notify::{email, Meta, Outcome};
use callnotify::render::EmailParts;

fn parts(i: usize) -> EmailParts {
    EmailParts {
        to: vec!["sales@example.com".into()],
        subject: format!("Call from Tyler #{i}"),
        text: Some(format!(
            "Tyler asked to book an appointment.\n\nDuration: 44s\nMessage {i}\n"
        )),
        html: Some(format!("<p>Tyler asked to book an appointment. #{i}</p>")),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8025".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let mode = args.next().unwrap_or_else(|| "callnotify".into());
    let (host, port) = addr.rsplit_once(':').ok_or("address is HOST:PORT")?;
    let port: u16 = port.parse()?;
    let from: Mailbox = "Call Bot <calls@example.com>".parse()?;
    let to: Vec<Mailbox> = vec!["sales@example.com".parse()?];

    let start = Instant::now();
    match mode.as_str() {
        "callnotify" => {
            let cfg = SmtpConfig {
                host: host.into(),
                port,
                tls: SmtpTls::None,
                username: None,
                password: None,
                timeout: Duration::from_secs(10),
            };
            let transport = email::transport(&cfg)?;
            for i in 0..n {
                let meta = Meta {
                    channel: "mail",
                    rule: "bench",
                    sid: "bench",
                    event: "post_call_data",
                    delivery_id: i as i64,
                };
                match email::send(&transport, &from, &parts(i), &meta).await {
                    Outcome::Delivered { .. } => {}
                    other => return Err(format!("message {i}: {other:?}").into()),
                }
            }
        }
        "lettre-default" => {
            let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                .port(port)
                .build();
            for i in 0..n {
                let m = email::build(&from, &to, &parts(i), None)?;
                transport.send(m).await?;
            }
        }
        "lettre-nodelay" | "lettre-delay" => {
            let stream = tokio::net::TcpStream::connect((host, port)).await?;
            stream.set_nodelay(mode == "lettre-nodelay")?;
            let mut conn =
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &ClientId::default())
                    .await?;
            for i in 0..n {
                let m = email::build(&from, &to, &parts(i), None)?;
                conn.send(m.envelope(), &m.formatted()).await?;
            }
            conn.quit().await?;
        }
        other => return Err(format!("unknown mode {other:?}").into()),
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{mode}: {n} messages in {secs:.3} s = {:.0} messages/s, {:.2} ms/message",
        n as f64 / secs,
        secs * 1000.0 / n as f64
    );
    Ok(())
}
