//! The in-process queue of a single instance: task ids in arrival order, so a cancelled task
//! leaves it at once and each waiting task knows its place.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(super) struct LocalQueue {
    items: Mutex<VecDeque<String>>,
    capacity: usize,
    ready: Notify,
}

impl LocalQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::default(),
            capacity,
            ready: Notify::new(),
        }
    }

    /// Appends a task unless `capacity` tasks wait already (`Err` gives how many).
    pub fn push(&self, task_id: &str) -> Result<(), usize> {
        let mut items = self.items.lock().expect("poisoned");
        if items.len() >= self.capacity {
            return Err(items.len());
        }
        items.push_back(task_id.to_owned());
        drop(items);
        self.ready.notify_one();
        Ok(())
    }

    /// Appends a task whatever the queue's length (tasks recovered at start).
    pub fn push_recovered(&self, task_id: &str) {
        self.items
            .lock()
            .expect("poisoned")
            .push_back(task_id.to_owned());
        self.ready.notify_one();
    }

    /// The next task, waiting for one; `None` once `shutdown` is cancelled.
    pub async fn pop(&self, shutdown: &CancellationToken) -> Option<String> {
        loop {
            // A push between this look and the wait below leaves a permit in `ready`, so it
            // is never missed.
            if let Some(id) = self.items.lock().expect("poisoned").pop_front() {
                return Some(id);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.ready.notified() => {}
            }
        }
    }

    /// Takes a task out of the queue; false if it was not waiting.
    pub fn remove(&self, task_id: &str) -> bool {
        let mut items = self.items.lock().expect("poisoned");
        match items.iter().position(|id| id == task_id) {
            Some(i) => {
                items.remove(i);
                true
            }
            None => false,
        }
    }

    /// The waiting task ids, next first.
    pub fn snapshot(&self) -> Vec<String> {
        self.items
            .lock()
            .expect("poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_order_refuses_when_full_and_removes() {
        let q = LocalQueue::new(3);
        for id in ["a", "b", "c"] {
            q.push(id).unwrap();
        }
        assert_eq!(q.push("d"), Err(3));
        assert!(q.remove("b"));
        assert!(!q.remove("b"));
        assert_eq!(q.snapshot(), ["a", "c"]);
        let stop = CancellationToken::new();
        assert_eq!(q.pop(&stop).await.as_deref(), Some("a"));
        assert_eq!(q.pop(&stop).await.as_deref(), Some("c"));
        assert!(q.snapshot().is_empty());
        stop.cancel();
        assert_eq!(q.pop(&stop).await, None);
    }

    #[tokio::test]
    async fn a_waiting_worker_is_woken_by_a_push() {
        let q = std::sync::Arc::new(LocalQueue::new(2));
        let stop = CancellationToken::new();
        let waiter = tokio::spawn({
            let (q, stop) = (q.clone(), stop.clone());
            async move { q.pop(&stop).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        q.push("x").unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got.as_deref(), Some("x"));
    }
}
