//! The simulated network and the backend that moves its bytes: each connection's
//! socket is a [`SimSock`] (bytes the client sent that the gateway has not read, bytes
//! the gateway wrote that the client has not read, within a send window), and a pump is
//! the backend's look at one connection. Which backend a run imitates is chosen per
//! seed ([`Drive`]):
//! - [`pump`], the epoll backend's order: `begin`, hand off, write what the window
//!   takes, hand off again, then the driver's wishes (close, shut the write side, read
//!   a chunk of at most the driver's hint and the socket's split), `end`;
//! - [`pump_uring`], the io_uring backend's: a turn (`begin`, hand off, arm one
//!   receive of the driver's hint, post one send of a copy of the pending output,
//!   cancel a receive the driver no longer wants unless `keep_posted_read` lets it
//!   stay, `end`), then the kernel's side (the send goes out as far as the window
//!   takes and completes short; the receive completes with what arrived, handed to the
//!   driver even if it stopped wanting input meanwhile), and another turn while
//!   something completed. With linked sends (a send queued with the receive behind it)
//!   the driver hears its output was written when the send is queued, and the one
//!   send slot is held until the receive completes or is cancelled.
//!
//! Reads and writes are split wherever the run's RNG put the chunk sizes and windows.

use std::time::Instant;

use smtpgw::completion::Ticket;
use smtpgw::conn::Connection;
use smtpgw::net::host::{self, Host};

use crate::invariants::{violation, Violation, OUTPUT_SLACK};

/// One connection's socket, as both ends see it.
pub struct SimSock {
    /// Index of the client in the run.
    pub client: usize,
    /// Sent by the client, not read by the gateway.
    pub inbound: Vec<u8>,
    /// Written by the gateway, not read by the client.
    pub to_client: Vec<u8>,
    /// How much unread output the socket holds (its send buffer).
    pub window: usize,
    /// The most one read returns.
    pub read_chunk: usize,
    /// The client shut its write side; the gateway reads EOF once `inbound` is empty.
    pub peer_eof: bool,
    eof_given: bool,
    /// The client reset the connection.
    pub reset: bool,
    /// The gateway shut its write side.
    pub fin_sent: bool,
    /// The gateway wrote something since the run last looked.
    pub wrote: bool,
    /// io_uring: the receive armed and the most it takes.
    recv: Option<usize>,
    /// io_uring: the posted send's bytes not in the socket yet; `send_posted` until
    /// its completion (or, linked, its receive's) gives the slot back.
    send: Vec<u8>,
    send_posted: bool,
    linked: bool,
    /// io_uring: bytes arrived while the driver did not want any.
    data_while_paused: bool,
    /// io_uring, for the run's counts: receives that handed bytes to a driver that no
    /// longer wanted any, and linked sends queued.
    pub read_while_paused: u64,
    pub linked_sends: u64,
}

impl SimSock {
    pub fn new(client: usize, window: usize, read_chunk: usize) -> SimSock {
        SimSock {
            client,
            inbound: Vec::new(),
            to_client: Vec::new(),
            window,
            read_chunk,
            peer_eof: false,
            eof_given: false,
            reset: false,
            fin_sent: false,
            wrote: false,
            recv: None,
            send: Vec::new(),
            send_posted: false,
            linked: false,
            data_while_paused: false,
            read_while_paused: 0,
            linked_sends: 0,
        }
    }
}

fn write_out(e: &mut host::Entry<SimSock>, now: Instant, bad: &mut Vec<Violation>) {
    while e.driver.wants_write() {
        if e.io.fin_sent {
            bad.push(violation(
                "write after close",
                format!(
                    "client {}: output after the write side was shut",
                    e.io.client
                ),
            ));
            return;
        }
        // As the backends do: a reset is noticed only by a write or a read that fails.
        if e.io.reset {
            e.driver.handle_io_error();
            return;
        }
        let room = e.io.window.saturating_sub(e.io.to_client.len());
        let n = room.min(e.driver.pending_output().len());
        if n == 0 {
            return;
        }
        e.io.to_client
            .extend_from_slice(&e.driver.pending_output()[..n]);
        e.io.wrote = true;
        e.driver.output_written(now, n);
    }
}

/// The checks at the end of a look: a body paused on the budget at its start charged
/// no more of it, and the output buffered is within the cap (plus one reply).
fn end_of_look(
    e: &mut host::Entry<SimSock>,
    paused_at: Option<usize>,
    output_cap: usize,
    bad: &mut Vec<Violation>,
    paused: &mut u64,
) {
    if e.driver.paused_for_budget() {
        *paused += 1;
    }
    if let Some(was) = paused_at.filter(|&was| e.driver.charged() > was) {
        bad.push(violation(
            "body budget",
            format!(
                "client {}: its body was paused on the budget with {was} bytes charged, and took {} more in one look",
                e.io.client,
                e.driver.charged() - was
            ),
        ));
    }
    // At the end of the look, not after the read alone: `begin` (budget freed, a
    // sink answer) and `output_written` take input too, and so can add output.
    let held = e.driver.pending_output().len();
    if held > output_cap + OUTPUT_SLACK {
        bad.push(violation(
            "output bound",
            format!(
                "client {}: {held} bytes of output buffered (cap {output_cap})",
                e.io.client
            ),
        ));
    }
}

/// One look at connection `t`. Returns the driver and socket if it closed; counts the
/// looks that left it paused on the body budget in `paused`.
pub fn pump(
    host: &mut Host<SimSock>,
    now: Instant,
    t: Ticket,
    output_cap: usize,
    bad: &mut Vec<Violation>,
    paused: &mut u64,
) -> Option<(Connection, SimSock)> {
    // A driver that goes on taking input without end is a violation of its own (the
    // output and input bounds); the cap only keeps the simulation from spinning.
    for _ in 0..100_000 {
        // A body paused on the budget takes no more of it until the budget frees up,
        // which nothing in a look of this connection alone can do (its message is not
        // complete, so it hands nothing to the sink).
        let paused_at = host
            .get(t)
            .filter(|e| e.driver.paused_for_budget())
            .map(|e| e.driver.charged());
        host.begin(now, t);
        host.hand_off(now, t);
        let e = host.get(t)?;
        write_out(e, now, bad);
        host.hand_off(now, t);
        let e = host.get(t)?;
        let next = host::next(&e.driver);
        if next.close {
            return host.close(t);
        }
        if next.shutdown_write {
            e.io.fin_sent = true;
            e.driver.write_shut(now);
            continue;
        }
        let mut progressed = false;
        if let Some(max) = next.read {
            if e.io.reset {
                e.driver.handle_io_error();
                progressed = true;
            } else if !e.io.inbound.is_empty() {
                let n = max.min(e.io.read_chunk).min(e.io.inbound.len());
                let data: Vec<u8> = e.io.inbound.drain(..n).collect();
                e.driver.handle_input(now, &data);
                progressed = true;
            } else if e.io.peer_eof && !e.io.eof_given {
                e.io.eof_given = true;
                e.driver.handle_eof(now);
                progressed = true;
            }
        }
        end_of_look(e, paused_at, output_cap, bad, paused);
        host.end(t);
        if !progressed || !bad.is_empty() {
            return None;
        }
    }
    None
}

/// Which backend a run imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drive {
    Epoll,
    Uring { link_sends: bool },
}

/// io_uring: the most one single-shot receive takes, and one send buffer's size.
const BODY_READ: usize = 64 * 1024;
const LARGE_SEND: usize = 8 * 1024;

/// The io_uring backend's turn for connection `t` (its `Reactor::process`): true if
/// it closed (the driver and socket are then in `closed`).
fn uring_turn(
    host: &mut Host<SimSock>,
    now: Instant,
    t: Ticket,
    link_sends: bool,
    closed: &mut Option<(Connection, SimSock)>,
) -> bool {
    host.begin(now, t);
    host.hand_off(now, t);
    let Some(e) = host.get(t) else {
        return false;
    };
    let mut next = host::next(&e.driver);
    if next.shutdown_write && !e.io.fin_sent && !e.io.send_posted {
        e.io.fin_sent = true;
        e.driver.write_shut(now);
        next = host::next(&e.driver);
    }
    if next.close {
        // Its last counts first, then the kernel gives back (cancelled) whatever it
        // held, then the descriptor closes.
        host.end(t);
        *closed = host.close(t);
        return true;
    }
    let arm = next.read.filter(|_| e.io.recv.is_none());
    let unlink = (next.write || next.shutdown_write) && e.io.linked;
    if !e.io.send_posted && next.write {
        let out = e.driver.pending_output();
        let len = out.len().min(LARGE_SEND);
        e.io.send = out[..len].to_vec();
        e.io.send_posted = true;
        if link_sends && arm.is_some() {
            e.io.linked = true;
            e.io.linked_sends += 1;
            e.driver.output_written(now, len);
            // The driver counts it written from here (its write-stall clock starts
            // over), so the run's liveness bound does too: one send buffer at most, the
            // next waiting for this one to be out.
            e.io.wrote = true;
        }
    }
    if let Some(want) = arm {
        e.io.recv = Some(want.min(BODY_READ));
    }
    if next.read.is_some() {
        e.io.data_while_paused = false;
    } else if e.io.recv.is_some() && (e.io.data_while_paused || !next.keep_posted_read) {
        // Paused: the receive is cancelled so TCP pushes back.
        e.io.recv = None;
    }
    if unlink {
        // More to say while a linked send holds the slot: its receive is cancelled,
        // and that completion gives the slot back once the send is out.
        e.io.recv = None;
    }
    host.end(t);
    false
}

/// The kernel's side for connection `t`: the posted send goes out as far as the window
/// takes, the armed receive completes with what arrived; the completions reach the
/// driver as the io_uring backend hands them over. True if any did.
fn uring_kernel(
    host: &mut Host<SimSock>,
    now: Instant,
    t: Ticket,
    bad: &mut Vec<Violation>,
) -> bool {
    let Some(e) = host.get(t) else {
        return false;
    };
    let mut completed = false;
    if e.io.send_posted && !e.io.send.is_empty() {
        if e.io.fin_sent {
            bad.push(violation(
                "write after close",
                format!(
                    "client {}: a send posted after the write side was shut",
                    e.io.client
                ),
            ));
            return false;
        }
        if e.io.reset {
            // EPIPE / ECONNRESET: the send fails, and a linked receive with it.
            e.io.send.clear();
            e.io.send_posted = false;
            e.io.linked = false;
            e.io.recv = None;
            e.driver.handle_io_error();
            return true;
        }
        let room = e.io.window.saturating_sub(e.io.to_client.len());
        let n = room.min(e.io.send.len());
        if n > 0 {
            e.io.to_client.extend_from_slice(&e.io.send[..n]);
            e.io.send.drain(..n);
            e.io.wrote = true;
            if !e.io.linked {
                // A short send completes with what it wrote; the rest is sent again
                // from the driver's output by the next post.
                e.io.send.clear();
                e.io.send_posted = false;
                e.driver.output_written(now, n);
            }
            completed = true;
        }
    }
    // A linked send's receive starts only once the send is out.
    let send_out = e.io.send.is_empty();
    if e.io.linked && send_out && e.io.recv.is_none() {
        // Its receive was cancelled (or failed): that completion frees the slot.
        e.io.linked = false;
        e.io.send_posted = false;
        completed = true;
    }
    if let Some(len) = e.io.recv.filter(|_| send_out) {
        let free_link = |io: &mut SimSock| {
            if io.linked {
                io.linked = false;
                io.send_posted = false;
            }
        };
        if e.io.reset {
            e.io.recv = None;
            free_link(&mut e.io);
            e.driver.handle_io_error();
            completed = true;
        } else if !e.io.inbound.is_empty() {
            e.io.recv = None;
            free_link(&mut e.io);
            let n = len.min(e.io.read_chunk).min(e.io.inbound.len());
            let data: Vec<u8> = e.io.inbound.drain(..n).collect();
            if !e.driver.wants_read() {
                e.io.data_while_paused = true;
                e.io.read_while_paused += 1;
            }
            e.driver.handle_input(now, &data);
            // A message this input completed goes to the sink at once.
            host.hand_off(now, t);
            completed = true;
        } else if e.io.peer_eof && !e.io.eof_given {
            e.io.recv = None;
            free_link(&mut e.io);
            e.io.eof_given = true;
            e.driver.handle_eof(now);
            completed = true;
        }
    }
    completed
}

/// One look at connection `t` as the io_uring backend takes it: first the
/// completions of what earlier turns posted (bytes that arrived for a receive kept
/// posted reach the driver before any turn can cancel it), then turns and the kernel's
/// completions until nothing more completes. Returns the driver and socket if it
/// closed; counts the looks that left it paused on the body budget in `paused`.
pub fn pump_uring(
    host: &mut Host<SimSock>,
    now: Instant,
    t: Ticket,
    output_cap: usize,
    link_sends: bool,
    bad: &mut Vec<Violation>,
    paused: &mut u64,
) -> Option<(Connection, SimSock)> {
    let mut paused_at = host
        .get(t)
        .filter(|e| e.driver.paused_for_budget())
        .map(|e| e.driver.charged());
    uring_kernel(host, now, t, bad);
    for _ in 0..100_000 {
        let mut closed = None;
        if uring_turn(host, now, t, link_sends, &mut closed) {
            return closed;
        }
        let e = host.get(t)?;
        end_of_look(e, paused_at, output_cap, bad, paused);
        paused_at = Some(e.driver.charged()).filter(|_| e.driver.paused_for_budget());
        if !bad.is_empty() || !uring_kernel(host, now, t, bad) {
            return None;
        }
    }
    None
}
