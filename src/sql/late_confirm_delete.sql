-- As late_confirm.sql, for OnDelivery::Delete. $1 uuid id.
delete from {{table}} where id = $1 and status = 'new' and next_attempt_at > now()
