//! Arbitrary bytes as a webhook body: parsing must not panic, and whatever parses must render
//! on every channel without panicking, to valid Slack JSON and to an email lettre can build.
#![no_main]

use std::sync::OnceLock;

use callnotify::notify::{email, slack};
use callnotify::render::{self, Message, Renderer};
use callnotify::rules::Action;
use libfuzzer_sys::fuzz_target;

fn renderer() -> &'static Renderer {
    static R: OnceLock<Renderer> = OnceLock::new();
    R.get_or_init(|| {
        let mut r = Renderer::empty();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../templates");
        for (name, file) in [
            ("slack/summary", "slack/summary.hbs"),
            ("slack/summary.json", "slack/summary.json.hbs"),
            ("slack/booked", "slack/booked.hbs"),
            ("email/booked.txt", "email/booked.txt.hbs"),
            ("email/booked.html", "email/booked.html.hbs"),
            ("log/summary", "log/summary.hbs"),
        ] {
            let text = std::fs::read_to_string(format!("{dir}/{file}")).expect("template");
            r.register(name, &text).expect("compiles");
        }
        r
    })
}

fn action(template: &str) -> Action {
    Action {
        channel: "c".into(),
        template: template.into(),
        to: vec!["{{call.leadData.owner}}".into(), "ops@example.com".into()],
        subject: Some("Booked: {{lead_name}} ({{duration_human}})".into()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(call) = callnotify::payload::parse(data) else {
        return;
    };
    let _ = call.raw_json();
    let ctx = render::context(&call, "fuzz");
    let r = renderer();
    for (channel, template) in [
        ("slack", "slack/summary"),
        ("slack", "slack/booked"),
        ("email", "email/booked"),
        ("log", "log/summary"),
    ] {
        match r.render(channel, &action(template), &ctx) {
            Ok(Message::Slack { mut body }) => {
                slack::fit(&mut body);
                let text = serde_json::to_string(&body).expect("serializes");
                let _: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            }
            Ok(Message::Email(parts)) => {
                let (to, _) = email::recipients(&parts.to);
                let from: lettre::message::Mailbox =
                    "Call Bot <calls@example.com>".parse().unwrap();
                if let Ok(m) = email::build(&from, &to, &parts) {
                    let _ = m.formatted();
                }
            }
            Ok(Message::Log { .. }) | Err(_) => {}
        }
    }
});
