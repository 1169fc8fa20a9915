//! Per-partition bookkeeping that turns out-of-order completions into a contiguous offset to store.

use std::collections::{BTreeMap, HashMap};

/// Tracks, for each partition, the offsets started and which of them are done.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), BTreeMap<i64, bool>>,
}

impl OffsetTracker {
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        self.partitions
            .entry((topic.to_owned(), partition))
            .or_default()
            .insert(offset, false);
    }

    /// Marks `offset` done and returns the highest offset below which every started offset is
    /// done, if that moved. Offsets of a partition forgotten since they started return `None`.
    pub fn complete(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let pending = self.partitions.get_mut(&(topic.to_owned(), partition))?;
        *pending.get_mut(&offset)? = true;
        let mut highest_done = None;
        while let Some(entry) = pending.first_entry() {
            if !*entry.get() {
                break;
            }
            highest_done = Some(*entry.key());
            entry.remove();
        }
        highest_done
    }

    /// Drops a partition that was revoked: its late completions must not store offsets.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_owned(), partition));
    }

    pub fn pending(&self) -> usize {
        self.partitions.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_completions_advance_only_contiguously() {
        let mut tracker = OffsetTracker::default();
        for offset in 10..15 {
            tracker.start("t", 0, offset);
        }
        assert_eq!(
            tracker.complete("t", 0, 12),
            None,
            "10 and 11 are still running"
        );
        assert_eq!(tracker.complete("t", 0, 11), None);
        assert_eq!(
            tracker.complete("t", 0, 10),
            Some(12),
            "10, 11, 12 are all done now"
        );
        assert_eq!(tracker.complete("t", 0, 14), None);
        assert_eq!(tracker.complete("t", 0, 13), Some(14));
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn partitions_are_independent_and_forgotten_ones_store_nothing() {
        let mut tracker = OffsetTracker::default();
        tracker.start("t", 0, 5);
        tracker.start("t", 1, 7);
        tracker.forget("t", 0);
        assert_eq!(tracker.complete("t", 0, 5), None);
        assert_eq!(tracker.complete("t", 1, 7), Some(7));
        assert_eq!(tracker.complete("t", 1, 99), None, "never started");
    }
}
