//! Online user state and the durable engagement log.
//!
//! **State.** Per user, a ring of the last `L` item ids (interned `u32`s) plus the last event
//! time. Memory per user is `≈ 4·L + 80 bytes + the id string`: 280 bytes plus the id at L = 50
//! (see [`OnlineStore::approx_bytes`]); item strings are stored once for all users.
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

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub user: String,
    pub item: String,
    pub ts: i64,
    pub action: String,
    pub weight: f32,
}

struct UserState {
    recent: VecDeque<u32>,
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
                recent: VecDeque::with_capacity(cap),
                last_ts: ts,
            });
        if state.recent.len() == cap {
            state.recent.pop_front();
        }
        state.recent.push_back(id);
        state.last_ts = state.last_ts.max(ts);
    }

    /// The user's recent items, most recent first (empty for unknown users).
    pub fn history(&self, user: &str) -> Vec<&str> {
        self.users.get(user).map_or_else(Vec::new, |s| {
            s.recent
                .iter()
                .rev()
                .map(|&i| self.item_ids[i as usize].as_str())
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
                    + 4 * s.recent.capacity()
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

pub const SEGMENT_HEADER: &[u8] = b"user_id,item_id,timestamp,action,weight\n";

/// Appends events to segment files.
pub struct EventLogWriter {
    dir: PathBuf,
    file: File,
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
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(&bytes[..complete]);
            for rec in reader.records() {
                let rec = rec.map_err(|e| format!("{}: {e}", seg.display()))?;
                let get = |i: usize| rec.get(i).unwrap_or("").to_string();
                events.push(Event {
                    user: get(0),
                    item: get(1),
                    ts: get(2).parse().unwrap_or(0),
                    action: get(3),
                    weight: get(4).parse().unwrap_or(1.0),
                });
            }
        }
        let segment = last + 1;
        let (file, bytes) = Self::create_segment(dir, segment, fsync)?;
        Ok((
            EventLogWriter {
                dir: dir.to_path_buf(),
                file,
                segment,
                bytes,
                max_bytes,
                fsync,
            },
            events,
        ))
    }

    fn create_segment(dir: &Path, n: u64, fsync: Fsync) -> Result<(File, u64), String> {
        let path = dir.join(format!("segment-{n:06}.csv"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        file.write_all(SEGMENT_HEADER)
            .map_err(|e| io_err(&path, e))?;
        if fsync == Fsync::Always {
            file.sync_all().map_err(|e| io_err(&path, e))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(dir, e))?;
        }
        Ok((file, SEGMENT_HEADER.len() as u64))
    }

    /// Appends `events` as one write (and one fsync under [`Fsync::Always`]).
    pub fn append(&mut self, events: &[Event]) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(Vec::new());
        for e in events {
            w.write_record([
                e.user.as_str(),
                e.item.as_str(),
                &e.ts.to_string(),
                e.action.as_str(),
                &e.weight.to_string(),
            ])
            .map_err(|e| e.to_string())?;
        }
        let buf = w.into_inner().map_err(|e| e.to_string())?;
        let path = self.dir.join(format!("segment-{:06}.csv", self.segment));
        self.file.write_all(&buf).map_err(|e| io_err(&path, e))?;
        if self.fsync == Fsync::Always {
            self.file.sync_data().map_err(|e| io_err(&path, e))?;
        }
        self.bytes += buf.len() as u64;
        if self.bytes >= self.max_bytes {
            self.segment += 1;
            let (file, bytes) = Self::create_segment(&self.dir, self.segment, self.fsync)?;
            self.file = file;
            self.bytes = bytes;
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
        assert_eq!(s.history("u"), vec!["d", "c", "b"]);
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
        // Ring capacity 4·L = 200, slot + key + last_ts ≈ 90; items are shared (50k of them).
        assert!(per_user < 4.0 * l as f64 + 150.0, "{per_user}");
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
