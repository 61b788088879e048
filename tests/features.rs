//! Plain `cargo test` cannot build the integration suite (`tests/it`, which needs the features
//! `testing`, `cli` and `sqlx`) and would skip it without a word: this test fails instead and
//! says what to run. With those features it compiles to nothing.

#[cfg(not(all(feature = "testing", feature = "cli", feature = "sqlx")))]
#[test]
fn the_integration_suite_needs_its_features() {
    panic!(
        "the integration suite (tests/it) was not built: it needs the features `testing`, `cli` \
         and `sqlx`. Run `scripts/test` (installs the Postgres server programs the tests start \
         throwaway servers from, starts a 3-node Kafka cluster, then runs `cargo test \
         --all-features`) or `cargo test --all-features` (Kafka \
         tests then use librdkafka's mock cluster unless KAFKA_BROKERS is set)."
    );
}
