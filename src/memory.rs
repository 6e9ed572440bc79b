//! Giving freed memory back to the OS when the process goes quiet.
//!
//! mimalloc (the global allocator, see `main.rs`) returns freed pages to the
//! OS a while after they were freed (`purge_delay`, 1 s in mimalloc 3), but
//! it only does so from inside an allocator call. After a burst, such as
//! thousands of client connections closing at once, an idle gateway makes
//! none, and the pages stayed resident: 3,000 closed connections left about
//! 70 MB in RSS indefinitely (bench/RESULTS.md). Purging at once instead
//! (`MIMALLOC_PURGE_DELAY=0`) would cost a system call per freed page span
//! under load. [`Purger`] makes one cheap allocator call per second, which
//! runs the purges that are due; under load it changes nothing.

use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// How often due purges are run.
const EVERY: Duration = Duration::from_secs(1);

/// The background service that runs due purges.
pub struct Purger;

#[async_trait]
impl BackgroundService for Purger {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => collect(),
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// One non-forcing collection: frees this thread's retired pages and purges
/// (program wide) what has been free for longer than the purge delay.
pub fn collect() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread.
    unsafe { libmimalloc_sys::mi_collect(false) }
}
