//! Email over SMTP through lettre's async transport (rustls, pooled).

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use secrecy::ExposeSecret;

use super::{excerpt, Meta, Outcome};
use crate::config::{SmtpConfig, SmtpTls};
use crate::render::EmailParts;

pub type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// Builds the pooled transport for one channel.
pub fn transport(s: &SmtpConfig) -> Result<Transport, String> {
    let builder = match s.tls {
        SmtpTls::None => {
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host).tls(Tls::None)
        }
        SmtpTls::Starttls | SmtpTls::Tls => {
            let params = TlsParameters::new(s.host.clone())
                .map_err(|e| format!("TLS setup for {}: {e}", s.host))?;
            let tls = if s.tls == SmtpTls::Tls {
                Tls::Wrapper(params)
            } else {
                Tls::Required(params)
            };
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host).tls(tls)
        }
    };
    let mut builder = builder.port(s.port).timeout(Some(s.timeout));
    if let (Some(user), Some(pass)) = (&s.username, &s.password) {
        builder = builder.credentials(Credentials::new(
            user.clone(),
            pass.expose_secret().to_string(),
        ));
    }
    Ok(builder.build())
}

/// Validates recipients: the good ones, and a note about each that is not an address.
pub fn recipients(to: &[String]) -> (Vec<Mailbox>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for r in to {
        if r.chars().any(char::is_control) {
            bad.push(format!(
                "{:?} is not an address (control characters)",
                excerpt(r, 80)
            ));
            continue;
        }
        match r.parse::<Mailbox>() {
            Ok(m) => good.push(m),
            Err(e) => bad.push(format!("{:?} is not an address ({e})", excerpt(r, 80))),
        }
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

/// Builds the MIME message: text, HTML, or both as multipart/alternative. Header values are
/// encoded by lettre (RFC 2047 for non-ASCII); the subject is already one line.
pub fn build(
    from: &Mailbox,
    to: &[Mailbox],
    parts: &EmailParts,
) -> Result<lettre::Message, String> {
    let mut b = lettre::Message::builder().from(one_line_name(from));
    for m in to {
        b = b.to(one_line_name(m));
    }
    // lettre leaves an ASCII subject as it is, so a value holding an RFC 2047 encoded word
    // (`=?utf-8?b?...?=`) would be decoded by the reader into other text. A zero-width space
    // after the `=` makes the subject non-ASCII: lettre then encodes all of it, and the reader
    // sees the characters that were typed.
    let subject = one_line(&parts.subject).replace("=?", "=\u{200b}?");
    let b = b.subject(subject);
    let built = match (&parts.text, &parts.html) {
        (Some(text), Some(html)) => b.multipart(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (Some(text), None) => b.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body(text.clone()),
        ),
        (None, Some(html)) => b.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_HTML)
                .body(html.clone()),
        ),
        (None, None) => return Err("the email has neither a text nor an HTML body".into()),
    };
    built.map_err(|e| format!("cannot build the email: {e}"))
}

pub async fn send(
    transport: &Transport,
    from: &Mailbox,
    parts: &EmailParts,
    _meta: &Meta<'_>,
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
    let message = match build(from, &to, parts) {
        Ok(m) => m,
        Err(error) => return Outcome::Permanent { error },
    };
    match transport.send(message).await {
        Ok(response) => {
            let mut detail = format!("SMTP {}", response.code());
            if !bad.is_empty() {
                detail.push_str(&format!("; skipped {}", bad.join("; ")));
            }
            Outcome::Delivered {
                detail: Some(detail),
            }
        }
        Err(e) => classify(&e),
    }
}

/// SMTP's answer -> what to do: 5xx permanent, everything else (4xx, timeouts, connection and
/// TLS failures) transient.
pub fn classify(e: &lettre::transport::smtp::Error) -> Outcome {
    let mut error = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        error.push_str(": ");
        error.push_str(&s.to_string());
        source = s.source();
    }
    let error = excerpt(&format!("SMTP: {error}"), 400);
    if e.is_permanent() {
        Outcome::Permanent { error }
    } else {
        Outcome::Retry { after: None, error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn subject_and_names_cannot_add_headers() {
        let from: Mailbox = "Call Bot <calls@example.com>".parse().unwrap();
        let to: Vec<Mailbox> = vec!["a@example.com".parse().unwrap()];
        let parts = EmailParts {
            to: vec![],
            subject: "Hi\r\nBcc: evil@example.com Zoë".into(),
            text: Some("body".into()),
            html: Some("<p>body</p>".into()),
        };
        let raw = String::from_utf8(build(&from, &to, &parts).unwrap().formatted()).unwrap();
        assert!(raw.lines().all(|l| !l.starts_with("Bcc:")), "{raw}");
        assert!(
            raw.contains("Subject: Hi  Bcc: evil@example.com =?utf-8?"),
            "{raw}"
        );
        assert!(raw.contains("multipart/alternative"));
    }
}
