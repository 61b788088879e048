//! Integration tests (one binary: `cargo test --all-features --test it`).

mod chaos;
mod cli;
mod core;
mod faults;
mod guarantees;
mod hostile;
mod infra;
mod interop;
mod kafka;
mod resilience;
mod support;
mod tls;
