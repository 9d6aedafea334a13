//! In-flight file-name locks: one lock per file name, holding the id of the task that
//! processes it. Locks have a TTL, are renewed while the task lives and are released with a
//! compare-and-delete on the holder's token, so a lock whose holder died simply expires.
//!
//! Knows nothing of tasks beyond the token string.

pub mod memory;
pub mod redis;

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock backend unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    Acquired,
    /// Someone else holds it; their token.
    HeldBy(String),
}

#[async_trait::async_trait]
pub trait LockManager: Send + Sync {
    /// Takes the lock for `name` if free (SET NX with a TTL).
    async fn acquire(&self, name: &str, token: &str, ttl: Duration) -> Result<Acquire, LockError>;
    /// Extends the TTL if `token` still holds the lock; false if it lost it.
    async fn renew(&self, name: &str, token: &str, ttl: Duration) -> Result<bool, LockError>;
    /// Deletes the lock if `token` holds it; false if it did not.
    async fn release(&self, name: &str, token: &str) -> Result<bool, LockError>;
    /// The current holder's token.
    async fn holder(&self, name: &str) -> Result<Option<String>, LockError>;
    /// Fails if the backend cannot be reached now (for health checks).
    async fn ping(&self) -> Result<(), LockError> {
        Ok(())
    }
}
