-- The session whose snapshot is the oldest in this database (it holds back cleanup of dead rows):
-- pid, application_name, state, seconds since its transaction (or statement) began. Sessions of
-- other roles show their `backend_xmin` only to roles with `pg_read_all_stats`.
select pid, coalesce(application_name, ''), coalesce(state, ''),
       greatest(0, extract(epoch from clock_timestamp())
                   - extract(epoch from coalesce(xact_start, query_start, backend_start)))::float8
  from pg_stat_activity
 where backend_xmin is not null and pid <> pg_backend_pid()
   and datname = current_database()
 order by age(backend_xmin) desc, xact_start
 limit 1
