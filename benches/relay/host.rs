//! The machine: CPU model, load, other engineers' processes, RSS and a perf-free CPU split.

use crate::env::Env;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

pub(crate) fn machine() -> (String, usize, f64) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = info
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count()
        .max(1);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    (model, cores, mem_kb / 1024.0 / 1024.0)
}

/// The code measured: HEAD's short hash, and whether src/ or migrations/ differ from it.
pub(crate) fn code_version() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "migrations",
                "Cargo.toml",
            ])
            .is_some_and(|s| !s.is_empty());
            format!(
                "commit {head}{}",
                if dirty {
                    " + uncommitted changes in src/migrations"
                } else {
                    ""
                }
            )
        }
        None => "unknown commit".into(),
    }
}

pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Other engineers' work on the machine: `cargo test`/`cargo build`/`rustc` processes.
pub(crate) fn foreign_processes() -> Vec<String> {
    // This process and its ancestors (`cargo bench`) are not foreign.
    let mut mine = vec![std::process::id() as i32];
    while let Some((_, ppid, _, _)) = read_stat(&PathBuf::from(format!(
        "/proc/{}/stat",
        mine.last().copied().unwrap_or(1)
    ))) {
        if ppid <= 1 || mine.contains(&ppid) {
            break;
        }
        mine.push(ppid);
    }
    let mut out = Vec::new();
    for (pid, _) in all_pids() {
        if mine.contains(&pid) {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let prog = args
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or("").to_string())
            .unwrap_or_default();
        let sub = args.get(1).map(String::as_str).unwrap_or("");
        if (prog == "cargo" && matches!(sub, "test" | "build" | "clippy" | "run" | "bench"))
            || prog == "rustc"
        {
            out.push(format!("{prog} {sub}").trim().to_string());
        }
    }
    out
}

pub(crate) fn all_pids() -> Vec<(i32, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, e.path()))
        })
        .collect()
}

/// A `kB` field of this process's /proc status, e.g. `"VmRSS:"`; 0 when unreadable.
pub(crate) fn status_kb(field: &str) -> u64 {
    status_kb_of("self", field)
}

/// A `kB` field of `/proc/<pid>/status` (`pid` a number or `"self"`); 0 when unreadable (e.g.
/// the process has exited).
pub(crate) fn status_kb_of(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The CPUs this process may run on (`/proc/self/status` `Cpus_allowed_list`, e.g. `0-1`).
pub(crate) fn allowed_cpus() -> Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| anyhow!("no Cpus_allowed_list in /proc/self/status"))?;
    cpu_list(list.trim())
}

/// Parses a `taskset` CPU list (`0`, `0,2`, `0-3`).
pub(crate) fn cpu_list(list: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.parse().with_context(|| format!("CPU list {list:?}"))?,
            b.parse().with_context(|| format!("CPU list {list:?}"))?,
        );
        cpus.extend(a..=b);
    }
    if cpus.is_empty() {
        bail!("empty CPU list {list:?}");
    }
    Ok(cpus)
}

/// Sets the CPU affinity of every thread of `pid` (`taskset -a -p -c`).
pub(crate) fn pin(pid: i32, cpus: &[usize]) -> Result<()> {
    let list = cpus
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", &list, &pid.to_string()])
        .output()
        .context("taskset (util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {list} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub(crate) fn rss_mb() -> f64 {
    status_kb("VmRSS:") as f64 / 1024.0
}

pub(crate) fn hwm_mb() -> f64 {
    status_kb("VmHWM:") as f64 / 1024.0
}

/// Resets VmHWM (Linux ≥ 4.0), so that it covers one phase.
pub(crate) fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// (comm, ppid, utime+stime, cutime+cstime) in clock ticks.
pub(crate) fn read_stat(path: &std::path::Path) -> Option<(String, i32, u64, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let rest: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let num = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((comm, ppid, num(11)? + num(12)?, num(13)? + num(14)?))
}

pub(crate) fn system_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

pub(crate) struct CpuSnap {
    pub(crate) at: Instant,
    /// Postgres pid → (application_name, backend_type), read at the snapshot.
    pub(crate) labels: HashMap<i32, (String, String)>,
    pub(crate) sys_busy: u64,
    pub(crate) pg: HashMap<i32, u64>,
    pub(crate) pm_self: u64,
    pub(crate) pm_exited: u64,
    /// Local broker processes (tansu, or `--broker-pid`).
    pub(crate) broker: Option<u64>,
    pub(crate) me: u64,
    pub(crate) threads: HashMap<i32, (String, u64)>,
}

pub(crate) async fn cpu_snap(env: &Env) -> CpuSnap {
    let mut labels = HashMap::new();
    if env.postmaster.is_some() {
        if let Ok(c) = env.connect("bench-cpu").await {
            if let Ok(rows) = c
                .query(
                    "select pid, coalesce(application_name, ''), coalesce(backend_type, '') from pg_stat_activity",
                    &[],
                )
                .await
            {
                for r in rows {
                    labels.insert(r.get(0), (r.get(1), r.get(2)));
                }
            }
        }
    }
    let (sys_busy, _) = system_ticks();
    let mut pg = HashMap::new();
    let (mut pm_self, mut pm_exited) = (0, 0);
    if let Some(pm) = env.postmaster {
        if let Some((_, _, t, c)) = read_stat(&PathBuf::from(format!("/proc/{pm}/stat"))) {
            pm_self = t;
            pm_exited = c;
        }
        for (pid, path) in all_pids() {
            if let Some((_, ppid, t, _)) = read_stat(&path.join("stat")) {
                if ppid == pm {
                    pg.insert(pid, t);
                }
            }
        }
    }
    let pids = env.broker_pids();
    let broker = (!pids.is_empty()).then(|| {
        pids.iter()
            .filter_map(|pid| read_stat(&PathBuf::from(format!("/proc/{pid}/stat"))))
            .map(|(_, _, t, c)| t + c)
            .sum()
    });
    let me = read_stat(&PathBuf::from("/proc/self/stat"))
        .map(|s| s.2)
        .unwrap_or(0);
    let mut threads = HashMap::new();
    for e in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let (Some(tid), Some((comm, _, t, _))) = (
            e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()),
            read_stat(&e.path().join("stat")),
        ) {
            threads.insert(tid, (comm, t));
        }
    }
    CpuSnap {
        at: Instant::now(),
        labels,
        sys_busy,
        pg,
        pm_self,
        pm_exited,
        broker,
        me,
        threads,
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct CpuSplit {
    pub(crate) wall: f64,
    pub(crate) cores: usize,
    pub(crate) pg_total: Option<f64>,
    pub(crate) pg_groups: Vec<(String, f64)>,
    pub(crate) broker: Option<f64>,
    pub(crate) me: f64,
    pub(crate) me_rdkafka: f64,
    pub(crate) me_tokio: f64,
    pub(crate) sys_busy: f64,
    /// Events handled in the interval (for CPU per event).
    pub(crate) events: usize,
}

impl CpuSplit {
    pub(crate) fn other(&self) -> f64 {
        (self.sys_busy - self.pg_total.unwrap_or(0.0) - self.broker.unwrap_or(0.0) - self.me)
            .max(0.0)
    }

    pub(crate) fn idle(&self) -> f64 {
        (self.wall * self.cores as f64 - self.sys_busy).max(0.0)
    }

    pub(crate) fn render(&self) -> String {
        let mut s = format!(
            "{:.1} s × {} cores = {:.1} CPU-s: ",
            self.wall,
            self.cores,
            self.wall * self.cores as f64
        );
        match self.pg_total {
            Some(pg) => {
                let groups: Vec<String> = self
                    .pg_groups
                    .iter()
                    .filter(|(_, v)| *v >= 0.05)
                    .map(|(k, v)| format!("{k} {v:.1}"))
                    .collect();
                let _ = write!(s, "Postgres {pg:.1} ({})", groups.join(", "));
            }
            None => s.push_str("Postgres n/a (not local)"),
        }
        match self.broker {
            Some(t) => {
                let _ = write!(s, "; broker {t:.1}");
            }
            None => s.push_str("; broker n/a (external)"),
        }
        let _ = write!(
            s,
            "; bench process (relay + harness) {:.1} (librdkafka threads {:.1}, tokio workers {:.1}); other processes {:.1}; idle/iowait {:.1}",
            self.me,
            self.me_rdkafka,
            self.me_tokio,
            self.other(),
            self.idle()
        );
        if self.events > 0 {
            let us = |v: f64| v * 1e6 / self.events as f64;
            let _ = write!(
                s,
                ". Per event: Postgres {:.0} µs, broker {:.0} µs, bench process {:.0} µs",
                us(self.pg_total.unwrap_or(f64::NAN)),
                us(self.broker.unwrap_or(f64::NAN)),
                us(self.me)
            );
        }
        s
    }
}

pub(crate) fn cpu_split(env: &Env, a: &CpuSnap, b: &CpuSnap) -> CpuSplit {
    let tick = |t: u64| t as f64 / env.clk_tck;
    let mut split = CpuSplit {
        wall: b.at.duration_since(a.at).as_secs_f64(),
        cores: env.cores,
        sys_busy: tick(b.sys_busy.saturating_sub(a.sys_busy)),
        me: tick(b.me.saturating_sub(a.me)),
        ..Default::default()
    };
    for (tid, (comm, t)) in &b.threads {
        let d = tick(t.saturating_sub(a.threads.get(tid).map(|x| x.1).unwrap_or(0)));
        if comm.starts_with("rdk:") {
            split.me_rdkafka += d;
        } else if comm.starts_with("tokio") {
            split.me_tokio += d;
        }
    }
    if let (Some(at), Some(bt)) = (a.broker, b.broker) {
        split.broker = Some(tick(bt.saturating_sub(at)));
    }
    if env.postmaster.is_some() {
        let labels = &b.labels;
        let mut groups: HashMap<&'static str, f64> = HashMap::new();
        for (pid, t) in &b.pg {
            let d = tick(t.saturating_sub(a.pg.get(pid).copied().unwrap_or(0)));
            let (app, bt) = labels.get(pid).cloned().unwrap_or_default();
            let g = if app == "outbox-relay-batch" {
                "relay batch sessions"
            } else if app.starts_with("outbox-relay") {
                "other relay sessions"
            } else if app.starts_with("bench") {
                "bench sessions"
            } else if bt == "walwriter" {
                "walwriter"
            } else if bt.contains("autovacuum") {
                "autovacuum"
            } else if bt == "checkpointer" || bt == "background writer" {
                "checkpointer+bgwriter"
            } else {
                "other"
            };
            *groups.entry(g).or_default() += d;
            if std::env::var_os("OUTBOX_BENCH_DEBUG_CPU").is_some() && d > 0.0 {
                eprintln!("cpu: pid {pid} {app:?} {bt:?} {d:.2}");
            }
        }
        let exited = tick(b.pm_exited.saturating_sub(a.pm_exited));
        if std::env::var_os("OUTBOX_BENCH_DEBUG_CPU").is_some() {
            let mut pa: Vec<_> = a.pg.keys().collect();
            pa.sort();
            let mut pb: Vec<_> = b.pg.keys().collect();
            pb.sort();
            eprintln!(
                "cpu: postmaster {:?} exited {} -> {}; pids a {:?}; pids b {:?}; labels {:?}",
                env.postmaster, a.pm_exited, b.pm_exited, pa, pb, b.labels
            );
        }
        *groups.entry("exited processes").or_default() += exited;
        *groups.entry("postmaster").or_default() += tick(b.pm_self.saturating_sub(a.pm_self));
        let mut g: Vec<(String, f64)> = groups.into_iter().map(|(k, v)| (k.into(), v)).collect();
        g.sort_by(|x, y| y.1.total_cmp(&x.1));
        split.pg_total = Some(g.iter().map(|x| x.1).sum());
        split.pg_groups = g;
    }
    split
}
