-- The backlog per topic: pending, retrying, dead letters, oldest pending age in seconds.
select event_topic,
       count(*) filter (where status = 'new'),
       count(*) filter (where status = 'new' and next_attempt_at > now()),
       count(*) filter (where status = 'failed'),
       extract(epoch from localtimestamp - min(created_at) filter (where status = 'new'))::float8
  from {{table}} where status <> 'done'
 group by event_topic order by event_topic
