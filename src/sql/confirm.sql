-- Confirm a batch (OnDelivery::MarkDone): its outcomes, and its fence deleted ($7 uuid batch id).
-- Returns the held rows with their hold's end (`next_attempt_at` as written here): the token
-- that fences their late reports to this hold.
with unfenced as (delete from {{table}}_fence where batch_id = $7),
     confirmed as (
{{confirm_update}}
     returning e.id, e.next_attempt_at, u.outcome
     )
select id, next_attempt_at from confirmed where outcome = {{hold}}
