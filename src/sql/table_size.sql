-- The outbox table $1's size as its statistics describe it and as it is now (see
-- `TableSize` in src/relay/maintenance.rs): pages measured, pages now, rows measured (never
-- measured: -1, read as 0), committed live rows now, analyzes so far, whether this role owns it.
select c.relpages::bigint,
       (pg_relation_size(c.oid) / current_setting('block_size')::int)::bigint,
       greatest(c.reltuples, 0)::bigint,
       pg_stat_get_live_tuples(c.oid),
       pg_stat_get_analyze_count(c.oid) + pg_stat_get_autoanalyze_count(c.oid),
       pg_has_role(c.relowner, 'USAGE')
  from pg_class c
 where c.oid = to_regclass($1::text)
