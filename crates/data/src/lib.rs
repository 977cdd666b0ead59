//! Data in and out: engagement event logs and optional user/item feature tables, read from CSV
//! (plain or gzip) or Parquet with columns mapped by name; the two evaluation splits; and the
//! deterministic synthetic dataset that is Tandem's embedded default.
//!
//! - [`table`]: format detection and a streaming row scanner shared by every reader.
//! - [`events`]: the columnar [`EventLog`] with interned string ids, and its writers.
//! - [`features`]: feature tables (categorical, multi-valued `a|b`, numeric).
//! - [`split`]: the per-user and global temporal protocols.
//! - [`synth`]: `tandem synth`.
//! - [`drift`]: the drifting scenario anchored at the present (demo, bootstrap, tests).

pub mod drift;
pub mod events;
pub mod features;
pub mod split;
pub mod synth;
pub mod table;

pub use events::{EventColumns, EventLog, Interner};
pub use features::{FeatureKind, FeatureTable};
pub use split::{Protocol, Split};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: missing column {column:?} (columns present: {present})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        present: String,
    },
    #[error(
        "{path}: row {row}: cannot parse timestamp {value:?} (expected unix seconds or RFC 3339)"
    )]
    BadTimestamp {
        path: PathBuf,
        row: usize,
        value: String,
    },
    #[error("{path}: row {row}: {reason}")]
    BadValue {
        path: PathBuf,
        row: usize,
        reason: String,
    },
    #[error("{path}: empty file (no header row)")]
    Empty { path: PathBuf },
    #[error("{path}: no events")]
    NoEvents { path: PathBuf },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
