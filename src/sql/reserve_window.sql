-- `reserve.sql`'s window (`win`) in scans that skip blocked aggregates: the first pending rows
-- at or above the start ($3) that the scan may read — `{{scan_window}}` of them, or $1 (the
-- batch's rows) when more (see `store::SCAN_WINDOW`) — as the range of their `seq`s, and whether
-- the window is full (more pending rows may follow it). Counted in rows, not in `seq`s: blocked
-- rows far apart in `seq` (an aggregate's events among many others') would otherwise take a
-- reservation each. Rows sharing the window's last `seq` are all in it.
select min(w.seq) as first, max(w.seq) as last,
       count(*) >= greatest($1::int8, {{scan_window}}) as full
  from (select seq from {{table}}
         where status = 'new' and seq >= $3::int8
         order by seq
         limit greatest($1::int8, {{scan_window}})) w
