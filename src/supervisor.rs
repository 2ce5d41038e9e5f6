//! Background work, supervised. Every task is named and spawned here; one that ends before
//! shutdown (it returns, fails or panics) ends the run with an error that names it, so nothing
//! fails silently while `/readyz` says ready. At shutdown, one cancellation token reaches every
//! task and the drain is bounded.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A task that ended while it should still have been running.
#[derive(Debug, thiserror::Error)]
#[error("the {task} task stopped unexpectedly: {detail}")]
pub struct TaskExited {
    pub task: &'static str,
    pub detail: String,
}

pub struct Supervisor {
    cancel: CancellationToken,
    tracker: TaskTracker,
    exits: mpsc::UnboundedSender<TaskExited>,
    exited: mpsc::UnboundedReceiver<TaskExited>,
}

impl Default for Supervisor {
    fn default() -> Self {
        let (exits, exited) = mpsc::unbounded_channel();
        Supervisor {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            exits,
            exited,
        }
    }
}

impl Supervisor {
    /// The token every task must stop on.
    pub fn cancel(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Spawns `task`, which runs until [`Supervisor::cancel`] fires. Its end before that, with
    /// `Ok` or `Err` or a panic, ends [`Supervisor::run`] with an error naming `name`.
    pub fn spawn<E: Display>(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let handle = tokio::spawn(async move { task.await.map_err(|err| err.to_string()) });
        let exits = self.exits.clone();
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            let detail = match handle.await {
                Ok(Ok(())) if cancel.is_cancelled() => return,
                Ok(Ok(())) => "it returned".to_owned(),
                Ok(Err(err)) => err,
                Err(err) if err.is_panic() => format!("it panicked: {}", panic_text(err)),
                Err(err) => err.to_string(),
            };
            tracing::error!(task = name, detail, "a background task stopped");
            let _ = exits.send(TaskExited { task: name, detail });
        });
    }

    /// As [`Supervisor::spawn`], for a task that cannot fail, only end.
    pub fn spawn_infallible(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Runs until `shutdown` completes (`Ok`) or a task ends (`Err` naming it), then cancels
    /// every task and waits up to `drain` for them to stop.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        drain: Duration,
    ) -> Result<(), TaskExited> {
        self.tracker.close();
        let result = tokio::select! {
            () = shutdown => Ok(()),
            Some(exit) = self.exited.recv() => Err(exit),
        };
        self.cancel.cancel();
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within {drain:?}");
        }
        result
    }
}

fn panic_text(err: tokio::task::JoinError) -> String {
    let payload = err.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAIN: Duration = Duration::from_secs(1);

    async fn until_cancelled(cancel: CancellationToken) -> Result<(), String> {
        cancel.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_task_that_returns_early_ends_the_run_naming_it() {
        let supervisor = Supervisor::default();
        supervisor.spawn("steady", until_cancelled(supervisor.cancel()));
        supervisor.spawn_infallible("pod watch", async {});
        let exit = supervisor
            .run(std::future::pending(), DRAIN)
            .await
            .expect_err("ended");
        assert_eq!(exit.task, "pod watch");
        assert_eq!(
            exit.to_string(),
            "the pod watch task stopped unexpectedly: it returned"
        );
    }

    #[tokio::test]
    async fn a_failing_task_ends_the_run_with_its_error() {
        let supervisor = Supervisor::default();
        supervisor.spawn("reconcile", async { Err::<(), _>("iptables is gone") });
        let exit = supervisor
            .run(std::future::pending(), DRAIN)
            .await
            .expect_err("ended");
        assert_eq!(exit.task, "reconcile");
        assert!(exit.detail.contains("iptables is gone"), "{exit}");
    }

    #[tokio::test]
    async fn a_panicking_task_ends_the_run_naming_it() {
        let supervisor = Supervisor::default();
        supervisor.spawn_infallible("event sender", async { panic!("boom") });
        let exit = supervisor
            .run(std::future::pending(), DRAIN)
            .await
            .expect_err("ended");
        assert_eq!(exit.task, "event sender");
        assert!(exit.detail.contains("panicked: boom"), "{exit}");
    }

    #[tokio::test]
    async fn shutdown_stops_every_task_cleanly() {
        let supervisor = Supervisor::default();
        let (stopped, mut stops) = mpsc::unbounded_channel();
        for name in ["a", "b"] {
            let (cancel, stopped) = (supervisor.cancel(), stopped.clone());
            supervisor.spawn(name, async move {
                cancel.cancelled().await;
                let _ = stopped.send(name);
                Ok::<(), String>(())
            });
        }
        supervisor
            .run(async {}, DRAIN)
            .await
            .expect("a clean shutdown");
        let mut seen = vec![stops.recv().await, stops.recv().await];
        seen.sort();
        assert_eq!(seen, [Some("a"), Some("b")]);
    }
}
