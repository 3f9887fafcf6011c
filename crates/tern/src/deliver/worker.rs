//! The thread that does the blocking part of local delivery (spool reads,
//! Maildir writes and their syncs), at a lower CPU priority than the rest
//! of Tern.
//!
//! Why a thread of its own at a lower priority: an SMTP session is
//! latency-bound (each reply a client waits for needs a CPU at once), while
//! a delivery batch is throughput work that only gets fuller, and cheaper
//! per message, when it waits. Without it, a batch's CPU time lengthens
//! every session's round trips on a busy machine. A nice value of
//! [`DELIVERY_NICE`] still leaves delivery every idle cycle and about a
//! tenth of a contended CPU, so it keeps draining under load. The priority
//! is set on this thread only: tokio's blocking pool is shared, and an
//! unprivileged thread cannot raise its priority again once lowered.
//!
//! The server starts it before the async runtime, right after the drop
//! from root (`server::prepare`): it is then the only thread that holds the
//! mailbox capabilities (see `privileges`).
//!
//! Invariants: jobs run one at a time, in submission order. A job that
//! panics fails only itself (its caller gets an error); the thread goes on.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use tokio::sync::oneshot;
use tracing::debug;

/// Nice value of the delivery thread (0 is the default; 19 the lowest).
pub const DELIVERY_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Handle to the delivery thread; the thread ends when the handle is dropped.
pub struct DeliveryThread {
    jobs: mpsc::Sender<Job>,
}

impl DeliveryThread {
    pub fn start(nice: i32) -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tern-deliver".into())
            .spawn(move || {
                lower_priority(nice);
                // The only thread with the mailbox capabilities in force
                // (when the configuration keeps any; see `privileges`).
                crate::privileges::enter_delivery_thread();
                while let Ok(job) = rx.recv() {
                    // The job's result sender is dropped by the unwind, which
                    // is how its caller learns of the failure.
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })?;
        Ok(DeliveryThread { jobs })
    }

    /// Runs `work` on the delivery thread and waits for its result.
    pub async fn run<T, F>(&self, work: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs
            .send(job)
            .map_err(|_| "the delivery thread has stopped".to_string())?;
        result
            .await
            .map_err(|_| "the delivery job failed (panicked)".to_string())
    }
}

/// Lowers the calling thread's CPU priority; a refusal (e.g. a seccomp
/// filter) only costs the latency benefit, so it is logged and ignored.
fn lower_priority(nice: i32) {
    // SAFETY: gettid has no preconditions; setpriority with PRIO_PROCESS
    // and a thread id changes only that thread's nice value.
    let ok = unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0
    };
    if !ok {
        debug!(event = "delivery.priority_unchanged", nice, error = %io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread's own nice value, from /proc (the field after the command).
    fn nice_of_current_thread() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        // Fields after the command: state(3) ... priority(18) nice(19).
        after_comm.split(' ').nth(19 - 3).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn runs_jobs_in_order_at_the_lower_priority() {
        let worker = DeliveryThread::start(DELIVERY_NICE).unwrap();
        let first = worker.run(|| 1 + 1).await.unwrap();
        let (second, nice) = worker
            .run(|| {
                (
                    std::thread::current().name().map(str::to_owned),
                    nice_of_current_thread(),
                )
            })
            .await
            .unwrap();
        assert_eq!(first, 2);
        assert_eq!(second.as_deref(), Some("tern-deliver"));
        assert_eq!(nice, DELIVERY_NICE);
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_thread_goes_on() {
        let worker = DeliveryThread::start(0).unwrap();
        let failed = worker.run(|| -> u32 { panic!("a bug in one batch") }).await;
        assert!(failed.unwrap_err().contains("panicked"));
        assert_eq!(worker.run(|| 7).await.unwrap(), 7);
    }
}
