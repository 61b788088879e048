-- `reserve.sql`'s window (`win`) in scans that skip blocked aggregates: the `seq`s from the first
-- pending row at or above the start ($3) that the scan may read — `{{scan_window}}` of them, or
-- $1 (the batch's rows) when more (see `store::SCAN_WINDOW`) — and whether a pending row follows
-- them (`full`). The window's end is computed in numeric: no `seq` a row can hold overflows it.
-- `offset 0` keeps each subquery from being inlined, so that the search for the first row runs
-- once; `order by seq limit 1` makes the search after the window a probe of the pending index
-- (as `exists` with a bound unknown at planning time it was planned as a sequential scan).
select w.first, w.last,
       (select seq from {{table}}
         where status = 'new' and seq > w.last
         order by seq
         limit 1) is not null as full
  from (select f.first,
               least(f.first::numeric + greatest($1::int8, {{scan_window}}) - 1,
                     9223372036854775807)::int8 as last
          from (select (select seq from {{table}}
                         where status = 'new' and seq >= $3::int8
                         order by seq
                         limit 1) as first
                offset 0) f
        offset 0) w
