//! Replicated mode: a replica follows the engagement stream into its online state, and a
//! check loop measures how far behind it is.
//!
//! **Follow.** On start the follower reads the stream from the beginning of the state window,
//! then keeps reading new messages; after any error (the server restarting, a lost connection)
//! it resumes after the last sequence it applied. Applying is idempotent by sequence, so a
//! redelivered message changes nothing.
//!
//! **Lag.** Every [`CHECK_EVERY`] the check asks the stream for its last sequence. Caught up
//! means the replica applied it; otherwise the lag is the age of the oldest message it has not
//! applied. The replica reports NOT_SERVING until it caught up once after start (its state
//! rebuilt) and whenever the lag exceeds `--max-lag-s`. With the server unreachable nothing
//! new can be recorded either, so the replica keeps serving what it has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_stream::{EventStream, Start, StreamError};
use tandem_types::clock::{now_unix, now_unix_ms};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::UserTower;

pub const CHECK_EVERY: Duration = Duration::from_millis(500);

/// Logs `what` at most every 10 s (a server that is down would otherwise flood the log).
struct Throttle(Option<Instant>);

impl Throttle {
    fn warn(&mut self, what: &str, e: &StreamError) {
        if self.0.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!(error = %e, "{what}");
            self.0 = Some(Instant::now());
        }
    }
}

/// The unix time the state window starts at, from now (taken once, at start).
pub fn window_start(core: &UserTower) -> i64 {
    let window = core
        .config()
        .nats
        .as_ref()
        .map_or(Duration::ZERO, |n| n.state_window);
    now_unix() - window.as_secs() as i64
}

/// Follows the stream into `core` from `window_start` (unix seconds) until `stop` changes.
pub async fn follow(
    core: Arc<UserTower>,
    stream: EventStream,
    window_start: i64,
    mut stop: watch::Receiver<bool>,
) {
    let mut throttle = Throttle(None);
    loop {
        let start = match core.applied() {
            0 => Start::Since(window_start),
            a => Start::After(a),
        };
        match stream.follow(start).await {
            Ok(messages) => {
                tokio::pin!(messages);
                loop {
                    let next = tokio::select! {
                        n = messages.next() => n,
                        _ = stop.changed() => return,
                    };
                    match next {
                        Some(Ok(d)) => {
                            core.apply(&d);
                            let delay = core.config().fault_apply_delay;
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                        }
                        Some(Err(StreamError::Corrupt { sequence, reason })) if sequence > 0 => {
                            // Not ours to fix and never decodable: pass over it, loudly.
                            tracing::error!(sequence, %reason, "skipping a stream message that is not engagement rows");
                            core.skip_to(sequence);
                        }
                        Some(Err(e)) => {
                            throttle.warn("engagement stream consumer failed; resuming", &e);
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => throttle.warn("cannot follow the engagement stream yet", &e),
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One replication check: updates the lag gauge and readiness. `window_start` is unix seconds.
pub async fn check(
    core: &UserTower,
    stream: &EventStream,
    window_start: i64,
) -> Result<(), StreamError> {
    let tail = stream.tail().await?;
    let applied = core.applied();
    if applied >= tail.last_sequence {
        core.set_replication(0.0, true);
        return Ok(());
    }
    let oldest_ms = match stream.published_ms(applied + 1).await? {
        Some(ms) => ms,
        // Gone (retention): the follower skips it as well.
        None => now_unix_ms(),
    };
    if applied == 0 && oldest_ms < window_start * 1000 {
        // Messages before the window are not this replica's to apply; if the newest is too,
        // there is nothing to rebuild.
        if let Some(last) = stream.published_ms(tail.last_sequence).await? {
            if last < window_start * 1000 {
                core.skip_to(tail.last_sequence);
                core.set_replication(0.0, true);
                return Ok(());
            }
        }
    }
    let lag = (now_unix_ms() - oldest_ms.max(window_start * 1000)).max(0) as f64 / 1000.0;
    core.set_replication(lag, false);
    Ok(())
}

/// Runs [`check`] every [`CHECK_EVERY`], calling `after` with the result, until `stop` changes.
pub async fn check_loop(
    core: Arc<UserTower>,
    stream: EventStream,
    window_start: i64,
    mut stop: watch::Receiver<bool>,
    after: impl Fn(&UserTower),
) {
    let mut throttle = Throttle(None);
    loop {
        if let Err(e) = check(&core, &stream, window_start).await {
            throttle.warn(
                "replication check failed (the replica keeps serving its state)",
                &e,
            );
        }
        after(&core);
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}
