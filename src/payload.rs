//! Air's wire format, parsed leniently into the [`Call`] the rest of the code sees.
//!
//! Strict about what we rely on (a JSON object with a `call` object and a usable `sid`), lenient
//! about the rest: numbers may come as strings, `campaignId`/`leadData` may be null, unknown
//! fields are kept. The top-level `headers` object is dropped here and never stored or logged.

use chrono::{DateTime, FixedOffset, NaiveDateTime};
use serde_json::{Map, Value};

/// Longest `sid` accepted; Air's are 34 characters.
pub const MAX_SID_LEN: usize = 128;

/// Air's documented call fields. A template sees null for any the body left out, so
/// `{{call.transcript}}` works on every call while `{{call.transcrpt}}` is still an error; a
/// rule's `when` path that starts elsewhere is a typo or a field Air does not document.
pub const AIR_FIELDS: &[&str] = &[
    "sid",
    "llmAnsweredBy",
    "promptId",
    "callRecordingUrl",
    "fromNumber",
    "toNumber",
    "direction",
    "duration",
    "campaignId",
    "cachedLeadName",
    "transcript",
    "createdAt",
    "leadData",
    "notes",
    "outcome",
    "primaryOutcomeAchieved",
];

/// Which of Air's webhooks a body is; known from the body itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EventKind {
    #[serde(rename = "POST_CALL_DATA")]
    PostCallData,
    #[serde(rename = "POST_CALL_OUTCOME")]
    PostCallOutcome,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::PostCallData => "POST_CALL_DATA",
            EventKind::PostCallOutcome => "POST_CALL_OUTCOME",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "POST_CALL_DATA" => Some(EventKind::PostCallData),
            "POST_CALL_OUTCOME" => Some(EventKind::PostCallOutcome),
            _ => None,
        }
    }
}

/// Why a body is not a call; the message is sent back to the sender with a 400.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PayloadError {
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body must be a JSON object with a `call` object")]
    NotObject,
    #[error("body has no `call` object")]
    NoCall,
    #[error("`call` must be an object")]
    CallNotObject,
    #[error("`call.sid` is missing")]
    NoSid,
    #[error("`call.sid` {0}")]
    BadSid(&'static str),
    #[error("`call.{field}` {reason}")]
    BadField { field: &'static str, reason: String },
}

/// One answered call, as received (minus `headers`), with the fields the rules and templates
/// use most already interpreted.
#[derive(Debug, Clone)]
pub struct Call {
    pub sid: String,
    pub event: EventKind,
    /// The `call` object exactly as received, unknown fields included.
    pub raw: Map<String, Value>,
    /// Seconds, when given.
    pub duration: Option<f64>,
    pub created_at: Option<DateTime<FixedOffset>>,
    /// `cachedLeadName`, trimmed; may be empty.
    pub lead_name: String,
    /// `callRecordingUrl` when it is an http(s) URL.
    pub recording_url: Option<String>,
}

impl Call {
    /// The call object as JSON text, for the store.
    pub fn raw_json(&self) -> String {
        // Serialising a Map of Values cannot fail.
        serde_json::to_string(&self.raw).unwrap_or_default()
    }

    /// The call object as a JSON value, the root that rule paths walk.
    pub fn raw_value(&self) -> Value {
        Value::Object(self.raw.clone())
    }
}

/// Parses a webhook body.
///
/// ```
/// let body = br#"{"call": {"sid": "CA1", "duration": "187", "cachedLeadName": " Maria "}, "headers": {}}"#;
/// let call = callnotify::payload::parse(body).unwrap();
/// assert_eq!((call.sid.as_str(), call.duration, call.lead_name.as_str()), ("CA1", Some(187.0), "Maria"));
/// assert!(callnotify::payload::parse(br#"{"call": {"sid": ""}}"#).is_err());
/// ```
pub fn parse(body: &[u8]) -> Result<Call, PayloadError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    let Value::Object(mut top) = v else {
        return Err(PayloadError::NotObject);
    };
    let call = top.remove("call").ok_or(PayloadError::NoCall)?;
    let Value::Object(call) = call else {
        return Err(PayloadError::CallNotObject);
    };
    from_call_object(call)
}

/// Interprets a `call` object (as stored, or as received).
pub fn from_call_object(raw: Map<String, Value>) -> Result<Call, PayloadError> {
    let sid = match raw.get("sid") {
        None | Some(Value::Null) => return Err(PayloadError::NoSid),
        Some(Value::String(s)) => s.trim(),
        Some(_) => return Err(PayloadError::BadSid("must be a string")),
    };
    if sid.is_empty() {
        return Err(PayloadError::BadSid("must not be empty"));
    }
    if sid.len() > MAX_SID_LEN {
        return Err(PayloadError::BadSid("is longer than 128 bytes"));
    }
    if sid.chars().any(char::is_control) {
        return Err(PayloadError::BadSid("must not contain control characters"));
    }
    // Bidirectional overrides and isolates would make an sid read differently in a log, a
    // table or a reply than it is (U+202E shows "CA\u{202e}lave" as "CAeval").
    if sid.chars().any(|c| {
        matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }) {
        return Err(PayloadError::BadSid(
            "must not contain bidirectional text controls",
        ));
    }
    let sid = sid.to_string();

    let duration = match raw.get("duration") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_duration(v).map_err(|reason| PayloadError::BadField {
            field: "duration",
            reason,
        })?),
    };
    let created_at = match raw.get("createdAt") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => {
            Some(parse_timestamp(s).ok_or_else(|| PayloadError::BadField {
                field: "createdAt",
                reason:
                    "is not a date and time (expected e.g. 2023-12-31 23:12:05.62705+00)".into(),
            })?)
        }
        Some(_) => {
            return Err(PayloadError::BadField {
                field: "createdAt",
                reason: "must be a string".into(),
            })
        }
    };
    let lead_name = match raw.get("cachedLeadName") {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let recording_url = match raw.get("callRecordingUrl") {
        Some(Value::String(s)) if is_http_url(s) => Some(s.trim().to_string()),
        _ => None,
    };
    if let Some(ld) = raw.get("leadData") {
        if !matches!(ld, Value::Null | Value::Object(_)) {
            return Err(PayloadError::BadField {
                field: "leadData",
                reason: "must be an object or null".into(),
            });
        }
    }
    // A null field counts as absent: a data body that carries `"outcome": null` must not take
    // the outcome's place, or the real outcome for the sid would be answered as a duplicate.
    let event = if ["outcome", "notes", "primaryOutcomeAchieved"]
        .iter()
        .any(|k| !matches!(raw.get(*k), None | Some(Value::Null)))
    {
        EventKind::PostCallOutcome
    } else {
        EventKind::PostCallData
    };
    Ok(Call {
        sid,
        event,
        raw,
        duration,
        created_at,
        lead_name,
        recording_url,
    })
}

fn parse_duration(v: &Value) -> Result<f64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if (0.0..1e9).contains(&n) => Ok(n),
        Some(_) => Err("must be a number of seconds, from 0 to under 1,000,000,000".into()),
        None => Err("must be a number of seconds".into()),
    }
}

/// Reads a number that may come as a JSON number or a numeric string.
pub fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn is_http_url(s: &str) -> bool {
    let s = s.trim();
    (s.starts_with("https://") || s.starts_with("http://"))
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Parses PostgreSQL's text format (`2023-12-31 23:12:05.62705+00`) and RFC 3339.
pub fn parse_timestamp(s: &str) -> Option<DateTime<FixedOffset>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t);
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Some(t);
        }
    }
    // No offset at all: PostgreSQL `timestamp without time zone`; read it as UTC.
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().fixed_offset());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../tests/fixtures/post_call_data.json");
    const OUTCOME: &str = include_str!("../tests/fixtures/post_call_outcome.json");
    const CAMPAIGN: &str = include_str!("../tests/fixtures/post_call_data_campaign.json");

    #[test]
    fn parses_the_documented_example() {
        let c = parse(FIXTURE.as_bytes()).unwrap();
        assert_eq!(c.sid, "CAec7g2x30425ba039a83ffb4286754983");
        assert_eq!(c.event, EventKind::PostCallData);
        assert_eq!(c.duration, Some(44.0));
        assert_eq!(c.lead_name, "Tyler");
        assert!(c
            .recording_url
            .as_deref()
            .unwrap()
            .starts_with("https://api.twilio.com/"));
        assert_eq!(
            c.created_at.unwrap().to_rfc3339(),
            "2023-12-31T23:12:05.627050+00:00"
        );
        assert!(!c.raw.contains_key("headers"));
    }

    #[test]
    fn outcome_bodies_are_known_by_their_fields() {
        assert_eq!(
            parse(OUTCOME.as_bytes()).unwrap().event,
            EventKind::PostCallOutcome
        );
        let c = parse(CAMPAIGN.as_bytes()).unwrap();
        assert_eq!(c.event, EventKind::PostCallData);
        assert_eq!(c.raw["leadData"]["owner"], "jordan@ourteam.example");
    }

    #[test]
    fn outcome_fields_that_are_null_do_not_make_an_outcome() {
        let c = parse(br#"{"call":{"sid":"CAnullout","duration":30,"outcome":null,"notes":null}}"#)
            .unwrap();
        assert_eq!(c.event, EventKind::PostCallData);
        let c = parse(br#"{"call":{"sid":"CA1","outcome":null,"primaryOutcomeAchieved":false}}"#)
            .unwrap();
        assert_eq!(c.event, EventKind::PostCallOutcome);
    }

    #[test]
    fn lenient_with_numbers_as_strings_and_unknown_fields() {
        let c = parse(
            br#"{"call":{"sid":"CA1","duration":"187.5","campaignId":"8812","newField":{"x":1}}}"#,
        )
        .unwrap();
        assert_eq!(c.duration, Some(187.5));
        assert_eq!(c.raw["newField"]["x"], 1);
        assert_eq!(c.lead_name, "");
        assert_eq!(c.recording_url, None);
    }

    #[test]
    fn rejects_what_is_not_a_call_with_the_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (b"[]", "JSON object"),
            (b"{}", "no `call`"),
            (br#"{"call":"CA1"}"#, "must be an object"),
            (br#"{"call":{}}"#, "sid` is missing"),
            (br#"{"call":{"sid":""}}"#, "must not be empty"),
            (br#"{"call":{"sid":5}}"#, "must be a string"),
            (br#"{"call":{"sid":"a","duration":-5}}"#, "from 0"),
            (
                br#"{"call":{"sid":"a","duration":2e9}}"#,
                "under 1,000,000,000",
            ),
            (
                "{\"call\":{\"sid\":\"CA\u{202e}lave\"}}".as_bytes(),
                "bidirectional",
            ),
            (
                "{\"call\":{\"sid\":\"CA\u{2066}x\"}}".as_bytes(),
                "bidirectional",
            ),
            (
                br#"{"call":{"sid":"a","duration":"abc"}}"#,
                "number of seconds",
            ),
            (
                br#"{"call":{"sid":"a","duration":1e309}}"#,
                "not valid JSON",
            ),
            (
                br#"{"call":{"sid":"a","createdAt":"yesterday"}}"#,
                "not a date",
            ),
            (br#"{"call":{"sid":"a","leadData":"x"}}"#, "object or null"),
        ];
        for (body, want) in cases {
            let err = parse(body).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(r#"{{"call":{{"sid":"{}"}}}}"#, "a".repeat(10_000));
        assert!(parse(long.as_bytes()).is_err());
    }

    #[test]
    fn timestamps_in_postgres_and_rfc3339_form() {
        assert!(parse_timestamp("2023-12-31 23:12:05.62705+00").is_some());
        assert!(parse_timestamp("2023-12-31 23:12:05+05:30").is_some());
        assert!(parse_timestamp("2023-12-31T23:12:05Z").is_some());
        assert!(parse_timestamp("2023-12-31 23:12:05").is_some());
        assert!(parse_timestamp("31/12/2023").is_none());
    }
}
