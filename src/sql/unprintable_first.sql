-- The row a reservation from $1 (the scan's start, int8) takes first, locked until the
-- transaction ends (waiting for the lock: the reservation that failed on it may still hold it),
-- without reading its payload or headers: the first pending, due row at or above $1 by `seq`
-- (the reservation's candidates' conditions but the fence, the split group and the skipping of
-- blocked aggregates, which only narrow them).
-- Columns: id, aggregate_id, event_topic, attempts.
select id, aggregate_id, event_topic, attempts
  from {{table}}
 where status = 'new'
   and seq >= $1
   and (reserved_to is null or reserved_to < localtimestamp)
   and (next_attempt_at is null or next_attempt_at <= now())
 order by seq
 limit 1
   for update
