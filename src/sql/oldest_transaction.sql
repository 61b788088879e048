-- The session whose snapshot is the oldest in this database (it holds back cleanup of dead rows):
-- pid, application_name, state, seconds since its transaction (or statement) began. A session of
-- another role shows its `backend_xmin` to every role, but its state and times only to roles with
-- `pg_read_all_stats`: its state is then '' and its age null (not 0: `greatest` skips a null).
select pid, coalesce(application_name, ''), coalesce(state, ''),
       case when coalesce(xact_start, query_start, backend_start) is not null then
       greatest(0, extract(epoch from clock_timestamp())
                   - extract(epoch from coalesce(xact_start, query_start, backend_start)))::float8
       end
  from pg_stat_activity
 where backend_xmin is not null and pid <> pg_backend_pid()
   and datname = current_database()
 order by age(backend_xmin) desc, xact_start
 limit 1
