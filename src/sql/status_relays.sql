-- Open relay batch transactions (all relays of the database), and rows reserved by the original
-- Go relay whose lease has not run out.
select (select count(*) from pg_stat_activity
         where application_name = 'outbox-relay-batch' and datname = current_database()
           and state in ('idle in transaction', 'active') and xact_start is not null),
       (select count(*) from {{table}} where reserved_to > localtimestamp)
