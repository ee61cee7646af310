//! The sessions every request shares: at most `max` generations at once, each on a
//! [`Session`] of its own (arena and KV cache), kept afterwards with its cache so that a
//! conversation's next turn reuses the prefix it shares with the previous one. Requests beyond
//! the sessions wait in a queue of at most `max_queue` places, each for at most
//! `queue_timeout`; beyond either they get `503` with `Retry-After`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runtime::session::{Model, Session};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::api::{ApiError, ApiResult};

pub(super) struct Pool {
    pub(super) model: Model,
    pub(super) max: usize,
    max_queue: usize,
    queue_timeout: Duration,
    /// One permit a running generation.
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit.
    waiting: AtomicUsize,
    /// Sessions not in use, with their caches.
    idle: Mutex<Vec<Session>>,
}

/// What `/health` shows of the pool.
pub(super) struct PoolStatus {
    pub(super) busy: usize,
    pub(super) idle: usize,
    pub(super) waiting: usize,
}

impl Pool {
    pub(super) fn new(model: Model, max: usize, max_queue: usize, queue_timeout: Duration) -> Self {
        Pool {
            model,
            max,
            max_queue,
            queue_timeout,
            permits: Arc::new(Semaphore::new(max)),
            waiting: AtomicUsize::new(0),
            idle: Mutex::new(vec![]),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place to generate `prompt`, with the idle session whose cache shares the longest
    /// prefix with it (none: the lease opens a new one). Waits in the queue while every
    /// session is busy; a waiter whose request is dropped leaves the queue.
    pub(super) async fn take(self: &Arc<Self>, prompt: &[u32]) -> ApiResult<Lease> {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let retry = self.queue_timeout.as_secs().clamp(1, 60) as u32;
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(ApiError::busy("the server is busy: every session and queue place is taken", retry));
                }
                let _waiting = Waiting(&self.waiting);
                match tokio::time::timeout(self.queue_timeout, Arc::clone(&self.permits).acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(ApiError::busy(
                            format!(
                                "the server is busy: no session became free within {} s",
                                self.queue_timeout.as_secs_f64()
                            ),
                            retry,
                        ))
                    }
                }
            }
        };
        let session = {
            let mut idle = self.idle();
            let shared = |s: &Session| s.cached_tokens().iter().zip(prompt).take_while(|(a, b)| a == b).count();
            let best = (0..idle.len()).max_by_key(|&i| shared(&idle[i]));
            best.map(|i| idle.swap_remove(i))
        };
        Ok(Lease { pool: Arc::clone(self), session, _permit: permit })
    }

    pub(super) fn status(&self) -> PoolStatus {
        PoolStatus {
            busy: self.max - self.permits.available_permits(),
            idle: self.idle().len(),
            waiting: self.waiting.load(Ordering::Acquire),
        }
    }
}

/// Leaves the queue when dropped (also when the waiting request is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in the pool and its session, given back when dropped; a generation that panicked
/// gives back only its place (its session's state is unknown).
pub(super) struct Lease {
    pool: Arc<Pool>,
    session: Option<Session>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    /// The session, opened now if the pool had none idle (blocking: call off the async
    /// threads).
    pub(super) fn session(&mut self) -> ApiResult<&mut Session> {
        if self.session.is_none() {
            let fresh = Session::new(&self.pool.model)
                .map_err(|e| ApiError::new(500, "server_error", format!("cannot open a session: {e}")))?;
            self.session = Some(fresh);
        }
        Ok(self.session.as_mut().expect("set above"))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Some(s) = self.session.take() {
            self.pool.idle().push(s);
        }
        // The permit is released after the session is back, so the next taker can reuse it.
    }
}
