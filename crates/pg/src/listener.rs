//! The invalidation listener: one dedicated connection (not from the fill
//! pool) that LISTENs on the invalidation channel and forwards every
//! notification, reconnecting with backoff when the connection drops.
//!
//! deadpool hides each connection's message stream, so this connection is a
//! plain tokio-postgres one, driven with `poll_message`.

use pgcache_core::sql::quote_ident;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

#[derive(Debug)]
pub enum ListenerEvent {
    /// LISTEN is in effect: every commit from now on is notified. What was
    /// committed before (while disconnected) was not.
    Connected,
    /// The connection failed or dropped; notifications are being lost until
    /// the next `Connected`.
    Disconnected(String),
    /// A notification's payload.
    Notification(String),
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until `events` is closed (the receiver dropped) or the task is aborted.
pub async fn run(
    config: tokio_postgres::Config,
    tls: crate::tls::TlsConnector,
    channel: String,
    events: mpsc::UnboundedSender<ListenerEvent>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut config = config;
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    loop {
        let (was_connected, reason) = session(&config, &tls, &channel, &events).await;
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
    events: &mpsc::UnboundedSender<ListenerEvent>,
) -> (bool, String) {
    let (client, mut connection) = match config.connect(tls.clone()).await {
        Ok(c) => c,
        Err(e) => return (false, crate::error::describe(&e)),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<String, String>>();
    // The connection must be polled for the client's LISTEN to complete, and
    // for notifications to arrive.
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
                    let _ = tx.send(Err(crate::error::describe(&e)));
                    return;
                }
                None => {
                    let _ = tx.send(Err("connection closed".into()));
                    return;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
            .await
            .map_err(|e| (false, crate::error::describe(&e)))?;
        if events.send(ListenerEvent::Connected).is_err() {
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
