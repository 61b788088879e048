-- `reserve.sql`'s probe in scans that skip blocked aggregates: whether the candidate's
-- aggregate's first open row is due. A lateral join rather than a subquery in the condition, so
-- that the planner can memoize it per aggregate: the probe walks the aggregate index from the
-- aggregate's lowest entry, past the entries of its delivered rows until vacuum removes them,
-- and a hot aggregate's thousands of candidates paid that walk each (one aggregate drained at
-- 0.3 × the uniform rate instead of 0.5-0.7; BENCHMARKS.md).
left join lateral (
     select e.status = 'new'
            and (e.next_attempt_at is null or e.next_attempt_at <= now())
            and (e.reserved_to is null or e.reserved_to < localtimestamp) as due
       from {{table}} e
      where e.aggregate_id = c.aggregate_id and {{open}}
      order by e.seq
      limit 1
 ) first_open on true
