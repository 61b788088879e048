//! Custom headers read back from the `headers jsonb` column, which any writer with SQL access can
//! fill: only a JSON object of strings makes headers; everything else is reported, never trusted.
//!
//! Parsing never fails as a whole and never recurses into a value: a bad entry costs only
//! itself (a value nested deeper than serde_json's limit is skipped iteratively).

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::event::RESERVED_HEADERS;

/// Why a header from the column was not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// The column is not a JSON object (an array, a string, a number…): no custom header at all.
    NotAnObject(&'static str),
    /// A name the relay sets itself (`event_id`, `event_type`): the row tried to forge it.
    Reserved(String),
    /// A value that is not a JSON string (a number, object, array, bool or null).
    NotAString(String, &'static str),
}

impl Dropped {
    /// The `reason` label of `outbox_headers_dropped_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Dropped::NotAnObject(_) => "not_an_object",
            Dropped::Reserved(_) => "reserved",
            Dropped::NotAString(..) => "not_a_string",
        }
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dropped::NotAnObject(kind) => {
                write!(f, "headers is {kind}, not a JSON object of strings")
            }
            Dropped::Reserved(name) => write!(
                f,
                "header `{}` is reserved: the relay sets it, the row's value is dropped",
                name.escape_debug()
            ),
            Dropped::NotAString(name, kind) => write!(
                f,
                "header `{}` is {kind}, not a string",
                name.escape_debug()
            ),
        }
    }
}

/// The custom headers of one row: the valid ones in column order, and what was dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CustomHeaders {
    pub(crate) valid: Vec<(String, String)>,
    pub(crate) dropped: Vec<Dropped>,
}

/// Parses the `headers` column's JSON text (`None`: SQL `NULL`, no custom headers).
pub(crate) fn parse(json: Option<&[u8]>) -> CustomHeaders {
    let Some(json) = json else {
        return CustomHeaders::default();
    };
    let mut de = serde_json::Deserializer::from_slice(json);
    match de.deserialize_any(TopLevel) {
        Ok(h) => h,
        // jsonb always holds valid JSON; report anything else rather than panic.
        Err(_) => CustomHeaders {
            valid: Vec::new(),
            dropped: vec![Dropped::NotAnObject("not valid JSON")],
        },
    }
}

struct TopLevel;

fn not_object(kind: &'static str) -> CustomHeaders {
    CustomHeaders {
        valid: Vec::new(),
        dropped: vec![Dropped::NotAnObject(kind)],
    }
}

impl<'de> Visitor<'de> for TopLevel {
    type Value = CustomHeaders;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CustomHeaders, A::Error> {
        let mut out = CustomHeaders::default();
        while let Some(name) = map.next_key::<String>()? {
            match map.next_value::<Value>()? {
                Value::String(_) if RESERVED_HEADERS.contains(&name.as_str()) => {
                    out.dropped.push(Dropped::Reserved(name));
                }
                Value::String(v) => out.valid.push((name, v)),
                Value::Other(_) if RESERVED_HEADERS.contains(&name.as_str()) => {
                    out.dropped.push(Dropped::Reserved(name));
                }
                Value::Other(kind) => out.dropped.push(Dropped::NotAString(name, kind)),
            }
        }
        Ok(out)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CustomHeaders, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(not_object("an array"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<CustomHeaders, E> {
        Ok(not_object("a string"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<CustomHeaders, E> {
        Ok(not_object("a bool"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<CustomHeaders, E> {
        Ok(not_object("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<CustomHeaders, E> {
        Ok(not_object("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<CustomHeaders, E> {
        Ok(not_object("a number"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<CustomHeaders, E> {
        // JSON `null` (not SQL NULL): nothing to publish, but not what a writer meant either.
        Ok(not_object("JSON null"))
    }
}

/// One header value: a string, or the kind of anything else (skipped without recursion).
enum Value {
    String(String),
    Other(&'static str),
}

impl<'de> de::Deserialize<'de> for Value {
    /// Classified from the value's JSON text, which serde_json captures by skipping it (without
    /// recursion, and without converting a number): a number outside `f64`'s range, which a
    /// `jsonb` column holds happily (`1e309`, `1e131071`), made the whole column fail to parse
    /// when read as a number, and every valid header of the row was dropped with it (found by
    /// a breaker helper).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        let raw = <Box<serde_json::value::RawValue>>::deserialize(d)?;
        let text = raw.get();
        Ok(match text.as_bytes().first() {
            Some(b'"') => match serde_json::from_str::<String>(text) {
                Ok(s) => Value::String(s),
                Err(e) => return Err(de::Error::custom(e)),
            },
            Some(b'{') => Value::Other("an object"),
            Some(b'[') => Value::Other("an array"),
            Some(b't' | b'f') => Value::Other("a bool"),
            Some(b'n') => Value::Other("null"),
            _ => Value::Other("a number"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deep(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn a_number_outside_f64_costs_only_its_own_header() {
        let big = format!("1e{}", 131_071);
        let json = format!(
            r#"{{"n":1e309,"ok":"1","m":-2e308,"big":{big},"esc":"a\u0001\"b","t":true,"u":null}}"#
        );
        let h = parse(Some(json.as_bytes()));
        assert_eq!(
            h.valid,
            vec![
                ("ok".into(), "1".into()),
                ("esc".into(), "a\u{1}\"b".into())
            ]
        );
        assert_eq!(
            h.dropped,
            vec![
                Dropped::NotAString("n".into(), "a number"),
                Dropped::NotAString("m".into(), "a number"),
                Dropped::NotAString("big".into(), "a number"),
                Dropped::NotAString("t".into(), "a bool"),
                Dropped::NotAString("u".into(), "null"),
            ]
        );
    }

    #[test]
    fn keeps_valid_headers_and_reports_the_rest() {
        let json = format!(
            r#"{{"a":"1","event_id":"forged","n":5,"deep":{},"event_type":7,"z":"2"}}"#,
            deep(10_000)
        );
        let h = parse(Some(json.as_bytes()));
        assert_eq!(
            h.valid,
            vec![("a".into(), "1".into()), ("z".into(), "2".into())]
        );
        assert_eq!(
            h.dropped,
            vec![
                Dropped::Reserved("event_id".into()),
                Dropped::NotAString("n".into(), "a number"),
                Dropped::NotAString("deep".into(), "an array"),
                Dropped::Reserved("event_type".into()),
            ]
        );
    }

    #[test]
    fn non_objects_are_reported() {
        for (json, kind) in [
            ("[1,2]", "an array"),
            (r#""x""#, "a string"),
            ("3", "a number"),
            ("null", "JSON null"),
        ] {
            let h = parse(Some(json.as_bytes()));
            assert!(h.valid.is_empty());
            assert_eq!(h.dropped, vec![Dropped::NotAnObject(kind)], "{json}");
        }
        assert_eq!(parse(None), CustomHeaders::default());
        assert_eq!(parse(Some(deep(5000).as_bytes())).dropped.len(), 1);
    }
}
