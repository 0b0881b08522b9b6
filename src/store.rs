//! The durable store: every SQL statement lives here.
//!
//! SQLite in WAL mode with `synchronous=FULL`, driven by one writer thread. Callers send it
//! closures; the thread runs whatever has queued up inside one transaction and answers every
//! caller only after the single `COMMIT` — group commit: one fsync for many concurrent webhooks.
//! Should one closure fail, the batch is rolled back and each closure runs again alone, so one
//! failure does not undo the others (cheaper than a savepoint per closure, which copied every
//! page a closure touched into a sub-journal).
//!
//! Tables: `calls` (one row per (sid, event), the call object as received), `deliveries` (one
//! row per (call, rule, action): `pending` -> `sending` -> `done` | back to `pending` with a
//! later `next_attempt_at` | `dead`), `attempts` (each try and the destination's answer) and
//! `meta` (small daemon state such as the time of the last call).

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::rules::Action;

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 1024;

/// The call the readiness probe writes and undoes; no webhook has this event.
const PROBE_SID: &str = "callnotify-readiness-probe";
const PROBE_EVENT: &str = "readiness-probe";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not a `source`: its text is already in the message, and `{:#}` would print it twice.
    #[error("store error: {0}")]
    Sqlite(rusqlite::Error),
    /// What keeps the store from being written, named (see [`write_cause`]).
    #[error("the store cannot be written: {0}")]
    CannotWrite(String),
    /// The disk holding the store is full; the message names it. Passes once there is room.
    #[error("{0}")]
    DiskFull(String),
    #[error("store commit failed: {0}")]
    Commit(String),
    #[error("store is closed")]
    Closed,
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("another callnotify daemon is using the store at {path} (it holds {lock}); stop it first, or give this one its own store.path")]
    InUse { path: String, lock: String },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Sqlite(e)
    }
}

impl StoreError {
    /// `e` from the store at `path`: where SQLite could not write or open it, what is in the
    /// way, by name ("attempt to write a readonly database", "disk I/O error" name nothing).
    fn at(path: &Path, e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode::{CannotOpen, DiskFull, ReadOnly, SystemIoFailure};
        match e.sqlite_error_code() {
            Some(ReadOnly | CannotOpen | DiskFull | SystemIoFailure) => match write_cause(path) {
                Some(Cause::Full(why)) => StoreError::DiskFull(why),
                Some(Cause::Other(why)) => StoreError::CannotWrite(why),
                None => StoreError::Sqlite(e),
            },
            _ => StoreError::Sqlite(e),
        }
    }

    /// The message without the variant's prefix, for [`StoreError::Open`]'s reason.
    fn reason(self) -> String {
        match self {
            StoreError::Sqlite(e) => e.to_string(),
            StoreError::CannotWrite(cause) => cause,
            other => other.to_string(),
        }
    }
}

/// The path of a file SQLite keeps beside the store: `-wal`, `-shm`.
fn beside(store: &Path, suffix: &str) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Room a trial write asks for: what SQLite needs to open a store (its `-shm` index is 32 KiB)
/// with some to spare.
const TRIAL_BYTES: usize = 64 * 1024;

/// What keeps SQLite from writing the store at `path`: the file system is read-only, the store
/// file or the write-ahead log or its index beside it cannot be written by this process, the
/// directory where those two are created cannot be written, or the disk is full; None when none
/// of these is so. The store's own files are never opened here: closing any handle to them
/// would drop the locks SQLite holds on them for the whole process (a `deliveries` command
/// could then checkpoint and remove the log under the running daemon). They are asked with
/// SQLite's own access check instead, and the directory is tried by writing (and removing) a
/// small file of our own beside the store.
pub(crate) fn write_cause(path: &Path) -> Option<Cause> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let trial = dir.join(format!(".callnotify-write-check-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&trial)
        .map_err(|e| (false, e))
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &[0; TRIAL_BYTES])
                .and_then(|()| f.sync_all())
                .map_err(|e| (true, e))
        });
    let _ = std::fs::remove_file(&trial);
    if let Err((_, e)) = &written {
        if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
            return Some(Cause::Other(format!(
                "{} is on a read-only file system",
                path.display()
            )));
        }
    }
    for file in [
        path.to_path_buf(),
        beside(path, "-wal"),
        beside(path, "-shm"),
    ] {
        if file.exists() && !may_write(&file) {
            let owner = owner_and_mode(&file).map(|o| format!(" ({o})"));
            return Some(Cause::Other(format!(
                "{} cannot be written by this process{}",
                file.display(),
                owner.unwrap_or_default()
            )));
        }
    }
    match written {
        Ok(()) => None,
        Err((_, e)) if e.kind() == std::io::ErrorKind::StorageFull => Some(Cause::Full(format!(
            "the disk holding {} is full (no space left on device)",
            path.display()
        ))),
        // Created, but the write failed otherwise: not a question of permissions.
        Err((true, _)) => None,
        Err((false, e)) => Some(Cause::Other(format!(
            "{} (the directory holding the store: SQLite creates {} and {} there) cannot be \
             written by this process ({e}{})",
            dir.display(),
            beside(path, "-wal").display(),
            beside(path, "-shm").display(),
            owner_and_mode(dir)
                .map(|o| format!("; {o}"))
                .unwrap_or_default()
        ))),
    }
}

/// Whether this process may read and write `file`, as SQLite's own VFS decides it (`access(2)`
/// on Unix: permissions, ACLs, an immutable file), without opening it. True when it cannot tell.
fn may_write(file: &Path) -> bool {
    use rusqlite::ffi;
    let Some(name) = file.to_str().and_then(|s| std::ffi::CString::new(s).ok()) else {
        return true;
    };
    let mut answer: std::ffi::c_int = 0;
    // SAFETY: the default VFS is registered for the life of the process and never freed;
    // `name` is a NUL-terminated string that outlives the call, and `answer` a valid int.
    let rc = unsafe {
        let vfs = ffi::sqlite3_vfs_find(std::ptr::null());
        match vfs.as_ref().and_then(|v| v.xAccess) {
            Some(access) => access(
                vfs,
                name.as_ptr(),
                ffi::SQLITE_ACCESS_READWRITE,
                &mut answer,
            ),
            None => return true,
        }
    };
    rc != ffi::SQLITE_OK || answer != 0
}

/// Why the store cannot be written ([`write_cause`]).
#[derive(Debug, PartialEq)]
pub(crate) enum Cause {
    /// No space left: passes by itself once some is freed.
    Full(String),
    /// Read-only: someone must change a mount, an owner or a mode.
    Other(String),
}

#[cfg(unix)]
fn owner_and_mode(file: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some(format!(
        "owned by uid {}, mode {:o}",
        m.uid(),
        m.mode() & 0o7777
    ))
}

#[cfg(not(unix))]
fn owner_and_mode(_: &Path) -> Option<String> {
    None
}

/// One daemon per store. A second `serve` on the same store would requeue, as it starts, the
/// deliveries the first one has in flight (so they are sent twice), and sweep the first one's
/// queue by its own channel list; it is refused instead. The lock is the operating system's
/// on a file beside the store (not the store itself: closing any other handle to the database
/// file would drop SQLite's own locks), so it goes with the process however that ends. The
/// `deliveries` commands do not take it: they work while the daemon runs.
#[derive(Debug)]
pub struct DaemonLock {
    _file: std::fs::File,
}

impl DaemonLock {
    pub fn acquire(store: &Path) -> Result<DaemonLock, StoreError> {
        let mut name = store.as_os_str().to_owned();
        name.push(".lock");
        let lock = PathBuf::from(name);
        let open_err = |e: std::io::Error| StoreError::Open {
            path: store.display().to_string(),
            reason: format!("{}: {e}", lock.display()),
        };
        if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(open_err)?;
        match file.try_lock() {
            Ok(()) => Ok(DaemonLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
                path: store.display().to_string(),
                lock: lock.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(open_err(e)),
        }
    }
}

/// Work for the writer thread: statements to run inside its transaction, then an answer.
trait Work: Send {
    /// Runs the statements and keeps their result; false when they failed. May run twice: a
    /// second time, alone, when a neighbour in the batch failed and the batch was rolled back.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: the kept result once committed, or why the transaction did not commit.
    fn answer(self: Box<Self>, not_committed: Option<&str>);
}

type Job = Box<dyn Work>;

/// What the writer thread is sent: work, or the order to close the store.
enum Msg {
    Job(Job),
    /// Commit what came before, close the connection (SQLite checkpoints the write-ahead log
    /// into the store file and deletes it), then answer. Work sent after it is refused.
    Close(oneshot::Sender<()>),
}

struct Pending<T, F> {
    f: F,
    result: Option<Result<T, StoreError>>,
    tx: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Work for Pending<T, F>
where
    T: Send,
    F: Fn(&Connection) -> rusqlite::Result<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = (self.f)(conn).map_err(|e| error_of(conn, e));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, not_committed: Option<&str>) {
        let answer = match (self.result, not_committed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), None) => Ok(v),
            (_, Some(e)) => Err(StoreError::Commit(e.to_string())),
            (None, None) => Err(StoreError::Closed),
        };
        let _ = self.tx.send(answer);
    }
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Msg>,
}

/// What a commit survives. `full` (the default) fsyncs every commit: an acknowledged call
/// survives a power cut. `normal` fsyncs only at WAL checkpoints: an acknowledged call survives a
/// crash or `kill -9` of the process, but the last commits can be lost if the machine loses
/// power; it is several times faster at low concurrency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    #[default]
    Full,
    Normal,
}

/// A delivery owed by a new call.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub rule: String,
    pub action_idx: usize,
    pub action: Action,
    /// The type of the action's channel when the call was matched (`slack`, `email`, `log`):
    /// the action was planned for it, so it is not sent if the channel's type changes.
    pub channel_type: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Inserted {
    Accepted { call_id: i64, deliveries: usize },
    Duplicate,
}

/// A delivery claimed for sending, with its call.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub call_id: i64,
    pub rule: String,
    pub channel: String,
    pub action: Action,
    /// The channel's type when the delivery was planned; None in rows from before it was kept.
    pub channel_type: Option<String>,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Start of the current retry window (creation, or the last replay), unix ms.
    pub window_start: i64,
    pub received_at: i64,
    pub sid: String,
    pub event: String,
    pub call_body: String,
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    Done,
    Retry { next_attempt_at: i64 },
    Dead,
}

/// One finished attempt at a delivery, to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub id: i64,
    /// 1-based.
    pub attempt: u32,
    /// When it finished, unix ms.
    pub at: i64,
    pub outcome: Recorded,
    pub latency_ms: i64,
    /// The destination's answer or the error.
    pub detail: Option<String>,
}

/// One delivery as `deliveries list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub sid: String,
    pub event: String,
    pub rule: String,
    pub channel: String,
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_error: Option<String>,
}

/// The backlog: unfinished deliveries by state and how long the longest-waiting one has waited,
/// for metrics. Finished deliveries are not counted (that would scan the history every few
/// seconds); the `deliveries_total{outcome="done"}` counter tells how many were done.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub pending: i64,
    pub sending: i64,
    pub dead: i64,
    /// Since when the longest-waiting pending or sending delivery has waited: when it entered
    /// the queue, or was replayed from dead (its retry window's start), not when it was first
    /// created. A replay of old dead deliveries is new work, not a stuck queue.
    pub oldest_pending_since: Option<i64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS calls (
    id          INTEGER PRIMARY KEY,
    sid         TEXT NOT NULL,
    event       TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    body        TEXT NOT NULL,
    UNIQUE (sid, event)
);
CREATE INDEX IF NOT EXISTS calls_received ON calls (received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY,
    call_id         INTEGER NOT NULL REFERENCES calls(id) ON DELETE CASCADE,
    rule            TEXT NOT NULL,
    action_idx      INTEGER NOT NULL,
    channel         TEXT NOT NULL,
    action          TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sending', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    window_start    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    channel_type    TEXT,
    UNIQUE (call_id, rule, action_idx)
);
-- Only unfinished rows are indexed by state, so these indexes hold the backlog, not the history:
-- claiming and the queue gauges cost the same with ten or ten million finished deliveries.
DROP INDEX IF EXISTS deliveries_due;
DROP INDEX IF EXISTS deliveries_status;
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (channel, id, next_attempt_at)
    WHERE status = 'pending';
DROP INDEX IF EXISTS deliveries_open;
CREATE INDEX IF NOT EXISTS deliveries_waiting ON deliveries (status, window_start)
    WHERE status != 'done';
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    latency_ms  INTEGER,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (delivery_id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

// The statements that run on every call or every few seconds. Each must find its rows through
// an index (`indexed_queries_never_scan_a_whole_table` checks the query plans): a full scan
// here grows with the history and stalls the writer thread that every webhook waits for.
/// Deliveries left `sending` by a previous process go back in the queue.
const RESET_INFLIGHT: &str = "UPDATE deliveries SET status = 'pending', next_attempt_at = MIN(next_attempt_at, ?1), updated_at = ?1
                 WHERE status != 'done' AND status = 'sending'";

/// The first channel after ?1 with pending deliveries: one index seek, so listing the channels
/// costs a seek per channel however long the backlog is (a `DISTINCT` would walk all of it).
const NEXT_PENDING_CHANNEL: &str =
    "SELECT MIN(channel) FROM deliveries WHERE status = 'pending' AND channel > ?1";

/// When a channel's next pending delivery falls due.
const NEXT_DUE: &str =
    "SELECT MIN(next_attempt_at) FROM deliveries WHERE channel = ?1 AND status = 'pending'";

/// Claims a channel's due deliveries, oldest first.
const CLAIM: &str = "UPDATE deliveries SET status = 'sending', updated_at = ?2
         WHERE id IN (SELECT id FROM deliveries
                      WHERE channel = ?1 AND status = 'pending' AND next_attempt_at <= ?2
                      ORDER BY id LIMIT ?3)
         RETURNING id, call_id, rule, action, attempts, window_start, channel_type";

/// The next calls past retention, in the order they came.
const PRUNE_NEXT: &str = "SELECT received_at, id FROM calls
             WHERE received_at < ?1 AND (received_at, id) > (?2, ?3)
             ORDER BY received_at, id LIMIT ?4";

/// Deletes one call (and, by cascade, its deliveries and attempts) once all are done.
const PRUNE_CALL: &str = "DELETE FROM calls WHERE id = ?1 AND NOT EXISTS (
             SELECT 1 FROM deliveries d WHERE d.call_id = ?1 AND d.status != 'done')";

/// The backlog by state.
const OPEN_BY_STATE: &str =
    "SELECT status, COUNT(*) FROM deliveries WHERE status != 'done' GROUP BY status";

/// Dead deliveries back in the queue, due at ?1, with a fresh retry window.
const REQUEUE_DEAD: &str = "UPDATE deliveries SET status = 'pending', attempts = 0,
         next_attempt_at = ?1, window_start = ?1, updated_at = ?1
     WHERE status != 'done' AND status = 'dead'";

/// Pending deliveries due at ?1 at the latest (their attempts and window kept).
const DUE_NOW_ANY: &str = "UPDATE deliveries SET next_attempt_at = MIN(next_attempt_at, ?1),
         updated_at = ?1
     WHERE status = 'pending'";

/// [`DUE_NOW_ANY`] for those not due yet, so the count says how many were moved.
const DUE_NOW: &str = "UPDATE deliveries SET next_attempt_at = ?1, updated_at = ?1
     WHERE status = 'pending' AND next_attempt_at > ?1";

/// Since when the longest-waiting unfinished delivery has waited (see [`Stats`]).
const OLDEST_OPEN: &str = "SELECT MIN(window_start) FROM deliveries
             WHERE status != 'done' AND status IN ('pending', 'sending')";

/// What [`Store::retry`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retried {
    /// Dead deliveries put back in the queue.
    pub requeued: usize,
    /// Pending deliveries made due now.
    pub made_due: usize,
    /// Of the ids given, those that were neither dead nor pending, each with its status (None:
    /// no such delivery).
    pub untouched: Vec<(i64, Option<String>)>,
}

impl Store {
    /// Opens (creating if needed) the store at `path` with `synchronous=FULL`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, Durability::Full)
    }

    /// Opens (creating if needed) the store at `path` and starts its writer thread.
    pub fn open_with(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        let (conn, file) = connect(path, durability)?;
        Self::start(path, move |rx| writer(conn, file, rx))
    }

    /// The daemon's open: as [`Store::open_with`], and deliveries left `sending` by the last
    /// process are requeued (as [`Store::reset_inflight`] does, at `now()`) before any job.
    /// Returns the store with how many were requeued, or with why it waits: on a full disk
    /// (where the store cannot be opened, or the requeue, the first write, cannot be made) the
    /// store is returned all the same, and its thread tries to open it again every second.
    /// Until it opens, every job is answered that the disk is full (the webhook answers 503,
    /// `/readyz` is not ready); once it opens, the requeue comes first, then it works as any
    /// store. A daemon that exited instead would be restarted by systemd in a loop until it
    /// gave up, and would need starting by hand once space was freed.
    pub fn open_or_wait<N>(
        path: &Path,
        durability: Durability,
        now: N,
    ) -> Result<(Store, Result<usize, String>), StoreError>
    where
        N: Fn() -> i64 + Send + 'static,
    {
        let why = match connect_and_requeue(path, durability, now()) {
            Ok((conn, file, requeued)) => {
                let store = Self::start(path, move |rx| writer(conn, file, rx))?;
                return Ok((store, Ok(requeued)));
            }
            Err(StoreError::DiskFull(why)) => why,
            Err(e) => return Err(e),
        };
        let at = path.to_path_buf();
        let waiting = why.clone();
        let store = Self::start(path, move |rx| {
            if let Some((conn, file)) = wait_for_room(&at, durability, waiting, &now, &rx) {
                writer(conn, file, rx)
            }
        })?;
        Ok((store, Err(why)))
    }

    fn start<W>(path: &Path, run: W) -> Result<Store, StoreError>
    where
        W: FnOnce(mpsc::Receiver<Msg>) + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("callnotify-store".into())
            .spawn(move || run(rx))
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Store { tx })
    }

    /// Runs `f` in the writer thread, inside the current group transaction; the answer comes
    /// after that transaction committed. `f` may run twice (see [`Work::run`]), so it is `Fn`.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(Pending {
            f,
            result: None,
            tx,
        });
        self.tx
            .send(Msg::Job(job))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits the work already sent, then closes the store for every handle: the write-ahead
    /// log is checkpointed into the store file and removed, so a stopped daemon leaves one
    /// self-contained file (what a copy taken while it is stopped needs). Later work answers
    /// [`StoreError::Closed`]. Returns once the file is closed.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Stores a call and the deliveries it owes, once per (sid, event).
    pub async fn insert_call(
        &self,
        sid: String,
        event: &'static str,
        body: String,
        received_at: i64,
        deliveries: Vec<NewDelivery>,
    ) -> Result<Inserted, StoreError> {
        self.run(move |conn| insert_call(conn, &sid, event, &body, received_at, &deliveries))
            .await
    }

    /// As [`Store::insert_call`], and sets `note` (a meta key and value) in the same transaction:
    /// state that must change with the call it queued, such as the quiet alert's.
    pub async fn insert_call_noting(
        &self,
        sid: String,
        event: &'static str,
        body: String,
        received_at: i64,
        deliveries: Vec<NewDelivery>,
        note: (String, String),
    ) -> Result<Inserted, StoreError> {
        self.run(move |conn| {
            let inserted = insert_call(conn, &sid, event, &body, received_at, &deliveries)?;
            put_meta(conn, &note.0, &note.1)?;
            Ok(inserted)
        })
        .await
    }

    /// Moves every unfinished delivery's schedule (next attempt and retry window) by `ms`, then
    /// runs `moved` in the same job: the daemon's clock moves by `ms` with them (see
    /// [`crate::clock::SteadyClock`]), so a retry due in a minute is still due in a minute.
    /// Deliveries in flight (`sending`) move too: their attempt's outcome is judged against the
    /// window stored now ([`Store::window_start`]). `moved` may run twice, as any job may.
    pub async fn shift_schedule<M>(&self, ms: i64, moved: M) -> Result<usize, StoreError>
    where
        M: Fn() + Send + 'static,
    {
        self.run(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE deliveries SET next_attempt_at = next_attempt_at + ?1,
                         window_start = window_start + ?1
                     WHERE status = 'pending'",
                )?
                .execute(params![ms])?;
            let in_flight = conn
                .prepare_cached(
                    "UPDATE deliveries SET next_attempt_at = next_attempt_at + ?1,
                         window_start = window_start + ?1
                     WHERE status != 'done' AND status = 'sending'",
                )?
                .execute(params![ms])?;
            moved();
            Ok(n + in_flight)
        })
        .await
    }

    /// Where a delivery's retry window starts now: a clock step while it was in flight moved it
    /// from what was claimed ([`Store::shift_schedule`]).
    pub async fn window_start(&self, id: i64) -> Result<Option<i64>, StoreError> {
        self.run(move |conn| {
            conn.prepare_cached("SELECT window_start FROM deliveries WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// Puts deliveries left `sending` by a previous process back in the queue.
    pub async fn reset_inflight(&self, now: i64) -> Result<usize, StoreError> {
        self.run(move |conn| conn.execute(RESET_INFLIGHT, params![now]))
            .await
    }

    /// Claims up to `limit` due deliveries of one channel, oldest first.
    pub async fn claim(
        &self,
        channel: String,
        now: i64,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.run(move |conn| claim(conn, &channel, now, limit))
            .await
    }

    /// Records finished attempts and what became of their deliveries, all in one job (a lane
    /// writes what finished while its previous records were committing).
    pub async fn record(&self, attempts: Vec<Attempt>) -> Result<(), StoreError> {
        self.run(move |conn| attempts.iter().try_for_each(|a| record(conn, a)))
            .await
    }

    /// Gives a claimed delivery back to the queue without counting an attempt (shutdown came
    /// before it was sent).
    pub async fn release(&self, id: i64) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.prepare_cached(
                "UPDATE deliveries SET status = 'pending' WHERE id = ?1 AND status = 'sending'",
            )?
            .execute(params![id])
            .map(|_| ())
        })
        .await
    }

    /// Unfinished (pending or sending) deliveries grouped by what sending them needs from the
    /// config: (channel, the channel's type when planned, template, how many). A reload asks,
    /// to tell which of them the config it swapped in can no longer send.
    pub async fn open_needs(
        &self,
    ) -> Result<Vec<(String, Option<String>, String, usize)>, StoreError> {
        self.run(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT channel, channel_type, json_extract(action, '$.template'), COUNT(*)
                 FROM deliveries WHERE status != 'done' AND status != 'dead'
                 GROUP BY 1, 2, 3 ORDER BY 1, 3",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    r.get::<_, i64>(3)? as usize,
                ))
            })?;
            rows.collect()
        })
        .await
    }

    /// Marks every pending delivery of a channel that no longer exists as dead, so it is
    /// visible and can be replayed once the channel is back. `channels` is asked on the writer
    /// thread, in order with the inserts: a call matched against a config that added a channel
    /// is committed after that config is live, so the list read here already has the channel.
    /// Returns how many went dead, by channel.
    pub async fn kill_orphans<C>(
        &self,
        channels: C,
        now: i64,
    ) -> Result<Vec<(String, usize)>, StoreError>
    where
        C: Fn() -> Vec<String> + Send + 'static,
    {
        self.run(move |conn| {
            let channels = channels();
            let mut pending: Vec<String> = Vec::new();
            let mut next = conn.prepare_cached(NEXT_PENDING_CHANNEL)?;
            let mut after = String::new();
            while let Some(ch) =
                next.query_row(params![after], |r| r.get::<_, Option<String>>(0))?
            {
                after.clone_from(&ch);
                pending.push(ch);
            }
            drop(next);
            let mut killed = Vec::new();
            for ch in pending.into_iter().filter(|c| !channels.contains(c)) {
                let n = conn.execute(
                    "UPDATE deliveries SET status = 'dead', updated_at = ?2,
                        last_error = 'channel ' || ?1 || ' is no longer in the config'
                     WHERE status = 'pending' AND channel = ?1",
                    params![ch, now],
                )?;
                killed.push((ch, n));
            }
            Ok(killed)
        })
        .await
    }

    /// The earliest `next_attempt_at` of a channel's pending deliveries.
    pub async fn next_due(&self, channel: String) -> Result<Option<i64>, StoreError> {
        self.run(move |conn| {
            conn.prepare_cached(NEXT_DUE)?
                .query_row(params![channel], |r| r.get(0))
        })
        .await
    }

    /// Lists deliveries, newest first.
    pub async fn list(
        &self,
        status: Option<String>,
        sid: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        self.run(move |conn| list(conn, status.as_deref(), sid.as_deref(), limit))
            .await
    }

    /// `deliveries retry`: dead deliveries go back in the queue, due now, with a fresh retry
    /// window; pending ones are made due now, keeping their attempts and window (after an
    /// outage is fixed, instead of waiting out the retry schedule). `ids` names deliveries of
    /// either kind; `all_dead` and `all_pending` take every one of that kind.
    pub async fn retry(
        &self,
        ids: Vec<i64>,
        all_dead: bool,
        all_pending: bool,
        now: i64,
    ) -> Result<Retried, StoreError> {
        self.run(move |conn| {
            let mut done = Retried::default();
            if all_dead {
                done.requeued += conn.prepare_cached(REQUEUE_DEAD)?.execute(params![now])?;
            }
            if all_pending {
                done.made_due += conn.prepare_cached(DUE_NOW)?.execute(params![now])?;
            }
            let mut dead = conn.prepare_cached(&format!("{REQUEUE_DEAD} AND id = ?2"))?;
            let mut pending = conn.prepare_cached(&format!("{DUE_NOW_ANY} AND id = ?2"))?;
            let mut status = conn.prepare_cached("SELECT status FROM deliveries WHERE id = ?1")?;
            for id in &ids {
                if dead.execute(params![now, id])? == 1 {
                    done.requeued += 1;
                } else if pending.execute(params![now, id])? == 1 {
                    done.made_due += 1;
                } else {
                    let s = status.query_row(params![id], |r| r.get(0)).optional()?;
                    done.untouched.push((*id, s));
                }
            }
            Ok(done)
        })
        .await
    }

    /// Deletes calls older than `before` whose deliveries are all done (and their attempts), a
    /// few hundred per job so webhooks committing meanwhile wait milliseconds, not seconds.
    pub async fn prune(&self, before: i64) -> Result<usize, StoreError> {
        let mut deleted = 0;
        let mut cursor = (i64::MIN, 0);
        loop {
            let (n, next) = self
                .run(move |conn| prune_some(conn, before, cursor))
                .await?;
            deleted += n;
            match next {
                Some(next) => cursor = next,
                None => return Ok(deleted),
            }
        }
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.run(stats).await
    }

    /// Readiness: whether the store would take a call now. Runs the webhook's own statements (a
    /// call and its delivery, as [`Store::insert_call`] writes them) for a probe sid and for each
    /// of `sids` (a call whose commit just failed), undoes them, then commits a small write. A
    /// store damaged where calls go fails here as the webhook does, even while other tables
    /// still take writes. Nothing the probe inserted is ever committed.
    pub async fn probe(&self, now: i64, sids: Vec<String>) -> Result<(), StoreError> {
        self.run(move |conn| {
            control(conn, "SAVEPOINT readiness_probe")?;
            let owed = [NewDelivery {
                rule: PROBE_EVENT.into(),
                action_idx: 0,
                action: Action {
                    channel: PROBE_EVENT.into(),
                    template: PROBE_EVENT.into(),
                    to: vec![],
                    subject: None,
                },
                channel_type: None,
            }];
            let tried = std::iter::once(PROBE_SID)
                .chain(sids.iter().map(String::as_str))
                .try_for_each(|sid| {
                    insert_call(conn, sid, PROBE_EVENT, "{}", now, &owed).map(drop)
                });
            // Should the undo itself fail, the job fails and the whole transaction is rolled back.
            // The webhook's own error comes first: an error that rolled the transaction back
            // already leaves no savepoint, and "no such savepoint" would hide why.
            let undone = control(conn, "ROLLBACK TO readiness_probe")
                .and_then(|()| control(conn, "RELEASE readiness_probe"));
            tried?;
            undone?;
            put_meta(conn, "probe", &now.to_string())
        })
        .await
    }

    pub async fn set_meta(&self, key: String, value: String) -> Result<(), StoreError> {
        self.run(move |conn| put_meta(conn, &key, &value)).await
    }

    pub async fn get_meta(&self, key: String) -> Result<Option<String>, StoreError> {
        self.run(move |conn| {
            conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row(params![key], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// The attempts made for one delivery, oldest first: (attempt, at, outcome, detail).
    pub async fn attempts(
        &self,
        delivery_id: i64,
    ) -> Result<Vec<(u32, i64, String, Option<String>)>, StoreError> {
        self.run(move |conn| {
            let mut stmt = conn.prepare("SELECT attempt, at, outcome, detail FROM attempts WHERE delivery_id = ?1 ORDER BY id")?;
            let rows = stmt.query_map(params![delivery_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect()
        })
        .await
    }
}

/// Opens the store at `path` (creating it if needed) and brings its schema up to date. A full
/// disk is [`StoreError::DiskFull`]; other failures are [`StoreError::Open`] with the reason.
fn connect(path: &Path, durability: Durability) -> Result<(Connection, OpenedFile), StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    // SQLite's own words, or what is in the way where that is the cause.
    let sql_err = |e: rusqlite::Error| match StoreError::at(path, e) {
        full @ StoreError::DiskFull(_) => full,
        other => open_err(other.reason()),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
    }
    let conn = Connection::open(path).map_err(sql_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql_err)?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;"
    ))
    .map_err(sql_err)?;
    conn.execute_batch(SCHEMA).map_err(sql_err)?;
    migrate(&conn).map_err(sql_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    let file = OpenedFile::of(path).map_err(|e| open_err(e.to_string()))?;
    Ok((conn, file))
}

/// [`connect`], then the deliveries left `sending` by the last process back in the queue, before
/// the writer thread runs any job (no claim may come first). After a `kill -9` the store opens
/// even on a full disk (its log and index are still there), so this requeue is a start's first
/// write: it meets a full disk as an open does ([`StoreError::DiskFull`]).
fn connect_and_requeue(
    path: &Path,
    durability: Durability,
    now: i64,
) -> Result<(Connection, OpenedFile, usize), StoreError> {
    let (conn, file) = connect(path, durability)?;
    let requeued = conn
        .execute(RESET_INFLIGHT, params![now])
        .map_err(|e| StoreError::at(path, e))?;
    Ok((conn, file, requeued))
}

/// How often a store waiting for room tries to open again.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Until the store at `path` opens and its interrupted deliveries are requeued: answers every
/// job that it cannot be written (`why`), and tries again every [`REOPEN_EVERY`]. None when the
/// store was closed meanwhile.
fn wait_for_room(
    path: &Path,
    durability: Durability,
    mut why: String,
    now: &dyn Fn() -> i64,
    rx: &mpsc::Receiver<Msg>,
) -> Option<(Connection, OpenedFile)> {
    let mut next_try = std::time::Instant::now() + REOPEN_EVERY;
    loop {
        match rx.recv_timeout(next_try.saturating_duration_since(std::time::Instant::now())) {
            Ok(Msg::Job(job)) => job.answer(Some(&why)),
            Ok(Msg::Close(done)) => {
                let _ = done.send(());
                return None;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                next_try = std::time::Instant::now() + REOPEN_EVERY;
                match connect_and_requeue(path, durability, now()) {
                    Ok((conn, file, requeued)) => {
                        tracing::info!(
                            store = %path.display(),
                            requeued,
                            "the store has room again and is open; taking calls"
                        );
                        return Some((conn, file));
                    }
                    Err(e) => {
                        let now_why = match e {
                            StoreError::DiskFull(w) => w,
                            e => e.to_string(),
                        };
                        // Once the disk has room, something else can be in the way (a file
                        // left to another user): the log says so, not only `/readyz`.
                        if now_why != why {
                            tracing::error!(
                                store = %path.display(),
                                "{now_why}: the store still cannot be opened; every call is answered 503 until it opens (tried every second)"
                            );
                            why = now_why;
                        }
                    }
                }
            }
        }
    }
}

/// Brings a store written by an earlier version up to the current schema. Look and change are
/// one write transaction: the daemon and a `deliveries` command may open the same old store at
/// once, and the second to add a column would fail ("duplicate column name").
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = tx.prepare(&format!(
            "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
        ))?;
        stmt.exists(params![column])
    };
    if !has("deliveries", "channel_type")? {
        tx.execute_batch("ALTER TABLE deliveries ADD COLUMN channel_type TEXT")?;
    }
    tx.commit()
}

/// `e` from a statement on `conn`, with what is read-only named ([`StoreError::at`]).
fn error_of(conn: &Connection, e: rusqlite::Error) -> StoreError {
    match conn.path().filter(|p| !p.is_empty()) {
        Some(path) => StoreError::at(Path::new(path), e),
        None => StoreError::Sqlite(e),
    }
}

/// Runs a transaction-control statement from the statement cache (parsed once, not per call).
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// The database file the store opened, and the write-ahead log and shared-memory index beside
/// it. SQLite goes on writing to an open file that was deleted or moved away, so commits would
/// succeed into a file a restart does not find: every commit checks first that the paths still
/// name these files. (The log holds every commit since the last checkpoint, so deleting it as a
/// "leftover" loses them to a crash; a new index beside the old one would let another process,
/// such as `deliveries retry`, write past the daemon's view of the log.)
struct OpenedFile {
    path: PathBuf,
    id: (u64, u64),
    /// `-wal` and `-shm`, with the file each named when first seen (None: not there yet).
    beside: [(PathBuf, Option<(u64, u64)>); 2],
}

impl OpenedFile {
    fn of(path: &Path) -> std::io::Result<OpenedFile> {
        let beside = |suffix: &str| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let p = PathBuf::from(name);
            let id = file_id(&p).ok();
            (p, id)
        };
        Ok(OpenedFile {
            path: path.to_path_buf(),
            id: file_id(path)?,
            beside: [beside("-wal"), beside("-shm")],
        })
    }

    /// Why nothing may be committed, if a path no longer names the opened file.
    fn gone(&mut self) -> Option<String> {
        if !matches!(file_id(&self.path), Ok(id) if id == self.id) {
            return Some(format!(
                "the store file {} was deleted, moved or replaced while in use; put it back, or restart to open what is there now",
                self.path.display()
            ));
        }
        for (path, opened) in &mut self.beside {
            match (*opened, file_id(path)) {
                (Some(was), Ok(now)) if was == now => {}
                (None, Ok(now)) => *opened = Some(now),
                (None, Err(_)) => {}
                (Some(_), _) => {
                    return Some(format!(
                        "{} beside the store was deleted, moved or replaced while in use; put it back, or stop the daemon with SIGTERM (not kill -9): what the store's write-ahead log holds is written into the store file as it stops",
                        path.display()
                    ))
                }
            }
        }
        None
    }
}

/// Which file `path` names now (device and inode): what tells the file a handle was opened on
/// from one put in its place. Also used by the log channel's files.
#[cfg(unix)]
pub(crate) fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(not(unix))]
pub(crate) fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|_| (0, 0))
}

fn writer(conn: Connection, mut file: OpenedFile, rx: mpsc::Receiver<Msg>) {
    let mut closing = None;
    while let Ok(first) = rx.recv() {
        let first = match first {
            Msg::Job(job) => job,
            Msg::Close(done) => {
                closing = Some(done);
                break;
            }
        };
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Close(done)) => {
                    closing = Some(done);
                    break;
                }
                Err(_) => break,
            }
        }
        write_batch(&conn, &mut file, batch);
        if closing.is_some() {
            break;
        }
    }
    // Work sent after the close is dropped unanswered: its callers see the store closed.
    drop(rx);
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "the store did not close cleanly; its write-ahead log is kept and read at the next start");
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Commits a batch and answers each of its jobs.
fn write_batch(conn: &Connection, file: &mut OpenedFile, mut batch: Vec<Job>) {
    match commit(conn, file, &mut batch) {
        Ok(()) => batch.into_iter().for_each(|job| job.answer(None)),
        // One job failed and the batch was rolled back: the others must not pay for it,
        // so each runs again in a transaction of its own (rare: a full or broken disk
        // fails them all anyway).
        Err(None) if batch.len() > 1 => {
            for mut job in batch {
                let outcome = commit(conn, file, std::slice::from_mut(&mut job));
                job.answer(outcome.err().flatten().as_deref());
            }
        }
        Err(None) => batch.into_iter().for_each(|job| job.answer(None)),
        Err(Some(e)) => batch.into_iter().for_each(|job| job.answer(Some(&e))),
    }
}

/// Runs `jobs` in one transaction: one commit (one fsync) for all of them. `Err(None)`: a job
/// failed and everything was rolled back; `Err(Some(why))`: the transaction itself failed.
fn commit(
    conn: &Connection,
    file: &mut OpenedFile,
    jobs: &mut [Job],
) -> Result<(), Option<String>> {
    let why = |e: rusqlite::Error| Some(error_of(conn, e).to_string());
    control(conn, "BEGIN IMMEDIATE").map_err(why)?;
    for job in jobs.iter_mut() {
        if !job.run(conn) {
            let _ = control(conn, "ROLLBACK");
            return Err(None);
        }
    }
    if let Some(why) = file.gone() {
        let _ = control(conn, "ROLLBACK");
        return Err(Some(why));
    }
    control(conn, "COMMIT").map_err(|e| {
        let _ = control(conn, "ROLLBACK");
        why(e)
    })
}

fn put_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")?
        .execute(params![key, value])
        .map(|_| ())
}

fn insert_call(
    conn: &Connection,
    sid: &str,
    event: &str,
    body: &str,
    received_at: i64,
    deliveries: &[NewDelivery],
) -> rusqlite::Result<Inserted> {
    let call_id: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO calls (sid, event, received_at, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (sid, event) DO NOTHING RETURNING id",
        )?
        .query_row(params![sid, event, received_at, body], |r| r.get(0))
        .optional()?;
    let Some(call_id) = call_id else {
        return Ok(Inserted::Duplicate);
    };
    let mut stmt = conn.prepare_cached(
        "INSERT INTO deliveries (call_id, rule, action_idx, channel, action, status, next_attempt_at, window_start, created_at, updated_at, channel_type)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?6, ?6, ?7)
         ON CONFLICT (call_id, rule, action_idx) DO NOTHING",
    )?;
    for d in deliveries {
        let action = serde_json::to_string(&d.action)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        stmt.execute(params![
            call_id,
            d.rule,
            d.action_idx as i64,
            d.action.channel,
            action,
            received_at,
            d.channel_type
        ])?;
    }
    Ok(Inserted::Accepted {
        call_id,
        deliveries: deliveries.len(),
    })
}

fn claim(
    conn: &Connection,
    channel: &str,
    now: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Claimed>> {
    let mut stmt = conn.prepare_cached(CLAIM)?;
    let rows = stmt.query_map(params![channel, now, limit as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, u32>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut rows: Vec<_> = rows.collect::<Result<_, _>>()?;
    rows.sort_by_key(|r| r.0);
    let mut call_stmt =
        conn.prepare_cached("SELECT sid, event, body, received_at FROM calls WHERE id = ?1")?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, call_id, rule, action, attempts, window_start, channel_type) in rows {
        let call = call_stmt
            .query_row(params![call_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        // Its call was deleted by hand (the `sqlite3` shell does not enforce foreign keys, so
        // the cascade did not run): nothing is left to send, and failing here would fail every
        // claim of the channel from now on. It goes as the cascade would have taken it.
        let Some((sid, event, call_body, received_at)) = call else {
            conn.prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                .execute(params![id])?;
            tracing::warn!(
                delivery = id,
                call_id,
                "a delivery's call is no longer in the store (deleted by hand?); the delivery was removed with it"
            );
            continue;
        };
        // A row this version cannot read (written by another version, or edited by hand) goes
        // dead with the reason instead of failing every claim of the channel from now on.
        let action: Action = match serde_json::from_str(&action) {
            Ok(a) => a,
            Err(e) => {
                conn.prepare_cached(
                    "UPDATE deliveries SET status = 'dead', updated_at = ?2, last_error = ?3 WHERE id = ?1",
                )?
                .execute(params![id, now, format!("stored delivery cannot be read: {e}")])?;
                continue;
            }
        };
        out.push(Claimed {
            id,
            call_id,
            channel: action.channel.clone(),
            rule,
            action,
            channel_type,
            attempts,
            window_start,
            received_at,
            sid,
            event,
            call_body,
        });
    }
    Ok(out)
}

fn record(conn: &Connection, a: &Attempt) -> rusqlite::Result<()> {
    let (status, next, name) = match a.outcome {
        Recorded::Done => ("done", a.at, "done"),
        Recorded::Retry { next_attempt_at } => ("pending", next_attempt_at, "retry"),
        Recorded::Dead => ("dead", a.at, "dead"),
    };
    conn.prepare_cached(
        "UPDATE deliveries SET status = ?2, attempts = ?3, next_attempt_at = ?4, updated_at = ?5,
             last_error = CASE WHEN ?2 = 'done' THEN last_error ELSE ?6 END
         WHERE id = ?1",
    )?
    .execute(params![a.id, status, a.attempt, next, a.at, a.detail])?;
    conn.prepare_cached(
        "INSERT INTO attempts (delivery_id, attempt, at, outcome, latency_ms, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![a.id, a.attempt, a.at, name, a.latency_ms, a.detail])?;
    Ok(())
}

/// Calls deleted by one prune job.
const PRUNE_CHUNK: i64 = 200;

/// Deletes the next [`PRUNE_CHUNK`] calls past retention after `cursor` (received_at, id) whose
/// deliveries are all done; returns how many went and where to go on (None: finished).
fn prune_some(
    conn: &Connection,
    before: i64,
    cursor: (i64, i64),
) -> rusqlite::Result<(usize, Option<(i64, i64)>)> {
    let old: Vec<(i64, i64)> = conn
        .prepare_cached(PRUNE_NEXT)?
        .query_map(params![before, cursor.0, cursor.1, PRUNE_CHUNK], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut delete = conn.prepare_cached(PRUNE_CALL)?;
    let mut n = 0;
    for (_, id) in &old {
        n += delete.execute(params![id])?;
    }
    Ok((n, old.last().copied()))
}

/// Lists deliveries, newest first, on a connection of its own to the store at `path`, for
/// `deliveries list` beside the running daemon. A plain read in WAL mode takes no lock the
/// daemon's commits wait for; going through [`Store`] would run it inside a write transaction,
/// and on a large store a scan by sid or status (seconds with a cold cache) would hold every
/// webhook until the daemon's busy timeout answered them 503.
pub fn list_at(
    path: &Path,
    status: Option<&str>,
    sid: Option<&str>,
    limit: usize,
) -> Result<Vec<DeliveryRow>, StoreError> {
    read_at(path, |conn| list(conn, status, sid, limit))
}

/// The calls stored under `sid`, as (event, received_at), oldest first: for `deliveries list
/// --sid` to say whether a call that owes nothing was received at all. Read as [`list_at`] is.
pub fn calls_at(path: &Path, sid: &str) -> Result<Vec<(String, i64)>, StoreError> {
    read_at(path, |conn| {
        conn.prepare("SELECT event, received_at FROM calls WHERE sid = ?1 ORDER BY id")?
            .query_map(params![sid], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
    })
}

/// Runs `read` on a connection of its own to the store at `path` (see [`list_at`]).
fn read_at<T>(
    path: &Path,
    read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::Open {
        path: path.display().to_string(),
        reason: StoreError::at(path, e).reason(),
    };
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    read(&conn).map_err(open_err)
}

/// The `deliveries list` query (?1 status, ?2 sid, ?3 limit), written for each filter so that
/// it goes through an index: a `(?2 IS NULL OR c.sid = ?2)` form cannot use one, and walked
/// the whole history to find one call's deliveries.
fn list_sql(status: Option<&str>, sid: Option<&str>) -> String {
    let filter = match (status, sid) {
        // The call's (sid, event) index, then its deliveries.
        (_, Some(_)) => "c.sid = ?2 AND (?1 IS NULL OR d.status = ?1)",
        // The backlog's index (`deliveries_waiting`), which holds no finished rows.
        (Some(s), None) if s != "done" => "d.status = ?1 AND d.status != 'done'",
        // Newest first by id; done rows are most rows, so the limit ends the walk early.
        _ => "(?1 IS NULL OR d.status = ?1)",
    };
    format!("{DELIVERY_ROWS} WHERE {filter} ORDER BY d.id DESC LIMIT ?3")
}

/// Deliveries with their calls, as [`delivery_row`] reads them.
const DELIVERY_ROWS: &str =
    "SELECT d.id, c.sid, c.event, d.rule, d.channel, d.status, d.attempts, d.next_attempt_at,
            d.created_at, d.updated_at, d.last_error
     FROM deliveries d JOIN calls c ON c.id = d.call_id";

fn delivery_row(r: &rusqlite::Row) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: r.get(0)?,
        sid: r.get(1)?,
        event: r.get(2)?,
        rule: r.get(3)?,
        channel: r.get(4)?,
        status: r.get(5)?,
        attempts: r.get(6)?,
        next_attempt_at: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
        last_error: r.get(10)?,
    })
}

/// One attempt at a delivery, as `deliveries show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    /// 1-based, counted from the delivery's creation or its last replay.
    pub attempt: u32,
    /// When it finished, unix ms.
    pub at: i64,
    /// `done`, `retry` or `dead`.
    pub outcome: String,
    pub latency_ms: Option<i64>,
    /// The destination's answer or the error.
    pub detail: Option<String>,
}

/// One delivery and every attempt at it, oldest first, for `deliveries show`; None when there
/// is no such delivery. Read as [`list_at`] is.
pub fn show_at(path: &Path, id: i64) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>, StoreError> {
    read_at(path, |conn| {
        let Some(row) = conn
            .prepare(&format!("{DELIVERY_ROWS} WHERE d.id = ?1"))?
            .query_row(params![id], delivery_row)
            .optional()?
        else {
            return Ok(None);
        };
        let attempts = conn
            .prepare(
                "SELECT attempt, at, outcome, latency_ms, detail FROM attempts
                 WHERE delivery_id = ?1 ORDER BY id",
            )?
            .query_map(params![id], |r| {
                Ok(AttemptRow {
                    attempt: r.get(0)?,
                    at: r.get(1)?,
                    outcome: r.get(2)?,
                    latency_ms: r.get(3)?,
                    detail: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some((row, attempts)))
    })
}

fn list(
    conn: &Connection,
    status: Option<&str>,
    sid: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<DeliveryRow>> {
    let mut stmt = conn.prepare(&list_sql(status, sid))?;
    let rows = stmt.query_map(params![status, sid, limit as i64], delivery_row)?;
    rows.collect()
}

fn stats(conn: &Connection) -> rusqlite::Result<Stats> {
    let mut s = Stats::default();
    let mut stmt = conn.prepare_cached(OPEN_BY_STATE)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (status, n) = row?;
        match status.as_str() {
            "pending" => s.pending = n,
            "sending" => s.sending = n,
            "dead" => s.dead = n,
            _ => {}
        }
    }
    s.oldest_pending_since = conn
        .prepare_cached(OLDEST_OPEN)?
        .query_row([], |r| r.get(0))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(channel: &str) -> Action {
        Action {
            channel: channel.into(),
            template: "t".into(),
            to: vec![],
            subject: None,
        }
    }

    fn attempt(id: i64, n: u32, at: i64, outcome: Recorded, detail: Option<&str>) -> Attempt {
        Attempt {
            id,
            attempt: n,
            at,
            outcome,
            latency_ms: 3,
            detail: detail.map(String::from),
        }
    }

    async fn calls(store: &Store) -> i64 {
        store
            .run(|c| c.query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0)))
            .await
            .unwrap()
    }

    /// A new store in a temporary directory (kept alive by the returned guard).
    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        (dir, store)
    }

    /// Stores a call `sid` received at `at` that owes `n` deliveries to channel `c`.
    async fn stored(store: &Store, sid: &str, at: i64, n: usize) {
        store
            .insert_call(sid.into(), "POST_CALL_DATA", "{}".into(), at, owed(n))
            .await
            .unwrap();
    }

    fn owed(n: usize) -> Vec<NewDelivery> {
        (0..n)
            .map(|i| NewDelivery {
                rule: "r".into(),
                action_idx: i,
                action: action("c"),
                channel_type: Some("slack"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_store_from_before_channel_types_is_upgraded_and_its_rows_still_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        stored(&Store::open(&path).unwrap(), "CAold", 1, 1).await;
        // The deliveries table as an earlier version wrote it: no channel_type column.
        Connection::open(&path)
            .unwrap()
            .execute_batch("ALTER TABLE deliveries DROP COLUMN channel_type")
            .unwrap();
        let store = Store::open(&path).unwrap();
        stored(&store, "CAnew", 2, 1).await;
        let claimed = store.claim("c".into(), 10, 10).await.unwrap();
        let types: Vec<_> = claimed
            .iter()
            .map(|c| (c.sid.as_str(), c.channel_type.as_deref()))
            .collect();
        assert_eq!(types, [("CAold", None), ("CAnew", Some("slack"))]);
    }

    #[test]
    fn an_old_store_opened_twice_at_once_is_upgraded_once() {
        // The daemon starting while `deliveries list` runs, both on a store from before
        // channel_type: each sees the column missing, and the second to add it must not fail.
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.db");
            drop(Store::open(&path).unwrap());
            Connection::open(&path)
                .unwrap()
                .execute_batch("ALTER TABLE deliveries DROP COLUMN channel_type")
                .unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(2));
            let opens: Vec<_> = (0..2)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        Store::open(&path).map(drop)
                    })
                })
                .collect();
            for open in opens {
                open.join().unwrap().unwrap();
            }
        }
    }

    #[tokio::test]
    async fn durability_sets_sqlites_synchronous_mode() {
        let dir = tempfile::tempdir().unwrap();
        for (d, want) in [(Durability::Full, 2), (Durability::Normal, 1)] {
            let store = Store::open_with(&dir.path().join(format!("{d:?}.db")), d).unwrap();
            let mode: i64 = store
                .run(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0)))
                .await
                .unwrap();
            assert_eq!(mode, want, "{d:?}");
        }
    }

    #[tokio::test]
    async fn closing_puts_everything_in_the_store_file_and_refuses_later_work() {
        let (dir, store) = temp_store();
        stored(&store, "CA1", 1, 1).await;
        let other = store.clone();
        store.close().await;
        let path = dir.path().join("s.db");
        assert!(!dir.path().join("s.db-wal").exists());
        let n: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        assert!(matches!(other.stats().await, Err(StoreError::Closed)));
        other.close().await; // a second close returns at once
    }

    #[tokio::test]
    async fn a_call_is_stored_once_per_sid_and_event() {
        let (_dir, store) = temp_store();
        let first = store
            .insert_call("CA1".into(), "POST_CALL_DATA", "{}".into(), 1, owed(2))
            .await
            .unwrap();
        assert!(matches!(first, Inserted::Accepted { deliveries: 2, .. }));
        let again = store
            .insert_call("CA1".into(), "POST_CALL_DATA", "{}".into(), 2, owed(2))
            .await
            .unwrap();
        assert_eq!(again, Inserted::Duplicate);
        let other_event = store
            .insert_call("CA1".into(), "POST_CALL_OUTCOME", "{}".into(), 3, owed(1))
            .await
            .unwrap();
        assert!(matches!(other_event, Inserted::Accepted { .. }));
        assert_eq!(calls(&store).await, 2);
        assert_eq!(store.stats().await.unwrap().pending, 3);
    }

    #[tokio::test]
    async fn claimed_work_is_not_claimed_twice_and_comes_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        store
            .insert_call(
                "CA1".into(),
                "POST_CALL_DATA",
                "{\"sid\":\"CA1\"}".into(),
                10,
                owed(3),
            )
            .await
            .unwrap();
        let first = store.claim("c".into(), 10, 2).await.unwrap();
        assert_eq!(
            first
                .iter()
                .map(|c| c.action.channel.as_str())
                .collect::<Vec<_>>(),
            ["c", "c"]
        );
        assert!(first[0].id < first[1].id);
        assert_eq!(first[0].sid, "CA1");
        let second = store.claim("c".into(), 10, 5).await.unwrap();
        assert_eq!(second.len(), 1);
        assert!(store.claim("c".into(), 10, 5).await.unwrap().is_empty());
        drop(store);
        // A new process: what was `sending` is owed again.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.reset_inflight(20).await.unwrap(), 3);
        assert_eq!(store.claim("c".into(), 20, 5).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_delivery_that_cannot_be_read_goes_dead_and_does_not_block_its_channel() {
        let (_dir, store) = temp_store();
        stored(&store, "CA1", 1, 3).await;
        store
            .run(|c| {
                c.execute(
                    "UPDATE deliveries SET action = '{\"chanel\":1}' WHERE id = 2",
                    [],
                )
            })
            .await
            .unwrap();
        let claimed = store.claim("c".into(), 2, 10).await.unwrap();
        assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 3]);
        let dead = store.list(Some("dead".into()), None, 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].id, 2);
        let why = dead[0].last_error.as_deref().unwrap_or_default();
        assert!(why.starts_with("stored delivery cannot be read: "), "{why}");
    }

    #[tokio::test]
    async fn a_delivery_whose_call_was_deleted_by_hand_does_not_block_its_channel() {
        let (dir, store) = temp_store();
        for sid in ["CA1", "CA2", "CA3"] {
            stored(&store, sid, 1, 1).await;
        }
        // As `sqlite3 store.db "DELETE FROM calls WHERE sid = 'CA2'"` does: foreign keys are off
        // in the shell, so the call's deliveries stay behind.
        Connection::open(dir.path().join("s.db"))
            .unwrap()
            .execute_batch("PRAGMA foreign_keys = OFF; DELETE FROM calls WHERE sid = 'CA2';")
            .unwrap();
        let claimed = store.claim("c".into(), 2, 10).await.unwrap();
        let sids: Vec<&str> = claimed.iter().map(|c| c.sid.as_str()).collect();
        assert_eq!(sids, ["CA1", "CA3"]);
        let left: i64 = store
            .run(|c| c.query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(left, 2);
    }

    #[tokio::test]
    async fn a_clock_step_moves_pending_schedules_with_it() {
        let (_dir, store) = temp_store();
        stored(&store, "CA1", 10_000_000, 2).await;
        let claimed = store.claim("c".into(), 10_000_000, 1).await.unwrap();
        store
            .record(vec![Attempt {
                id: claimed[0].id,
                attempt: 1,
                at: 10_000_000,
                outcome: Recorded::Retry {
                    next_attempt_at: 10_060_000,
                },
                latency_ms: 1,
                detail: None,
            }])
            .await
            .unwrap();
        // The clock is stepped back an hour: the retry a minute away stays a minute away.
        let moved = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let m = moved.clone();
        let shifted = store.shift_schedule(-3_600_000, move || {
            m.store(true, std::sync::atomic::Ordering::SeqCst)
        });
        assert_eq!(shifted.await.unwrap(), 2);
        assert!(moved.load(std::sync::atomic::Ordering::SeqCst));
        let mut rows = store.list(Some("pending".into()), None, 10).await.unwrap();
        rows.sort_by_key(|r| r.id);
        let next: Vec<i64> = rows.iter().map(|r| r.next_attempt_at).collect();
        assert_eq!(next, [10_060_000 - 3_600_000, 10_000_000 - 3_600_000]);
        let windows: Vec<i64> = store
            .run(|c| {
                c.prepare("SELECT window_start FROM deliveries ORDER BY id")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        assert_eq!(windows, [10_000_000 - 3_600_000; 2]);
    }

    #[tokio::test]
    async fn pending_deliveries_of_removed_channels_are_marked_dead() {
        let (_dir, store) = temp_store();
        for (sid, channels) in [("CA1", ["a", "gone"]), ("CA2", ["b", "gone2"])] {
            let owed = channels
                .iter()
                .enumerate()
                .map(|(i, ch)| NewDelivery {
                    rule: "r".into(),
                    action_idx: i,
                    action: action(ch),
                    channel_type: Some("slack"),
                })
                .collect();
            store
                .insert_call(sid.into(), "POST_CALL_DATA", "{}".into(), 1, owed)
                .await
                .unwrap();
        }
        // A claimed (sending) delivery of a removed channel is left to its lane.
        assert_eq!(store.claim("gone2".into(), 1, 5).await.unwrap().len(), 1);
        let keep = vec!["a".to_string(), "b".to_string()];
        let k = keep.clone();
        assert_eq!(
            store.kill_orphans(move || k.clone(), 2).await.unwrap(),
            [("gone".to_string(), 1)]
        );
        assert_eq!(
            store.kill_orphans(move || keep.clone(), 3).await.unwrap(),
            []
        );
        let dead = store.list(Some("dead".into()), None, 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].channel, "gone");
        assert_eq!(
            dead[0].last_error.as_deref(),
            Some("channel gone is no longer in the config")
        );
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.pending, stats.sending, stats.dead), (2, 1, 1));
    }

    #[tokio::test]
    async fn retry_later_dead_and_replay() {
        let (_dir, store) = temp_store();
        stored(&store, "CA1", 0, 1).await;
        let c = store.claim("c".into(), 0, 1).await.unwrap().remove(0);
        store
            .record(vec![attempt(
                c.id,
                1,
                5,
                Recorded::Retry {
                    next_attempt_at: 100,
                },
                Some("HTTP 500"),
            )])
            .await
            .unwrap();
        assert!(store.claim("c".into(), 99, 1).await.unwrap().is_empty());
        let c = store.claim("c".into(), 100, 1).await.unwrap().remove(0);
        assert_eq!(c.attempts, 1);
        store
            .record(vec![attempt(
                c.id,
                2,
                101,
                Recorded::Dead,
                Some("HTTP 404 channel_not_found"),
            )])
            .await
            .unwrap();
        let dead = store.list(Some("dead".into()), None, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].last_error.as_deref(),
            Some("HTTP 404 channel_not_found")
        );
        assert_eq!(store.attempts(c.id).await.unwrap().len(), 2);
        let id = dead[0].id;
        let retried = |requeued, made_due, untouched| Retried {
            requeued,
            made_due,
            untouched,
        };
        assert_eq!(
            store.retry(vec![id, 999], false, false, 200).await.unwrap(),
            retried(1, 0, vec![(999, None)])
        );
        assert_eq!(
            store.retry(vec![], false, false, 200).await.unwrap(),
            retried(0, 0, vec![])
        );
        let c = store.claim("c".into(), 200, 1).await.unwrap().remove(0);
        assert_eq!((c.attempts, c.window_start), (0, 200));

        // A pending delivery waiting for its next attempt is made due now, by id or with
        // every pending one, its attempts and window kept; one being sent is left alone.
        store
            .record(vec![attempt(
                c.id,
                1,
                201,
                Recorded::Retry {
                    next_attempt_at: 10_000,
                },
                Some("HTTP 500"),
            )])
            .await
            .unwrap();
        stored(&store, "CA2", 300, 1).await;
        let sending = store.claim("c".into(), 300, 1).await.unwrap().remove(0);
        assert_eq!(
            store
                .retry(vec![c.id, sending.id], false, false, 400)
                .await
                .unwrap(),
            retried(0, 1, vec![(sending.id, Some("sending".into()))])
        );
        let again = store.claim("c".into(), 400, 1).await.unwrap().remove(0);
        assert_eq!(
            (again.id, again.attempts, again.window_start),
            (c.id, 1, 200)
        );
        store
            .record(vec![attempt(
                c.id,
                2,
                401,
                Recorded::Retry {
                    next_attempt_at: 10_000,
                },
                None,
            )])
            .await
            .unwrap();
        assert_eq!(
            store.retry(vec![], false, true, 500).await.unwrap(),
            retried(0, 1, vec![])
        );
        assert_eq!(
            store.retry(vec![], false, true, 500).await.unwrap(),
            retried(0, 0, vec![]),
            "already due: nothing moved"
        );
        let again = store.claim("c".into(), 500, 1).await.unwrap().remove(0);
        assert_eq!((again.id, again.attempts), (c.id, 2));
    }

    #[tokio::test]
    async fn outcomes_written_together_each_update_their_own_delivery() {
        let (_dir, store) = temp_store();
        stored(&store, "CA1", 0, 3).await;
        let ids: Vec<i64> = store
            .claim("c".into(), 0, 3)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        let retry = Recorded::Retry {
            next_attempt_at: 50,
        };
        store
            .record(vec![
                attempt(ids[0], 1, 10, Recorded::Done, None),
                attempt(ids[1], 1, 10, retry, Some("HTTP 500")),
                attempt(ids[2], 1, 10, Recorded::Dead, Some("HTTP 404")),
            ])
            .await
            .unwrap();
        let mut rows = store.list(None, None, 10).await.unwrap();
        rows.sort_by_key(|r| r.id);
        let got: Vec<(&str, u32, i64)> = rows
            .iter()
            .map(|r| (r.status.as_str(), r.attempts, r.next_attempt_at))
            .collect();
        assert_eq!(got, [("done", 1, 10), ("pending", 1, 50), ("dead", 1, 10)]);
        for id in ids {
            assert_eq!(store.attempts(id).await.unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn indexed_queries_never_scan_a_whole_table() {
        let (_dir, store) = temp_store();
        // `deliveries list` by sid or by an unfinished state: an operator's look at a large
        // store during an incident.
        let listings = [
            list_sql(None, Some("CA1")),
            list_sql(Some("done"), Some("CA1")),
            list_sql(Some("dead"), None),
            list_sql(Some("pending"), None),
        ];
        for sql in [
            RESET_INFLIGHT,
            NEXT_PENDING_CHANNEL,
            NEXT_DUE,
            CLAIM,
            PRUNE_NEXT,
            PRUNE_CALL,
            OPEN_BY_STATE,
            OLDEST_OPEN,
            REQUEUE_DEAD,
            DUE_NOW,
            format!("{DUE_NOW_ANY} AND id = ?2").as_str(),
        ]
        .into_iter()
        .map(String::from)
        .chain(listings)
        {
            let plan: Vec<String> = store
                .run({
                    let sql = sql.clone();
                    move |c| {
                        let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                        let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
                        let rows = stmt.query_map(rusqlite::params_from_iter(nulls), |r| {
                            r.get::<_, String>(3)
                        })?;
                        rows.collect()
                    }
                })
                .await
                .unwrap();
            let scans: Vec<&String> = plan
                .iter()
                .filter(|step| step.starts_with("SCAN ") && !step.contains("INDEX"))
                .collect();
            assert!(scans.is_empty(), "{sql}\nscans a whole table: {plan:?}");
        }
    }

    #[tokio::test]
    async fn pruning_goes_through_many_chunks_and_skips_unfinished_calls() {
        let (_dir, store) = temp_store();
        let n = 2 * PRUNE_CHUNK + 50;
        for i in 0..n {
            store
                .insert_call(format!("CA{i}"), "POST_CALL_DATA", "{}".into(), i, owed(1))
                .await
                .unwrap();
        }
        // Every delivery is done except the one of the call received at 100.
        store
            .run(|c| {
                c.execute(
                    "UPDATE deliveries SET status = 'done' WHERE created_at != 100",
                    [],
                )
            })
            .await
            .unwrap();
        assert_eq!(store.prune(n).await.unwrap(), n as usize - 1);
        assert_eq!(calls(&store).await, 1);
        let left = store.list(None, None, 10).await.unwrap();
        assert_eq!(
            (left[0].sid.as_str(), left[0].status.as_str()),
            ("CA100", "pending")
        );
    }

    #[tokio::test]
    async fn pruning_keeps_calls_with_unfinished_deliveries() {
        let (_dir, store) = temp_store();
        stored(&store, "old-done", 0, 1).await;
        store
            .insert_call(
                "old-pending".into(),
                "POST_CALL_DATA",
                "{}".into(),
                0,
                vec![NewDelivery {
                    rule: "r".into(),
                    action_idx: 0,
                    action: action("other"),
                    channel_type: Some("slack"),
                }],
            )
            .await
            .unwrap();
        stored(&store, "new", 1000, 1).await;
        let done = store.claim("c".into(), 1000, 10).await.unwrap();
        let done = done
            .iter()
            .map(|c| attempt(c.id, 1, 1000, Recorded::Done, None));
        store.record(done.collect()).await.unwrap();
        assert_eq!(store.prune(500).await.unwrap(), 1);
        let left: Vec<String> = store
            .list(None, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.sid)
            .collect();
        assert_eq!(left, ["new", "old-pending"]);
    }

    #[tokio::test]
    async fn many_concurrent_writers_share_commits() {
        let (_dir, store) = temp_store();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move {
                    s.insert_call(format!("CA{i}"), "POST_CALL_DATA", "{}".into(), 0, owed(1))
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert!(matches!(
                t.await.unwrap().unwrap(),
                Inserted::Accepted { .. }
            ));
        }
        assert_eq!(store.stats().await.unwrap().pending, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_does_not_undo_its_batch_neighbours() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (_dir, store) = temp_store();
        // Hold the writer so that the next three jobs queue up and commit as one batch.
        let (started, holding) = std::sync::mpsc::channel();
        let hold = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .run(move |_| {
                        let _ = started.send(());
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        Ok(())
                    })
                    .await
            }
        });
        holding
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        let runs = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = store.run({
            let runs = runs.clone();
            move |conn| {
                runs.fetch_add(1, Ordering::SeqCst);
                conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')", [])
            }
        });
        let bad = store.run(|conn| conn.execute("INSERT INTO nope VALUES (1)", []));
        let good = store.insert_call("CA1".into(), "POST_CALL_DATA", "{}".into(), 0, owed(1));
        let (counted, bad, good) = tokio::join!(counted, bad, good);
        hold.await.unwrap().unwrap();
        assert!(bad.is_err());
        assert_eq!(counted.unwrap(), 1);
        assert!(matches!(good.unwrap(), Inserted::Accepted { .. }));
        // The batch was rolled back and its jobs ran again, each alone.
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(calls(&store).await, 1);
        assert_eq!(
            store.get_meta("k".into()).await.unwrap().as_deref(),
            Some("v")
        );
    }

    #[tokio::test]
    async fn the_readiness_probe_tries_the_webhooks_writes_and_keeps_none_of_them() {
        let (_dir, store) = temp_store();
        stored(&store, "CAkept", 1, 2).await;
        let count = |sql: &'static str| {
            let store = store.clone();
            async move {
                store
                    .run(move |c| c.query_row(sql, [], |r| r.get::<_, i64>(0)))
                    .await
                    .unwrap()
            }
        };
        // Also for a sid a real call already has (a retried call), and one it does not.
        store
            .probe(5, vec!["CAkept".into(), "CAnew".into()])
            .await
            .unwrap();
        assert_eq!(calls(&store).await, 1);
        assert_eq!(count("SELECT COUNT(*) FROM deliveries").await, 2);
        // A call that cannot be written fails the probe, as it fails the webhook.
        store
            .run(|c| {
                c.execute_batch(
                    "CREATE TRIGGER refuse BEFORE INSERT ON deliveries
                     BEGIN SELECT RAISE(ABORT, 'deliveries refused'); END",
                )
            })
            .await
            .unwrap();
        let e = store.probe(6, vec![]).await.unwrap_err();
        assert!(e.to_string().contains("deliveries refused"), "{e}");
        assert_eq!(calls(&store).await, 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_read_only_store_directory_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(Store::open(&path).unwrap()); // closed: no -wal or -shm left
        assert_eq!(write_cause(&path), None);
        let set_mode = |mode| {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set_mode(0o555);
        let cause = write_cause(&path);
        set_mode(0o755);
        if std::fs::File::create(dir.path().join("root-writes-anyway")).is_ok() && cause.is_none() {
            // Root ignores the mode: nothing is read-only for it here.
            return;
        }
        let Some(Cause::Other(cause)) = cause else {
            panic!("a read-only directory is a cause: {cause:?}");
        };
        assert!(
            cause.starts_with(&format!(
                "{} (the directory holding the store",
                dir.path().display()
            )),
            "{cause}"
        );
        assert!(
            cause.contains("cannot be written by this process"),
            "{cause}"
        );
    }

    #[tokio::test]
    async fn a_probe_on_a_full_store_says_it_is_full() {
        let (_dir, store) = temp_store();
        // No page may be added: the next call cannot be written, as on a full disk.
        store
            .run(|c| {
                let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            })
            .await
            .unwrap();
        // Fill what room the pages have left, with calls as large as fit, then smaller.
        for size in [2000, 200, 1] {
            for i in 0.. {
                let sid = format!("CAfill{size}-{i}");
                let body = "x".repeat(size);
                if store
                    .insert_call(sid, "POST_CALL_DATA", body, 1, owed(1))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        let e = store.probe(1, vec![]).await.unwrap_err().to_string();
        assert!(e.contains("full"), "{e}");
    }

    /// Polls `f` once: a store job is sent to the writer thread on its first poll, so jobs
    /// polled in turn are queued in that order.
    async fn queued<F: std::future::Future + Unpin>(f: &mut F) {
        std::future::poll_fn(|cx| {
            assert!(std::pin::Pin::new(&mut *f).poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await
    }

    /// The readiness probe runs on the writer thread between webhooks' inserts, inside their
    /// group transaction. Its savepoint undoes only its own rows, and a probe that fails (here
    /// with an error that rolls back the whole transaction, as a full disk or an I/O error can)
    /// costs the calls beside it a commit of their own, never their rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_in_a_batch_of_calls_neither_keeps_its_rows_nor_loses_theirs() {
        let (_dir, store) = temp_store();
        for refused in [false, true] {
            if refused {
                store
                    .run(|c| {
                        c.execute_batch(
                            "CREATE TRIGGER refuse_probe BEFORE INSERT ON calls
                             WHEN NEW.event = 'readiness-probe'
                             BEGIN SELECT RAISE(ROLLBACK, 'probe refused'); END",
                        )
                    })
                    .await
                    .unwrap();
            }
            // The writer thread is held by a job until the calls and the probe are queued
            // behind it: they then go into one transaction.
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let wait = std::sync::Mutex::new(wait);
            let mut hold = Box::pin(store.run(move |_| {
                let _ = wait.lock().unwrap().recv();
                Ok(())
            }));
            queued(&mut hold).await;
            let (first, second) = (format!("CAbefore{refused}"), format!("CAafter{refused}"));
            let mut before = Box::pin(store.insert_call(
                first.clone(),
                "POST_CALL_DATA",
                "{}".into(),
                1,
                owed(1),
            ));
            let mut probe = Box::pin(store.probe(2, vec![first.clone(), second.clone()]));
            let mut after = Box::pin(store.insert_call(
                second.clone(),
                "POST_CALL_DATA",
                "{}".into(),
                3,
                owed(2),
            ));
            queued(&mut before).await;
            queued(&mut probe).await;
            queued(&mut after).await;
            drop(go);
            hold.await.unwrap();
            assert!(matches!(
                before.await.unwrap(),
                Inserted::Accepted { deliveries: 1, .. }
            ));
            match probe.await {
                Ok(()) => assert!(!refused),
                Err(e) => assert!(refused && e.to_string().contains("probe refused"), "{e}"),
            }
            assert!(matches!(
                after.await.unwrap(),
                Inserted::Accepted { deliveries: 2, .. }
            ));
            let kept: Vec<(String, String, i64)> = store
                .run(|c| {
                    c.prepare(
                        "SELECT c.sid, c.event, COUNT(d.id) FROM calls c
                         LEFT JOIN deliveries d ON d.call_id = c.id GROUP BY c.id ORDER BY c.id",
                    )?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
                })
                .await
                .unwrap();
            let want: Vec<(String, String, i64)> = [false, true]
                .into_iter()
                .take(usize::from(refused) + 1)
                .flat_map(|r| {
                    [
                        (format!("CAbefore{r}"), "POST_CALL_DATA".into(), 1),
                        (format!("CAafter{r}"), "POST_CALL_DATA".into(), 2),
                    ]
                })
                .collect();
            assert_eq!(kept, want);
            assert_eq!(
                store.stats().await.unwrap().pending,
                3 * (i64::from(refused) + 1)
            );
        }
    }

    /// A store from before 7023e85 has the backlog index on (status, created_at), named
    /// `deliveries_open`. Opened by this version it loses that one (it would be kept up on
    /// every write for nothing) and gets `deliveries_waiting` with the rows already there, and
    /// the backlog gauges read through it.
    #[tokio::test]
    async fn a_store_from_before_the_waiting_index_is_given_it_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        stored(&store, "CAold", 7, 2).await;
        store.close().await;
        // The indexes as the previous version left them.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DROP INDEX deliveries_waiting;
                 CREATE INDEX deliveries_open ON deliveries (status, created_at)
                     WHERE status != 'done';",
            )
            .unwrap();
        let store = Store::open(&path).unwrap();
        let indexes: Vec<String> = store
            .run(|c| {
                c.prepare(
                    "SELECT name FROM sqlite_master WHERE type = 'index'
                     AND tbl_name = 'deliveries' AND sql IS NOT NULL ORDER BY name",
                )?
                .query_map([], |r| r.get(0))?
                .collect()
            })
            .await
            .unwrap();
        assert_eq!(indexes, ["deliveries_pending", "deliveries_waiting"]);
        let (check, plan): (String, String) = store
            .run(|c| {
                let check = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
                let plan = c.query_row(&format!("EXPLAIN QUERY PLAN {OLDEST_OPEN}"), [], |r| {
                    r.get(3)
                })?;
                Ok((check, plan))
            })
            .await
            .unwrap();
        assert_eq!(check, "ok");
        assert!(plan.contains("deliveries_waiting"), "{plan}");
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.pending, stats.oldest_pending_since), (2, Some(7)));
    }
}
