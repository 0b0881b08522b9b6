//! Property tests over what strangers control: lead names, transcripts and `leadData` values go
//! through the Slack escapers and still make valid JSON with no markup of their own; subjects and
//! display names go through the email builder and still make a message with exactly the headers
//! we meant; and the payload parser never panics, whatever the bytes.

use callnotify::notify::{email, slack};
use callnotify::payload;
use callnotify::render::{self, EmailParts, Message, Renderer};
use callnotify::rules::Action;
use lettre::message::Mailbox;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Fragments that have broken escapers before, mixed with arbitrary Unicode.
fn hostile() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("<!channel>".to_string()),
        Just("<!here>".to_string()),
        Just("<@U123>".to_string()),
        Just("@here".to_string()),
        Just("@Channel".to_string()),
        Just("@".to_string()),
        Just("everyone".to_string()),
        Just("<https://evil.example|click here>".to_string()),
        Just("&lt;!channel&gt;".to_string()),
        Just("<".to_string()),
        Just(">".to_string()),
        Just("|".to_string()),
        Just("&".to_string()),
        Just("\"".to_string()),
        Just("\\".to_string()),
        Just("\\u0000".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("\r\nBcc: evil@example.com\r\n".to_string()),
        Just("\0".to_string()),
        Just("\u{202e}".to_string()),
        Just("\u{2028}".to_string()),
        Just("🎉".to_string()),
        Just("{{lead_name}}".to_string()),
        Just("}}".to_string()),
        Just("=?utf-8?b?QmNjOg==?=".to_string()),
        Just("https://".to_string()),
        Just("HTTPS://".to_string()),
        Just("*_~`".to_string()),
        any::<String>(),
        "[ -~]{0,12}",
    ];
    prop_oneof![
        any::<String>(),
        prop::collection::vec(fragment, 0..12).prop_map(|v| v.concat()),
    ]
}

/// A parsed call whose name, transcript, recording URL and leadData values are the given strings.
fn call(name: &str, transcript: &str, url_tail: &str, note: &str, company: &str) -> payload::Call {
    let body = json!({"call": {
        "sid": "CAproperty",
        "cachedLeadName": name,
        "transcript": transcript,
        "duration": 61,
        "callRecordingUrl": format!("https://api.example.com/rec/{url_tail}"),
        "leadData": {"note": note, "company": company, "missing": null},
    }});
    payload::parse(body.to_string().as_bytes()).expect("a call with a fixed sid parses")
}

const TEXT_TEMPLATE: &str =
    "*{{lead_name}}* ({{duration_human}}) from {{call.leadData.company}}\n{{call.leadData.note}}\n```{{call.transcript}}```\n{{truncate call.leadData.note 20}} {{last_lines call.transcript 2}} {{upper lead_name}} {{default call.leadData.missing call.leadData.company}}";

const BLOCKS_TEMPLATE: &str = r#"{
  "blocks": [
    { "type": "header", "text": { "type": "plain_text", "text": "Call with {{lead_name}}" } },
    { "type": "section", "fields": [
        { "type": "mrkdwn", "text": "*Company*\n{{default call.leadData.company "none"}}" },
        { "type": "mrkdwn", "text": "*Recording*\n{{#if recording_url}}<{{recording_url}}|Listen>{{else}}none{{/if}}" }
    ] },
    { "type": "section", "text": { "type": "mrkdwn", "text": "{{call.leadData.note}}" } },
    { "type": "section", "text": { "type": "mrkdwn", "text": "{{default call.transcript "(no transcript)"}}" } }
  ]
}"#;

fn renderer() -> Renderer {
    let mut r = Renderer::empty();
    r.register("p/text", TEXT_TEMPLATE).unwrap();
    r.register("p/blocks.json", BLOCKS_TEMPLATE).unwrap();
    r.register("p/mail.txt", "{{lead_name}}: {{call.transcript}}")
        .unwrap();
    r.register(
        "p/mail.html",
        "<p>{{lead_name}}</p><pre>{{call.transcript}}</pre>",
    )
    .unwrap();
    r
}

fn action(template: &str) -> Action {
    Action {
        channel: "c".into(),
        template: template.into(),
        to: vec!["{{call.leadData.note}}".into(), "ops@example.com".into()],
        subject: Some("Call from {{lead_name}}: {{call.transcript}}".into()),
    }
}

/// Every string in a JSON value, depth first.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Renders and fits to Slack's limits; what comes out is something Slack accepts (the checks
/// `callnotify check` makes: sizes, block counts, no empty text).
fn slack_body(r: &Renderer, template: &str, c: &payload::Call) -> Value {
    let Message::Slack { mut body } = r
        .render("slack", &action(template), &render::context(c, "rule"))
        .expect("renders")
    else {
        panic!("not a Slack message")
    };
    slack::fit(&mut body);
    let rejects = callnotify::commands::slack_rejects(&body);
    assert!(rejects.is_empty(), "{rejects:?} in {body}");
    body
}

/// Hostile strings, or transcripts long enough (up to ~10,000 characters) to be split across
/// sections and blocks, with blank lines and long lines where the splits fall.
fn transcript() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        8 => "(HUMAN|BOT): [ -~]{0,60}\n",
        2 => Just("\n".to_string()),
        1 => (2990usize..3010, any::<bool>()).prop_map(|(n, nl)| "w".repeat(n) + if nl { "\n" } else { "" }),
    ];
    prop_oneof![
        hostile(),
        prop::collection::vec(line, 0..200).prop_map(|v| v.concat()),
    ]
}

fn assert_no_markup_from_values(texts: &[String], template_links: usize) {
    let all = texts.concat();
    for banned in ["<!", "<@", "<#"] {
        assert!(!all.contains(banned), "{banned:?} in {all:?}");
    }
    assert_eq!(
        all.matches('<').count(),
        template_links,
        "a `<` that the template did not write: {all:?}"
    );
    assert_eq!(all.matches('>').count(), template_links, "{all:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn slack_text_bodies_are_json_and_carry_no_markup_from_values(
        name in hostile(), transcript in transcript(), note in hostile(), company in hostile(),
    ) {
        let r = renderer();
        let c = call(&name, &transcript, "x", &note, &company);
        let body = slack_body(&r, "p/text", &c);
        let obj = body.as_object().unwrap();
        prop_assert_eq!(obj.len(), 1, "keys: {:?}", obj.keys().collect::<Vec<_>>());
        let mut texts = Vec::new();
        strings(&body, &mut texts);
        assert_no_markup_from_values(&texts, 0);
    }

    #[test]
    fn block_kit_bodies_are_json_and_only_the_template_links(
        name in hostile(), transcript in transcript(), note in hostile(), company in hostile(),
        url_tail in hostile(),
    ) {
        let r = renderer();
        let c = call(&name, &transcript, &url_tail, &note, &company);
        let body = slack_body(&r, "p/blocks", &c);
        let obj = body.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        prop_assert_eq!(keys, vec!["blocks", "text"]);
        // No value added a block or a key to one (the last block may be fit's own
        // "… truncated" context line).
        let blocks = obj["blocks"].as_array().unwrap();
        for (i, b) in blocks.iter().enumerate() {
            let t = b["type"].as_str().unwrap();
            let marker = t == "context" && i + 1 == blocks.len();
            prop_assert!(t == "header" || t == "section" || marker, "{}", t);
            for k in b.as_object().unwrap().keys() {
                let allowed = if marker { "elements" } else { "fields" };
                prop_assert!(["type", "text", allowed].contains(&k.as_str()), "{}", k);
            }
        }
        // A header is plain_text, shown as written (no entities): `<` and `>` are text there,
        // and none starts a mention.
        let mut header = Vec::new();
        strings(&blocks[0], &mut header);
        prop_assert_eq!(blocks[0]["type"].as_str(), Some("header"));
        for banned in ["<!", "<@", "<#"] {
            prop_assert!(!header.concat().contains(banned), "{:?} in {:?}", banned, header);
        }
        let mut texts = Vec::new();
        strings(&Value::Array(blocks[1..].to_vec()), &mut texts);
        let links = usize::from(c.recording_url.is_some());
        assert_no_markup_from_values(&texts, links);
        if links == 1 {
            // The template's link keeps exactly one `|`: the value cannot re-point or relabel it.
            let all = texts.concat();
            let start = all.find('<').unwrap();
            let end = start + all[start..].find('>').unwrap();
            let link = &all[start + 1..end];
            prop_assert_eq!(link.matches('|').count(), 1, "{}", link);
            prop_assert!(link.ends_with("|Listen"), "{}", link);
            prop_assert!(link.starts_with("https://api.example.com/rec/"), "{}", link);
        }
        let mut fallback = Vec::new();
        strings(&obj["text"], &mut fallback);
        assert_no_markup_from_values(&fallback, 0);
    }

    #[test]
    fn escaped_values_never_contain_angle_brackets_or_bars(s in hostile()) {
        let e = render::escape_slack(&s);
        prop_assert!(!e.contains('<') && !e.contains('>'));
        // A `|` from a value inside a template's `<url|label>` would end the URL.
        prop_assert!(!e.contains('|'), "{}", e);
        // Nor a bare mention that Block Kit would parse: `@here` standing as a word (an
        // address or a domain such as `jo@here.example` is not one).
        let mention = regex::Regex::new(
            r"(?i)(^|[^A-Za-z0-9_.+@-])@(here|channel|everyone)($|[^A-Za-z0-9_.-]|\.([^A-Za-z0-9]|$))",
        )
        .unwrap();
        prop_assert!(!mention.is_match(&e), "{}", e);
        let j = render::escape_slack_json(&s);
        let decoded: String = serde_json::from_str(&format!("\"{j}\"")).expect("a JSON string");
        prop_assert_eq!(decoded, e);
    }

    #[test]
    fn emails_parse_and_have_exactly_the_intended_headers(
        subject in hostile(), from_name in hostile(), to_name in hostile(),
        text in proptest::option::of(hostile()), html in proptest::option::of(hostile()),
    ) {
        let from = Mailbox::new(Some(from_name.clone()), "calls@example.com".parse().unwrap());
        let to = vec![
            Mailbox::new(Some(to_name.clone()), "lead@example.com".parse().unwrap()),
            "ops@example.com".parse().unwrap(),
        ];
        let parts = EmailParts { to: vec![], subject: subject.clone(), text: text.clone(), html: html.clone() };
        let built = email::build(&from, &to, &parts, None);
        if text.is_none() && html.is_none() {
            prop_assert!(built.is_err());
            return Ok(());
        }
        let raw = built.expect("builds").formatted();
        check_headers(&raw, &subject, 2);
    }

    #[test]
    fn rendered_emails_have_one_line_subjects_and_the_intended_headers(
        name in hostile(), transcript in hostile(), note in hostile(),
    ) {
        let r = renderer();
        let c = call(&name, &transcript, "x", &note, "Acme");
        let Message::Email(parts) = r
            .render("email", &action("p/mail"), &render::context(&c, "rule"))
            .expect("renders")
        else {
            panic!("not an email")
        };
        prop_assert!(!parts.subject.contains(['\r', '\n']), "{:?}", parts.subject);
        let html = parts.html.clone().unwrap();
        prop_assert!(!html.replace("<p>", "").replace("</p>", "").replace("<pre>", "").replace("</pre>", "").contains('<'));
        let (good, _bad) = email::recipients(&parts.to);
        prop_assert!(!good.is_empty());
        for m in &good {
            let shown = m.to_string();
            prop_assert!(!shown.contains(['\r', '\n']), "{}", shown);
        }
        let from: Mailbox = "Call Bot <calls@example.com>".parse().unwrap();
        let raw = email::build(&from, &good, &parts, None).expect("builds").formatted();
        check_headers(&raw, &parts.subject, good.len());
    }

    #[test]
    fn parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = payload::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_json_shapes(call in json_value(), field in json_value(), key in prop_oneof![
        Just("sid"), Just("duration"), Just("createdAt"), Just("leadData"), Just("cachedLeadName"),
        Just("callRecordingUrl"), Just("transcript"), Just("campaignId"), Just("outcome"),
    ]) {
        let _ = payload::parse(json!({"call": call}).to_string().as_bytes());
        let mut obj = json!({"sid": "CAshape"});
        obj[key] = field;
        let body = json!({"call": obj, "headers": {"authorization": "Bearer x"}}).to_string();
        if let Ok(c) = payload::parse(body.as_bytes()) {
            // Whatever parsed also renders (or fails cleanly) on every channel.
            let r = renderer();
            let ctx = render::context(&c, "rule");
            for (ch, t) in [("slack", "p/text"), ("slack", "p/blocks"), ("email", "p/mail"), ("log", "builtin/test")] {
                if let Ok(Message::Slack { mut body }) = r.render(ch, &action(t), &ctx) {
                    slack::fit(&mut body);
                    let _: Value = serde_json::from_str(&body.to_string()).expect("valid JSON");
                }
            }
            prop_assert!(!c.raw_json().contains("Bearer x"), "headers must be dropped");
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        hostile().prop_map(Value::String),
        "[0-9 .eE+-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(hostile(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Parses `raw` with a standard MIME parser and checks the header set and the subject.
fn check_headers(raw: &[u8], subject: &str, to: usize) {
    let msg = mail_parser::MessageParser::default()
        .parse(raw)
        .unwrap_or_else(|| panic!("unparseable: {}", String::from_utf8_lossy(raw)));
    let names: Vec<String> = msg
        .headers()
        .iter()
        .map(|h| h.name().to_ascii_lowercase())
        .collect();
    let count = |n: &str| names.iter().filter(|x| *x == n).count();
    const EXACTLY_ONCE: [&str; 7] = [
        "from",
        "to",
        "subject",
        "date",
        "mime-version",
        "content-type",
        "message-id",
    ];
    for one in EXACTLY_ONCE {
        assert_eq!(
            count(one),
            1,
            "{one} in {names:?}:\n{}",
            String::from_utf8_lossy(raw)
        );
    }
    for none in ["bcc", "cc", "reply-to", "sender"] {
        assert_eq!(count(none), 0, "{none}:\n{}", String::from_utf8_lossy(raw));
    }
    const MAY_ALSO_APPEAR: [&str; 1] = ["content-transfer-encoding"];
    for n in &names {
        assert!(
            EXACTLY_ONCE.contains(&n.as_str()) || MAY_ALSO_APPEAR.contains(&n.as_str()),
            "unexpected header {n}:\n{}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(msg.to().map(|a| a.iter().count()), Some(to));
    assert_eq!(msg.from().map(|a| a.iter().count()), Some(1));
    // The subject arrives as the text it was, on one line (control characters become spaces),
    // cut to `email::MAX_SUBJECT_CHARS` (the cut is all `subject_line` does to a line).
    let want: String = subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let want = email::subject_line(&want);
    // The builder puts a zero-width space inside a literal `=?` so it is not decoded.
    let got = msg
        .subject()
        .unwrap_or_default()
        .replace("=\u{200b}?", "=?");
    assert_eq!(
        norm(&got),
        norm(&want),
        "subject changed:\n{}",
        String::from_utf8_lossy(raw)
    );
}

/// Whitespace-insensitive comparison: folding may change runs of spaces, and RFC 2047 drops the
/// whitespace between two adjacent encoded words, which lettre writes word by word (so a space
/// between two non-ASCII words is lost; a display nit, not a change of meaning).
fn norm(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}
