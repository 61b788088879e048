-- The fence of a batch that did not confirm, once its messages settled. $1 uuid batch id.
delete from {{table}}_fence where batch_id = $1
