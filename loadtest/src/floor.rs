//! `floor`: the cheapest server our client and Postfix's `smtp-source` still accept, so
//! every gateway figure can be stated as a ratio to what the kernel's loopback TCP costs
//! with the same syscall pattern.
//!
//! It answers every line with a canned reply and recognises only what it must: the first
//! four bytes of a command line (`DATA` switches to data mode, `EHLO`/`HELO` get a reply
//! offering PIPELINING so pipelined cells compare like with like, `QUIT` closes) and, in
//! data mode, the end-of-data line `.`. No parsing, no storage, no timers; one thread
//! per loop (`--threads`, one by default), each with its own listener on the same port.
//! Two variants, one per gateway backend:
//! - `epoll`: nonblocking sockets on mio (edge-triggered epoll): on readiness, read once
//!   (again only if the read filled the buffer), then every reply that read produced in
//!   one `write`.
//! - `uring`: the `io-uring` crate: multishot accept, one plain `recv` per connection,
//!   one `send` per connection with all its pending replies, everything a loop turn
//!   prepared submitted with a single `io_uring_enter` (which also waits).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

const GREETING: &[u8] = b"220 floor ESMTP\r\n";
const EHLO_REPLY: &[u8] = b"250-floor\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
const OK: &[u8] = b"250 2.0.0 ok\r\n";
const GO_AHEAD: &[u8] = b"354 go ahead\r\n";
const BYE: &[u8] = b"221 2.0.0 bye\r\n";
/// Replies not yet handed to the kernel above which a connection stops being read, so a
/// client that never reads cannot grow the floor either.
const OUTPUT_CAP: usize = 64 * 1024;

/// Where a connection is inside the current line; the only state the floor keeps.
#[derive(Debug, Default)]
pub struct Lines {
    data: bool,
    /// Command mode: the line's first bytes (all a canned reply needs).
    head: [u8; 4],
    head_len: usize,
    /// Data mode: what the current line holds so far.
    line: DataLine,
    /// QUIT was answered: close once the reply is written.
    pub quit: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum DataLine {
    #[default]
    Start,
    Dot,
    DotCr,
    Other,
}

impl Lines {
    /// Consumes all of `input` and appends the replies it calls for to `out`. Input after
    /// QUIT is ignored.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() && !self.quit {
            if self.data {
                input = self.data_bytes(input, out);
                continue;
            }
            let (line, rest, complete) = match memchr::memchr(b'\n', input) {
                Some(i) => (&input[..i], &input[i + 1..], true),
                None => (input, &input[input.len()..], false),
            };
            for &b in line.iter().take(4 - self.head_len) {
                self.head[self.head_len] = b.to_ascii_uppercase();
                self.head_len += 1;
            }
            input = rest;
            if complete {
                match &self.head[..self.head_len] {
                    b"DATA" => {
                        out.extend_from_slice(GO_AHEAD);
                        self.data = true;
                        self.line = DataLine::Start;
                    }
                    b"EHLO" | b"HELO" => out.extend_from_slice(EHLO_REPLY),
                    b"QUIT" => {
                        out.extend_from_slice(BYE);
                        self.quit = true;
                    }
                    _ => out.extend_from_slice(OK),
                }
                self.head_len = 0;
            }
        }
    }

    /// Data mode: skips body bytes, watching only for a line that is `.` (CRLF or bare
    /// LF). Returns what follows the bytes it consumed.
    fn data_bytes<'a>(&mut self, input: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        let b = input[0];
        match (self.line, b) {
            (DataLine::Start, b'.') => self.line = DataLine::Dot,
            (DataLine::Dot, b'\r') => self.line = DataLine::DotCr,
            (DataLine::Dot | DataLine::DotCr, b'\n') => {
                out.extend_from_slice(OK);
                self.data = false;
            }
            (_, b'\n') => self.line = DataLine::Start,
            _ => {
                // Anywhere else in a line: jump to its end.
                self.line = DataLine::Other;
                return match memchr::memchr(b'\n', input) {
                    Some(i) => {
                        self.line = DataLine::Start;
                        &input[i + 1..]
                    }
                    None => &input[input.len()..],
                };
            }
        }
        &input[1..]
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Mode {
    Epoll,
    Uring,
}

/// Binds `threads` listeners on one port (SO_REUSEPORT), says `listening addr=HOST:PORT`
/// on stderr (the form run.sh waits for), and serves on one thread per listener until
/// killed.
pub fn run(listen: &str, mode: Mode, threads: usize) -> Result<()> {
    crate::raise_nofile();
    let wanted: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen}: not an address HOST:PORT"))?;
    crate::check_target(&wanted.to_string(), false)
        .context("--listen must be a loopback address")?;
    let first = reuseport_listener(wanted).with_context(|| format!("--listen {listen}"))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(reuseport_listener(addr).with_context(|| format!("--threads: {addr}"))?);
    }
    let serve = match mode {
        Mode::Epoll => epoll::serve,
        Mode::Uring => uring::serve,
    };
    let mut loops = Vec::with_capacity(threads);
    for (i, listener) in listeners.into_iter().enumerate() {
        loops.push(
            std::thread::Builder::new()
                .name(format!("floor-{i}"))
                .spawn(move || serve(listener))?,
        );
    }
    // Said once every loop runs: run.sh (and the tests) take the line to mean ready.
    eprintln!("floor ({mode:?}, {threads} loops) listening addr={addr}");
    // A loop only ends on an error; the first one to end ends the floor.
    for handle in loops {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("a floor loop panicked"),
        }
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

mod epoll {
    use super::*;
    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token};

    const LISTENER: Token = Token(usize::MAX);

    struct Conn {
        stream: TcpStream,
        lines: Lines,
        out: Vec<u8>,
    }

    pub fn serve(listener: std::net::TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(1024);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut conns: Vec<Option<Conn>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        // One read buffer for all connections: an idle connection holds none.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    loop {
                        let (mut stream, _) = match listener.accept() {
                            Ok(s) => s,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            // EMFILE and friends: leave the rest in the backlog.
                            Err(_) => break,
                        };
                        let _ = stream.set_nodelay(true);
                        let slot = free.pop().unwrap_or_else(|| {
                            conns.push(None);
                            conns.len() - 1
                        });
                        poll.registry().register(
                            &mut stream,
                            Token(slot),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        let mut c = Conn {
                            stream,
                            lines: Lines::default(),
                            out: GREETING.to_vec(),
                        };
                        if step(&mut c, &mut buf, false) {
                            conns[slot] = Some(c);
                        } else {
                            let _ = poll.registry().deregister(&mut c.stream);
                            free.push(slot);
                        }
                    }
                    continue;
                }
                let slot = ev.token().0;
                let Some(c) = conns.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                if !step(c, &mut buf, ev.is_readable() || ev.is_read_closed()) {
                    if let Some(mut c) = conns[slot].take() {
                        let _ = poll.registry().deregister(&mut c.stream);
                    }
                    free.push(slot);
                }
            }
        }
    }

    /// Writes what is pending, then reads and answers until the socket would block.
    /// Returns false when the connection is finished.
    fn step(c: &mut Conn, buf: &mut [u8], readable: bool) -> bool {
        // Edge-triggered: a read that did not fill the buffer drained the socket (data
        // arriving later raises a new edge). After output was stuck, read regardless:
        // the edge may have come while we were not reading.
        let mut more = readable || !c.out.is_empty();
        loop {
            while !c.out.is_empty() {
                match c.stream.write(&c.out) {
                    Ok(n) => {
                        c.out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
            if c.lines.quit && c.out.is_empty() {
                return false;
            }
            if !more || c.out.len() >= OUTPUT_CAP || c.lines.quit {
                return true;
            }
            match c.stream.read(buf) {
                Ok(0) => return false,
                Ok(n) => {
                    c.lines.feed(&buf[..n], &mut c.out);
                    more = n == buf.len();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => more = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

mod uring {
    use super::*;
    use io_uring::{cqueue, opcode, squeue, types, IoUring};
    use std::net::TcpStream;
    use std::os::fd::{AsRawFd, FromRawFd};

    const RECV_BUF: usize = 16 * 1024;
    const ACCEPT: u64 = u64::MAX;
    const OP_RECV: u64 = 0;
    const OP_SEND: u64 = 1;

    struct Conn {
        stream: TcpStream,
        lines: Lines,
        /// The kernel writes into it while `recv_armed`; untouched by us meanwhile.
        rbuf: Box<[u8]>,
        /// Replies produced but not yet handed to the kernel.
        out: Vec<u8>,
        /// Replies the kernel reads while `send_armed`; untouched by us meanwhile.
        sending: Vec<u8>,
        sent: usize,
        recv_armed: bool,
        send_armed: bool,
        done: bool,
        queued: bool,
    }

    fn push(ring: &mut IoUring, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry pushed here points either at nothing (accept) or at a
            // buffer of a `Conn` that stays allocated and untouched until its completion
            // is reaped (`recv_armed`/`send_armed` guard both; a Conn is only dropped
            // when neither is set).
            if unsafe { ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what is there to the kernel and retry.
            ring.submit()?;
        }
    }

    fn ring() -> io::Result<IoUring> {
        // The flags the gateway's reactors use where the kernel accepts them.
        IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(16 * 1024)
            .build(4096)
            .or_else(|_| IoUring::builder().setup_cqsize(16 * 1024).build(4096))
    }

    pub fn serve(listener: std::net::TcpListener) -> Result<()> {
        let mut ring = ring().context("io_uring_setup")?;
        let lfd = listener.as_raw_fd();
        let accept = opcode::AcceptMulti::new(types::Fd(lfd))
            .build()
            .user_data(ACCEPT);
        push(&mut ring, &accept)?;
        let mut conns: Vec<Option<Conn>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        let mut dirty: Vec<usize> = Vec::with_capacity(1024);
        loop {
            // The single io_uring_enter of this turn: submits and waits for one.
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e.into()),
            }
            done.clear();
            done.extend(
                ring.completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &done {
                if ud == ACCEPT {
                    if res >= 0 {
                        // SAFETY: a successful accept returns a new descriptor that
                        // nothing else owns.
                        let stream = unsafe { TcpStream::from_raw_fd(res) };
                        let _ = stream.set_nodelay(true);
                        let slot = free.pop().unwrap_or_else(|| {
                            conns.push(None);
                            conns.len() - 1
                        });
                        conns[slot] = Some(Conn {
                            stream,
                            lines: Lines::default(),
                            rbuf: vec![0u8; RECV_BUF].into_boxed_slice(),
                            out: GREETING.to_vec(),
                            sending: Vec::new(),
                            sent: 0,
                            recv_armed: false,
                            send_armed: false,
                            done: false,
                            queued: false,
                        });
                        dirty.push(slot);
                    }
                    if !cqueue::more(flags) {
                        push(&mut ring, &accept)?;
                    }
                    continue;
                }
                let slot = (ud >> 1) as usize;
                let Some(c) = conns.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                if ud & 1 == OP_RECV {
                    c.recv_armed = false;
                    if res > 0 {
                        let Conn {
                            lines, rbuf, out, ..
                        } = c;
                        lines.feed(&rbuf[..res as usize], out);
                    } else if res != -libc::EINTR && res != -libc::EAGAIN {
                        c.done = true;
                    }
                } else {
                    c.send_armed = false;
                    if res >= 0 {
                        c.sent += res as usize;
                        if c.sent == c.sending.len() {
                            c.sending.clear();
                            c.sent = 0;
                        }
                    } else if res != -libc::EINTR && res != -libc::EAGAIN {
                        c.done = true;
                        // Ends a receive still armed, so the slot can be freed.
                        let _ = c.stream.shutdown(std::net::Shutdown::Both);
                    }
                }
                if !c.queued {
                    c.queued = true;
                    dirty.push(slot);
                }
            }
            for slot in dirty.drain(..) {
                let Some(c) = conns[slot].as_mut() else {
                    continue;
                };
                c.queued = false;
                if c.lines.quit && c.out.is_empty() && c.sending.is_empty() {
                    c.done = true;
                }
                if c.done {
                    if c.recv_armed || c.send_armed {
                        // Closed once the kernel has given both buffers back.
                        let _ = c.stream.shutdown(std::net::Shutdown::Both);
                        continue;
                    }
                    conns[slot] = None;
                    free.push(slot);
                    continue;
                }
                if !c.send_armed && c.sending.is_empty() && !c.out.is_empty() {
                    std::mem::swap(&mut c.out, &mut c.sending);
                }
                if !c.send_armed && c.sent < c.sending.len() {
                    let rest = &c.sending[c.sent..];
                    let e = opcode::Send::new(
                        types::Fd(c.stream.as_raw_fd()),
                        rest.as_ptr(),
                        rest.len() as u32,
                    )
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data((slot as u64) << 1 | OP_SEND);
                    push(&mut ring, &e)?;
                    c.send_armed = true;
                }
                if !c.recv_armed && !c.lines.quit && c.out.len() < OUTPUT_CAP {
                    let e = opcode::Recv::new(
                        types::Fd(c.stream.as_raw_fd()),
                        c.rbuf.as_mut_ptr(),
                        c.rbuf.len() as u32,
                    )
                    .build()
                    .user_data((slot as u64) << 1 | OP_RECV);
                    push(&mut ring, &e)?;
                    c.recv_armed = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(input: &[u8], split: usize) -> (Vec<u8>, bool) {
        let mut l = Lines::default();
        let mut out = Vec::new();
        let (a, b) = input.split_at(split);
        l.feed(a, &mut out);
        l.feed(b, &mut out);
        (out, l.quit)
    }

    #[test]
    fn canned_replies_at_every_split() {
        let session: &[u8] = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\ndata\r\n\
            Subject: x\r\n\r\n.leading dot\r\n..\r\n.x\r\nbody\n.\r\n\
            MAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\n.\nQUIT\r\nNOOP\r\n";
        let mut want = Vec::new();
        for r in [EHLO_REPLY, OK, OK, GO_AHEAD, OK, OK, OK, GO_AHEAD, OK, BYE] {
            want.extend_from_slice(r);
        }
        for split in 0..=session.len() {
            let (out, quit) = replies(session, split);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want),
                "split at {split}"
            );
            assert!(quit);
        }
    }

    #[test]
    fn body_lines_that_only_look_like_the_end() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        l.feed(b"DATA\r\n", &mut out);
        out.clear();
        for b in b"a.\r\n. \r\n.\rx\r\n\r.\r\n" {
            l.feed(std::slice::from_ref(b), &mut out);
        }
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        l.feed(b".\r\n", &mut out);
        assert_eq!(out, OK);
    }
}
