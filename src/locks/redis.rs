//! File-name locks in Redis, shared by every service instance that uses the same server and
//! key prefix.
//!
//! A lock is the key `{prefix}:lock:{name}` holding the owner's token with a PX TTL. Renew and
//! release are Lua scripts that compare the token before touching the key, so an instance
//! whose lock already expired and was taken over can never extend or delete the new owner's.

use std::time::Duration;

use fred::prelude::{
    ClientLike, Config, Expiration, KeysInterface, LuaInterface, ReconnectPolicy, SetOptions,
};

use super::{Acquire, LockError, LockManager};

/// Bounds the first connection and every command, so a dead server is an error, not a hang.
const TIMEOUT: Duration = Duration::from_secs(5);

const RENEW_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct RedisLocks {
    client: fred::prelude::Client,
    prefix: String,
}

impl RedisLocks {
    /// Connects and PINGs, failing within a few seconds if the server cannot be reached.
    /// After that the client reconnects on its own; commands issued while it is down fail
    /// with `Unavailable` after the command timeout.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, LockError> {
        let client = connect_client(url, |b| b.build()).await?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
        })
    }

    /// The connected client, for other users of the same server (task events).
    pub fn client(&self) -> &fred::prelude::Client {
        &self.client
    }

    fn key(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.prefix)
    }
}

/// Builds a client of the kind `build` makes for `url`, connects and PINGs it, failing within
/// a few seconds if the server cannot be reached. After that the client reconnects on its own
/// (with backoff); commands issued while it is down fail after the command timeout.
pub async fn connect_client<C: ClientLike>(
    url: &str,
    build: impl FnOnce(&fred::prelude::Builder) -> Result<C, fred::error::Error>,
) -> Result<C, LockError> {
    let shown = redact_url(url);
    let config = Config::from_url(url)
        .map_err(|e| LockError::Unavailable(format!("invalid Redis URL {shown}: {e}")))?;
    // `fail_fast` (the default) makes `init` return the first connection error instead of
    // entering the reconnect loop; the policy only applies once we are connected.
    let mut builder = fred::prelude::Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = TIMEOUT;
            c.internal_command_timeout = TIMEOUT;
        })
        .with_performance_config(|p| p.default_command_timeout = TIMEOUT)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    let client = build(&builder)
        .map_err(|e| LockError::Unavailable(format!("Redis client for {shown}: {e}")))?;
    let unreachable =
        |e: String| LockError::Unavailable(format!("cannot connect to Redis at {shown}: {e}"));
    match tokio::time::timeout(TIMEOUT + Duration::from_secs(1), client.init()).await {
        Ok(Ok(_driver_task)) => {}
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            // Stop the connection task so it does not retry behind our back.
            let _ = client.quit().await;
            return Err(unreachable("timed out".into()));
        }
    }
    let pong: Result<String, _> = client.ping(None).await;
    if let Err(e) = pong {
        let _ = client.quit().await;
        return Err(unreachable(format!("PING failed: {e}")));
    }
    Ok(client)
}

fn unavailable(e: fred::error::Error) -> LockError {
    LockError::Unavailable(format!("Redis: {e}"))
}

/// Redis rejects a PX of 0, and a sub-millisecond lock would be meaningless anyway.
fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// The URL with any password replaced, for error messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The userinfo ends at the last '@' before the path; a password may itself contain '@'.
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[async_trait::async_trait]
impl LockManager for RedisLocks {
    async fn acquire(&self, name: &str, token: &str, ttl: Duration) -> Result<Acquire, LockError> {
        let key = self.key(name);
        // The holder can release or expire between our failed SET NX and the GET; then the
        // lock is free again and one more SET NX settles it.
        for _ in 0..2 {
            let set: Option<String> = self
                .client
                .set(
                    key.as_str(),
                    token,
                    Some(Expiration::PX(ttl_ms(ttl))),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .map_err(unavailable)?;
            if set.is_some() {
                return Ok(Acquire::Acquired);
            }
            let holder: Option<String> =
                self.client.get(key.as_str()).await.map_err(unavailable)?;
            if let Some(holder) = holder {
                return Ok(Acquire::HeldBy(holder));
            }
        }
        Err(LockError::Unavailable(format!(
            "lock {name} kept changing hands while being acquired"
        )))
    }

    async fn renew(&self, name: &str, token: &str, ttl: Duration) -> Result<bool, LockError> {
        let extended: i64 = self
            .client
            .eval(
                RENEW_SCRIPT,
                vec![self.key(name)],
                vec![token.to_owned(), ttl_ms(ttl).to_string()],
            )
            .await
            .map_err(unavailable)?;
        Ok(extended == 1)
    }

    async fn release(&self, name: &str, token: &str) -> Result<bool, LockError> {
        let deleted: i64 = self
            .client
            .eval(RELEASE_SCRIPT, vec![self.key(name)], vec![token.to_owned()])
            .await
            .map_err(unavailable)?;
        Ok(deleted == 1)
    }

    async fn holder(&self, name: &str) -> Result<Option<String>, LockError> {
        self.client.get(self.key(name)).await.map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), LockError> {
        let _: String = self.client.ping(None).await.map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact_url("redis://user:s3cr@t@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://:pw@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("redis://user@host"), "redis://user@host");
    }

    #[test]
    fn ttl_is_at_least_one_millisecond() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_millis(300)), 300);
    }
}
