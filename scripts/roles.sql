-- Least-privilege roles for the outbox: a migrator that owns the schema objects, a relay that can
-- run but not migrate, and the writers (your services). For table `events` in schema `public`;
-- replace the names to suit. Run as a superuser or the database owner, in two parts around
-- `outbox-relay migrate` (see the README's Security section):
--   sed '/^-- after migrate/q' scripts/roles.sql | psql "$ADMIN_URL" -v ON_ERROR_STOP=1
--   (set passwords: \password app_outbox_migrator, …; then migrate as app_outbox_migrator)
--   sed -n '/^-- after migrate/,$p' scripts/roles.sql | psql "$ADMIN_URL" -v ON_ERROR_STOP=1
-- The test suite runs this file as it is, in the same two parts.

-- 1. Roles. The migrator runs `outbox-relay migrate` (DDL: it owns the table, its fence table,
--    trigger and function, outbox_migrations and outbox_tables). Roles belong to the whole
--    server: a role that exists already (this file run for a second database) is kept as it is.
do $roles$
declare
  r text;
begin
  foreach r in array array['app_outbox_migrator', 'app_outbox_relay', 'app_outbox_writer'] loop
    if not exists (select from pg_roles where rolname = r) then
      execute format('create role %I login', r);
    end if;
  end loop;
end
$roles$;
-- Before Postgres 15 every role may create in `public`: a writer could then plant functions or
-- operators the relay's SQL would call (CVE-2018-1058; the relay refuses to start so). Only the
-- migrator creates there.
revoke create on schema public from public;
grant usage, create on schema public to app_outbox_migrator;
grant usage on schema public to app_outbox_relay, app_outbox_writer;

-- 2. Now run `outbox-relay migrate` as app_outbox_migrator, then grant (again as the admin, or
--    as app_outbox_migrator, the owner):
-- after migrate
-- The relay: reserves, confirms (update), deletes delivered rows (retention, on_delivery=delete),
-- fences its batches, reads which channel the table notifies. No DDL, no insert into events.
grant select, update, delete on events to app_outbox_relay;
grant select, insert, delete on events_fence to app_outbox_relay;
grant select on outbox_tables to app_outbox_relay;
-- The writers: insert only (the wake trigger needs nothing more).
grant insert on events to app_outbox_writer;
-- Operators running `status`, `find`, `requeue` need select and update on events and select on
-- outbox_tables (the relay role has them); `status` counts other roles' open relay batches only
-- with `pg_read_all_stats`.
