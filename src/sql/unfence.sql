-- The fences of batches with nothing in flight any more: one that did not confirm, once its
-- messages settled; or those a relay confirmed lately, after it reconnected (a confirm lost with
-- a server crash brings its batch's fence back). $1 uuid[] batch ids.
delete from {{table}}_fence where batch_id = any($1::uuid[])
