//! Draining on graceful upgrade and shutdown. After a SIGQUIT, Pingora hands
//! the listening sockets to the new process and both accept for 5 s; then the
//! old one drops every idle keep-alive connection at once, racing any client
//! that is just sending on one. So once an upgrade or a shutdown begins,
//! answers carry `Connection: close`: keep-alive clients move to fresh
//! connections (taken by the new process) while both still accept. (A fresh
//! connection accepted just before a process stops accepting is the other
//! half: `listeners` binds with `TCP_DEFER_ACCEPT` so that it already holds
//! its request.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::sync::broadcast;

/// Set once the process has begun handing over or shutting down.
#[derive(Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Watches Pingora's execution phases and sets [`Draining`].
pub struct PhaseWatch {
    rx: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    draining: Draining,
}

impl PhaseWatch {
    /// `rx` from `Server::watch_execution_phase`, taken before `run_forever`.
    pub fn new(rx: broadcast::Receiver<ExecutionPhase>, draining: Draining) -> Self {
        PhaseWatch {
            rx: Mutex::new(Some(rx)),
            draining,
        }
    }
}

#[async_trait]
impl BackgroundService for PhaseWatch {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        loop {
            match rx.recv().await {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulUpgradeCloseTimeout
                    | ExecutionPhase::GracefulTerminate
                    | ExecutionPhase::ShutdownStarted,
                ) => {
                    log::info!("draining: answers now close their connections");
                    self.draining.0.store(true, Ordering::Relaxed);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
