//! The simulated disk under the spool writer: per file, the bytes a reader of the page
//! cache sees and the bytes the last successful sync made durable, with the writes in
//! between kept as operations; one-shot faults (a write torn at any byte then EIO, a
//! failed `fdatasync` that loses or half-keeps what it should have written, EIO from a
//! directory sync, from `create`, from `ftruncate`); a capacity (ENOSPC past it, a
//! short write first); and a crash that keeps, per file, its durable image plus any
//! subset of the later writes, each whole, torn at any byte or dropped, and names
//! created or removed without a directory sync either way. The disk keeps the
//! simulated clock, which each `fdatasync` moves on by the disk's sync time.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use smtpgw::sink::spool::writer::SpoolFs;

use crate::sim_support::{Draw, Rng};

/// A fault armed by the workload, spent on the next operation of its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `pwrite` keeps `keep % (len + 1)` bytes, then fails with EIO.
    TornWrite {
        keep: u64,
    },
    /// The next `fdatasync`/`fsync` fails with EIO; each pending write reaches the disk
    /// whole, torn or not at all (decided by `seed`), and none is pending any more:
    /// the next sync reports clean.
    SyncFail {
        seed: u64,
    },
    DirSyncFail,
    CreateFail,
    SetLenFail,
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::TornWrite { .. } => "torn_write",
            Fault::SyncFail { .. } => "fdatasync_eio",
            Fault::DirSyncFail => "dir_sync_eio",
            Fault::CreateFail => "create_eio",
            Fault::SetLenFail => "ftruncate_eio",
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(at, bytes) => {
            let at = *at as usize;
            if image.len() < at + bytes.len() {
                image.resize(at + bytes.len(), 0);
            }
            image[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Op::SetLen(len) => image.resize(*len as usize, 0),
    }
}

/// An operation that reaches the disk whole, torn at a byte, or not at all.
fn apply_maybe(image: &mut Vec<u8>, op: &Op, rng: &mut Rng) {
    match rng.below(4) {
        0 => {}
        1 | 2 => apply(image, op),
        _ => match op {
            Op::Write(at, bytes) => {
                let keep = rng.below(bytes.len() as u64 + 1) as usize;
                apply(image, &Op::Write(*at, bytes[..keep].to_vec()));
            }
            Op::SetLen(_) => apply(image, op),
        },
    }
}

#[derive(Default)]
struct FileState {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Op>,
}

/// The simulated time, in milliseconds from an arbitrary start; clones share it, so it
/// outlives the disk a crash replaces.
#[derive(Clone)]
pub struct Clock {
    base: Instant,
    ms: Rc<Cell<u64>>,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock {
            base: Instant::now(),
            ms: Rc::default(),
        }
    }
}

impl Clock {
    pub fn ms(&self) -> u64 {
        self.ms.get()
    }

    pub fn advance(&self, ms: u64) {
        self.ms.set(self.ms.get() + ms);
    }

    pub fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.ms.get())
    }
}

#[derive(Default)]
pub struct Disk {
    pub clock: Clock,
    /// How long each `fdatasync`/`fsync` takes, failed or not.
    pub sync_ms: u64,
    files: BTreeMap<u64, FileState>,
    /// The directory as `readdir` shows it, and as the last directory sync left it.
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    next_id: u64,
    pub capacity: u64,
    armed: Vec<Fault>,
    /// Errors the disk returned, by kind.
    pub fired: BTreeMap<&'static str, u64>,
    pub errors: u64,
}

impl Disk {
    fn fire(&mut self, kind: &'static str) {
        *self.fired.entry(kind).or_default() += 1;
        self.errors += 1;
    }

    fn take(&mut self, pred: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let i = self.armed.iter().position(pred)?;
        Some(self.armed.remove(i))
    }

    fn used(&self) -> u64 {
        self.names
            .values()
            .filter_map(|id| self.files.get(id))
            .map(|f| f.data.len() as u64)
            .sum()
    }

    fn sync(&mut self, id: u64) -> io::Result<()> {
        self.clock.advance(self.sync_ms);
        if let Some(Fault::SyncFail { seed }) = self.take(|f| matches!(f, Fault::SyncFail { .. })) {
            self.fire("fdatasync_eio");
            let mut rng = Rng::with_seed(seed);
            if let Some(file) = self.files.get_mut(&id) {
                for op in std::mem::take(&mut file.pending) {
                    apply_maybe(&mut file.durable, &op, &mut rng);
                }
            }
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        if let Some(file) = self.files.get_mut(&id) {
            for op in std::mem::take(&mut file.pending) {
                apply(&mut file.durable, &op);
            }
        }
        Ok(())
    }
}

fn libc_eio() -> i32 {
    5
}

fn libc_enospc() -> i32 {
    28
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The handle the writer holds; clones share one disk.
#[derive(Clone, Default)]
pub struct SimFs(pub Rc<RefCell<Disk>>);

impl SimFs {
    pub fn new(capacity: u64, clock: Clock, sync_ms: u64) -> SimFs {
        let fs = SimFs::default();
        {
            let mut disk = fs.0.borrow_mut();
            disk.capacity = capacity;
            disk.clock = clock;
            disk.sync_ms = sync_ms;
        }
        fs
    }

    /// A disk like this one (capacity, clock, sync time) holding `files`, all durable
    /// (what recovery left on a real one).
    pub fn with_files(&self, files: BTreeMap<String, Vec<u8>>) -> SimFs {
        let (capacity, clock, sync_ms) = {
            let disk = self.0.borrow();
            (disk.capacity, disk.clock.clone(), disk.sync_ms)
        };
        let fs = SimFs::new(capacity, clock, sync_ms);
        {
            let mut disk = fs.0.borrow_mut();
            for (name, bytes) in files {
                let id = disk.next_id;
                disk.next_id += 1;
                disk.files.insert(
                    id,
                    FileState {
                        data: bytes.clone(),
                        durable: bytes,
                        pending: Vec::new(),
                    },
                );
                disk.names.insert(name.clone(), id);
                disk.durable_names.insert(name, id);
            }
        }
        fs
    }

    pub fn arm(&self, fault: Fault) {
        self.0.borrow_mut().armed.push(fault);
    }

    pub fn disarm_all(&self) {
        self.0.borrow_mut().armed.clear();
    }

    pub fn used(&self) -> u64 {
        self.0.borrow().used()
    }

    pub fn errors(&self) -> u64 {
        self.0.borrow().errors
    }

    /// The durable bytes of the file named `name`, if it exists.
    pub fn durable(&self, name: &str) -> Option<Vec<u8>> {
        let disk = self.0.borrow();
        let id = disk.names.get(name)?;
        disk.files.get(id).map(|f| f.durable.clone())
    }

    pub fn names(&self) -> Vec<String> {
        self.0.borrow().names.keys().cloned().collect()
    }

    /// Removes a file and syncs the directory, as `spool prune` does.
    pub fn prune(&self, name: &str) {
        let mut disk = self.0.borrow_mut();
        disk.names.remove(name);
        disk.durable_names = disk.names.clone();
    }

    /// What a power loss leaves: the files that survive, each its durable image plus
    /// any of the writes after it, whole, torn or lost, and possibly garbage past the
    /// end (the size reached the disk, the data did not).
    pub fn crash(&self, rng: &mut Rng) -> BTreeMap<String, Vec<u8>> {
        let disk = self.0.borrow();
        let mut all: BTreeMap<&String, (Option<u64>, Option<u64>)> = BTreeMap::new();
        for (name, id) in &disk.names {
            all.entry(name).or_default().0 = Some(*id);
        }
        for (name, id) in &disk.durable_names {
            all.entry(name).or_default().1 = Some(*id);
        }
        let mut out = BTreeMap::new();
        for (name, (live, durable)) in all {
            let id = match (live, durable) {
                (Some(a), Some(b)) if a == b => a,
                // Created or removed since the last directory sync: either way.
                (Some(a), _) | (None, Some(a)) => {
                    if rng.below(2) == 0 {
                        continue;
                    }
                    a
                }
                (None, None) => continue,
            };
            let Some(file) = disk.files.get(&id) else {
                continue;
            };
            let mut image = file.durable.clone();
            for op in &file.pending {
                apply_maybe(&mut image, op, rng);
            }
            if !file.pending.is_empty() && rng.below(8) == 0 {
                let n = 1 + rng.below(600) as usize;
                if rng.below(2) == 0 {
                    image.extend(std::iter::repeat_n(0u8, n));
                } else {
                    image.extend((0..n).map(|_| rng.u64(..) as u8));
                }
            }
            out.insert(name.clone(), image);
        }
        out
    }
}

impl SpoolFs for SimFs {
    type File = u64;

    fn create_new(&self, path: &Path) -> io::Result<u64> {
        let mut disk = self.0.borrow_mut();
        if disk.take(|f| *f == Fault::CreateFail).is_some() {
            disk.fire("create_eio");
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        let name = name_of(path);
        if disk.names.contains_key(&name) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let id = disk.next_id;
        disk.next_id += 1;
        disk.files.insert(id, FileState::default());
        disk.names.insert(name, id);
        Ok(id)
    }

    fn write_all_at(&self, file: &u64, bytes: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        let len = disk.files.get(file).map_or(0, |f| f.data.len() as u64);
        let growth = (offset + bytes.len() as u64).saturating_sub(len);
        let room = disk.capacity.saturating_sub(disk.used());
        let (keep, error) = if let Some(Fault::TornWrite { keep }) =
            disk.take(|f| matches!(f, Fault::TornWrite { .. }))
        {
            disk.fire("torn_write");
            ((keep % (bytes.len() as u64 + 1)) as usize, Some(libc_eio()))
        } else if growth > room {
            disk.fire("enospc");
            (
                (bytes.len() as u64 - (growth - room)) as usize,
                Some(libc_enospc()),
            )
        } else {
            (bytes.len(), None)
        };
        if keep > 0 {
            let op = Op::Write(offset, bytes[..keep].to_vec());
            if let Some(f) = disk.files.get_mut(file) {
                apply(&mut f.data, &op);
                f.pending.push(op);
            }
        }
        match error {
            Some(code) => Err(io::Error::from_raw_os_error(code)),
            None => Ok(()),
        }
    }

    fn sync_data(&self, file: &u64) -> io::Result<()> {
        self.0.borrow_mut().sync(*file)
    }

    fn sync_all(&self, file: &u64) -> io::Result<()> {
        self.0.borrow_mut().sync(*file)
    }

    fn set_len(&self, file: &u64, len: u64) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        if disk.take(|f| *f == Fault::SetLenFail).is_some() {
            disk.fire("ftruncate_eio");
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        if let Some(f) = disk.files.get_mut(file) {
            let op = Op::SetLen(len);
            apply(&mut f.data, &op);
            f.pending.push(op);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        match disk.names.remove(&name_of(path)) {
            Some(_) => Ok(()),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        if disk.take(|f| *f == Fault::DirSyncFail).is_some() {
            disk.fire("dir_sync_eio");
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        disk.durable_names = disk.names.clone();
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.0.borrow().names.contains_key(&name_of(path))
    }

    fn free_bytes(&self, _dir: &Path) -> Option<u64> {
        let disk = self.0.borrow();
        Some(disk.capacity.saturating_sub(disk.used()))
    }

    fn segment_bytes(&self, _dir: &Path) -> Option<u64> {
        let disk = self.0.borrow();
        Some(
            disk.names
                .iter()
                .filter(|(name, _)| name.ends_with(".seg"))
                .filter_map(|(_, id)| disk.files.get(id))
                .map(|f| f.data.len() as u64)
                .sum(),
        )
    }

    fn now(&self) -> Instant {
        self.0.borrow().clock.now()
    }
}
