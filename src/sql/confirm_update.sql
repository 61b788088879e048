-- The body of the batch confirm: every outcome of the batch in one statement.
-- $1 uuid[] ids, $2 int2[] outcomes (`ConfirmOutcome`), $3 int4[] partitions, $4 int8[] offsets,
-- $5 text[] errors, $6 int8[] delays in ms (retry backoff or hold).
-- `published_at` is the confirm statement's start: after Kafka acknowledged every delivered row
-- of the batch (not `now()`, the batch transaction's start, which is the reservation). Retries
-- and holds count from it too: a hold that started at the reservation would end before the
-- last report of a message sent late in the batch could arrive (its late write would then miss
-- and the row could be reserved again while that message may still land).
update {{table}} e set
     status = case u.outcome when {{delivered}} then 'done' when {{dead}} then 'failed' else e.status end,
     published_at = case when u.outcome = {{delivered}} then statement_timestamp() else e.published_at end,
     kafka_partition = case when u.outcome = {{delivered}} then u.part else e.kafka_partition end,
     kafka_offset = case when u.outcome = {{delivered}} then u.off else e.kafka_offset end,
     attempts = e.attempts + case when u.outcome in ({{retry}}, {{dead}}) then 1 else 0 end,
     last_error = case when u.outcome = {{delivered}} then null else coalesce(u.error, e.last_error) end,
     next_attempt_at = case when u.outcome in ({{retry}}, {{hold}}, {{defer}})
                            then statement_timestamp() + u.delay_ms * interval '1 millisecond' end,
     reserved_to = null
   from unnest($1::uuid[], $2::int2[], $3::int4[], $4::int8[], $5::text[], $6::int8[])
        as u(id, outcome, part, off, error, delay_ms)
  where e.id = u.id and e.id = any($1::uuid[])
