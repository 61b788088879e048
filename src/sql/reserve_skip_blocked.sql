-- `reserve.sql`'s condition on candidates in scans that skip blocked aggregates: the
-- candidate's aggregate does not start with an open row that is not due (`first_open`, see
-- `reserve_first_open.sql`; in a windowed scan, also: within the window).
{{in_window}}
and coalesce(first_open.due, true)
