-- Reserve: lock the earliest available rows (the lock is the lease: it lasts as long as the
-- relay's batch transaction), then keep, per aggregate, only the rows before the first open row
-- of that aggregate that this batch did not get (in backoff, held, dead, or locked by another
-- relay): an aggregate's later event never overtakes an earlier one. The probe stops at the
-- aggregate's last candidate: an open row after all of them excludes nothing.
-- $1 int8: batch size. Which rows block their aggregate depends on the dead-letter policy.
with cand as materialized (
     select id, seq, aggregate_id, event_topic, event_type, payload, headers, attempts, created_at_tz
       from {{table}}
      where status = 'new'
        and (reserved_to is null or reserved_to < localtimestamp)
        and (next_attempt_at is null or next_attempt_at <= now())
        and aggregate_id not in (select unnest(aggregates) from {{table}}_fence
                                  where until > now())
      order by seq
      limit $1
        for update skip locked
 ),
 gate as (
     select a.aggregate_id, g.seq as gap
       from (select aggregate_id, max(seq) as max_seq from cand group by aggregate_id) a
       left join lateral (
            select e.seq from {{table}} e
             where e.aggregate_id = a.aggregate_id and {{open}}
               and e.seq < a.max_seq
               and e.id not in (select id from cand)
             order by e.seq
             limit 1
       ) g on true
 )
 select c.id, c.seq, c.aggregate_id, c.event_topic, c.event_type, c.payload, c.headers,
        c.attempts, case when isfinite(c.created_at_tz)
                         then greatest(0, extract(epoch from now() - c.created_at_tz))::float8
                         end,
        case when isfinite(c.created_at_tz)
             then to_char(c.created_at_tz at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
             end
   from cand c join gate g on g.aggregate_id = c.aggregate_id
  where g.gap is null or c.seq < g.gap
  order by c.seq
