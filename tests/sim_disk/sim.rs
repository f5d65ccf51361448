//! One simulated run: a step list generated from a seed, executed against the real
//! spool writer on a [`SimFs`], with crashes followed by the real recovery and reader
//! on a real directory, and every invariant checked after each step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::spool::format::{encode_record, Position};
use smtpgw::sink::spool::recovery::recover_newest;
use smtpgw::sink::spool::writer::{
    create_segment, list_segments, segment_path, DiskLimits, Health, Writer, WriterShared,
};
use smtpgw::sink::spool::{ReadEvent, SpoolReader};
use smtpgw::sink::{Completion, PublishError, PublishResult};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use ulid::Ulid;

use crate::disk::{Clock, Fault, SimFs};
use crate::sim_support::{Draw, Rng};
use crate::spool_support::{envelope, seal};

const SIM_DIR: &str = "/sim/spool";
/// Plenty of room: what "space came back" means.
const AMPLE: u64 = 64 << 20;

#[derive(Clone, Debug)]
pub struct Config {
    pub segment_size: u64,
    pub segment_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub min_free_bytes: u64,
    pub capacity: u64,
    /// How long each `fdatasync` takes: at or above the writer's 100 ms mark delay
    /// when not 0.
    pub sync_ms: u64,
}

#[derive(Clone, Debug)]
pub enum Step {
    /// A message built from this seed goes to the writer.
    Submit {
        seed: u64,
    },
    /// The writer commits what it gathered (the thread does when its queue is empty).
    Commit,
    /// Time passes; a deadline that came is handled.
    Advance {
        ms: u64,
    },
    Fault(Fault),
    /// The disk's capacity becomes what is used plus `room`; `None`: plenty again.
    Space {
        room: Option<u64>,
    },
    /// `spool prune` (or the forwarder) removes the oldest closed segment.
    Prune,
    /// Power loss, the disk possibly damaging an acknowledged record, then a restart
    /// with recovery. `clean`: the writer was shut down first (SIGTERM).
    Crash {
        seed: u64,
        damage: Option<u64>,
        clean: bool,
    },
}

pub fn generate(seed: u64) -> (Config, Vec<Step>) {
    let mut rng = Rng::with_seed(seed);
    let segment_size = [2 << 10, 8 << 10, 64 << 10][rng.below(3) as usize];
    let config = Config {
        segment_size,
        segment_age: rng
            .one_in(3)
            .then(|| Duration::from_millis(50 + rng.below(2000))),
        max_bytes: rng.one_in(4).then(|| 16_000 + rng.below(200_000)),
        min_free_bytes: if rng.one_in(4) {
            1 + rng.below(8 << 10)
        } else {
            0
        },
        capacity: if rng.one_in(3) {
            40_000 + rng.below(400_000)
        } else {
            AMPLE
        },
        sync_ms: if rng.one_in(3) {
            100 + rng.below(300)
        } else {
            0
        },
    };
    let n = 200 + rng.below(1200) as usize;
    let mut steps = Vec::with_capacity(n);
    for _ in 0..n {
        let r = rng.below(1000);
        let step = match r {
            0..=449 => Step::Submit { seed: rng.u64(..) },
            450..=679 => Step::Commit,
            680..=799 => Step::Advance {
                ms: 1 + rng.below(300),
            },
            800..=889 => Step::Fault(match rng.below(6) {
                0 | 1 => Fault::TornWrite { keep: rng.u64(..) },
                2 | 3 => Fault::SyncFail { seed: rng.u64(..) },
                4 => Fault::DirSyncFail,
                _ => {
                    if rng.one_in(2) {
                        Fault::CreateFail
                    } else {
                        Fault::SetLenFail
                    }
                }
            }),
            890..=924 => Step::Space {
                room: (!rng.one_in(2)).then(|| rng.below(20_000)),
            },
            925..=954 => Step::Prune,
            _ => Step::Crash {
                seed: rng.u64(..),
                damage: rng.one_in(3).then(|| rng.u64(..)),
                clean: rng.one_in(4),
            },
        };
        steps.push(step);
    }
    (config, steps)
}

/// A broken invariant: the step it showed at, and what.
#[derive(Clone, Debug)]
pub struct Violation {
    pub step: usize,
    pub what: String,
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub trace_hash: u64,
    pub generations: u64,
    pub acked: u64,
    pub recovered_records: u64,
    pub faults: BTreeMap<&'static str, u64>,
    /// Messages answered 451 whose record a crash made durable all the same (a
    /// client retrying them stores a second copy: at least once, as documented).
    pub resurrected: u64,
    /// Records a client embedded in its body that the reader returned after the disk
    /// damaged the record around them.
    pub phantoms: u64,
    /// Acknowledged records a documented rule let go: damaged, or after a damaged
    /// one, past a commit mark that lagged.
    pub excused: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Queued,
    Acked,
    Refused,
    Failed,
    TooLarge,
    /// Unanswered when the writer died.
    Lost,
}

struct Msg {
    headers: Vec<(String, Vec<u8>)>,
    value: Bytes,
    received_at: DateTime<Utc>,
    frame: Vec<u8>,
    state: State,
    /// The segment (file name) and offset of its record, once acknowledged.
    loc: Option<(String, u64)>,
    /// The disk damaged its record; `excused`: a documented rule let it go (a damaged
    /// record past a lagging commit mark taken for a torn tail).
    damaged: bool,
    excused: bool,
    pruned: bool,
    rx: Option<UnboundedReceiver<PublishResult>>,
}

struct Trace(u64);

impl Trace {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x100_0000_01b3);
    }
}

struct World<'a> {
    config: &'a Config,
    fs: SimFs,
    shared: Arc<WriterShared>,
    writer: Option<Writer<SimFs>>,
    msgs: BTreeMap<Ulid, Msg>,
    /// Submitted to the current writer, not yet answered, in order.
    queued: Vec<Ulid>,
    last_durable: Position,
    trace: Trace,
    summary: Summary,
    scratch: tempfile::TempDir,
    /// The bytes the limits let the next commit write, from the disk as it was before
    /// it: a batch's records past this get 452, none before it does.
    room: u64,
}

fn violation(step: usize, what: String) -> Violation {
    Violation { step, what }
}

pub fn run(config: &Config, steps: &[Step]) -> Result<Summary, Violation> {
    let fs = SimFs::new(config.capacity, Clock::default(), config.sync_ms);
    let shared = new_shared(config, 0);
    let scratch = tempfile::tempdir().map_err(|e| violation(0, format!("tempdir: {e}")))?;
    let mut world = World {
        config,
        fs,
        shared,
        writer: None,
        msgs: BTreeMap::new(),
        queued: Vec::new(),
        last_durable: Position::default(),
        trace: Trace(0xcbf2_9ce4_8422_2325),
        summary: Summary::default(),
        scratch,
        room: u64::MAX,
    };
    world.start(0, 0).map_err(|what| violation(0, what))?;
    for (i, step) in steps.iter().enumerate() {
        world.step(step).map_err(|what| violation(i, what))?;
        world.trace.add(format!("{i}").as_bytes());
    }
    // The end is one last crash: everything acknowledged must come back.
    world
        .crash(0x5eed, None, true)
        .map_err(|what| violation(steps.len(), what))?;
    for (kind, n) in world.fs.0.borrow().fired.iter() {
        *world.summary.faults.entry(kind).or_default() += n;
    }
    world.summary.trace_hash = world.trace.0;
    world.summary.acked = world
        .msgs
        .values()
        .filter(|m| m.state == State::Acked)
        .count() as u64;
    Ok(world.summary)
}

fn new_shared(config: &Config, seq: u64) -> Arc<WriterShared> {
    Arc::new(WriterShared {
        dir: PathBuf::from(SIM_DIR),
        limits: DiskLimits {
            max_bytes: config.max_bytes,
            min_free_bytes: config.min_free_bytes,
        },
        health: Mutex::new(Health::Ok),
        durable: Mutex::new(Position::default()),
        durable_changed: Condvar::new(),
        writing: AtomicU64::new(seq),
        corrupt: AtomicU64::new(0),
        commits: None,
    })
}

/// A message from `seed`: zero to many recipients, a body of 0 to some KB that may
/// hold what looks like spool structures (a whole encoded record, the resync needle,
/// a commit mark's tag).
fn message(seed: u64, received_at: DateTime<Utc>) -> SealedMessage {
    let mut rng = Rng::with_seed(seed);
    let id = ulid(&mut rng);
    let mut envelope = envelope(
        "client.example",
        true,
        "192.0.2.7:40123",
        "from@example.com",
        "",
    );
    let rcpts = match rng.below(10) {
        0 => 0,
        1 => 20 + rng.below(200),
        _ => 1 + rng.below(4),
    };
    for i in 0..rcpts {
        envelope.push_rcpt(&format!("r{i}.{}@example.com", rng.below(1000)));
    }
    let size = match rng.below(10) {
        0 => 0,
        1 => rng.below(40_000),
        _ => rng.below(4_000),
    } as usize;
    let mut body = Vec::with_capacity(size + 512);
    while body.len() < size {
        match rng.below(6) {
            0 => {
                // A whole valid-looking record of a message nobody submitted.
                let inner = message_plain(rng.u64(..), received_at);
                let _ = encode_record(&mut body, &inner);
            }
            1 => body.extend_from_slice(b"\x07\x00smtp.id\x1a\x00\x00\x00"),
            2 => body.extend_from_slice(b"SMTPGWS2\0\0\0\0\0\0\0\0CMIT"),
            3 => body.extend(std::iter::repeat_n(0u8, 1 + rng.below(200) as usize)),
            _ => body.extend((0..1 + rng.below(300)).map(|_| rng.u64(..) as u8)),
        }
    }
    seal(id, envelope, received_at, &body)
}

fn message_plain(seed: u64, received_at: DateTime<Utc>) -> SealedMessage {
    let id = ulid(&mut Rng::with_seed(seed));
    let mut envelope = envelope(
        "inner.example",
        false,
        "192.0.2.8:25",
        "inner@example.com",
        "",
    );
    envelope.push_rcpt("victim@example.com");
    seal(id, envelope, received_at, b"embedded\r\n")
}

fn ulid(rng: &mut Rng) -> Ulid {
    Ulid::from(rng.u128(..))
}

/// The commit mark's end as the bytes of a segment header say (the larger valid copy).
fn mark_end(image: &[u8]) -> u64 {
    [16usize, 40]
        .iter()
        .filter_map(|&at| {
            let mark = image.get(at..at + 16)?;
            let end = u64::from_le_bytes(mark[..8].try_into().ok()?);
            let crc = u32::from_le_bytes(mark[8..12].try_into().ok()?);
            (crc == crc32c::crc32c(&mark[..8]) && &mark[12..] == b"CMIT").then_some(end)
        })
        .max()
        .unwrap_or(0)
}

/// The bytes `--spool-max-bytes` and `--spool-min-free-bytes` leave for the next batch
/// on `fs` (`u64::MAX` with neither set).
fn room(config: &Config, fs: &SimFs) -> u64 {
    let used = fs.used();
    let capacity = fs.0.borrow().capacity;
    let by_max = config
        .max_bytes
        .map_or(u64::MAX, |max| max.saturating_sub(used));
    let by_free = if config.min_free_bytes > 0 {
        capacity
            .saturating_sub(used)
            .saturating_sub(config.min_free_bytes)
    } else {
        u64::MAX
    };
    by_max.min(by_free)
}

fn seg_name(seq: u64) -> String {
    segment_path(Path::new(SIM_DIR), seq)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl World<'_> {
    fn now_ms(&self) -> u64 {
        self.fs.0.borrow().clock.ms()
    }

    fn received_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(1_800_000_000_000_000 + self.now_ms() as i64 * 1000)
            .expect("in range")
    }

    /// A writer on the current disk, appending to a new segment `seq` as `open_with`
    /// does (without one while there is no room: `start_when_full`).
    fn start(&mut self, seq: u64, generation: u64) -> Result<(), String> {
        self.shared = new_shared(self.config, seq);
        let segment = match create_segment(&self.fs, Path::new(SIM_DIR), seq) {
            Ok(segment) => Some(segment),
            Err(e) if e.is_no_space() => {
                *self.shared.health.lock().expect("health") =
                    Health::Failed(format!("no space to start a spool segment: {e}"));
                None
            }
            Err(e) => return Err(format!("generation {generation}: start failed: {e}")),
        };
        self.writer = Some(Writer::new(
            self.fs.clone(),
            Arc::clone(&self.shared),
            self.config.segment_size,
            self.config.segment_age,
            segment,
            seq,
        ));
        self.last_durable = *self.shared.durable.lock().expect("durable");
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), String> {
        match *step {
            Step::Submit { seed } => {
                let msg = message(seed, self.received_at());
                let Some(writer) = self.writer.as_mut() else {
                    return Ok(());
                };
                if self.msgs.contains_key(&msg.id) {
                    return Ok(());
                }
                let mut headers = Vec::new();
                msg.for_each_header(|n, v| headers.push((n.to_owned(), v.to_vec())));
                let mut frame = Vec::new();
                let encoded = encode_record(&mut frame, &msg).is_ok();
                let (tx, rx) = unbounded_channel();
                let id = msg.id;
                self.msgs.insert(
                    id,
                    Msg {
                        headers,
                        value: msg.value.clone(),
                        received_at: msg.received_at,
                        frame,
                        state: State::Queued,
                        loc: None,
                        damaged: false,
                        excused: false,
                        pruned: false,
                        rx: Some(rx),
                    },
                );
                self.trace.add(&id.0.to_le_bytes());
                let _ = encoded;
                writer.submit((msg, Completion::new(tx)));
                self.queued.push(id);
                let full = writer.batch_is_full();
                self.collect(false)?;
                if full {
                    self.commit()?;
                }
            }
            Step::Commit => self.commit()?,
            Step::Advance { ms } => {
                let clock = self.fs.0.borrow().clock.clone();
                clock.advance(ms);
                if let Some(writer) = self.writer.as_mut() {
                    if writer.next_deadline().is_some_and(|due| due <= clock.now()) {
                        writer.on_deadline();
                    }
                }
                self.check_durable()?;
            }
            Step::Fault(fault) => {
                self.trace.add(fault.kind().as_bytes());
                self.fs.arm(fault);
            }
            Step::Space { room } => {
                let used = self.fs.used();
                self.fs.0.borrow_mut().capacity = room.map_or(AMPLE, |r| used + r);
            }
            Step::Prune => {
                let writing = self
                    .shared
                    .writing
                    .load(std::sync::atomic::Ordering::Acquire);
                let oldest = self
                    .fs
                    .names()
                    .into_iter()
                    .filter(|n| n.ends_with(".seg") && *n < seg_name(writing))
                    .min();
                if let Some(name) = oldest {
                    self.trace.add(name.as_bytes());
                    self.fs.prune(&name);
                    for m in self.msgs.values_mut() {
                        if m.loc.as_ref().is_some_and(|(n, _)| *n == name) {
                            m.pruned = true;
                        }
                    }
                }
            }
            Step::Crash {
                seed,
                damage,
                clean,
            } => self.crash(seed, damage, clean)?,
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), String> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        let errors = self.fs.errors();
        let clock = self.fs.0.borrow().clock.clone();
        let before = clock.ms();
        self.room = room(self.config, &self.fs);
        writer.commit();
        let faulted = self.fs.errors() > errors;
        // Every deadline counts from when the batch's sync ended, however long it took:
        // one already due after a commit that synced without a fault means the writer
        // read the clock before the sync. (A failed or empty commit may leave an older
        // one due, which the thread then handles at once.)
        let synced = clock.ms() > before && !faulted;
        if let Some(due) = writer
            .next_deadline()
            .filter(|due| synced && *due <= clock.now())
        {
            return Err(format!(
                "right after a commit the writer has a deadline {} ms in the past",
                clock.now().duration_since(due).as_millis()
            ));
        }
        let answers = self.collect(faulted)?;
        if let Some(id) = self.queued.first() {
            return Err(format!(
                "message {id} was not answered by its batch's commit"
            ));
        }
        let health = self.shared.health.lock().expect("health").clone();
        let (mut ok, mut refused, mut failed) = (0, 0, 0);
        for state in answers {
            match state {
                State::Acked => ok += 1,
                State::Refused => refused += 1,
                State::Failed => failed += 1,
                _ => {}
            }
        }
        self.trace
            .add(format!("commit ok={ok} refused={refused} failed={failed} {health:?}").as_bytes());
        if failed > 0 && !matches!(health, Health::Failed(_)) {
            return Err(format!("a batch failed and health says {health:?}"));
        }
        if refused > 0 && failed == 0 && !matches!(health, Health::Full(_)) {
            return Err(format!("mail refused 452 and health says {health:?}"));
        }
        if ok > 0 && refused == 0 && failed == 0 && health != Health::Ok {
            return Err(format!("a good batch left health at {health:?}"));
        }
        self.check_durable()
    }

    fn check_durable(&mut self) -> Result<(), String> {
        let durable = *self.shared.durable.lock().expect("durable");
        if durable < self.last_durable {
            return Err(format!(
                "durable position went back from {} to {durable}",
                self.last_durable
            ));
        }
        self.last_durable = durable;
        Ok(())
    }

    /// Takes the answers that arrived; `faulted`: the disk returned an error since the
    /// commit began (the only excuse for a 451).
    fn collect(&mut self, faulted: bool) -> Result<Vec<State>, String> {
        let mut states = Vec::new();
        let mut still = Vec::new();
        // Where each record ends in its batch (answered messages only ever leave the
        // front of the queue, so the running sum is the writer's offset).
        let mut end = 0u64;
        for id in std::mem::take(&mut self.queued) {
            let msg = self.msgs.get_mut(&id).expect("queued message is known");
            end += msg.frame.len() as u64;
            let answer = match msg.rx.as_mut().map(|rx| rx.try_recv()) {
                Some(Ok(answer)) => answer,
                _ => {
                    still.push(id);
                    continue;
                }
            };
            msg.rx = None;
            msg.state = match answer {
                Ok(got) if got == id => State::Acked,
                Ok(got) => return Err(format!("message {id} answered with id {got}")),
                Err(PublishError::StorageFull) => {
                    if end <= self.room {
                        return Err(format!(
                            "{id} refused 452 though its batch's first {end} bytes fit the {} \
                             the limits left",
                            self.room
                        ));
                    }
                    State::Refused
                }
                Err(PublishError::Temporary(why)) => {
                    if !faulted {
                        return Err(format!("{id} answered 451 ({why}) with no disk error"));
                    }
                    State::Failed
                }
                Err(PublishError::TooLarge) => {
                    let fits = self
                        .config
                        .max_bytes
                        .is_none_or(|max| msg.frame.len() as u64 + 64 <= max);
                    if fits && !msg.frame.is_empty() {
                        return Err(format!("{id} answered too large"));
                    }
                    State::TooLarge
                }
            };
            self.trace.add(format!("{id} {:?}", msg.state).as_bytes());
            if msg.state == State::Acked {
                let loc = self.locate_durable(&id)?;
                self.msgs.get_mut(&id).expect("known").loc = Some(loc);
            }
            states.push(self.msgs[&id].state);
        }
        self.queued = still;
        Ok(states)
    }

    /// Where the acknowledged message's record is in the durable image: it must be
    /// there, whole, before the `250`.
    fn locate_durable(&self, id: &Ulid) -> Result<(String, u64), String> {
        let frame = &self.msgs[id].frame;
        let durable = *self.shared.durable.lock().expect("durable");
        let first = seg_name(durable.segment);
        let mut names = vec![first.clone()];
        names.extend(self.fs.names().into_iter().filter(|n| *n != first));
        for name in names {
            if let Some(image) = self.fs.durable(&name) {
                if let Some(at) = memchr::memmem::find(&image, frame) {
                    return Ok((name, at as u64));
                }
            }
        }
        Err(format!(
            "message {id} was acknowledged but its record is not on the disk's durable image"
        ))
    }

    /// Power loss (after a clean shutdown if `clean`), optional damage to one
    /// acknowledged record, the real recovery and reader on a real directory, the
    /// checks, and a new writer.
    fn crash(&mut self, seed: u64, damage: Option<u64>, clean: bool) -> Result<(), String> {
        if clean {
            if let Some(writer) = self.writer.as_mut() {
                let errors = self.fs.errors();
                if !self.queued.is_empty() {
                    self.room = room(self.config, &self.fs);
                    writer.commit();
                }
                writer.finish();
                self.collect(self.fs.errors() > errors)?;
            }
        }
        self.writer = None;
        // Whatever was still waiting is dropped with the writer's queue.
        for id in std::mem::take(&mut self.queued) {
            let msg = self.msgs.get_mut(&id).expect("known");
            msg.state = State::Lost;
            msg.rx = None;
        }
        let mut rng = Rng::with_seed(seed);
        let mut image = self.fs.crash(&mut rng);
        self.fs.disarm_all();
        self.summary.generations += 1;

        if let Some(dseed) = damage {
            self.damage(&mut image, dseed);
        }
        let newest = image.keys().filter(|n| n.ends_with(".seg")).max().cloned();
        let marks: BTreeMap<String, u64> = image
            .iter()
            .map(|(name, bytes)| (name.clone(), mark_end(bytes)))
            .collect();

        // The real directory.
        let dir = self
            .scratch
            .path()
            .join(format!("g{}", self.summary.generations));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        for (name, bytes) in &image {
            std::fs::write(dir.join(name), bytes).map_err(|e| format!("write {name}: {e}"))?;
        }
        let segments = list_segments(&dir).map_err(|e| format!("list: {e}"))?;
        if let Some((seq, path)) = segments.last() {
            recover_newest(&dir, *seq, path)
                .map_err(|e| format!("recovery refused to start the spool: {e}"))?;
        }
        let next_seq = segments.last().map_or(0, |(seq, _)| seq + 1);
        self.check_recovered(&dir, newest.as_deref(), &marks)?;

        // The next generation runs on what recovery left.
        let mut files = BTreeMap::new();
        for (_, path) in list_segments(&dir).map_err(|e| format!("list: {e}"))? {
            let bytes = std::fs::read(&path).map_err(|e| format!("read: {e}"))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.insert(name, bytes);
        }
        let _ = std::fs::remove_dir_all(&dir);
        for (kind, n) in self.fs.0.borrow().fired.iter() {
            *self.summary.faults.entry(kind).or_default() += n;
        }
        self.fs = self.fs.with_files(files);
        let generation = self.summary.generations;
        self.start(next_seq, generation)
    }

    /// The disk damages one acknowledged record in the crash image: one byte flipped,
    /// or a run of bytes zeroed or replaced.
    fn damage(&mut self, image: &mut BTreeMap<String, Vec<u8>>, seed: u64) {
        let mut rng = Rng::with_seed(seed);
        let candidates: Vec<Ulid> = self
            .msgs
            .iter()
            .filter(|(_, m)| m.state == State::Acked && !m.damaged && !m.pruned)
            .filter(|(_, m)| {
                m.loc.as_ref().is_some_and(|(name, at)| {
                    image
                        .get(name)
                        .is_some_and(|b| b.len() as u64 >= at + m.frame.len() as u64)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let id = candidates[rng.below(candidates.len() as u64) as usize];
        let msg = self.msgs.get_mut(&id).expect("known");
        let (name, at) = msg.loc.clone().expect("located");
        let bytes = image.get_mut(&name).expect("present");
        let len = msg.frame.len();
        let start = at as usize + rng.below(len as u64) as usize;
        let run = (1 + rng.below(64) as usize).min(at as usize + len - start);
        match rng.below(3) {
            0 => bytes[start] ^= 1 + rng.below(255) as u8,
            1 => {
                let before = bytes[start..start + run].to_vec();
                bytes[start..start + run].fill(0);
                if bytes[start..start + run] == before[..] {
                    bytes[start] ^= 0x5a;
                }
            }
            _ => {
                for b in &mut bytes[start..start + run] {
                    *b ^= 1 + rng.below(255) as u8;
                }
            }
        }
        msg.damaged = true;
        self.trace
            .add(format!("damage {id} {name}:{start}+{run}").as_bytes());
        *self.summary.faults.entry("disk_damage").or_default() += 1;
    }

    /// Everything the reader returns is a submitted message, byte-exact, once; every
    /// acknowledged message is returned, or (damaged by the disk) reported as corrupt,
    /// or (damaged past the commit mark a crash left, in the newest segment) cut as a
    /// torn tail as the format documents.
    fn check_recovered(
        &mut self,
        dir: &Path,
        newest: Option<&str>,
        marks: &BTreeMap<String, u64>,
    ) -> Result<(), String> {
        // Damaged records past their segment's commit mark (one that lagged: the
        // batch was synced and answered, its mark had not reached the disk).
        let damaged_past_mark: Vec<(String, u64)> = self
            .msgs
            .values()
            .filter(|m| m.damaged)
            .filter_map(|m| m.loc.clone())
            .filter(|(name, at)| marks.get(name).is_some_and(|mark| at >= mark))
            .collect();
        let mut reader = SpoolReader::open(dir).map_err(|e| format!("reader: {e}"))?;
        let mut seen = BTreeSet::new();
        let mut corrupt: Vec<(String, u64, u64)> = Vec::new();
        let mut records = 0u64;
        while let Some(event) = reader.next_event() {
            let event = event.map_err(|e| format!("reader failed: {e}"))?;
            match event {
                ReadEvent::Record(r) => {
                    records += 1;
                    let name = r
                        .segment
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let inside_damage = self.msgs.values().any(|m| {
                        m.damaged
                            && m.loc.as_ref().is_some_and(|(n, at)| {
                                *n == name
                                    && r.offset > *at
                                    && r.offset + r.frame_len <= at + m.frame.len() as u64
                            })
                    });
                    // Past a lagging mark, after an acknowledged record the disk
                    // damaged (power loss and damage in one window), the reader skips
                    // the length the bad frame claims, and that length may be the
                    // damage: it can land in a later body, on a frame a client put
                    // there. The same known limit as inside a damaged record.
                    let past_lagging_damage = marks.get(&name).is_some_and(|mark| {
                        r.offset >= *mark
                            && damaged_past_mark
                                .iter()
                                .any(|(n, d)| *n == name && *d < r.offset)
                    });
                    if (inside_damage || past_lagging_damage) && !self.msgs.contains_key(&r.id) {
                        // A known limit of resynchronisation: past damage, the reader
                        // looks for the next valid frame, and a valid frame a client
                        // put in its body is one. Only disk damage exposes it.
                        self.summary.phantoms += 1;
                        continue;
                    }
                    let Some(msg) = self.msgs.get(&r.id) else {
                        let near: Vec<String> = self
                            .msgs
                            .iter()
                            .filter(|(_, m)| m.loc.as_ref().is_some_and(|(n, _)| *n == name))
                            .map(|(id, m)| {
                                let at = m.loc.as_ref().map_or(0, |l| l.1);
                                format!(
                                    "{id}@{at}+{} {:?} damaged={}",
                                    m.frame.len(),
                                    m.state,
                                    m.damaged
                                )
                            })
                            .collect();
                        return Err(format!(
                            "recovery returned a record nobody submitted: id {} at {name}:{} \
                             (commit mark {:?}; corrupt so far {corrupt:?}; located here: {near:?})",
                            r.id,
                            r.offset,
                            marks.get(&name)
                        ));
                    };
                    if !seen.insert(r.id) {
                        return Err(format!(
                            "message {} returned twice ({name}:{})",
                            r.id, r.offset
                        ));
                    }
                    if r.headers != msg.headers
                        || r.value() != &msg.value[..]
                        || r.received_at != msg.received_at
                    {
                        return Err(format!(
                            "message {} returned with other bytes than were submitted",
                            r.id
                        ));
                    }
                    if msg.damaged {
                        return Err(format!(
                            "message {} returned though its record was damaged",
                            r.id
                        ));
                    }
                    match msg.state {
                        // Documented: a 451 after a failed `fdatasync` may have reached
                        // the disk all the same (a duplicate when the client retries).
                        State::Failed => self.summary.resurrected += 1,
                        // Refused before its batch was written: never on the disk.
                        State::Refused | State::TooLarge => {
                            return Err(format!(
                                "message {} was answered {:?} but recovery returned it ({name}:{})",
                                r.id, msg.state, r.offset
                            ));
                        }
                        State::Queued | State::Acked | State::Lost => {}
                    }
                }
                ReadEvent::Corrupt(range) | ReadEvent::TornTail(range) => {
                    let name = range
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    corrupt.push((name, range.offset, range.len));
                }
                ReadEvent::SegmentEnd { .. } => {}
            }
        }
        self.summary.recovered_records += records;
        self.trace
            .add(format!("recovered {records} corrupt {corrupt:?}").as_bytes());
        for (id, msg) in self.msgs.iter_mut() {
            if msg.state != State::Acked || msg.pruned || msg.excused {
                continue;
            }
            let (name, at) = msg.loc.clone().expect("acknowledged messages are located");
            let mark = marks.get(&name).copied().unwrap_or(0);
            let end = at + msg.frame.len() as u64;
            let reported = corrupt
                .iter()
                .any(|(n, off, len)| *n == name && *off < end && off + len > at);
            if !msg.damaged {
                if !seen.contains(id)
                    && reported
                    && at >= mark
                    && damaged_past_mark.iter().any(|(n, d)| *n == name && *d < at)
                {
                    // Documented: a damaged record past a lagging mark can take the
                    // records after it in that region along, in the range reported
                    // as corrupt (or a torn tail); one not in any reported range was
                    // dropped silently.
                    msg.excused = true;
                    self.summary.excused += 1;
                    continue;
                }
                if !seen.contains(id) {
                    return Err(format!(
                        "acknowledged message {id} ({name}:{at}) is gone after recovery"
                    ));
                }
                continue;
            }
            if reported {
                continue;
            }
            if newest == Some(name.as_str()) && at >= mark {
                // Documented: damage past a commit mark that lagged is a torn tail.
                msg.excused = true;
                self.summary.excused += 1;
                continue;
            }
            return Err(format!(
                "acknowledged message {id} ({name}:{at}) was damaged and dropped without a corruption report (commit mark {mark})"
            ));
        }
        Ok(())
    }
}
