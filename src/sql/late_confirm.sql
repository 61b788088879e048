-- A held row (sent, no report before the batch committed) whose report arrived while the hold
-- lasts: nobody else can have taken it, because reservation skips held rows.
-- $1 uuid id, $2 int4 partition, $3 int8 offset.
update {{table}} set status = 'done', published_at = now(), kafka_partition = $2,
       kafka_offset = $3, last_error = null, next_attempt_at = null, reserved_to = null
 where id = $1 and status = 'new' and next_attempt_at > now()
