-- A held row whose late report is a failure, while the hold lasts and fenced to it (see
-- late_confirm.sql).
-- $1 uuid id, $2 text error, $3 int8 retry delay in ms, $4 bool dead letter, $5 timestamptz the
-- hold's end, $6 bool whether the attempt counts (false when the cluster was unavailable).
update {{table}} set attempts = attempts + case when $6::bool then 1 else 0 end, last_error = $2,
       status = case when $4::bool then 'failed' else status end,
       next_attempt_at = case when $4::bool then null
                              else now() + $3::int8 * interval '1 millisecond' end
 where id = $1 and status = 'new' and next_attempt_at = $5 and next_attempt_at > now()
