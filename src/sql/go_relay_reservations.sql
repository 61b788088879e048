-- Before the first migration of a table the original Go package created: rows its relay reserved
-- whose lease has not run out (`reserved_to` in the Go relay's clock, compared as the relay's
-- `status` does). Their count and the latest lease end.
select count(*), max(reserved_to)::text from {{table}} where reserved_to > localtimestamp
