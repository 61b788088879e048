-- As late_confirm.sql, for OnDelivery::Delete. $1 uuid id, $2 timestamptz the hold's end.
delete from {{table}}
 where id = $1 and status = 'new' and next_attempt_at = $2 and next_attempt_at > now()
