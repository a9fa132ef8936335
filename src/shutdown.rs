//! Signals: the first SIGTERM or SIGINT starts a graceful drain; a second one exits at once.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves at the first SIGTERM or SIGINT, and arms the second one to exit immediately.
pub async fn signalled() {
    wait_for_signal().await;
    tracing::info!("shutdown requested: draining in-flight jobs (signal again to exit at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now; unacked jobs will be redelivered");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
