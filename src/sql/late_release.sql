-- A held row purged unsent at stop: the hold ends, no attempt counted; fenced to the hold (see
-- late_confirm.sql). $1 uuid id, $2 timestamptz the hold's end.
update {{table}} set next_attempt_at = null
 where id = $1 and status = 'new' and next_attempt_at = $2 and next_attempt_at > now()
