-- Records migration $2 (named $3) as applied to table $1.
insert into outbox_migrations (table_name, version, name) values ($1, $2, $3)
