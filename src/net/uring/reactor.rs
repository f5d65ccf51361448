//! One io_uring reactor: the loop that turns completions into driver calls and driver
//! output into submissions. One thread, one ring, one socket per listener (`--listen`,
//! `--listen-tls`), each accepted connection given its listener's edge settings; no
//! protocol decisions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd};
use io_uring::{cqueue, opcode, squeue, IoUring};
use socket2::SockRef;
use tracing::{debug, warn};

use super::ring::{self, BufRing, EventFd, SendBuf, SendPool};
use super::PhaseCell;
use crate::completion::{CompletionQueue, Ticket};
use crate::conn::Edge;
use crate::metrics::{ReactorMetrics, FLUSH_INTERVAL};
use crate::net::host::{self, Entry, Host, GEN_MASK, STOP_WAIT};
use crate::net::{accept_exhausted, Phase, ReactorShared, ACCEPT_BACKOFF};

/// What a completion is about: the top byte of `user_data`. Connection operations carry
/// the slot (low 32 bits) and its generation (24 bits) too.
const OP_ACCEPT: u64 = 1;
const OP_EVENT: u64 = 2;
const OP_RECV: u64 = 3;
const OP_SEND: u64 = 4;
/// Cancellations: their own completions carry nothing we need.
const OP_CANCEL: u64 = 5;

fn user_data(op: u64, slot: u32, gen: u32) -> u64 {
    (op << 56) | (u64::from(gen & GEN_MASK) << 32) | u64::from(slot)
}

fn split(ud: u64) -> (u64, u32, u32) {
    (ud >> 56, ((ud >> 32) as u32) & GEN_MASK, ud as u32)
}

/// The provided-buffer group every receive of this ring selects from.
const BGID: u16 = 0;
/// With multishot receives: the most one completion carries. The kernel's retry loop
/// can still post a few dozen of them in one wake-up after the driver paused.
const RECV_CHUNK: u32 = 16 * 1024;
/// With single-shot receives: the most one body read takes (the driver's hint between
/// commands is smaller).
const BODY_READ: usize = 64 * 1024;
/// How long the stop phase waits for the kernel to hand back every operation.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recv {
    /// No receive armed: idle of input on purpose (`wants_read` false) or ENOBUFS.
    Off,
    Armed,
    /// A cancel was submitted; the final completion has not come yet.
    Cancelling,
}

/// What this backend keeps beside each driver the [`Host`] owns.
struct Conn {
    fd: OwnedFd,
    peer: SocketAddr,
    recv: Recv,
    /// The buffer of the one send in flight, if any; the kernel reads it until the
    /// send's completion.
    send: Option<SendBuf>,
    /// The send in flight is linked to the receive armed behind it and has no
    /// completion of its own when it succeeds (see `Reactor::link_sends`).
    linked: Option<Linked>,
    /// The deadline this connection has in the timer heap (the earliest, if several).
    timer: Option<Instant>,
    /// Queued in `dirty` for this turn's flush.
    dirty: bool,
    /// Bytes arrived while the driver did not want any: the client keeps sending into
    /// a paused session, so a receive kept posted (`Next::keep_posted_read`) is
    /// cancelled and TCP pushes back. The bytes themselves went to the driver, whose
    /// cap on pending input leaves room for a receive already posted.
    data_while_paused: bool,
    /// `shutdown(SHUT_WR)` done.
    shut: bool,
    /// Done: waiting for the kernel to return the receive and the send before the
    /// descriptor is closed and the slot reused.
    closing: bool,
}

/// A send linked to the receive after it. The driver was told its bytes were
/// written when it was queued: a send that goes out whole says nothing, and the
/// driver's clocks (idle, write stall) must not take the reply for unsent.
#[derive(Clone, Copy, Debug)]
struct Linked {
    /// The receive behind it was cancelled, because the driver has more to say and the
    /// one send slot is held until one of the pair's completions comes (see
    /// `process`).
    cancelled: bool,
}

/// One of the reactor's listening sockets; its accept's `user_data` carries its index.
struct Listener {
    /// `None` once the accept was cancelled and its final completion came back.
    sock: Option<TcpListener>,
    /// What every connection accepted here gets (`Connection::new`'s last argument).
    edge: Arc<Edge>,
    armed: bool,
}

/// Everything a reactor thread starts from.
pub(super) struct Parts {
    pub index: usize,
    pub listeners: Vec<(TcpListener, Arc<Edge>)>,
    pub shared: Arc<ReactorShared>,
    pub event: Arc<EventFd>,
    pub queue: Arc<CompletionQueue>,
    pub metrics: ReactorMetrics,
    pub phase: Arc<PhaseCell>,
    pub tuning: super::Tuning,
    pub exhausted: Arc<std::sync::atomic::AtomicU64>,
}

pub(super) struct Reactor {
    /// First field: dropped before the memory it may still point into.
    ring: IoUring,
    bufs: Option<BufRing>,
    sends: Option<SendPool>,
    /// The connections and everything about them that is not I/O.
    host: Host<Conn>,
    dirty: Vec<u32>,
    /// The other half of `dirty`'s double buffer.
    spare: Vec<u32>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    listeners: Vec<Listener>,
    accept_retry: Option<Instant>,
    event: Arc<EventFd>,
    /// The eventfd read's 8-byte target; boxed so it does not move while the kernel
    /// may write it.
    event_buf: Box<u64>,
    event_armed: bool,
    cqes: Vec<(u64, i32, u32)>,
    shared: Arc<ReactorShared>,
    next_flush: Instant,
    busy: Duration,
    /// Operations whose final completion has not been reaped (accept, eventfd read,
    /// receives, sends): the kernel may still touch our memory while this is non-zero.
    inflight: usize,
    phase_cell: Arc<PhaseCell>,
    /// Multishot receives (one request for many completions) rather than one receive
    /// per completion; see `Tuning::multishot_recv`.
    multishot: bool,
    /// A send queued in the same turn as the receive after it goes first, linked to
    /// it (`IOSQE_IO_LINK`), whole (`MSG_WAITALL`) and with no completion when it
    /// succeeds (`IOSQE_CQE_SKIP_SUCCESS`). Its own completion would come back at
    /// once, as the socket takes a reply's bytes inline, and end the loop's wait
    /// before the client has answered: a lock-step round trip took two
    /// `io_uring_enter`, now one. A send that fails still completes, and the receive
    /// behind it then posts nothing. Single-shot receives only, on kernels with
    /// `IORING_FEAT_CQE_SKIP` (5.17).
    link_sends: bool,
    exhausted: Arc<std::sync::atomic::AtomicU64>,
    stop_at: Option<Instant>,
    index: usize,
}

impl Reactor {
    /// Builds the ring and its buffers on the calling (reactor) thread.
    pub(super) fn new(p: Parts) -> io::Result<(Reactor, ring::SetupKind, bool)> {
        let (ring, setup) = ring::build_ring(4096, 32768)?;
        let t = p.tuning;
        let bufs = BufRing::new(&ring, BGID, t.inc_bufs, t.classic_bufs, t.incremental)?;
        let inc = bufs.incremental;
        let link_sends = !t.multishot_recv && ring.params().is_feature_skip_cqe_on_success();
        let now = Instant::now();
        Ok((
            Reactor {
                ring,
                bufs: Some(bufs),
                sends: Some(SendPool::default()),
                host: Host::new(p.shared.clone(), p.queue, p.metrics),
                dirty: Vec::with_capacity(1024),
                spare: Vec::with_capacity(1024),
                timers: BinaryHeap::with_capacity(1024),
                listeners: p
                    .listeners
                    .into_iter()
                    .map(|(sock, edge)| Listener {
                        sock: Some(sock),
                        edge,
                        armed: false,
                    })
                    .collect(),
                accept_retry: None,
                event: p.event,
                event_buf: Box::new(0),
                event_armed: false,
                cqes: Vec::with_capacity(4096),
                shared: p.shared,
                next_flush: now + FLUSH_INTERVAL,
                busy: Duration::ZERO,
                inflight: 0,
                phase_cell: p.phase,
                multishot: t.multishot_recv,
                link_sends,
                exhausted: p.exhausted,
                stop_at: None,
                index: p.index,
            },
            setup,
            inc,
        ))
    }

    /// Runs until the stop phase has closed every connection.
    pub(super) fn run(mut self) {
        if let Err(e) = self.serve() {
            warn!(reactor = self.index, error = %e, "io_uring reactor failed; its connections are dropped");
        }
        self.teardown();
        crate::logging::flush_this_thread();
    }

    fn serve(&mut self) -> io::Result<()> {
        crate::logging::batch_this_thread();
        let mut now = Instant::now();
        loop {
            self.arm_fixed(now)?;
            if self.finished(now) {
                return Ok(());
            }
            self.bufs_publish();
            let wait = self
                .next_wake(now)
                .map(|t| t.saturating_duration_since(now));
            let before_wait = Instant::now();
            self.busy += before_wait.saturating_duration_since(now);
            // This turn's log lines go to the writer as one batch.
            crate::logging::flush_this_thread();
            ring::submit_and_wait(&mut self.ring, wait)?;
            now = Instant::now();

            self.reap();
            for i in 0..self.cqes.len() {
                let (ud, res, flags) = self.cqes[i];
                self.complete(now, ud, res, flags);
            }
            self.check_phase(now);
            // Any turn of the loop answers the watchdog; its question wakes us through
            // the eventfd like a sink answer.
            self.shared.liveness.answer(self.index);
            self.expire(now);
            self.flush(now)?;
            if now >= self.next_flush {
                self.flush_metrics(now);
            }
        }
    }

    /// Copies the completion queue into `cqes` (so handling them may queue
    /// submissions) and frees its slots for the kernel.
    fn reap(&mut self) {
        self.cqes.clear();
        self.cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }

    /// Keeps every listener's accept and the eventfd read armed.
    fn arm_fixed(&mut self, now: Instant) -> io::Result<()> {
        if !self.event_armed {
            let buf: *mut u64 = &mut *self.event_buf;
            let e = opcode::Read::new(Fd(self.event.raw()), buf.cast(), 8)
                .build()
                .user_data(user_data(OP_EVENT, 0, 0));
            // SAFETY: `event_buf` is boxed, lives as long as the reactor and is read by
            // us only after this read's completion.
            unsafe { ring::push(&mut self.ring, &e)? };
            self.event_armed = true;
            self.inflight += 1;
        }
        let retry_due = self.accept_retry.is_none_or(|t| now >= t);
        if !retry_due || self.host.phase() != Phase::Running {
            return Ok(());
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let Some(sock) = &l.sock else { continue };
            if l.armed {
                continue;
            }
            let e = opcode::AcceptMulti::new(Fd(sock.as_raw_fd()))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(user_data(OP_ACCEPT, i as u32, 0));
            // SAFETY: no memory is handed over; the listener is closed only after this
            // accept's final completion.
            unsafe { ring::push(&mut self.ring, &e)? };
            l.armed = true;
            self.inflight += 1;
        }
        self.accept_retry = None;
        Ok(())
    }

    fn bufs_publish(&self) {
        if let Some(b) = &self.bufs {
            b.publish();
        }
    }

    /// The nearest thing this reactor must do without being woken: a driver deadline,
    /// an accept retry, the metrics flush (only when there is something to publish), the
    /// stop grace.
    fn next_wake(&self, _now: Instant) -> Option<Instant> {
        let mut t = self.timers.peek().map(|Reverse((d, _, _))| *d);
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        consider(self.accept_retry);
        consider(self.host.metrics_dirty().then_some(self.next_flush));
        consider(self.stop_at);
        t
    }

    fn complete(&mut self, now: Instant, ud: u64, res: i32, flags: u32) {
        let (op, gen, slot) = split(ud);
        match op {
            OP_ACCEPT => self.accepted(now, slot as usize, res, flags),
            OP_EVENT => {
                self.event_armed = false;
                self.inflight -= 1;
            }
            OP_RECV => self.received(now, slot, gen, res, flags),
            OP_SEND => self.sent(now, slot, gen, res),
            _ => {}
        }
    }

    fn accepted(&mut self, now: Instant, listener: usize, res: i32, flags: u32) {
        let Some(l) = self.listeners.get_mut(listener) else {
            return;
        };
        if !cqueue::more(flags) {
            l.armed = false;
            self.inflight -= 1;
            if self.host.phase() != Phase::Running {
                // The cancelled accept is back: nothing refers to the listener now.
                l.sock = None;
            }
        }
        let edge = l.edge.clone();
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            if accept_exhausted(&err) {
                warn!(reactor = self.index, error = %err, "accept failed; backing off");
                self.accept_retry = Some(now + ACCEPT_BACKOFF);
            } else if res != -libc::ECANCELED {
                debug!(error = %err, "accept failed");
            }
            return;
        }
        // SAFETY: a successful accept completion carries a new descriptor that nothing
        // else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        let Some(admitted) = self.host.admit() else {
            let _ =
                SockRef::from(&fd).send_with_flags(self.host.too_many_reply(), libc::MSG_DONTWAIT);
            if let Ok(Some(peer)) = SockRef::from(&fd).peer_addr().map(|a| a.as_socket()) {
                crate::conn::log_refused_at_accept(peer);
            }
            return;
        };
        let peer = match SockRef::from(&fd).peer_addr().map(|a| a.as_socket()) {
            Ok(Some(peer)) => peer,
            // Already reset by the client.
            _ => return,
        };
        if let Err(e) = SockRef::from(&fd).set_tcp_nodelay(true) {
            debug!(%peer, error = %e, "set TCP_NODELAY failed");
        }
        let conn = Conn {
            fd,
            peer,
            recv: Recv::Off,
            send: None,
            linked: None,
            timer: None,
            dirty: false,
            data_while_paused: false,
            shut: false,
            closing: false,
        };
        // `None`: refused by the edge at once, with nothing to send; the socket closes
        // here, as on epoll.
        if let Some(t) = self.host.open(now, peer, edge, admitted, conn) {
            debug!(%peer, reactor = self.index, "connection opened");
            self.mark(t.slot);
        }
    }

    fn mark(&mut self, slot: u32) {
        if let Some(t) = self.host.ticket(slot) {
            if let Some(e) = self.host.get(t) {
                mark(&mut self.dirty, t, &mut e.io);
            }
        }
    }

    fn received(&mut self, now: Instant, slot: u32, gen: u32, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if !more {
            self.inflight -= 1;
        }
        // Take the buffer's bytes first: whatever happened to the connection, a buffer
        // the kernel handed us goes back to it.
        let bid = cqueue::buffer_select(flags);
        let mut recycle = None;
        let data: &[u8] = match (bid, &mut self.bufs) {
            (Some(bid), Some(bufs)) if res > 0 => {
                let buf_more = cqueue::buffer_more(flags);
                if !buf_more {
                    recycle = Some(bid);
                }
                bufs.take(bid, res as usize, buf_more).unwrap_or(&[])
            }
            _ => &[],
        };
        let t = ticket(slot, gen);
        let Some(Entry {
            driver, io: conn, ..
        }) = self.host.get(t)
        else {
            if let (Some(b), Some(bid)) = (&mut self.bufs, recycle) {
                b.recycle(bid);
            }
            return;
        };
        if !more {
            conn.recv = Recv::Off;
        }
        if conn.linked.take().is_some() {
            // The send linked before this receive went out whole: had it failed, its
            // own completion would have come first, taken the buffer, and no
            // completion would have come for this receive.
            self.inflight -= 1;
            if let (Some(p), Some(b)) = (&mut self.sends, conn.send.take()) {
                p.put(b);
            }
        }
        if !conn.closing {
            if res > 0 {
                if !driver.wants_read() {
                    conn.data_while_paused = true;
                }
                driver.handle_input(now, data);
                // A message this input completed goes to the sink now rather than at
                // the end of the turn, so the bodies of the other completions of this
                // batch see the sink's in-flight count with it.
                self.host.hand_off(now, t);
            } else if res == 0 {
                driver.handle_eof(now);
            } else if res == -libc::ENOBUFS {
                // Every buffer is in use this turn; they are recycled before the next
                // submit and the receive is re-armed then. The data waits in the socket.
                self.exhausted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else if res != -libc::ECANCELED {
                debug!(peer = %conn.peer, error = %io::Error::from_raw_os_error(-res), "receive failed");
                driver.handle_io_error();
            }
        }
        if let (Some(b), Some(bid)) = (&mut self.bufs, recycle) {
            b.recycle(bid);
        }
        self.mark(slot);
    }

    fn sent(&mut self, now: Instant, slot: u32, gen: u32, res: i32) {
        self.inflight -= 1;
        let t = ticket(slot, gen);
        let Some(Entry {
            driver, io: conn, ..
        }) = self.host.get(t)
        else {
            return;
        };
        let buf = conn.send.take();
        if conn.linked.take().is_some() {
            // A linked send completes on its own only when it failed (after `res`
            // bytes, if any: MSG_WAITALL retries short sends): the socket is broken, or
            // the connection is closing and cancelled it. The receive behind it failed
            // with it and posts no completion (a skip-on-success request's chain).
            if conn.recv != Recv::Off {
                conn.recv = Recv::Off;
                self.inflight -= 1;
            }
            if !conn.closing && res != -libc::ECANCELED {
                debug!(peer = %conn.peer, result = res, "linked send failed");
                driver.handle_io_error();
            }
        } else if !conn.closing {
            if res >= 0 {
                driver.output_written(now, res as usize);
            } else if res != -libc::ECANCELED {
                // EPIPE, ECONNRESET: nobody will read our replies any more.
                debug!(peer = %conn.peer, error = %io::Error::from_raw_os_error(-res), "send failed");
                driver.handle_io_error();
            }
        }
        if let (Some(p), Some(b)) = (&mut self.sends, buf) {
            p.put(b);
        }
        self.mark(slot);
    }

    /// Pops every deadline that has passed. Entries are not removed when a deadline
    /// moves (lazy deletion): a popped entry counts only if it is still the connection's
    /// current one, and the driver is asked again what its deadline really is.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((d, slot, gen))) = self.timers.peek() {
            if d > now {
                break;
            }
            self.timers.pop();
            let t = ticket(slot, gen);
            let Some(Entry { driver, io: c, .. }) = self.host.get(t) else {
                continue;
            };
            if c.timer != Some(d) {
                continue;
            }
            c.timer = None;
            if driver.poll_timeout().is_some_and(|t| t <= now) {
                driver.handle_timeout(now);
            }
            self.mark(slot);
        }
    }

    fn check_phase(&mut self, now: Instant) {
        let phase = self.phase_cell.get();
        let was = self.host.phase();
        let dirty = &mut self.dirty;
        if !self.host.set_phase(now, phase, |t, c| mark(dirty, t, c)) {
            return;
        }
        if was == Phase::Running {
            // Stop accepting: cancel the multishot accept; the listener is closed when
            // its final completion comes back.
            for i in 0..self.listeners.len() {
                if self.listeners[i].armed {
                    self.cancel(CancelBuilder::user_data(user_data(OP_ACCEPT, i as u32, 0)));
                } else {
                    self.listeners[i].sock = None;
                }
            }
        }
        if phase == Phase::Stop {
            self.stop_at = Some(now + STOP_WAIT);
        }
    }

    fn cancel(&mut self, what: CancelBuilder) {
        let e = opcode::AsyncCancel2::new(what)
            .build()
            .user_data(user_data(OP_CANCEL, 0, 0));
        // SAFETY: a cancellation hands over no memory.
        if let Err(e) = unsafe { ring::push(&mut self.ring, &e) } {
            warn!(error = %e, "cannot submit a cancellation");
        }
    }

    /// The turn's output: for every connection touched this turn, hand messages to
    /// the sink, then arm or cancel its receive, queue its one send, update its
    /// deadline or start closing it. The sends go to the kernel with the next wait, all
    /// in one `io_uring_enter`.
    fn flush(&mut self, now: Instant) -> io::Result<()> {
        // A sink may answer inside `submit` (the null sink does), and a closing
        // connection frees budget others wait for: loop until nothing is left to do.
        let mut batch = std::mem::take(&mut self.spare);
        loop {
            let dirty = &mut self.dirty;
            self.host.take_answers(now, |t, c| mark(dirty, t, c));
            self.host.wake_budget_waiters(|t, c| mark(dirty, t, c));
            if self.dirty.is_empty() {
                break;
            }
            std::mem::swap(&mut batch, &mut self.dirty);
            for &slot in &batch {
                self.process(now, slot)?;
            }
            batch.clear();
        }
        // Keep both allocations for the next turn.
        if batch.capacity() > self.dirty.capacity() {
            std::mem::swap(&mut batch, &mut self.dirty);
        }
        self.spare = batch;
        Ok(())
    }

    fn process(&mut self, now: Instant, slot: u32) -> io::Result<()> {
        let Some(t) = self.host.ticket(slot) else {
            return Ok(());
        };
        let gen = t.generation;
        self.host.begin(now, t);
        let Some(Entry { io: c, .. }) = self.host.get(t) else {
            return Ok(());
        };
        c.dirty = false;
        if !c.closing {
            self.host.hand_off(now, t);
        }
        let Some(Entry { driver, io: c, .. }) = self.host.get(t) else {
            return Ok(());
        };

        let mut next = host::next(driver);
        if !c.closing {
            if next.shutdown_write && !c.shut && c.send.is_none() {
                let _ = SockRef::from(&c.fd).shutdown(std::net::Shutdown::Write);
                c.shut = true;
                driver.write_shut(now);
                next = host::next(driver);
            }
            if next.close {
                c.closing = true;
            }
        }
        if c.closing {
            // Its last counts now, not when the kernel has handed its operations back.
            self.host.end(t);
            return self.close(t);
        }

        let fd = c.fd.as_raw_fd();
        let ud_recv = user_data(OP_RECV, slot, gen);
        let arm_recv = next.read.filter(|_| c.recv == Recv::Off);
        // More to say while a linked send of an earlier turn holds the one send slot.
        let unlink = (next.write || next.shutdown_write) && c.linked.is_some_and(|l| !l.cancelled);
        let mut send = None;
        if c.send.is_none() && next.write {
            let pool = self
                .sends
                .as_mut()
                .ok_or_else(|| io::Error::other("no send pool"))?;
            let (buf, ptr, len) = pool.fill(driver.pending_output())?;
            // Linked to the receive queued right after it: see `Reactor::link_sends`.
            let link = self.link_sends && arm_recv.is_some();
            let e = if link {
                opcode::Send::new(Fd(fd), ptr, len as u32)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                    .build()
                    .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
            } else {
                opcode::Send::new(Fd(fd), ptr, len as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            };
            send = Some(e.user_data(user_data(OP_SEND, slot, gen)));
            c.send = Some(buf);
            self.inflight += 1;
            if link {
                c.linked = Some(Linked { cancelled: false });
                driver.output_written(now, len);
                // Written, the reply may let the driver go on (input held at the output
                // cap, the close after a last reply): another look this turn.
                let after = host::next(driver);
                if after.write || after.shutdown_write || after.close {
                    mark(&mut self.dirty, t, c);
                }
            }
        }
        let mut recv = None;
        if let Some(want) = arm_recv {
            let e = if self.multishot {
                opcode::RecvMulti::new(Fd(fd), BGID).len(RECV_CHUNK).build()
            } else {
                // The buffer is picked when data arrives, so an armed receive holds
                // none; `len` caps what one completion takes at what the driver
                // wants at a time.
                let len = want.min(BODY_READ) as u32;
                opcode::Recv::new(Fd(fd), std::ptr::null_mut(), len)
                    .buf_group(BGID)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
            };
            recv = Some(e.user_data(ud_recv));
            c.recv = Recv::Armed;
            self.inflight += 1;
        }
        // SAFETY: a send reads `ptr..ptr+len`, the send buffer now held in `c.send`,
        // which nobody writes or frees until the send's completion (or, linked, the
        // completion of the receive after it) returns it to the pool. A receive writes
        // only into provided buffers, which live until the reactor has reaped every
        // receive (see `teardown`); the descriptor stays open until both operations'
        // final completions (see `close`).
        unsafe {
            match (send, recv) {
                // Both in one batch, so a link is never cut by a full queue.
                (Some(s), Some(r)) => ring::push_all(&mut self.ring, &[s, r])?,
                (Some(e), None) | (None, Some(e)) => ring::push(&mut self.ring, &e)?,
                (None, None) => {}
            }
        }
        if next.read.is_some() {
            c.data_while_paused = false;
        } else if c.recv == Recv::Armed && (c.data_while_paused || !next.keep_posted_read) {
            // Paused: stop receiving so TCP pushes back.
            c.recv = Recv::Cancelling;
            let e = opcode::AsyncCancel::new(ud_recv)
                .build()
                .user_data(user_data(OP_CANCEL, slot, gen));
            // SAFETY: a cancellation hands over no memory.
            unsafe { ring::push(&mut self.ring, &e)? };
        }
        if let Some(l) = c.linked.as_mut().filter(|_| unlink) {
            // More to say (a phase change, a timeout, a late answer) while a linked send
            // holds the one send slot: it went out silently and its receive waits for
            // the client. Cancelling that receive brings its completion, which frees
            // the slot. (If the send still waits for the client to read, the receive has
            // not started and cannot be cancelled; it starts once the send is out, and
            // its completion frees the slot then: the new reply waits as it would
            // behind any send.)
            l.cancelled = true;
            if c.recv == Recv::Armed {
                c.recv = Recv::Cancelling;
            }
            let e = opcode::AsyncCancel::new(ud_recv)
                .build()
                .user_data(user_data(OP_CANCEL, slot, gen));
            // SAFETY: a cancellation hands over no memory.
            unsafe { ring::push(&mut self.ring, &e)? };
        }

        if let Some(d) = next.deadline {
            if c.timer.is_none_or(|t| d < t) {
                c.timer = Some(d);
                self.timers.push(Reverse((d, slot, gen)));
            }
        }
        self.host.end(t);
        Ok(())
    }

    /// Closes a finished connection once the kernel holds nothing of it: cancels its
    /// receive and send, and when both have come back closes the descriptor and frees
    /// the slot under a new generation.
    fn close(&mut self, t: Ticket) -> io::Result<()> {
        let Some(Entry { io: c, .. }) = self.host.get(t) else {
            return Ok(());
        };
        let busy = c.recv != Recv::Off || c.send.is_some();
        if busy {
            if c.recv == Recv::Armed || c.send.is_some() {
                if c.recv == Recv::Armed {
                    c.recv = Recv::Cancelling;
                }
                let fd = c.fd.as_raw_fd();
                let e = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all())
                    .build()
                    .user_data(user_data(OP_CANCEL, t.slot, t.generation));
                // SAFETY: a cancellation hands over no memory.
                unsafe { ring::push(&mut self.ring, &e)? };
            }
            return Ok(());
        }
        // Gives back the --max-connections slot and the body budget; dropping `c`
        // closes the descriptor.
        if let Some((_, c)) = self.host.close(t) {
            debug!(peer = %c.peer, reactor = self.index, "connection closed");
        }
        Ok(())
    }

    fn flush_metrics(&mut self, now: Instant) {
        self.host.set_busy(self.busy);
        if self.host.metrics_dirty() {
            self.host.flush_metrics();
        }
        self.next_flush = now + FLUSH_INTERVAL;
    }

    /// In the stop phase: every connection is gone, or the grace for their last
    /// replies has run out.
    fn finished(&self, now: Instant) -> bool {
        let Some(stop_at) = self.stop_at else {
            return false;
        };
        now >= stop_at || self.host.is_empty()
    }

    /// Takes every operation back from the kernel before the memory they use is freed.
    /// If the kernel does not return them all in time, the buffers are leaked rather
    /// than freed under it.
    fn teardown(mut self) {
        self.cancel(CancelBuilder::any().all());
        let deadline = Instant::now() + TEARDOWN_WAIT;
        while self.inflight > 0 && Instant::now() < deadline {
            if ring::submit_and_wait(&mut self.ring, Some(Duration::from_millis(50))).is_err() {
                break;
            }
            let now = Instant::now();
            self.reap();
            for i in 0..self.cqes.len() {
                let (ud, _res, flags) = self.cqes[i];
                let (op, gen, slot) = split(ud);
                match op {
                    OP_RECV if !cqueue::more(flags) => {
                        self.inflight -= 1;
                        // A send linked before it is over too (see `received`).
                        if let Some(Entry { io: c, .. }) = self.host.get(ticket(slot, gen)) {
                            if c.linked.take().is_some() {
                                self.inflight -= 1;
                                if let (Some(p), Some(b)) = (&mut self.sends, c.send.take()) {
                                    p.put(b);
                                }
                            }
                        }
                    }
                    OP_ACCEPT | OP_EVENT if !cqueue::more(flags) => self.inflight -= 1,
                    OP_SEND => self.sent(now, slot, gen, -libc::ECANCELED),
                    _ => {}
                }
                if op == OP_ACCEPT && !cqueue::more(flags) {
                    if let Some(l) = self.listeners.get_mut(slot as usize) {
                        l.sock = None;
                        l.armed = false;
                    }
                }
            }
        }
        self.host.set_busy(self.busy);
        self.host.flush_metrics();
        if self.inflight > 0 {
            warn!(
                reactor = self.index,
                inflight = self.inflight,
                "io_uring operations still in flight at exit; their buffers are not freed"
            );
            if let Some(b) = self.bufs.take() {
                b.leak();
            }
            if let Some(p) = self.sends.take() {
                p.leak();
            }
            std::mem::forget(std::mem::take(&mut self.event_buf));
        }
        // Connections (and their descriptors) go now, then the ring, then the memory.
        self.host.clear();
    }
}

/// Queues a connection for this turn's flush, once.
fn mark(dirty: &mut Vec<u32>, t: Ticket, c: &mut Conn) {
    if !c.dirty {
        c.dirty = true;
        dirty.push(t.slot);
    }
}

fn ticket(slot: u32, generation: u32) -> Ticket {
    Ticket { slot, generation }
}
