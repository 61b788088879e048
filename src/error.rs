//! The crate's one error type.

use std::fmt;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
///
/// Errors never contain a connection-string password: Postgres errors come from `tokio-postgres`,
/// which does not echo credentials, and configuration errors name settings, not their secret values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder's settings are invalid; every problem found is listed.
    #[error("invalid outbox configuration: {0}")]
    Config(ConfigErrors),
    /// An event given to `add_new_event` breaks a rule (Kafka topic naming, a column limit, …).
    /// Nothing was written.
    #[error("invalid event: {field}: {reason}")]
    InvalidEvent {
        /// The offending field: `event_topic`, `aggregate_id`, `event_type`, `payload` or `headers`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A table or channel name is not a plain Postgres identifier.
    #[error("invalid identifier for {what}: {reason}")]
    InvalidIdentifier {
        /// Which name: `table` or `channel`.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The outbox table is missing or not migrated to the version this crate needs.
    #[error("outbox schema problem: {0}")]
    Schema(String),
    /// Postgres returned an error or the connection failed. The message includes the server's
    /// error (or the I/O cause), never the connection string.
    #[error("postgres: {}", describe_postgres(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// sqlx returned an error (feature `sqlx`).
    #[cfg(feature = "sqlx")]
    #[error("sqlx: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Kafka (librdkafka) returned an error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The payload could not be serialized to JSON.
    #[error("payload serialization: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The relay is already running, or has been stopped and cannot run again.
    #[error("relay state: {0}")]
    Relay(String),
    /// `stop` did not finish within the given time.
    #[error("the relay did not stop within {0:?}")]
    StopTimeout(std::time::Duration),
}

impl Error {
    /// `true` for errors caused by the caller's input (configuration, event, identifier).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::Config(_) | Error::InvalidEvent { .. } | Error::InvalidIdentifier { .. }
        )
    }

    pub(crate) fn invalid_event(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidEvent {
            field,
            reason: reason.into(),
        }
    }
}

/// `tokio_postgres::Error`'s own message is only its kind ("db error"); add the causes.
fn describe_postgres(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Every problem found in a configuration, in the order the settings were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    problems: Vec<String>,
}

impl ConfigErrors {
    pub(crate) fn new(problems: Vec<String>) -> Self {
        ConfigErrors { problems }
    }

    /// The problems, one sentence each, each naming the setting.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s): ", self.problems.len())?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

/// Displays a `tokio_postgres::Error` with what the server said — severity, SQLSTATE, message,
/// detail, hint — or, for errors without a server answer, the error and its causes.
/// (`tokio_postgres::Error`'s own `Display` reads only "db error" for server errors.)
pub(crate) struct PgErrorDisplay<'a>(pub(crate) &'a tokio_postgres::Error);

impl fmt::Display for PgErrorDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_db_error() {
            Some(db) => {
                write!(
                    f,
                    "{} {}: {}",
                    db.severity(),
                    db.code().code(),
                    db.message()
                )?;
                if let Some(detail) = db.detail() {
                    write!(f, "; detail: {detail}")?;
                }
                if let Some(hint) = db.hint() {
                    write!(f, "; hint: {hint}")?;
                }
                Ok(())
            }
            None => f.write_str(&describe_postgres(self.0)),
        }
    }
}
