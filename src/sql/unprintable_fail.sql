-- Dead-letters a row whose JSON cannot be printed in time (see relay/unprintable.rs), locked by
-- this transaction. $1 uuid: the row; $2 text: the error.
update {{table}}
   set status = 'failed', attempts = attempts + 1, last_error = $2, next_attempt_at = null
 where id = $1 and status = 'new'
