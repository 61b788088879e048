//! A gated backlog of few aggregates, split between the batch slots.
//!
//! When a reservation finds nothing while a full batch is in flight, every pending aggregate has
//! rows in that batch: the per-aggregate gate holds their later rows back until it is done (see
//! `reserve.sql`), so the other slots stay idle and one batch session at a time reserves,
//! fences and confirms — ten aggregates drained at 0.69 × the uniform rate (BENCHMARKS.md). The
//! pipeline then splits the aggregates into as many groups as there are slots, by a bucket of
//! their id (`hashtext(aggregate_id) & 63`, computed by Postgres; the reservation returns each
//! row's), balanced by the rows the batch in flight held of each bucket; once that batch is
//! done, each slot reserves the rows of one group only. An aggregate is wholly in one group, so
//! no two batches hold rows of one aggregate and the gate is as before: order never depends on
//! the split, only which aggregates a batch takes. Each group keeps its own scan start (a
//! group's scan says nothing about the other groups' rows).
//!
//! The split ends when a group's reservation finds nothing (the group drained, or its rows are
//! another relay's): with the other batches still full it is made again from the last batch's
//! buckets (the aggregates left), else the next reservation scans every row. It also ends after
//! a batch that did not confirm, and after a failed reservation. A backlog of one bucket (one
//! aggregate) is not split: its batch takes the slots' share of rows instead (see
//! `Pipeline::reserve`).

use std::sync::Arc;

use super::reserve::Reserved;
use super::scan::ScanStart;

/// Buckets of `hashtext(aggregate_id) & 63` (see `reserve.sql`).
pub(crate) const BUCKETS: usize = 64;

/// Rows per bucket of a batch.
pub(crate) type Weights = [u32; BUCKETS];

/// The rows of `rows` in each bucket.
pub(crate) fn weights(rows: &[Reserved]) -> Weights {
    let mut w = [0u32; BUCKETS];
    for r in rows {
        let b = usize::from(r.bucket) % BUCKETS;
        w[b] = w[b].saturating_add(1);
    }
    w
}

/// The groups of a split backlog, and what each slot's reservations know.
pub(crate) struct Split {
    /// The group of each bucket (`reserve.sql`'s `$4`).
    group_of: Arc<[i16]>,
    /// Whether a batch of the group is in flight.
    busy: Vec<bool>,
    /// Where each group's next scan starts.
    scans: Vec<ScanStart>,
}

impl Split {
    /// Splits the buckets that `weights` (the rows per bucket of the batch in flight) shows in
    /// use into at most `slots` groups of about equal rows (the heaviest bucket first, each to
    /// the lightest group); buckets without rows go round the groups. `None` when fewer than two
    /// buckets hold rows (nothing to split) or with one slot.
    pub(crate) fn of(weights: &Weights, slots: usize) -> Option<Split> {
        let mut used: Vec<usize> = (0..BUCKETS).filter(|&b| weights[b] > 0).collect();
        let groups = slots.min(used.len()).min(BUCKETS);
        if groups < 2 {
            return None;
        }
        used.sort_by_key(|&b| std::cmp::Reverse(weights[b]));
        let mut load = vec![0u64; groups];
        let mut group_of = vec![-1i16; BUCKETS];
        for b in used {
            let lightest = (0..groups).min_by_key(|&g| load[g]).unwrap_or(0);
            load[lightest] += u64::from(weights[b]);
            group_of[b] = i16::try_from(lightest).unwrap_or(0);
        }
        let mut next = 0usize;
        for g in group_of.iter_mut().filter(|g| **g < 0) {
            *g = i16::try_from(next).unwrap_or(0);
            next = (next + 1) % groups;
        }
        Some(Split {
            group_of: group_of.into(),
            busy: vec![false; groups],
            scans: (0..groups).map(|_| ScanStart::new()).collect(),
        })
    }

    /// How many groups.
    pub(crate) fn groups(&self) -> usize {
        self.busy.len()
    }

    /// The first group without a batch in flight.
    pub(crate) fn free_group(&self) -> Option<usize> {
        self.busy.iter().position(|busy| !busy)
    }

    /// What a reservation of `group` passes (see [`super::reserve::Ask::group`]).
    pub(crate) fn filter(&self, group: usize) -> (Arc<[i16]>, i16) {
        (
            self.group_of.clone(),
            i16::try_from(group).unwrap_or(i16::MAX),
        )
    }

    /// The scan start of `group`.
    pub(crate) fn scan(&mut self, group: usize) -> &mut ScanStart {
        &mut self.scans[group]
    }

    /// A batch of no group of this split (of an earlier one, or of every row) released the
    /// rows from `released` pending: they may lie below any group's scan start.
    pub(crate) fn released(&mut self, released: Option<i64>) {
        for scan in &mut self.scans {
            scan.released(released);
        }
    }

    /// A batch of `group` started (`true`) or is done (`false`). A group this split does not
    /// have (a batch of an earlier split) is ignored.
    pub(crate) fn set_busy(&mut self, group: usize, busy: bool) {
        if let Some(b) = self.busy.get_mut(group) {
            *b = busy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(rows: &[(usize, u32)]) -> Weights {
        let mut w = [0; BUCKETS];
        for &(b, n) in rows {
            w[b] = n;
        }
        w
    }

    #[test]
    fn one_bucket_or_one_slot_is_not_split() {
        assert!(Split::of(&with(&[(7, 4_000)]), 2).is_none());
        assert!(Split::of(&with(&[(1, 10), (2, 10)]), 1).is_none());
        assert!(Split::of(&[0; BUCKETS], 2).is_none());
    }

    #[test]
    fn groups_get_about_equal_rows_and_every_bucket_a_group() {
        // Ten aggregates of 400 rows in nine buckets (two share bucket 3).
        let w = with(&[
            (0, 400),
            (3, 800),
            (9, 400),
            (12, 400),
            (20, 400),
            (33, 400),
            (41, 400),
            (50, 400),
            (63, 400),
        ]);
        let split = Split::of(&w, 2).expect("split");
        assert_eq!(split.groups(), 2);
        let rows_of = |g: i16| -> u32 {
            (0..BUCKETS)
                .filter(|&b| split.group_of[b] == g)
                .map(|b| w[b])
                .sum()
        };
        assert_eq!(rows_of(0), 2_000);
        assert_eq!(rows_of(1), 2_000);
        assert!(split.group_of.iter().all(|&g| g == 0 || g == 1));
        // Buckets without rows (new aggregates) go round both groups.
        let empty: Vec<i16> = (0..BUCKETS)
            .filter(|&b| w[b] == 0)
            .map(|b| split.group_of[b])
            .collect();
        assert!(empty.contains(&0) && empty.contains(&1));
        // Never more groups than buckets in use.
        let two = Split::of(&with(&[(1, 5), (2, 5)]), 8).expect("split");
        assert_eq!(two.groups(), 2);
    }

    #[test]
    fn a_slot_takes_the_first_group_without_a_batch() {
        let mut split = Split::of(&with(&[(1, 5), (2, 5), (3, 5)]), 3).expect("split");
        assert_eq!(split.free_group(), Some(0));
        split.set_busy(0, true);
        assert_eq!(split.free_group(), Some(1));
        split.set_busy(1, true);
        split.set_busy(2, true);
        assert_eq!(split.free_group(), None);
        split.set_busy(9, false);
        assert_eq!(split.free_group(), None, "a group it does not have");
        split.set_busy(1, false);
        assert_eq!(split.free_group(), Some(1));
        assert_eq!(split.filter(1).1, 1);
    }
}
