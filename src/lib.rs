//! callnotify turns answered Air phone calls into Slack messages and emails.
//!
//! One pipeline, one direction:
//!
//! ```text
//! receive -> authenticate -> parse -> match -> persist (dedupe) -> render -> deliver -> record
//! server.rs  server.rs      payload.rs rules.rs store.rs         render.rs  notify/    store.rs
//! ```
//!
//! [`server`] takes Air's webhook, checks the Bearer token and hands the body to [`payload`],
//! which turns Air's lenient wire format into a [`payload::Call`]. [`rules`] decides which
//! notifications the call owes; [`store`] commits the call and one delivery row per owed
//! notification in one transaction before the webhook is answered. [`worker`] claims due
//! deliveries, renders them with [`render`] and sends them through [`notify`] (Slack, email or
//! the log), then records the outcome: done, retry later, or dead (replayable).
//! [`config`] loads and validates the YAML file everything is driven by; [`app`] wires the
//! pieces together and runs them until shutdown; [`commands`] holds the one-shot CLI commands
//! (`check`, `render`, `deliveries`, `send-test`).

pub mod app;
pub mod clock;
pub mod commands;
pub mod config;
pub mod metrics;
pub mod notify;
pub mod payload;
pub mod quiet;
pub mod render;
pub mod rules;
pub mod server;
pub mod store;
pub mod systemd;
pub mod worker;
