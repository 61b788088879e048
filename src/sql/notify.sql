-- Wakes the relays listening on the table's channel: $1 text, the channel (a bind parameter,
-- never SQL text: it is read back from outbox_tables).
select pg_notify($1, '')
