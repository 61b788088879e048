-- Confirm a batch (OnDelivery::MarkDone): its outcomes, and its fence deleted ($7 uuid batch id).
with unfenced as (delete from {{table}}_fence where batch_id = $7)
{{confirm_update}}
