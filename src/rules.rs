//! Rules: compiled conditions over the call object, and pure matching.
//!
//! A rule's `when` is a mapping of paths into the call (`duration`, `leadData.source`) to a
//! condition: a scalar means "equals", a list means "one of", a mapping holds operators (`eq`,
//! `ne`, `in`, `not_in`, `gt`, `gte`, `lt`, `lte`, `contains`, `contains_any`, `matches`,
//! `exists`). `any`, `all` and `not` combine. Every condition must hold. Numbers compare as
//! numbers even when the payload sends them as strings. Regexes and case-insensitive searches
//! are compiled once, at config load; matching does no I/O and allocates nothing for a miss.

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Problem;
use crate::payload::{as_number, Call, EventKind, AIR_FIELDS};

/// One notification a rule asks for. Stored with each delivery, so a delivery is rendered with
/// the action it was planned with even if the config changes meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub channel: String,
    /// Template name under `templates_dir`, without extensions (`slack/booked`).
    pub template: String,
    /// Email recipients; each may be a template and may render to a comma-separated list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Email subject template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// The events the rule applies to; None means every event.
    pub events: Option<Vec<EventKind>>,
    pub when: Condition,
    pub actions: Vec<Action>,
    /// Later rules are not tried for a call this rule matched.
    pub stop: bool,
}

#[derive(Debug)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Field { path: String, ops: Vec<Op> },
}

#[derive(Debug)]
pub enum Op {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    /// Case-insensitive substring (strings) or element (lists).
    Contains(String, Regex, Whole),
    ContainsAny(Vec<String>, Regex, Whole),
    Matches(Regex),
    Exists(bool),
}

const OPERATORS: &[&str] = &[
    "eq",
    "ne",
    "in",
    "not_in",
    "gt",
    "gte",
    "lt",
    "lte",
    "contains",
    "contains_any",
    "matches",
    "exists",
];

/// Compiles a `when` mapping; problems are recorded with their place, never panicked on.
pub fn compile_when(v: &Value, at: &str, problems: &mut Vec<Problem>) -> Condition {
    let Value::Object(map) = v else {
        problems.push(Problem::new(
            at,
            "expected a mapping of field paths to conditions",
        ));
        return Condition::All(Vec::new());
    };
    Condition::All(
        map.iter()
            .map(|(k, spec)| compile_entry(k, spec, &format!("{at}.{k}"), problems))
            .collect(),
    )
}

fn compile_entry(key: &str, spec: &Value, at: &str, problems: &mut Vec<Problem>) -> Condition {
    match key {
        "any" | "all" => {
            let Value::Array(items) = spec else {
                problems.push(Problem::new(
                    at,
                    format!("`{key}` takes a list of conditions"),
                ));
                return Condition::All(Vec::new());
            };
            if items.is_empty() {
                // `any: []` would hold for every call, `all: []` too: a leftover, not a rule.
                problems.push(Problem::new(
                    at,
                    format!("`{key}` needs at least one condition"),
                ));
            }
            let parts = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let at = format!("{at}[{i}]");
                    if item.as_object().is_some_and(|m| m.is_empty()) {
                        problems.push(Problem::new(&at, "an empty condition holds for every call"));
                    }
                    compile_when(item, &at, problems)
                })
                .collect();
            if key == "any" {
                Condition::Any(parts)
            } else {
                Condition::All(parts)
            }
        }
        "not" => {
            if spec.as_object().is_some_and(|m| m.is_empty()) {
                problems.push(Problem::new(
                    at,
                    "`not` needs a condition (as it is, it holds for no call)",
                ));
            }
            Condition::Not(Box::new(compile_when(spec, at, problems)))
        }
        path => {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                problems.push(Problem::new(at, format!("{path:?} is not a field path")));
            }
            // Air's keys are case-sensitive: `campaignID` would never be found, silently.
            let head = path.split('.').next().unwrap_or(path);
            if let Some(field) = AIR_FIELDS
                .iter()
                .find(|f| **f != head && f.eq_ignore_ascii_case(head))
            {
                problems.push(Problem::new(
                    at,
                    format!("Air's call has no field `{head}`; did you mean `{field}`? (names are case-sensitive)"),
                ));
            }
            if spec.as_object().is_some_and(|m| m.is_empty()) {
                problems.push(Problem::new(
                    at,
                    "no condition: give a value, a list or an operator such as `{ gte: 60 }`",
                ));
            }
            if spec.as_array().is_some_and(|l| l.is_empty()) {
                problems.push(Problem::new(at, "an empty list matches no call"));
            }
            let ops = match spec {
                Value::Array(items) => vec![Op::In(items.clone())],
                Value::Object(ops) => ops
                    .iter()
                    .filter_map(|(op, arg)| compile_op(op, arg, &format!("{at}.{op}"), problems))
                    .collect(),
                scalar => vec![Op::Eq(scalar.clone())],
            };
            Condition::Field {
                path: path.to_string(),
                ops,
            }
        }
    }
}

fn compile_op(op: &str, arg: &Value, at: &str, problems: &mut Vec<Problem>) -> Option<Op> {
    let number = |problems: &mut Vec<Problem>| match as_number(arg) {
        Some(n) => Some(n),
        None => {
            problems.push(Problem::new(
                at,
                format!("`{op}` needs a number, found {arg}"),
            ));
            None
        }
    };
    let list = |problems: &mut Vec<Problem>| match arg {
        Value::Array(items) => Some(items.clone()),
        _ => {
            problems.push(Problem::new(
                at,
                format!("`{op}` needs a list, found {arg}"),
            ));
            None
        }
    };
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let literal_regex = |needles: &[String], problems: &mut Vec<Problem>| {
        let alternation = needles
            .iter()
            .map(|n| regex::escape(n))
            .collect::<Vec<_>>()
            .join("|");
        match RegexBuilder::new(&alternation)
            .case_insensitive(true)
            .build()
        {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(Problem::new(at, format!("cannot compile: {e}")));
                None
            }
        }
    };
    Some(match op {
        "eq" => Op::Eq(arg.clone()),
        "ne" => Op::Ne(arg.clone()),
        "in" | "not_in" => {
            let items = list(problems)?;
            if items.is_empty() {
                problems.push(Problem::new(
                    at,
                    format!(
                        "an empty list: `{op}: []` holds for {} call",
                        if op == "in" { "no" } else { "every" }
                    ),
                ));
                return None;
            }
            if op == "in" {
                Op::In(items)
            } else {
                Op::NotIn(items)
            }
        }
        "gt" => Op::Gt(number(problems)?),
        "gte" => Op::Gte(number(problems)?),
        "lt" => Op::Lt(number(problems)?),
        "lte" => Op::Lte(number(problems)?),
        "contains" => {
            let Some(needle) = text(arg) else {
                problems.push(Problem::new(
                    at,
                    format!("`contains` needs a string, found {arg}"),
                ));
                return None;
            };
            if needle.is_empty() {
                problems.push(Problem::new(
                    at,
                    "`contains` needs text: \"\" is in every string",
                ));
                return None;
            }
            let re = literal_regex(std::slice::from_ref(&needle), problems)?;
            Op::Contains(needle, re, Whole::default())
        }
        "contains_any" => {
            let items = list(problems)?;
            let needles: Vec<String> = items.iter().filter_map(text).collect();
            if needles.len() != items.len()
                || needles.is_empty()
                || needles.iter().any(String::is_empty)
            {
                problems.push(Problem::new(
                    at,
                    "`contains_any` needs a non-empty list of non-empty strings",
                ));
                return None;
            }
            let re = literal_regex(&needles, problems)?;
            Op::ContainsAny(needles, re, Whole::default())
        }
        "matches" => {
            let Value::String(pattern) = arg else {
                problems.push(Problem::new(
                    at,
                    format!("`matches` needs a regex string, found {arg}"),
                ));
                return None;
            };
            match RegexBuilder::new(pattern).size_limit(1 << 20).build() {
                Ok(r) => Op::Matches(r),
                Err(e) => {
                    problems.push(Problem::new(at, format!("bad regex: {e}")));
                    return None;
                }
            }
        }
        "exists" => match arg {
            Value::Bool(b) => Op::Exists(*b),
            _ => {
                problems.push(Problem::new(
                    at,
                    format!("`exists` needs true or false, found {arg}"),
                ));
                return None;
            }
        },
        other => {
            problems.push(Problem::new(
                at,
                format!(
                    "unknown operator `{other}` (expected one of: {})",
                    OPERATORS.join(", ")
                ),
            ));
            return None;
        }
    })
}

/// Walks a dotted path into the call object; numeric segments index lists.
pub fn lookup<'a>(root: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut cur = root.get(parts.next()?)?;
    for part in parts {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn loosely_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x == y,
        // Whole numbers exactly: ids past 2^53 (a CRM's, say) are not rounded into each other.
        _ => match (as_integer(a), as_integer(b)) {
            (Some(x), Some(y)) => x == y,
            _ => match (as_number(a), as_number(b)) {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            },
        },
    }
}

/// A whole number, as a JSON integer or a string of digits.
fn as_integer(v: &Value) -> Option<i128> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

impl Op {
    /// Ok when the operator holds for `found`; Err says why not.
    /// Whether the operator holds for `found`; no allocation.
    fn holds(&self, found: Option<&Value>) -> bool {
        let present = found.filter(|v| !v.is_null());
        match self {
            Op::Exists(want) => present.is_some() == *want,
            Op::Eq(x) => found.is_some_and(|v| loosely_equal(v, x)),
            Op::Ne(x) => !found.is_some_and(|v| loosely_equal(v, x)),
            Op::In(xs) => found.is_some_and(|v| xs.iter().any(|x| loosely_equal(v, x))),
            Op::NotIn(xs) => !found.is_some_and(|v| xs.iter().any(|x| loosely_equal(v, x))),
            Op::Gt(n) => present.and_then(as_number).is_some_and(|v| v > *n),
            Op::Gte(n) => present.and_then(as_number).is_some_and(|v| v >= *n),
            Op::Lt(n) => present.and_then(as_number).is_some_and(|v| v < *n),
            Op::Lte(n) => present.and_then(as_number).is_some_and(|v| v <= *n),
            Op::Contains(needle, re, whole) => {
                present.is_some_and(|v| search(v, std::slice::from_ref(needle), re, whole))
            }
            Op::ContainsAny(needles, re, whole) => {
                present.is_some_and(|v| search(v, needles, re, whole))
            }
            Op::Matches(re) => present.is_some_and(|v| match v {
                Value::String(s) => re.is_match(s),
                Value::Number(_) | Value::Bool(_) => re.is_match(&v.to_string()),
                _ => false,
            }),
        }
    }

    /// Ok when the operator holds for `found`; Err says why not.
    fn check(&self, path: &str, found: Option<&Value>) -> Result<(), String> {
        if self.holds(found) {
            return Ok(());
        }
        let got = match found {
            None => "missing".to_string(),
            Some(v) => short(v),
        };
        Err(match self {
            Op::Exists(true) => format!("{path} does not exist"),
            Op::Exists(false) => format!("{path} exists ({got})"),
            Op::Eq(x) => format!("{path} is {got}, not {}", short(x)),
            Op::Ne(x) => format!("{path} is {}", short(x)),
            Op::In(xs) => format!(
                "{path} is {got}, not one of {}",
                short(&Value::Array(xs.clone()))
            ),
            Op::NotIn(_) => format!("{path} is {got}, which is excluded"),
            Op::Gt(n) => format!("{path} is {got}, not > {n}"),
            Op::Gte(n) => format!("{path} is {got}, not >= {n}"),
            Op::Lt(n) => format!("{path} is {got}, not < {n}"),
            Op::Lte(n) => format!("{path} is {got}, not <= {n}"),
            Op::Contains(needle, ..) => format!("{path} does not contain {needle:?}"),
            Op::ContainsAny(needles, ..) => format!("{path} contains none of {needles:?}"),
            Op::Matches(re) => format!("{path} does not match /{}/", re.as_str()),
        })
    }
}

/// Case-insensitive search for `re` (the needles) in a string or a number's digits; in a list,
/// an element equal to one of the needles, ignoring case, so `tags: { contains: vip }` matches
/// `["VIP"]`, not `["not-vip"]`. No allocation for strings.
fn search(v: &Value, needles: &[String], re: &Regex, whole: &Whole) -> bool {
    match v {
        Value::String(s) => re.is_match(s),
        Value::Number(_) | Value::Bool(_) => re.is_match(&v.to_string()),
        Value::Array(items) => items.iter().any(|item| match item {
            Value::String(s) => whole.matches(s, needles),
            Value::Number(_) | Value::Bool(_) => whole.matches(&item.to_string(), needles),
            _ => false,
        }),
        _ => false,
    }
}

/// Whether a list element equals one of the needles, ignoring case as the substring regex does.
/// ASCII compares directly; otherwise an anchored regex, built on first use (Unicode case
/// folding is more than `to_lowercase`: `ς`, `σ` and `Σ` are one letter to it). Built lazily
/// because most rules never see a non-ASCII list, and 1,000 rules each holding a second regex
/// made matching 14 % slower.
#[derive(Debug, Default)]
pub struct Whole(std::sync::OnceLock<Option<Regex>>);

impl Whole {
    fn matches(&self, element: &str, needles: &[String]) -> bool {
        if element.is_ascii() && needles.iter().all(|n| n.is_ascii()) {
            return needles.iter().any(|n| element.eq_ignore_ascii_case(n));
        }
        let re = self.0.get_or_init(|| {
            let alternation: Vec<String> = needles.iter().map(|n| regex::escape(n)).collect();
            RegexBuilder::new(&format!("^(?:{})$", alternation.join("|")))
                .case_insensitive(true)
                .build()
                .ok()
        });
        match re {
            Some(re) => re.is_match(element),
            None => needles
                .iter()
                .any(|n| element.to_lowercase() == n.to_lowercase()),
        }
    }
}

impl Condition {
    /// The paths whose first segment is not one of Air's documented fields: most likely typos
    /// (`durration`), since such a condition holds only if Air sends the field anyway.
    pub fn undocumented_paths(&self) -> Vec<&str> {
        match self {
            Condition::All(parts) | Condition::Any(parts) => parts
                .iter()
                .flat_map(Condition::undocumented_paths)
                .collect(),
            Condition::Not(inner) => inner.undocumented_paths(),
            Condition::Field { path, .. } => {
                let head = path.split('.').next().unwrap_or(path);
                if AIR_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(head)) {
                    Vec::new()
                } else {
                    vec![path.as_str()]
                }
            }
        }
    }

    /// Whether the condition holds: the matching path, with no explanation and no allocation.
    pub fn holds(&self, call: &Map<String, Value>) -> bool {
        match self {
            Condition::All(parts) => parts.iter().all(|p| p.holds(call)),
            Condition::Any(parts) => parts.is_empty() || parts.iter().any(|p| p.holds(call)),
            Condition::Not(inner) => !inner.holds(call),
            Condition::Field { path, ops } => {
                let found = lookup(call, path);
                ops.iter().all(|op| op.holds(found))
            }
        }
    }

    /// Ok when the condition holds for the call object; Err names the first part that failed.
    pub fn check(&self, call: &Map<String, Value>) -> Result<(), String> {
        match self {
            Condition::All(parts) => parts.iter().try_for_each(|p| p.check(call)),
            Condition::Any(parts) => {
                if parts.is_empty() {
                    return Ok(());
                }
                let mut reasons = Vec::new();
                for p in parts {
                    match p.check(call) {
                        Ok(()) => return Ok(()),
                        Err(r) => reasons.push(r),
                    }
                }
                Err(format!("none of `any` holds ({})", reasons.join("; ")))
            }
            Condition::Not(inner) => match inner.check(call) {
                Ok(()) => Err("the `not` condition holds".to_string()),
                Err(_) => Ok(()),
            },
            Condition::Field { path, ops } => {
                let found = lookup(call, path);
                ops.iter().try_for_each(|op| op.check(path, found))
            }
        }
    }
}

impl Rule {
    /// Whether this rule applies to the call (what ingest uses; [`Rule::check`] explains).
    pub fn matches(&self, call: &Call) -> bool {
        self.events.as_ref().is_none_or(|e| e.contains(&call.event)) && self.when.holds(&call.raw)
    }

    /// Ok when this rule applies to the call; Err says which condition failed.
    pub fn check(&self, call: &Call) -> Result<(), String> {
        if let Some(events) = &self.events {
            if !events.contains(&call.event) {
                return Err(format!(
                    "event is {}, the rule is for {:?}",
                    call.event.as_str(),
                    events
                ));
            }
        }
        self.when.check(&call.raw)
    }
}

/// The rules a call matches, in file order, up to and including the first with `stop: true`.
pub fn matching<'a>(rules: &'a [Rule], call: &Call) -> Vec<&'a Rule> {
    let mut out = Vec::new();
    for rule in rules {
        if rule.matches(call) {
            out.push(rule);
            if rule.stop {
                break;
            }
        }
    }
    out
}

/// The dry run's view: what each rule made of the call.
#[derive(Debug, Serialize)]
pub struct Verdict {
    pub rule: String,
    pub matched: bool,
    /// Why the rule did not match, or that an earlier `stop: true` rule ended matching.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub fn explain(rules: &[Rule], call: &Call) -> Vec<Verdict> {
    let mut stopped_by: Option<&str> = None;
    rules
        .iter()
        .map(|rule| {
            if let Some(by) = stopped_by {
                return Verdict {
                    rule: rule.name.clone(),
                    matched: false,
                    reason: Some(format!("not tried: rule {by:?} matched and has stop: true")),
                };
            }
            match rule.check(call) {
                Ok(()) => {
                    if rule.stop {
                        stopped_by = Some(&rule.name);
                    }
                    Verdict {
                        rule: rule.name.clone(),
                        matched: true,
                        reason: None,
                    }
                }
                Err(r) => Verdict {
                    rule: rule.name.clone(),
                    matched: false,
                    reason: Some(r),
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(v: Value) -> Condition {
        let mut problems = Vec::new();
        let c = compile_when(&v, "when", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        c
    }

    fn call(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_issue_example_matches_the_campaign_fixture() {
        let c = compile(json!({
            "duration": {"gte": 60},
            "transcript": {"contains_any": ["book", "appointment"]},
            "campaignId": [8812, 8813],
            "leadData.source": "website",
        }));
        let fixture: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/post_call_data_campaign.json"
        ))
        .unwrap();
        let obj = fixture["call"].as_object().unwrap();
        assert_eq!(c.check(obj), Ok(()));
        let plain: Value =
            serde_json::from_str(include_str!("../tests/fixtures/post_call_data.json")).unwrap();
        let err = c.check(plain["call"].as_object().unwrap()).unwrap_err();
        assert_eq!(err, "duration is 44, not >= 60");
    }

    #[test]
    fn numbers_compare_as_numbers_even_as_strings() {
        let c = compile(json!({"campaignId": 8812, "duration": {"gt": "100"}}));
        assert!(c
            .check(&call(json!({"campaignId": "8812", "duration": "187"})))
            .is_ok());
        assert!(c
            .check(&call(json!({"campaignId": 8812.0, "duration": 187})))
            .is_ok());
        assert!(c
            .check(&call(json!({"campaignId": "8813", "duration": 187})))
            .is_err());
        assert!(c
            .check(&call(json!({"campaignId": 8812, "duration": "abc"})))
            .is_err());
        // Integers compare exactly, past what an f64 holds.
        let big = compile(json!({"leadData.crmId": 9007199254740993u64}));
        for (id, want) in [
            (json!(9007199254740993u64), true),
            (json!("9007199254740993"), true),
            (json!(9007199254740992u64), false),
            (json!("9007199254740992"), false),
        ] {
            let obj = call(json!({"leadData": {"crmId": id}}));
            assert_eq!(big.holds(&obj), want, "{id}");
        }
    }

    #[test]
    fn every_operator_behaves() {
        let obj = call(json!({
            "s": "Hello World", "n": 5, "tags": ["hot", "Roofing"], "z": null,
            "greek": "ΟΔΟΣ", "greek_list": ["ΟΔΟΣ"],
            "nested": {"deep": {"x": "y"}}
        }));
        let yes = [
            json!({"s": {"eq": "Hello World"}}),
            json!({"s": {"ne": "x"}}),
            json!({"missing": {"ne": "x"}}),
            json!({"n": {"in": [1, 5]}}),
            json!({"n": {"not_in": [1, 2]}}),
            json!({"n": {"gt": 4, "gte": 5, "lt": 6, "lte": 5}}),
            json!({"s": {"contains": "WORLD"}}),
            json!({"tags": {"contains": "roofing"}}),
            json!({"tags": {"contains_any": ["cold", "HOT"]}}),
            // Unicode case folding, as for strings: final sigma, capital sigma.
            json!({"greek": {"contains": "οδος"}, "greek_list": {"contains": "οδος"}}),
            json!({"s": {"contains_any": ["nope", "hello"]}}),
            json!({"s": {"matches": "^Hel+o"}}),
            json!({"s": {"exists": true}, "z": {"exists": false}, "missing": {"exists": false}}),
            json!({"nested.deep.x": "y"}),
            json!({"tags.0": "hot"}),
            json!({"any": [{"n": 1}, {"n": 5}]}),
            json!({"all": [{"n": 5}, {"s": {"exists": true}}]}),
            json!({"not": {"n": 1}}),
            json!({}),
        ];
        for c in yes {
            let cond = compile(c.clone());
            assert_eq!(cond.check(&obj), Ok(()), "{c}");
            assert!(cond.holds(&obj), "{c}");
        }
        let no = [
            json!({"s": {"eq": "hello world"}}),
            json!({"n": {"gt": 5}}),
            json!({"missing": {"gt": 0}}),
            json!({"s": {"contains": "planet"}}),
            // In a list, an element is looked for, not a substring of one.
            json!({"tags": {"contains": "roof"}}),
            json!({"tags": {"contains_any": ["ho", "oofing"]}}),
            json!({"s": {"matches": "^World"}}),
            json!({"z": {"exists": true}}),
            json!({"any": [{"n": 1}, {"n": 2}]}),
            json!({"not": {"n": 5}}),
            json!({"nested.deep.x.y": "y"}),
        ];
        for c in no {
            let cond = compile(c.clone());
            assert!(cond.check(&obj).is_err(), "{c}");
            assert!(!cond.holds(&obj), "{c}");
        }
    }

    #[test]
    fn bad_conditions_are_all_reported_with_their_place() {
        let mut problems = Vec::new();
        compile_when(
            &json!({"duration": {"gtee": 5}, "transcript": {"matches": "(unclosed"}, "n": {"gt": "abc"}, "any": 5}),
            "rules[0].when",
            &mut problems,
        );
        let places: Vec<&str> = problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(
            places,
            [
                "rules[0].when.duration.gtee",
                "rules[0].when.transcript.matches",
                "rules[0].when.n.gt",
                "rules[0].when.any"
            ]
        );
        assert!(problems[0].message.contains("unknown operator"));
    }

    #[test]
    fn conditions_that_would_hold_for_every_call_are_refused() {
        let mut problems = Vec::new();
        compile_when(
            &json!({"any": [], "all": [{}], "duration": {}, "not": {},
                    "s": {"contains": ""}, "t": {"contains_any": ["x", ""]},
                    "campaignId": [], "u": {"in": []}, "v": {"not_in": []}}),
            "when",
            &mut problems,
        );
        let places: Vec<&str> = problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(
            places,
            [
                "when.any",
                "when.all[0]",
                "when.duration",
                "when.not",
                "when.s.contains",
                "when.t.contains_any",
                "when.campaignId",
                "when.u.in",
                "when.v.not_in"
            ]
        );
        assert!(problems[2].message.contains("no condition"), "{problems:?}");
    }

    #[test]
    fn a_misspelt_field_is_found_at_load_not_silently_never_matched() {
        let mut problems = Vec::new();
        let c = compile_when(
            &json!({"campaignID": 8812, "any": [{"Duration": {"gt": 60}}],
                    "durration": {"gte": 60}, "not": {"leadData.source": "x"},
                    "leaddata.owner": {"exists": true}}),
            "when",
            &mut problems,
        );
        let found: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("when.campaignID: ") && found[0].contains("`campaignId`"));
        assert!(found[1].starts_with("when.any[0].Duration: ") && found[1].contains("`duration`"));
        assert!(found[2].starts_with("when.leaddata.owner: ") && found[2].contains("`leadData`"));
        // Names Air does not document at all are not refused, but are named for a warning.
        assert_eq!(c.undocumented_paths(), ["durration"]);
    }

    #[test]
    fn stop_ends_matching_and_explain_says_so() {
        let mk = |name: &str, when: Value, stop: bool| Rule {
            name: name.into(),
            events: None,
            when: compile(when),
            actions: vec![],
            stop,
        };
        let rules = vec![
            mk("long", json!({"duration": {"gte": 100}}), false),
            mk("any", json!({}), true),
            mk("after", json!({}), false),
        ];
        let c = crate::payload::parse(br#"{"call":{"sid":"CA1","duration":44}}"#).unwrap();
        let names: Vec<&str> = matching(&rules, &c)
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["any"]);
        let v = explain(&rules, &c);
        assert!(!v[0].matched && v[0].reason.as_deref() == Some("duration is 44, not >= 100"));
        assert!(v[1].matched);
        assert!(v[2].reason.as_deref().unwrap().contains("stop: true"));
    }

    #[test]
    fn rules_can_be_limited_to_an_event() {
        let rule = Rule {
            name: "outcomes".into(),
            events: Some(vec![EventKind::PostCallOutcome]),
            when: compile(json!({})),
            actions: vec![],
            stop: false,
        };
        let data = crate::payload::parse(br#"{"call":{"sid":"CA1"}}"#).unwrap();
        let outcome =
            crate::payload::parse(br#"{"call":{"sid":"CA1","outcome":"Booked"}}"#).unwrap();
        assert!(rule.check(&data).is_err());
        assert!(rule.check(&outcome).is_ok());
    }
}
