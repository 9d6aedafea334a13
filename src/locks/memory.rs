//! In-process file-name locks for a single service instance (no `REDIS_URL`).
//!
//! Same semantics as the Redis backend: a lock is a (token, expiry) pair, an expired lock
//! counts as free, and renew/release compare the token first. Expiry uses
//! `tokio::time::Instant` so that a paused test clock drives it too.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{Acquire, LockError, LockManager};

#[derive(Debug, Default)]
pub struct MemoryLocks {
    locks: Mutex<HashMap<String, (String, Instant)>>,
}

impl MemoryLocks {
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // A panic while holding the guard cannot leave the map half-updated (every update
        // is a single insert/remove), so a poisoned lock is still safe to use.
        self.locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The live holder of `name`, if any: an expired entry is no holder.
fn live<'a>(
    table: &'a HashMap<String, (String, Instant)>,
    name: &str,
    now: Instant,
) -> Option<&'a String> {
    table
        .get(name)
        .filter(|(_, expires)| *expires > now)
        .map(|(token, _)| token)
}

#[async_trait::async_trait]
impl LockManager for MemoryLocks {
    async fn acquire(&self, name: &str, token: &str, ttl: Duration) -> Result<Acquire, LockError> {
        let now = Instant::now();
        let mut table = self.table();
        if let Some(holder) = live(&table, name, now) {
            return Ok(Acquire::HeldBy(holder.clone()));
        }
        // Dropping expired entries here keeps the map bounded by the live locks without a
        // background sweeper; it holds only in-flight tasks, so the scan is short.
        table.retain(|_, (_, expires)| *expires > now);
        table.insert(name.to_owned(), (token.to_owned(), now + ttl));
        Ok(Acquire::Acquired)
    }

    async fn renew(&self, name: &str, token: &str, ttl: Duration) -> Result<bool, LockError> {
        let now = Instant::now();
        let mut table = self.table();
        match table.get_mut(name) {
            Some((holder, expires)) if *expires > now && holder == token => {
                *expires = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, name: &str, token: &str) -> Result<bool, LockError> {
        let now = Instant::now();
        let mut table = self.table();
        if live(&table, name, now).is_some_and(|holder| holder == token) {
            table.remove(name);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn holder(&self, name: &str) -> Result<Option<String>, LockError> {
        Ok(live(&self.table(), name, Instant::now()).cloned())
    }
}
