-- The backlog per topic: pending, retrying, dead letters, oldest pending age in seconds.
select event_topic,
       count(*) filter (where status = 'new'),
       count(*) filter (where status = 'new' and next_attempt_at > now()),
       count(*) filter (where status = 'failed'),
       greatest(0, extract(epoch from now() - min(created_at_tz)
                                filter (where status = 'new' and isfinite(created_at_tz))))::float8
  from {{table}} where status <> 'done'
 group by event_topic order by event_topic
