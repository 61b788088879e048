-- Bookkeeping shared by every outbox table of the database, run before each table's migrations:
-- which migrations each table has, and the channel each table's trigger notifies.
create table if not exists outbox_migrations (
    table_name text not null,
    version integer not null,
    name text not null,
    applied_at timestamptz not null default now(),
    primary key (table_name, version));
create table if not exists outbox_tables (
    table_name text primary key,
    channel text not null,
    schema_version integer not null,
    updated_at timestamptz not null default now());
