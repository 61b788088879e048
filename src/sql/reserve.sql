-- Reserve: lock the earliest available rows (the lock is the lease: it lasts as long as the
-- relay's batch transaction), then keep, per aggregate, only the rows before the first open row
-- of that aggregate that this batch did not get (in backoff, held, dead, or locked by another
-- relay): an aggregate's later event never overtakes an earlier one. The probe stops at the
-- aggregate's last candidate: an open row after all of them excludes nothing.
-- Then stop at the byte budget: rows are kept in seq order while the running total of their
-- payload and headers (JSON text) stays within $2, and the first row always (an event larger than
-- the budget is published alone): a prefix in seq order keeps every aggregate's order. Rows past
-- the budget stay locked until the batch commits, untouched. The JSON text is measured only for
-- the rows whose stored size (`pg_column_size`: read from the value's header or TOAST pointer,
-- never decompressed) fits the budget first: measuring every candidate detoasted and printed up
-- to `batch_size` payloads per reservation, and a backlog of 0.9 MB events (2,000 × 0.9 MB =
-- 1.9 GB of JSON per reservation) timed out every reservation and delivered nothing (found by a
-- breaker helper). A compressed value is smaller stored than as text, so the second cut reads
-- at most about its compression ratio × the budget; an uncompressed `jsonb` can be larger
-- stored than as text (many small numbers), and then the first cut keeps less than the budget
-- of text: the rows returned are the prefix within the budget by both measures.
-- $1 int8: batch size (the candidates' limit is `{{limit}}`: `$1`, or the batch size as a literal
-- in a light batch's statements, whose generic plans must see it); $2 int8: byte budget; $3 int8: the scan's start (no row below this `seq`
-- is a candidate; the lowest int8 for a full scan). The start bounds only the scan for
-- candidates, never the gate's probe: an open row below it still holds back its aggregate's later
-- rows, so a scan that starts too high delays rows but never reorders them. Which rows block
-- their aggregate depends on the dead-letter policy. Columns are numbered from 0. Column 9: how
-- many rows were kept before the byte budget (more than returned: there is more to reserve at
-- once). A row's age is read as it is returned (`clock_timestamp()`): the relay adds the time
-- from the rows' arrival to their confirmation, so nothing is counted twice (the transaction's
-- start, `now()`, is earlier by the connect). Columns 5 and 6, the payload and headers, are
-- `jsonb` (printed by `jsonb_send` as they are sent). The byte budget prints the JSON text too
-- and keeps only its length: carrying the printed text instead, through the window's sort and
-- the final one, to send it as printed, spilled about three times a batch's text to temporary
-- files once it passed `work_mem` (a reservation failed on every `temp_file_limit`, found by a
-- breaker helper); the stored values the sorts carry are TOAST pointers. Column 10 is
-- `created_at_tz` (the relay writes `ce_time` from it: formatting 2,000 timestamps with
-- `to_char` cost 1 ms of each reservation, in the statement every batch waits for).
-- Columns 11-13 describe the scan, for where the next one may start: whether it found `$1`
-- candidates (more may be pending above them); the lowest `seq` at which the gate held back
-- rows behind a row that is pending and due (most likely in another batch in flight: the rows
-- it holds back must be seen again; the blocking row itself, below them, is a cheap bound),
-- null when none — rows held back behind a dead
-- letter, a retry's backoff or a hold wait for a full scan instead, so that they do not keep
-- every scan starting below them; the highest `seq` it found; and (column 14) the lowest (below it
-- every pending row was skipped: locked, fenced, not due or behind a blocked aggregate). Rows the byte budget left out
-- follow the last row returned (or share its `seq`: `seq` is not unique).
-- In a scan from the first pending row (`RelaySql::reserve_full`), a candidate's aggregate must not
-- start with an open row that is not due (a dead letter under BlockAggregate, a retry's backoff,
-- a hold, a Go relay's reservation): the gate would hold the candidate back anyway, and
-- `batch_size` such rows at the lowest `seq`s (an aggregate's events pile up behind its dead
-- letter until it is requeued) filled every scan, so that no row after them was ever reserved —
-- every other aggregate stalled. One probe of the aggregate index per row (its first open row;
-- a row held back by a later gap is still the gate's), paid only by the scans from the first
-- pending row: a scan from where the last one left off starts past them.
-- Such a scan may read a window (`RelaySql::reserve_windowed`, after one failed; `win`: the
-- first max($1, 10,000) pending rows at or above $3, see `reserve_window.sql`) and no further: a
-- pile of rows behind a hot aggregate's dead letter has no bound, and a scan that read it all
-- outlasted its deadline. The candidates' scan starts at the window's first row, so that it
-- does not read again the index entries below it (delivered rows a held snapshot keeps).
-- Column 15: the window's last `seq` when the window is full (more may follow), null otherwise
-- (and always in the other scans, whose `win` is a row of nulls). When no row is kept, the statement returns
-- one row of nulls but for columns 11-15, so that an empty scan still says where it ended.
-- A scan may take the rows of one group of aggregates only (`relay::split`: a gated backlog of
-- few aggregates split between the batch slots): $4 int2[] the group of each of 64 buckets of
-- `hashtext(aggregate_id) & 63` (a bucket past its end: group 0), $5 int2 the group (-1: every
-- row; a custom plan folds the condition away). The filter applies before the rows are locked,
-- and an aggregate is wholly in one group, so the gate is unchanged: it only narrows which
-- aggregates a batch takes. The filter is written as an inequality (`abs(group - $5) < 1`, the
-- same rows as `group = $5`) for the planner's estimate: an equality on an expression without
-- statistics gets 0.5 % of the rows (DEFAULT_EQ_SEL), an inequality a third (DEFAULT_INEQ_SEL);
-- a group holds a half or a third of them. With 0.5 % the planner expected a few hundred
-- candidates and read them all by a sequential scan, sorted (spilling) and probed each one's
-- first open row unmemoized: a Zipf backlog's split scan over 60,832 pending rows took 0.96 s
-- instead of ~30 ms (auto_explain, BENCHMARKS.md "Split scans planned for a few rows").
-- Column 16: the row's bucket. $6 text[]: aggregates left out of the candidates (held back behind
-- a row another transaction has locked: `Pipeline::reserved_nothing`; usually empty). Column 17,
-- only when no row is kept (the row of nulls): the aggregates the gate held back behind a row
-- that is pending and due but not a candidate (locked by another transaction, or in a batch in
-- flight), computed only then; column 18, then, those of them whose blocking row another
-- transaction in progress has locked or changed (its `xmax`, held as a `transactionid` lock),
-- unless that transaction is a relay's batch session (named `outbox-relay-batch`): the locks
-- to report. The others are no lock to warn about: another relay's batch between its reservation
-- and its fence, or a row version this statement's snapshot still sees as pending though a
-- transaction that has committed since (another relay's confirm) changed it — several relays
-- warned of a lock that did not exist (found by a breaker helper). A lock shared by several
-- transactions (a MultiXact `xmax`: `for share` twice) is not recognised, and not reported.
-- Only a granted `transactionid` lock is its transaction's own: a session waiting for that
-- transaction shows one too, not granted. Column 19, then: who holds those locks, for the
-- warning and `Health::held_back_by` — at most three sessions, oldest transaction first, each
-- "pid N (application 'name', state, transaction open S s)", or a prepared transaction.
-- `pg_locks` and the sessions' names are readable by every role.
-- `{{text_bytes}}` is a row's payload and headers as JSON text, in bytes, and `{{sent}}` the two
-- columns sent: their printed length and the two columns themselves in a reservation.
-- `{{texts}}` are the row's text columns (aggregate id, topic, type). The same scan without
-- printing anything (`RelaySql::unprintable_scan`: `0`, and nulls for the JSON and the texts,
-- which a server in another encoding than UTF8 may not be able to send) returns the rows a
-- reservation prints, for `relay::unprintable` to find the one Postgres cannot print after a
-- reservation failed on it.
with win as materialized (
     {{window}}
 ),
 cand as materialized (
     select id, seq, aggregate_id, event_topic, event_type, payload, headers, attempts, created_at_tz
       from {{table}} c
       {{first_open}}
      where status = 'new'
        and seq >= $3
        and (reserved_to is null or reserved_to < localtimestamp)
        and (next_attempt_at is null or next_attempt_at <= now())
        and aggregate_id not in (select unnest(aggregates) from {{table}}_fence
                                  where until > now())
        and ($5::int2 < 0
             or abs(coalesce(($4::int2[])[1 + (hashtext(c.aggregate_id) & 63)], 0) - $5::int2) < 1)
        and c.aggregate_id <> all($6::text[])
        {{skip_blocked}}
      order by seq
      limit {{limit}}
        for update of c skip locked
 ),
 gate as materialized (
     select a.aggregate_id, g.seq as gap, g.due as gap_due, g.xmax as gap_locker
       from (select aggregate_id, max(seq) as max_seq from cand group by aggregate_id) a
       left join lateral (
            select e.seq, e.xmax,
                   e.status = 'new' and (e.next_attempt_at is null or e.next_attempt_at <= now())
                       as due
              from {{table}} e
             where e.aggregate_id = a.aggregate_id and {{open}}
               and e.seq < a.max_seq
               and e.id not in (select id from cand)
             order by e.seq
             limit 1
       ) g on true
 ),
 kept as (
     select c.*,
            sum(pg_column_size(c.payload) + coalesce(pg_column_size(c.headers), 0))
                over (order by c.seq) as stored_through,
            row_number() over (order by c.seq) as n,
            count(*) over () as kept
       from cand c join gate g on g.aggregate_id = c.aggregate_id
      where g.gap is null or c.seq < g.gap
 ),
 sized as (
     select k.*,
            sum({{text_bytes}}) over (order by k.seq) as through_bytes
       from kept k
      where k.n = 1 or k.stored_through <= $2
 ),
 -- Columns 11, 13 and 14 in one pass over the candidates; columns 12 and 15 are uncorrelated
 -- subqueries (computed once, whatever the plan; `cand` and `gate` are materialized, so each
 -- is computed once too).
 found as (
     select count(*) as candidates, max(c.seq) as max_seq, min(c.seq) as min_seq from cand c
 ),
 -- The transactions whose locks columns 18 and 19 report, with their sessions: read only by
 -- those columns' subqueries, which run only when no row is kept (a CTE is computed as far as
 -- it is read), and then once for both.
 lockers as materialized (
     select l.transactionid, l.pid, a.application_name, a.state, a.xact_start
       from pg_locks l
       left join pg_stat_activity a on a.pid = l.pid
      where l.locktype = 'transactionid' and l.granted
        and a.application_name is distinct from 'outbox-relay-batch'
 )
 select k.id, k.seq, {{texts}}, {{sent}},
        k.attempts,
        case when isfinite(k.created_at_tz)
             then greatest(0, extract(epoch from clock_timestamp() - k.created_at_tz))::float8
             end,
        k.kept,
        k.created_at_tz,
        f.candidates = $1,
        (select min(g.gap) from gate g where g.gap_due),
        f.max_seq,
        f.min_seq,
        (select case when w.full then w.last end from win w),
        hashtext(k.aggregate_id) & 63,
        case when k.id is null
             then (select array_agg(g.aggregate_id) from gate g where g.gap_due) end,
        case when k.id is null
             then (select array_agg(g.aggregate_id) from gate g
                    where g.gap_due
                      and g.gap_locker in (select l.transactionid from lockers l)) end,
        case when k.id is null
             then (select string_agg(h.who, '; ')
                     from (select case when l.pid is null
                                       then 'a prepared transaction (pg_prepared_xacts)'
                                       when l.state is null
                                       then format('pid %s (application %s; its state and age are shown to roles with pg_read_all_stats)',
                                                   l.pid, quote_literal(coalesce(l.application_name, '')))
                                       else format('pid %s (application %s, %s, transaction open %s s)',
                                                   l.pid, quote_literal(coalesce(l.application_name, '')),
                                                   l.state,
                                                   coalesce(extract(epoch from clock_timestamp() - l.xact_start)::bigint::text, '?'))
                                   end as who
                             from lockers l
                            where l.transactionid in (select g.gap_locker from gate g where g.gap_due)
                            order by l.xact_start nulls first
                            limit 3) h) end
   from found f
   left join sized k on k.n = 1 or k.through_bytes <= $2
  order by k.seq
