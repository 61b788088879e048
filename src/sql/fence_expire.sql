-- Fences of batches that never confirmed, once they ended.
delete from {{table}}_fence where until < now()
