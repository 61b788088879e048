-- Wakes the relays listening on the table's channel.
select pg_notify('{{channel}}', '')
