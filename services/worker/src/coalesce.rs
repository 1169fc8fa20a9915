//! Identical requests in flight at the same time share one model call: the first becomes the
//! leader and calls; the others wait for its answer. A follower whose leader fails, or is
//! cancelled, makes its own call.

use sluice_schemas::Output;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

type Answer = Option<Option<Output>>;

#[derive(Debug, Clone, Default)]
pub struct Coalescer {
    in_flight: Arc<Mutex<HashMap<String, watch::Receiver<Answer>>>>,
}

pub enum Turn {
    Leader(Leader),
    Follower(watch::Receiver<Answer>),
}

/// The call every identical request waits for; dropping it without `finish` lets them call.
pub struct Leader {
    coalescer: Coalescer,
    key: String,
    sender: watch::Sender<Answer>,
}

impl Coalescer {
    pub fn join(&self, key: &str) -> Turn {
        let mut in_flight = self.in_flight.lock().expect("coalescer lock");
        if let Some(receiver) = in_flight.get(key) {
            return Turn::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(key.to_owned(), receiver);
        Turn::Leader(Leader {
            coalescer: self.clone(),
            key: key.to_owned(),
            sender,
        })
    }
}

impl Leader {
    /// Shares the answer (or `None`: the call failed) with every follower.
    pub fn finish(self, output: Option<Output>) {
        let _ = self.sender.send(Some(output));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.coalescer
            .in_flight
            .lock()
            .expect("coalescer lock")
            .remove(&self.key);
    }
}

/// Waits for the leader: its answer, or `None` if it failed or went away.
pub(crate) async fn follow(mut receiver: watch::Receiver<Answer>) -> Option<Output> {
    match receiver.wait_for(Option::is_some).await {
        Ok(answer) => answer.clone().flatten(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output() -> Output {
        Output {
            content: "x".into(),
            ..Output::default()
        }
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer_and_the_key_is_freed() {
        let coalescer = Coalescer::default();
        let Turn::Leader(leader) = coalescer.join("k") else {
            panic!("first is the leader")
        };
        let Turn::Follower(receiver) = coalescer.join("k") else {
            panic!("second follows")
        };
        let waiting = tokio::spawn(follow(receiver));
        leader.finish(Some(output()));
        assert_eq!(waiting.await.unwrap(), Some(output()));
        assert!(
            matches!(coalescer.join("k"), Turn::Leader(_)),
            "a later request leads again"
        );
    }

    #[tokio::test]
    async fn a_leader_gone_without_an_answer_releases_its_followers() {
        let coalescer = Coalescer::default();
        let Turn::Leader(leader) = coalescer.join("k") else {
            panic!()
        };
        let Turn::Follower(receiver) = coalescer.join("k") else {
            panic!()
        };
        drop(leader);
        assert_eq!(follow(receiver).await, None);
    }
}
