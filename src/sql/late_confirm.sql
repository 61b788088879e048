-- A held row (sent, no report before the batch committed) whose report arrived while the hold
-- lasts, fenced to that hold: `next_attempt_at` must still be the hold's end the batch's confirm
-- wrote ($4). Any later write about the row by another relay (its reservation needs the hold to
-- have ended; its confirm writes another `next_attempt_at` or none) makes this write nothing.
-- $1 uuid id, $2 int4 partition, $3 int8 offset, $4 timestamptz the hold's end.
update {{table}} set status = 'done', published_at = now(), kafka_partition = $2,
       kafka_offset = $3, last_error = null, next_attempt_at = null, reserved_to = null
 where id = $1 and status = 'new' and next_attempt_at = $4 and next_attempt_at > now()
