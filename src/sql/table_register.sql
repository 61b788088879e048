-- Registers table $1 with its channel $2 and schema version $3.
insert into outbox_tables (table_name, channel, schema_version) values ($1, $2, $3)
on conflict (table_name) do update
  set channel = excluded.channel, schema_version = excluded.schema_version, updated_at = now()
