//! The simulated network and the backend that moves its bytes: each connection's
//! socket is a [`SimSock`] (bytes the client sent that the gateway has not read, bytes
//! the gateway wrote that the client has not read, within a send window), and
//! [`pump`] is the backend's look at one connection, in the order the epoll backend
//! takes it: `begin`, hand off, write what the window takes, hand off again, then the
//! driver's wishes (close, shut the write side, read a chunk of at most the driver's
//! hint and the socket's split), `end`. Reads and writes are split wherever the run's
//! RNG put the chunk sizes and windows.

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
        host.end(t);
        if !progressed || !bad.is_empty() {
            return None;
        }
    }
    None
}
