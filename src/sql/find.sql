-- Events by filter; the filter's conditions, order and limit are appended as bind parameters.
select id, seq, aggregate_id, event_topic, event_type, payload, headers, status,
       created_at, reserved_to, attempts, last_error, next_attempt_at, published_at,
       kafka_partition, kafka_offset, created_at_tz
  from {{table}} where true
