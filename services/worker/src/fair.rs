//! Fair scheduling inside a worker. Partitioning by user keeps each user's order but puts many
//! users behind one heavy user's burst on a shared partition. The worker therefore reads ahead
//! into this buffer and starts jobs round-robin across users with buffered work, each user
//! capped at `per_user` running jobs; offsets still advance only contiguously (`offsets.rs`).

use crate::job::Record;
use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub(crate) struct FairQueue {
    queues: HashMap<Vec<u8>, VecDeque<Record>>,
    /// Users with buffered records, in the order they get their next turn.
    turns: VecDeque<Vec<u8>>,
    running: HashMap<Vec<u8>, usize>,
    per_user: usize,
    buffered: usize,
    buffered_bytes: usize,
}

fn user_of(record: &Record) -> &[u8] {
    record.key.as_deref().unwrap_or_default()
}

fn size_of(record: &Record) -> usize {
    record.payload.as_ref().map_or(0, Vec::len) + record.key.as_ref().map_or(0, Vec::len)
}

impl FairQueue {
    pub(crate) fn new(per_user: usize) -> Self {
        Self {
            queues: HashMap::new(),
            turns: VecDeque::new(),
            running: HashMap::new(),
            per_user: per_user.max(1),
            buffered: 0,
            buffered_bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, record: Record) {
        self.buffered += 1;
        self.buffered_bytes += size_of(&record);
        let user = user_of(&record).to_vec();
        let queue = self.queues.entry(user.clone()).or_default();
        if queue.is_empty() {
            self.turns.push_back(user);
        }
        queue.push_back(record);
    }

    /// The next record to start: the first user in turn order below its cap gets one, then
    /// goes to the back of the line. `None` if every buffered user is at its cap.
    pub(crate) fn pop(&mut self) -> Option<Record> {
        for _ in 0..self.turns.len() {
            let user = self.turns.pop_front()?;
            let running = self.running.get(&user).copied().unwrap_or(0);
            if running >= self.per_user {
                self.turns.push_back(user);
                continue;
            }
            let queue = self
                .queues
                .get_mut(&user)
                .expect("a user in turn has a queue");
            let record = queue.pop_front().expect("a user in turn has a record");
            if queue.is_empty() {
                self.queues.remove(&user);
            } else {
                self.turns.push_back(user.clone());
            }
            *self.running.entry(user).or_insert(0) += 1;
            self.buffered -= 1;
            self.buffered_bytes -= size_of(&record);
            return Some(record);
        }
        None
    }

    /// A started record finished; its user may start another.
    pub(crate) fn finished(&mut self, record: &Record) {
        let user = user_of(record);
        if let Some(running) = self.running.get_mut(user) {
            *running -= 1;
            if *running == 0 {
                self.running.remove(user);
            }
        }
    }

    /// Drops buffered records that `keep` rejects (those of revoked partitions).
    pub(crate) fn retain(&mut self, keep: impl Fn(&Record) -> bool) {
        for queue in self.queues.values_mut() {
            queue.retain(|record| {
                let kept = keep(record);
                if !kept {
                    self.buffered -= 1;
                    self.buffered_bytes -= size_of(record);
                }
                kept
            });
        }
        self.queues.retain(|_, queue| !queue.is_empty());
        let queues = &self.queues;
        self.turns.retain(|user| queues.contains_key(user));
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }

    pub(crate) fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: &str, offset: i64) -> Record {
        Record {
            trace: Default::default(),
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(user.as_bytes().to_vec()),
            payload: Some(vec![0; 10]),
            timestamp_ms: None,
        }
    }

    fn take(queue: &mut FairQueue, count: usize) -> Vec<(String, i64)> {
        (0..count)
            .map_while(|_| queue.pop())
            .map(|record| {
                (
                    String::from_utf8(record.key.clone().unwrap()).unwrap(),
                    record.offset,
                )
            })
            .collect()
    }

    #[test]
    fn users_take_turns_and_a_light_user_is_not_stuck_behind_a_burst() {
        let mut queue = FairQueue::new(2);
        for offset in 0..100 {
            queue.push(record("heavy", offset));
        }
        queue.push(record("light", 100));
        assert_eq!(
            take(&mut queue, 3),
            [
                ("heavy".into(), 0),
                ("light".into(), 100),
                ("heavy".into(), 1)
            ]
        );
        assert_eq!(
            take(&mut queue, 1),
            [],
            "heavy is at its cap of 2 and light has nothing left"
        );
        assert_eq!(queue.buffered(), 98);
        assert_eq!(queue.buffered_bytes(), 98 * 15);
    }

    #[test]
    fn a_finished_job_frees_its_users_slot_and_order_within_a_user_is_kept() {
        let mut queue = FairQueue::new(1);
        for offset in 0..3 {
            queue.push(record("a", offset));
        }
        let first = queue.pop().unwrap();
        assert!(queue.pop().is_none());
        queue.finished(&first);
        assert_eq!(queue.pop().unwrap().offset, 1);
    }

    #[test]
    fn revoked_records_are_dropped() {
        let mut queue = FairQueue::new(4);
        queue.push(record("a", 1));
        let mut other = record("b", 2);
        other.partition = 5;
        queue.push(other);
        queue.retain(|record| record.partition != 5);
        assert_eq!(queue.buffered(), 1);
        assert_eq!(take(&mut queue, 5), [("a".into(), 1)]);
    }
}
