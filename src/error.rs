//! The crate's one error type, with predicates in the style of `tokio_postgres::Error`
//! ([`is_connection`](Error::is_connection), [`is_schema`](Error::is_schema),
//! [`code`](Error::code), …), so that callers decide without matching on messages.

use std::fmt;

use rdkafka::error::RDKafkaErrorCode;
use tokio_postgres::error::{DbError, SqlState};

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
///
/// Match on the variants for details, or ask the predicates ([`is_connection`](Self::is_connection),
/// [`is_schema`](Self::is_schema), [`is_invalid_input`](Self::is_invalid_input), …) and accessors
/// ([`code`](Self::code) for the SQLSTATE, [`kafka_code`](Self::kafka_code)). New variants may
/// be added.
///
/// Errors never contain a connection-string password: Postgres errors come from `tokio-postgres`,
/// which does not echo credentials, and configuration errors name settings, not their secret
/// values. Postgres errors display what the server said: severity, SQLSTATE, message, detail and
/// hint.
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
    /// An argument of a call is out of range (e.g. [`Admin::find`](crate::Admin::find)'s
    /// `limit`). Nothing was sent to Postgres.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument, e.g. `limit`.
        name: &'static str,
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
    /// The outbox table is missing, not migrated to the version this crate needs, notifies
    /// another channel, or differs from what the relay relies on (column types, NOT NULL, fence
    /// table, trigger), or the relay's role lacks a privilege it needs. The message lists every
    /// problem with its fix.
    #[error("outbox schema problem: {0}")]
    Schema(String),
    /// Postgres returned an error or the connection failed. Displays the server's severity,
    /// SQLSTATE, message, detail and hint (or the I/O cause), never the connection string.
    #[error("postgres: {}", PgErrorDisplay(.0))]
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
    /// A Postgres call got no answer in time: the server, or the network path to it, is not
    /// answering (a half-open connection, a hung server, a blackholed route). `what` names the
    /// call (`connect`, `status`, `find`, `requeue`, `migrate`, `health`, …); `after` is the
    /// deadline that passed. The connection is dropped and the next call opens a new one.
    #[error("postgres: {what}: no answer within {after:?} (timeout: the statement ran that long — waiting for a lock, a slow trigger — or the server or the network path to it is not answering)")]
    Timeout {
        /// The call that timed out.
        what: &'static str,
        /// The deadline that passed.
        after: std::time::Duration,
    },
    /// `migrate` could not lock the outbox table: other sessions held locks on it through every
    /// attempt (see [`migrate_table`](crate::migrate_table)). The text names them (pid,
    /// `application_name`, state, transaction age). Nothing was changed.
    #[error("outbox migrate: {0}")]
    MigrationLocked(String),
    /// The relay was already started (it is running, or ran and stopped); build a new `Outbox`
    /// to run it again.
    #[error("the relay already ran or is running; build a new Outbox to run it again")]
    AlreadyStarted,
    /// `stop` did not finish within the given time.
    #[error("the relay did not stop within {0:?}")]
    StopTimeout(std::time::Duration),
    /// The relay stopped because its Kafka producer kept failing: librdkafka made the idempotent
    /// producer fatal again and again (rebuilt each time) without any delivery in between. The
    /// text names the last fatal error.
    #[error("kafka producer: {0}")]
    ProducerFailed(String),
    /// The relay stopped because it panicked — its pipeline or one of its batches (a bug in
    /// the relay: please report it with the log's `outbox relay: the relay panicked` line). The
    /// text is the panic's message. The relay no longer runs
    /// ([`Health::running`](crate::Health) is `false`) and cannot be started again on this
    /// `Outbox`: restart the process, or connect a new `Outbox`. The rows of the batches it was
    /// A panic of a task beside the pipeline (the listener, the waker, a task waiting for a
    /// late delivery report or removing a fence) stops the relay too; its message then starts
    /// with the task's name (`listener: …`). The rows of the batches it was
    /// running are released by Postgres with their sessions and delivered by the next relay
    /// once their fences expire (those already published, again); reports of messages held
    /// from earlier batches that come in after this error are still written by tasks that end
    /// shortly after it, as are the delivery streams and the relay's other sessions.
    #[error("the relay panicked and stopped: {0}")]
    Panicked(String),
}

/// A named problem of an outbox table's schema; [`Error::Schema`] carries its `Display`, which
/// says what to do (run `migrate`, configure the channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SchemaError {
    /// The table does not exist.
    Missing {
        /// The table.
        table: String,
    },
    /// The table exists but was never migrated (e.g. it was created by the original Go package).
    NotMigrated {
        /// The table.
        table: String,
    },
    /// The table is migrated to an older schema version than this crate needs.
    Outdated {
        /// The table.
        table: String,
        /// Its schema version.
        version: i32,
        /// The version this crate needs ([`SCHEMA_VERSION`](crate::SCHEMA_VERSION)).
        needed: i32,
    },
    /// The table's trigger notifies another channel than the one configured.
    ChannelMismatch {
        /// The table.
        table: String,
        /// The channel the table was migrated with.
        registered: String,
        /// The channel the relay was configured with.
        configured: String,
    },
}

/// The CLI command that migrates `table`: `outbox-relay migrate`, with `--table` unless it is
/// the default table (a hint naming the plain command migrated `events` instead).
pub(crate) fn migrate_command(table: &str) -> String {
    if table == crate::config::DEFAULT_TABLE {
        "outbox-relay migrate".to_string()
    } else {
        format!("outbox-relay --table {table} migrate")
    }
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaError::Missing { table } => write!(
                f,
                "table `{table}` does not exist: run `outbox::migrate_table` (or `{}`) first",
                migrate_command(table)
            ),
            SchemaError::NotMigrated { table } => write!(
                f,
                "table `{table}` is not migrated (it may have been created by the original Go package): run `outbox::migrate_table` (or `{}`) first; it upgrades the table in place",
                migrate_command(table)
            ),
            SchemaError::Outdated {
                table,
                version,
                needed,
            } => write!(
                f,
                "table `{table}` is at schema version {version}, this crate needs {needed}: run `{}` (or `outbox::migrate_table`) as a role that may change the table",
                migrate_command(table)
            ),
            SchemaError::ChannelMismatch {
                table,
                registered,
                configured,
            } => write!(
                f,
                "table `{table}` notifies channel `{registered}` but the relay listens on `{configured}`: migrate with the new channel or configure `{registered}`"
            ),
        }
    }
}

impl std::error::Error for SchemaError {}

impl Error {
    /// `true` for errors caused by the caller's input (configuration, event, argument,
    /// identifier).
    pub fn is_invalid_input(&self) -> bool {
        self.is_config()
            || matches!(
                self,
                Error::InvalidEvent { .. } | Error::InvalidArgument { .. }
            )
    }

    /// `true` for invalid settings: [`Error::Config`] and a bad table or channel name.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_) | Error::InvalidIdentifier { .. })
    }

    /// `true` when the outbox table is missing, not migrated, notifies another channel, differs
    /// from what the relay relies on, or the role lacks a privilege ([`Error::Schema`]).
    pub fn is_schema(&self) -> bool {
        matches!(self, Error::Schema(_))
    }

    /// `true` when Postgres could not be reached or the session was lost: no answer (I/O error,
    /// timeout, closed connection, TLS, or [`Error::Timeout`]), or the server refused the
    /// session — SQLSTATE class 08 (connection exception), 28 (invalid authorization), `3D000`
    /// (no such database), `53300` (too many connections), `57P01`–`57P03` (shutdown, cannot
    /// connect now).
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Postgres(e) => is_connection_error(e),
            Error::Timeout { .. } => true,
            _ => false,
        }
    }

    /// `true` for [`Error::Timeout`]: a Postgres call got no answer within its deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether a session's prepared statement is gone (SQLSTATE 26000) or its name taken
    /// (42P05): the session was moved to another server connection (a pooler in transaction or
    /// statement pooling), or someone ran `DEALLOCATE ALL` in it. What was prepared on that
    /// connection cannot be used again: the relay replaces it.
    pub(crate) fn lost_prepared_statement(&self) -> bool {
        self.as_db_error()
            .is_some_and(|db| is_moved_session(db.code()))
    }

    /// A write refused as read-only (SQLSTATE 25006): the session began while the database,
    /// role or server defaulted to `default_transaction_read_only = on` (or it is on a
    /// standby), and keeps that default however the server's changes after.
    pub(crate) fn read_only(&self) -> bool {
        self.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    }

    /// `true` for [`Error::AlreadyStarted`].
    pub fn is_already_started(&self) -> bool {
        matches!(self, Error::AlreadyStarted)
    }

    /// `true` for [`Error::StopTimeout`].
    pub fn is_stop_timeout(&self) -> bool {
        matches!(self, Error::StopTimeout(_))
    }

    /// The SQLSTATE of a Postgres server error.
    pub fn code(&self) -> Option<&SqlState> {
        self.as_db_error().map(DbError::code)
    }

    /// The Postgres server error (severity, message, detail, hint, …), when the server answered
    /// with one.
    pub fn as_db_error(&self) -> Option<&DbError> {
        match self {
            Error::Postgres(e) => e.as_db_error(),
            _ => None,
        }
    }

    /// librdkafka's error code of a Kafka error.
    pub fn kafka_code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            Error::Kafka(e) => e.rdkafka_error_code(),
            _ => None,
        }
    }

    pub(crate) fn invalid_event(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidEvent {
            field,
            reason: reason.into(),
        }
    }
}

/// See [`Error::is_connection`].
fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        return code.code().starts_with("08")
            || code.code().starts_with("28")
            || [
                SqlState::UNDEFINED_DATABASE,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
            ]
            .contains(code);
    }
    if e.is_closed() {
        return true;
    }
    // tokio-postgres' error kinds are private; its messages for the connection kinds are
    // stable: "error connecting to server", "timeout waiting for server", "error performing TLS
    // handshake", "error communicating with the server", "authentication error"; and "invalid
    // configuration" caused by "password missing" when the server asks for a password the
    // connection string does not have (a refused login; `Display` leaves the cause out).
    let text = e.to_string();
    let connection = [
        "connect",
        "timeout",
        "TLS",
        "communicating",
        "authentication",
    ]
    .iter()
    .any(|k| text.contains(k));
    connection
        || (text == "invalid configuration" && describe_causes(e).contains("password missing"))
}

/// Displays a `tokio_postgres::Error` with what the server said — severity, SQLSTATE, message,
/// detail, hint — or, for errors without a server answer, the error and its causes.
/// (`tokio_postgres::Error`'s own `Display` reads only "db error" for server errors.)
pub(crate) struct PgErrorDisplay<'a>(pub(crate) &'a tokio_postgres::Error);

impl fmt::Display for PgErrorDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(db) = self.0.as_db_error() else {
            return f.write_str(&describe_causes(self.0));
        };
        write!(f, "{}", PgBrief(db))?;
        if let Some(detail) = db.detail() {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = db.hint() {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// A prepared statement gone (26000) or its name taken by another client (42P05): the session
/// was moved to another server connection between two round trips — what a pooler in
/// transaction or statement pooling does (PgBouncer 1.18), or `DEALLOCATE` run in the session.
/// The sign that `connect()`'s pooler check and the relay's health read.
pub(crate) fn is_moved_session(code: &tokio_postgres::error::SqlState) -> bool {
    use tokio_postgres::error::SqlState;
    code == &SqlState::INVALID_SQL_STATEMENT_NAME || code == &SqlState::DUPLICATE_PSTATEMENT
}

/// A server error's severity, SQLSTATE and message, without its detail and hint (which can
/// quote a row's values).
pub(crate) struct PgBrief<'a>(pub(crate) &'a DbError);

impl fmt::Display for PgBrief<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let db = self.0;
        write!(
            f,
            "{} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        )?;
        // Said where the error shows (logs, health, `/health`'s error when its own query fails
        // so).
        if is_moved_session(db.code()) {
            f.write_str(" (the session was moved to another server connection — a pooler in transaction or statement pooling in front of it; the relay needs session pooling — or DEALLOCATE ran in it)")?;
        }
        // A relay left on a demoted primary showed only "the LISTEN connection is down". "…
        // during recovery" is a standby's alone; a write refused "in a read-only transaction"
        // is a standby's or `default_transaction_read_only`'s (LISTEN works under the latter).
        if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION {
            const PRIMARY: &str = "point the connection string at the primary, or list every host with target_session_attrs=read-write";
            if db.message().contains("during recovery") {
                write!(f, " (the server is a hot standby — a demoted primary the connection string still names? {PRIMARY})")?;
            } else {
                write!(f, " (the session is read-only: default_transaction_read_only is on for the database or role, or the server is a hot standby — {PRIMARY})")?;
            }
        }
        Ok(())
    }
}

/// `tokio_postgres::Error`'s own message is only its kind; add the causes.
fn describe_causes(e: &tokio_postgres::Error) -> String {
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
