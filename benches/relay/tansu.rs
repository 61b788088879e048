//! The tansu broker (memory storage), started when `KAFKA_BROKERS` is unset.

use anyhow::anyhow;
use anyhow::bail;
use anyhow::Context as _;
use anyhow::Result;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

pub(crate) struct Tansu {
    pub(crate) _guard: Child,
    pub(crate) pid: Option<i32>,
}

pub(crate) fn find_tansu() -> Option<PathBuf> {
    let mut c = Vec::new();
    if let Some(t) = std::env::var_os("TANSU") {
        c.push(PathBuf::from(t));
    }
    if let Some(path) = std::env::var_os("PATH") {
        c.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    if let Some(tools) = std::env::var_os("OUTBOX_TOOLS") {
        c.push(PathBuf::from(tools).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        c.push(PathBuf::from(home).join(".cache/outbox-tools/bin/tansu"));
    }
    c.push(PathBuf::from("/root/.cache/outbox-tools/bin/tansu"));
    c.into_iter().find(|p| p.is_file())
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts tansu (memory storage) through a `sh` wrapper that kills it when this process exits
/// (its stdin closes); the wrapper prints tansu's pid.
pub(crate) fn start_tansu() -> Result<(String, Tansu)> {
    let bin = find_tansu().ok_or_else(|| {
        anyhow!(
            "tansu not found (set KAFKA_BROKERS or TANSU, or run scripts/test once to install it)"
        )
    })?;
    let port = free_port()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let script = r#""$@" >/dev/null 2>&1 &
pid=$!
echo "$pid"
trap '' INT HUP TERM QUIT
cat >/dev/null 2>&1
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null"#;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg("outbox-bench-tansu")
        .arg(&bin)
        .args(["broker", "--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning tansu")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .ok();
    let pid = line.trim().parse().ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
        {
            return Ok((format!("127.0.0.1:{port}"), Tansu { _guard: child, pid }));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("tansu ({}) did not start listening", bin.display())
}

pub(crate) fn tansu_version() -> String {
    let Some(bin) = find_tansu() else {
        return "tansu".into();
    };
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tansu".into())
}
