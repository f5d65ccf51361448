//! The unsafe edge of the io_uring backend: building a ring, the provided-buffer ring
//! receives land in, the send buffers, the wake-up eventfd, CPU pinning, and the
//! start-up probe's functional checks. Everything here hands raw memory to the kernel;
//! the rules for who owns it when are in the parent module's comment.

use std::alloc::{self, Layout};
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

/// `IOU_PBUF_RING_INC` from the kernel's uapi header (io-uring 0.7 does not export
/// its `sys` module): buffers of this ring may be consumed in parts.
const IOU_PBUF_RING_INC: u16 = 2;

/// Which setup flags the kernel took, for the start-up log.
pub type SetupKind = &'static str;

/// Builds a ring, asking for `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN` first (task
/// work then runs only when this thread enters the kernel, batched, never as an
/// interrupt), then for `COOP_TASKRUN` alone, then for nothing. Must be called on the
/// thread that will submit: a single-issuer ring belongs to its creator.
pub fn build_ring(entries: u32, cq_entries: u32) -> io::Result<(IoUring, SetupKind)> {
    const TRIES: [(bool, bool, SetupKind); 3] = [
        (true, true, "single_issuer+defer_taskrun+coop_taskrun"),
        (false, true, "coop_taskrun"),
        (false, false, "plain"),
    ];
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for (defer, coop, kind) in TRIES {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq_entries).setup_clamp();
        if defer {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        if coop {
            b.setup_coop_taskrun();
        }
        match b.build(entries) {
            Ok(ring) => return Ok((ring, kind)),
            // An older kernel refuses flags it does not know with EINVAL; anything else
            // (EPERM, ENOSYS, ENOMEM) is not about the flags.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Queues one submission, handing the queue to the kernel first if it is full.
///
/// # Safety
/// Every pointer in `entry` must stay valid (and, for buffers the kernel writes, not be
/// read or written by us) until the operation's last completion has been reaped.
pub unsafe fn push(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: forwarded from this function's contract.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Queues `entries` together (a linked chain must not be cut by a submit in its
/// middle), handing the queue to the kernel first if they do not fit.
///
/// # Safety
/// As for [`push`], for every entry.
pub unsafe fn push_all(ring: &mut IoUring, entries: &[squeue::Entry]) -> io::Result<()> {
    loop {
        // SAFETY: forwarded from this function's contract.
        if unsafe { ring.submission().push_multiple(entries) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Hands the queued submissions to the kernel and waits for at least one completion or
/// until `timeout` (None: no limit). One `io_uring_enter` per call.
pub fn submit_and_wait(ring: &mut IoUring, timeout: Option<Duration>) -> io::Result<()> {
    let result = match timeout {
        None => ring.submit_and_wait(1),
        Some(t) => {
            let ts = Timespec::from(t);
            let args = SubmitArgs::new().timespec(&ts);
            ring.submitter().submit_with_args(1, &args)
        }
    };
    match result {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A page-aligned block from the global allocator, freed on drop unless leaked.
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Block {
    fn new(size: usize) -> io::Result<Block> {
        let layout = Layout::from_size_align(size.max(1), 4096)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size. Zeroed memory of this size comes from
        // fresh mmap pages, so pages no receive ever touches cost no RSS.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr)
            .map(|ptr| Block { ptr, layout })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in `Block::new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The provided-buffer ring of one reactor: `count` buffers of `size` bytes that the
/// kernel picks from when a multishot receive has data, so only connections with data
/// in flight hold receive memory.
pub struct BufRing {
    entries: Block,
    bufs: Block,
    /// Kept across the reactor's life; `leak` forgets it when the kernel may still write.
    count: u16,
    size: u32,
    tail: u16,
    /// Incremental consumption: how far into each buffer the kernel has filled.
    offsets: Vec<u32>,
    pub incremental: bool,
}

impl BufRing {
    /// Registers a buffer ring, incremental (`IOU_PBUF_RING_INC`, 6.12+) if `try_inc` and
    /// the kernel accepts it, else classic with `fallback` geometry.
    pub fn new(
        ring: &IoUring,
        bgid: u16,
        inc: (u16, u32),
        classic: (u16, u32),
        try_inc: bool,
    ) -> io::Result<BufRing> {
        if try_inc {
            match Self::register(ring, bgid, inc.0, inc.1, true) {
                Ok(b) => return Ok(b),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        Self::register(ring, bgid, classic.0, classic.1, false)
    }

    fn register(
        ring: &IoUring,
        bgid: u16,
        count: u16,
        size: u32,
        incremental: bool,
    ) -> io::Result<BufRing> {
        debug_assert!(count.is_power_of_two());
        let entries = Block::new(usize::from(count) * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Block::new(usize::from(count) * size as usize)?;
        let flags = if incremental { IOU_PBUF_RING_INC } else { 0 };
        // SAFETY: `entries` is page-aligned, zeroed, sized for `count` entries and lives
        // in the returned `BufRing`, which the reactor keeps until the ring is gone (or
        // leaks, see `leak`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.ptr.as_ptr() as u64,
                count,
                bgid,
                flags,
            )?;
        }
        let mut b = BufRing {
            entries,
            bufs,
            count,
            size,
            tail: 0,
            offsets: vec![0; usize::from(count)],
            incremental,
        };
        for bid in 0..count {
            b.recycle(bid);
        }
        b.publish();
        Ok(b)
    }

    /// Gives buffer `bid` back to the kernel (visible at the next `publish`).
    pub fn recycle(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        self.offsets[usize::from(bid)] = 0;
        let idx = usize::from(self.tail & (self.count - 1));
        // SAFETY: `idx < count`, so the entry is inside the registered ring. The kernel
        // reads only entries between its head and the published tail; this one is past
        // the published tail until `publish`.
        unsafe {
            let e = &mut *self.entries.ptr.as_ptr().cast::<BufRingEntry>().add(idx);
            e.set_addr(
                self.bufs
                    .ptr
                    .as_ptr()
                    .add(usize::from(bid) * self.size as usize) as u64,
            );
            e.set_len(self.size);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes recycled buffers visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's `resv`, inside the ring; the
        // kernel reads it with acquire semantics, so a release store orders the entries
        // written before it.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.ptr.as_ptr().cast::<BufRingEntry>());
            (*(tail as *const AtomicU16)).store(self.tail, Ordering::Release);
        }
    }

    /// The bytes a receive completion reports in buffer `bid`, and whether the buffer can
    /// be recycled once they are consumed. With incremental consumption the kernel keeps
    /// filling the same buffer (`more`), each completion after the last one's bytes.
    pub fn take(&mut self, bid: u16, len: usize, more: bool) -> Option<&[u8]> {
        let i = usize::from(bid);
        let off = *self.offsets.get(i)? as usize;
        if off + len > self.size as usize {
            return None;
        }
        if self.incremental && more {
            self.offsets[i] = (off + len) as u32;
        }
        // SAFETY: the range lies inside buffer `bid` (checked above). The kernel wrote it
        // before posting this completion and writes no byte of it again until we recycle
        // the buffer; with incremental consumption it may still fill bytes after it,
        // which this slice does not cover.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.bufs.ptr.as_ptr().add(i * self.size as usize + off),
                len,
            )
        })
    }

    /// Forgets the memory instead of freeing it: for a reactor that ends while the kernel
    /// might still complete a receive into it.
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

/// Small send buffers come from slabs of this many.
const SLAB_CHUNKS: usize = 64;
/// Most reply batches (a greeting, EHLO, the five replies of a pipelined message) fit.
pub const SMALL_SEND: usize = 1024;
/// Larger output goes out in pieces of at most this: the driver's output cap, so a
/// client that does not read holds no more here than there.
pub const LARGE_SEND: usize = 8 * 1024;
/// Large buffers kept for reuse; more are freed when returned.
const LARGE_KEEP: usize = 16;

/// A send buffer owned by a connection while its send is in flight.
pub enum SendBuf {
    Small(u32),
    Large(Box<[u8]>),
}

/// Send buffers: the kernel may read a send's bytes at any point until its completion,
/// so they are copied out of the driver (which keeps appending replies) into a buffer
/// nobody touches until then. Pooled, so sending allocates nothing in steady state.
#[derive(Default)]
pub struct SendPool {
    slabs: Vec<Block>,
    small_free: Vec<u32>,
    large_free: Vec<Box<[u8]>>,
}

impl SendPool {
    /// A buffer holding the first bytes of `data` (as many as fit); returns it, its
    /// address and the length copied.
    pub fn fill(&mut self, data: &[u8]) -> io::Result<(SendBuf, *const u8, usize)> {
        if data.len() <= SMALL_SEND {
            if self.small_free.is_empty() {
                let base = self.slabs.len() * SLAB_CHUNKS;
                self.slabs.push(Block::new(SLAB_CHUNKS * SMALL_SEND)?);
                self.small_free
                    .extend((base..base + SLAB_CHUNKS).rev().map(|i| i as u32));
            }
            let Some(i) = self.small_free.pop() else {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            };
            let ptr = self.small_ptr(i);
            // SAFETY: the chunk is free (not in flight), `SMALL_SEND` bytes long and does
            // not overlap `data`, which the driver owns.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
            Ok((SendBuf::Small(i), ptr, data.len()))
        } else {
            let mut b = self
                .large_free
                .pop()
                .unwrap_or_else(|| vec![0u8; LARGE_SEND].into_boxed_slice());
            let n = data.len().min(LARGE_SEND);
            b[..n].copy_from_slice(&data[..n]);
            let ptr = b.as_ptr();
            Ok((SendBuf::Large(b), ptr, n))
        }
    }

    fn small_ptr(&self, i: u32) -> *mut u8 {
        let i = i as usize;
        // SAFETY: chunk indices are only made for slabs that exist.
        unsafe {
            self.slabs[i / SLAB_CHUNKS]
                .ptr
                .as_ptr()
                .add((i % SLAB_CHUNKS) * SMALL_SEND)
        }
    }

    /// Takes a buffer back once its send has completed.
    pub fn put(&mut self, b: SendBuf) {
        match b {
            SendBuf::Small(i) => self.small_free.push(i),
            SendBuf::Large(b) => {
                if self.large_free.len() < LARGE_KEEP {
                    self.large_free.push(b);
                }
            }
        }
    }

    /// Forgets the memory: for a reactor that ends while a send may still read it.
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

/// The reactor's doorbell: sink completions and phase changes write it, a read armed on
/// the ring completes.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live stack array to our own eventfd. A full
        // counter (EAGAIN) means a wake-up is already pending, which is all we need.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Pins the calling thread to the `index`-th CPU this process may run on (modulo
/// their number). Returns the CPU.
pub fn pin_to_cpu(index: usize) -> io::Result<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `allowed`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &allowed) })
        .collect();
    let Some(&cpu) = cpus.get(index % cpus.len().max(1)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE; the set lives on this stack frame.
    unsafe {
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(cpu)
}

// Only the tests read what the probe found; the server needs only that it passed.
#[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
/// What the probe found usable.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    pub setup: SetupKind,
    pub incremental_buffers: bool,
}

/// Why the probe failed.
#[derive(Debug)]
pub enum ProbeFailure {
    /// `io_uring_setup` itself failed.
    Setup(io::Error),
    /// A feature or opcode the backend needs is missing.
    Missing(&'static str),
    /// Something else went wrong while trying it out.
    Other(&'static str, io::Error),
}

/// Builds a ring the way a reactor does and tries out every operation the backend
/// depends on: multishot accept, multishot receive into a buffer ring (incremental if
/// possible), send, eventfd read, cancel, and the timed wait.
pub fn probe() -> Result<Capabilities, ProbeFailure> {
    let (mut ring, setup) = build_ring(64, 256).map_err(ProbeFailure::Setup)?;
    if !ring.params().is_feature_ext_arg() {
        return Err(ProbeFailure::Missing(
            "IORING_FEAT_EXT_ARG (timed waits, 5.11)",
        ));
    }
    if !ring.params().is_feature_nodrop() {
        return Err(ProbeFailure::Missing("IORING_FEAT_NODROP (5.5)"));
    }
    let mut ops = Probe::new();
    ring.submitter()
        .register_probe(&mut ops)
        .map_err(|e| ProbeFailure::Other("IORING_REGISTER_PROBE", e))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "IORING_OP_ACCEPT"),
        (opcode::RecvMulti::CODE, "IORING_OP_RECV"),
        (opcode::Send::CODE, "IORING_OP_SEND"),
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
    ] {
        if !ops.is_supported(code) {
            return Err(ProbeFailure::Missing(name));
        }
    }
    let mut bufs = BufRing::new(&ring, 0, (8, 4096), (8, 4096), true).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            ProbeFailure::Missing("provided buffer rings (IORING_REGISTER_PBUF_RING, 5.19)")
        } else {
            ProbeFailure::Other("registering a buffer ring", e)
        }
    })?;
    let incremental = bufs.incremental;

    // Multishot receive: two writes must arrive as two completions of one request.
    let (a, b) = UnixStream::pair().map_err(|e| ProbeFailure::Other("socketpair", e))?;
    let recv = opcode::RecvMulti::new(Fd(b.as_raw_fd()), 0)
        .build()
        .user_data(1);
    // SAFETY: the receive writes only into the buffer ring's memory, which is never
    // freed (`leak_if_small` below), so no completion can outlive it.
    unsafe { push(&mut ring, &recv) }.map_err(|e| ProbeFailure::Other("submit", e))?;
    // Multishot accept on a loopback listener.
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| ProbeFailure::Other("binding a loopback listener", e))?;
    let accept = opcode::AcceptMulti::new(Fd(listener.as_raw_fd()))
        .build()
        .user_data(2);
    // SAFETY: no memory is handed over; the listener outlives the ring.
    unsafe { push(&mut ring, &accept) }.map_err(|e| ProbeFailure::Other("submit", e))?;
    ring.submit()
        .map_err(|e| ProbeFailure::Other("io_uring_enter", e))?;
    use std::io::Write;
    let _ = (&a).write_all(b"ab");
    let addr = listener
        .local_addr()
        .map_err(|e| ProbeFailure::Other("getsockname", e))?;
    let _client = std::net::TcpStream::connect(addr)
        .map_err(|e| ProbeFailure::Other("loopback connect", e))?;
    let (mut recv_ok, mut accept_ok) = (false, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !(recv_ok && accept_ok) && std::time::Instant::now() < deadline {
        submit_and_wait(&mut ring, Some(Duration::from_millis(100)))
            .map_err(|e| ProbeFailure::Other("io_uring_enter", e))?;
        for cqe in ring.completion() {
            let (res, flags) = (cqe.result(), cqe.flags());
            match cqe.user_data() {
                1 if res == -libc::EINVAL => {
                    return Err(ProbeFailure::Missing("multishot receive (6.0)"))
                }
                1 if res > 0 => {
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        let more = cqueue::buffer_more(flags);
                        let _ = bufs.take(bid, res as usize, more);
                        if !more {
                            bufs.recycle(bid);
                        }
                    }
                    recv_ok = cqueue::more(flags);
                }
                2 if res == -libc::EINVAL => {
                    return Err(ProbeFailure::Missing("multishot accept (5.19)"))
                }
                2 if res >= 0 => {
                    // SAFETY: a successful accept returns a new descriptor we now own.
                    drop(unsafe { OwnedFd::from_raw_fd(res) });
                    accept_ok = cqueue::more(flags);
                }
                _ => {}
            }
        }
    }
    if !recv_ok {
        return Err(ProbeFailure::Missing("multishot receive (6.0)"));
    }
    if !accept_ok {
        return Err(ProbeFailure::Missing("multishot accept (5.19)"));
    }
    // The ring goes first: closing it cancels the receive still armed on `b`. Closing the
    // socket pair first would complete it, and nothing touches `bufs` after.
    drop(a);
    drop(b);
    drop(ring);
    bufs.leak_if_small();
    Ok(Capabilities {
        setup,
        incremental_buffers: incremental,
    })
}

impl BufRing {
    /// The probe's tiny buffer ring: forgetting 32 KiB once per process is cheaper than
    /// proving the dead ring's teardown has finished with it.
    fn leak_if_small(self) {
        self.leak();
    }
}
