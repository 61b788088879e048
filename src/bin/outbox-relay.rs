//! `outbox-relay`: run the outbox relay as a process, and operate the outbox table.
//!
//! Configuration comes from flags or the environment (`DATABASE_URL`, `KAFKA_BROKERS`,
//! `OUTBOX_*`); any librdkafka property is passed with `-X key=value`, like kcat.
//!
//! Exit codes (derived in one place, `exit_code`, from the error's predicates): 0 success, 2 bad
//! flags, 3 invalid configuration or argument value, 4 Postgres unreachable, the login refused, or not answering
//! within its timeout (`connect_timeout` in the URL, default 10 s), or a Kafka client error
//! outside the relay's deliveries, 5 outbox table missing, not migrated or with a schema problem
//! (`status` prints them, then exits 5), 1 anything else. An
//! unreachable Kafka does not stop `run`: the relay keeps the events pending, retries, and
//! reports it in its logs and `/health`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[path = "../text.rs"]
#[allow(dead_code)]
mod text;
use outbox::{Admin, Error, Event, EventFilter, EventStatus, Outbox, RequeueFilter, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay: Postgres → Kafka",
    after_help = "Logging: OUTBOX_LOG, a tracing filter (default info,rdkafka=warn; e.g. OUTBOX_LOG=info,outbox::relay=debug logs every batch).\nExit codes: 0 success, 1 other failure, 2 bad flags, 3 invalid configuration or argument value, 4 Postgres unreachable or refusing the login, or a Kafka client error outside deliveries (an unreachable Kafka does not stop run: its events wait), 5 table missing, not migrated or with a schema problem (README: The `outbox-relay` binary)."
)]
struct Cli {
    /// Postgres connection string.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Outbox table.
    #[arg(long, hide_env_values = true, env = "OUTBOX_TABLE", default_value = outbox::DEFAULT_TABLE, global = true)]
    table: String,
    /// NOTIFY channel.
    #[arg(long, hide_env_values = true, env = "OUTBOX_CHANNEL", default_value = outbox::DEFAULT_CHANNEL, global = true)]
    channel: String,
    /// Log format.
    #[arg(
        long,
        hide_env_values = true,
        env = "OUTBOX_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or upgrade the outbox table (also a table created by the original Go package).
    Migrate,
    /// Run the relay until SIGINT/SIGTERM, then stop gracefully.
    Run(Box<RunArgs>),
    /// Backlog per topic: pending, retrying, dead letters, oldest pending age.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Find events (JSON lines on stdout).
    Find(FindArgs),
    /// Requeue dead letters by id, aggregate or topic.
    Requeue(RequeueArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kafka bootstrap servers.
    #[arg(long, hide_env_values = true, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// librdkafka property `key=value` (repeatable), e.g. `-X linger.ms=1`.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    kafka_property: Vec<String>,
    /// The relay's settings, declared once in `outbox::Settings` (flags and `OUTBOX_*`).
    #[command(flatten)]
    settings: Settings,
    /// Period of the progress log line (0s: off).
    #[arg(long, hide_env_values = true, env = "OUTBOX_PROGRESS_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    progress_interval: Duration,
    /// Run migrations before starting.
    #[arg(long)]
    migrate: bool,
    /// Serve Prometheus metrics at `/metrics` and health at `/health` on this address
    /// (`IP:port` or `host:port`, e.g. `127.0.0.1:9464` or `localhost:9464`).
    #[arg(long, hide_env_values = true, env = "OUTBOX_METRICS_ADDR", value_parser = listen_addr)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// `/health` answers 503 when the oldest pending event is older than this.
    #[arg(long, hide_env_values = true, env = "OUTBOX_HEALTH_MAX_PENDING_AGE", value_parser = humantime::parse_duration, default_value = "5m")]
    health_max_pending_age: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StatusArg {
    New,
    Done,
    Failed,
}

#[derive(Args, Debug)]
struct FindArgs {
    /// Only this status (repeatable).
    #[arg(long, value_enum)]
    status: Vec<StatusArg>,
    /// Only this aggregate.
    #[arg(long)]
    aggregate: Option<String>,
    /// Only this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only this event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only these ids (repeatable).
    #[arg(long)]
    id: Vec<uuid::Uuid>,
    /// Keyset cursor: only events after this seq.
    #[arg(long)]
    after_seq: Option<i64>,
    /// Page size (1..=10000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(Args, Debug)]
struct RequeueArgs {
    /// Dead letters with these ids (repeatable).
    #[arg(long)]
    id: Vec<uuid::Uuid>,
    /// Dead letters of this aggregate.
    #[arg(long)]
    aggregate: Option<String>,
    /// Dead letters for this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Every dead letter (required when no other selector is given).
    #[arg(long)]
    all: bool,
    /// Show what would be requeued; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = exit_code(&e);
        // A refused or failed connection says so; a timeout names its call itself.
        let message = if matches!(e, Error::Postgres(_)) && e.is_connection() {
            let hint = if e.to_string().contains("password missing") {
                " (the server asks for a password: put it in the URL, postgres://role:password@host/db; PGPASSWORD and ~/.pgpass are not read)"
            } else {
                ""
            };
            match PG_TARGET.get() {
                Some(target) => format!("cannot connect to Postgres ({target}): {e}{hint}"),
                None => format!("cannot connect to Postgres: {e}{hint}"),
            }
        } else {
            e.to_string()
        };
        Failure { code, message }
    }
}

/// The exit code of an error, from its predicates: 3 invalid input, 4 Postgres unreachable (or
/// the login refused) or a Kafka client error, 5 schema problem, 1 anything else.
fn exit_code(e: &Error) -> u8 {
    if e.is_invalid_input() {
        3
    } else if e.is_connection() || matches!(e, Error::Kafka(_)) {
        4
    } else if e.is_schema() {
        5
    } else {
        1
    }
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// An address to listen on: `IP:port`, or `host:port` resolved once (its first address; the
/// new-user helper tried `localhost:9464` and got only "invalid socket address syntax").
fn listen_addr(value: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    // No host name in the example: a usage error hides every value of the command line
    // wherever it appears, and `--metrics-addr localhost` hid the example's (new-user helper).
    let expected = "expected IP:port or host:port (the port is needed), e.g. 127.0.0.1:9464";
    match value.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("the host resolves to no address; {expected}")),
        Err(e) => Err(format!("{e}; {expected}")),
    }
}

/// Parses the command line; on an error clap would print, prints it with every value from the
/// command line redacted (a misplaced `-X sasl.password S` must not echo `S`).
fn parse_cli() -> Result<Cli, ExitCode> {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let text = redacted_usage_error(&e, &args);
            eprint!("{}", text::printable_lines(&text));
            Err(ExitCode::from(2))
        }
    }
}

/// clap's rendering of usage error `e` with every value of `args` (the command line) redacted,
/// but for subcommand-like words, booleans and a misspelt choice of a flag with fixed values.
fn redacted_usage_error(e: &clap::Error, args: &[String]) -> String {
    let mut text = e.render().to_string();
    // A value refused by a flag with a fixed set of values (`--wake-mode pollonly`) is
    // shown when it looks like one of those names misspelt (the new-user helper saw
    // `invalid value '<redacted>' for '--wake-mode <WAKE>'`): lowercase letters and
    // `-`, as the first bare word below.
    let looks_like_a_name =
        |v: &str| v.len() <= 20 && v.chars().all(|c| c.is_ascii_lowercase() || c == '-');
    // A refused number or duration (`--lease 5x`, `--batch-size 99999999999999999999`) is shown
    // when it is digits and dots followed by at most a short unit of letters: a mistyped unit
    // or an overflow, not a secret (the new-user helper saw `invalid value '<redacted>'` for
    // them); a value mixing letters and digits otherwise stays hidden.
    let looks_like_a_number = |v: &str| {
        let unit = v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        v.len() <= 24
            && v.starts_with(|c: char| c.is_ascii_digit())
            && unit.len() <= 6
            && unit.chars().all(|c| c.is_ascii_alphabetic())
    };
    let misspelt_choice = match (
        e.get(clap::error::ContextKind::ValidValue),
        e.get(clap::error::ContextKind::InvalidValue),
    ) {
        (Some(_), Some(clap::error::ContextValue::String(v))) => {
            looks_like_a_name(v).then(|| v.clone())
        }
        (None, Some(clap::error::ContextValue::String(v))) => {
            looks_like_a_number(v).then(|| v.clone())
        }
        _ => None,
    };
    // Words no one uses as a secret: shown where they stand alone
    // (`--prompt-producer yes`, which wants `=yes`).
    const WORDS: &[&str] = &["migrate", "run", "status", "find", "requeue", "help"];
    const BOOLS: &[&str] = &["true", "false", "yes", "no", "on", "off", "1", "0"];
    // The first bare word stands where a subcommand goes: shown when it looks like one
    // (`frobnicate`), so that a mistyped subcommand is still named.
    let first_bare = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .filter(|a| looks_like_a_name(a));
    for a in args.iter().skip(1) {
        if Some(a) == first_bare {
            continue;
        }
        // The value part: all of a bare argument, after `=` or `-X` in a flag.
        let value = if let Some(flag) = a.strip_prefix('-') {
            match (flag.split_once('='), flag.strip_prefix('X')) {
                (Some((_, v)), _) => v,
                (None, Some(v)) => v,
                (None, None) => continue,
            }
        } else if WORDS.contains(&a.as_str()) || BOOLS.contains(&a.as_str()) {
            continue;
        } else {
            a.as_str()
        };
        if value.is_empty() || misspelt_choice.as_deref() == Some(value) {
            continue;
        }
        text = text.replace(&format!("'{value}'"), "'<redacted>'");
        if value.len() >= 4 {
            text = text.replace(value, "<redacted>");
        }
    }
    // `--prompt-producer yes`: that flag takes its value after `=` only.
    let detached = args
        .windows(2)
        .find(|w| w[0] == "--prompt-producer" && BOOLS.contains(&w[1].as_str()));
    if let Some(w) = detached {
        text.push_str(&format!(
            "\n  tip: write --prompt-producer={} (this flag takes its value after `=`)\n",
            w[1]
        ));
    }
    text
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
        .unwrap_or_else(|_| "info,rdkafka=warn".into());
    // Colours only on a terminal: logs piped to files, journald or collectors stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let log_format = cli.log_format;
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            match log_format {
                // A list of problems (one per line) stays a list; each line is escaped on its
                // own, so no control character reaches the terminal.
                LogFormat::Text => {
                    eprintln!("outbox-relay: {}", text::printable_lines(&f.message));
                }
                // A log collector reading JSON lines gets the failure as one of them too.
                LogFormat::Json => {
                    let message = text::printable(&f.message);
                    tracing::error!(exit_code = f.code, error = %message, "outbox-relay failed");
                }
            }
            ExitCode::from(f.code)
        }
    }
}

/// What a database URL that tokio-postgres could not parse most likely got wrong in its form:
/// a scheme other than `postgres://` or `postgresql://` (the two tokio-postgres reads), or
/// neither a URL nor `key=value` pairs (its parser then only says "unexpected EOF"). Shows
/// nothing of the URL but a scheme of at most 20 letters, digits, `+`, `-` or `.`.
fn url_form_hint(url: &str) -> Option<String> {
    match url.split_once("://") {
        Some(("postgres" | "postgresql", _)) => None,
        Some((scheme, _)) => {
            let plain = !scheme.is_empty()
                && scheme.len() <= 20
                && (scheme.chars()).all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            let shown = if plain {
                format!(", not {scheme}://")
            } else {
                String::new()
            };
            Some(format!(
                "a URL starts with postgres:// or postgresql://{shown}"
            ))
        }
        None if !url.contains('=') => Some(
            "expected postgres://USER:PASSWORD@HOST:PORT/DATABASE or key=value pairs".to_string(),
        ),
        None => None,
    }
}

fn pg_config(cli: &Cli) -> Result<tokio_postgres::Config, Failure> {
    let url = cli
        .database_url
        .as_deref()
        .ok_or_else(|| fail(3, "no database: set --database-url or DATABASE_URL"))?;
    // Through `outbox::Error` for the cause (which option is wrong), which tokio-postgres'
    // `Display` leaves out; it names options, never their values.
    let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        let hint = url_form_hint(url).map_or(String::new(), |h| format!(" ({h})"));
        fail(
            3,
            format!(
                "invalid --database-url: {}{hint}",
                outbox::Error::Postgres(e)
            ),
        )
    })?;
    // A second `@` is most likely an unescaped one in the password, whose rest the URL parser
    // then takes for the host (and the path): nothing of the URL is shown.
    let target = if url.matches('@').count() > 1 {
        "not shown: the URL has more than one @ — percent-encode an @ in the password as %40"
            .to_string()
    } else {
        pg_target(&config)
    };
    let _ = PG_TARGET.set(target);
    Ok(config)
}

/// Where the command connects to Postgres (see [`pg_target`]), for a connection error's text.
static PG_TARGET: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The servers, database and role of `config` — `db1:5432, db2:5432, database app, user relay`
/// — never the password: what a connection error should name (tokio-postgres' own text says
/// only "Connection refused"). A host or database name that cannot be one (an `@`, `/`, …) is
/// not shown: an unescaped `@` in the password makes the URL parser take the password's rest
/// for the host (found by a breaker helper: `postgres://app:p@ss@db/app` printed `ss@db`).
fn pg_target<'a>(config: &'a tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let port_of = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let mut hosts: Vec<String> = (config.get_hosts().iter().enumerate())
        .map(|(i, h)| match h {
            Host::Tcp(name) => shown_host(name, port_of(i)),
            #[cfg(unix)]
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port_of(i)),
        })
        .collect();
    if hosts.is_empty() {
        hosts = (config.get_hostaddrs().iter().enumerate())
            .map(|(i, ip)| shown_host(&ip.to_string(), port_of(i)))
            .collect();
    }
    if hosts.is_empty() {
        hosts.push(format!("localhost:{}", port_of(0)));
    }
    let shown = |name: &'a str| {
        if plain_name(name) {
            name
        } else {
            "(not shown: not a plain name)"
        }
    };
    // Without a user tokio-postgres logs in as the OS user; the server's database defaults to
    // the user's name.
    let (user, database) = match (config.get_user(), config.get_dbname()) {
        (None, None) => ("(the OS user)", "(the OS user's name)"),
        (None, Some(d)) => ("(the OS user)", shown(d)),
        (Some(u), d) => (shown(u), shown(d.unwrap_or(u))),
    };
    format!("{}, database {database}, user {user}", hosts.join(", "))
}

/// `name:port`, `[v6]:port`, or a placeholder for a host name that cannot be one (see
/// [`pg_target`]).
fn shown_host(name: &str, port: u16) -> String {
    match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Ok(ip) => format!("{ip}:{port}"),
        Err(_) if plain_name(name) => format!("{name}:{port}"),
        Err(_) => format!(
            "(a host name that is not one, not shown: an unescaped @ or : in the password? percent-encode it, %40 or %3A):{port}"
        ),
    }
}

/// Letters, digits, `.`, `-`, `_` and `$` only: a host, database or role name that may be shown.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '$'))
}

async fn admin(cli: &Cli) -> Result<Admin, Failure> {
    let cfg = pg_config(cli)?;
    Ok(Admin::connect(cfg, &cli.table).await?)
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Migrate => migrate(&cli).await,
        Command::Run(args) => run(&cli, args).await,
        Command::Status { json } => {
            let status = admin(&cli).await?.status().await?;
            print_status(&cli.table, &status, *json);
            // Printed, and in the exit code as `run` would refuse (a monitoring script reads
            // the code; found by a new user).
            match status.schema_problems.len() {
                0 => Ok(()),
                n => Err(fail(
                    5,
                    format!("{n} schema problem(s) with table {} (above)", cli.table),
                )),
            }
        }
        Command::Find(args) => {
            let events = admin(&cli).await?.find(&event_filter(args)).await?;
            for e in &events {
                println!("{}", text::json_line(&event_json(e)));
            }
            // On stderr, so that stdout stays JSON lines: an empty stdout alone looked like a
            // command that did nothing (a new-user helper's reading).
            if events.is_empty() {
                eprintln!("no events match");
            }
            Ok(())
        }
        Command::Requeue(args) => requeue(&cli, args).await,
    }
}

/// `e` as a failure; a migration refused for want of privileges says which role migrates (found
/// by new-user helpers, who saw only "permission denied for schema public" from `migrate` and
/// from `run --migrate`).
fn migrate_failure(e: outbox::Error) -> Failure {
    let refused = e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE);
    let mut failure = Failure::from(e);
    if refused {
        failure.message.push_str(concat!(
            " (migrating needs a role that may create the outbox objects in the schema ",
            "and owns them once created — the migrator of scripts/roles.sql, see the ",
            "README's Security section; the relay and writer roles cannot migrate)"
        ));
    }
    failure
}

/// `migrate`: applies the migrations and says what changed.
async fn migrate(cli: &Cli) -> Result<(), Failure> {
    let cfg = pg_config(cli)?;
    let report = Admin::migrate(cfg, &cli.table, &cli.channel)
        .await
        .map_err(migrate_failure)?;
    let table = &cli.table;
    if let Some(previous) = report.previous_channel() {
        println!(
            "table {table}: notify channel changed from {previous} to {}",
            cli.channel
        );
    }
    if !report.repaired().is_empty() {
        println!(
            "table {table}: repaired (re-created, re-enabled, or a sequence moved past the rows): {}",
            report.repaired().join(", ")
        );
    }
    if let Some(version) = report.migrated_by_newer() {
        println!(
            "table {table} is at schema version {version}, migrated by a newer outbox (this build knows {}): left as it is, nothing applied or repaired (repairs need the newer build's migrate)",
            outbox::SCHEMA_VERSION
        );
    } else if report.applied().is_empty() && report.repaired().is_empty() {
        println!(
            "table {table} is up to date (schema version {})",
            outbox::SCHEMA_VERSION
        );
    } else if !report.applied().is_empty() {
        println!("table {table}: applied migrations {:?}", report.applied());
    }
    Ok(())
}

/// The `find` flags as an [`EventFilter`].
fn event_filter(args: &FindArgs) -> EventFilter {
    let mut f = EventFilter::new()
        .limit(args.limit)
        .ids(args.id.iter().copied());
    for s in &args.status {
        f = f.status(match s {
            StatusArg::New => EventStatus::New,
            StatusArg::Done => EventStatus::Done,
            StatusArg::Failed => EventStatus::Failed,
        });
    }
    if let Some(a) = &args.aggregate {
        f = f.aggregate_id(a);
    }
    if let Some(t) = &args.topic {
        f = f.topic(t);
    }
    if let Some(t) = &args.event_type {
        f = f.event_type(t);
    }
    if let Some(s) = args.after_seq {
        f = f.after_seq(s);
    }
    f
}

/// `requeue`: requeues the selected dead letters, or lists them with `--dry-run`.
async fn requeue(cli: &Cli, args: &RequeueArgs) -> Result<(), Failure> {
    let no_selector = args.id.is_empty() && args.aggregate.is_none() && args.topic.is_none();
    if no_selector && !args.all {
        return Err(fail(
            2,
            "requeue: give --id, --aggregate or --topic, or --all for every dead letter",
        ));
    }
    let mut filter = RequeueFilter::all().ids(args.id.iter().copied());
    if let Some(a) = &args.aggregate {
        filter = filter.aggregate_id(a);
    }
    if let Some(t) = &args.topic {
        filter = filter.topic(t);
    }
    let admin = admin(cli).await?;
    if args.dry_run {
        let events = admin.find(&filter.to_event_filter()).await?;
        for e in &events {
            println!("{}", text::json_line(&event_json(e)));
        }
        eprintln!("dry run: {} dead letter(s) would be requeued", events.len());
    } else {
        let n = admin.requeue(&filter).await?;
        println!("requeued {n} dead letter(s)");
    }
    Ok(())
}

/// `run`: the relay until SIGINT/SIGTERM, with the metrics port and the progress line.
async fn run(cli: &Cli, args: &RunArgs) -> Result<(), Failure> {
    let token = CancellationToken::new();
    let builder = relay_builder(cli, args, &token)?;
    stop_on_signal(token.clone());
    let outbox = match builder.connect().await {
        Ok(outbox) => outbox,
        Err(e) if args.migrate => return Err(migrate_failure(e)),
        Err(e) => return Err(e.into()),
    };
    if let Some(addr) = args.metrics_addr {
        serve_metrics(
            addr,
            outbox.clone(),
            args.health_max_pending_age,
            token.clone(),
        )
        .await?;
    }
    if !args.progress_interval.is_zero() && args.progress_interval < Duration::from_millis(100) {
        return Err(fail(
            3,
            "--progress-interval: at least 100ms (each line runs a status query), or 0s for none",
        ));
    }
    if !args.progress_interval.is_zero() {
        tokio::spawn(log_progress(
            outbox.clone(),
            args.progress_interval,
            token.clone(),
        ));
    }
    tracing::info!(table = %cli.table, channel = %cli.channel, "outbox relay running");
    outbox.run().await?;
    Ok(())
}

/// The relay's builder from the flags: the settings as parsed, the global table and channel,
/// the brokers and every `-X key=value`.
fn relay_builder(
    cli: &Cli,
    args: &RunArgs,
    token: &CancellationToken,
) -> Result<outbox::OutboxBuilder, Failure> {
    let mut settings = args.settings.clone();
    settings.table.clone_from(&cli.table);
    settings.channel.clone_from(&cli.channel);
    let mut b = Outbox::builder()
        .postgres(pg_config(cli)?)
        .settings(settings)
        .migrate(args.migrate)
        .cancellation_token(token.clone());
    if let Some(k) = &args.kafka_brokers {
        b = b.kafka_brokers(k);
    }
    for kv in &args.kafka_property {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            // Only the leading name is shown: the rest may be a secret (`sasl.password:S`).
            let name: String = kv
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .collect();
            fail(
                2,
                format!("-X `{name}…`: expected key=value (the rest is not shown: it may hold a secret)"),
            )
        })?;
        b = b.kafka_property(k, v);
    }
    Ok(b)
}

/// Cancels `token` on SIGINT or SIGTERM (also while still connecting): a graceful stop.
fn stop_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: stopping");
        token.cancel();
    });
}

/// Logs a progress line every `every` (delivered/s, backlog, oldest pending age, dead letters)
/// until `token` is cancelled.
async fn log_progress(outbox: Outbox, every: Duration, token: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = outbox.stats();
        // Events per second to a tenth (a few events in a long interval are not 0), and the age
        // to the millisecond: numbers in the JSON log format, without float noise.
        let rate = stats.delivered.saturating_sub(last) as f64 / every.as_secs_f64();
        let rate = (rate * 10.0).round() / 10.0;
        last = stats.delivered;
        match outbox.status().await {
            Ok(s) => tracing::info!(
                delivered_per_s = rate,
                delivered = stats.delivered,
                backlog = s.pending,
                oldest_pending_age_s = s
                    .oldest_pending_age
                    .map_or(0.0, |d| d.as_millis() as f64 / 1000.0),
                dead_letters = s.dead_letters,
                listener_connected = stats.listener_connected,
                "progress"
            ),
            Err(e) => {
                tracing::warn!(error = %e, delivered = stats.delivered, "progress: status query failed")
            }
        }
    }
}

/// Limits of the metrics/health port: its clients are not trusted.
mod http_limits {
    use std::time::Duration;
    /// Connections served at once; further clients get 503 at once.
    pub(crate) const MAX_CONNECTIONS: usize = 64;
    /// Longest wait for a request's head (request line and headers).
    pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    /// Longest life of one connection, request and response included.
    pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
    /// Largest request head buffered, in bytes (hyper's minimum is 8 KiB); larger ones get 431.
    pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
    /// Longest `/health` waits for Postgres before answering 503.
    pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// Period of the Prometheus exporter's upkeep (drains histogram samples when nobody scrapes).
    pub(crate) const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
}

struct HttpState {
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    outbox: Outbox,
    max_pending_age: Duration,
}

/// Serves `/metrics` (Prometheus text format) and `/health` (JSON; 200 healthy, 503 not) on
/// tokio with hyper, bounded against its clients (see `http_limits`): one request per
/// connection, a header size and read timeout, a connection limit, `/health` answered within
/// `HEALTH_TIMEOUT` (never holding up `/metrics`), an accept loop that outlives accept errors
/// (e.g. no file descriptors left), and a stop when `token` is cancelled.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    outbox: Outbox,
    max_pending_age: Duration,
    token: CancellationToken,
) -> Result<(), Failure> {
    let handle = install_recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| fail(3, format!("--metrics-addr {addr}: {e}")))?;
    tokio::spawn(run_upkeep(handle.clone(), token.clone()));
    let state = std::sync::Arc::new(HttpState {
        metrics: handle,
        outbox,
        max_pending_age,
    });
    tracing::info!(%addr, "serving /metrics and /health");
    tokio::spawn(accept_loop(listener, state, token));
    Ok(())
}

/// Installs the Prometheus recorder, with the latency histogram's buckets.
fn install_recorder() -> Result<metrics_exporter_prometheus::PrometheusHandle, Failure> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("outbox_commit_to_ack_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .map_err(|e| fail(1, format!("metrics buckets: {e}")))?
        .install_recorder()
        .map_err(|e| fail(1, format!("metrics recorder: {e}")))
}

/// The exporter's upkeep every `UPKEEP_INTERVAL` until `token` is cancelled: without a scraper,
/// histogram samples would pile up until the next render.
async fn run_upkeep(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    token: CancellationToken,
) {
    let mut tick = tokio::time::interval(http_limits::UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// Accepts connections until `token` is cancelled, at most `MAX_CONNECTIONS` served at once;
/// an accept error is logged and retried after 100 ms.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<HttpState>,
    token: CancellationToken,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(http_limits::MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = token.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics port: accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        // Over the limit: answer 503 at once without reading anything (a non-blocking
        // write of a few bytes), so that idle clients cannot queue the scraper behind them.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("outbox_http_rejected_connections_total").increment(1);
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 21\r\n\r\ntoo many connections\n",
            );
            continue;
        };
        connections.spawn(serve_connection(stream, state.clone(), slot));
    }
    // Stop: no new connections; the ones in progress are dropped with the set.
    connections.shutdown().await;
}

/// One HTTP/1.1 request on `stream`, within the header and connection limits; `slot` is given
/// back when it ends.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: std::sync::Arc<HttpState>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let _slot = slot;
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(respond(&state, &req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(http_limits::HEADER_TIMEOUT)
        .max_buf_size(http_limits::MAX_HEAD_BYTES)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = tokio::time::timeout(http_limits::CONNECTION_TIMEOUT, connection).await;
}

type Body = http_body_util::Full<bytes::Bytes>;

fn response(code: u16, content_type: &str, body: String) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Body::new(bytes::Bytes::from(body)))
        .expect("static status and header")
}

async fn respond<B>(state: &HttpState, req: &hyper::Request<B>) -> hyper::Response<Body> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return response(405, "text/plain", "only GET and HEAD\n".into());
    }
    match req.uri().path() {
        "/metrics" => response(200, "text/plain; version=0.0.4", state.metrics.render()),
        "/health" => {
            let (code, body) = match tokio::time::timeout(
                http_limits::HEALTH_TIMEOUT,
                state.outbox.health(),
            )
            .await
            {
                Ok(Ok(h)) => {
                    let reasons = h.reasons(state.max_pending_age);
                    let healthy = reasons.is_empty();
                    let body = serde_json::json!({
                        "healthy": healthy,
                        "reasons": reasons,
                        "running": h.running,
                        "listener_connected": h.listener_connected,
                        "listener_problem": h.listener_problem,
                        "waker_problem": h.waker_problem,
                        "last_delivery": h.last_delivery,
                        "backlog": h.backlog,
                        "oldest_pending_age_s": h.oldest_pending_age.map(|d| d.as_secs_f64()),
                        "dead_letters": h.dead_letters,
                        "legacy_reservations": h.legacy_reservations,
                        "oldest_transaction": h.oldest_transaction.as_ref().map(oldest_json),
                        "held_back_by": h.held_back_by,
                        "kafka_problem": h.kafka_problem,
                        "kafka_problem_since": h.kafka_problem_since,
                        "producer_rebuilds": h.producer_rebuilds,
                        "postgres_problem": h.postgres_problem,
                        "postgres_problem_since": h.postgres_problem_since,
                        "sessions_pooled_by_transaction": h.sessions_pooled_by_transaction,
                    });
                    (if healthy { 200 } else { 503 }, body)
                }
                Ok(Err(e)) => (
                    503,
                    serde_json::json!({"healthy": false, "error": e.to_string(), "reasons": [e.to_string()]}),
                ),
                Err(_) => {
                    let error = format!(
                        "the health check did not finish within {:?}: Postgres is slow or does not answer (a connect that hangs), or a lock blocks the outbox table",
                        http_limits::HEALTH_TIMEOUT
                    );
                    (
                        503,
                        serde_json::json!({"healthy": false, "reasons": [&error], "error": error}),
                    )
                }
            };
            response(code, "application/json", text::json_line(&body))
        }
        _ => response(
            404,
            "text/plain",
            "not found: try /metrics or /health\n".into(),
        ),
    }
}

fn print_status(table: &str, s: &outbox::OutboxStatus, json: bool) {
    let age = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    if json {
        let topics: Vec<_> = s
            .topics
            .iter()
            .map(|t| {
                serde_json::json!({
                    "topic": t.topic, "pending": t.pending, "retrying": t.retrying,
                    "dead_letters": t.dead_letters, "oldest_pending_age_s": age(t.oldest_pending_age),
                })
            })
            .collect();
        println!(
            "{}",
            text::json_line(&serde_json::json!({
                "table": table, "pending": s.pending, "retrying": s.retrying,
                "dead_letters": s.dead_letters, "oldest_pending_age_s": age(s.oldest_pending_age),
                "open_batches": s.open_batches, "legacy_reservations": s.legacy_reservations,
                "schema_problems": s.schema_problems,
                "oldest_transaction": s.oldest_transaction.as_ref().map(oldest_json),
                "topics": topics,
            }))
        );
        return;
    }
    println!(
        "{:<40} {:>10} {:>10} {:>12} {:>18}",
        "TOPIC", "PENDING", "RETRYING", "DEAD", "OLDEST PENDING"
    );
    let fmt_age =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
    for t in &s.topics {
        println!(
            "{:<40} {:>10} {:>10} {:>12} {:>18}",
            text::printable(&t.topic),
            t.pending,
            t.retrying,
            t.dead_letters,
            fmt_age(t.oldest_pending_age)
        );
    }
    println!(
        "{:<40} {:>10} {:>10} {:>12} {:>18}",
        "TOTAL",
        s.pending,
        s.retrying,
        s.dead_letters,
        fmt_age(s.oldest_pending_age)
    );
    println!("open relay batches: {}", s.open_batches);
    for p in &s.schema_problems {
        println!("SCHEMA PROBLEM: {}", text::printable(p));
    }
    if let Some(t) = &s.oldest_transaction {
        let state_and_age = match t.age {
            Some(age) => format!("{}, {:.1}s", text::printable(&t.state), age.as_secs_f64()),
            None => "state and age hidden (another role's session: they need pg_read_all_stats)"
                .to_string(),
        };
        println!(
            "oldest transaction (holds back cleanup): pid {} ({}), {state_and_age}",
            t.pid,
            if t.application_name.is_empty() {
                "-".to_string()
            } else {
                text::printable(&t.application_name).to_string()
            },
        );
    }
    if s.legacy_reservations > 0 {
        println!(
            "WARNING: {} rows reserved by another relay within its lease (reserved_to in the future): \
             the original Go relay is probably still running against this table; stop it \
             (see README, \"Switching from the Go package\")",
            s.legacy_reservations
        );
    }
}

fn oldest_json(t: &outbox::OldestTransaction) -> serde_json::Value {
    serde_json::json!({
        "pid": t.pid, "application_name": t.application_name, "state": t.state,
        "age_s": t.age.map(|a| a.as_secs_f64()),
    })
}

fn event_json(e: &Event) -> serde_json::Value {
    serde_json::json!({
        "id": e.id(),
        "seq": e.seq(),
        "aggregate_id": e.aggregate_id(),
        "topic": e.topic(),
        "event_type": e.event_type(),
        "payload": e.payload(),
        "headers": e.headers(),
        "headers_not_published": e.unpublished_headers(),
        "status": e.status().as_str(),
        "created_at": e.created_at(),
        "created_at_tz": e.created_at_tz(),
        "attempts": e.attempts(),
        "last_error": e.last_error(),
        "next_attempt_at": e.next_attempt_at(),
        "published_at": e.published_at(),
        "partition": e.partition(),
        "offset": e.offset(),
        "decode_problems": e.decode_problems(),
    })
}
