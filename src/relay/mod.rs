//! The relay, as a pipeline of stages:
//!
//! ```text
//! wake ──▶ reserve ──▶ publish ──▶ confirm ──▶ report
//! (Stream)  (batch tx)  (chains per   (one statement  (acks, counters,
//!                        aggregate)    + commit)       metrics, logs)
//! ```
//!
//! - [`wake`]: a `Stream` of wake-ups — notifications ([`listen`]) ⊕ fallback ticker ⊕ due
//!   retries/holds ⊕ "the last batch was full".
//! - [`reserve`]: batch connections and the reservation transaction (row locks = the lease).
//! - [`batch`]: one batch after its reservation: [`fence`] → [`publish`] → [`confirm`] → [`report`].
//! - [`retry`]: the retry policy (permanent errors, backoff, dead letters).
//! - [`maintenance`]: retention cleanup, backlog gauges, fence expiry — supervised tasks beside
//!   the pipeline.
//! - [`shared`]: the sessions shared by tasks of one kind (the fences, the late reports).
//! - [`timing`]: every duration derived once from the settings, and the stop window.
//!
//! This module drives the pipeline: it takes wake-ups while fewer than `max_batches_in_flight`
//! batches are in flight, reserves, runs each batch on a task, and on stop drains it in order
//! (stop reserving → finish batches → flush the producer → record late reports → end streams).

mod batch;
mod cap;
mod confirm;
mod fence;
mod listen;
mod maintenance;
mod producer;
mod publish;
mod report;
mod reserve;
pub(crate) use reserve::LIGHT_BEGIN;
mod retry;
mod scan;
mod shared;
mod split;
mod supervise;
pub(crate) mod timing;
mod unprintable;

pub(crate) use self::unprintable::UNPRINTABLE;
mod wake;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::producer::{Producer, PurgeConfig};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::{Settings, WakeMode};
use crate::delivery::Hub;
use crate::pg::Pg;
use crate::store::RelaySql;

use self::batch::{run_batch, BatchDone};
use self::cap::CandidatesCap;
use self::confirm::LateConn;
use self::fence::Fences;
use self::report::Reporter;
use self::reserve::{Ask, BatchConn, Reservation, Reserved, Reserver};
use self::scan::ScanStart;
use self::shared::Shared;
use self::split::Split;
use self::timing::{Stop, Timing, LATE_GRACE, PURGE_FLUSH, STOP_OVERRUN};
use self::wake::{DueSender, HandoffSender, Wake, Wakeups};

#[cfg(feature = "testing")]
pub(crate) use self::confirm::CONFIRM_SETUP;
pub(crate) use self::producer::Producers;
pub(crate) use self::report::Counters;
#[cfg(feature = "testing")]
pub(crate) use self::reserve::returned as reserved_rows;
pub(crate) use self::reserve::Scan;
#[cfg(feature = "testing")]
pub(crate) use self::reserve::BATCH_SESSION_SETUP;
#[cfg(feature = "testing")]
pub(crate) use self::reserve::RESERVE_PARAM_TYPES;
#[cfg(feature = "testing")]
pub(crate) use self::scan::FULL_SCAN_EVERY;

/// Everything the relay's stages share.
pub(crate) struct Ctx {
    settings: Arc<Settings>,
    timing: Timing,
    sql: Arc<RelaySql>,
    pg: Pg,
    producers: Arc<Producers>,
    /// Rebuilds of the producer since the last delivery, and the error that stops the relay
    /// when they keep failing.
    fatal: FatalProducer,
    report: Reporter,
    stop: Arc<Stop>,
    /// Permits for messages in flight, over all batches (`max_in_flight`).
    in_flight: Arc<Semaphore>,
    /// Late confirms and fence removals that outlive their batch.
    late: TaskTracker,
    /// The session the late reports are written on, shared by every held batch.
    late_conn: Shared<LateConn>,
    fences: Fences,
    /// Events to send alone on their next attempt (a late refusal of their record batch).
    alone_next: publish::AloneNext,
    /// Wake-ups for rows that turn due or free through a task beside the pipeline.
    due: DueSender,
    /// The first panic of a task beside the pipeline, which the pipeline raises again.
    panics: Arc<supervise::Panics>,
}

impl Ctx {
    /// Spawns `task`, which outlives its batch (a late report's, a fence's removal), on
    /// [`Ctx::late`], supervised (`name` in a panic's message; see [`supervise`]).
    fn spawn_late<F>(&self, name: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.late
            .spawn(supervise::supervised(&self.panics, name, task));
    }
}

/// A relay ready to run (see [`Outbox::run`](crate::Outbox::run)).
pub(crate) struct Relay {
    pub(crate) settings: Arc<Settings>,
    pub(crate) sql: Arc<RelaySql>,
    pub(crate) pg: Pg,
    pub(crate) producers: Arc<Producers>,
    pub(crate) hub: Hub,
    pub(crate) stop: Arc<Stop>,
    pub(crate) counters: Arc<Counters>,
}

/// The pipeline's state while it runs.
struct Pipeline {
    ctx: Arc<Ctx>,
    wakeups: Wakeups,
    /// `true` while the relay is idle and wants writers to NOTIFY (see [`listen`]).
    armed: watch::Sender<bool>,
    /// The batches in flight, each with its group when the backlog is split (see [`split`]),
    /// and that split's epoch.
    batches: JoinSet<(Option<(usize, u64)>, BatchDone)>,
    reserver: Reserver,
    /// Pauses after failed reservations; a fresh backoff after any reservation that succeeds.
    reserve_errors: Backoff,
    /// After a reservation that missed its deadline, the candidates' limit (see [`cap`]).
    candidates_cap: CandidatesCap,
    /// The last reservation took all it was allowed (rows or bytes): more is likely pending.
    last_full: bool,
    /// A reservation found nothing while a full batch was in flight: the backlog's next events
    /// belong to aggregates in flight (the per-aggregate gate and the fences keep a second batch
    /// off them, e.g. a backlog of a few hot aggregates). Until the next reservation no free slot
    /// is filled while a batch is in flight (each such attempt is a wasted scan), and the next
    /// reservation takes the share of every slot (see [`Pipeline::reserve`]).
    gated: bool,
    /// The last reservation caught up with at most [`reserve::LIGHT_ROWS`] rows, or found none
    /// (and the backlog is neither gated nor split): the relay keeps up, so the next
    /// reservation is a light one (a generic plan: see [`reserve::LIGHT_BEGIN`]).
    light: bool,
    /// A batch failed (not fenced, not confirmed, or its task failed) and none confirmed
    /// since: no light reservation meanwhile — an empty reservation then only means that the
    /// failed batch's fence holds its aggregates, not that the relay keeps up, and the retry
    /// should take the whole backlog again.
    failing: bool,
    /// Where the next reservation's scan starts (see [`ScanStart::next`]).
    scan: ScanStart,
    /// A gated backlog split between the batch slots (see [`split`]): each slot reserves the
    /// rows of one group of aggregates.
    split: Option<Split>,
    /// Counts the splits made and ended. A batch of an earlier split belongs to none of the
    /// current split's groups: a split made again (the other groups' batches still in flight)
    /// may have fewer groups, and its group of the same number is other aggregates.
    split_epoch: u64,
    /// The rows per aggregate bucket of the last batch started (what a split balances).
    last_weights: split::Weights,
    /// Pauses after batches that could not be fenced or confirmed; a fresh backoff only after a
    /// confirmed batch (a reservation that finds nothing, e.g. because the failed batch's fence
    /// still holds its aggregates, must not end the streak, or a confirm that keeps failing
    /// becomes a tight loop of re-sends).
    batch_errors: Backoff,
    /// Aggregates left out of the reservations (held back behind rows another transaction has
    /// locked), each until when (see [`Pipeline::leave_out`]), and the list the reservations
    /// take (the unexpired ones).
    left_out: scan::LeftOut,
    /// The aggregates of each batch in flight, as sorted [`aggregate_hash`]es: a row of such an
    /// aggregate that holds back the candidates of a scan may be this relay's own, locked by a
    /// batch whose fence has not committed yet, and such an aggregate is not left out (nor is
    /// one whose hash collides with theirs: it is gone past instead, which is safe).
    in_flight: std::collections::HashMap<tokio::task::Id, Vec<u64>>,
    /// When [`Pipeline::leave_out`] last warned (at most once in [`LEFT_OUT_WARN_EVERY`]).
    left_out_warned: Option<Instant>,
    /// Since when scans from the first pending row have found only held-back candidates and
    /// left their aggregates out, with no batch started since (see
    /// `Pipeline::reserved_nothing`).
    leaving_out_since: Option<Instant>,
    /// The first panic of a task beside the pipeline (see [`supervise`]): raised again here.
    panics: watch::Receiver<Option<String>>,
}

type Backoff = Box<dyn Iterator<Item = Duration> + Send>;

/// How long the reservations leave out the aggregates a full scan found held back behind rows
/// another transaction has locked (see `Pipeline::reserved_nothing`): once the lock is gone,
/// such an aggregate waits up to this long; while it lasts, one reservation in this long finds
/// its held-back rows again.
const LEFT_OUT_FOR: Duration = Duration::from_secs(1);

/// The longest `Pipeline::leave_out` stays quiet while aggregates keep being left out: a lock
/// held for minutes warns once a minute, with how many aggregates wait and a few of them.
const LEFT_OUT_WARN_EVERY: Duration = Duration::from_secs(60);

/// An aggregate id's hash, to remember a batch's aggregates without copying their ids.
fn aggregate_hash(aggregate_id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(aggregate_id)
}

/// The sorted hashes of a batch's aggregates (one chain per aggregate).
fn aggregate_hashes(rows: &[Reserved], chains: &[Vec<usize>]) -> Vec<u64> {
    let mut hashes: Vec<u64> = chains
        .iter()
        .map(|c| aggregate_hash(&rows[c[0]].aggregate_id))
        .collect();
    hashes.sort_unstable();
    hashes
}

fn fresh_backoff() -> Backoff {
    Box::new(retry::error_backoff())
}

impl Relay {
    /// Runs until the stop is requested, then stops gracefully.
    pub(crate) async fn run(self) -> crate::Result<()> {
        let timing = Timing::new(&self.settings);
        let (due, due_requests) = DueSender::new();
        let ctx = Arc::new(self.context(timing, due));
        report::register_metrics(&self.counters.table);
        ctx.report.running(true);
        let background = TaskTracker::new();
        let (handoffs, handed) = HandoffSender::new();
        let (notifications, armed) = self.spawn_wake_sources(&background, &ctx, handoffs);
        maintenance::spawn(&background, &ctx);
        // The prompt and pipelining producers start, connect and ask for their producer ids
        // now, off the path of the first caught-up batch and of the first run of an
        // aggregate's events.
        let pipe = ctx.settings.max_in_flight_per_aggregate > 1;
        if ctx.settings.prompt_producer || pipe {
            let producers = ctx.producers.clone();
            drop(tokio::task::spawn_blocking(move || producers.warm(pipe)));
        }
        let wakeups = Wakeups::new(notifications, timing.poll_interval)
            .with_requests(due_requests)
            .with_handoffs(handed);
        let mut pipeline = Pipeline::new(ctx.clone(), wakeups, armed);
        pipeline.run().await;
        let mut wakeups = pipeline.drain().await;
        shut_down(&ctx, background).await;
        hand_off(&ctx, &mut wakeups).await;
        // A task beside the pipeline that panicked while the relay stopped (after the handoff:
        // the other relays still learn when this one's retries turn due).
        if let Some(message) = ctx.panics.first() {
            supervise::raise(message);
        }
        self.hub.close();
        if let Some(e) = ctx.fatal.gave_up() {
            tracing::error!(error = %e, "outbox relay stopped: the Kafka producer keeps failing");
            return Err(e);
        }
        tracing::info!("outbox relay stopped");
        Ok(())
    }

    /// The state the pipeline and its tasks share.
    fn context(&self, timing: Timing, due: DueSender) -> Ctx {
        Ctx {
            due,
            timing,
            sql: self.sql.clone(),
            pg: self.pg.clone(),
            producers: self.producers.clone(),
            fatal: FatalProducer::default(),
            report: Reporter::new(
                self.counters.clone(),
                self.producers.state().clone(),
                self.hub.sender(),
            ),
            stop: self.stop.clone(),
            in_flight: Arc::new(Semaphore::new(self.settings.max_in_flight)),
            late: TaskTracker::new(),
            late_conn: Shared::new(),
            fences: Fences::new(
                self.pg.clone(),
                self.sql.clone(),
                &timing,
                self.stop.clone(),
            ),
            settings: self.settings.clone(),
            alone_next: publish::AloneNext::default(),
            panics: supervise::Panics::new(),
        }
    }

    /// Starts the listener and the waker (in [`WakeMode::Notify`]); returns their wake-ups and
    /// the switch that arms the waker.
    fn spawn_wake_sources(
        &self,
        background: &TaskTracker,
        ctx: &Ctx,
        handoffs: HandoffSender,
    ) -> (Option<mpsc::Receiver<wake::Wake>>, watch::Sender<bool>) {
        let (armed, arm_rx) = watch::channel(false);
        if self.settings.wake != WakeMode::Notify {
            return (None, armed);
        }
        let (tx, rx) = mpsc::channel(16);
        let state = ctx.report.listener_state();
        let token = ctx.stop.token();
        let listener = listen::Listener {
            pg: self.pg.clone(),
            channel: self.settings.channel.clone(),
            wake: tx.clone(),
            table: self.settings.table.clone(),
            handoffs,
            token: token.clone(),
            state,
        };
        background.spawn(supervise::supervised(
            &ctx.panics,
            "listener",
            listener.run(),
        ));
        listen::Waker {
            pg: self.pg.clone(),
            key: crate::schema::wake_lock_key(&self.settings.table),
            armed: arm_rx,
            wake: tx,
            token: token.clone(),
            state: ctx.report.waker_state(),
        }
        .spawn(background, &ctx.panics);
        (Some(rx), armed)
    }
}

impl Pipeline {
    fn new(ctx: Arc<Ctx>, wakeups: Wakeups, armed: watch::Sender<bool>) -> Pipeline {
        ctx.report.left_out(0);
        Pipeline {
            wakeups,
            armed,
            batches: JoinSet::new(),
            reserver: Reserver::default(),
            reserve_errors: fresh_backoff(),
            candidates_cap: CandidatesCap::new(ctx.settings.batch_size, &ctx.report.table_label()),
            last_full: false,
            light: false,
            failing: false,
            gated: false,
            scan: ScanStart::new(),
            split: None,
            split_epoch: 0,
            last_weights: [0; split::BUCKETS],
            batch_errors: fresh_backoff(),
            left_out: scan::LeftOut::default(),
            in_flight: Default::default(),
            left_out_warned: None,
            leaving_out_since: None,
            panics: ctx.panics.watch(),
            ctx,
        }
    }

    /// Takes wake-ups while a batch slot is free (and, when the backlog is gated, only once no
    /// batch is in flight; when it is split, only while a group has no batch), until the stop is
    /// requested.
    async fn run(&mut self) {
        let max_batches = self.ctx.settings.max_batches_in_flight;
        loop {
            let free = self.batches.len() < max_batches
                && (!self.gated || self.batches.is_empty())
                && self.split.as_ref().is_none_or(|s| s.free_group().is_some());
            tokio::select! {
                biased;
                _ = self.ctx.stop.token().cancelled() => return,
                Some(done) = self.batches.join_next_with_id() => {
                    let id = match &done {
                        Ok((id, _)) => *id,
                        Err(e) => e.id(),
                    };
                    self.in_flight.remove(&id);
                    self.batch_done(done.map(|(_, done)| done));
                }
                Ok(()) = self.panics.changed() => {
                    if let Some(message) = self.panics.borrow_and_update().clone() {
                        supervise::raise(message);
                    }
                }
                Some(wake) = self.wakeups.next(), if free => {
                    self.reserve(wake).await;
                }
            }
        }
    }

    /// Reserves a batch and starts it on a task of its own.
    ///
    /// After a gated reservation (see [`Pipeline::gated`]) the backlog is split between the
    /// slots when its aggregates fall in more than one bucket (see [`split`]): each reservation
    /// then takes one group's rows. Otherwise (one aggregate) the next reservation, made with no
    /// batch in flight, may take `batch_size` × `max_batches_in_flight` rows: the slots the gate
    /// would leave idle give their share of rows to the one batch that can run, so a backlog of
    /// one aggregate pays the fixed costs of a batch (the reservation's scan, the fence's commit,
    /// the last acknowledgement's wait, the confirm's commit) once per that many rows. Its byte
    /// budget stays one batch's `max_batch_bytes`, so that the fetch still fits the round trip's
    /// deadline as documented, and the relay's memory stays within `max_batch_bytes` ×
    /// `max_batches_in_flight` although such a batch re-checks the gate: while it is in flight
    /// the free slots try again with normal batches.
    async fn reserve(&mut self, wake: Wake) {
        let ctx = self.ctx.clone();
        let group = self.split.as_ref().and_then(Split::free_group);
        let start = match (self.split.as_mut(), group) {
            (Some(split), Some(g)) => split.scan(g).next(wake),
            (Some(_), None) => return,
            (None, _) => {
                let start = self.scan.next(wake);
                if start.from == i64::MIN {
                    self.wakeups.full_scan_done();
                }
                start
            }
        };
        let started = Instant::now();
        let share = if self.gated && self.split.is_none() {
            ctx.settings.max_batches_in_flight
        } else {
            1
        };
        self.gated = false;
        let light = std::mem::take(&mut self.light)
            && share == 1
            && group.is_none()
            && self.candidates_cap.cap.is_none();
        let limit = if light {
            ctx.sql.light_limit
        } else {
            let limit = ctx.settings.batch_size.saturating_mul(share);
            (self.candidates_cap.cap).map_or(limit, |cap| cap.clamp(1, limit))
        };
        let ask = Ask {
            limit,
            max_bytes: ctx.settings.max_batch_bytes,
            from: start.from,
            skip_blocked: start.skip_blocked,
            windowed: start.windowed,
            group: (self.split.as_ref()).zip(group).map(|(s, g)| s.filter(g)),
            light,
            left_out: self.left_out_now(),
        };
        // A stop cancels a reservation in progress (its connection is dropped, which ends the
        // transaction); every round trip of it has a deadline.
        let reserved = tokio::select! {
            _ = ctx.stop.token().cancelled() => return,
            r = self.reserver.reserve(&ctx.pg, &ctx.sql, &ctx.timing, &ctx.stop, ask) => r,
        };
        if self.reserver.take_opened() {
            remove_recent_fences(&ctx);
        }
        self.note_reservation(&reserved, start, started, limit, group);
        match (reserved, group) {
            // (A scan that skipped blocked aggregates and found nothing is final, unless its
            // window ended before the pending rows did.)
            (Ok(Reservation::Nothing(scan)), None) => self.reserved_nothing(start, scan),
            (Ok(Reservation::Nothing(scan)), Some(g)) => self.group_empty(g, scan),
            (Ok(Reservation::Batch(conn, rows, scan)), _) => {
                self.start_batch(conn, rows, scan, limit, group)
            }
            (Ok(Reservation::Unprintable(conn, row)), _) => {
                self.start_batch(conn, vec![row], Scan::default(), limit, group)
            }
            (Err(e), _) => {
                self.end_split();
                let delay = pause(&mut self.wakeups, &mut self.reserve_errors);
                ctx.report.reserve_failed(&e, delay);
            }
        }
    }

    /// What a reservation of `limit` candidates from `start`, begun at `started`, tells the
    /// scan state (of the split's `group`, or the backlog's) and the candidates' cap. A row
    /// found unprintable tells the scan state nothing: its search is not a scan.
    fn note_reservation(
        &mut self,
        reserved: &crate::Result<Reservation>,
        start: scan::Start,
        started: Instant,
        limit: usize,
        group: Option<usize>,
    ) {
        let scan = match (self.split.as_mut(), group) {
            (Some(split), Some(g)) => split.scan(g),
            _ => &mut self.scan,
        };
        match reserved {
            Ok(Reservation::Unprintable(..)) => {}
            Ok(Reservation::Nothing(found) | Reservation::Batch(_, _, found)) => {
                scan.scanned(start, started, Some(found))
            }
            Err(_) => scan.scanned(start, started, None),
        }
        let (settings, timing) = (&self.ctx.settings, &self.ctx.timing);
        let changed = self.candidates_cap.after(
            reserved,
            limit,
            settings.batch_size,
            (started.elapsed(), timing.round_trip),
            Instant::now(),
        );
        if changed {
            (self.candidates_cap).set_gauge(settings.batch_size, &self.ctx.report.table_label());
        }
    }

    /// Leaves `held` (aggregates a full scan found held back behind rows that are no
    /// candidates) out of the reservations for [`LEFT_OUT_FOR`] each, but for the aggregates of
    /// this relay's batches in flight (their rows may be held behind that batch's, whose fence
    /// has not committed yet: left out, a hot aggregate's next events waited up to a second,
    /// found by a breaker helper). Each keeps its own deadline: extending all of them with each
    /// new one kept an aggregate whose lock was gone out as long as new ones came (found by a
    /// breaker helper). A lock released meanwhile is noticed when its aggregate's time ends; one
    /// held on is found again by the next full scan after it (one reservation of held-back
    /// candidates). `held_locked`: those of `held` whose blocking row a transaction in progress
    /// has locked that is not a relay's batch session. The others are left out too, but neither
    /// counted nor warned of (another relay's batch between its reservation and its fence, or a
    /// row another relay confirmed after this scan's snapshot): several relays on one table
    /// warned of a lock that did not exist (found by a breaker helper). Reports how many a scan
    /// found held back lately ([`scan::held_shown_for`]) and who holds their locks
    /// (`Scan::held_by`), and warns at most once in [`LEFT_OUT_WARN_EVERY`]. `false` when none
    /// is left out.
    fn leave_out(&mut self, scan: Scan) -> bool {
        let Scan {
            held,
            held_locked,
            held_by,
            ..
        } = scan;
        let in_flight = &self.in_flight;
        let ours = |a: &String| {
            let hash = aggregate_hash(a);
            in_flight.values().any(|v| v.binary_search(&hash).is_ok())
        };
        // Behind another relay's batch, or a row confirmed since the snapshot: left out too, but
        // not reported as a lock.
        let held_locked: std::collections::HashSet<&str> =
            held_locked.iter().map(String::as_str).collect();
        let locked = |a: &String| held_locked.contains(a.as_str());
        // A few of them for the warning, printable and cut (an id is the caller's text).
        let some: Vec<String> = (held.iter().filter(|a| !ours(a) && locked(a)).take(5))
            .map(|a| crate::text::printable(a).chars().take(100).collect())
            .collect();
        let now = Instant::now();
        let before = self.left_out.held();
        let added = self
            .left_out
            .add(held, ours, locked, now, now + LEFT_OUT_FOR);
        // The session's application name is its own text: printable, and cut.
        let held_by = held_by.filter(|_| !some.is_empty()).map(|who| {
            crate::text::printable(&who)
                .chars()
                .take(400)
                .collect::<String>()
        });
        if held_by.is_some() {
            self.ctx.report.held_back_by(held_by.clone());
        }
        self.report_left_out(before);
        if added == 0 {
            return false;
        }
        if some.is_empty() {
            tracing::debug!(
                added,
                "outbox relay: aggregates held back behind another relay's batch are left out of the reservations for a second"
            );
        } else if (self.left_out_warned)
            .is_none_or(|at| now.duration_since(at) >= LEFT_OUT_WARN_EVERY)
        {
            self.left_out_warned = Some(now);
            tracing::warn!(
                aggregates = self.left_out.held(),
                first = %some.join(", "),
                held_by = held_by.as_deref().unwrap_or("unknown"),
                "outbox relay: events are held back behind rows another transaction has locked (held_by names its session: commit, roll back or end it; health's held_back_by shows it too); their aggregates are left out of the reservations a second at a time while every other aggregate goes on (at most one warning a minute; outbox_left_out_aggregates counts them)"
            );
        } else {
            tracing::debug!(
                added,
                "outbox relay: aggregates whose events a full scan found held back behind rows another session has locked are left out of the reservations for a second"
            );
        }
        true
    }

    /// The aggregates left out now (see [`Pipeline::leave_out`]); the count of those found held
    /// back lately reported when it changed.
    fn left_out_now(&mut self) -> std::sync::Arc<[String]> {
        let before = self.left_out.held();
        let shown_for = scan::held_shown_for(self.scan.every());
        let list = self.left_out.now(Instant::now(), shown_for);
        self.report_left_out(before);
        list
    }

    /// Reports the count of aggregates found held back lately (see [`Pipeline::leave_out`])
    /// if it changed from `before`.
    fn report_left_out(&self, before: usize) {
        let now = self.left_out.held();
        if now != before {
            self.ctx.report.left_out(now);
        }
    }

    /// A reservation found nothing; `final_scan`: it skipped blocked aggregates (from the first
    /// pending row, or from the floor until the next full scan).
    fn reserved_nothing(&mut self, start: scan::Start, scan: Scan) {
        let final_scan = start.skip_blocked;
        self.reserve_errors = fresh_backoff();
        if scan.windowed {
            // Its window ended before the pending rows did: go on after it.
            self.scan.left_off(&scan);
            self.wakeups.again();
            return;
        }
        // Nothing although the batch in flight was full: the gate holds the backlog.
        let gated = self.last_full && !self.batches.is_empty();
        if let (Some(past), true, false) = (scan.past, final_scan, gated) {
            // Every candidate it found (as many as it could take) is held back behind a row
            // that no full batch of this relay holds: one another transaction has locked (an
            // operator's `select … for update`, an uncommitted `update`) or another relay's
            // batch. Such rows pile up at the lowest `seq`s while the other aggregates drain,
            // and once they filled a scan every scan found only them: a breaker helper saw
            // delivery stop after 61 of 300 events for the 90 s of one row's lock. A full scan
            // names their aggregates: the next scans leave them out for LEFT_OUT_FOR (going on
            // past them instead walked a pile of 50,000 again after every batch: a breaker
            // helper saw 290 of 5,000 other events in 90 s, Postgres busy), and the next scan
            // starts at the first pending row again, past more of them each time. Once that has
            // gone on for half of LEFT_OUT_FOR, the first ones left out come back before the
            // pile is covered (more held-back aggregates than the scans name in a second: a
            // breaker helper saw free events wait up to 56 s behind 20,000 locked aggregates),
            // so the scans go on past them as well. Other scans go on past them, as after a
            // window; the scan that reaches the end decides there is nothing.
            let now = Instant::now();
            let again_from_the_start = start.from == i64::MIN
                && self.leave_out(scan)
                && now.duration_since(*self.leaving_out_since.get_or_insert(now))
                    < LEFT_OUT_FOR / 2;
            if !again_from_the_start {
                self.scan.go_past(past);
            }
            self.wakeups.again();
            return;
        }
        // Twice the fence's lifetime: a failed batch's aggregates are retried after it.
        self.ctx
            .report
            .reservation_empty(self.ctx.timing.fence.saturating_mul(2));
        if !final_scan && !gated {
            // Nothing from where the last scan left off: scan from the first pending
            // row before deciding that there is nothing. (When gated, the next
            // reservation, after the batch in flight, scans from the first row anyway.)
            self.wakeups.again();
            return;
        }
        if gated {
            self.split_gated();
        }
        self.gated = gated;
        self.last_full = false;
        self.light = !gated && self.split.is_none() && !self.failing;
        // A scan from the floor found nothing: a row below it that turns pending without a
        // wake-up of its own must not wait for the fallback poll.
        if let Some(at) = self.scan.full_scan_owed() {
            self.wakeups.full_scan_at(at);
        }
        // Nothing to reserve: ask writers to NOTIFY, even while other batches are still
        // in flight, so that a new event is reserved in the free slot at once rather
        // than after those batches — unless the backlog is gated: then nothing is
        // reserved before the batch in flight is done (a new event of another aggregate
        // waits that long, at most `batch_timeout` and its confirm).
        self.armed.send_replace(true);
    }

    /// The backlog is gated: split it between the slots by the buckets of the last batch
    /// started (the one in flight; see [`split`]), if they are more than one.
    fn split_gated(&mut self) {
        self.split = Split::of(&self.last_weights, self.ctx.settings.max_batches_in_flight);
        self.split_epoch += 1;
        if let Some(split) = &self.split {
            tracing::debug!(
                groups = split.groups(),
                "outbox relay: a gated backlog split between the batch slots"
            );
        }
    }

    /// A split backlog's reservation of `group` found nothing: the split ends (see [`split`]).
    fn group_empty(&mut self, group: usize, scan: Scan) {
        self.reserve_errors = fresh_backoff();
        if scan.windowed {
            if let Some(split) = self.split.as_mut() {
                split.scan(group).left_off(&scan);
            }
            self.wakeups.again();
            return;
        }
        self.end_split();
        if self.last_full && !self.batches.is_empty() {
            // The other groups' batches are full: split what they hold once they are done.
            self.split_gated();
            self.gated = true;
            self.last_full = false;
        } else {
            self.wakeups.again();
        }
    }

    /// Ends a split: the next reservation scans every row, from the first pending one.
    fn end_split(&mut self) {
        if self.split.take().is_some() {
            self.split_epoch += 1;
            self.scan.reset();
            tracing::debug!("outbox relay: the backlog's split between the batch slots ended");
        }
    }

    /// Starts the batch a reservation of at most `limit` rows (of `group` of a split backlog)
    /// returned, on a task of its own.
    fn start_batch(
        &mut self,
        conn: BatchConn,
        rows: Vec<Reserved>,
        scan: Scan,
        limit: usize,
        group: Option<usize>,
    ) {
        self.reserve_errors = fresh_backoff();
        self.armed.send_replace(false);
        self.last_full = scan.cut_by_bytes || rows.len() >= limit;
        self.last_weights = split::weights(&rows);
        let chains = publish::chains(&rows);
        let aggregates = aggregate_hashes(&rows, &chains);
        self.leaving_out_since = None;
        let before = self.left_out.held();
        if before > 0 {
            for chain in &chains {
                self.left_out.publishing(&rows[chain[0]].aggregate_id);
            }
            self.report_left_out(before);
        }
        let more_groups = match (self.split.as_mut(), group) {
            (Some(split), Some(g)) => {
                split.scan(g).left_off(&scan);
                split.set_busy(g, true);
                split.free_group().is_some()
            }
            _ => {
                self.scan.left_off(&scan);
                false
            }
        };
        // More pending rows follow: this batch was full, or its scan stopped at its window
        // (not full then: a later empty scan is no sign of a gated backlog), or another group
        // of a split backlog has no batch.
        if self.last_full || scan.windowed || more_groups {
            self.wakeups.again();
        }
        let span = tracing::debug_span!(
            "outbox_batch",
            events = rows.len(),
            first_seq = rows[0].seq,
            last_seq = rows[rows.len() - 1].seq
        );
        // A split group's batch that caught up says nothing of the other groups' backlog: it
        // does not kick the producers (see `publish::publish`).
        let caught_up = scan.caught_up() && group.is_none();
        self.light =
            caught_up && self.split.is_none() && rows.len() <= reserve::LIGHT_ROWS && !self.failing;
        let batch = run_batch(
            self.ctx.clone(),
            conn,
            rows,
            chains,
            scan.cut_by_bytes,
            caught_up,
            Instant::now(),
        );
        let group = group.map(|g| (g, self.split_epoch));
        let batch = async move { (group, batch.await) };
        let handle = self
            .batches
            .spawn(tracing::Instrument::instrument(batch, span));
        self.in_flight.insert(handle.id(), aggregates);
    }

    /// Takes a finished batch's connection back and schedules its due retries.
    fn batch_done(
        &mut self,
        done: Result<(Option<(usize, u64)>, BatchDone), tokio::task::JoinError>,
    ) {
        match done {
            Ok((
                group,
                BatchDone {
                    conn: Some(conn),
                    due_in,
                    released_from,
                },
            )) => {
                let now = Instant::now();
                for d in due_in {
                    self.wakeups.due_at(now + d);
                }
                self.scan.released(released_from);
                // A batch of an earlier split is in none of this split's groups (it may have
                // fewer): the rows it released may lie below any group's scan.
                match (self.split.as_mut(), group) {
                    (Some(split), Some((g, epoch))) if epoch == self.split_epoch => {
                        split.set_busy(g, false);
                        split.scan(g).released(released_from);
                    }
                    (Some(split), _) => split.released(released_from),
                    (None, _) => {}
                }
                self.reserver.put_back(conn);
                // Only a confirmed batch ends an error streak: a batch that publishes but
                // cannot be confirmed must not re-send in a tight loop.
                self.batch_errors = fresh_backoff();
                self.failing = false;
            }
            Ok((_, BatchDone { conn: None, .. })) => {
                self.batch_failed();
                pause(&mut self.wakeups, &mut self.batch_errors);
            }
            // A batch that panicked is a bug in the relay, as a panic of the pipeline is: the
            // relay stops with it (see `Outbox::run`), rather than running on with its health
            // green while the batch's rows, released with its connection, make the next batch
            // panic again once their fence expires — and hold every other row of that batch.
            Err(e) if e.is_panic() => {
                self.ctx.report.batch_panicked(&e);
                std::panic::resume_unwind(e.into_panic());
            }
            Err(e) => {
                self.batch_failed();
                self.ctx.report.batch_panicked(&e);
            }
        }
        self.wakeups.again();
    }

    /// A batch ended without confirming (rolled back, or its task was cancelled): its rows are
    /// pending again, below where the scan would start, and no reservation is light until a
    /// batch confirms (see [`Pipeline::failing`]).
    fn batch_failed(&mut self) {
        self.failing = true;
        self.light = false;
        self.end_split();
        self.scan.reset();
    }
    /// Stops reserving and lets every batch finish: batches stop sending, wait for their
    /// in-flight reports (bounded by `batch_timeout`, or half of the stop window), confirm and
    /// commit (releasing unsent rows). Returns the wake stage, which holds the due times
    /// (the batches' among them) for [`hand_off`].
    async fn drain(self) -> Wakeups {
        self.armed.send_replace(false);
        let mut batches = self.batches;
        let mut wakeups = self.wakeups;
        tracing::info!(in_flight_batches = batches.len(), "outbox relay stopping");
        let mut panicked = None;
        while let Some(done) = batches.join_next().await {
            match done {
                Ok((_, done)) => {
                    let now = Instant::now();
                    for d in done.due_in {
                        wakeups.due_at(now + d);
                    }
                }
                Err(e) => {
                    self.ctx.report.batch_panicked(&e);
                    if e.is_panic() && panicked.is_none() {
                        panicked = Some(e.into_panic());
                    }
                }
            }
        }
        // The other batches finished; a panic stops the relay as it does while running.
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
        wakeups
    }
}

/// Pauses reservations for the next delay of `errors`; returns its length.
fn pause(wakeups: &mut Wakeups, errors: &mut Backoff) -> Duration {
    let delay = errors.next().unwrap_or(retry::MAX_ERROR_PAUSE);
    wakeups.pause(delay);
    delay
}

/// After the batches: flushes what the producers still hold while the held messages' late
/// reports come in, then purges, so that nothing is sent after the relay returned (a message
/// purged before it was sent is released at once; one purged in flight stays held, it may have
/// reached Kafka). Then ends the wake sources and the maintenance tasks.
async fn shut_down(ctx: &Ctx, background: TaskTracker) {
    let deadline = ctx.stop.window().map_or_else(Instant::now, |w| w.deadline);
    ctx.late.close();
    let left = deadline.saturating_duration_since(Instant::now());
    let producers = ctx.producers.all().await;
    let unacknowledged: i32 = producers.iter().map(|p| p.in_flight_count()).sum();
    if unacknowledged > 0 {
        // With Kafka down this wait is the whole `shutdown_timeout`: say what it waits for.
        tracing::info!(
            messages = unacknowledged,
            wait_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            "outbox relay: stopping: waiting for Kafka to acknowledge the messages sent (at most the rest of shutdown_timeout); those still unacknowledged then are purged and their events published again later"
        );
    }
    let flushed = flush_all(producers, left);
    let _ = tokio::time::timeout_at(deadline, ctx.late.wait()).await;
    flushed.await;
    purge_producers(&ctx.producers).await;
    let _ = tokio::time::timeout(LATE_GRACE, ctx.late.wait()).await;
    background.close();
    background.wait().await;
    ctx.report.running(false);
}

/// Gives what the producers hold up to `within` to be acknowledged (each flushed on a blocking
/// thread, side by side), then purges the rest (see [`purge_producers`]). A relay that panicked
/// stops this way: its late reports are not awaited, but a message already on the wire to a
/// working broker is more likely acknowledged than purged and written anyway.
pub(crate) async fn flush_then_purge(producers: &Producers, within: Duration) {
    flush_all(producers.all().await, within).await;
    purge_producers(producers).await;
}

/// Flushes each of `producers` for up to `within`, side by side on blocking threads, started
/// at once (a stop waits for its late reports meanwhile); the future completes when every
/// flush has returned.
fn flush_all(
    producers: Vec<producer::RelayProducer>,
    within: Duration,
) -> impl std::future::Future<Output = ()> {
    let flushes: Vec<_> = (producers.into_iter())
        .map(|producer| tokio::task::spawn_blocking(move || producer.flush(within)))
        .collect();
    async move {
        for flush in flushes {
            let _ = flush.await;
        }
    }
}

/// Purges what every producer still holds, queued or in flight, and waits up to
/// [`PURGE_FLUSH`] for the purged reports: a message held in a producer would otherwise be
/// retried by librdkafka after the relay returned, while its row is pending (a duplicate later,
/// after another relay published the row again).
pub(crate) async fn purge_producers(producers: &Producers) {
    producers.purging_all();
    for producer in producers.all().await {
        if producer.in_flight_count() > 0 {
            producer.purge(PurgeConfig::default().queue().inflight());
            let _ = tokio::task::spawn_blocking(move || producer.flush(PURGE_FLUSH)).await;
        }
    }
}

/// Last, a stopping relay NOTIFYs the other relays on the table, with the due times of the rows it
/// last wrote (see [`wake::handoff_payload`]): the rows it released or freed are taken at once,
/// its retries and holds when due, not at their fallback poll (found by a breaker helper: with
/// two relays and a 300 s `poll_interval`, a message purged in flight at stop, retried 0.6 s
/// later, was still pending after 30 s). Best effort, within the stop's overrun (see
/// [`Outbox::stop`](crate::Outbox::stop)) and `postgres_timeout`; a relay that crashes hands
/// nothing over (its rows wait for the fences' expiry and the others' poll).
async fn hand_off(ctx: &Ctx, wakeups: &mut Wakeups) {
    let due = wakeups.still_due();
    let deadline = ctx.stop.window().map_or_else(Instant::now, |w| w.deadline) + STOP_OVERRUN;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(HANDOFF_MARGIN)
        .min(ctx.pg.timeout);
    if left.is_zero() {
        tracing::debug!("outbox relay: no time left in the stop window to notify the other relays");
        return;
    }
    let payload = wake::handoff_payload(&ctx.settings.table, &due);
    let notified = crate::pg::bounded("stop handoff", left, async {
        let client = ctx
            .pg
            .connect("stop")
            .await
            .map_err(crate::Error::Postgres)?;
        client
            .execute(
                "select pg_notify($1, $2)",
                &[&ctx.settings.channel, &payload],
            )
            .await
            .map_err(crate::Error::Postgres)
    })
    .await;
    match notified {
        Ok(_) => tracing::debug!(due = due.len(), "outbox relay: notified the other relays"),
        Err(e) => {
            tracing::warn!(error = %e, "outbox relay: could not notify the other relays at stop; they find its last rows at their next poll")
        }
    }
}

/// What the handoff leaves of the stop's overrun: `Outbox::stop` must not give up first.
const HANDOFF_MARGIN: Duration = Duration::from_millis(100);

/// How many times in a row the producer may be rebuilt after a fatal error without a delivery in
/// between before the relay gives up and stops with an error.
pub(crate) const MAX_FATAL_REBUILDS: u32 = 5;

/// The relay's handling of a fatal producer: rebuild it, and give up when rebuilding keeps
/// failing.
#[derive(Default)]
pub(crate) struct FatalProducer {
    /// Rebuilds since the last delivery.
    streak: std::sync::atomic::AtomicU32,
    /// When the last rebuild was made (see [`rebuild_pause`]).
    last_rebuild: std::sync::Mutex<Option<Instant>>,
    /// Set when the relay gave up.
    gave_up: std::sync::OnceLock<String>,
}

/// How long after the `streak`-th rebuild without a delivery the next one waits: 1 s, doubling,
/// at most [`MAX_REBUILD_PAUSE`]; none after a delivery. A cause that lasts seconds (found by a
/// breaker helper: a broker refusing `InitProducerId` with `CLUSTER_AUTHORIZATION_FAILED` for
/// 3–4 s after an ACL change, as redpanda#8186 and KAFKA-13668 describe) made every new producer
/// fatal at once, and five back-to-back rebuilds stopped the relay within 4 s; now giving up
/// takes 1 + 2 + 4 + 8 + 16 = 31 s of a cause that outlasts every rebuild.
fn rebuild_pause(streak: u32) -> Duration {
    match streak {
        0 => Duration::ZERO,
        n => timing::doubling(Duration::from_secs(1), n, MAX_REBUILD_PAUSE),
    }
}

/// The longest pause between two rebuilds of a fatal producer.
const MAX_REBUILD_PAUSE: Duration = Duration::from_secs(30);

impl FatalProducer {
    /// A delivery was acknowledged: the producer works.
    pub(crate) fn delivered(&self) {
        self.streak.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn gave_up(&self) -> Option<crate::Error> {
        self.gave_up
            .get()
            .map(|reason| crate::Error::ProducerFailed(reason.clone()))
    }
}

impl Ctx {
    /// After a failed delivery on the producer of `generation`: when librdkafka made that
    /// producer fatal, replaces it (the old one is dropped off the async threads, which purges
    /// what it still holds: those reports come back as purged, their events are retried), at
    /// the earliest [`rebuild_pause`] after the last rebuild; after [`MAX_FATAL_REBUILDS`]
    /// rebuilds without a delivery, stops the relay with an error.
    pub(crate) fn check_fatal(&self, generation: u64) {
        let Some((fatal_generation, _, reason)) = self.producers.fatal_error() else {
            return;
        };
        if fatal_generation != generation {
            return;
        }
        let Some(streak) = self.fatal_streak(&reason) else {
            return;
        };
        match self.producers.rebuild(generation) {
            Ok(Some(which)) => self.report.producer_rebuilt(which, &reason, streak),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, fatal = %reason, "outbox relay: the main Kafka producer is fatal and cannot be rebuilt");
            }
        }
    }

    /// A report of a message of the pipelining producer of `generation`, in its batch or late:
    /// an acknowledgement says that producer works (see `Producers::pipe_delivered`), a failure
    /// may have made it fatal (see [`Ctx::check_pipe_fatal`]).
    pub(crate) fn pipe_reported(&self, generation: u64, acknowledged: bool) {
        if acknowledged {
            self.producers.pipe_delivered(generation);
        } else {
            self.check_pipe_fatal(generation);
        }
    }

    /// [`Ctx::check_fatal`] for the pipelining producer of `generation` (see
    /// [`Producers::pipe`](producer::Producers::pipe)): a fatal one is retired at once (a fresh
    /// one is created on next use), counted and limited like the main producer's rebuilds.
    ///
    /// `GaplessGuarantee` is the producer doing its job (a permanent error of one record batch
    /// failed every later message; the event that caused it is judged on its own): it is replaced
    /// without counting towards [`MAX_FATAL_REBUILDS`], or a writer of oversized events could
    /// stop the relay.
    pub(crate) fn check_pipe_fatal(&self, generation: u64) {
        let Some((code, reason)) = self.producers.pipe_fatal_error(generation) else {
            return;
        };
        if code == rdkafka::types::RDKafkaErrorCode::GaplessGuarantee {
            if self.producers.replace_pipe(generation) {
                metrics::counter!("outbox_producer_rebuilds_total", "producer" => producer::PIPELINING, "table" => self.report.table())
                    .increment(1);
                tracing::warn!(fatal = %reason, "outbox relay: a record batch of the pipelining producer failed permanently; replaced it (the messages after it are retried, no attempt counted)");
            }
            return;
        }
        let Some(streak) = self.fatal_streak(&reason) else {
            return;
        };
        if self.producers.replace_pipe(generation) {
            self.report
                .producer_rebuilt(&[producer::PIPELINING], &reason, streak);
        }
    }

    /// Counts a fatal producer: its rebuilds in a row without a delivery; `None` (no rebuild)
    /// within [`rebuild_pause`] of the last rebuild, and after [`MAX_FATAL_REBUILDS`] of them,
    /// when the relay gives up and stops with an error.
    fn fatal_streak(&self, reason: &str) -> Option<u32> {
        let mut last = (self.fatal.last_rebuild.lock()).unwrap_or_else(|e| e.into_inner());
        let streak = self.fatal.streak.load(std::sync::atomic::Ordering::Relaxed);
        if last.is_some_and(|at| at.elapsed() < rebuild_pause(streak)) {
            // Too soon after the last rebuild: the producer stays fatal (its sends fail at once,
            // no attempt counted) until a later failure finds the pause over.
            self.producers.state().problem(format!(
                "the producer became fatal ({reason}); rebuilding it after a pause"
            ));
            return None;
        }
        let streak = self
            .fatal
            .streak
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *last = Some(Instant::now());
        self.producers
            .state()
            .problem(format!("the producer became fatal ({reason}); rebuilt"));
        if streak > MAX_FATAL_REBUILDS {
            let why = format!(
                "the Kafka producer became fatal {streak} times in a row without a delivery; last: {reason}"
            );
            if self.fatal.gave_up.set(why).is_ok() {
                self.stop.request(self.settings.shutdown_timeout);
            }
            return None;
        }
        Some(streak)
    }
}

/// A batch session was opened: if it replaces one a server crash ended, confirms that had not
/// reached the disk were lost with it and brought their batches' fences back (see
/// [`Fences::remove_recent`]); they are deleted again, and the relay wakes for their aggregates.
fn remove_recent_fences(ctx: &Arc<Ctx>) {
    let task_ctx = ctx.clone();
    ctx.spawn_late("fence removal", async move {
        match task_ctx.fences.remove_recent().await {
            Ok(true) => task_ctx.due.at(Instant::now()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: the fences of batches confirmed before a new batch session was opened were not removed again; if a server crash brought them back, their aggregates wait for them to expire");
                task_ctx.due.at(Instant::now() + task_ctx.timing.fence);
            }
        }
    });
}
