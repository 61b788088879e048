-- Confirm, while the batch still publishes, rows Kafka already acknowledged (OnDelivery::MarkDone),
-- in the batch transaction: written as the batch confirm writes a delivered row (see
-- confirm_update.sql), committed with it. $1 uuid[] ids, $2 int4[] partitions, $3 int8[] offsets.
update {{table}} e set
     status = 'done',
     published_at = statement_timestamp(),
     kafka_partition = u.part,
     kafka_offset = u.off,
     last_error = null,
     next_attempt_at = null,
     reserved_to = null
   from unnest($1::uuid[], $2::int4[], $3::int8[]) as u(id, part, off)
  where e.id = u.id and e.id = any($1::uuid[])
