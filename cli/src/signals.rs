//! Stopping on SIGTERM, SIGINT or SIGHUP (the agent, `trace`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};

/// A flag raised at SIGTERM, SIGINT or SIGHUP, which a thread of its own waits for.
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    // Blocked before any other thread starts, so every thread inherits the mask and the
    // waiter alone receives them.
    signals.thread_block().context("blocking signals")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            tracing::info!("stopping on {signal}");
        }
        flag.store(true, Ordering::SeqCst);
    });
    Ok(stop)
}
