-- Prints the rows `$1` (uuid[]) one at a time, in the order given, as a reservation prints them
-- (payload and headers as JSON text), and returns each one's position in `$1` (from 1), id and
-- printed length in bytes (null when no such row). Postgres sends each result row as it is
-- computed (no sort, no aggregate), so when one row cannot be printed ("out of memory … Cannot
-- enlarge string buffer", 54000, past 1 GB of text) the rows before it arrive before the error:
-- the first position missing names it (see `relay::unprintable`). The fourth column, the clock
-- read after each row's print (expressions are evaluated in the order written), gives each row's
-- print time on the server (for the log only: nothing is judged by time). Outside a UTF8
-- database the row's text (its JSON and its text columns) is converted to UTF8 as it would be
-- sent, so that a value the server cannot send to the relay (22021 invalid bytes in SQL_ASCII,
-- 22P05 a character without a UTF8 equivalent) fails here, at its row, without being sent.
select u.n,
       u.id,
       (select case when current_setting('server_encoding') = 'UTF8'
                    then octet_length(e.payload::text) + coalesce(octet_length(e.headers::text), 0)
                    else octet_length(convert_to(e.payload::text || coalesce(e.headers::text, '')
                                                 || e.aggregate_id || e.event_topic
                                                 || e.event_type, 'UTF8'))
                    end::int8
          from {{table}} e
         where e.id = u.id),
       extract(epoch from clock_timestamp() - statement_timestamp())::float8
  from unnest($1::uuid[]) with ordinality as u(id, n)
