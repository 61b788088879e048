-- Repair, not a migration: the indexes of migration 2, each created only if missing (run by
-- `migrate` when a recorded table lost one of them).
create index if not exists {{table}}_pending_idx on {{table}} (seq) where status = 'new';
create index if not exists {{table}}_aggregate_open_idx on {{table}} (aggregate_id, seq)
    where status <> 'done';
create index if not exists {{table}}_done_idx on {{table}} (published_at) where status = 'done';
