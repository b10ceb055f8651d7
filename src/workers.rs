//! A pool of threads for calls that may block (disk, network), for hosts whose own
//! threads must not: the Erlang NIF hands every disk or etcd call to one and replies by
//! message.
//!
//! Invariants:
//! - A submitted job never waits for a busy worker while the pool is below its limit:
//!   the pool starts a thread when fewer are idle than jobs are queued. Concurrent
//!   writers therefore reach the store together (and share its commits) instead of
//!   queueing behind one another.
//! - A panicking job does not take its thread or the pool down (the job is expected to
//!   report its own failure; see the example).
//! - Idle threads exit after [`WorkerPool::new`]'s `idle_exit`; a pool at rest holds none.
//!
//! # Examples
//! ```
//! use std::sync::mpsc;
//! use std::time::Duration;
//! use erlmcp_rollout::workers::WorkerPool;
//! static POOL: WorkerPool = WorkerPool::new("example_io", 8, Duration::from_secs(60));
//! let (tx, rx) = mpsc::channel();
//! POOL.submit(Box::new(move || tx.send(6 * 7).unwrap())).unwrap();
//! assert_eq!(rx.recv().unwrap(), 42);
//! ```

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// A unit of work for a [`WorkerPool`].
pub type Job = Box<dyn FnOnce() + Send>;

/// Threads that run blocking jobs; grows on demand up to a limit. See the
/// [module documentation](self).
pub struct WorkerPool {
    name: &'static str,
    max_threads: usize,
    idle_exit: Duration,
    state: Mutex<PoolState>,
    ready: Condvar,
}

struct PoolState {
    queue: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

impl WorkerPool {
    /// A pool whose threads are named `name`, at most `max_threads` of them (at least
    /// one), each exiting after `idle_exit` without work. `const`, for a `static`.
    pub const fn new(name: &'static str, max_threads: usize, idle_exit: Duration) -> WorkerPool {
        WorkerPool {
            name,
            max_threads: if max_threads == 0 { 1 } else { max_threads },
            idle_exit,
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                idle: 0,
                threads: 0,
            }),
            ready: Condvar::new(),
        }
    }

    /// Queues `job`; starts a thread for it when none is idle and the limit allows.
    ///
    /// # Errors
    /// When the pool has no thread and the system refuses to start one: the job is
    /// not queued (and not run); the message says why.
    pub fn submit(&'static self, job: Job) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.queue.push_back(job);
        if st.idle < st.queue.len() && st.threads < self.max_threads {
            let spawned = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || self.work());
            match spawned {
                Ok(_) => st.threads += 1,
                Err(e) if st.threads == 0 => {
                    st.queue.pop_back();
                    return Err(format!("cannot start a {} worker thread: {e}", self.name));
                }
                // Some worker exists and will get to it.
                Err(_) => {}
            }
        }
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Threads running now (busy or idle).
    pub fn threads(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).threads
    }

    fn work(&'static self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                let _ = catch_unwind(AssertUnwindSafe(job));
                st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.idle += 1;
            let (next, timeout) = self
                .ready
                .wait_timeout(st, self.idle_exit)
                .unwrap_or_else(PoisonError::into_inner);
            st = next;
            st.idle -= 1;
            if timeout.timed_out() && st.queue.is_empty() {
                st.threads -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc, Barrier};

    #[test]
    fn blocked_jobs_do_not_hold_back_later_ones_up_to_the_limit() {
        static POOL: WorkerPool = WorkerPool::new("t_grow", 16, Duration::from_secs(5));
        // Eight jobs that can only finish together: each needs a thread of its own.
        let barrier = Arc::new(Barrier::new(8));
        let (tx, rx) = mpsc::channel();
        for i in 0..8 {
            let (b, tx) = (Arc::clone(&barrier), tx.clone());
            POOL.submit(Box::new(move || {
                b.wait();
                tx.send(i).unwrap();
            }))
            .unwrap();
        }
        let mut got: Vec<i32> = (0..8)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
        assert!(POOL.threads() >= 8 && POOL.threads() <= 16, "{}", POOL.threads());
    }

    #[test]
    fn the_limit_queues_jobs_and_a_panic_keeps_the_thread() {
        static POOL: WorkerPool = WorkerPool::new("t_limit", 1, Duration::from_secs(5));
        let (tx, rx) = mpsc::channel();
        POOL.submit(Box::new(|| panic!("a job that panics"))).unwrap();
        for i in 0..5 {
            let tx = tx.clone();
            POOL.submit(Box::new(move || tx.send(i).unwrap())).unwrap();
        }
        let got: Vec<i32> = (0..5)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        // One thread: the jobs ran in order, after the panic.
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(POOL.threads(), 1);
    }

    #[test]
    fn idle_threads_exit() {
        static POOL: WorkerPool = WorkerPool::new("t_idle", 4, Duration::from_millis(50));
        let (tx, rx) = mpsc::channel();
        POOL.submit(Box::new(move || tx.send(()).unwrap())).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while POOL.threads() > 0 {
            assert!(std::time::Instant::now() < deadline, "a thread stayed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
