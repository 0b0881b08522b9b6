//! Micro-benchmarks of the pipeline's CPU work (issue 6): payload parsing (and how it grows with
//! the transcript), rule matching with 1, 100 and 1,000 rules (some matching, and none matching),
//! and rendering a Slack text, a Slack Block Kit and an email message.
//!
//! Run: `cargo bench --bench pipeline` (add `-- --quick` for a short run). Nothing here is run by
//! `cargo test`; the numbers are printed, never asserted.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};

use callnotify::payload::{self, Call};
use callnotify::render::{self, Renderer};
use callnotify::rules::{self, Action, Rule};

const FIXTURE: &[u8] = include_bytes!("../tests/fixtures/post_call_data.json");

/// The fixture with its transcript padded to about `bytes` bytes (conversation lines repeated).
fn fixture_with_transcript(bytes: usize) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(FIXTURE).expect("fixture is JSON");
    let original = v["call"]["transcript"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut t = String::with_capacity(bytes + original.len());
    while t.len() < bytes {
        t.push_str(&original);
        t.push('\n');
    }
    t.truncate(bytes);
    while !t.is_char_boundary(t.len()) {
        t.pop();
    }
    v["call"]["transcript"] = Value::String(t);
    serde_json::to_vec(&v).expect("serialises")
}

fn call() -> Call {
    payload::parse(FIXTURE).expect("fixture parses")
}

fn bench_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    let sizes =
        [("fixture", FIXTURE.to_vec())]
            .into_iter()
            .chain([10_000usize, 100_000].into_iter().map(|n| {
                (
                    if n == 10_000 {
                        "transcript_10KB"
                    } else {
                        "transcript_100KB"
                    },
                    fixture_with_transcript(n),
                )
            }));
    for (name, body) in sizes {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| payload::parse(black_box(body)).expect("parses"))
        });
    }
    g.finish();
}

fn action() -> Action {
    Action {
        channel: "sales".into(),
        template: "slack/booked".into(),
        to: vec![],
        subject: None,
    }
}

fn rule(name: String, when: Value) -> Rule {
    let mut problems = Vec::new();
    let when = rules::compile_when(&when, &name, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    Rule {
        name,
        events: None,
        when,
        actions: vec![action()],
        stop: false,
    }
}

/// Realistic rules of several shapes, about one in four matching the fixture (a 44 s outbound
/// call from Tyler, no campaign).
fn mixed_rules(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let when = match i % 4 {
                0 => json!({ "duration": { "gte": (i % 60) as u64 } }),
                1 => json!({ "campaignId": [i, i + 1], "transcript": { "contains_any": ["book", "appointment"] } }),
                2 => json!({ "transcript": { "contains": format!("word{i}") }, "direction": "outbound-api" }),
                _ => json!({ "any": [ { "llmAnsweredBy": "machine" }, { "cachedLeadName": { "matches": format!("^T.*{}$", i % 10) } } ] }),
            };
            rule(format!("rule_{i}"), when)
        })
        .collect()
}

/// Rules that all fail on their first, cheapest condition: what a call costs when it matches
/// nothing.
fn rules_matching_nothing(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            rule(
                format!("campaign_{i}"),
                json!({ "campaignId": [10_000 + i], "duration": { "gte": 30 } }),
            )
        })
        .collect()
}

fn bench_match(c: &mut Criterion) {
    let call = call();
    let mut g = c.benchmark_group("match");
    for n in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements(n as u64));
        let mixed = mixed_rules(n);
        let none = rules_matching_nothing(n);
        assert!(rules::matching(&none, &call).is_empty());
        g.bench_with_input(BenchmarkId::new("mixed", n), &mixed, |b, rs| {
            b.iter(|| rules::matching(black_box(rs), black_box(&call)).len())
        });
        g.bench_with_input(BenchmarkId::new("matches_nothing", n), &none, |b, rs| {
            b.iter(|| rules::matching(black_box(rs), black_box(&call)).len())
        });
    }
    g.finish();
}

fn renderer() -> Renderer {
    let mut r = Renderer::empty();
    for (name, text) in [
        (
            "slack/booked",
            include_str!("../templates/slack/booked.hbs"),
        ),
        (
            "slack/summary.json",
            include_str!("../templates/slack/summary.json.hbs"),
        ),
        (
            "slack/summary",
            include_str!("../templates/slack/summary.hbs"),
        ),
        (
            "email/booked.txt",
            include_str!("../templates/email/booked.txt.hbs"),
        ),
        (
            "email/booked.html",
            include_str!("../templates/email/booked.html.hbs"),
        ),
    ] {
        r.register(name, text).expect("template compiles");
    }
    r
}

fn bench_render(c: &mut Criterion) {
    let r = renderer();
    let call = call();
    let ctx = render::context(&call, "bench");
    let slack_text = action();
    let slack_blocks = Action {
        template: "slack/summary".into(),
        ..action()
    };
    let email = Action {
        channel: "mail".into(),
        template: "email/booked".into(),
        to: vec!["sales@example.com".into()],
        subject: Some("Call from {{lead_name}} ({{duration_human}})".into()),
    };
    let mut g = c.benchmark_group("render");
    g.bench_function("context", |b| {
        b.iter(|| render::context(black_box(&call), "bench"))
    });
    for (name, kind, a) in [
        ("slack_text", "slack", &slack_text),
        ("slack_block_kit", "slack", &slack_blocks),
        ("email_text_and_html", "email", &email),
    ] {
        r.render(kind, a, &ctx).expect("renders");
        g.bench_function(name, |b| {
            b.iter(|| {
                r.render(kind, black_box(a), black_box(&ctx))
                    .expect("renders")
            })
        });
    }
    // Rendering grows with what the template prints: the Block Kit summary prints the whole
    // transcript.
    let big = payload::parse(&fixture_with_transcript(10_000)).expect("parses");
    let big_ctx = render::context(&big, "bench");
    g.bench_function("slack_block_kit_transcript_10KB", |b| {
        b.iter(|| {
            r.render("slack", black_box(&slack_blocks), black_box(&big_ctx))
                .expect("renders")
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_parse, bench_match, bench_render
}
criterion_main!(benches);
