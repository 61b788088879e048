-- Confirm a batch (OnDelivery::Delete): delivered rows deleted, the other outcomes recorded, its
-- fence deleted ($7 uuid batch id). Returns the held rows as confirm.sql does.
with unfenced as (delete from {{table}}_fence where batch_id = $7),
     delivered as (
         delete from {{table}} where id = any($1::uuid[]) and id = any(
             select u.id from unnest($1::uuid[], $2::int2[]) as u(id, outcome)
              where u.outcome = {{delivered}})
     ),
     confirmed as (
{{confirm_update}}
   and u.outcome <> {{delivered}}
     returning e.id, e.next_attempt_at, u.outcome
     )
select id, next_attempt_at from confirmed where outcome = {{hold}}
