-- A batch's fence, before it sends. $1 uuid batch id, $2 int8 lifetime in ms, $3 text[] aggregates.
insert into {{table}}_fence (batch_id, until, aggregates)
values ($1, now() + $2::int8 * interval '1 millisecond', $3)
