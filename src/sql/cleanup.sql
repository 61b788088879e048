-- Retention: delivered rows older than $1 (float8, ms), at most $2 (int8) of them.
delete from {{table}} where id in (
     select id from {{table}}
      where status = 'done'
        and (published_at < now() - $1::float8 * interval '1 millisecond'
             or (published_at is null
                 and created_at_tz < now() - $1::float8 * interval '1 millisecond'))
      limit $2)
