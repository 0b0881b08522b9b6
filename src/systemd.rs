//! Tells systemd what the daemon is doing, for a `Type=notify` unit (`contrib/callnotify.service`):
//! `READY=1` once the listeners are bound and the store is open (so `systemctl start` returns
//! when calls can be taken, and fails if the daemon dies before that), `RELOADING=1` then
//! `READY=1` around each reload, `STOPPING=1` when shutdown starts. Without `NOTIFY_SOCKET` in
//! the environment (not started by systemd with `Type=notify`) each of these does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not tell systemd the daemon's state (NOTIFY_SOCKET)");
    }
}

/// The daemon takes calls; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown has started.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// A reload in progress: `RELOADING=1` when made, `READY=1` when dropped, whether the new config
/// was taken or refused (a refused reload leaves the daemon running its previous config).
/// `MONOTONIC_USEC` goes with `RELOADING=1`, as `Type=notify-reload` requires.
#[must_use = "the reload is over when this is dropped"]
pub struct Reloading(());

impl Reloading {
    pub fn start() -> Reloading {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
        Reloading(())
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        send(&[NotifyState::Ready]);
    }
}
