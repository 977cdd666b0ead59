//! The columnar event log: interned string ids plus parallel columns, so ten million events cost
//! about 20 bytes each instead of two heap strings.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use flate2::write::GzEncoder;
use parquet::data_type::{ByteArray, ByteArrayType, FloatType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use sha2::{Digest, Sha256};

use crate::table::{self, Format};
use crate::{DataError, Result};

/// Maps string ids to dense `u32` indices in first-seen order.
#[derive(Debug, Clone, Default)]
pub struct Interner {
    ids: Vec<String>,
    index: HashMap<String, u32>,
}

impl Interner {
    pub fn intern(&mut self, id: &str) -> u32 {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.ids.len() as u32;
        self.ids.push(id.to_string());
        self.index.insert(id.to_string(), i);
        i
    }

    pub fn get(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    pub fn name(&self, i: u32) -> &str {
        &self.ids[i as usize]
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn names(&self) -> &[String] {
        &self.ids
    }
}

/// Which columns hold what. Defaults: `user_id,item_id,timestamp`, no weight.
#[derive(Debug, Clone)]
pub struct EventColumns {
    pub user: String,
    pub item: String,
    pub timestamp: String,
    pub weight: Option<String>,
}

impl EventColumns {
    /// Column names in reading order: user, item, timestamp, then weight if mapped.
    pub fn names(&self) -> Vec<&str> {
        let mut names = vec![
            self.user.as_str(),
            self.item.as_str(),
            self.timestamp.as_str(),
        ];
        if let Some(w) = &self.weight {
            names.push(w.as_str());
        }
        names
    }
}

impl Default for EventColumns {
    fn default() -> Self {
        EventColumns {
            user: "user_id".into(),
            item: "item_id".into(),
            timestamp: "timestamp".into(),
            weight: None,
        }
    }
}

/// Engagement events in input order.
#[derive(Debug, Clone, Default)]
pub struct EventLog {
    pub users: Interner,
    pub items: Interner,
    pub user: Vec<u32>,
    pub item: Vec<u32>,
    pub ts: Vec<i64>,
    pub weight: Vec<f32>,
}

impl EventLog {
    pub fn len(&self) -> usize {
        self.user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.user.is_empty()
    }

    pub fn push(&mut self, user: &str, item: &str, ts: i64, weight: f32) {
        let u = self.users.intern(user);
        let i = self.items.intern(item);
        self.user.push(u);
        self.item.push(i);
        self.ts.push(ts);
        self.weight.push(weight);
    }

    /// Reads an event file (CSV, `.csv.gz` or Parquet by extension), or a directory of event-log
    /// segments as the user-tower service writes them. Fails on a missing column, an unparsable
    /// timestamp or weight, an empty id, or a source without events.
    pub fn read(path: &Path, cols: &EventColumns) -> Result<EventLog> {
        if path.is_dir() {
            return Self::read_segments(path, cols);
        }
        let log = Self::read_file(path, cols)?;
        if log.is_empty() {
            return Err(DataError::NoEvents {
                path: path.to_path_buf(),
            });
        }
        Ok(log)
    }

    /// Reads every `segment-*.csv` of an event-log directory in order. A segment's last line
    /// without a newline is a record torn by a crash mid-append: it is skipped, never an error.
    pub fn read_segments(dir: &Path, cols: &EventColumns) -> Result<EventLog> {
        let mut log = EventLog::default();
        for seg in segment_files(dir)? {
            let bytes = std::fs::read(&seg).map_err(|source| DataError::Io {
                path: seg.clone(),
                source,
            })?;
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            if complete == 0 {
                continue;
            }
            Self::parse_csv_bytes(&mut log, &seg, &bytes[..complete], cols)?;
        }
        if log.is_empty() {
            return Err(DataError::NoEvents {
                path: dir.to_path_buf(),
            });
        }
        Ok(log)
    }

    /// Appends the complete CSV records in `bytes` (a segment, header first) to `log`.
    fn parse_csv_bytes(
        log: &mut EventLog,
        path: &Path,
        bytes: &[u8],
        cols: &EventColumns,
    ) -> Result<()> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(bytes);
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let wanted = cols.names();
        let pos = table::resolve_columns(path, &headers, &wanted)?;
        for (row, rec) in reader.records().enumerate() {
            let rec = rec.map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            let v: Vec<&str> = pos.iter().map(|&p| rec.get(p).unwrap_or("")).collect();
            Self::push_row(log, path, row + 1, &v, cols)?;
        }
        Ok(())
    }

    fn push_row(
        log: &mut EventLog,
        path: &Path,
        row: usize,
        v: &[&str],
        cols: &EventColumns,
    ) -> Result<()> {
        if v[0].is_empty() || v[1].is_empty() {
            return Err(DataError::BadValue {
                path: path.to_path_buf(),
                row,
                reason: format!(
                    "empty {}",
                    if v[0].is_empty() {
                        &cols.user
                    } else {
                        &cols.item
                    }
                ),
            });
        }
        let ts = parse_timestamp(v[2]).ok_or_else(|| DataError::BadTimestamp {
            path: path.to_path_buf(),
            row,
            value: v[2].to_string(),
        })?;
        let weight = match v.get(3) {
            Some(w) => w
                .parse::<f32>()
                .ok()
                .filter(|w| w.is_finite())
                .ok_or_else(|| DataError::BadValue {
                    path: path.to_path_buf(),
                    row,
                    reason: format!("cannot parse weight {w:?}"),
                })?,
            None => 1.0,
        };
        log.push(v[0], v[1], ts, weight);
        Ok(())
    }

    fn read_file(path: &Path, cols: &EventColumns) -> Result<EventLog> {
        let wanted = cols.names();
        let mut log = EventLog::default();
        table::scan(path, &wanted, |row, v| {
            Self::push_row(&mut log, path, row, v, cols)
        })?;
        Ok(log)
    }

    /// A new log holding only the events at `indices` (in that order); ids keep their strings
    /// but are re-interned densely.
    pub fn subset(&self, indices: &[u32]) -> EventLog {
        let mut out = EventLog::default();
        for &e in indices {
            let e = e as usize;
            out.push(
                self.users.name(self.user[e]),
                self.items.name(self.item[e]),
                self.ts[e],
                self.weight[e],
            );
        }
        out
    }

    /// Event indices ordered by (timestamp, input order).
    pub fn time_order(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.len() as u32).collect();
        order.sort_by_key(|&e| self.ts[e as usize]);
        order
    }

    /// Size, time range and fingerprint, for model manifests.
    pub fn data_range(&self) -> tandem_types::DataRange {
        tandem_types::DataRange {
            events: self.len() as u64,
            users: self.users.len() as u64,
            items: self.items.len() as u64,
            min_timestamp: self.ts.iter().copied().min().unwrap_or(0),
            max_timestamp: self.ts.iter().copied().max().unwrap_or(0),
            fingerprint: self.fingerprint(),
        }
    }

    /// sha256 over the (user, item, timestamp) stream, for manifests.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for e in 0..self.len() {
            h.update(self.users.name(self.user[e]).as_bytes());
            h.update([0]);
            h.update(self.items.name(self.item[e]).as_bytes());
            h.update([0]);
            h.update(self.ts[e].to_le_bytes());
        }
        hex_lower(&h.finalize())
    }

    /// Writes the events at `indices` (or all) as CSV, gzip CSV or Parquet by `path`'s
    /// extension, with columns `user_id,item_id,timestamp[,weight]`.
    pub fn write(&self, path: &Path, indices: Option<&[u32]>, with_weight: bool) -> Result<()> {
        let all: Vec<u32>;
        let indices = match indices {
            Some(i) => i,
            None => {
                all = (0..self.len() as u32).collect();
                &all
            }
        };
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        match Format::from_path(path) {
            Format::Parquet => self.write_parquet(path, indices, with_weight),
            format => {
                let file = File::create(path).map_err(io)?;
                let sink: Box<dyn Write> = if format == Format::CsvGz {
                    Box::new(GzEncoder::new(
                        BufWriter::with_capacity(1 << 20, file),
                        flate2::Compression::fast(),
                    ))
                } else {
                    Box::new(BufWriter::with_capacity(1 << 20, file))
                };
                let mut w = csv::Writer::from_writer(sink);
                let mut header = vec!["user_id", "item_id", "timestamp"];
                if with_weight {
                    header.push("weight");
                }
                let csv_err = |e: csv::Error| DataError::Format {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                };
                w.write_record(&header).map_err(csv_err)?;
                let mut ts_buf = String::new();
                let mut wt_buf = String::new();
                for &e in indices {
                    let e = e as usize;
                    ts_buf.clear();
                    ts_buf.push_str(&self.ts[e].to_string());
                    let user = self.users.name(self.user[e]);
                    let item = self.items.name(self.item[e]);
                    if with_weight {
                        wt_buf.clear();
                        wt_buf.push_str(&self.weight[e].to_string());
                        w.write_record([user, item, &ts_buf, &wt_buf])
                    } else {
                        w.write_record([user, item, &ts_buf])
                    }
                    .map_err(csv_err)?;
                }
                let sink = w.into_inner().map_err(|e| DataError::Format {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
                drop(sink);
                Ok(())
            }
        }
    }

    fn write_parquet(&self, path: &Path, indices: &[u32], with_weight: bool) -> Result<()> {
        let err = |e: parquet::errors::ParquetError| DataError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut schema = String::from(
            "message events { REQUIRED BYTE_ARRAY user_id (UTF8); REQUIRED BYTE_ARRAY item_id (UTF8); REQUIRED INT64 timestamp;",
        );
        if with_weight {
            schema.push_str(" REQUIRED FLOAT weight;");
        }
        schema.push_str(" }");
        let schema = Arc::new(parquet::schema::parser::parse_message_type(&schema).map_err(err)?);
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build(),
        );
        let file = File::create(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut writer = SerializedFileWriter::new(file, schema, props).map_err(err)?;
        // Row groups of 1M rows keep memory flat for large synthetic logs.
        for chunk in indices.chunks(1 << 20) {
            let mut rg = writer.next_row_group().map_err(err)?;
            let mut col = 0;
            while let Some(mut c) = rg.next_column().map_err(err)? {
                match col {
                    0 | 1 => {
                        let values: Vec<ByteArray> = chunk
                            .iter()
                            .map(|&e| {
                                let name = if col == 0 {
                                    self.users.name(self.user[e as usize])
                                } else {
                                    self.items.name(self.item[e as usize])
                                };
                                ByteArray::from(name.as_bytes().to_vec())
                            })
                            .collect();
                        c.typed::<ByteArrayType>()
                            .write_batch(&values, None, None)
                            .map_err(err)?;
                    }
                    2 => {
                        let values: Vec<i64> = chunk.iter().map(|&e| self.ts[e as usize]).collect();
                        c.typed::<Int64Type>()
                            .write_batch(&values, None, None)
                            .map_err(err)?;
                    }
                    _ => {
                        let values: Vec<f32> =
                            chunk.iter().map(|&e| self.weight[e as usize]).collect();
                        c.typed::<FloatType>()
                            .write_batch(&values, None, None)
                            .map_err(err)?;
                    }
                }
                c.close().map_err(err)?;
                col += 1;
            }
            rg.close().map_err(err)?;
        }
        writer.close().map_err(err)?;
        Ok(())
    }
}

/// One engagement as services exchange it: the event log's row before interning.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub user: String,
    pub item: String,
    pub ts: i64,
    pub action: String,
    pub weight: f32,
}

/// The header of an event-log segment; [`encode_rows`] writes the rows under it.
pub const SEGMENT_HEADER: &[u8] = b"user_id,item_id,timestamp,action,weight\n";

/// `events` as CSV rows (no header) in the segment format: what a segment holds after its
/// header and what one message of the NATS engagement stream carries.
pub fn encode_rows(events: &[Event]) -> Result<Vec<u8>> {
    let err = |e: csv::Error| DataError::Invalid(format!("encoding events: {e}"));
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
        .map_err(err)?;
    }
    w.into_inner()
        .map_err(|e| DataError::Invalid(format!("encoding events: {e}")))
}

/// Rows as [`encode_rows`] writes them; `has_header` skips a segment's header line. Missing
/// fields read as empty, a bad timestamp as 0 and a bad weight as 1 (the writer never makes
/// them; a hand-edited file is not refused here, the trainer's reader validates).
pub fn decode_rows(bytes: &[u8], has_header: bool) -> Result<Vec<Event>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(has_header)
        .from_reader(bytes);
    let mut events = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(|e| DataError::Invalid(format!("decoding events: {e}")))?;
        let get = |i: usize| rec.get(i).unwrap_or("").to_string();
        events.push(Event {
            user: get(0),
            item: get(1),
            ts: get(2).parse().unwrap_or(0),
            action: get(3),
            weight: get(4).parse().unwrap_or(1.0),
        });
    }
    Ok(events)
}

/// The segment files of an event-log directory, in order.
pub fn segment_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut segs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("segment-") && n.ends_with(".csv"))
        })
        .collect();
    segs.sort();
    Ok(segs)
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unix seconds (integer or fractional) or RFC 3339 (`2024-01-02T03:04:05Z`, offsets allowed).
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite() {
            return Some(f.floor() as i64);
        }
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_as_unix_seconds_or_rfc3339() {
        assert_eq!(parse_timestamp("874965758"), Some(874965758));
        assert_eq!(parse_timestamp("12.9"), Some(12));
        assert_eq!(parse_timestamp("1970-01-01T00:01:00Z"), Some(60));
        assert_eq!(parse_timestamp("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("NaN"), None);
    }

    fn sample() -> EventLog {
        let mut log = EventLog::default();
        log.push("u1", "a", 10, 1.0);
        log.push("u2", "b,with comma", 5, 2.0);
        log.push("u1", "c", 10, 1.0);
        log
    }

    #[test]
    fn every_format_round_trips_the_same_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample();
        for ext in ["csv", "csv.gz", "parquet"] {
            let path = dir.path().join(format!("events.{ext}"));
            log.write(&path, None, true).unwrap();
            let cols = EventColumns {
                weight: Some("weight".into()),
                ..Default::default()
            };
            let back = EventLog::read(&path, &cols).unwrap();
            assert_eq!(back.fingerprint(), log.fingerprint(), "{ext}");
            assert_eq!(back.weight, log.weight, "{ext}");
        }
    }

    #[test]
    fn a_segment_directory_reads_in_order_and_skips_a_torn_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let header = "user_id,item_id,timestamp,action,weight\n";
        std::fs::write(
            dir.path().join("segment-000001.csv"),
            format!("{header}u1,a,1,click,1\nu2,b,2,click,1\n"),
        )
        .unwrap();
        // A crash mid-append left half a record without its newline.
        std::fs::write(
            dir.path().join("segment-000002.csv"),
            format!("{header}u1,c,3,click,1\nu3,d,4,cl"),
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a segment").unwrap();
        let log = EventLog::read(dir.path(), &EventColumns::default()).unwrap();
        let items: Vec<&str> = log.item.iter().map(|&i| log.items.name(i)).collect();
        assert_eq!(items, vec!["a", "b", "c"]);
    }

    #[test]
    fn time_order_breaks_ties_by_input_order() {
        assert_eq!(sample().time_order(), vec![1, 0, 2]);
    }

    #[test]
    fn bad_input_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.csv");
        std::fs::write(&path, "user,item_id,timestamp\nu,i,1\n").unwrap();
        let err = EventLog::read(&path, &EventColumns::default()).unwrap_err();
        assert!(
            err.to_string().contains("missing column \"user_id\""),
            "{err}"
        );

        std::fs::write(&path, "user_id,item_id,timestamp\nu,i,soon\n").unwrap();
        let err = EventLog::read(&path, &EventColumns::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("row 1: cannot parse timestamp \"soon\""),
            "{err}"
        );

        std::fs::write(&path, "user_id,item_id,timestamp\n").unwrap();
        let err = EventLog::read(&path, &EventColumns::default()).unwrap_err();
        assert!(err.to_string().contains("no events"), "{err}");

        std::fs::write(&path, "").unwrap();
        assert!(EventLog::read(&path, &EventColumns::default()).is_err());
    }
}
