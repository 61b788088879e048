-- One event. $1 uuid id, $2 aggregate id, $3 topic, $4 event type, $5 jsonb payload, $6 jsonb headers.
insert into {{table}} (id, aggregate_id, event_topic, event_type, payload, headers)
values ($1, $2, $3, $4, $5, $6)
