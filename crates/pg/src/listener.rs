//! The invalidation listener: one dedicated connection (not from the fill
//! pool) that LISTENs on the invalidation channel and forwards every
//! notification, reconnecting with backoff when the connection drops.
//!
//! The same connection resolves the tables that notifications name
//! (`Resolver`): fills can never starve it, so an invalidation never waits
//! behind them.
//!
//! Notifications wait in a queue with a byte budget (`queue`): past it they
//! are dropped and the queue says it overflowed, which the Redis layer treats
//! as a gap (everything cached before is flushed), so memory stays bounded
//! whatever is NOTIFYed and nothing is silently lost.
//!
//! deadpool hides each connection's message stream, so this connection is a
//! plain tokio-postgres one, driven with `poll_message`.

use crate::error::describe;
use crate::PgError;
use pgcache_core::sql::quote_ident;
use pgcache_core::TableSchema;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

#[derive(Debug)]
pub enum ListenerEvent {
    /// LISTEN is in effect: every commit from now on is notified. What was
    /// committed before (while disconnected) was not.
    Connected(Resolver),
    /// The connection failed or dropped (or LISTEN failed); notifications
    /// are being lost until the next `Connected`.
    Disconnected(String),
    /// A notification's payload.
    Notification(String),
}

/// Catalog lookups on the listener's own connection.
#[derive(Clone)]
pub struct Resolver {
    client: Arc<tokio_postgres::Client>,
    timeout: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    pub fn new(client: Arc<tokio_postgres::Client>, timeout: Duration) -> Resolver {
        Resolver { client, timeout }
    }

    /// Looks a table up by the name a notification gave (a quoted,
    /// possibly qualified name), under the query timeout. Fails at once once
    /// the listener's connection is gone.
    pub async fn resolve_table(&self, name: &str) -> Result<TableSchema, PgError> {
        match tokio::time::timeout(self.timeout, crate::catalog::resolve(&self.client, name)).await
        {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    /// Whether the connection behind it is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// The sending half of the listener's queue.
#[derive(Clone)]
pub struct EventSender {
    tx: mpsc::UnboundedSender<ListenerEvent>,
    shared: Arc<QueueState>,
}

struct QueueState {
    /// Payload bytes queued now.
    bytes: AtomicUsize,
    max_bytes: usize,
    /// A notification was dropped since the receiver last asked.
    overflowed: AtomicBool,
}

/// The receiving half: events in order, and whether notifications were
/// dropped.
pub struct EventQueue {
    rx: mpsc::UnboundedReceiver<ListenerEvent>,
    shared: Arc<QueueState>,
}

/// A queue whose notifications may hold at most `max_bytes` of payload.
pub fn queue(max_bytes: usize) -> (EventSender, EventQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(QueueState {
        bytes: AtomicUsize::new(0),
        max_bytes,
        overflowed: AtomicBool::new(false),
    });
    (
        EventSender {
            tx,
            shared: shared.clone(),
        },
        EventQueue { rx, shared },
    )
}

impl EventSender {
    /// Queues an event; `Err` when the receiver is gone. A notification
    /// past the byte budget is dropped and the overflow recorded.
    fn send(&self, event: ListenerEvent) -> Result<(), ()> {
        if let ListenerEvent::Notification(p) = &event {
            let len = p.len().max(1);
            let before = self.shared.bytes.fetch_add(len, Ordering::AcqRel);
            if before + len > self.shared.max_bytes {
                self.shared.bytes.fetch_sub(len, Ordering::AcqRel);
                self.shared.overflowed.store(true, Ordering::Release);
                return if self.tx.is_closed() { Err(()) } else { Ok(()) };
            }
        }
        self.tx.send(event).map_err(|_| ())
    }
}

impl EventQueue {
    fn received(&self, event: &ListenerEvent) {
        if let ListenerEvent::Notification(p) = event {
            self.shared
                .bytes
                .fetch_sub(p.len().max(1), Ordering::AcqRel);
        }
    }

    pub async fn recv(&mut self) -> Option<ListenerEvent> {
        let event = self.rx.recv().await?;
        self.received(&event);
        Some(event)
    }

    pub fn try_recv(&mut self) -> Option<ListenerEvent> {
        let event = self.rx.try_recv().ok()?;
        self.received(&event);
        Some(event)
    }

    /// Whether notifications were dropped since the last call.
    pub fn take_overflow(&self) -> bool {
        self.shared.overflowed.swap(false, Ordering::AcqRel)
    }
}

/// Where the listener connects: called before every attempt, so settings
/// that do not restart the listener (timeouts) apply at its next connect.
pub type Target =
    Box<dyn Fn() -> Result<(tokio_postgres::Config, crate::tls::TlsConnector), PgError> + Send>;

/// The listener connection's `application_name`.
pub const APPLICATION_NAME: &str = "pgcache listener";

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until the receiver is dropped or the task is aborted.
pub async fn run(target: Target, channel: String, lookup_timeout: Duration, events: EventSender) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let (was_connected, reason) = match target() {
            Ok((mut config, tls)) => {
                // Its own name, so a DBA (and the tests) can tell it from
                // the fill pool's connections in pg_stat_activity.
                config
                    .application_name(APPLICATION_NAME)
                    .keepalives(true)
                    .keepalives_idle(Duration::from_secs(10));
                session(&config, &tls, &channel, lookup_timeout, &events).await
            }
            Err(e) => (false, e.to_string()),
        };
        if events.send(ListenerEvent::Disconnected(reason)).is_err() {
            return;
        }
        backoff = if was_connected {
            FIRST_BACKOFF
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        tokio::time::sleep(backoff).await;
    }
}

/// One connection's life; returns whether LISTEN took effect, and why it ended.
async fn session(
    config: &tokio_postgres::Config,
    tls: &crate::tls::TlsConnector,
    channel: &str,
    lookup_timeout: Duration,
    events: &EventSender,
) -> (bool, String) {
    let (client, mut connection) = match config.connect(tls.clone()).await {
        Ok(c) => c,
        Err(e) => return (false, describe(&e)),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<String, String>>();
    // The connection must be polled for the client's queries to complete,
    // and for notifications to arrive.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(Ok(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx.send(Err(describe(&e)));
                    return;
                }
                None => {
                    let _ = tx.send(Err("connection closed".into()));
                    return;
                }
            }
        }
    });
    let client = Arc::new(client);
    let result = async {
        // A role's idle_session_timeout (PostgreSQL 14+) would cycle this
        // idle connection, and every reconnect is a gap that drops the
        // cache. Older servers do not know the setting: ignored.
        let _ = client.batch_execute("SET idle_session_timeout = 0").await;
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
            .await
            .map_err(|e| (false, format!("LISTEN failed: {}", describe(&e))))?;
        let resolver = Resolver {
            client: client.clone(),
            timeout: lookup_timeout,
        };
        if events.send(ListenerEvent::Connected(resolver)).is_err() {
            return Err((true, "listener stopped".into()));
        }
        while let Some(message) = rx.recv().await {
            match message {
                Ok(payload) => {
                    if events.send(ListenerEvent::Notification(payload)).is_err() {
                        return Err((true, "listener stopped".into()));
                    }
                }
                Err(reason) => return Err((true, reason)),
            }
        }
        Err((true, "connection closed".into()))
    }
    .await;
    driver.abort();
    drop(client);
    match result {
        Ok(()) => (true, String::new()),
        Err(e) => e,
    }
}
