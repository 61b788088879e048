-- confirm_early.sql for OnDelivery::Delete: the acknowledged rows deleted, in the batch
-- transaction. $1 uuid[] ids, $2 int4[] partitions and $3 int8[] offsets (unused: the same
-- parameters as confirm_early.sql).
delete from {{table}} e
 using unnest($1::uuid[], $2::int4[], $3::int8[]) as u(id, part, off)
 where e.id = u.id and e.id = any($1::uuid[])
