-- The channel and schema version registered for table $1.
select channel, schema_version from outbox_tables where table_name = $1
