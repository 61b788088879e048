-- Dead letters back to pending, keeping their seq: each goes out before its aggregate's later
-- events, which were blocked behind it. $1 uuid[] ids, $2 text aggregate id, $3 text topic
-- (each null for any).
update {{table}} set status = 'new', attempts = 0, next_attempt_at = null, reserved_to = null
 where status = 'failed'
   and ($1::uuid[] is null or id = any($1))
   and ($2::text is null or aggregate_id = $2)
   and ($3::text is null or event_topic = $3)
