-- A held row purged unsent at stop: the hold ends, no attempt counted. $1 uuid id.
update {{table}} set next_attempt_at = null
 where id = $1 and status = 'new' and next_attempt_at > now()
