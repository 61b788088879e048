-- The backlog per topic: pending, retrying, dead letters, oldest pending age in seconds (null
-- when nothing is pending: `greatest` skips a null, so it is applied to the age only). Outside a
-- UTF8 database the topic comes as the server stores it, bytes above 0x7f escaped (`\ooo`): a
-- dead letter's topic may hold bytes the server cannot send in UTF8 (`relay::unprintable`).
select {{sendable event_topic}},
       count(*) filter (where status = 'new'),
       count(*) filter (where status = 'new' and next_attempt_at > now()),
       count(*) filter (where status = 'failed'),
       (select greatest(0, a)
          from (select extract(epoch from now() - min(created_at_tz)
                                     filter (where status = 'new' and isfinite(created_at_tz)))) s (a)
         where a is not null)::float8
  from {{table}} where status <> 'done'
 group by event_topic order by event_topic
