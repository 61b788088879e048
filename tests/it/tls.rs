//! Postgres over TLS (feature `postgres-rustls`): every relay connection is encrypted.

use std::time::Duration;

use outbox::testing::TestPostgres;
use outbox::{NewEvent, Outbox};
use serde_json::json;

use crate::support::{consume_all, create_topic, kafka_brokers, unique_name};

/// Starts a private Postgres with `ssl = on` and a self-signed certificate for 127.0.0.1;
/// returns it and a rustls client config trusting that certificate.
async fn tls_postgres() -> (TestPostgres, rustls::ClientConfig) {
    let pg = TestPostgres::start().await.expect("start postgres");
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    // The files go next to the cluster, readable only by the server's user.
    let crt = pg.dir().join("server.crt");
    let key = pg.dir().join("server.key");
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
    // The data directory belongs to the server's user (`postgres` when the tests run as root).
    let owner = std::fs::metadata(pg.dir().join("data"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    for f in [&crt, &key] {
        std::os::unix::fs::chown(f, Some(owner), None).unwrap();
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let admin = pg.connect().await.unwrap();
    for stmt in [
        format!("alter system set ssl_cert_file = '{}'", crt.display()),
        format!("alter system set ssl_key_file = '{}'", key.display()),
        "alter system set ssl = on".to_string(),
        "select pg_reload_conf()".to_string(),
    ] {
        admin.batch_execute(&stmt).await.unwrap();
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // ssl is enabled by the reload; wait until the server offers it.
    for _ in 0..50 {
        let on: String = admin.query_one("show ssl", &[]).await.unwrap().get(0);
        if on == "on" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (pg, tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_connections_use_tls_when_configured() {
    let (pg, tls) = tls_postgres().await;
    let topic = unique_name("tls-topic").replace('_', "-");
    create_topic(&topic, 1).await;
    let mut config = pg.config();
    config.ssl_mode(tokio_postgres::config::SslMode::Require);

    // Without a TLS connector, sslmode=require cannot connect.
    let refused = Outbox::builder()
        .postgres(config.clone())
        .kafka_brokers(kafka_brokers())
        .migrate(true)
        .connect()
        .await;
    assert!(
        matches!(refused, Err(outbox::Error::Postgres(_))),
        "{refused:?}"
    );

    let outbox = Outbox::builder()
        .postgres(config.clone())
        .postgres_tls(tls.clone())
        .kafka_brokers(kafka_brokers())
        .poll_interval(Duration::from_secs(60))
        .migrate(true)
        .connect()
        .await
        .expect("connect over TLS");
    let relay = outbox.start().unwrap();
    // Let the listener and waker connect, then write an event (over a plain local connection).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writer = pg.connect().await.unwrap();
    let id = outbox
        .add_new_event(
            &writer,
            NewEvent::new(&topic, "agg", "T", json!({"tls": true})),
        )
        .await
        .unwrap();
    let records = consume_all(&kafka_brokers(), &topic, 1, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].header("event_id"), Some(id.to_string().as_str()));

    // Every relay session is encrypted.
    let rows = writer
        .query(
            "select a.application_name, s.ssl from pg_stat_activity a join pg_stat_ssl s using (pid)
              where a.application_name like 'outbox-relay-%'",
            &[],
        )
        .await
        .unwrap();
    let roles: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        roles.iter().any(|(n, _)| n == "outbox-relay-listener"),
        "listener session missing: {roles:?}"
    );
    assert!(
        roles.iter().all(|(_, ssl)| *ssl),
        "a relay session without TLS: {roles:?}"
    );

    // The Postgres-only admin handle connects over TLS too.
    let admin = outbox::Admin::connect_rustls(config, tls, "events")
        .await
        .unwrap();
    assert_eq!(admin.status().await.unwrap().pending, 0);
    outbox.stop(Duration::from_secs(5)).await.unwrap();
    relay.await.unwrap().unwrap();
}
