//! The conversation with systemd (`sd_notify(3)`): `READY=1` once every listener is
//! bound, `RELOADING=1`/`READY=1` around a SIGHUP reload, `STOPPING=1` when the drain
//! begins, and the watchdog thread that sends `WATCHDOG=1` while every reactor still
//! answers (see [`crate::liveness`]).
//!
//! Nothing is sent when `NOTIFY_SOCKET` is unset, and no watchdog runs unless
//! `WATCHDOG_USEC` is set (for this process, when `WATCHDOG_PID` is set too). A failed
//! send is logged, never fatal: the gateway serves mail whether or not systemd listens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use sd_notify::NotifyState;
use tracing::{debug, info, warn};

use crate::liveness::Liveness;

fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

fn send(states: &[NotifyState]) {
    if !enabled() {
        return;
    }
    // Do not unset NOTIFY_SOCKET: the watchdog and the later states need it.
    match sd_notify::notify(false, states) {
        Ok(()) => FAILING.store(false, Ordering::Relaxed),
        // Once per run of failures: the watchdog would repeat it every period.
        Err(e) if !FAILING.swap(true, Ordering::Relaxed) => {
            warn!(error = %e, "sd_notify to NOTIFY_SOCKET failed")
        }
        Err(e) => debug!(error = %e, "sd_notify to NOTIFY_SOCKET failed again"),
    }
}

static FAILING: AtomicBool = AtomicBool::new(false);

/// Every listener is bound and the reactors accept; `status` is what `systemctl
/// status` shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A SIGHUP reload begins (with the monotonic time systemd 253+ wants beside it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is over, applied or refused: the gateway serves either way.
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The drain begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The watchdog interval systemd asked for, if it asked this process: `WATCHDOG_USEC`
/// set and non-zero, and `WATCHDOG_PID` unset or our pid (as `sd_watchdog_enabled(3)`
/// reads them).
pub fn watchdog_interval() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// The watchdog thread; stops when dropped.
pub struct Watchdog {
    stop: Option<Sender<()>>,
    reactors_stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts pinging every half `interval` while every reactor answers. Each period
    /// it checks the answers to the previous question, pings if all came, and asks
    /// again (which wakes each reactor once).
    pub fn start(interval: Duration, liveness: Arc<Liveness>) -> std::io::Result<Watchdog> {
        Self::start_with(interval, liveness, || send(&[NotifyState::Watchdog]))
    }

    /// [`Watchdog::start`] with `ping` in place of `WATCHDOG=1` (tests count pings).
    fn start_with(
        interval: Duration,
        liveness: Arc<Liveness>,
        ping: impl Fn() + Send + 'static,
    ) -> std::io::Result<Watchdog> {
        let period = interval / 2;
        let (stop, stopped) = bounded::<()>(0);
        let reactors_stopped = Arc::new(AtomicBool::new(false));
        let after_reactors = reactors_stopped.clone();
        let thread = std::thread::Builder::new()
            .name("smtpgw-watchdog".into())
            .spawn(move || {
                info!(
                    ?interval,
                    ?period,
                    "systemd watchdog on: pinging while every reactor answers"
                );
                liveness.ask();
                let mut silent_since: Option<usize> = None;
                loop {
                    match stopped.recv_timeout(period) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    // Once the drain is over the reactors are gone; what is left (the
                    // sink's flush) is bounded by its own timeout and by systemd's
                    // TimeoutStopSec, so the pings go on until the process exits.
                    let silent = if after_reactors.load(Ordering::Acquire) {
                        Vec::new()
                    } else {
                        liveness.silent()
                    };
                    if silent.is_empty() {
                        if silent_since.take().is_some() {
                            info!("every reactor answers again; watchdog pings resume");
                        }
                        ping();
                    } else {
                        let periods = silent_since.get_or_insert(0);
                        *periods += 1;
                        warn!(
                            reactors = ?silent,
                            silent_for = ?period * u32::try_from(*periods).unwrap_or(u32::MAX),
                            "reactor not answering; withholding the systemd watchdog ping"
                        );
                        // The question stands: a reactor that is merely slow answers it
                        // late; asking again would only wake the others.
                        continue;
                    }
                    liveness.ask();
                }
            })?;
        Ok(Watchdog {
            stop: Some(stop),
            reactors_stopped,
            thread: Some(thread),
        })
    }

    /// The reactors have ended (the drain is over): stop asking them.
    pub fn reactors_stopped(&self) {
        self.reactors_stopped.store(true, Ordering::Release);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                debug!("watchdog thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Weak;

    /// A reactor that answers when woken, while `alive`.
    struct Reactor {
        liveness: Weak<Liveness>,
        index: usize,
        alive: Arc<AtomicBool>,
    }

    impl crate::completion::Wake for Reactor {
        fn wake(&self) {
            if self.alive.load(Ordering::Acquire) {
                if let Some(l) = self.liveness.upgrade() {
                    l.answer(self.index);
                }
            }
        }
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn pings_only_while_every_reactor_answers() {
        let liveness = Arc::new(Liveness::new(2));
        let alive: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(true))).collect();
        liveness.set_wakers(
            (0..2)
                .map(|index| {
                    Box::new(Reactor {
                        liveness: Arc::downgrade(&liveness),
                        index,
                        alive: alive[index].clone(),
                    }) as Box<dyn crate::completion::Wake>
                })
                .collect(),
        );
        let pings = Arc::new(AtomicUsize::new(0));
        let counted = pings.clone();
        let watchdog =
            Watchdog::start_with(Duration::from_millis(40), liveness.clone(), move || {
                counted.fetch_add(1, Ordering::Relaxed);
            })
            .expect("watchdog thread");
        wait_until("pings while both answer", || {
            pings.load(Ordering::Relaxed) >= 3
        });

        // Reactor 1 hangs: once a ping already under way is out (no new one for 10
        // periods), no more.
        alive[1].store(false, Ordering::Release);
        let mut before = pings.load(Ordering::Relaxed);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(200));
            let now = pings.load(Ordering::Relaxed);
            if now == before {
                break;
            }
            before = now;
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            pings.load(Ordering::Relaxed),
            before,
            "pinged for a hung reactor"
        );

        // It recovers: its loop turns again and finds the wake-up it missed (a real
        // reactor's eventfd count or Notify permit), so it answers the question still
        // standing, and pings resume.
        alive[1].store(true, Ordering::Release);
        liveness.answer(1);
        wait_until("pings after recovery", || {
            pings.load(Ordering::Relaxed) >= before + 2
        });

        // After the reactors have stopped, the sink's flush is bounded by systemd's
        // TimeoutStopSec, not by the watchdog: pings go on.
        alive[0].store(false, Ordering::Release);
        alive[1].store(false, Ordering::Release);
        watchdog.reactors_stopped();
        let stopped = pings.load(Ordering::Relaxed);
        wait_until("pings after the reactors stopped", || {
            pings.load(Ordering::Relaxed) >= stopped + 2
        });
        drop(watchdog);
    }
}
