//! Email over SMTP: lettre speaks the protocol (EHLO, STARTTLS, AUTH, each command) on
//! connections this module opens and pools, with `TCP_NODELAY` set; the mail transaction
//! (MAIL, RCPT, DATA) is run here, so one refused recipient does not cost the others the
//! message (see `transaction`).
//!
//! Why not lettre's `AsyncSmtpTransport`: it sends the message body and the closing
//! `\r\n.\r\n` as two writes, then waits for the reply, on a socket without `TCP_NODELAY`.
//! Nagle's algorithm holds the small second write until the first is acknowledged, and the
//! server delays that acknowledgement (40 ms on Linux) because it has nothing to answer before
//! the terminator: about 44 ms per message, on any link, reused connection or not (about 22
//! messages/s). lettre's transport takes no connector and does not set the option, so the
//! connections are made here (`examples/smtp_bench.rs` measures both).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::message::header::{
    self, ContentTransferEncoding, ContentType, HeaderName, HeaderValue, Headers,
};
use lettre::message::{Body, Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use secrecy::ExposeSecret;

use super::{error_chain, excerpt, Meta, Outcome};
use crate::config::{SmtpConfig, SmtpTls};
use crate::render::EmailParts;

/// Idle connections kept per channel, and how long one may stay idle before it is dropped.
const MAX_IDLE: usize = 8;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How far a new connection got: for what to say when its time runs out, and to tell the
/// greeting from later answers.
#[derive(Default)]
struct Progress {
    /// The connection is made (and TLS is up, with `tls: tls`): the server's greeting is due.
    connected: AtomicBool,
    /// We wrote to the connection (EHLO): the greeting came.
    spoke: Arc<AtomicBool>,
}

impl Progress {
    fn greeting_awaited(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && !self.spoke.load(Ordering::Relaxed)
    }
}

/// One channel's SMTP client: its settings and a pool of idle connections.
pub struct Transport {
    smtp: SmtpConfig,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("host", &self.smtp.host)
            .field("port", &self.smtp.port)
            .field("tls", &self.smtp.tls)
            .finish_non_exhaustive()
    }
}

/// Why a send failed: what the server or the connection said, or no answer in time.
#[derive(Debug)]
pub enum SendError {
    Smtp(lettre::transport::smtp::Error),
    /// The TCP connection could not be made.
    Connect(std::io::Error),
    Timeout(&'static str),
    /// The server cannot take this message as it is (a capability it lacks).
    Unsupported(&'static str),
    /// The message could not be built (see [`build`]).
    Build(String),
    /// A recipient was answered 552, which RFC 5321 (4.5.3.1.10) has a client take as
    /// temporary ("too many recipients" from older servers) although it is a 5xx reply.
    RecipientsLater(lettre::transport::smtp::Error),
    /// The message's text went out but no answer to its end came (no reply in time, or the
    /// connection was lost): the server may have taken it.
    Unconfirmed(String),
    /// The login was refused (a 5xx such as 535, 534 or 538): the channel's credentials, not
    /// the message. See [`AUTH_PAUSE`].
    Auth(lettre::transport::smtp::Error),
    /// The channel has a username and password but the server offers no way to log in that we
    /// speak (no AUTH PLAIN or LOGIN after EHLO): the channel's settings, not the message, as
    /// for [`SendError::Auth`]. Whether the connection is encrypted, since servers commonly
    /// offer AUTH only over TLS.
    NoLogin {
        encrypted: bool,
    },
    /// `tls: starttls` and the server does not offer STARTTLS, or refuses it (the error, then):
    /// nothing is sent unencrypted. About the server or the channel's settings, not the
    /// message.
    NoStartTls(Option<lettre::transport::smtp::Error>),
    /// `tls: tls` and the server answered in plain text (its greeting, most likely): it wants
    /// STARTTLS or no TLS, not TLS from the start.
    NotTls(lettre::transport::smtp::Error),
    /// The connection was made but the server sent no greeting within `waited`.
    NoGreeting {
        tls: SmtpTls,
        waited: Duration,
    },
    /// The server's greeting was a 5xx (`554 no service`): refused before we said anything,
    /// so about the server's state (maintenance, its connection limit), not about the message.
    Greeting(lettre::transport::smtp::Error),
}

/// How long a channel's SMTP server is left alone after it refused our login. A wrong or
/// expired password is the operator's to fix, not the message's: the owed emails wait and go
/// out once it is fixed and reloaded (up to `give_up_after`), as Postfix defers mail on a
/// failed login, instead of all going dead. The pause holds every email with that login to that
/// server, so a backlog does not try to log in once per message (which can lock the account);
/// other channels' logins to the same server are not held.
pub const AUTH_PAUSE: Duration = Duration::from_secs(60);

/// A message the server took: its answer, and each recipient it refused for good or could not
/// be sent (a note per recipient, naming it).
#[derive(Debug)]
pub struct Sent {
    pub response: Response,
    pub refused: Vec<String>,
}

/// One mail transaction: MAIL, RCPT per recipient, DATA, as lettre's `send` does, except that a
/// recipient the server refuses for good (5xx, e.g. "user unknown") is noted and skipped while
/// any other is accepted: one stale address must not cost everybody else the message. A
/// transient refusal (4xx, and 552: see [`SendError::RecipientsLater`]) fails the whole message
/// before anything is sent, so it is retried for all. On any error the caller drops the
/// connection, mid-transaction as it may be.
///
/// When the server does not offer SMTPUTF8, an address whose domain alone is not ASCII goes
/// in the domain's ASCII form (see [`ascii_domain`]), and a recipient whose local part is not
/// ASCII is skipped and noted the same way, and the message is built without it: its address in the To header
/// would make the message one that only an SMTPUTF8 server may take (RFC 6531, 6532), and one
/// that a server without 8BITMIME could not take at all.
///
/// `text_sent` is set when the message's text starts going out: from then on, a missing answer
/// leaves open whether the server took it.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    from: &Mailbox,
    to: &[Mailbox],
    parts: &EmailParts,
    id: Option<String>,
    text_sent: &AtomicBool,
) -> Result<Sent, SendError> {
    let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
    let utf8 = conn.server_info().supports_feature(Extension::SmtpUtfEight);
    let mut refused = Vec::new();
    let from = &if utf8 {
        from.clone()
    } else {
        ascii_domain(from)
    };
    let to: Vec<Mailbox> = if utf8 {
        to.to_vec()
    } else {
        let to: Vec<Mailbox> = to.iter().map(ascii_domain).collect();
        if !ascii(&from.email) {
            return Err(SendError::Unsupported(
                "the sender address is not ASCII and the server does not offer SMTPUTF8",
            ));
        }
        let (to, skipped): (Vec<Mailbox>, Vec<Mailbox>) =
            to.iter().cloned().partition(|m| ascii(&m.email));
        if to.is_empty() {
            return Err(SendError::Unsupported(
                "no recipient address is ASCII and the server does not offer SMTPUTF8",
            ));
        }
        refused.extend(skipped.iter().map(|m| {
            format!(
                "{} skipped: the address is not ASCII and the server does not offer SMTPUTF8",
                m.email
            )
        }));
        to
    };
    let message = build(from, &to, parts, id).map_err(SendError::Build)?;
    let (envelope, email) = (message.envelope(), message.formatted());
    let mut options = Vec::new();
    if !envelope.from().into_iter().chain(envelope.to()).all(ascii) {
        options.push(MailParameter::SmtpUtfEight);
    }
    if !email.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            return Err(SendError::Unsupported(
                "the message is not ASCII and the server does not offer 8BITMIME",
            ));
        }
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), options))
        .await
        .map_err(SendError::Smtp)?;
    let (skipped, mut last_refusal) = (refused.len(), None);
    for to in envelope.to() {
        match conn.command(Rcpt::new(to.clone(), vec![])).await {
            Ok(_) => {}
            Err(e) if e.status().map(u16::from) == Some(552) => {
                return Err(SendError::RecipientsLater(e))
            }
            Err(e) if e.is_permanent() => {
                refused.push(format!("{to} refused: {}", error_chain(&e)));
                last_refusal = Some(e);
            }
            Err(e) => return Err(SendError::Smtp(e)),
        }
    }
    if refused.len() - skipped == envelope.to().len() {
        if let Some(e) = last_refusal {
            return Err(SendError::Smtp(e));
        }
    }
    conn.command(Data).await.map_err(SendError::Smtp)?;
    text_sent.store(true, Ordering::Relaxed);
    let response = conn.message(&email).await.map_err(|e| {
        if e.is_transient() || e.is_permanent() {
            SendError::Smtp(e)
        } else {
            SendError::Unconfirmed(format!(
                "no answer to the end of the message: {}",
                error_chain(&e)
            ))
        }
    })?;
    Ok(Sent { response, refused })
}

/// `m` with its domain in ASCII (IDNA: `bücher.example` is `xn--bcher-kva.example`) when its
/// local part is ASCII: the same address, which a server without SMTPUTF8 can take. Anything
/// else is left as it is.
fn ascii_domain(m: &Mailbox) -> Mailbox {
    let (user, domain) = (m.email.user(), m.email.domain());
    if domain.is_ascii() || !user.is_ascii() {
        return m.clone();
    }
    idna::domain_to_ascii(domain)
        .ok()
        .and_then(|d| lettre::Address::new(user, d).ok())
        .map_or_else(|| m.clone(), |email| Mailbox::new(m.name.clone(), email))
}

/// Builds the pooled transport for one channel.
pub fn transport(s: &SmtpConfig) -> Result<Transport, String> {
    let tls = match s.tls {
        SmtpTls::None => None,
        SmtpTls::Starttls | SmtpTls::Tls => Some(
            TlsParameters::new(s.host.clone())
                .map_err(|e| format!("TLS setup for {}: {e}", s.host))?,
        ),
    };
    let credentials = match (&s.username, &s.password) {
        (Some(user), Some(pass)) => Some(Credentials::new(
            user.clone(),
            pass.expose_secret().to_string(),
        )),
        _ => None,
    };
    Ok(Transport {
        smtp: s.clone(),
        tls,
        credentials,
        hello: ClientId::default(),
        idle: Mutex::new(Vec::new()),
    })
}

impl Transport {
    /// Sends one message (see [`build`]; `id` its Message-ID, None for a random one) on an idle
    /// connection (checked with NOOP) or a new one. A connection goes back to the pool only
    /// after a clean send. On success, also the recipients the server refused for good or could
    /// not be sent (see `transaction`).
    pub async fn send(
        &self,
        from: &Mailbox,
        to: &[Mailbox],
        parts: &EmailParts,
        id: Option<String>,
    ) -> Result<Sent, SendError> {
        let limit = self.smtp.timeout;
        let mut conn = match self.reuse().await {
            Some(c) => c,
            None => {
                let deadline = tokio::time::Instant::now() + limit;
                let progress = Progress::default();
                tokio::time::timeout_at(deadline, self.connect(deadline, &progress))
                    .await
                    .map_err(|_| {
                        if progress.greeting_awaited() {
                            SendError::NoGreeting {
                                tls: self.smtp.tls,
                                waited: limit,
                            }
                        } else {
                            SendError::Timeout("connecting")
                        }
                    })??
            }
        };
        let text_sent = AtomicBool::new(false);
        let sent = tokio::time::timeout(
            limit,
            transaction(&mut conn, from, to, parts, id, &text_sent),
        )
        .await;
        match sent {
            Ok(Ok(sent)) => {
                if !conn.has_broken() {
                    self.put_back(conn);
                }
                Ok(sent)
            }
            Ok(Err(e)) => Err(e),
            Err(_) if text_sent.load(Ordering::Relaxed) => Err(SendError::Unconfirmed(format!(
                "no answer within {} to the end of the message",
                humantime::format_duration(limit)
            ))),
            Err(_) => Err(SendError::Timeout("sending")),
        }
    }

    /// The most recently used idle connection, if it is young enough and answers NOOP in time.
    /// Otherwise every idle connection is dropped: the others have been idle longer, and a
    /// server or network path that failed one has likely failed them all. They are closed
    /// without QUIT, whose answer could be waited for without end on a silent connection.
    async fn reuse(&self) -> Option<AsyncSmtpConnection> {
        let (mut conn, since) = self.idle.lock().ok()?.pop()?;
        if since.elapsed() < IDLE_TIMEOUT
            && tokio::time::timeout(self.smtp.timeout, conn.test_connected())
                .await
                .unwrap_or(false)
        {
            return Some(conn);
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        None
    }

    fn put_back(&self, conn: AsyncSmtpConnection) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push((conn, Instant::now()));
            }
        }
    }

    /// TCP with `TCP_NODELAY` to the first of the host's addresses that answers (see
    /// [`connect_any`]), then implicit TLS or STARTTLS as configured, then AUTH (a refused login
    /// is [`SendError::Auth`]). All of it by `deadline`.
    async fn connect(
        &self,
        deadline: tokio::time::Instant,
        progress: &Progress,
    ) -> Result<AsyncSmtpConnection, SendError> {
        let (host, port) = (self.smtp.host.as_str(), self.smtp.port);
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(SendError::Connect)?
            .collect();
        let tcp = connect_any(&addrs, deadline)
            .await
            .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        let mut conn = self.handshake(tcp, progress).await?;
        if let Some(credentials) = &self.credentials {
            let offers = |m| conn.server_info().supports_auth_mechanism(m);
            if !offers(Mechanism::Plain) && !offers(Mechanism::Login) {
                return Err(SendError::NoLogin {
                    encrypted: self.smtp.tls != SmtpTls::None,
                });
            }
            // Refused (5xx: 535, 534, 538) is the login's fault; a 4xx (454 temporary failure)
            // or a lost connection is not, and retries as usual.
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await
                .map_err(|e| {
                    if e.is_permanent() || e.is_client() {
                        SendError::Auth(e)
                    } else {
                        SendError::Smtp(e)
                    }
                })?;
        }
        Ok(conn)
    }

    /// Implicit TLS if configured, the greeting and EHLO, then STARTTLS if configured. A 5xx
    /// greeting is [`SendError::Greeting`]: the stream is watched so that a 5xx that came
    /// before we wrote anything (lettre reads the greeting and sends EHLO in one call) is told
    /// apart from a 5xx to EHLO.
    async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
        progress: &Progress,
    ) -> Result<AsyncSmtpConnection, SendError> {
        let stream: Box<dyn AsyncTokioStream> = match (&self.tls, self.smtp.tls) {
            (Some(params), SmtpTls::Tls) => {
                #[allow(deprecated)]
                let mut s =
                    lettre::transport::smtp::client::AsyncNetworkStream::use_existing_tokio1(
                        Box::new(tcp),
                    );
                s.upgrade_tls(params.clone()).await.map_err(|e| {
                    if answered_in_plain_text(&e) {
                        SendError::NotTls(e)
                    } else {
                        SendError::Smtp(e)
                    }
                })?;
                Box::new(compat::Tokio(s))
            }
            _ => Box::new(tcp),
        };
        let stream = Box::new(compat::Watched {
            inner: stream,
            wrote: progress.spoke.clone(),
        });
        progress.connected.store(true, Ordering::Relaxed);
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
            .await
            .map_err(|e| {
                if e.is_permanent() && progress.greeting_awaited() {
                    SendError::Greeting(e)
                } else {
                    SendError::Smtp(e)
                }
            })?;
        if let (Some(params), SmtpTls::Starttls) = (&self.tls, self.smtp.tls) {
            if !conn.server_info().supports_feature(Extension::StartTls) {
                return Err(SendError::NoStartTls(None));
            }
            conn.starttls(params.clone(), &self.hello)
                .await
                .map_err(|e| {
                    // A refusal to the command itself; a failed handshake stays a TLS error.
                    if e.is_permanent() {
                        SendError::NoStartTls(Some(e))
                    } else {
                        SendError::Smtp(e)
                    }
                })?;
        }
        Ok(conn)
    }
}

/// A TCP connection to the first of `addrs` that answers, in order, by `deadline`. Each address
/// gets an equal share of the time left when its turn comes (as hyper shares Slack's connect
/// timeout): one that does not answer (an IPv6 address that is not routed, a host that drops
/// the packets) costs its share and the next is tried, instead of the whole attempt's time
/// going to it. One that fails at once (refused) leaves its share to those after it, and a host
/// with one address gets all the time. The error names each address and what it met.
pub async fn connect_any(
    addrs: &[std::net::SocketAddr],
    deadline: tokio::time::Instant,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut failed = Vec::new();
    let mut kind = std::io::ErrorKind::NotFound;
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        match tokio::time::timeout(share, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => {
                kind = e.kind();
                failed.push(format!("{addr}: {e}"));
            }
            Err(_) => {
                kind = std::io::ErrorKind::TimedOut;
                failed.push(format!(
                    "{addr}: no answer within {}",
                    humantime::format_duration(Duration::from_millis(
                        u64::try_from(share.as_millis()).unwrap_or(u64::MAX)
                    ))
                ));
            }
        }
    }
    if failed.is_empty() {
        failed.push("the host name resolves to no address".into());
    }
    Err(std::io::Error::new(kind, failed.join("; ")))
}

/// Whether a TLS handshake failed because what came back was not TLS at all (rustls:
/// `InvalidContentType`): a server that greets in plain text.
fn answered_in_plain_text(e: &lettre::transport::smtp::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        let tls = s.downcast_ref::<rustls::Error>().or_else(|| {
            s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(
            tls,
            Some(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))
        ) {
            return true;
        }
        source = s.source();
    }
    false
}

/// lettre's TLS stream speaks the `futures` I/O traits; its connection wants tokio's.
#[allow(deprecated)] // AsyncNetworkStream: public, but lettre calls it not meant to be
mod compat {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use futures_util::io::{AsyncRead, AsyncWrite};
    use lettre::transport::smtp::client::{AsyncNetworkStream, AsyncTokioStream};
    use tokio::io::ReadBuf;

    #[derive(Debug)]
    pub struct Tokio(pub AsyncNetworkStream);

    impl tokio::io::AsyncRead for Tokio {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let unfilled = buf.initialize_unfilled();
            match Pin::new(&mut self.0).poll_read(cx, unfilled) {
                Poll::Ready(Ok(n)) => {
                    buf.advance(n);
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    impl tokio::io::AsyncWrite for Tokio {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_close(cx)
        }
    }

    impl AsyncTokioStream for Tokio {
        fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
            self.0.peer_addr()
        }
    }

    /// A connection that notes when we first write to it: an answer read before that is the
    /// server's greeting.
    #[derive(Debug)]
    pub struct Watched {
        pub inner: Box<dyn AsyncTokioStream>,
        pub wrote: Arc<AtomicBool>,
    }

    impl tokio::io::AsyncRead for Watched {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Watched {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.wrote.store(true, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    impl AsyncTokioStream for Watched {
        fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
            self.inner.peer_addr()
        }
    }
}

/// Validates recipients: the good ones, and a note about each that is not an address.
/// Beyond this many recipients a message's further addresses are skipped and noted, so a lead
/// field rendered into `to` cannot turn one notification into a mailing to a list it carries.
pub const MAX_RECIPIENTS: usize = 20;

/// The longest display name a recipient keeps, in characters. lettre writes an ASCII name
/// without spaces as one header line, and a line over 998 bytes makes the server refuse the
/// whole message: a lead name used as a display name must not be able to do that.
pub const MAX_NAME_CHARS: usize = 100;

/// `m` with its display name cut to [`MAX_NAME_CHARS`] (ending in "…").
fn short_name(mut m: Mailbox) -> Mailbox {
    if let Some(name) = &m.name {
        if name.chars().count() > MAX_NAME_CHARS {
            let kept: String = name.chars().take(MAX_NAME_CHARS - 1).collect();
            m.name = Some(format!("{kept}…"));
        }
    }
    m
}

pub fn recipients(to: &[String]) -> (Vec<Mailbox>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut over = 0;
    for r in to {
        if good.len() == MAX_RECIPIENTS {
            over += 1;
            continue;
        }
        if r.chars().any(char::is_control) {
            bad.push(format!(
                "{:?} is not an address (control characters)",
                excerpt(r, 80)
            ));
            continue;
        }
        // Only the renderer splits lists (see `render::RecipientEntry`); a comma still here
        // came from a value inside an address, which must not add a recipient.
        if r.contains(',') {
            bad.push(format!(
                "{:?} is not one address (it holds a comma)",
                excerpt(r, 80)
            ));
            continue;
        }
        match r.parse::<Mailbox>() {
            Ok(m) => good.push(short_name(m)),
            Err(e) => bad.push(format!("{:?} is not an address ({e})", excerpt(r, 80))),
        }
    }
    if over > 0 {
        bad.push(format!(
            "{over} more recipients (at most {MAX_RECIPIENTS} per message)"
        ));
    }
    (good, bad)
}

/// Control characters (CR, LF, NUL, ...) become spaces: a header value stays one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A mailbox whose display name is one line. lettre panics while formatting a display name
/// that holds CR or LF, so names are cleaned here whatever their source.
fn one_line_name(m: &Mailbox) -> Mailbox {
    Mailbox::new(m.name.as_deref().map(one_line), m.email.clone())
}

/// Longest subject sent, in characters. lettre writes an ASCII subject as one unfolded line, and
/// SMTP servers refuse a line over 998 bytes ("500 Line too long") for good: a long lead name
/// must not make the message undeliverable.
pub const MAX_SUBJECT_CHARS: usize = 200;

/// The subject as it is sent: one line (see [`one_line`]), at most [`MAX_SUBJECT_CHARS`]
/// characters, the last of them "…" when it was cut.
pub fn subject_line(s: &str) -> String {
    let line = one_line(s);
    let line = line.trim();
    if line.chars().count() < MAX_SUBJECT_CHARS {
        return line.to_string();
    }
    // Cut between characters a reader sees: not inside a ZWJ emoji, a flag or an accent.
    format!(
        "{}…",
        crate::render::char_prefix(line, MAX_SUBJECT_CHARS - 1)
    )
}

/// A text or HTML part's body, encoded as lettre chooses, except that text lettre would send
/// as 7bit while it holds a NUL or a CR that does not start a CRLF goes quoted-printable: SMTP
/// allows CR only in CRLF and 7bit allows no NUL (RFC 5321 2.3.8, RFC 2045 2.7), and servers
/// that take a bare CR as a line end would read "<CR>.<CR><LF>" in a transcript as the end of
/// the message and the call data after it as SMTP commands (a second, forged message).
fn body(text: &str) -> Body {
    let body = Body::new(text.to_string());
    let raw: &[u8] = body.as_ref();
    let bare_cr = raw
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\r' && raw.get(i + 1) != Some(&b'\n'));
    if body.encoding() == ContentTransferEncoding::SevenBit && (bare_cr || raw.contains(&0)) {
        return Body::new_with_encoding(text.to_string(), ContentTransferEncoding::QuotedPrintable)
            .unwrap_or(body);
    }
    body
}

/// The To header with one recipient per line. lettre writes a list of mailboxes as one line
/// however long it gets, and servers refuse a header line over 998 bytes for good ("500 Line
/// too long"): twenty recipients of 50 characters are enough. Each mailbox is encoded by lettre
/// as it would encode a To header of that mailbox alone; only the folding between them is ours.
fn to_header(to: &[Mailbox]) -> HeaderValue {
    let encoded: Vec<String> = to
        .iter()
        .map(|m| {
            let mut one = Headers::new();
            one.set(header::To::from(Mailboxes::from(m.clone())));
            let line = one.to_string();
            let value = line.strip_prefix("To: ").unwrap_or(&line);
            value.strip_suffix("\r\n").unwrap_or(value).to_string()
        })
        .collect();
    let raw = to.iter().cloned().collect::<Mailboxes>().to_string();
    HeaderValue::dangerous_new_pre_encoded(
        HeaderName::new_from_ascii_str("To"),
        raw,
        encoded.join(",\r\n "),
    )
}

/// Builds the MIME message, with a Date and a Message-ID (`id`, or a new random one): text,
/// HTML, or both as multipart/alternative. Header values are encoded by lettre (RFC 2047 for
/// non-ASCII); the subject is made one line and cut to length here.
pub fn build(
    from: &Mailbox,
    to: &[Mailbox],
    parts: &EmailParts,
    id: Option<String>,
) -> Result<lettre::Message, String> {
    // lettre adds a Date but no Message-ID, which RFC 5322 3.6.4 says every message should
    // have: some servers refuse mail without one (Gmail: "550 5.7.1 Messages missing a valid
    // Message-ID header are not accepted") and spam filters score its absence.
    let mut b = lettre::Message::builder()
        .from(one_line_name(from))
        .message_id(id);
    if !to.is_empty() {
        let to: Vec<Mailbox> = to.iter().map(one_line_name).collect();
        b = b.raw_header(to_header(&to));
    }
    // lettre leaves an ASCII subject as it is, so a value holding an RFC 2047 encoded word
    // (`=?utf-8?b?...?=`) would be decoded by the reader into other text. A zero-width space
    // after the `=` makes the subject non-ASCII: lettre then encodes all of it, and the reader
    // sees the characters that were typed.
    let subject = subject_line(&parts.subject).replace("=?", "=\u{200b}?");
    let b = b.subject(subject);
    let built = match (&parts.text, &parts.html) {
        (Some(text), Some(html)) => {
            b.multipart(MultiPart::alternative_plain_html(body(text), body(html)))
        }
        (Some(text), None) => b.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body(body(text)),
        ),
        (None, Some(html)) => b.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_HTML)
                .body(body(html)),
        ),
        (None, None) => return Err("the email has neither a text nor an HTML body".into()),
    };
    built.map_err(|e| format!("cannot build the email: {e}"))
}

/// The Message-ID of a delivery's email: the same on every attempt, so that a copy a retry
/// may cause (an answer to the end of the message that never came) carries the first one's ID
/// and mail clients and archives can tell it is the same message. From the delivery's id and
/// the call's sid (only its letters, digits, `.`, `_` and `-`), at the sender's domain.
/// `send-test` (no delivery) gets a new random one each time.
pub fn message_id(from: &Mailbox, meta: &Meta<'_>) -> Option<String> {
    if meta.delivery_id <= 0 {
        return None;
    }
    let sid: String = meta
        .sid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    Some(format!(
        "<callnotify.{}.{}@{}>",
        meta.delivery_id,
        if sid.is_empty() { "call" } else { &sid },
        // A header value that is ASCII whatever the server offers.
        ascii_domain(from).email.domain()
    ))
}

pub async fn send(
    transport: &Transport,
    from: &Mailbox,
    parts: &EmailParts,
    meta: &Meta<'_>,
) -> Outcome {
    let (to, bad) = recipients(&parts.to);
    if to.is_empty() {
        return Outcome::Permanent {
            error: if bad.is_empty() {
                "no recipients".into()
            } else {
                format!("no valid recipient: {}", bad.join("; "))
            },
        };
    }
    match transport
        .send(from, &to, parts, message_id(from, meta))
        .await
    {
        Ok(Sent { response, refused }) => {
            let mut detail = format!("SMTP {}", response.code());
            if !bad.is_empty() {
                detail.push_str(&format!("; skipped {}", bad.join("; ")));
            }
            if !refused.is_empty() {
                detail.push_str(&format!("; {}", refused.join("; ")));
            }
            Outcome::Delivered {
                detail: Some(excerpt(&detail, 1000)),
            }
        }
        Err(SendError::Smtp(e)) => classify(&e),
        Err(SendError::RecipientsLater(e)) => Outcome::Retry {
            after: None,
            error: excerpt(
                &format!(
                    "SMTP: {} (a 552 to a recipient is temporary: RFC 5321 4.5.3.1.10)",
                    error_chain(&e)
                ),
                400,
            ),
        },
        Err(SendError::Unsupported(why)) => Outcome::Permanent {
            error: format!("SMTP: {why}"),
        },
        Err(SendError::Build(error)) => Outcome::Permanent { error },
        Err(SendError::Auth(e)) => Outcome::Retry {
            after: Some(AUTH_PAUSE),
            error: excerpt(
                &format!(
                    "SMTP: login refused: {}; check the channel's username and password \
                     (owed emails wait and go out once they are fixed and reloaded)",
                    error_chain(&e)
                ),
                400,
            ),
        },
        Err(SendError::NoLogin { encrypted }) => Outcome::Retry {
            after: Some(AUTH_PAUSE),
            error: format!(
                "SMTP: the server offers no login (no AUTH PLAIN or LOGIN in its answer to \
                 EHLO) though the channel has a username and password; {} (owed emails wait \
                 and go out once it is fixed and reloaded)",
                if encrypted {
                    "remove them if this server takes mail without a login"
                } else {
                    "servers often offer it only over TLS, and this channel has `tls: none`: \
                     use `tls: starttls` or `tls: tls`, or remove them if this server takes \
                     mail without a login"
                }
            ),
        },
        Err(SendError::NoGreeting { tls, waited }) => Outcome::Retry {
            after: None,
            error: format!(
                "SMTP: connected, but the server sent no greeting within {}{}",
                humantime::format_duration(waited),
                if tls == SmtpTls::Tls {
                    ""
                } else {
                    "; a server that speaks TLS from the start (port 465) waits like this for \
                     `tls: tls`"
                }
            ),
        },
        Err(SendError::NotTls(e)) => Outcome::Retry {
            after: None,
            error: excerpt(
                &format!(
                    "SMTP: the server answered in plain text, not TLS ({}); `tls: tls` is for a \
                     server that speaks TLS from the start (port 465): on port 587 or 25 use \
                     `tls: starttls`",
                    error_chain(&e)
                ),
                400,
            ),
        },
        // As Postfix defers mail when TLS is required and not offered: the emails wait for the
        // server or the setting to be fixed instead of going dead or out in the clear.
        Err(SendError::NoStartTls(refusal)) => Outcome::Retry {
            after: None,
            error: excerpt(
                &format!(
                    "SMTP: the server {} STARTTLS, which the channel requires (`tls: starttls`), \
                     so nothing was sent; use `tls: tls` if it speaks TLS from the start \
                     (port 465), or `tls: none` for a local relay that has no TLS",
                    match &refusal {
                        Some(e) => format!("refused ({})", error_chain(e)),
                        None => "does not offer".into(),
                    }
                ),
                400,
            ),
        },
        // As Postfix does (`smtp_skip_5xx_greeting`): a server that will not talk to anybody
        // now (maintenance, over its connection limit) is tried again later.
        Err(SendError::Greeting(e)) => Outcome::Retry {
            after: None,
            error: excerpt(
                &format!(
                    "SMTP: the server refused the connection in its greeting: {}; \
                     retried, as a 5xx greeting is about the server (maintenance, its \
                     connection limit), not the message",
                    error_chain(&e)
                ),
                400,
            ),
        },
        Err(SendError::Connect(e)) => Outcome::Retry {
            after: None,
            error: excerpt(&format!("SMTP: cannot connect: {e}"), 400),
        },
        Err(SendError::Timeout(what)) => Outcome::Retry {
            after: None,
            error: format!("SMTP: no answer in time while {what}"),
        },
        Err(SendError::Unconfirmed(what)) => Outcome::Retry {
            after: None,
            error: excerpt(
                &format!(
                    "SMTP: {what}; the server may have taken the message, \
                     so it may arrive twice"
                ),
                400,
            ),
        },
    }
}

/// SMTP's answer -> what to do: 5xx permanent, everything else (4xx, timeouts, connection and
/// TLS failures) transient.
pub fn classify(e: &lettre::transport::smtp::Error) -> Outcome {
    let error = excerpt(&format!("SMTP: {}", error_chain(e)), 400);
    if e.is_permanent() {
        Outcome::Permanent { error }
    } else {
        Outcome::Retry { after: None, error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SMTP peer on 127.0.0.1 that takes one message per connection and then reads
    /// without ever answering again (a server that hangs, or a path that drops packets).
    async fn goes_silent_after_one_message() -> std::net::SocketAddr {
        let (addr, _) = line_peer(true, |line| match line {
            "." => Answer::Say("250 queued".into()),
            l if l.starts_with("EHLO") => Answer::Say("250 test".into()),
            l if l.starts_with("MAIL") || l.starts_with("RCPT") => Answer::Say("250 ok".into()),
            "DATA" => Answer::Say("354 go on".into()),
            // NOOP, QUIT, anything after the message: no answer, ever.
            _ => Answer::Silent,
        })
        .await;
        addr
    }

    /// An SMTP peer on 127.0.0.1 that takes a message's text and then, at its end, either
    /// hangs up or never answers: it may have queued the message, the client cannot know.
    async fn never_answers_the_end_of_a_message(hang_up: bool) -> std::net::SocketAddr {
        let (addr, _) = line_peer(false, move |line| match line {
            "." if hang_up => Answer::HangUp,
            "." => Answer::Silent,
            "DATA" => Answer::Say("354 go on".into()),
            _ => Answer::Say("250 ok".into()),
        })
        .await;
        addr
    }

    #[tokio::test]
    async fn a_missing_answer_to_the_end_of_a_message_is_retried_as_possibly_delivered() {
        for hang_up in [false, true] {
            let addr = never_answers_the_end_of_a_message(hang_up).await;
            let t = plain_with(addr, Duration::from_millis(500), None);
            let from: Mailbox = "calls@example.com".parse().unwrap();
            let parts = EmailParts {
                to: vec!["a@example.com".into()],
                subject: "s".into(),
                text: Some("body".into()),
                html: None,
            };
            let meta = Meta {
                channel: "mail",
                rule: "r",
                sid: "CA1",
                event: "POST_CALL_DATA",
                delivery_id: 1,
            };
            match send(&t, &from, &parts, &meta).await {
                Outcome::Retry { error, .. } => {
                    assert!(
                        error.contains(
                            "the server may have taken the message, so it may arrive twice"
                        ),
                        "hang_up {hang_up}: {error}"
                    );
                    if !hang_up {
                        assert!(
                            error.starts_with(
                                "SMTP: no answer within 500ms to the end of the message;"
                            ),
                            "{error}"
                        );
                    }
                }
                other => panic!("hang_up {hang_up}: {other:?}"),
            }
        }
    }

    /// An SMTP peer on 127.0.0.1 that, like some servers in the field, takes a bare CR or LF as
    /// the end of a line, so that "<CR>.<CR><LF>" ends a message's text. It answers every
    /// command, and returns the sender of each message it took once the client hangs up.
    async fn lenient_about_line_ends(
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            sock.write_all(b"220 test ESMTP\r\n").await.unwrap();
            let (mut senders, mut from, mut in_data) = (Vec::new(), String::new(), false);
            let (mut line, mut prev_cr, mut buf) = (Vec::new(), false, [0u8; 4096]);
            loop {
                let n = sock.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return senders;
                }
                for &b in &buf[..n] {
                    let after_cr = std::mem::replace(&mut prev_cr, b == b'\r');
                    if b == b'\n' && after_cr {
                        continue;
                    }
                    if b != b'\r' && b != b'\n' {
                        line.push(b);
                        continue;
                    }
                    let l = String::from_utf8_lossy(&std::mem::take(&mut line)).into_owned();
                    let reply: &[u8] = if in_data {
                        if l != "." {
                            continue;
                        }
                        in_data = false;
                        senders.push(std::mem::take(&mut from));
                        b"250 queued\r\n"
                    } else if let Some(f) = l.strip_prefix("MAIL FROM:") {
                        from = f.to_string();
                        b"250 ok\r\n"
                    } else if l == "DATA" {
                        in_data = true;
                        b"354 go on\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    let _ = sock.write_all(reply).await;
                }
            }
        });
        (addr, server)
    }

    #[tokio::test]
    async fn a_bare_cr_in_call_data_cannot_end_the_message_and_smuggle_another() {
        let (addr, server) = lenient_about_line_ends().await;
        let t = plain(addr);
        let said = "Sure.\r.\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<a@example.com>\r\n\
                    DATA\r\nSubject: Wire the money\r\n\r\nNow.\r.\r\nNUL\0";
        let parts = EmailParts {
            to: vec![],
            subject: "s".into(),
            text: Some(format!("Transcript:\n{said}")),
            html: Some(format!("<pre>{said}</pre>")),
        };
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let to = ["a@example.com".parse().unwrap()];
        let message = build(&from, &to, &parts, None).unwrap();
        // RFC 5321 2.3.8: CR only as part of CRLF; RFC 2045 2.7: no NUL in 7bit text.
        let raw = message.formatted();
        assert!(!raw.contains(&0), "a NUL is sent");
        for (i, _) in raw.iter().enumerate().filter(|(_, &b)| b == b'\r') {
            assert_eq!(raw.get(i + 1), Some(&b'\n'), "a bare CR is sent");
        }
        let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
        assert!(parsed.body_text(0).unwrap().contains(said), "{parsed:?}");
        t.send(&from, &to, &parts, None).await.unwrap();
        drop(t);
        assert_eq!(server.await.unwrap(), ["<calls@example.com>"]);
    }

    /// An SMTP peer on 127.0.0.1 for one connection: EHLO offers `extensions`, RCPT TO is
    /// answered by `rcpt` (given the address), DATA with 354, AUTH refused with 535 (offer
    /// `AUTH PLAIN` to be asked), anything else with 250. Returns
    /// every line the client sent, the message's text included, once the client hangs up.
    async fn scripted(
        extensions: &'static [&'static str],
        rcpt: fn(&str) -> &'static str,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        line_peer(false, move |line| {
            Answer::Say(match line {
                "." => "250 queued".into(),
                "DATA" => "354 go on".into(),
                l if l.starts_with("EHLO") => {
                    let mut reply = String::new();
                    for e in extensions {
                        reply.push_str(&format!("250-{e}\r\n"));
                    }
                    reply + "250 test"
                }
                l if l.starts_with("RCPT TO:<") => {
                    let to = &l["RCPT TO:<".len()..];
                    rcpt(to.split('>').next().unwrap_or_default()).into()
                }
                l if l.starts_with("AUTH") => "535 5.7.8 Authentication credentials invalid".into(),
                _ => "250 ok".into(),
            })
        })
        .await
    }

    /// What a test's SMTP peer does with one command, or with the "." that ends a message.
    enum Answer {
        /// This reply (CRLF added).
        Say(String),
        /// Nothing, ever: the connection stays open.
        Silent,
        HangUp,
    }

    /// An SMTP peer on 127.0.0.1 that reads line by line: it greets, takes a message's text after
    /// DATA, and answers each command, and the "." that ends the text, with `answer`. It serves
    /// one connection, or every one (`all`). Returns every line the client sent, the message's
    /// text included, once the (one) client hangs up.
    async fn line_peer(
        all: bool,
        answer: impl Fn(&str) -> Answer + Clone + Send + 'static,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        async fn serve(
            sock: tokio::net::TcpStream,
            answer: impl Fn(&str) -> Answer,
        ) -> Vec<String> {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            let _ = w.write_all(b"220 test ESMTP\r\n").await;
            let (mut said, mut in_data) = (Vec::new(), false);
            while let Ok(Some(line)) = lines.next_line().await {
                said.push(line.clone());
                if in_data && line != "." {
                    continue;
                }
                in_data = !in_data && line == "DATA";
                match answer(&line) {
                    Answer::Say(reply) => {
                        let _ = w.write_all(format!("{reply}\r\n").as_bytes()).await;
                    }
                    Answer::Silent => std::future::pending::<()>().await,
                    Answer::HangUp => break,
                }
            }
            said
        }
        let server = tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                if !all {
                    return serve(sock, answer).await;
                }
                tokio::spawn(serve(sock, answer.clone()));
            }
        });
        (addr, server)
    }

    /// A transport to `addr` without TLS: no login, 10 s timeout.
    fn plain(addr: std::net::SocketAddr) -> Transport {
        plain_with(addr, Duration::from_secs(10), None)
    }

    /// A transport to `addr` without TLS, with this timeout and, if given, this login.
    fn plain_with(
        addr: std::net::SocketAddr,
        timeout: Duration,
        login: Option<(&str, &str)>,
    ) -> Transport {
        transport_to(addr, SmtpTls::None, timeout, login)
    }

    /// A transport to `addr` with this TLS setting, timeout and, if given, login.
    fn transport_to(
        addr: std::net::SocketAddr,
        tls: SmtpTls,
        timeout: Duration,
        login: Option<(&str, &str)>,
    ) -> Transport {
        transport(&SmtpConfig {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls,
            username: login.map(|(user, _)| user.to_string()),
            password: login.map(|(_, password)| password.to_string().into()),
            timeout,
        })
        .unwrap()
    }

    fn meta() -> Meta<'static> {
        Meta {
            channel: "mail",
            rule: "r",
            sid: "CA1",
            event: "POST_CALL_DATA",
            delivery_id: 1,
        }
    }

    fn parts_to(to: &[&str]) -> EmailParts {
        EmailParts {
            to: to.iter().map(|s| s.to_string()).collect(),
            subject: "s".into(),
            text: Some("body".into()),
            html: None,
        }
    }

    #[tokio::test]
    async fn a_552_to_a_recipient_retries_the_message_for_all_like_a_452() {
        // RFC 5321 4.5.3.1.10: older servers answer "too many recipients" with 552, which a
        // client must take as temporary.
        let (addr, server) = scripted(&[], |to| {
            if to.starts_with('b') {
                "552 5.5.3 Too many recipients"
            } else {
                "250 ok"
            }
        })
        .await;
        let t = plain(addr);
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let parts = parts_to(&["a@example.com", "b@example.com", "c@example.com"]);
        match send(&t, &from, &parts, &meta()).await {
            Outcome::Retry { error, .. } => {
                assert!(
                    error.contains("(552): 5.5.3 Too many recipients"),
                    "{error}"
                );
                assert!(error.contains("temporary"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        drop(t);
        let said = server.await.unwrap();
        assert!(!said.iter().any(|l| l == "DATA"), "{said:?}");
    }

    /// Sends one email with a login to a scripted server offering `extensions`, expecting the
    /// retry that pauses the login for [`AUTH_PAUSE`]: its error, and what the server heard.
    async fn paused_login(extensions: &'static [&'static str]) -> (String, Vec<String>) {
        let (addr, server) = scripted(extensions, |_| "250 ok").await;
        let t = plain_with(addr, Duration::from_secs(10), Some(("calls", "expired")));
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let outcome = send(&t, &from, &parts_to(&["a@example.com"]), &meta()).await;
        let Outcome::Retry {
            after: Some(after),
            error,
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!(after, AUTH_PAUSE);
        drop(t);
        (error, server.await.unwrap())
    }

    #[tokio::test]
    async fn a_refused_login_waits_for_fixed_credentials_instead_of_killing_the_email() {
        let (error, said) = paused_login(&["AUTH PLAIN LOGIN"]).await;
        assert!(
            error.contains("login refused") && error.contains("535"),
            "{error}"
        );
        assert!(
            !said.iter().any(|l| l.starts_with("MAIL")),
            "nothing is sent without a login: {said:?}"
        );
    }

    /// A username and password on a channel whose server offers no AUTH (a local relay, or a
    /// server that offers it only after STARTTLS, with `tls: none`) used to be reported as
    /// "login refused ... check the channel's username and password", which they were not.
    #[tokio::test]
    async fn a_server_that_offers_no_login_is_named_as_the_cause_not_the_password() {
        let (error, said) = paused_login(&["PIPELINING"]).await;
        assert!(
            error.contains("the server offers no login") && error.contains("`tls: none`"),
            "{error}"
        );
        assert!(!error.contains("login refused"), "{error}");
        assert!(
            !said
                .iter()
                .any(|l| l.starts_with("MAIL") || l.starts_with("AUTH")),
            "{said:?}"
        );
    }

    #[tokio::test]
    async fn a_login_that_fails_for_another_reason_than_the_credentials_is_an_ordinary_retry() {
        // A 4xx to AUTH (the server's password store is down; Office 365's "432 4.3.2
        // concurrent connection limit exceeded") or a connection lost during it says nothing
        // about the password: no "login refused", no pause of every email with that login.
        for hang_up in [false, true] {
            let what = if hang_up { "hang-up" } else { "454" };
            let (addr, _server) = line_peer(false, move |line| match line {
                l if l.starts_with("EHLO") => {
                    Answer::Say("250-test\r\n250 AUTH PLAIN LOGIN".into())
                }
                l if l.starts_with("AUTH") && hang_up => Answer::HangUp,
                l if l.starts_with("AUTH") => {
                    Answer::Say("454 4.7.0 Temporary authentication failure".into())
                }
                _ => Answer::Say("250 ok".into()),
            })
            .await;
            let t = plain_with(addr, Duration::from_secs(10), Some(("calls", "right")));
            let from: Mailbox = "calls@example.com".parse().unwrap();
            let outcome = send(&t, &from, &parts_to(&["a@example.com"]), &meta()).await;
            match &outcome {
                Outcome::Retry { after: None, error } => {
                    assert!(!error.contains("login refused"), "{what}: {error}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn every_attempt_of_a_delivery_goes_out_with_the_same_message_id() {
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let parts = parts_to(&["a@example.com"]);
        let mut ids = Vec::new();
        for delivery_id in [5, 5, 0, 0] {
            let (addr, server) = scripted(&["8BITMIME"], |_| "250 ok").await;
            let t = plain(addr);
            let meta = Meta {
                delivery_id,
                ..meta()
            };
            let outcome = send(&t, &from, &parts, &meta).await;
            assert!(matches!(outcome, Outcome::Delivered { .. }), "{outcome:?}");
            drop(t);
            let said = server.await.unwrap();
            let id = said
                .into_iter()
                .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
                .expect("a Message-ID went out");
            ids.push(id);
        }
        assert_eq!(ids[0], "Message-ID: <callnotify.5.CA1@example.com>");
        assert_eq!(ids[0], ids[1], "a retry is the same message");
        assert_ne!(ids[2], ids[3], "send-test's messages are each new");
    }

    #[tokio::test]
    async fn a_non_ascii_recipient_the_server_cannot_take_does_not_cost_the_others_the_email() {
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let parts = parts_to(&["a@example.com", "zoë@example.com", "b@example.com"]);
        let without_smtputf8: [&'static [&'static str]; 2] = [&[], &["8BITMIME"]];
        for extensions in without_smtputf8 {
            let (addr, server) = scripted(extensions, |_| "250 ok").await;
            let t = plain(addr);
            let outcome = send(&t, &from, &parts, &meta()).await;
            let Outcome::Delivered {
                detail: Some(detail),
            } = outcome
            else {
                panic!("{extensions:?}: {outcome:?}");
            };
            assert!(
                detail.contains("zoë@example.com skipped") && detail.contains("SMTPUTF8"),
                "{detail}"
            );
            drop(t);
            let said = server.await.unwrap();
            let rcpt: Vec<&String> = said.iter().filter(|l| l.starts_with("RCPT")).collect();
            assert_eq!(rcpt, ["RCPT TO:<a@example.com>", "RCPT TO:<b@example.com>"]);
            // Nor is it in the To header: what goes out is ASCII, as such a server needs.
            assert!(
                said.iter().all(|l| l.is_ascii()),
                "{extensions:?}: {said:?}"
            );
            assert!(said.iter().any(|l| l == "DATA"), "{said:?}");
        }

        // With SMTPUTF8 every recipient gets it.
        let (addr, server) = scripted(&["8BITMIME", "SMTPUTF8"], |_| "250 ok").await;
        let t = plain(addr);
        let outcome = send(&t, &from, &parts, &meta()).await;
        assert_eq!(
            outcome,
            Outcome::Delivered {
                detail: Some("SMTP 250".into())
            }
        );
        drop(t);
        let said = server.await.unwrap();
        assert_eq!(said.iter().filter(|l| l.starts_with("RCPT")).count(), 3);

        // No recipient left: dead, as before.
        let (addr, _server) = scripted(&["8BITMIME"], |_| "250 ok").await;
        let t = plain(addr);
        match send(&t, &from, &parts_to(&["zoë@example.com"]), &meta()).await {
            Outcome::Permanent { error } => assert!(error.contains("SMTPUTF8"), "{error}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_international_domain_goes_in_its_ascii_form_to_a_server_without_smtputf8() {
        // Only a local part needs SMTPUTF8: a domain has an ASCII form (IDNA, RFC 5891) that
        // every server takes. Such a recipient was skipped, and such a sender was refused.
        let from: Mailbox = "Anrufe <anrufe@bücher.example>".parse().unwrap();
        let parts = parts_to(&["a@example.com", "Vertrieb <vertrieb@bücher.example>"]);
        let without_smtputf8: [&'static [&'static str]; 2] = [&[], &["8BITMIME"]];
        for extensions in without_smtputf8 {
            let (addr, server) = scripted(extensions, |_| "250 ok").await;
            let t = plain(addr);
            let outcome = send(&t, &from, &parts, &meta()).await;
            assert_eq!(
                outcome,
                Outcome::Delivered {
                    detail: Some("SMTP 250".into())
                },
                "{extensions:?}"
            );
            drop(t);
            let said = server.await.unwrap();
            assert!(said.iter().all(|l| l.is_ascii()), "{said:?}");
            assert!(
                said.iter()
                    .any(|l| l == "MAIL FROM:<anrufe@xn--bcher-kva.example>"),
                "{said:?}"
            );
            let rcpt: Vec<&String> = said.iter().filter(|l| l.starts_with("RCPT")).collect();
            assert_eq!(
                rcpt,
                [
                    "RCPT TO:<a@example.com>",
                    "RCPT TO:<vertrieb@xn--bcher-kva.example>"
                ]
            );
            assert!(
                said.iter()
                    .any(|l| l == "Message-ID: <callnotify.1.CA1@xn--bcher-kva.example>"),
                "{said:?}"
            );
        }
    }

    fn message() -> lettre::Message {
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let to = vec!["a@example.com".parse().unwrap()];
        let parts = EmailParts {
            to: vec![],
            subject: "s".into(),
            text: Some("body".into()),
            html: None,
        };
        build(&from, &to, &parts, None).unwrap()
    }

    #[tokio::test]
    async fn a_pooled_connection_that_went_silent_costs_one_timeout_not_a_hang() {
        let addr = goes_silent_after_one_message().await;
        let t = plain_with(addr, Duration::from_millis(500), None);
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let to = ["a@example.com".parse().unwrap()];
        let parts = parts_to(&[]);
        t.send(&from, &to, &parts, None).await.unwrap();
        assert_eq!(t.idle.lock().unwrap().len(), 1);
        // The pooled connection never answers its NOOP: after one timeout the message goes
        // out on a new connection (it used to wait for ever on the QUIT that closed the old).
        let second =
            tokio::time::timeout(Duration::from_secs(10), t.send(&from, &to, &parts, None))
                .await
                .expect("the second send hung");
        assert!(second.is_ok(), "{second:?}");
    }

    #[test]
    fn recipients_are_validated_one_by_one() {
        let (good, bad) = recipients(&[
            "a@example.com".into(),
            "not an address".into(),
            "Bob <b@example.com>".into(),
            "x@y.z\r\nBcc: e@evil.example".into(),
        ]);
        assert_eq!(good.len(), 2);
        assert_eq!(bad.len(), 2);
    }

    #[test]
    fn a_list_in_lead_data_cannot_become_a_mailing() {
        let many: Vec<String> = (0..1000).map(|i| format!("r{i}@example.com")).collect();
        let (good, bad) = recipients(&many);
        assert_eq!(good.len(), MAX_RECIPIENTS);
        assert_eq!(good[0].email.to_string(), "r0@example.com");
        assert_eq!(
            bad,
            [format!(
                "980 more recipients (at most {MAX_RECIPIENTS} per message)"
            )]
        );
    }

    #[test]
    fn a_long_subject_is_cut_between_characters_a_reader_sees() {
        let family = "\u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467}";
        let subject = subject_line(&format!("{}{family} and more", "a".repeat(196)));
        assert_eq!(subject, format!("{}…", "a".repeat(196)));
        let short = format!("{}{family}", "a".repeat(194));
        assert_eq!(subject_line(&short), short);
    }

    #[test]
    fn a_long_subject_is_cut_so_every_header_line_fits_smtp() {
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let to: Vec<Mailbox> = vec!["a@example.com".parse().unwrap()];
        for long in ["a".repeat(5000), "é".repeat(5000), "🎉 x".repeat(1250)] {
            let parts = EmailParts {
                to: vec![],
                subject: format!("Call from {long}"),
                text: Some("body".into()),
                html: None,
            };
            let raw = build(&from, &to, &parts, None).unwrap().formatted();
            let head = &raw[..raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap()];
            for line in head.split(|&b| b == b'\n') {
                assert!(line.len() <= 998, "a {}-byte header line", line.len());
            }
            let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
            let subject = parsed.subject().unwrap();
            assert_eq!(subject.chars().count(), MAX_SUBJECT_CHARS, "{subject}");
            assert!(subject.starts_with("Call from "), "{subject}");
            assert!(subject.ends_with('…'), "{subject}");
        }
        assert_eq!(subject_line("short\r\nsubject"), "short  subject");
    }

    #[test]
    fn a_long_display_name_is_cut_so_every_header_line_fits_smtp() {
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let parts = EmailParts {
            to: vec![],
            subject: "s".into(),
            text: Some("b".into()),
            html: None,
        };
        for name in ["a".repeat(5000), "é".repeat(3000)] {
            let (to, bad) = recipients(&[format!("\"{name}\" <a@example.com>")]);
            assert!(bad.is_empty(), "{bad:?}");
            let kept = to[0].name.as_deref().unwrap();
            assert_eq!(kept.chars().count(), MAX_NAME_CHARS);
            assert!(kept.ends_with('…'));
            assert_eq!(to[0].email.to_string(), "a@example.com");
            let raw = build(&from, &to, &parts, None).unwrap().formatted();
            let head = &raw[..raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap()];
            for line in head.split(|&b| b == b'\n') {
                assert!(line.len() <= 998, "a {}-byte header line", line.len());
            }
        }
    }

    #[test]
    fn every_email_has_a_date_and_its_own_message_id() {
        let ids: Vec<String> = (0..2)
            .map(|_| {
                let raw = message().formatted();
                let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
                assert!(parsed.date().is_some());
                let id = parsed.message_id().expect("no Message-ID").to_string();
                assert!(id.contains('@'), "{id}");
                id
            })
            .collect();
        assert_ne!(ids[0], ids[1]);
    }

    #[test]
    fn a_deliverys_message_id_is_the_same_on_every_attempt_and_safe_from_call_data() {
        let from: Mailbox = "Call Bot <calls@example.com>".parse().unwrap();
        let meta = |delivery_id, sid| Meta {
            channel: "mail",
            rule: "r",
            sid,
            event: "POST_CALL_DATA",
            delivery_id,
        };
        let id = message_id(&from, &meta(42, "CA0b6d1f9e")).unwrap();
        assert_eq!(id, "<callnotify.42.CA0b6d1f9e@example.com>");
        let parts = EmailParts {
            to: vec![],
            subject: "s".into(),
            text: Some("b".into()),
            html: None,
        };
        let to = ["a@example.com".parse().unwrap()];
        let ids: Vec<String> = (0..2)
            .map(|_| {
                let raw = build(&from, &to, &parts, Some(id.clone()))
                    .unwrap()
                    .formatted();
                let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
                parsed.message_id().unwrap().to_string()
            })
            .collect();
        assert_eq!(ids, ["callnotify.42.CA0b6d1f9e@example.com"; 2]);
        // A sid from the payload cannot break the header or the ID's syntax.
        let hostile = message_id(&from, &meta(7, "CA1>\r\nBcc: x@evil.example <@é ")).unwrap();
        assert_eq!(hostile, "<callnotify.7.CA1Bccxevil.example@example.com>");
        assert_eq!(
            message_id(&from, &meta(7, "<>")).unwrap(),
            "<callnotify.7.call@example.com>"
        );
        // send-test has no delivery: a new ID each time.
        assert_eq!(message_id(&from, &meta(0, "CA1")), None);
    }

    #[test]
    fn twenty_long_recipients_still_fit_smtp_line_limits() {
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let parts = EmailParts {
            to: vec![],
            subject: "s".into(),
            text: Some("b".into()),
            html: None,
        };
        let local = "regional-sales-manager";
        let lists: [Vec<String>; 3] = [
            (0..20)
                .map(|i| format!("{local}.{i}@northeast.ourteam.example"))
                .collect(),
            (0..20)
                .map(|i| format!("\"{}\" <{local}.{i}@x.example>", "N".repeat(99)))
                .collect(),
            (0..20)
                .map(|i| format!("Zoë Ünal <{local}.{i}@x.example>"))
                .collect(),
        ];
        for list in lists {
            let (to, bad) = recipients(&list);
            assert!(bad.is_empty(), "{bad:?}");
            let message = build(&from, &to, &parts, None).unwrap();
            assert_eq!(message.envelope().to().len(), 20);
            let raw = message.formatted();
            let head = &raw[..raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap()];
            for line in head.split(|&b| b == b'\n') {
                assert!(line.len() <= 998, "a {}-byte header line", line.len());
            }
            let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
            let got: Vec<(Option<String>, String)> = parsed
                .to()
                .unwrap()
                .iter()
                .map(|a| {
                    let name = a.name().map(String::from);
                    (name, a.address().unwrap().to_string())
                })
                .collect();
            let want: Vec<(Option<String>, String)> = to
                .iter()
                .map(|m| (m.name.clone(), m.email.to_string()))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn subject_and_names_cannot_add_headers() {
        let from: Mailbox = "Call Bot <calls@example.com>".parse().unwrap();
        let to: Vec<Mailbox> = vec!["a@example.com".parse().unwrap()];
        let parts = EmailParts {
            to: vec![],
            subject: "Hi\r\nBcc: evil@example.com Zoë".into(),
            text: Some("body".into()),
            html: Some("<p>body</p>".into()),
        };
        let raw = String::from_utf8(build(&from, &to, &parts, None).unwrap().formatted()).unwrap();
        assert!(raw.lines().all(|l| !l.starts_with("Bcc:")), "{raw}");
        assert!(
            raw.contains("Subject: Hi  Bcc: evil@example.com =?utf-8?"),
            "{raw}"
        );
        assert!(raw.contains("multipart/alternative"));
    }

    /// An SMTP "server" on 127.0.0.1 that answers every connection with `greeting` and then
    /// reads until the client hangs up, returning what the client said.
    async fn greets_with(
        greeting: &'static str,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            sock.write_all(greeting.as_bytes()).await.unwrap();
            let mut said = Vec::new();
            let _ = sock.read_to_end(&mut said).await;
            said
        });
        (addr, server)
    }

    #[tokio::test]
    async fn a_5xx_greeting_is_retried_and_says_what_the_server_answered() {
        // A relay in maintenance or at its connection limit answers 554 before anything is
        // said: that is about the server, not the message (Postfix's smtp_skip_5xx_greeting).
        for greeting in [
            "554 5.3.2 no service\r\n",
            "554-maintenance\r\n554 5.3.2 try later\r\n",
        ] {
            let (addr, server) = greets_with(greeting).await;
            let t = plain_with(addr, Duration::from_secs(10), Some(("calls", "right")));
            let from: Mailbox = "calls@example.com".parse().unwrap();
            let outcome = send(&t, &from, &parts_to(&["a@example.com"]), &meta()).await;
            match &outcome {
                Outcome::Retry { after: None, error } => {
                    assert!(
                        error.contains("refused the connection in its greeting"),
                        "{error}"
                    );
                    assert!(error.contains("(554)"), "{error}");
                    assert!(
                        error.contains("try later") || error.contains("no service"),
                        "{error}"
                    );
                    assert!(!error.contains("login refused"), "{error}");
                }
                other => panic!("{greeting:?}: {other:?}"),
            }
            drop(t);
            server.await.unwrap();
        }

        // A 5xx to what we said is still the server's word about it: dead, as before.
        let (addr, _server) = line_peer(false, |line| match line {
            l if l.starts_with("EHLO") => Answer::Say("250 test".into()),
            l if l.starts_with("MAIL") => Answer::Say("550 5.7.1 sender rejected".into()),
            _ => Answer::Say("250 ok".into()),
        })
        .await;
        let t = plain(addr);
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let outcome = send(&t, &from, &parts_to(&["a@example.com"]), &meta()).await;
        assert!(matches!(outcome, Outcome::Permanent { .. }), "{outcome:?}");
    }

    /// A listener on 127.0.0.1 whose accept queue is full, and the connections that fill it:
    /// the kernel drops a further SYN, so a connect to it gets no answer, as to an address
    /// that is not routed.
    async fn never_answers() -> (
        std::net::SocketAddr,
        tokio::net::TcpListener,
        Vec<tokio::net::TcpStream>,
    ) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        loop {
            let probe = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(500), probe).await {
                Ok(Ok(tcp)) => queued.push(tcp),
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => return (addr, listener, queued),
            }
            assert!(queued.len() < 64, "the accept queue does not fill");
        }
    }

    #[tokio::test]
    async fn an_address_that_does_not_answer_costs_its_share_and_the_next_is_tried() {
        // Never accepted from while the test runs: the queue stays full.
        let (silent, _listener, _queued) = never_answers().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        // As a host name whose first address (an AAAA, say) is not routed, within the
        // attempt's time as `Transport::send` gives it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        let tcp = tokio::time::timeout_at(deadline, connect_any(&[silent, good_addr], deadline))
            .await
            .expect("the first address took all the time")
            .expect("the second address was not tried");
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);

        // When none answers, the error names each address and why.
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let e = connect_any(&[refused, silent], deadline).await.unwrap_err();
        let said = e.to_string();
        assert!(said.starts_with(&format!("{refused}: ")), "{said}");
        assert!(
            said.contains(&format!("; {silent}: no answer within ")),
            "{said}"
        );
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_server_without_starttls_is_named_and_the_email_waits_unsent() {
        // `tls: starttls` against a server whose EHLO lists no STARTTLS (a relay misconfigured,
        // or a path that strips it): the error said "internal client error"; and one that
        // answers STARTTLS with a 5xx made the email dead.
        for refuse in [false, true] {
            let (addr, server) = line_peer(false, move |line| match line {
                l if l.starts_with("EHLO") && refuse => {
                    Answer::Say("250-test\r\n250 STARTTLS".into())
                }
                l if l.starts_with("EHLO") => Answer::Say("250-test\r\n250 8BITMIME".into()),
                "STARTTLS" => Answer::Say("502 5.5.1 not available here".into()),
                _ => Answer::Say("250 ok".into()),
            })
            .await;
            let t = transport_to(addr, SmtpTls::Starttls, Duration::from_secs(10), None);
            let from: Mailbox = "calls@example.com".parse().unwrap();
            let outcome = send(&t, &from, &parts_to(&["a@example.com"]), &meta()).await;
            let Outcome::Retry { after: None, error } = &outcome else {
                panic!("refuse {refuse}: {outcome:?}");
            };
            if refuse {
                assert!(
                    error.contains("the server refused (") && error.contains("(502)"),
                    "{error}"
                );
            } else {
                assert!(
                    error.contains("the server does not offer STARTTLS"),
                    "{error}"
                );
            }
            assert!(error.contains("`tls: starttls`"), "{error}");
            drop(t);
            let said = server.await.unwrap();
            assert!(
                !said.iter().any(|l| l.starts_with("MAIL")),
                "sent in the clear: {said:?}"
            );
        }
    }

    #[tokio::test]
    async fn tls_from_the_start_against_a_plain_text_server_says_which_setting_fits() {
        // `tls: tls` on port 587: the server greets in plain text and the error read
        // "Connection error: Connection error: received corrupt message of type
        // InvalidContentType", which says nothing about the setting.
        let (addr, server) = line_peer(false, |_| Answer::Say("250 ok".into())).await;
        let t = transport_to(addr, SmtpTls::Tls, Duration::from_secs(10), None);
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let outcome = send(&t, &from, &parts_to(&["a@example.com"]), &meta()).await;
        let Outcome::Retry { after: None, error } = &outcome else {
            panic!("{outcome:?}");
        };
        assert!(
            error.starts_with("SMTP: the server answered in plain text, not TLS"),
            "{error}"
        );
        assert!(error.contains("use `tls: starttls`"), "{error}");
        drop(t);
        let said = server.await.unwrap();
        assert!(!said.iter().any(|l| l.starts_with("MAIL")), "{said:?}");
    }

    #[tokio::test]
    async fn a_server_that_never_greets_is_named_with_the_tls_setting_it_may_want() {
        // `tls: starttls` (the default) on port 465: the server waits for a TLS handshake and
        // says nothing, and the error read "no answer in time while connecting", as if the
        // relay were down.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and says nothing, as a TLS server waiting for the client's hello.
        let _server = tokio::spawn(async move {
            let mut open = Vec::new();
            loop {
                open.push(listener.accept().await.unwrap().0);
            }
        });
        let t = transport_to(addr, SmtpTls::Starttls, Duration::from_millis(300), None);
        let from: Mailbox = "calls@example.com".parse().unwrap();
        let outcome = send(&t, &from, &parts_to(&["a@example.com"]), &meta()).await;
        assert_eq!(
            outcome,
            Outcome::Retry {
                after: None,
                error: "SMTP: connected, but the server sent no greeting within 300ms; a server \
                        that speaks TLS from the start (port 465) waits like this for `tls: tls`"
                    .into()
            }
        );
    }
}
