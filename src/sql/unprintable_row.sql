-- The row `$1` (uuid) with `reserve.sql`'s columns but its payload and headers, which Postgres
-- cannot print (`relay::unprintable`): `null` JSON and no headers; it is dead-lettered, never
-- sent. Columns 9 and 11–15 (the scan's) are not read for it. Outside a UTF8 database its text
-- columns come as the server stores them, bytes above 0x7f escaped (`\ooo`): what made it
-- unprintable may be in them (see `print_each.sql`).
select id, seq,
       {{sendable aggregate_id}},
       {{sendable event_topic}},
       {{sendable event_type}},
       'null'::jsonb, null::jsonb, attempts,
       case when isfinite(created_at_tz)
            then greatest(0, extract(epoch from clock_timestamp() - created_at_tz))::float8
            end,
       1::int8, created_at_tz, false, null::int8, seq, seq, null::int8,
       hashtext(aggregate_id) & 63
  from {{table}}
 where id = $1
