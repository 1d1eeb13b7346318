//! Waiting for the process to be told to stop.

use tokio::signal::unix::{signal, SignalKind};

/// Completes on the first SIGTERM or SIGINT.
pub async fn terminated() {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("received SIGTERM"),
                _ = int.recv() => tracing::info!("received SIGINT"),
            }
        }
        (Err(err), _) | (_, Err(err)) => {
            // Without signal handlers the process can still be killed; it just cannot drain.
            tracing::error!(error = %err, "cannot listen for SIGTERM/SIGINT");
            std::future::pending::<()>().await;
        }
    }
}

/// A token cancelled on the first SIGTERM or SIGINT: the example apps' whole shutdown.
pub fn stop_on_terminate() -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            terminated().await;
            stop.cancel();
        }
    });
    stop
}
