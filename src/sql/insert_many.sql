-- Many events in the given order; the parameters of insert_one.sql as arrays.
insert into {{table}} (id, aggregate_id, event_topic, event_type, payload, headers)
select id, aggregate_id, event_topic, event_type, payload, headers
  from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
       with ordinality as u(id, aggregate_id, event_topic, event_type, payload, headers, ord)
 order by ord
