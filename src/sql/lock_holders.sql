-- The sessions holding a lock on the outbox table $1 (migrate could not lock it), oldest
-- transaction first. State and transaction start are null for another role's sessions unless
-- this role may read all statistics (`pg_read_all_stats`).
select a.pid,
       coalesce(a.application_name, ''),
       a.state,
       extract(epoch from now() - a.xact_start)::float8
  from pg_stat_activity a
 where a.pid <> pg_backend_pid()
   and a.pid in (select l.pid from pg_locks l
                  where l.relation = to_regclass($1::text) and l.granted)
 order by a.xact_start nulls last
 limit 10
