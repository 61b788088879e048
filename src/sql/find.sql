-- Events by filter; the filter's conditions, order and limit are appended as bind parameters.
-- A dead letter the relay found Postgres cannot print (`relay::unprintable`; its last_error
-- begins with `{{unprintable}}`) comes without its payload (JSON null) and headers: printing
-- them failed every `find` that reached it, with every other row of the page (found by a
-- new-user helper).
select id, seq, aggregate_id, event_topic, event_type,
       case when status = 'failed' and last_error like '{{unprintable}}%' then 'null'::jsonb
            else payload end,
       case when status = 'failed' and last_error like '{{unprintable}}%' then null
            else headers end,
       status,
       created_at, reserved_to, attempts, last_error, next_attempt_at, published_at,
       kafka_partition, kafka_offset, created_at_tz
  from {{table}} where true
