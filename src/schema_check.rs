//! What the relay assumes about the migrated schema and its own role, checked against the
//! catalog at `connect()` (and the schema part by `status`): every deviation is reported at
//! once, each with what to do.

use tokio_postgres::GenericClient;

use crate::error::Result;

/// A column the relay reads or writes: name, accepted types (`format_type` without the type
/// modifier), and whether it must be `NOT NULL` (the relay reads it as a non-null value).
struct Column {
    name: &'static str,
    types: &'static [&'static str],
    not_null: bool,
}

const TEXT: &[&str] = &["character varying", "text"];
const TIMESTAMP: &[&str] = &["timestamp without time zone", "timestamp with time zone"];
const TIMESTAMPTZ: &[&str] = &["timestamp with time zone"];

const COLUMNS: &[Column] = &[
    Column {
        name: "id",
        types: &["uuid"],
        not_null: true,
    },
    Column {
        name: "seq",
        types: &["bigint"],
        not_null: true,
    },
    Column {
        name: "aggregate_id",
        types: TEXT,
        not_null: true,
    },
    Column {
        name: "event_topic",
        types: TEXT,
        not_null: true,
    },
    Column {
        name: "event_type",
        types: TEXT,
        not_null: true,
    },
    Column {
        name: "payload",
        types: &["jsonb"],
        not_null: true,
    },
    Column {
        name: "status",
        types: TEXT,
        not_null: true,
    },
    Column {
        name: "created_at",
        types: TIMESTAMP,
        not_null: false,
    },
    Column {
        name: "reserved_to",
        types: TIMESTAMP,
        not_null: false,
    },
    Column {
        name: "attempts",
        types: &["integer"],
        not_null: true,
    },
    Column {
        name: "last_error",
        types: TEXT,
        not_null: false,
    },
    Column {
        name: "headers",
        types: &["jsonb"],
        not_null: false,
    },
    Column {
        name: "next_attempt_at",
        types: TIMESTAMPTZ,
        not_null: false,
    },
    Column {
        name: "published_at",
        types: TIMESTAMPTZ,
        not_null: false,
    },
    Column {
        name: "kafka_partition",
        types: &["integer"],
        not_null: false,
    },
    Column {
        name: "kafka_offset",
        types: &["bigint"],
        not_null: false,
    },
];

/// Deviations of `table` (which exists) from what the relay relies on: missing columns, other
/// types, nullable columns the relay reads as non-null, and missing objects (the fence table,
/// the wake trigger, the status check, and the rest of [`missing_objects`]: indexes, the
/// trigger's function). Empty when all is well. The one check of the schema's shape, used by
/// `connect()` and `status`.
///
/// [`missing_objects`]: crate::schema::missing_objects
///
/// # Errors
/// [`Error::Postgres`](crate::Error::Postgres) when the catalog cannot be read.
pub(crate) async fn schema_deviations<C: GenericClient>(
    client: &C,
    table: &str,
) -> Result<Vec<String>> {
    // (Writers that could plant functions or operators are checked before this by its
    // callers: `schema::check` at `connect()`, `Admin`'s calls before any statement.)
    let mut problems = column_deviations(client, table).await?;
    problems.extend(missing_object_problems(client, table).await?);
    if problems.is_empty() {
        problems.extend(sequence_problems(client, table).await);
    }
    if !problems.is_empty() {
        if let Some(newer) = migrated_by_newer(client, table).await {
            // This build's `migrate` changes nothing on a newer schema (see
            // `MigrationReport::migrated_by_newer`): its advice to run `migrate` would mislead
            // (found by a breaker helper).
            problems.insert(0, format!(
                "`{table}` is at schema version {newer}, migrated by a newer outbox (this build knows {}): the problems below are measured against this build's schema, and this build's `migrate` leaves the table as it is — where they say to run `migrate`, run the newer build's `status` and `migrate`, and its relays",
                crate::schema::SCHEMA_VERSION
            ));
        }
    }
    Ok(problems)
}

/// The schema version of `table` when a newer outbox migrated it (above
/// [`SCHEMA_VERSION`](crate::schema::SCHEMA_VERSION)); `None` otherwise, or when it cannot be
/// read (the other checks name that). Read where `migrate` decides it — the highest version in
/// `outbox_migrations` (a breaker helper set only `outbox_tables.schema_version` by hand, and
/// `status` said `migrate` would leave the table while it repaired it) — and from
/// `outbox_tables` for a role that may not read `outbox_migrations` (the relay's).
async fn migrated_by_newer<C: GenericClient>(client: &C, table: &str) -> Option<i32> {
    let version = match client
        .query(include_str!("sql/migrations_applied.sql"), &[&table])
        .await
    {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| r.try_get::<_, i32>(0).ok())
            .max()?,
        Err(_) => client
            .query_opt(include_str!("sql/table_channel.sql"), &[&table])
            .await
            .ok()??
            .try_get(1)
            .ok()?,
    };
    (version > crate::schema::SCHEMA_VERSION).then_some(version)
}

/// The schemas on the session's `search_path` in which a role that is not trusted may create
/// objects, each with the fix. Postgres resolves a function or operator call to the best match
/// on the path, and one in such a schema taking `varchar` exactly beats `pg_catalog`'s, which
/// needs a cast: `hashtext(aggregate_id)`, `status <> 'done'` and the like in the relay's SQL
/// would run that role's code with the relay's — or an operator's — privileges (CVE-2018-1058;
/// a breaker helper, as a writer with `create` on `public`, read the events it may not read,
/// marked 40 of them done unpublished, and made itself superuser when a superuser ran
/// `outbox-relay status`). Named: every role that can act as a writer of the table (see
/// [`UNTRUSTED`]) and may create in a schema on the path — by a grant (to it, to a role it
/// belongs to, or to `PUBLIC`, as before Postgres 15), or owning it (as the owner of the
/// database owns `public` since Postgres 15) — and the functions and operators such a role
/// can act as the owner of there (a second breaker helper got past a first form five ways:
/// column-level `insert`, `create` through a group, a `noinherit` member, a schema the writer
/// owns first on the path, the writer owning the database). A migrator that may create but
/// not write events is not named.
///
/// # Errors
/// [`Error::Postgres`](crate::Error::Postgres) when the catalog cannot be read.
pub(crate) async fn untrusted_creators<C: GenericClient>(
    client: &C,
    table: &str,
) -> Result<Vec<String>> {
    let creators = format!(
        "{UNTRUSTED}
         select p.nspname::text, string_agg(quote_ident(u.rolname), ', ' order by u.rolname)
           from path p
           join untrusted u
             on exists (select 1 from pg_roles g
                         where has_schema_privilege(g.oid, p.oid, 'CREATE')
                           and pg_has_role(u.oid, g.oid, 'MEMBER'))
          group by p.nspname
          order by p.nspname"
    );
    // What such a role created there before (a revoke leaves it in place).
    let planted = format!(
        "{UNTRUSTED}
         select p.nspname::text, o.what, quote_ident(r.rolname)
           from (select pronamespace, proowner, 'function ' || oid::regprocedure::text
                   from pg_proc
                 union all
                 select oprnamespace, oprowner, 'operator ' || oid::regoperator::text
                   from pg_operator) o (ns, owner, what)
           join path p on p.oid = o.ns
           join pg_roles r on r.oid = o.owner
          where exists (select 1 from untrusted u where pg_has_role(u.oid, o.owner, 'MEMBER'))
          order by 1, 2"
    );
    let mut problems: Vec<String> = (client.query(&creators, &[&table]).await?.iter())
        .map(|r| {
            let (schema, roles): (String, String) = (r.get(0), r.get(1));
            format!(
                "schema `{schema}` is on the relay's search_path and roles that write the outbox table (or can act as one of its writers) may create objects in it ({roles}, by a grant, through a role they belong to, or owning it): a function or operator created there would run in the relay's SQL with its privileges, or an operator's running `status` (CVE-2018-1058); revoke their `create` on it (`revoke create on schema {schema} from …`; Postgres 15 and later no longer grant it to public), or take the schema off the role's search_path"
            )
        })
        .collect();
    problems.extend((client.query(&planted, &[&table]).await?.iter()).map(|r| {
        let (schema, what, owner): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        format!(
            "{what} in schema `{schema}`, on the relay's search_path, belongs to {owner}, a role a writer of the outbox table can act as: the relay's SQL could call it with its privileges (CVE-2018-1058); drop it, or move it out of the search_path, after checking what it does"
        )
    }));
    Ok(problems)
}

/// The common part of [`untrusted_creators`]' queries (`$1` the table): `path`, the schemas on
/// the session's `search_path`; `writer`, the roles that may insert into the table (any column:
/// a column-level grant too); `untrusted`, every role that can act as a writer — the writers,
/// and the roles that are members of one, also without inheriting (`set role`) — but
/// superusers, the connected role and the table's owner (who can change the table anyway). A
/// superuser has every role's privileges, so membership is read with `pg_has_role(…,
/// 'MEMBER')` from the untrusted side only: a superuser running `status` is what must not be
/// led astray.
const UNTRUSTED: &str = "with path as (
            select oid, nspname from pg_namespace where nspname = any (current_schemas(false))),
          writer as (
            select r.oid from pg_roles r
             where coalesce(has_any_column_privilege(r.oid, to_regclass($1), 'INSERT'), false)),
          untrusted as (
            select u.oid, u.rolname from pg_roles u
             where not u.rolsuper and u.rolname <> current_user
               and u.oid <> coalesce((select relowner from pg_class
                                       where oid = to_regclass($1)), 0)
               and exists (select 1 from writer w where pg_has_role(u.oid, w.oid, 'MEMBER')))";

/// Missing columns, other types and nullable columns the relay reads as non-null.
async fn column_deviations<C: GenericClient>(client: &C, table: &str) -> Result<Vec<String>> {
    let rows = client
        .query(
            "select a.attname::text, format_type(a.atttypid, null), a.attnotnull
               from pg_attribute a
              where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped",
            &[&table],
        )
        .await?;
    let mut problems = Vec::new();
    for c in COLUMNS {
        let Some(row) = rows.iter().find(|r| r.get::<_, String>(0) == c.name) else {
            problems.push(format!(
                "column `{table}.{}` is missing: run `{}` (or `outbox::migrate_table`) as a role that may change the table (the migrator of scripts/roles.sql)",
                c.name,
                crate::error::migrate_command(table)
            ));
            continue;
        };
        let ty: String = row.get(1);
        let not_null: bool = row.get(2);
        if !c.types.contains(&ty.as_str()) {
            problems.push(format!(
                "column `{table}.{}` is `{ty}`, the relay needs {}: `alter table {table} alter column {} type {}`",
                c.name,
                c.types.join(" or "),
                c.name,
                c.types[0]
            ));
        }
        if c.not_null && !not_null {
            problems.push(format!(
                "column `{table}.{}` allows NULL, which the relay cannot publish: fix or delete the NULL rows, then `alter table {table} alter column {} set not null`",
                c.name, c.name
            ));
        }
    }
    Ok(problems)
}

/// The objects of the migrations that are missing (see [`crate::schema::missing_objects`], the
/// one list `migrate` repairs too), each with what its absence means.
async fn missing_object_problems<C: GenericClient>(client: &C, table: &str) -> Result<Vec<String>> {
    let migrate = format!(
        "run `{}` (or `outbox::migrate_table`) as a role that may change the table (the migrator of scripts/roles.sql)",
        crate::error::migrate_command(table)
    );
    let fence = format!("{table}_fence");
    let problems = crate::schema::missing_objects(client, table)
        .await?
        .into_iter()
        .filter(|m| m.name != table)
        .map(|m| match m.kind {
            "table" if m.name == fence => {
                format!("table `{fence}` (batch fences) is missing: {migrate}")
            }
            "trigger" | "disabled trigger" => format!(
                "trigger `{}` is missing or disabled: writers never wake the relay: {migrate}",
                m.name
            ),
            "constraint" => format!(
                "check constraint `{}` is missing: a row can hold a status the relay does not know: {migrate}",
                m.name
            ),
            kind => format!(
                "{kind} `{}` is missing (dropped?): {migrate}, which re-creates it",
                m.name
            ),
        })
        .collect();
    Ok(problems)
}

/// The privileges a relay's role needs, as (table, privilege); see the README's "Security".
pub(crate) fn relay_privileges(table: &str) -> Vec<(String, &'static str)> {
    let fence = format!("{table}_fence");
    vec![
        (table.to_string(), "SELECT"),
        (table.to_string(), "UPDATE"),
        (table.to_string(), "DELETE"),
        (fence.clone(), "SELECT"),
        (fence.clone(), "INSERT"),
        (fence, "DELETE"),
        ("outbox_tables".to_string(), "SELECT"),
    ]
}

/// The outbox tables (`table`, its fence table, `outbox_tables`) on which row-level security
/// applies to the connected role, each with the fix. The relay's sessions run with `row_security = off`, so a
/// policy would make its statements fail ("query would be affected by row-level security
/// policy"); without that setting the relay silently saw only the rows a policy let it see —
/// none, for an insert-only policy for writers — and health stayed green while nothing was
/// delivered (found by a breaker helper, after TeamWarp/effect-mq#9).
///
/// # Errors
/// [`Error::Postgres`](crate::Error::Postgres) when the catalog cannot be read.
pub(crate) async fn row_security_problems<C: GenericClient>(
    client: &C,
    table: &str,
) -> Result<Vec<String>> {
    let fence = format!("{table}_fence");
    let tables = vec![table.to_string(), fence, "outbox_tables".to_string()];
    let rows = client
        .query(
            "select t, current_user::text
               from unnest($1::text[]) as t
              where to_regclass(t) is not null and row_security_active(to_regclass(t))",
            &[&tables],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (t, role): (String, String) = (r.get(0), r.get(1));
            format!(
                "row-level security is enabled on `{t}` and applies to role `{role}`: the relay must see every row (a policy would hide rows from it, and nothing would be delivered); `alter role {role} bypassrls` (as a superuser), or `alter table {t} disable row level security` — writers' policies are not needed for the outbox. (Triggers on the outbox table run with the relay's `row_security = off` too: a table they write must not have a policy that applies to this role.)"
            )
        })
        .collect())
}

/// The identity sequence of `table.seq` when it would hand out a value at or below a row's
/// `seq` — the highest pending row's, or the last delivered row's (by `published_at`; both read
/// from an index: one entry each) —: its name, the next value and that `seq`. `None` when it
/// is ahead, when there is no such row, or when the connected role may not read the sequence
/// (the relay's role usually may not: `migrate`, run by the owner, always can).
///
/// A sequence restarted below the rows — a logical-replication upgrade or a dump restored
/// without its sequences, an `alter ... restart` — numbers new events before older pending
/// ones: the relay publishes by `seq`, so an aggregate's new events would go out before its
/// older ones (a breaker helper saw Kafka receive 4 5 1 2 3); below delivered rows only, new
/// events get `seq`s that are not their insertion order and fall behind where the relay's scans
/// start (found by a new user: with nothing pending, `migrate` left such a sequence alone).
///
/// # Errors
/// [`Error::Postgres`](crate::Error::Postgres) when the catalog or the sequence cannot be read.
pub(crate) async fn sequence_behind<C: GenericClient>(
    client: &C,
    table: &str,
) -> Result<Option<(String, i64, i64)>> {
    let row = client
        .query_one(
            &format!(
                "select s::text, has_sequence_privilege(s, 'SELECT'),
                        greatest((select max(seq) from {table} where status = 'new'),
                                 (select seq from {table}
                                   where status = 'done' and published_at is not null
                                   order by published_at desc limit 1))
                   from (select pg_get_serial_sequence($1, 'seq')::regclass as s) q"
            ),
            &[&table],
        )
        .await?;
    let (name, readable, pending): (Option<String>, Option<bool>, Option<i64>) =
        (row.get(0), row.get(1), row.get(2));
    let (Some(name), Some(true), Some(pending)) = (name, readable, pending) else {
        return Ok(None);
    };
    // `name` is `pg_get_serial_sequence`'s, quoted as needed.
    let row = client
        .query_one(
            &format!(
                "select case when q.is_called then q.last_value + p.increment_by
                             else q.last_value end
                   from {name} q, pg_sequences p
                  where format('%I.%I', p.schemaname, p.sequencename)::regclass = $1::text::regclass"
            ),
            &[&name],
        )
        .await?;
    let next: i64 = row.get(0);
    Ok((next <= pending).then_some((name, next, pending)))
}

/// [`sequence_behind`] as a problem for `connect()` and `status`, with the fix. A query that
/// fails finds nothing: it reads the table, and what keeps the role from reading it (a
/// privilege, row-level security) is a problem the other checks name with its fix.
async fn sequence_problems<C: GenericClient>(client: &C, table: &str) -> Vec<String> {
    let behind = sequence_behind(client, table).await.ok().flatten();
    behind.into_iter().map(|(name, next, highest)| {
        format!(
            "the identity sequence `{name}` of `{table}.seq` would hand out {next}, not above the row at seq {highest}: new events would be numbered before older ones and published before the older pending ones of their aggregate (a sequence restarted below the rows, e.g. by a logical-replication upgrade or a restore that does not carry sequences); run `{}` (it moves the sequence past the rows) or `select setval('{name}', (select max(seq) from {table}))`",
            crate::error::migrate_command(table)
        )
    }).collect()
}

/// The relay privileges the connected role lacks, each with the `GRANT` that fixes it. Tables
/// that do not exist are skipped (the schema check reports them).
///
/// # Errors
/// [`Error::Postgres`](crate::Error::Postgres) when the catalog cannot be read.
pub(crate) async fn missing_relay_privileges<C: GenericClient>(
    client: &C,
    table: &str,
) -> Result<Vec<String>> {
    let wanted = relay_privileges(table);
    let names: Vec<&str> = wanted.iter().map(|(t, _)| t.as_str()).collect();
    let privs: Vec<&str> = wanted.iter().map(|(_, p)| *p).collect();
    let rows = client
        .query(
            "select w.t, w.p, current_user::text
               from unnest($1::text[], $2::text[]) as w(t, p)
              where to_regclass(w.t) is not null
                and not has_table_privilege(to_regclass(w.t), w.p)",
            &[&names, &privs],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (t, p, role): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            format!(
                "role `{role}` lacks {p} on `{t}`, which the relay needs: `grant {} on {t} to {role}`",
                p.to_lowercase()
            )
        })
        .collect())
}
