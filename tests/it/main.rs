//! Integration tests (one binary: `cargo test --all-features --test it`).

mod chaos;
mod cli;
mod core;
mod faults;
mod guarantees;
mod infra;
mod interop;
mod resilience;
mod support;
mod tls;
