-- The original Go package's table, verbatim (table name configurable). A table that already
-- exists, with rows, is left as it is and upgraded by the next migrations.
create table if not exists {{table}} (
    id uuid primary key default gen_random_uuid(),
    aggregate_id varchar(100) not null,
    event_topic varchar(100) not null,
    event_type varchar(100) not null,
    payload jsonb not null,
    status varchar not null default 'new' check(status in ('new', 'done')),
    created_at timestamp default now(),
    reserved_to timestamp default null
);
