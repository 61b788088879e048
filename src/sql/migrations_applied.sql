-- The migration versions applied to table $1.
select version from outbox_migrations where table_name = $1
