-- `reserve.sql`'s condition on candidates in scans that skip blocked aggregates: the
-- candidate's aggregate does not start with an open row that is not due (in a windowed scan,
-- also: within the window).
{{in_window}}
and coalesce((select e.status = 'new'
                     and (e.next_attempt_at is null or e.next_attempt_at <= now())
                     and (e.reserved_to is null or e.reserved_to < localtimestamp)
                from {{table}} e
               where e.aggregate_id = c.aggregate_id and {{open}}
               order by e.seq
               limit 1), true)
