//! The io_uring backend: `--reactors` threads, each pinned to a CPU with its own ring,
//! its own SO_REUSEPORT listener, its own buffers and its own sink completion queue.
//! It moves bytes between sockets and connection drivers and makes no protocol
//! decision; all `unsafe` of the gateway lives in this module.
//!
//! # Who owns which memory while the kernel may use it
//!
//! - **Receive buffers** belong to the reactor's provided-buffer ring ([`ring::BufRing`]).
//!   From the moment a buffer is published at the ring's tail the kernel owns it; a
//!   receive completion names the buffer and the byte range the kernel filled, which
//!   the reactor hands to the driver at once (the driver copies what it keeps), then
//!   gives the buffer back in the same turn. With incremental consumption
//!   (`IOU_PBUF_RING_INC`) the kernel keeps filling the rest of a buffer after the
//!   range it reported (`IORING_CQE_F_BUF_MORE`); only the reported range is read. An
//!   idle connection holds no receive buffer.
//! - **Send buffers** come from a per-reactor pool ([`ring::SendPool`]): the driver's
//!   pending output is copied into one when the send is submitted, because the driver
//!   keeps appending replies and the kernel may read the bytes at any time until the
//!   send completes. The connection holds the buffer until that completion returns it;
//!   a send linked to the receive queued after it (`IOSQE_IO_LINK`, no completion of
//!   its own when it succeeds) is complete when that receive's completion comes.
//! - **The eventfd read target** is a boxed `u64` of the reactor, read only after the
//!   read's completion.
//!
//! # What happens to in-flight operations when a connection closes
//!
//! When the driver says `Done` (or a send fails), the reactor cancels every operation
//! on the descriptor (`ASYNC_CANCEL` by fd, all) and keeps the descriptor open and the
//! slot occupied until the receive's final completion and the send's completion have
//! come back; receive buffers they carry are recycled as usual. Only then is the
//! descriptor closed (so its number cannot be reused under an operation still
//! queued) and the slot freed with a new generation. Every completion carries slot and
//! generation in its `user_data`, and so does every sink ticket: anything that arrives
//! for an older generation is dropped. At reactor exit every operation is cancelled and
//! reaped before the buffers are freed; if the kernel does not give them all back in
//! time the buffers are leaked instead.

mod reactor;
pub(crate) mod ring;

use std::io;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use tracing::{info, warn};

use crate::completion::{CompletionQueue, Wake};
use crate::net::{bind_all, NetError, Phase, ReactorParams, ReactorShared};
use ring::EventFd;

/// The receive-buffer ring of each reactor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    /// Use incremental consumption (`IOU_PBUF_RING_INC`) if the kernel has it.
    pub incremental: bool,
    /// Count (a power of two) and size of incremental buffers: shared by whatever
    /// receives come, so many small reads pack into one buffer.
    pub inc_bufs: (u16, u32),
    /// The same for classic buffers, where each receive takes a whole one.
    pub classic_bufs: (u16, u32),
    /// Multishot receives. Off by default: the kernel's multishot retry loop posts up
    /// to 32 completions per wake-up, and a cancellation cannot stop the ones already
    /// under way, so a client that keeps sending into a paused session (never reading
    /// its replies, or a body over the budget) lands up to 32 x 16 KiB in the driver,
    /// past its cap on pending input (256 KiB): the connection is then dropped as an
    /// overrun (before the host held no input outside the driver, this backend kept
    /// such bytes aside: measured 476 KiB per never-reading client). A single-shot
    /// receive with a
    /// provided buffer also holds no buffer while idle, is re-armed in the same
    /// batched submit, and brings at most one completion after a pause.
    pub multishot_recv: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            incremental: true,
            // 512 KiB per reactor, resident once used (a fixed cost, not per
            // connection): small reads pack into a buffer, body reads take up to 32 KiB.
            inc_bufs: (16, 32 * 1024),
            classic_bufs: (128, 16 * 1024),
            multishot_recv: false,
        }
    }
}

/// Wakes a reactor: a sink answer was queued or the phase moved.
struct Waker(Arc<EventFd>);

impl Wake for Waker {
    fn wake(&self) {
        self.0.wake();
    }
}

/// The running io_uring reactors.
pub struct Reactors {
    local_addr: SocketAddr,
    pub(in crate::net) shared: Arc<ReactorShared>,
    phase: Arc<PhaseCell>,
    /// How often a receive found the buffer ring empty (ENOBUFS), for tests and logs.
    buffers_exhausted: Arc<std::sync::atomic::AtomicU64>,
    wakers: Vec<Arc<EventFd>>,
    threads: Vec<JoinHandle<()>>,
}

/// The run phase, read by the reactors when their eventfd fires.
#[derive(Default)]
struct PhaseCell(std::sync::atomic::AtomicU8);

impl PhaseCell {
    fn get(&self) -> Phase {
        match self.0.load(std::sync::atomic::Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Stop,
        }
    }
}

impl Reactors {
    /// Binds every listener, then starts the reactor threads and waits until each has
    /// built its ring, so a failure is reported here, before anything is served.
    pub fn start(p: ReactorParams) -> Result<Reactors, NetError> {
        Self::start_tuned(p, Tuning::default())
    }

    /// [`Reactors::start`] with a chosen receive-buffer geometry (tests use tiny rings
    /// to exercise buffer exhaustion).
    pub(crate) fn start_tuned(p: ReactorParams, tuning: Tuning) -> Result<Reactors, NetError> {
        let reactors = p.reactors.max(1);
        // Every listener (--listen, --listen-tls) on every reactor, each with its edge.
        let (addrs, listeners) = bind_all(&p, reactors)?;
        let local_addr = addrs[0];
        let shared = ReactorShared::new(&p);
        let phase = Arc::new(PhaseCell::default());
        let buffers_exhausted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let pin_cpus = p.pin_cpus;
        let mut threads = Vec::with_capacity(reactors);
        let mut wakers = Vec::with_capacity(reactors);
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<(ring::SetupKind, bool)>>();
        for (i, listeners) in listeners.into_iter().enumerate() {
            let event = Arc::new(EventFd::new().map_err(NetError::Reactor)?);
            wakers.push(event.clone());
            let queue = CompletionQueue::new(Box::new(Waker(event.clone())));
            let shared = shared.clone();
            let metrics = shared.metrics.reactor(i);
            let ready = ready_tx.clone();
            let phase = phase.clone();
            let exhausted = buffers_exhausted.clone();
            let handle = std::thread::Builder::new()
                .name(format!("smtpgw-uring-{i}"))
                .spawn(move || {
                    if pin_cpus {
                        if let Err(e) = ring::pin_to_cpu(i) {
                            warn!(reactor = i, error = %e, "cannot pin reactor thread to a CPU");
                        }
                    }
                    let parts = reactor::Parts {
                        index: i,
                        listeners,
                        shared,
                        event,
                        queue,
                        metrics,
                        phase,
                        tuning,
                        exhausted,
                    };
                    match reactor::Reactor::new(parts) {
                        Ok((r, setup, inc)) => {
                            let _ = ready.send(Ok((setup, inc)));
                            r.run();
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })
                .map_err(NetError::Reactor)?;
            threads.push(handle);
        }
        drop(ready_tx);
        shared.liveness.set_wakers(
            wakers
                .iter()
                .map(|w| Box::new(Waker(w.clone())) as Box<dyn Wake>)
                .collect(),
        );
        let mut setup = ("", false);
        let mut failure = None;
        for _ in 0..reactors {
            match ready_rx.recv() {
                Ok(Ok(s)) => setup = s,
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some(io::Error::other("reactor thread ended")),
            }
        }
        let r = Reactors {
            local_addr,
            shared,
            phase,
            buffers_exhausted,
            wakers,
            threads,
        };
        if let Some(e) = failure {
            r.stop();
            return Err(NetError::Reactor(e));
        }
        // Ready before the line that says so: tests and scripts act on it at once.
        r.shared.metrics.set_io_backend("uring");
        r.shared.metrics.set_listening();
        for (spec, addr) in p.listeners.iter().zip(&addrs) {
            info!(
                addr = %addr,
                kind = ?spec.kind,
                reactors,
                backend = %"uring",
                ring_setup = %setup.0,
                incremental_buffers = setup.1,
                pinned_to_cpus = pin_cpus,
                "listening"
            );
        }
        Ok(r)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Moves every reactor to `phase` (it only ever moves forward) and wakes them.
    pub fn set_phase(&self, phase: Phase) {
        let v = match phase {
            Phase::Running => 0,
            Phase::Draining => 1,
            Phase::Stop => 2,
        };
        self.phase
            .0
            .fetch_max(v, std::sync::atomic::Ordering::AcqRel);
        for w in &self.wakers {
            w.wake();
        }
    }

    /// Every remaining connection gets its `421`; waits for the reactor threads to end.
    pub fn stop(self) {
        self.set_phase(Phase::Stop);
        for t in self.threads {
            if t.join().is_err() {
                warn!("a reactor thread panicked");
            }
        }
        let exhausted = self
            .buffers_exhausted
            .load(std::sync::atomic::Ordering::Relaxed);
        if exhausted > 0 {
            // Not an error (the data waited in the socket), but a sign the ring is small
            // for this load.
            info!(
                times = exhausted,
                "receives found the buffer ring empty and were re-armed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;
    use crate::net::contract_tests::{
        connect, params, read_line, read_to_close, wait_for_no_connections,
    };
    use crate::sink::null::NullSink;

    fn start_tuned(max_connections: usize, idle: Duration, tuning: Tuning) -> Reactors {
        Reactors::start_tuned(
            params(Arc::new(NullSink::new()), max_connections, idle),
            tuning,
        )
        .expect("reactors start")
    }

    /// More connections send at once than the buffer ring has buffers: receives hit
    /// ENOBUFS, are re-armed, and no byte is lost.
    fn buffer_exhaustion_loses_nothing(incremental: bool, multishot: bool) {
        let r = start_tuned(
            5000,
            Duration::from_secs(60),
            Tuning {
                incremental,
                inc_bufs: (2, 4096),
                classic_bufs: (4, 1024),
                multishot_recv: multishot,
            },
        );
        let n = 300;
        let mut conns: Vec<TcpStream> = (0..n).map(|_| connect(&r)).collect();
        for c in &mut conns {
            assert!(read_line(c).starts_with("220 "));
        }
        let msg: Vec<u8> = b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'x', 6000))
            .chain(b"\r\n.\r\nQUIT\r\n".iter().copied())
            .collect();
        for c in &mut conns {
            c.write_all(&msg).unwrap();
        }
        for c in &mut conns {
            let text = read_to_close(c);
            assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
            assert!(text.ends_with("closing connection\r\n"), "{text}");
        }
        drop(conns);
        wait_for_no_connections(&r);
        assert!(
            r.buffers_exhausted
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0,
            "ENOBUFS never happened"
        );
        r.stop();
    }

    #[test]
    fn buffer_exhaustion_loses_nothing_classic() {
        buffer_exhaustion_loses_nothing(false, false);
    }

    #[test]
    fn buffer_exhaustion_loses_nothing_incremental() {
        buffer_exhaustion_loses_nothing(true, false);
    }

    #[test]
    fn buffer_exhaustion_loses_nothing_multishot() {
        buffer_exhaustion_loses_nothing(true, true);
    }
}
