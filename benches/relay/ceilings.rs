//! The drain's two ceilings: (a) a raw idempotent producer with the relay's settings, (b) the
//! relay's own reserve/fence/confirm SQL (`outbox::testing::relay_sql`) without Kafka.

use crate::env::Env;
use crate::events::event_type;
use crate::events::load_backlog;
use crate::events::payload_jsonb_text;
use crate::events::producer_config;
use crate::events::Raw;
use crate::profile::sql_check;
use crate::profile::verify_sql;
use crate::say;
use anyhow::bail;
use anyhow::Result;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use outbox::testing::relay_sql;
use outbox::testing::FULL_SCAN_EVERY;
use outbox::testing::{next_scan_start, reserved_rows};
use rdkafka::error::KafkaError;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Header;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureProducer;
use rdkafka::producer::FutureRecord;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone, Default)]
pub(crate) struct KafkaCeiling {
    pub(crate) n: usize,
    pub(crate) secs: f64,
    pub(crate) rate: f64,
    pub(crate) errors: usize,
}

pub(crate) async fn kafka_ceiling(env: &Env, n: usize) -> Result<KafkaCeiling> {
    env.note_load("kafka").await;
    let topic = env.create_topic("kafka").await?;
    let producer: FutureProducer = producer_config(&env.brokers).create()?;
    let keys = env.keys();
    let send = |i: usize| {
        let id = Uuid::now_v7().hyphenated().to_string();
        let key = keys.key(i);
        let payload = payload_jsonb_text(i);
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: "event_id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(event_type(i)),
            });
        (key, payload, headers)
    };
    // One warm-up record (metadata, producer id), not timed.
    {
        let (k, p, h) = send(n);
        producer
            .send(
                FutureRecord::to(&topic).key(&k).payload(&p).headers(h),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    const IN_FLIGHT: usize = 10_000; // the relay's default max_in_flight
    let t0 = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut errors = 0usize;
    let mut count = |r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, _>| {
        if !matches!(r, Ok(Ok(_))) {
            errors += 1;
        }
    };
    for i in 0..n {
        while pending.len() >= IN_FLIGHT {
            if let Some(r) = pending.next().await {
                count(r);
            }
        }
        let (k, p, h) = send(i);
        let mut record = FutureRecord::to(&topic).key(&k).payload(&p).headers(h);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    if let Some(r) = pending.next().await {
                        count(r);
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    while let Some(r) = pending.next().await {
        count(r);
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(producer);
    env.delete_topic(&topic).await;
    let k = KafkaCeiling {
        n,
        secs,
        rate: n as f64 / secs,
        errors,
    };
    say!(
        "  kafka ceiling: {n} records in {secs:.2} s = {:.0}/s ({errors} errors)",
        k.rate
    );
    Ok(k)
}

#[derive(Debug, Clone, Default)]
pub(crate) struct PgCeiling {
    pub(crate) n: usize,
    pub(crate) secs: f64,
    pub(crate) rate: f64,
    pub(crate) batches: usize,
    /// Rows asked per reservation: the relay's `batch_size` (its default, or `--batch-size`).
    pub(crate) batch_size: usize,
    pub(crate) reserve_ms: f64,
    pub(crate) fence_ms: f64,
    pub(crate) confirm_ms: f64,
    pub(crate) first_reserve_ms: f64,
    pub(crate) last_reserve_ms: f64,
    pub(crate) empty_polls: usize,
    pub(crate) explain: Vec<String>,
    pub(crate) sql_check: String,
}

pub(crate) async fn pg_ceiling(env: &Env, n: usize, delete: bool) -> Result<PgCeiling> {
    let phase = if delete { "pgdel" } else { "pgdone" };
    env.note_load(phase).await;
    let check = verify_sql(env, delete).await?;
    let table = env.fresh_table(phase).await?;
    load_backlog(env, &table, &env.topic(phase), n).await?;
    let mut explain = Vec::new();
    explain.push(explain_reserve(env, &table, "fresh backlog").await?);
    let batch_size = env
        .opts
        .batch_size
        .unwrap_or(outbox::Settings::default().batch_size);
    let shared = Arc::new(CeilingShared {
        confirm_setup: relay_sql(&table, delete).confirm_setup,
        // The relay's fence connection: autocommit, shared by its batches.
        fence_client: env.connect("bench-pg-ceiling-fence").await?,
        fence: relay_sql(&table, false).fence,
        scan: std::sync::Mutex::new((None, Instant::now())),
        confirmed: AtomicU64::new(0),
        batch_size,
        n,
    });
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        // max_batches_in_flight = 2: two sessions, each reserve → fence → confirm + commit.
        let session = CeilingSession::connect(env, &table, delete, shared.clone()).await?;
        tasks.push(tokio::spawn(session.run()));
    }
    let mut all = Vec::new();
    let mut empty_polls = 0;
    for t in tasks {
        let (b, e) = t.await??;
        all.extend(b);
        empty_polls += e;
    }
    let secs = t0.elapsed().as_secs_f64();
    explain.push(explain_reserve(env, &table, "after the drain (nothing pending)").await?);
    // A relay's steady state after a backlog: 1,000 new rows behind the delivered ones.
    load_backlog(env, &table, &env.topic(phase), 1_000).await?;
    explain.push(explain_reserve(env, &table, "1,000 new rows after the drain").await?);
    env.drop_table(&table).await;
    let avg = |v: &[BatchTimes], f: fn(&BatchTimes) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    let k = 10.min(all.len());
    let p = PgCeiling {
        n,
        secs,
        rate: n as f64 / secs,
        batches: all.len(),
        batch_size,
        reserve_ms: avg(&all, |b| b.0),
        fence_ms: avg(&all, |b| b.1),
        confirm_ms: avg(&all, |b| b.2),
        first_reserve_ms: avg(&all[..k], |b| b.0),
        last_reserve_ms: avg(&all[all.len() - k..], |b| b.0),
        empty_polls,
        explain,
        sql_check: sql_check(&check),
    };
    say!(
        "  pg ceiling ({}): {n} rows in {secs:.2} s = {:.0}/s; {} batches, reserve {:.1} ms (first 10 {:.1}, last 10 {:.1}), fence {:.1} ms, confirm+commit {:.1} ms, {} empty polls",
        if delete { "delete" } else { "mark done" },
        p.rate,
        p.batches,
        p.reserve_ms,
        p.first_reserve_ms,
        p.last_reserve_ms,
        p.fence_ms,
        p.confirm_ms,
        p.empty_polls
    );
    Ok(p)
}

/// One batch of the Postgres ceiling: reserve, fence and confirm + commit (ms), and its rows.
type BatchTimes = (f64, f64, f64, usize);

/// What the Postgres ceiling's two batch sessions share, as the relay's batches do.
struct CeilingShared {
    confirm_setup: String,
    fence_client: tokio_postgres::Client,
    fence: String,
    /// Where the next reservation's scan starts, as the relay keeps it: where the last one left
    /// off, and a full scan at least every `FULL_SCAN_EVERY` (see `ScanStart::next`).
    scan: std::sync::Mutex<(Option<i64>, Instant)>,
    /// Rows confirmed by both sessions.
    confirmed: AtomicU64,
    batch_size: usize,
    /// The backlog's rows: the sessions stop once they are all confirmed.
    n: usize,
}

/// One batch session of the Postgres ceiling (the relay's `max_batches_in_flight` is 2).
struct CeilingSession {
    client: tokio_postgres::Client,
    reserve: tokio_postgres::Statement,
    /// A scan from the first pending row runs the relay's other reservation.
    reserve_full: tokio_postgres::Statement,
    confirm: tokio_postgres::Statement,
    /// The relay's `begin` (with its table lock).
    begin: String,
    shared: Arc<CeilingShared>,
}

impl CeilingSession {
    /// A session with the relay's batch session settings and its statements prepared.
    async fn connect(
        env: &Env,
        table: &str,
        delete: bool,
        shared: Arc<CeilingShared>,
    ) -> Result<CeilingSession> {
        let client = env.connect("bench-pg-ceiling").await?;
        let sql = relay_sql(table, delete);
        client
            .batch_execute(&format!(
                "set idle_in_transaction_session_timeout = 60000; {}",
                sql.session_setup
            ))
            .await?;
        // The reservations are the same for both confirm modes (`relay_sql(table, false)`).
        let types = outbox::testing::RESERVE_PARAM_TYPES;
        let reserve = client.prepare_typed(&sql.reserve, &types).await?;
        let reserve_full = client.prepare_typed(&sql.reserve_full, &types).await?;
        let confirm = client.prepare(&sql.confirm).await?;
        Ok(CeilingSession {
            client,
            reserve,
            reserve_full,
            confirm,
            begin: sql.begin,
            shared,
        })
    }

    /// Reserves, fences and confirms batches until every row is confirmed: the times of each
    /// batch, and how many reservations found nothing.
    async fn run(self) -> Result<(Vec<BatchTimes>, usize)> {
        let mut batches = Vec::new();
        let mut empty = 0usize;
        let limit = self.shared.batch_size as i64;
        // The relay's default byte budget (max_batch_bytes).
        let budget = 16i64 << 20;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let from = self.scan_from();
            // Every row: no group of a split backlog (see `RelaySql::reserve`).
            let (buckets, group): (&[i16], i16) = (&[], -1);
            // No aggregate left out.
            let left_out: &[String] = &[];
            let reserve_params: [&(dyn postgres_types::ToSql + Sync); 6] =
                [&limit, &budget, &from, &buckets, &group, &left_out];
            let a = Instant::now();
            let statement = if from == i64::MIN {
                &self.reserve_full
            } else {
                &self.reserve
            };
            let (_, all) = futures::try_join!(
                self.client.batch_execute(&self.begin),
                self.client.query(statement, &reserve_params)
            )?;
            let b = Instant::now();
            self.shared.scan.lock().expect("scan state").0 = next_scan_start(&all);
            let rows = reserved_rows(&all);
            if rows.is_empty() {
                self.client.batch_execute("rollback").await?;
                if self.shared.confirmed.load(Ordering::Relaxed) as usize >= self.shared.n {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("pg ceiling: stuck");
                }
                empty += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let (ids, seqs, aggregates) = decode(rows);
            let batch_id = self.fence(&aggregates).await?;
            let b2 = Instant::now();
            self.confirm(&ids, &seqs, batch_id).await?;
            let c = Instant::now();
            self.shared
                .confirmed
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            batches.push((
                b.duration_since(a).as_secs_f64() * 1e3,
                b2.duration_since(b).as_secs_f64() * 1e3,
                c.duration_since(b2).as_secs_f64() * 1e3,
                ids.len(),
            ));
        }
        Ok((batches, empty))
    }

    /// The next reservation's scan start: where the last one left off, or the first pending
    /// row (the lowest `int8`) at least every `FULL_SCAN_EVERY`.
    fn scan_from(&self) -> i64 {
        let mut s = self.shared.scan.lock().expect("scan state");
        match s.0.take() {
            Some(from) if s.1.elapsed() < FULL_SCAN_EVERY => from,
            _ => {
                s.1 = Instant::now();
                i64::MIN
            }
        }
    }

    /// The batch's fence, committed on its own connection before publishing (the relay passes
    /// the SQL text, so tokio-postgres prepares it each time, as here); its batch id.
    async fn fence(&self, aggregates: &[String]) -> Result<Uuid> {
        let batch_id = Uuid::new_v4();
        let fence_ms = 37_000i64; // batch_timeout + publish_timeout + 5 s
        let aggs: Vec<&str> = aggregates.iter().map(String::as_str).collect();
        self.shared
            .fence_client
            .execute(self.shared.fence.as_str(), &[&batch_id, &fence_ms, &aggs])
            .await?;
        Ok(batch_id)
    }

    /// Confirms every row delivered (partition 0, offset = its `seq`) and commits, in one round
    /// trip with the confirm's plan settings, as the relay does.
    async fn confirm(&self, ids: &[Uuid], seqs: &[i64], batch_id: Uuid) -> Result<()> {
        let len = ids.len();
        let codes = vec![0i16; len];
        let parts = vec![0i32; len];
        let errs: Vec<Option<&str>> = vec![None; len];
        let delays = vec![0i64; len];
        let params: [&(dyn postgres_types::ToSql + Sync); 7] =
            [&ids, &codes, &parts, &seqs, &errs, &delays, &batch_id];
        futures::try_join!(
            self.client.batch_execute(&self.shared.confirm_setup),
            self.client.execute(&self.confirm, &params),
            self.client.batch_execute("commit")
        )?;
        Ok(())
    }
}

/// Every column of the reserved rows decoded, as the relay does: their ids, `seq`s and
/// aggregates (each once, in first-seen order).
fn decode(rows: &[tokio_postgres::Row]) -> (Vec<Uuid>, Vec<i64>, Vec<String>) {
    let mut ids = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut aggregates: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in rows {
        let id: Uuid = r.get(0);
        let seq: i64 = r.get(1);
        let agg: String = r.get(2);
        let _: (String, String) = (r.get(3), r.get(4));
        let _: (Raw, Option<Raw>, i32, Option<f64>) = (r.get(5), r.get(6), r.get(7), r.get(8));
        // `created_at_tz`, which the relay writes as `ce_time`.
        let created: Option<chrono::DateTime<chrono::Utc>> = r.get(10);
        let _ = created.map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
        ids.push(id);
        seqs.push(seq);
        if seen.insert(agg.clone()) {
            aggregates.push(agg);
        }
    }
    (ids, seqs, aggregates)
}

/// EXPLAIN ANALYZE of the reservation of a scan from the first pending row (in a transaction
/// that is rolled back); returns a one-line summary and prints the plan with `--explain`.
pub(crate) async fn explain_reserve(env: &Env, table: &str, when: &str) -> Result<String> {
    let c = env.connect("bench-explain").await?;
    c.batch_execute("begin").await?;
    let explain = format!(
        "explain (analyze, buffers) {}",
        relay_sql(table, false).reserve_full
    );
    let rows = outbox::testing::reserve_every_aggregate(&c, &explain, 1000, i64::MIN).await;
    c.batch_execute("rollback").await?;
    let lines: Vec<String> = rows?.iter().map(|r| r.get::<_, String>(0)).collect();
    if env.opts.explain {
        eprintln!("---- EXPLAIN ANALYZE reserve, {when} ----");
        for l in &lines {
            eprintln!("{l}");
        }
    }
    let exec = lines
        .iter()
        .find(|l| l.starts_with("Execution Time"))
        .cloned()
        .unwrap_or_default();
    let buffers = lines
        .iter()
        .find(|l| l.trim_start().starts_with("Buffers:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    let returned = lines
        .first()
        .and_then(|l| l.split("rows=").nth(2))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    let s = format!("{when}: {exec}, {returned} rows, {buffers}");
    say!("  EXPLAIN reserve {s}");
    Ok(s)
}
