//! The CloudEvents record format (opt-in): the [Kafka protocol binding] of CloudEvents 1.0 in
//! binary content mode. The record's value stays the event's payload (the CloudEvent's `data`);
//! the context attributes travel as `ce_`-prefixed headers, so consumers built on a CloudEvents
//! SDK (Java `CloudEventDeserializer`, the Rust `cloudevents-sdk` rdkafka binding, Go's
//! `kafka_sarama` binding…) read the records without glue:
//!
//! | header           | value                                                      |
//! |------------------|------------------------------------------------------------|
//! | `ce_specversion` | `1.0`                                                      |
//! | `ce_id`          | the event id (UUID, hyphenated lower case)                 |
//! | `ce_source`      | [`OutboxBuilder::cloudevents_source`](crate::OutboxBuilder::cloudevents_source) |
//! | `ce_type`        | the event type                                             |
//! | `ce_subject`     | the aggregate id (also the record key)                     |
//! | `ce_time`        | `created_at_tz`, RFC 3339 in UTC with microseconds (omitted when infinite or outside the years 0001–9999) |
//! | `content-type`   | `application/json` (the payload is a `jsonb` value)         |
//!
//! The relay's own `event_id` and `event_type` headers are kept beside them. In this mode the
//! names `content-type` and `ce_*` are reserved like `event_id`: a row's custom header of that
//! name is dropped (logged, counted in `outbox_headers_dropped_total{reason="reserved"}`).
//!
//! [Kafka protocol binding]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/kafka-protocol-binding.md

/// The CloudEvents spec version the headers follow.
pub(crate) const SPEC_VERSION: &str = "1.0";

/// The `content-type` of every payload: the `payload` column is `jsonb`.
pub(crate) const CONTENT_TYPE: &str = "application/json";

/// Longest `ce_source` accepted, in bytes.
pub(crate) const MAX_SOURCE_LEN: usize = 1024;

/// `true` for a header name the CloudEvents binding owns (`ce_*`, `content-type`; ASCII case
/// insensitive, as Kafka consumers of the binding match them).
pub(crate) fn is_reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("ce_") || lower == "content-type"
}

/// Checks a `ce_source` value: a non-empty URI-reference (RFC 3986) of at most
/// [`MAX_SOURCE_LEN`] bytes; only its shape is checked (no whitespace, controls or non-ASCII
/// characters, which a URI-reference cannot hold unescaped), and no password in its user
/// information (`scheme://user:password@host`): `ce_source` is published in every record, so a
/// credential there would reach every consumer of the topic. The value is never echoed.
///
/// # Errors
///
/// A description of what is wrong, for `connect()`'s list of problems.
pub(crate) fn check_source(source: &str) -> Result<(), String> {
    if source.is_empty() {
        return Err("is empty; CloudEvents requires a non-empty URI-reference".into());
    }
    if source.len() > MAX_SOURCE_LEN {
        return Err(format!(
            "is {} bytes, more than {MAX_SOURCE_LEN}",
            source.len()
        ));
    }
    if let Some(c) = source.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "holds {c:?}, which a URI-reference cannot hold unescaped (percent-encode it)"
        ));
    }
    if has_password(source) {
        return Err(
            "holds a password in its user information (`scheme://user:password@…`), which every record would publish; remove it".into(),
        );
    }
    Ok(())
}

/// `true` when `uri` has an authority (`//…` at the start or after the scheme) whose user
/// information (before the last `@` ahead of the path) holds a `:`, the deprecated
/// `user:password` form (RFC 3986 §3.2.1).
fn has_password(uri: &str) -> bool {
    // The authority follows `//` at the start of a relative reference or right after the scheme.
    let after_scheme = uri
        .split_once(':')
        .filter(|(scheme, _)| {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
        .map_or(uri, |(_, rest)| rest);
    let Some(rest) = after_scheme.strip_prefix("//") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_and_source_rules() {
        for name in ["ce_id", "CE_Type", "ce_", "content-type", "Content-Type"] {
            assert!(is_reserved(name), "{name}");
        }
        for name in ["event_id", "ce", "traceparent", "content_type", "xce_id"] {
            assert!(!is_reserved(name), "{name}");
        }
        assert!(check_source("/orders").is_ok());
        assert!(check_source("urn:service:orders").is_ok());
        assert!(check_source("https://example.com/orders?x=1#f").is_ok());
        assert!(check_source("").is_err());
        assert!(check_source("has space").is_err());
        assert!(check_source("tab\there").is_err());
        assert!(check_source("caf\u{e9}").is_err());
        assert!(check_source(&"a".repeat(MAX_SOURCE_LEN + 1)).is_err());
        assert!(check_source(&"a".repeat(MAX_SOURCE_LEN)).is_ok());
        assert!(check_source("https://user@example.com/orders").is_ok());
        assert!(check_source("https://example.com/a:b@c").is_ok());
        assert!(check_source("//[::1]:8080/orders").is_ok());
        assert!(check_source("urn:acme:a//b:c@d").is_ok());
        for secret in [
            "https://user:hunter2@example.com/orders",
            "kafka://svc:hunter2@broker:9092",
            "//:hunter2@example.com",
        ] {
            let err = check_source(secret).expect_err(secret);
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
