-- The row `$1` (uuid) with `reserve.sql`'s columns but its payload and headers, which Postgres
-- cannot print (`relay::unprintable`): `null` JSON and no headers; it is dead-lettered, never
-- sent. Columns 9 and 11–15 (the scan's) are not read for it.
select id, seq, aggregate_id, event_topic, event_type, 'null'::jsonb, null::jsonb, attempts,
       case when isfinite(created_at_tz)
            then greatest(0, extract(epoch from clock_timestamp() - created_at_tz))::float8
            end,
       1::int8, created_at_tz, false, null::int8, seq, seq, null::int8,
       hashtext(aggregate_id) & 63
  from {{table}}
 where id = $1
