//! Other writers: `add_new_event` inside other libraries' transactions (deadpool-postgres,
//! sqlx), the original Go package's writer, and rows written by plain SQL.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use outbox::{NewEvent, Outbox, Writer};
use serde_json::json;
use uuid::Uuid;

use crate::support::{
    self, connect_pg, consume_all, create_topic, kafka_brokers, postgres_url, unique_name,
};

async fn setup(prefix: &str) -> (String, String) {
    let table = unique_name(prefix);
    let topic = unique_name(&format!("{prefix}-topic")).replace('_', "-");
    let client = connect_pg().await;
    outbox::migrate_table(&client, &table, &table)
        .await
        .unwrap();
    create_topic(&topic, 1).await;
    (table, topic)
}

/// deadpool-postgres: a pooled client's transaction dereferences to a tokio-postgres
/// `Transaction`; a rolled-back one leaves nothing, a committed one is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_transactions_join_the_outbox() {
    let (table, topic) = setup("dp").await;
    let pg: tokio_postgres::Config = postgres_url().await.parse().unwrap();
    let manager = deadpool_postgres::Manager::new(pg.clone(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    let writer = Writer::new(&table).unwrap();
    let ev = |event_type, n| NewEvent::new(&topic, "agg-1", event_type, json!({ "n": n }));

    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let rolled_back = writer.add_new_event(&*tx, ev("Gone", 0)).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let kept = writer.add_new_event(&*tx, ev("Kept", 1)).await.unwrap();
    tx.commit().await.unwrap();
    // A bare pooled client (autocommit) works too.
    let direct = writer
        .add_new_event(&**client, ev("Direct", 2))
        .await
        .unwrap();

    let outbox = Outbox::builder()
        .postgres(pg)
        .kafka_brokers(kafka_brokers())
        .table(&table)
        .channel(&table)
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let records = consume_all(&kafka_brokers(), &topic, 2, Duration::from_secs(20)).await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.header("event_id").unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![kept.to_string(), direct.to_string()]);
    assert!(!ids.contains(&rolled_back.to_string()));
    outbox.stop(Duration::from_secs(5)).await.unwrap();
    relay.await.unwrap().unwrap();
}

/// sqlx: `Writer::add_new_event_sqlx(&mut *tx, …)` joins a sqlx transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_transactions_join_the_outbox() {
    use sqlx::Connection as _;
    let (table, topic) = setup("sq").await;
    let writer = Writer::new(&table).unwrap();
    let mut conn = sqlx::PgConnection::connect(&postgres_url().await)
        .await
        .unwrap();

    let mut tx = conn.begin().await.unwrap();
    writer
        .add_new_event_sqlx(
            &mut tx,
            NewEvent::new(&topic, "agg-9", "Gone", json!({"n": 0})),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let kept = writer
        .add_new_event_sqlx(
            &mut tx,
            NewEvent::new(&topic, "agg-9", "Kept", json!({"n": 1, "s": "é"})).header("h", "v"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Validation happens before anything is sent.
    let bad = writer
        .add_new_event_sqlx(
            &mut conn,
            NewEvent::new("bad topic", "agg-9", "X", json!({})),
        )
        .await;
    assert!(matches!(
        bad,
        Err(outbox::Error::InvalidEvent {
            field: "event_topic",
            ..
        })
    ));

    let (outbox, relay) = support::start_on(&table).await;
    let records = consume_all(&kafka_brokers(), &topic, 1, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].header("event_id"),
        Some(kept.to_string().as_str())
    );
    assert_eq!(records[0].header("h"), Some("v"));
    assert_eq!(records[0].json(), json!({"n": 1, "s": "é"}));
    assert_eq!(records[0].key_str(), "agg-9");
    outbox.stop(Duration::from_secs(5)).await.unwrap();
    relay.await.unwrap().unwrap();
}

/// The original Go package's `AddNewEvent` statement (`postgres.go`, `Create`), for `table`:
/// no id, no `seq`, `created_at` and `status` from their defaults.
fn go_insert(table: &str) -> String {
    format!(
        "insert into {table} (aggregate_id, event_topic, event_type, payload)
         values ($1,$2,$3,$4) returning id;"
    )
}

/// The Go writer for real (issue 13.5): a table created by the Go DDL, a Go writer (its INSERT,
/// defaults only, one to three events per transaction, session zone Asia/Tokyo) writing before,
/// during and after `migrate` upgrades the table, and our relay started as soon as the upgrade
/// committed while the writer goes on. Every event comes back once per id (duplicates allowed,
/// none in practice), in each aggregate's write order, with the Go writer's id as `event_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_writer_rows_before_and_after_migrate_relayed_in_order() {
    support::init_tracing();
    let table = unique_name("gowriter");
    let topic = unique_name("gowriter-topic").replace('_', "-");
    create_topic(&topic, 3).await;
    let client = connect_pg().await;
    support::create_go_table(&client, &table).await;

    const TOTAL: usize = 90;
    const AGGREGATES: usize = 4;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let writer = {
        let table = table.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut go = connect_pg().await;
            go.batch_execute("set time zone 'Asia/Tokyo'")
                .await
                .unwrap();
            let insert = go_insert(&table);
            let mut written: Vec<(String, i64, Uuid)> = Vec::with_capacity(TOTAL);
            let mut counters = [0i64; AGGREGATES];
            let mut i = 0usize;
            while written.len() < TOTAL {
                let tx = go.transaction().await.unwrap();
                for _ in 0..=(i % 3) {
                    if written.len() == TOTAL {
                        break;
                    }
                    let a = (i * 7 + written.len()) % AGGREGATES;
                    let aggregate = format!("go-agg-{a}");
                    let n = counters[a];
                    counters[a] += 1;
                    let id: Uuid = tx
                        .query_one(
                            &insert,
                            &[&aggregate, &topic, &"GoEvent", &json!({"agg": a, "n": n})],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    written.push((aggregate, n, id));
                }
                tx.commit().await.unwrap();
                i += 1;
                let _ = progress_tx.send(written.len());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        })
    };

    // Rows exist before the upgrade; the writer keeps writing while it runs (its inserts wait
    // for the migration's table lock) and after it.
    progress.wait_for(|n| *n >= 20).await.unwrap();
    let report = outbox::migrate_table(&client, &table, &table)
        .await
        .unwrap();
    assert_eq!(
        report.applied(),
        (1..=outbox::SCHEMA_VERSION).collect::<Vec<_>>().as_slice()
    );
    let before = support::count_rows(&client, &table, "").await;
    let (outbox, relay) = support::start_on(&table).await;
    let written = writer.await.unwrap();
    assert!(
        (before as usize) < TOTAL,
        "the writer was still writing when the relay started ({before} rows)"
    );

    let records = consume_all(&kafka_brokers(), &topic, TOTAL, Duration::from_secs(60)).await;
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &records {
        let id = r.header("event_id").expect("event_id header").to_string();
        *by_id.entry(id).or_default() += 1;
        assert_eq!(r.header("event_type"), Some("GoEvent"));
        let v = r.json();
        let key = r.key_str().to_string();
        assert_eq!(key, format!("go-agg-{}", v["agg"]), "key = aggregate_id");
        let seen = order.entry(key).or_default();
        let n = v["n"].as_i64().unwrap();
        // A duplicate (re-send) may repeat an earlier event, never skip ahead.
        if seen.last().is_none_or(|last| n > *last) {
            assert_eq!(
                n,
                seen.len() as i64,
                "aggregate order broken: {seen:?} then {n}"
            );
            seen.push(n);
        }
    }
    let expected: BTreeMap<String, usize> = written
        .iter()
        .map(|(_, _, id)| (id.to_string(), 1))
        .collect();
    assert_eq!(
        by_id.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "every Go-written event relayed, under the Go writer's id"
    );
    let mut per_aggregate: BTreeMap<String, i64> = BTreeMap::new();
    for (a, _, _) in &written {
        *per_aggregate.entry(a.clone()).or_default() += 1;
    }
    for (a, n) in per_aggregate {
        assert_eq!(
            order[&a].len() as i64,
            n,
            "aggregate {a} complete and in order"
        );
    }
    outbox.stop(Duration::from_secs(5)).await.unwrap();
    relay.await.unwrap().unwrap();
    // Rows written before the upgrade carry the upgrade's fill, rows after it their own insert
    // time; every row has one.
    let missing: i64 = client
        .query_one(
            &format!(
                "select count(*) from {table} where created_at_tz is null or status <> 'done'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(missing, 0, "all done, every row with created_at_tz");
}

/// Rows from other writers are held to `add_new_event`'s rules (issue 14.2): a row that breaks
/// one becomes a dead letter at its first reservation, without being sent and without retries,
/// with the rule in `last_error`; under the default policy it holds back its aggregate's later
/// event; valid rows of other aggregates go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_breaking_add_new_event_rules_are_dead_letters_at_once() {
    support::init_tracing();
    let (table, topic) = setup("badrows").await;
    let client = connect_pg().await;
    let insert = format!(
        "insert into {table} (aggregate_id, event_topic, event_type, payload, headers)
         values ($1, $2, $3, '{{}}', $4::text::jsonb) returning id"
    );
    // (aggregate, topic, type, headers, words the error must contain)
    type BadRow<'a> = (&'a str, String, &'a str, Option<&'a str>, &'a [&'a str]);
    let bad: Vec<BadRow<'_>> = vec![
        (
            "b-topic",
            "bad topic!".to_string(),
            "T",
            None,
            &["event_topic", "' '"],
        ),
        (
            "b-dot",
            "..".to_string(),
            "T",
            None,
            &["event_topic", "not allowed"],
        ),
        ("", topic.clone(), "T", None, &["aggregate_id", "empty"]),
        ("b-type", topic.clone(), "", None, &["event_type", "empty"]),
    ];
    let mut bad_ids = Vec::new();
    for (agg, t, ty, h, _) in &bad {
        let id: Uuid = client
            .query_one(&insert, &[agg, t, ty, h])
            .await
            .unwrap()
            .get(0);
        bad_ids.push(id);
    }
    // Behind a bad row of its aggregate: held back. Another aggregate: delivered. (Malformed or
    // forged custom headers are not a reason to refuse a row: see `hostile::forged_and_malformed_headers_are_dropped_valid_ones_kept`.)
    let held: Uuid = client
        .query_one(&insert, &[&"b-type", &topic, &"Later", &None::<&str>])
        .await
        .unwrap()
        .get(0);
    let good: Uuid = client
        .query_one(&insert, &[&"good", &topic, &"Good", &Some(r#"{"h": "v"}"#)])
        .await
        .unwrap()
        .get(0);

    let (outbox, relay) = support::start_on(&table).await;
    let records = consume_all(&kafka_brokers(), &topic, 1, Duration::from_secs(30)).await;
    assert_eq!(
        records[0].header("event_id"),
        Some(good.to_string().as_str())
    );
    assert_eq!(records[0].header("h"), Some("v"));

    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = client
            .query(
                &format!(
                    "select id, status, attempts, coalesce(last_error, '') from {table}
                      where id = any($1) order by seq"
                ),
                &[&bad_ids],
            )
            .await
            .unwrap();
        if rows.iter().all(|r| r.get::<_, String>(1) != "new") {
            break rows;
        }
        let states: Vec<(String, i32, String)> = rows
            .iter()
            .map(|r| (r.get(1), r.get(2), r.get(3)))
            .collect();
        assert!(
            Instant::now() < deadline,
            "bad rows not dead-lettered within 30 s: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (row, (agg, t, _, h, words)) in rows.iter().zip(&bad) {
        let (status, attempts, error): (String, i32, String) = (row.get(1), row.get(2), row.get(3));
        let what = format!("row aggregate={agg:?} topic={t:?} headers={h:?}");
        assert_eq!(status, "failed", "{what}: dead letter ({error})");
        assert_eq!(attempts, 1, "{what}: no retries ({error})");
        for w in *words {
            assert!(
                error.contains(w),
                "{what}: last_error names the rule ({w}): {error}"
            );
        }
    }
    // Nothing of the bad rows reached Kafka; the held row is still pending.
    support::assert_nothing_more(&kafka_brokers(), &topic, 1, Duration::from_secs(2)).await;
    let held_status: String = support::row_value(&client, &table, "status", &held).await;
    assert_eq!(
        held_status, "new",
        "the aggregate's later event waits behind its dead letter"
    );
    outbox.stop(Duration::from_secs(5)).await.unwrap();
    relay.await.unwrap().unwrap();
}

/// The README's Rust blocks are copied by readers as they are rendered: no rustdoc hidden lines
/// (`# …`), which a rendered README shows and which break the paste. (`cargo test --doc` compiles
/// the runnable blocks through `outbox::ReadmeDoctests`.)
/// Trace context end to end (issue 13.3, feature `opentelemetry`): `add_new_event` stores the
/// caller's span context — a `tracing` span bridged by `tracing-opentelemetry`, or
/// OpenTelemetry's own current context — as `traceparent`; the relay publishes the record in a
/// `PRODUCER` span that is a child of the writer's span, and the record's `traceparent` names
/// that relay span, so the consumer joins one trace: writer → relay publish → record. A
/// `traceparent` the caller set itself is kept as the parent. Spans are collected with the
/// OpenTelemetry SDK's in-memory exporter.
#[cfg(feature = "opentelemetry")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_flows_from_the_writer_through_the_relay_to_the_record() {
    use opentelemetry::trace::{SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("order-service")));
    let _subscriber = tracing::subscriber::set_default(subscriber);

    let (table, topic) = setup("otel").await;
    let outbox = support::builder_on(&table, &table)
        .await
        .poll_interval(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let client = connect_pg().await;

    // 1. Inside a `tracing` span.
    let span = tracing::info_span!("place_order");
    let (tracing_trace, tracing_parent) = {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id(), sc.span_id())
    };
    let id1 = outbox
        .add_new_event(
            &client,
            NewEvent::new(&topic, "o-1", "order.placed", json!({"n": 1})),
        )
        .instrument(span)
        .await
        .unwrap();
    // 2. Inside an OpenTelemetry context (no tracing span).
    let otel_span = provider.tracer("order-service").start("pay_order");
    let cx = opentelemetry::Context::current_with_span(otel_span);
    let (otel_trace, otel_parent) = {
        let sc = cx.span().span_context().clone();
        (sc.trace_id(), sc.span_id())
    };
    let id2 = {
        let _attached = cx.clone().attach();
        outbox
            .add_new_event(
                &client,
                NewEvent::new(&topic, "o-2", "order.paid", json!({"n": 2})),
            )
            .await
            .unwrap()
    };
    // 3. The caller's own traceparent is the parent.
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let id3 = outbox
        .add_new_event(
            &client,
            NewEvent::new(&topic, "o-3", "order.shipped", json!({"n": 3}))
                .header("traceparent", own),
        )
        .await
        .unwrap();

    let relay = outbox.start().unwrap();
    let records = consume_all(&kafka_brokers(), &topic, 3, Duration::from_secs(60)).await;
    assert_eq!(records.len(), 3, "{records:#?}");
    outbox.stop(Duration::from_secs(10)).await.unwrap();
    relay.await.unwrap().unwrap();
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    let expected = [
        (id1, format!("{tracing_trace}"), format!("{tracing_parent}")),
        (id2, format!("{otel_trace}"), format!("{otel_parent}")),
        (
            id3,
            "0af7651916cd43dd8448eb211c80319c".to_string(),
            "b7ad6b7169203331".to_string(),
        ),
    ];
    for (id, trace, parent) in expected {
        let record = records
            .iter()
            .find(|r| {
                r.headers
                    .iter()
                    .any(|(k, v)| k == "event_id" && *v == id.to_string())
            })
            .unwrap_or_else(|| panic!("record of {id}: {records:#?}"));
        let traceparents: Vec<&str> = record
            .headers
            .iter()
            .filter(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(traceparents.len(), 1, "one traceparent: {record:?}");
        let parts: Vec<&str> = traceparents[0].split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparents:?}");
        assert_eq!(
            parts[1], trace,
            "the record continues the writer's trace: {record:?}"
        );
        assert_ne!(
            parts[2], parent,
            "the record names the relay's span, not the writer's"
        );
        let publish = spans
            .iter()
            .find(|s| format!("{}", s.span_context.span_id()) == parts[2])
            .unwrap_or_else(|| panic!("the relay's span {} was exported: {spans:#?}", parts[2]));
        assert_eq!(publish.span_kind, SpanKind::Producer);
        assert_eq!(publish.name, format!("{topic} publish"));
        assert_eq!(
            format!("{}", publish.parent_span_id),
            parent,
            "child of the writer's span"
        );
        assert_eq!(format!("{}", publish.span_context.trace_id()), trace);
        let attr = |k: &str| {
            publish
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("messaging.destination.name"), Some(topic.clone()));
        assert_eq!(attr("messaging.message.id"), Some(id.to_string()));
        assert_eq!(
            attr("messaging.kafka.offset"),
            Some(record.offset.to_string())
        );
    }
}

/// CloudEvents mode (issue 13.4): with `cloudevents_source` set, every record follows the
/// CloudEvents Kafka protocol binding in binary mode, and the CloudEvents Java SDK's
/// `CloudEventDeserializer` decodes it with no glue: id = event id, type, source, subject =
/// aggregate id, time = `created_at_tz`, `application/json` data = the payload. A row's custom
/// header named like a CloudEvents attribute (`ce_id`) is dropped (it could forge the id); other
/// custom headers pass through and are not mistaken for extensions. A `ce_source` that is not a
/// URI-reference is refused by `connect()`. Needs the real cluster (and Java).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_records_decode_with_the_java_sdk() {
    support::init_tracing();
    let Some(cluster) = support::shared_cluster() else {
        eprintln!(
            "cloudevents: skipped: the Java SDK reader needs the real cluster (scripts/test)"
        );
        return;
    };
    let (table, topic) = setup("ce").await;
    let refused = support::builder_on(&table, &table)
        .await
        .cloudevents_source("not a uri")
        .connect()
        .await;
    let msg = refused
        .expect_err("a ce_source with spaces is refused")
        .to_string();
    assert!(
        msg.contains("cloudevents_source") && msg.contains("' '"),
        "{msg}"
    );

    let source = "urn:outbox:orders/v1?x=1";
    let outbox = support::builder_on(&table, &table)
        .await
        .poll_interval(Duration::from_millis(200))
        .cloudevents_source(source)
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let mut client = connect_pg().await;
    let tx = client.transaction().await.unwrap();
    let payloads = [
        json!({"order": 1, "note": "caf\u{e9} \u{1f600}"}),
        json!({"order": 2}),
    ];
    let mut ids = outbox
        .add_new_events(
            &tx,
            &[
                NewEvent::new(&topic, "order-1", "order.created", payloads[0].clone())
                    .header("trace", "t-1"),
                NewEvent::new(&topic, "order-2", "order.paid", payloads[1].clone()),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Another writer's row whose custom headers try to set CloudEvents attributes.
    let forged: Uuid = client
        .query_one(
            &format!(
                "insert into {table} (aggregate_id, event_topic, event_type, payload, headers)
                 values ('order-1', $1, 'order.shipped', '{{\"order\": 1}}',
                         '{{\"ce_id\": \"forged\", \"Content-Type\": \"text/plain\", \"ce_x\": \"y\"}}')
                 returning id"
            ),
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);
    ids.push(forged);

    let plain = consume_all(&kafka_brokers(), &topic, 3, Duration::from_secs(60)).await;
    assert_eq!(plain.len(), 3, "{plain:#?}");
    let java = support::java_read_cloudevents(cluster, &topic, 3, Duration::from_secs(60)).await;
    assert_eq!(java.len(), 3, "the SDK decoded every record: {java:#?}");
    for (record, event) in plain.iter().zip(&java) {
        assert_eq!(
            (record.partition, record.offset),
            (event.partition, event.offset)
        );
        let header = |name: &str| -> Vec<&str> {
            record
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let id = event.id.parse::<Uuid>().expect("ce_id is the event id");
        assert!(ids.contains(&id), "{event:?}");
        assert_eq!(
            header("ce_id"),
            vec![event.id.as_str()],
            "one ce_id, ours: {record:?}"
        );
        assert_eq!(
            header("content-type"),
            vec!["application/json"],
            "{record:?}"
        );
        assert_eq!(event.spec_version, "1.0");
        assert_eq!(event.source, source);
        assert_eq!(
            event.subject.as_deref(),
            record.key.as_deref(),
            "subject = aggregate id"
        );
        assert_eq!(event.data_content_type.as_deref(), Some("application/json"));
        assert!(
            event.extensions.is_empty(),
            "no stray ce_ header: {event:?}"
        );
        let row = client
            .query_one(
                &format!(
                    "select event_type, payload::text, aggregate_id, created_at_tz
                       from {table} where id = $1"
                ),
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(event.event_type, row.get::<_, String>(0));
        let data: serde_json::Value =
            serde_json::from_slice(event.data.as_deref().expect("data")).expect("JSON data");
        let stored: serde_json::Value = serde_json::from_str(row.get::<_, &str>(1)).unwrap();
        assert_eq!(data, stored, "data is the payload");
        assert_eq!(event.subject.as_deref(), Some(row.get::<_, &str>(2)));
        let time = chrono::DateTime::parse_from_rfc3339(event.time.as_deref().expect("ce_time"))
            .expect("RFC 3339 time");
        let created: chrono::DateTime<chrono::Utc> = row.get(3);
        assert_eq!(time, created, "ce_time is created_at_tz to the microsecond");
    }
    let trace: Vec<_> = plain
        .iter()
        .flat_map(|r| r.headers.iter().filter(|(k, _)| k == "trace"))
        .collect();
    assert_eq!(trace.len(), 1, "a custom header passes through: {plain:#?}");
    outbox.stop(Duration::from_secs(10)).await.unwrap();
    relay.await.unwrap().unwrap();
}

/// A `traceparent` the caller set in another ASCII case (`TraceParent`) is the caller's: the
/// writer adds no second trace context beside it (the relay reads trace headers case
/// insensitively, so the writer's `traceparent` would override the caller's).
#[cfg(feature = "opentelemetry")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_set_in_any_case_is_the_callers() {
    use opentelemetry::trace::{TraceContextExt as _, Tracer as _, TracerProvider as _};

    let (table, topic) = setup("tpcase").await;
    let client = connect_pg().await;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let span = provider.tracer("order-service").start("place order");
    let _current = opentelemetry::Context::current_with_span(span).attach();
    let theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let writer = Writer::new(&table).unwrap();
    let mut stored = Vec::new();
    for name in ["TraceParent", "traceparent"] {
        let id = writer
            .add_new_event(
                &client,
                NewEvent::new(&topic, "agg", "ev", json!({})).header(name, theirs),
            )
            .await
            .unwrap();
        stored.push(support::row_value::<serde_json::Value>(&client, &table, "headers", &id).await);
    }
    // Without a header of its own, the event gets the current span's context.
    let id = writer
        .add_new_event(&client, NewEvent::new(&topic, "agg", "ev", json!({})))
        .await
        .unwrap();
    let ambient: serde_json::Value = support::row_value(&client, &table, "headers", &id).await;
    assert_eq!(
        stored,
        vec![
            json!({"TraceParent": theirs}),
            json!({"traceparent": theirs})
        ],
        "the caller's trace context only"
    );
    assert!(
        ambient["traceparent"].as_str().is_some_and(|t| t != theirs),
        "{ambient}"
    );
}

/// `ce_time` is RFC 3339 (a four-digit year, 0001–9999) or absent: a row written by SQL with a
/// `created_at_tz` outside that range (year 20000, a BC date, infinity) is published without
/// `ce_time` (an optional attribute) instead of with a time that a CloudEvents SDK refuses
/// (`20000-…`: the consumer fails on the record) or misreads (`0044-…` for 44 BC). Every event is
/// published; the others keep their exact `ce_time`. On the real cluster the Java SDK's
/// `CloudEventDeserializer` decodes every record too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_time_outside_rfc3339_years_is_omitted() {
    let (table, topic) = setup("cetime").await;
    let client = connect_pg().await;
    let times = [
        Some("20000-01-01 00:00:00+00"),
        Some("0044-03-15 00:00:00+00 BC"),
        Some("infinity"),
        Some("0001-01-01 00:00:00+00"),
        Some("9999-12-31 23:59:59.999999+00"),
        None,
    ];
    for (i, time) in times.iter().enumerate() {
        client
            .execute(
                &format!(
                    "insert into {table} (aggregate_id, event_topic, event_type, payload, created_at_tz)
                     values ($1, $2, 'ev', '{{}}', coalesce($3::text::timestamptz, now()))"
                ),
                &[&format!("agg-{i}"), &topic, &time.map(str::to_string)],
            )
            .await
            .unwrap();
    }
    let outbox = support::builder_on(&table, &table)
        .await
        .cloudevents_source("/orders")
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let records = support::assert_nothing_more(
        &kafka_brokers(),
        &topic,
        times.len(),
        Duration::from_secs(1),
    )
    .await;
    support::stop_and_join(&outbox, relay).await;
    let mut published = Vec::new();
    for record in &records {
        let ce_time: Vec<&str> = record
            .headers
            .iter()
            .filter(|(k, _)| k == "ce_time")
            .map(|(_, v)| v.as_str())
            .collect();
        if let [time] = ce_time[..] {
            let parsed = chrono::DateTime::parse_from_rfc3339(time)
                .unwrap_or_else(|e| panic!("ce_time {time:?} is not RFC 3339: {e}"));
            // Read as UTC text: chrono holds no year beyond 262143, nor infinity.
            let created: String = client
                .query_one(
                    &format!(
                        "select to_char(created_at_tz at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US BC')
                           from {table} where aggregate_id = $1"
                    ),
                    &[&record.key_str()],
                )
                .await
                .unwrap()
                .get(0);
            let created =
                chrono::NaiveDateTime::parse_from_str(&created, "%Y-%m-%d %H:%M:%S%.f AD")
                    .unwrap_or_else(|e| {
                        panic!("{created}: {e}: ce_time {time} for a time out of its range")
                    })
                    .and_utc();
            assert_eq!(parsed, created, "ce_time is created_at_tz: {record:?}");
        } else {
            assert!(ce_time.is_empty(), "at most one ce_time: {record:?}");
        }
        published.push((record.key_str().to_string(), ce_time.len()));
    }
    published.sort();
    assert_eq!(
        published,
        vec![
            ("agg-0".to_string(), 0),
            ("agg-1".to_string(), 0),
            ("agg-2".to_string(), 0),
            ("agg-3".to_string(), 1),
            ("agg-4".to_string(), 1),
            ("agg-5".to_string(), 1),
        ],
        "ce_time only for years 0001-9999; every event published"
    );
    // The Java SDK's deserializer fails on the whole record for a `ce_time` of year 20000 (the
    // consumer cannot get past it); every record decodes now.
    if let Some(cluster) = support::shared_cluster() {
        let java =
            support::java_read_cloudevents(cluster, &topic, times.len(), Duration::from_secs(60))
                .await;
        assert_eq!(java.len(), times.len(), "{java:#?}");
    }
}

#[test]
fn readme_rust_blocks_have_no_hidden_lines() {
    let readme = include_str!("../../README.md");
    let mut in_rust = false;
    let mut runnable = 0;
    for (i, line) in readme.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            if in_rust {
                in_rust = false;
            } else if info.starts_with("rust") {
                in_rust = true;
                if !info.contains("ignore") {
                    runnable += 1;
                }
            }
            continue;
        }
        if in_rust {
            assert!(
                !(trimmed == "#" || trimmed.starts_with("# ")),
                "README.md line {}: a hidden doctest line shows on the rendered README: {line}",
                i + 1
            );
        }
    }
    assert!(
        runnable >= 1,
        "the README shows at least one compiled example"
    );
}
