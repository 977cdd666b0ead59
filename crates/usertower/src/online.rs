//! Online user state and the durable engagement log.
//!
//! **State.** Per user, a ring of the last `cap` (item, time) pairs (interned `u32` ids and
//! `u32` unix seconds, grown on demand) plus the last event time. Memory per user is
//! `≈ 8·n + 80 bytes + the id string` for `n ≤ cap` recent events (see
//! [`OnlineStore::approx_bytes`]); item strings are stored once for all users.
//! Recency is arrival order: the history is what the service saw last, which is what a request
//! right now should reflect.
//!
//! **Log.** Every accepted event is appended to `segment-NNNNNN.csv` (header
//! `user_id,item_id,timestamp,action,weight`) before the call that recorded it returns — the
//! format `tandem train --events DIR` reads directly. With [`Fsync::Always`] (the default) the
//! segment is fsynced before the acknowledgement: an acknowledged event survives a crash. With
//! `Fsync::Never` the OS flushes when it likes (a crash may lose recent acknowledged events).
//! Segments roll over at a size limit; each start opens a new segment. On start the state is
//! rebuilt by replaying every segment; a torn last record (crash mid-append) is cut off the file,
//! losing only that record.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use tandem_data::events::{Event, SEGMENT_HEADER};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Never,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            o => Err(format!(
                "unknown fsync policy {o:?} (expected always or never)"
            )),
        }
    }
}

struct UserState {
    /// (item, unix seconds) of the most recent events, oldest first.
    recent: VecDeque<(u32, u32)>,
    last_ts: i64,
}

/// Recent engagement of every user seen.
pub struct OnlineStore {
    cap: usize,
    item_ids: Vec<String>,
    item_index: HashMap<String, u32>,
    users: HashMap<String, UserState>,
}

impl OnlineStore {
    pub fn new(cap: usize) -> Self {
        OnlineStore {
            cap: cap.max(1),
            item_ids: Vec::new(),
            item_index: HashMap::new(),
            users: HashMap::new(),
        }
    }

    pub fn record(&mut self, user: &str, item: &str, ts: i64) {
        let id = match self.item_index.get(item) {
            Some(&i) => i,
            None => {
                let i = self.item_ids.len() as u32;
                self.item_ids.push(item.to_string());
                self.item_index.insert(item.to_string(), i);
                i
            }
        };
        let cap = self.cap;
        let state = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| UserState {
                recent: VecDeque::new(),
                last_ts: ts,
            });
        if state.recent.len() == cap {
            state.recent.pop_front();
        }
        state
            .recent
            .push_back((id, ts.clamp(0, u32::MAX as i64) as u32));
        state.last_ts = state.last_ts.max(ts);
    }

    /// Records `events` in order.
    pub fn record_all(&mut self, events: &[Event]) {
        for e in events {
            self.record(&e.user, &e.item, e.ts);
        }
    }

    /// The user's recent items with their times, most recent first (empty for unknown users).
    pub fn history(&self, user: &str) -> Vec<(&str, i64)> {
        self.users.get(user).map_or_else(Vec::new, |s| {
            s.recent
                .iter()
                .rev()
                .map(|&(i, t)| (self.item_ids[i as usize].as_str(), t as i64))
                .collect()
        })
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Estimated heap bytes: per user the map slot, key, state and ring capacity; plus items.
    pub fn approx_bytes(&self) -> usize {
        let per_user: usize = self
            .users
            .iter()
            .map(|(k, s)| {
                std::mem::size_of::<(String, UserState)>()
                    + k.capacity()
                    + 8 * s.recent.capacity()
                    + 8
            })
            .sum();
        let items: usize = self
            .item_ids
            .iter()
            .map(|s| s.capacity() * 2 + 24 + 4 + 16)
            .sum();
        per_user + items
    }
}

/// Appends events to segment files.
///
/// An append is all or nothing: the batch is encoded first and written with one `write_all`;
/// if that or the fsync fails (a full disk), the segment is cut back to its length before the
/// call, so a failed request leaves the log exactly as it was and the next acknowledged event
/// starts on a clean record boundary. A new segment is created lazily, on the first append
/// after a start or a rollover, so a service restarted on a full disk still starts (and serves
/// reads); a rollover that cannot create its file is retried on the next append.
pub struct EventLogWriter {
    dir: PathBuf,
    /// The open segment, or none until the first append needs one.
    file: Option<File>,
    segment: u64,
    bytes: u64,
    max_bytes: u64,
    fsync: Fsync,
}

fn io_err(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}

impl EventLogWriter {
    /// Opens the log in `dir`, repairing a torn tail, and returns every event already logged.
    pub fn open(dir: &Path, fsync: Fsync, max_bytes: u64) -> Result<(Self, Vec<Event>), String> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let segments = tandem_data::events::segment_files(dir).map_err(|e| e.to_string())?;
        let mut events = Vec::new();
        let mut last = 0u64;
        for seg in &segments {
            last = last.max(segment_number(seg).unwrap_or(0));
            let bytes = std::fs::read(seg).map_err(|e| io_err(seg, e))?;
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            if complete < bytes.len() {
                // A crash mid-append: drop the partial record so the file is clean again.
                tracing::warn!(segment = %seg.display(), lost_bytes = bytes.len() - complete, "truncating a torn record");
                let f = OpenOptions::new()
                    .write(true)
                    .open(seg)
                    .map_err(|e| io_err(seg, e))?;
                f.set_len(complete as u64).map_err(|e| io_err(seg, e))?;
                f.sync_all().map_err(|e| io_err(seg, e))?;
            }
            events.extend(
                tandem_data::events::decode_rows(&bytes[..complete], true)
                    .map_err(|e| format!("{}: {e}", seg.display()))?,
            );
        }
        Ok((
            EventLogWriter {
                dir: dir.to_path_buf(),
                file: None,
                segment: last + 1,
                bytes: 0,
                max_bytes,
                fsync,
            },
            events,
        ))
    }

    fn path(&self) -> PathBuf {
        self.dir.join(format!("segment-{:06}.csv", self.segment))
    }

    /// Creates segment `self.segment` with its header. A failure removes the half-made file.
    fn create_segment(&mut self) -> Result<(), String> {
        let path = self.path();
        let result = (|| -> std::io::Result<File> {
            let mut file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            file.write_all(SEGMENT_HEADER)?;
            if self.fsync == Fsync::Always {
                file.sync_all()?;
                File::open(&self.dir)?.sync_all()?;
            }
            Ok(file)
        })();
        match result {
            Ok(file) => {
                self.file = Some(file);
                self.bytes = SEGMENT_HEADER.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(io_err(&path, e))
            }
        }
    }

    /// Appends `events` as one write (and one fsync under [`Fsync::Always`]): all of them or,
    /// on error, none.
    pub fn append(&mut self, events: &[Event]) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let buf = tandem_data::events::encode_rows(events).map_err(|e| e.to_string())?;
        if self.file.is_none() {
            self.create_segment()?;
        }
        let path = self.path();
        let before = self.bytes;
        let file = self.file.as_mut().expect("a segment is open");
        let written = file.write_all(&buf).and_then(|()| match self.fsync {
            Fsync::Always => file.sync_data(),
            Fsync::Never => Ok(()),
        });
        if let Err(e) = written {
            // Nothing of a failed batch may stay: cut the segment back to where it was.
            let restored = file.set_len(before).and_then(|()| file.sync_data());
            if let Err(r) = restored {
                // The tail could not be cut: never append after it. The next append starts a
                // new segment, and a restart's torn-tail repair drops the partial record.
                tracing::error!(segment = %path.display(), error = %r, "cannot cut back a failed append");
                self.file = None;
                self.segment += 1;
            }
            return Err(io_err(&path, e));
        }
        self.bytes += buf.len() as u64;
        if self.bytes >= self.max_bytes {
            // The batch is durable; the next append opens the next segment.
            self.file = None;
            self.segment += 1;
        }
        Ok(())
    }
}

fn segment_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("segment-")?
        .strip_suffix(".csv")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(u: &str, i: &str, ts: i64) -> Event {
        Event {
            user: u.into(),
            item: i.into(),
            ts,
            action: "click".into(),
            weight: 1.0,
        }
    }

    #[test]
    fn history_is_most_recent_first_and_capped() {
        let mut s = OnlineStore::new(3);
        for (k, i) in ["a", "b", "c", "d"].iter().enumerate() {
            s.record("u", i, k as i64);
        }
        assert_eq!(s.history("u"), vec![("d", 3), ("c", 2), ("b", 1)]);
        assert!(s.history("nobody").is_empty());
    }

    #[test]
    fn memory_per_user_stays_bounded_with_a_million_users() {
        let l = 50;
        let mut s = OnlineStore::new(l);
        for u in 0..1_000_000u32 {
            let user = format!("user-{u}");
            for k in 0..3 {
                s.record(&user, &format!("item-{}", (u * 7 + k) % 50_000), k as i64);
            }
        }
        assert_eq!(s.users(), 1_000_000);
        let per_user = s.approx_bytes() as f64 / 1e6;
        println!("approx bytes per user (L = {l}): {per_user:.0}");
        // Rings grow on demand (3 events: capacity 3–4 pairs of 8 bytes), slot + key + last_ts
        // ≈ 90; items are shared (50k of them).
        assert!(per_user < 8.0 * 4.0 + 150.0, "{per_user}");
    }

    #[test]
    fn the_log_replays_after_restart_and_a_torn_record_loses_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, old) = EventLogWriter::open(dir.path(), Fsync::Always, 1 << 20).unwrap();
            assert!(old.is_empty());
            w.append(&[ev("u1", "a", 1), ev("u1", "b,with comma", 2)])
                .unwrap();
            w.append(&[ev("u2", "c", 3)]).unwrap();
        }
        // Simulate a crash mid-append: cut the last record in half.
        let seg = dir.path().join("segment-000001.csv");
        let bytes = std::fs::read(&seg).unwrap();
        std::fs::write(&seg, &bytes[..bytes.len() - 4]).unwrap();
        let (mut w, events) = EventLogWriter::open(dir.path(), Fsync::Always, 1 << 20).unwrap();
        assert_eq!(events, vec![ev("u1", "a", 1), ev("u1", "b,with comma", 2)]);
        w.append(&[ev("u3", "d", 4)]).unwrap();
        drop(w);
        let (_, events) = EventLogWriter::open(dir.path(), Fsync::Always, 1 << 20).unwrap();
        assert_eq!(events.len(), 3);
        // `tandem train` reads the same directory.
        let log = tandem_data::EventLog::read(dir.path(), &Default::default()).unwrap();
        assert_eq!(log.len(), 3);
    }

    #[test]
    fn segments_roll_over_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = EventLogWriter::open(dir.path(), Fsync::Never, 100).unwrap();
        for k in 0..20 {
            w.append(&[ev("user", "item", k)]).unwrap();
        }
        drop(w);
        assert!(
            tandem_data::events::segment_files(dir.path())
                .unwrap()
                .len()
                > 2
        );
        let (_, events) = EventLogWriter::open(dir.path(), Fsync::Never, 100).unwrap();
        assert_eq!(events.len(), 20);
    }
}
