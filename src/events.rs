//! Task events between service instances, over Redis pub/sub.
//!
//! - `{prefix}:task:{id}`: each state change of a task (JSON: the publishing instance and the
//!   record), so `WatchTask` on any instance follows a task running on another one without
//!   polling the store.
//! - `{prefix}:queue`: "there is work": sent when a task is queued or given back, so idle
//!   workers of every instance claim it at once instead of at their next poll.
//! - `{prefix}:cancel`: a task id whose cancellation was asked for, so the instance running
//!   it stops at once (else it learns it from its next lease renewal or save).
//!
//! Pub/sub is fire-and-forget: a message sent while Redis is down is lost. Nothing depends on
//! it for correctness: watchers re-read the store now and then, and workers poll the queue.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::locks::redis::connect_client;
use crate::locks::LockError;
use crate::tasks::types::TaskRecord;

/// Publishing gives up after this long: a stuck Redis must not stall a worker.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// What other instances announce.
#[derive(Debug, Clone)]
pub enum Event {
    Task(Box<TaskRecord>),
    Wake,
    /// Stop this task if it runs here.
    Cancel(String),
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    task: TaskRecord,
}

pub struct RedisEvents {
    publisher: fred::prelude::Client,
    subscriber: SubscriberClient,
    prefix: String,
    instance: String,
    events: broadcast::Sender<Event>,
}

impl RedisEvents {
    /// Subscribes to the other instances' events. `publisher` is an already connected client
    /// (the lock client); `instance` tags our own messages so we can ignore their echo.
    pub async fn connect(
        url: &str,
        prefix: &str,
        publisher: fred::prelude::Client,
        instance: &str,
    ) -> Result<Self, LockError> {
        let subscriber = connect_client(url, |b| b.build_subscriber_client()).await?;
        // Subscriptions are restored after every reconnect (the task runs until the client
        // is dropped).
        drop(subscriber.manage_subscriptions());
        let (events, _) = broadcast::channel(1024);
        let this = Self {
            publisher,
            subscriber,
            prefix: prefix.to_owned(),
            instance: instance.to_owned(),
            events,
        };
        this.forward();
        let fail = |e: fred::error::Error| LockError::Unavailable(format!("Redis subscribe: {e}"));
        this.subscriber
            .psubscribe(format!("{}:task:*", this.prefix))
            .await
            .map_err(fail)?;
        this.subscriber
            .subscribe(this.queue_channel())
            .await
            .map_err(fail)?;
        this.subscriber
            .subscribe(this.cancel_channel())
            .await
            .map_err(fail)?;
        Ok(this)
    }

    fn queue_channel(&self) -> String {
        format!("{}:queue", self.prefix)
    }

    fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }

    /// Turns Redis messages into `Event`s for our subscribers, dropping our own.
    fn forward(&self) {
        let mut rx = self.subscriber.message_rx();
        let (events, queue, cancel, me) = (
            self.events.clone(),
            self.queue_channel(),
            self.cancel_channel(),
            self.instance.clone(),
        );
        tokio::spawn(async move {
            loop {
                let message = match rx.recv().await {
                    Ok(m) => m,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "task events lagged");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if *message.channel == *queue {
                    let _ = events.send(Event::Wake);
                    continue;
                }
                let Some(text) = message.value.as_str() else {
                    continue;
                };
                if *message.channel == *cancel {
                    let _ = events.send(Event::Cancel(text.into_owned()));
                    continue;
                }
                match serde_json::from_str::<Envelope>(&text) {
                    Ok(env) if env.from != me => {
                        let _ = events.send(Event::Task(Box::new(env.task)));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "ignoring a malformed task event"),
                }
            }
        });
    }

    /// Events from the other instances.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Announces a task's new state (best effort).
    pub async fn task(&self, task: &TaskRecord) {
        let envelope = Envelope {
            from: self.instance.clone(),
            task: task.clone(),
        };
        let Ok(text) = serde_json::to_string(&envelope) else {
            return;
        };
        let channel = format!("{}:task:{}", self.prefix, task.id);
        self.publish(channel, text).await;
    }

    /// Asks the instance running `task_id`, wherever it is, to stop it (best effort).
    pub async fn cancel(&self, task_id: &str) {
        self.publish(self.cancel_channel(), task_id.to_owned())
            .await;
    }

    /// Tells idle workers everywhere that a task waits (best effort).
    pub async fn wake(&self) {
        self.publish(self.queue_channel(), "1".to_owned()).await;
    }

    async fn publish(&self, channel: String, text: String) {
        let sent = tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.publisher.publish::<i64, _, _>(channel, text),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot publish a task event"),
            Err(_) => tracing::debug!("publishing a task event timed out"),
        }
    }

    pub async fn close(&self) {
        let _ = self.subscriber.quit().await;
    }
}
