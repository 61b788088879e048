-- Prints one row's payload and headers as the reservation does (its byte budget, then
-- `jsonb_send`), keeping only the length. $1 uuid: the row.
select octet_length(payload::text) + coalesce(octet_length(headers::text), 0)
  from {{table}}
 where id = $1
