-- Batch fences. A relay's reservation is its batch transaction's row locks; if that session ends
-- (Postgres restart, terminated backend, lost network) while the relay is still publishing, the
-- locks are gone at once. Before it sends anything, a relay therefore records (in its own,
-- committed statement) which aggregates the batch publishes and until when its messages can
-- still land; no relay reserves events of those aggregates until then, unless the batch confirmed
-- (which deletes its fence in the same transaction).
create table if not exists {{table}}_fence (
    batch_id uuid primary key,
    until timestamptz not null,
    aggregates text[] not null
);
