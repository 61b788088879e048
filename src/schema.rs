//! Migrations (`migrations/*.sql`, rendered by [`render`](crate::store::render) like every
//! statement) and the schema check done at `connect()`.

use tokio_postgres::{Client, GenericClient};

use crate::error::{Error, Result, SchemaError};
use crate::store::render;

/// Longest table or channel name accepted, in bytes. Postgres identifiers hold 63 bytes
/// (`NAMEDATALEN - 1`) and the crate derives index, constraint and function names from the table
/// name with suffixes of up to 15 bytes.
pub const MAX_IDENTIFIER_LEN: usize = 48;

/// Advisory-lock class shared by everything this crate locks (`pg_advisory_lock(class, key)`).
pub(crate) const LOCK_CLASS: i32 = 0x6f62_7831; // "obx1"

/// Key of the advisory lock that serializes migrations of all tables.
const MIGRATION_LOCK_KEY: i32 = 0;

/// How long one migration attempt waits for a lock (`lock_timeout`). DDL such as re-adding a
/// check constraint takes an `ACCESS EXCLUSIVE` lock, and while it waits for one every other
/// statement on the table — the application's writers included — queues behind it: a
/// transaction left open on the table would stop all writes for as long as migrate waited.
const MIGRATION_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Attempts before `migrate` gives up on a locked table ([`Error::MigrationLocked`]).
const MIGRATION_LOCK_ATTEMPTS: u32 = 5;
/// Pause between two attempts, during which queued statements run.
const MIGRATION_LOCK_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// The schema's history, oldest first. A migration only adds (a column with a default, an
/// index, a table, a trigger that lets what it does not know pass): relays of the previous
/// build keep running on the table while the next build's `migrate` upgrades it, and after a
/// rollback (`check_migrated` takes any version at or above its own; an older `migrate` leaves
/// a newer schema as it is) — README, "Upgrading outbox".
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events table (the original's DDL)",
        sql: include_str!("../migrations/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "relay columns, status set, indexes",
        sql: include_str!("../migrations/0002_relay_columns.sql"),
    },
    Migration {
        version: 3,
        name: "wake trigger",
        sql: include_str!("../migrations/0003_wake_trigger.sql"),
    },
    Migration {
        version: 4,
        name: "batch fences",
        sql: include_str!("../migrations/0004_fence.sql"),
    },
    Migration {
        version: 5,
        name: "created_at_tz (zone-proof insertion time)",
        sql: include_str!("../migrations/0005_created_at_tz.sql"),
    },
];

/// The schema version this crate needs.
pub const SCHEMA_VERSION: i32 = 5;

/// Postgres' reserved key words (`pg_get_keywords()` category `R`) and those allowed only as
/// column labels or function/type names (category `T`): neither can name a table or a channel
/// without quotes. As of Postgres 15–17 (the test suite compares this list with the server's).
pub(crate) const SQL_KEYWORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// Checks a table or channel name: a plain, lower-case Postgres identifier
/// (`[a-z_][a-z0-9_]*`, 1–[`MAX_IDENTIFIER_LEN`] bytes) that is not an SQL key word Postgres
/// reserves (`select`, `table`, `user`, …). Anything else is refused rather than quoted, so no
/// configuration value can inject SQL or break a statement.
///
/// # Errors
/// [`Error::InvalidIdentifier`] naming `what` and the rule broken.
pub fn validate_identifier(what: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.len() > MAX_IDENTIFIER_LEN {
        Some(format!(
            "`{}` is {} bytes; at most {MAX_IDENTIFIER_LEN} (Postgres identifiers hold 63 bytes and derived names add suffixes)",
            name.escape_debug(),
            name.len()
        ))
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Some(format!(
            "`{}` is not a plain identifier: use lower-case ASCII letters, digits and '_', not starting with a digit",
            name.escape_debug()
        ))
    } else if SQL_KEYWORDS.contains(&name) {
        Some(format!(
            "`{name}` is an SQL key word Postgres reserves: choose another name (e.g. `{name}_events`)"
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidIdentifier { what, reason }),
        None => Ok(()),
    }
}

/// The advisory lock (`pg_advisory_lock(class, key)`, two `int4` keys) that a relay holds
/// exclusively while it is idle and waiting for work on `table`; writers NOTIFY only while it is
/// held or requested. In `pg_locks` it shows as `locktype = 'advisory'`, `classid = class`,
/// `objid = key` (both as unsigned 32-bit), `objsubid = 2`. Useful to monitor idle relays.
pub fn wake_lock(table: &str) -> (i32, i32) {
    (LOCK_CLASS, wake_lock_key(table))
}

/// Key of the table's wake lock (`pg_advisory_lock(LOCK_CLASS, key)`): FNV-1a of the table name.
pub(crate) fn wake_lock_key(table: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in table.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // Keep clear of MIGRATION_LOCK_KEY.
    if h == 0 {
        1
    } else {
        h as i32
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    applied: Vec<i32>,
    previous_channel: Option<String>,
    repaired: Vec<String>,
    newer: Option<i32>,
}

impl MigrationReport {
    /// Objects of recorded migrations that were missing (dropped by hand) and were created
    /// again by this call, e.g. `events_fence (table)`, `events_pending_idx (index)`, and the
    /// identity sequence of `seq` when it was behind the rows and was moved past them
    /// (e.g. `public.events_seq_seq (sequence: …)`); empty when everything was in order.
    pub fn repaired(&self) -> &[String] {
        &self.repaired
    }

    /// Versions applied by this call, ascending; empty when the table was up to date.
    pub fn applied(&self) -> &[i32] {
        &self.applied
    }

    /// The table's schema version when a newer build of this crate migrated it (above
    /// [`SCHEMA_VERSION`]): this call then left it as it is — nothing applied, nothing repaired
    /// (run the newer build's `migrate` for that).
    pub fn migrated_by_newer(&self) -> Option<i32> {
        self.newer
    }

    /// The channel the trigger notified before this call, when this call changed it.
    pub fn previous_channel(&self) -> Option<&str> {
        self.previous_channel.as_deref()
    }
}

/// Creates or upgrades the outbox table `table` (default `events`) and its wake trigger on
/// `channel` (default `outbox`), idempotently.
///
/// Recorded migrations are checked against what exists: a table, fence table, trigger, trigger
/// function or index that was dropped since is created again (see
/// [`MigrationReport::repaired`]); a dropped outbox table is created anew, empty.
///
/// Applied versions are recorded in `outbox_migrations`; the table's channel in `outbox_tables`.
/// The whole run is one transaction holding an advisory lock, so processes starting together do
/// not race. A table created with the original Go package's DDL is upgraded in place, keeping
/// every row (existing rows are numbered in `created_at` order). Calling it again with another
/// channel re-creates the trigger for the new channel.
///
/// Index creation on a large existing table blocks writes to it while it runs.
///
/// A table already up to date (registered with this channel and the latest version, nothing
/// missing) is left alone without writing anything, so that a role without
/// `create` on the schema — the relay's, with `outbox-relay run --migrate` — passes when there is
/// nothing to do.
///
/// A table a newer build of this crate migrated (a version above [`SCHEMA_VERSION`] in
/// `outbox_migrations`, as after rolling a deployment back) is left as it is, with an info log
/// line: its recorded version stays, so the newer relays still start on it.
///
/// `client` must not be inside a transaction: the migration runs its own.
///
/// Each attempt waits at most 2 s for a lock (`lock_timeout`): while DDL waits for a lock on
/// the table, the application's writes to it queue behind it. A table other sessions keep
/// locked is tried 5 times, 1 s apart (about 14 s), each refusal logged at warn with the
/// sessions holding locks on it.
///
/// # Errors
/// [`Error::InvalidIdentifier`] for a bad table or channel name; [`Error::Schema`] when a newer
/// build migrated the table and `channel` is not its registered one; [`Error::Config`] naming the
/// server's version when it is older than Postgres 13 (nothing is applied); [`Error::MigrationLocked`]
/// naming the sessions that held the table through every attempt; [`Error::Postgres`] when a
/// statement fails (nothing is applied then: the transaction rolls back).
pub async fn migrate_table(client: &Client, table: &str, channel: &str) -> Result<MigrationReport> {
    validate_identifier("table", table)?;
    validate_identifier("channel", channel)?;
    refuse_old_server(client, None).await?;
    // Read-only; any doubt (a query the role may not run) takes the full path.
    if let Ok(Some(version)) = up_to_date(client, table, channel).await {
        if version > SCHEMA_VERSION {
            return leave_a_newer_schema(table, channel, Some(channel), version);
        }
        return Ok(MigrationReport {
            applied: Vec::new(),
            previous_channel: None,
            repaired: Vec::new(),
            newer: None,
        });
    }
    let mut attempt = 1;
    loop {
        match migrate_once(client, table, channel).await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                let holders = lock_holders(client, table)
                    .await
                    .unwrap_or_else(|e| format!("(they could not be listed: {e})"));
                if attempt == MIGRATION_LOCK_ATTEMPTS {
                    return Err(Error::MigrationLocked(format!(
                        "could not lock table {table} in {attempt} attempts of {:?} each; \
                         sessions holding locks on it: {holders}. End their transactions (or \
                         stop the relays) and run migrate again; nothing was changed",
                        MIGRATION_LOCK_TIMEOUT
                    )));
                }
                tracing::warn!(
                    table,
                    attempt,
                    holders,
                    "outbox migrate: another session holds a lock on the table; trying again"
                );
                tokio::time::sleep(MIGRATION_LOCK_PAUSE).await;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// The sessions holding a lock on `table`, for [`Error::MigrationLocked`]: pid,
/// `application_name`, state and transaction age, oldest transaction first (at most 10).
async fn lock_holders(client: &Client, table: &str) -> Result<String> {
    let rows = client
        .query(include_str!("sql/lock_holders.sql"), &[&table])
        .await?;
    Ok(describe_lock_holders(rows.iter().map(|r| LockHolder {
        pid: r.get(0),
        application_name: r.get(1),
        state: r.get(2),
        transaction_age: r.get(3),
    })))
}

/// A row of `lock_holders.sql`.
struct LockHolder {
    pid: i32,
    application_name: String,
    state: Option<String>,
    /// Seconds; `None` for another role's session without `pg_read_all_stats`.
    transaction_age: Option<f64>,
}

/// The holders as [`Error::MigrationLocked`] names them. A relay's batch holds the table for
/// one batch — at most the relay's lease, after which Postgres ends its session
/// (`idle_in_transaction_session_timeout`) — so relay batches are counted at the end, not
/// listed beside the session to end (a new user found them listed first and took them for the
/// blocker; a breaker helper saw them listed with "age unknown" for the README's migrator, which
/// may not read other roles' session times).
fn describe_lock_holders(holders: impl Iterator<Item = LockHolder>) -> String {
    let mut named = Vec::new();
    let mut batches = 0;
    let mut oldest_batch: Option<f64> = None;
    for h in holders {
        if h.application_name == "outbox-relay-batch" {
            batches += 1;
            if let Some(s) = h.transaction_age {
                oldest_batch = Some(oldest_batch.map_or(s, |o| o.max(s)));
            }
            continue;
        }
        let state = h
            .state
            .unwrap_or_else(|| "state unknown to this role".into());
        let age = match h.transaction_age {
            Some(s) => format!("transaction open {s:.0} s"),
            None => "transaction age unknown to this role".into(),
        };
        named.push(format!(
            "pid {} (\"{}\", {state}, {age})",
            h.pid,
            crate::text::printable(&h.application_name),
        ));
    }
    let mut text = match named.is_empty() {
        true => "none but relay batches".to_string(),
        false => named.join(", "),
    };
    if batches > 0 {
        let oldest = match oldest_batch {
            Some(s) => format!(", the oldest open {s:.0} s"),
            None => String::new(),
        };
        text.push_str(&format!(
            " (and {batches} relay batch(es){oldest}: each holds the table for one batch, ended by the relay's lease at the latest)"
        ));
    }
    if named.is_empty() && batches == 0 {
        text = "none any more".to_string();
    }
    text
}

/// One attempt of [`migrate_table`]'s transaction.
async fn migrate_once(client: &Client, table: &str, channel: &str) -> Result<MigrationReport> {
    client.batch_execute("begin").await?;
    match migrate_in_tx(client, table, channel).await {
        Ok(report) => {
            client.batch_execute("commit").await?;
            if !report.repaired.is_empty() {
                tracing::warn!(table, repaired = %report.repaired.join(", "), "outbox migrate: objects were missing or disabled, or the seq sequence was behind the rows; repaired them");
            }
            // The migrating role owns the table: analyze a new one now, so that a relay role
            // that is not its owner (the README's roles) finds it analyzed.
            if let Err(e) = analyze_if_never_analyzed(client, table).await {
                tracing::warn!(table, error = %e, "outbox migrate: the new table could not be analyzed; a relay's reservations may be slow until autovacuum analyzes it");
            }
            Ok(report)
        }
        Err(e) => {
            // The connection may be gone; the server rolls back then anyway.
            let _ = client.batch_execute("rollback").await;
            Err(e)
        }
    }
}

/// Whether `table` is registered with `channel` and [`SCHEMA_VERSION`] or a newer version
/// (which `migrate` registers in the transaction that applied every migration) and misses none of its objects
/// (see [`missing_objects`]). Reads only what the relay role may read (`outbox_tables`, the
/// catalogs).
async fn up_to_date(client: &Client, table: &str, channel: &str) -> Result<Option<i32>> {
    let bookkeeping = client
        .query_one("select to_regclass('outbox_tables') is not null", &[])
        .await?;
    if !bookkeeping.get::<_, bool>(0) {
        return Ok(None);
    }
    let registered = client
        .query_opt(include_str!("sql/table_channel.sql"), &[&table])
        .await?
        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)));
    // At or above this build's version: a newer build's `migrate` registers its own.
    let Some(version) = registered
        .filter(|(c, v)| c == channel && *v >= SCHEMA_VERSION)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    // A sequence check that fails (what keeps the role from reading the table is named
    // elsewhere) sends nobody down the path that writes.
    let intact = missing_objects(client, table).await?.is_empty()
        && crate::schema_check::sequence_behind(client, table)
            .await
            .map_or(true, |behind| behind.is_none());
    Ok(intact.then_some(version))
}

/// [`migrate_table`] for the default table `events` and channel `outbox`.
///
/// # Errors
/// As [`migrate_table`].
pub async fn migrate(client: &Client) -> Result<MigrationReport> {
    migrate_table(
        client,
        crate::config::DEFAULT_TABLE,
        crate::config::DEFAULT_CHANNEL,
    )
    .await
}

/// Bookkeeping tables shared by every outbox table, created before each table's migrations.
const BOOKKEEPING: &str = include_str!("../migrations/bookkeeping.sql");

impl Migration {
    /// Whether the migration renders the channel (the wake trigger): it is applied again when
    /// the table's channel changes.
    fn uses_channel(&self) -> bool {
        self.sql.contains("{{channel}}")
    }
}

async fn migrate_in_tx(client: &Client, table: &str, channel: &str) -> Result<MigrationReport> {
    let tx = client;
    // `if not exists` / `if exists` statements answer with NOTICEs ("… already exists,
    // skipping"), which clients print as log lines that look like errors: not for this
    // transaction.
    tx.batch_execute("set local client_min_messages = warning")
        .await?;
    tx.execute(
        "select pg_advisory_xact_lock($1, $2)",
        &[&LOCK_CLASS, &MIGRATION_LOCK_KEY],
    )
    .await?;
    // After the advisory lock: another migrate holding that one is waited for.
    tx.batch_execute(&format!(
        "set local lock_timeout = {}",
        MIGRATION_LOCK_TIMEOUT.as_millis()
    ))
    .await?;
    tx.batch_execute(BOOKKEEPING).await?;
    let done: Vec<i32> = tx
        .query(include_str!("sql/migrations_applied.sql"), &[&table])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let previous_channel: Option<String> = tx
        .query_opt(include_str!("sql/table_channel.sql"), &[&table])
        .await?
        .map(|r| r.get(0));
    let channel_changed = previous_channel.as_deref().is_some_and(|c| c != channel);
    if let Some(newer) = done.iter().copied().max().filter(|v| *v > SCHEMA_VERSION) {
        return leave_a_newer_schema(table, channel, previous_channel.as_deref(), newer);
    }
    if done.is_empty() {
        refuse_running_go_relay(tx, table).await?;
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let applied_before = done.contains(&m.version);
        if applied_before && !(m.uses_channel() && channel_changed) {
            continue;
        }
        tracing::info!(
            table,
            version = m.version,
            name = m.name,
            "applying outbox migration"
        );
        tx.batch_execute(&render(m.sql, table, channel, &[]))
            .await?;
        if !applied_before {
            tx.execute(
                include_str!("sql/migration_record.sql"),
                &[&table, &m.version, &m.name],
            )
            .await?;
            applied.push(m.version);
        }
    }
    tx.execute(
        include_str!("sql/table_register.sql"),
        &[&table, &channel, &SCHEMA_VERSION],
    )
    .await?;
    let mut repaired = repair_missing(tx, table, channel).await?;
    repaired.extend(repair_sequence(tx, table).await?);
    let previous_channel = previous_channel.filter(|c| c != channel);
    Ok(MigrationReport {
        applied,
        previous_channel,
        repaired,
        newer: None,
    })
}

/// A table a newer build of this crate migrated (its `outbox_migrations` holds version `newer`,
/// above [`SCHEMA_VERSION`]) is left as it is: recording this build's version would make the
/// newer relays refuse it as outdated, and re-creating what this build knows could undo what
/// the newer migrations changed. Reached when a deployment is rolled back to an older build
/// that runs `migrate` at start (`run --migrate`); the older relay runs on the newer schema
/// (`check_migrated` takes any version at or above its own, and migrations only add).
///
/// # Errors
/// [`Error::Schema`] when the call asks for another channel than the registered one: only a
/// build that knows the newer schema may re-create its trigger.
fn leave_a_newer_schema(
    table: &str,
    channel: &str,
    registered_channel: Option<&str>,
    newer: i32,
) -> Result<MigrationReport> {
    if let Some(registered) = registered_channel.filter(|c| *c != channel) {
        return Err(Error::Schema(format!(
            "`{table}` was migrated to schema version {newer} by a newer outbox than this one (which knows versions up to {SCHEMA_VERSION}); this build cannot change its channel from `{registered}` to `{channel}`: run the newer outbox's migrate, or keep the channel `{registered}`; nothing was changed"
        )));
    }
    tracing::info!(
        table,
        schema_version = newer,
        this_build = SCHEMA_VERSION,
        "outbox migrate: the table was migrated by a newer outbox; left as it is, nothing applied or repaired (this build's relay runs on it; repairs need the newer build's migrate)"
    );
    Ok(MigrationReport {
        applied: Vec::new(),
        previous_channel: None,
        repaired: Vec::new(),
        newer: Some(newer),
    })
}

/// The columns of the Go package's table (`migrations/0001_events.sql`): an existing table that
/// `migrate` adopts must have them all.
const GO_COLUMNS: [&str; 8] = [
    "id",
    "aggregate_id",
    "event_topic",
    "event_type",
    "payload",
    "status",
    "created_at",
    "reserved_to",
];

/// Refuses to adopt an existing table that is not the Go package's (a column of [`GO_COLUMNS`]
/// missing: the migrations would fail on it half-way with a bare "column does not exist"), and
/// a Go package's table while its relay still holds reservations: left running after `migrate`,
/// the Go relay (`status != 'done'`) would publish this crate's dead letters and ignore its
/// order per aggregate. A table that does not exist yet has nothing to check.
///
/// # Errors
/// [`Error::Schema`] naming the missing columns, or the reserved rows and the latest lease end;
/// [`Error::Postgres`] when a query fails.
async fn refuse_running_go_relay(tx: &Client, table: &str) -> Result<()> {
    let row = tx
        .query_one(
            "select to_regclass($1) is not null, coalesce(array_agg(attname::text order by attnum) filter (where attnum > 0 and not attisdropped), '{}') from pg_attribute where attrelid = to_regclass($1)",
            &[&table],
        )
        .await?;
    let (exists, columns): (bool, Vec<String>) = (row.get(0), row.get(1));
    if !exists {
        return Ok(());
    }
    let missing: Vec<&str> = GO_COLUMNS
        .into_iter()
        .filter(|c| !columns.iter().any(|have| have == c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Schema(format!(
            "table {table} exists but is not the Go package's events table: no column {} (it has {}). migrate creates a new table or upgrades the Go package's; choose another table name or rename this one; nothing was changed",
            missing.join(", "),
            columns.join(", ")
        )));
    }
    let row = tx
        .query_one(
            &render(
                include_str!("sql/go_relay_reservations.sql"),
                table,
                "",
                &[],
            ),
            &[],
        )
        .await?;
    let (count, until): (i64, Option<String>) = (row.get(0), row.get(1));
    if count == 0 {
        return Ok(());
    }
    Err(Error::Schema(format!(
        "table {table}: {count} row(s) are reserved by the Go package's relay (reserved_to in the future, the latest until {}): it is still running, or stopped less than a lease ago. Stop it and run migrate again once its leases have run out (see the README, Switching from the Go package); nothing was changed",
        until.as_deref().unwrap_or("?")
    )))
}

/// Recorded migrations whose objects were dropped since: re-runs their idempotent DDL. Returns
/// the objects re-created, e.g. `events_fence (table)`.
///
/// # Errors
/// [`Error::Schema`] when an object is still missing afterwards; [`Error::Postgres`] when a
/// statement fails.
async fn repair_missing(tx: &Client, table: &str, channel: &str) -> Result<Vec<String>> {
    let missing = missing_objects(tx, table).await?;
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    // Warned about once committed (see `migrate_once`): an attempt that waits for a lock
    // rolls back and comes here again.
    tracing::debug!(table, missing = %describe_missing(&missing), "outbox objects missing or disabled; repairing");
    let any = |kinds: &[&str]| missing.iter().any(|m| kinds.contains(&m.kind));
    let table_gone = missing.iter().any(|m| m.kind == "table" && m.name == table);
    let mut ddl: Vec<&str> = Vec::new();
    if table_gone {
        ddl.extend(MIGRATIONS.iter().map(|m| m.sql));
    } else {
        if any(&["index"]) {
            ddl.push(REPAIR_INDEXES);
        }
        if any(&["trigger", "disabled trigger", "function"]) {
            ddl.extend(
                MIGRATIONS
                    .iter()
                    .filter(|m| m.uses_channel())
                    .map(|m| m.sql),
            );
        }
        if any(&["constraint"]) {
            ddl.push(REPAIR_STATUS_CHECK);
        }
        if any(&["table"]) {
            ddl.extend(
                MIGRATIONS
                    .iter()
                    .filter(|m| m.version == FENCE_VERSION)
                    .map(|m| m.sql),
            );
        }
    }
    for sql in ddl {
        let done = tx.batch_execute(&render(sql, table, channel, &[])).await;
        if sql == REPAIR_STATUS_CHECK
            && done.as_ref().err().and_then(|e| e.code())
                == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
        {
            return Err(Error::Schema(format!(
                "table `{table}`: cannot re-add `{table}_status_check`: some rows hold a status other than new, done or failed (`select status, count(*) from {table} group by status`); fix or delete them, then run migrate again"
            )));
        }
        done?;
    }
    let still = missing_objects(tx, table).await?;
    if !still.is_empty() {
        return Err(Error::Schema(format!(
            "table `{table}`: could not repair {}",
            describe_missing(&still)
        )));
    }
    Ok(missing
        .iter()
        .map(|m| format!("{} ({})", m.name, m.kind))
        .collect())
}

/// Moves the identity sequence of `seq` past every row when it would hand out a value at or
/// below an existing row's (see [`sequence_behind`](crate::schema_check::sequence_behind)):
/// returns what it did, for [`MigrationReport::repaired`]. Only then is the whole table read
/// for its highest `seq` (no index covers every row).
///
/// # Errors
/// [`Error::Postgres`] when a statement fails.
async fn repair_sequence(tx: &Client, table: &str) -> Result<Option<String>> {
    let Some((name, next, _)) = crate::schema_check::sequence_behind(tx, table).await? else {
        return Ok(None);
    };
    let max: i64 = tx
        .query_one(
            &format!("select setval($1::text::regclass, (select max(seq) from {table}))"),
            &[&name],
        )
        .await?
        .get(0);
    Ok(Some(format!(
        "{name} (sequence: would have handed out {next}, below the rows; moved to {max})"
    )))
}

/// The indexes of migration 2, each created only if missing.
const REPAIR_INDEXES: &str = include_str!("../migrations/repair_indexes.sql");

/// Migration 2's check constraint on `status`, re-added when missing.
const REPAIR_STATUS_CHECK: &str = include_str!("../migrations/repair_status_check.sql");

/// The migration that creates the fence table (`{table}_fence`).
const FENCE_VERSION: i32 = 4;

/// An object the migrations create that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Missing {
    pub(crate) kind: &'static str,
    pub(crate) name: String,
}

/// The migrations' objects for `table` that do not exist (in the search path).
pub(crate) async fn missing_objects<C: GenericClient>(
    client: &C,
    table: &str,
) -> Result<Vec<Missing>> {
    let mut wanted: Vec<(&'static str, String)> = vec![
        ("table", table.to_string()),
        ("table", format!("{table}_fence")),
        ("index", format!("{table}_pending_idx")),
        ("index", format!("{table}_aggregate_open_idx")),
        ("index", format!("{table}_done_idx")),
        ("function", format!("{table}_outbox_wake")),
    ];
    let rows = client
        .query(
            "select w.kind, w.name,
                    case w.kind
                      when 'function' then to_regproc(w.name) is not null
                      else to_regclass(w.name) is not null end
               from unnest($1::text[], $2::text[]) as w(kind, name)",
            &[
                &wanted.iter().map(|w| w.0).collect::<Vec<_>>(),
                &wanted.iter().map(|w| w.1.clone()).collect::<Vec<_>>(),
            ],
        )
        .await?;
    let mut missing: Vec<Missing> = Vec::new();
    for (r, w) in rows.iter().zip(wanted.drain(..)) {
        if !r.get::<_, bool>(2) {
            missing.push(Missing {
                kind: w.0,
                name: w.1,
            });
        }
    }
    // The trigger (a disabled one counts as missing: writers never wake the relay) and the
    // status check, only meaningful when the table exists.
    if !missing.iter().any(|m| m.name == table) {
        let trigger = format!("{table}_outbox_wake");
        let check = format!("{table}_status_check");
        let present = client
            .query_one(
                "select (select tgenabled in ('O', 'A') from pg_trigger
                          where tgrelid = to_regclass($1) and tgname = $2),
                        exists(select 1 from pg_constraint
                                where conrelid = to_regclass($1) and conname = $3)",
                &[&table, &trigger, &check],
            )
            .await?;
        match present.get::<_, Option<bool>>(0) {
            Some(true) => {}
            Some(false) => missing.push(Missing {
                kind: "disabled trigger",
                name: trigger,
            }),
            None => missing.push(Missing {
                kind: "trigger",
                name: trigger,
            }),
        }
        if !present.get::<_, bool>(1) {
            missing.push(Missing {
                kind: "constraint",
                name: check,
            });
        }
    }
    Ok(missing)
}

fn describe_missing(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(|m| format!("{} `{}`", m.kind, m.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `ANALYZE` on `table` when Postgres has never analyzed it (`pg_class.reltuples` < 0,
/// Postgres ≥ 14: a table created, restored or upgraded since, before autovacuum's first
/// analyze): the planner then takes the reservation's candidates and gate for one row each and
/// joins them with a nested loop, quadratic in the batch (EXPLAIN ANALYZE on 20k fresh rows:
/// 122 ms for 1,000 rows, 443 ms for 2,000, 1,737 ms for 4,000, against 7, 14 and 26 ms after
/// any `ANALYZE`, even of the empty table). Whether it analyzed.
///
/// # Errors
/// [`Error::Schema`] when the role does not own the table (Postgres then skips it with a
/// warning only); the Postgres error of the `ANALYZE`. The caller only logs it.
pub(crate) async fn analyze_if_never_analyzed(client: &Client, table: &str) -> Result<bool> {
    let state: Option<(bool, bool)> = client
        .query_opt(
            "select c.reltuples < 0, pg_has_role(c.relowner, 'USAGE') \
               from pg_class c where c.oid = to_regclass($1::text)",
            &[&table],
        )
        .await?
        .map(|r| (r.get(0), r.get(1)));
    match state {
        Some((true, true)) => {}
        Some((true, false)) => {
            return Err(Error::Schema(format!(
                "the connected role does not own `{table}`, and Postgres analyzes a table only for its owner (run `analyze {table}` as the owner, or migrate again with this version)"
            )))
        }
        _ => return Ok(false),
    }
    client.batch_execute(&format!("analyze {table}")).await?;
    Ok(true)
}

/// Checks, for a relay, that `table` is migrated to [`SCHEMA_VERSION`] and notifies on
/// `channel`, that its columns and objects are what the relay relies on, and that the connected
/// role has the relay's privileges, and that no writer can plant functions or operators on its
/// `search_path` ([`crate::schema_check::untrusted_creators`]). Every problem found is reported
/// at once.
pub(crate) async fn check<C: GenericClient>(client: &C, table: &str, channel: &str) -> Result<()> {
    let mut problems = crate::schema_check::untrusted_creators(client, table).await?;
    problems.extend(crate::schema_check::missing_relay_privileges(client, table).await?);
    problems.extend(crate::schema_check::row_security_problems(client, table).await?);
    match check_migrated(client, table).await {
        Ok(registered_channel) => {
            if registered_channel != channel {
                problems.push(
                    SchemaError::ChannelMismatch {
                        table: table.to_string(),
                        registered: registered_channel,
                        configured: channel.to_string(),
                    }
                    .to_string(),
                );
            }
            problems.extend(crate::schema_check::schema_deviations(client, table).await?);
        }
        Err(Error::Schema(msg)) => problems.push(msg),
        // A permission error while reading outbox_tables: already named above.
        Err(Error::Postgres(_)) if !problems.is_empty() => {}
        Err(e) => return Err(e),
    }
    // Two checks can find the same problem (e.g. a privilege the role lacks): name it once.
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    match problems.len() {
        0 => Ok(()),
        1 => Err(Error::Schema(problems.remove(0))),
        n => Err(Error::Schema(format!(
            "{n} problems with table `{table}`:\n  - {}",
            problems.join("\n  - ")
        ))),
    }
}

/// Checks that `table` is migrated to [`SCHEMA_VERSION`]; returns its channel.
pub(crate) async fn check_migrated<C: GenericClient>(client: &C, table: &str) -> Result<String> {
    let exists: bool = client
        .query_one("select to_regclass($1) is not null", &[&table])
        .await?
        .get(0);
    if !exists {
        return Err(Error::Schema(
            SchemaError::Missing {
                table: table.to_string(),
            }
            .to_string(),
        ));
    }
    let registered = client
        .query_opt(include_str!("sql/table_channel.sql"), &[&table])
        .await;
    let row = match registered {
        Ok(row) => row,
        // outbox_tables missing: a table made by the original DDL, never migrated.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            return Err(Error::Schema(format!(
                "this role cannot read `outbox_tables` ({}): the relay and operators (`status`, `find`, `requeue`) need `grant select on outbox_tables to <role>` (and `select, update` on `{table}`); see scripts/roles.sql",
                crate::error::PgErrorDisplay(&e)
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let Some(row) = row else {
        return Err(Error::Schema(
            SchemaError::NotMigrated {
                table: table.to_string(),
            }
            .to_string(),
        ));
    };
    let registered_channel: String = row.get(0);
    let version: i32 = row.get(1);
    // Read back from the database: anyone with write access to outbox_tables could have put SQL
    // there. It is only ever a bind parameter, and must still be a plain identifier.
    if let Err(e) = validate_identifier("channel", &registered_channel) {
        return Err(Error::Schema(format!(
            "outbox_tables.channel for table `{table}` is not a valid channel name ({e}): it was changed outside `migrate`; run `outbox-relay --channel <name> migrate` to reset it"
        )));
    }
    if version < SCHEMA_VERSION {
        return Err(Error::Schema(
            SchemaError::Outdated {
                table: table.to_string(),
                version,
                needed: SCHEMA_VERSION,
            }
            .to_string(),
        ));
    }
    Ok(registered_channel)
}

/// Refuses a server older than Postgres 13 (see `pg::MIN_SERVER_VERSION_NUM`) on a session
/// that does not go through `connect()`'s pooler probe (which reads the version itself): within
/// `timeout`, or unbounded (`None`: [`migrate_table`] on the caller's client, which sets its own
/// deadlines).
///
/// # Errors
/// [`Error::Config`] naming the version; [`Error::Postgres`] / [`Error::Timeout`] when the
/// query fails or misses `timeout`.
pub(crate) async fn refuse_old_server(
    client: &Client,
    timeout: Option<std::time::Duration>,
) -> Result<()> {
    let check = async {
        crate::pg::server_version_problem(client)
            .await
            .map_err(Error::Postgres)
    };
    let problem = match timeout {
        Some(t) => crate::pg::bounded("version check", t, check).await?,
        None => check.await?,
    };
    match problem {
        Some(problem) => Err(Error::Config(crate::error::ConfigErrors::new(vec![
            format!("database_url: {problem}"),
        ]))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{describe_lock_holders, LockHolder};

    fn holder(pid: i32, name: &str, age: Option<f64>) -> LockHolder {
        LockHolder {
            pid,
            application_name: name.to_string(),
            state: Some("idle in transaction".to_string()),
            transaction_age: age,
        }
    }

    /// A relay's batches are counted (with the oldest age known), not listed beside the
    /// session to end; whatever their age or whether it is known.
    #[test]
    fn relay_batches_are_counted_not_named() {
        let text = describe_lock_holders(
            [
                holder(7, "psql", Some(40.0)),
                holder(8, "outbox-relay-batch", Some(0.3)),
                holder(9, "outbox-relay-batch", Some(30.0)),
                holder(10, "outbox-relay-batch", None),
                holder(11, "app", None),
            ]
            .into_iter(),
        );
        assert_eq!(
            text,
            "pid 7 (\"psql\", idle in transaction, transaction open 40 s), \
             pid 11 (\"app\", idle in transaction, transaction age unknown to this role) \
             (and 3 relay batch(es), the oldest open 30 s: each holds the table for one batch, \
             ended by the relay's lease at the latest)"
        );
        let unknown = describe_lock_holders([holder(8, "outbox-relay-batch", None)].into_iter());
        assert_eq!(
            unknown,
            "none but relay batches (and 1 relay batch(es): each holds the table for one batch, \
             ended by the relay's lease at the latest)"
        );
        assert_eq!(describe_lock_holders([].into_iter()), "none any more");
    }
}
