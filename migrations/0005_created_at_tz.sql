-- Zone-proof insertion time. The original's `created_at timestamp default now()` holds the
-- writer's wall-clock time in the writer's session time zone, so its age depends on that zone.
-- `created_at_tz` holds the same instant as a `timestamptz` (an absolute time), filled by its
-- default for every writer that does not name it (the Go package's INSERT does not), whatever
-- their zones; every age the relay reports is computed from it. `created_at` is kept and still
-- filled by its own default, so Go writers and readers keep working.
--
-- Existing rows: their `created_at` is read in this (migrating) session's time zone; rows
-- without one get the migration time.
alter table {{table}} add column if not exists created_at_tz timestamptz;
update {{table}} set created_at_tz = coalesce(created_at::timestamptz, now())
 where created_at_tz is null;
alter table {{table}} alter column created_at_tz set default now();
alter table {{table}} alter column created_at_tz set not null;

-- Reservations written by the original Go relay (`reserved_to`; this crate reserves with row
-- locks and clears the column): a small index, so that a Go relay still running against the
-- table is detected cheaply.
create index if not exists {{table}}_reserved_to_idx on {{table}} (reserved_to)
    where reserved_to is not null;
