//! The retrain history: one JSON line per cycle state change, appended and fsynced, so a crash
//! loses at most the line being written (a torn last line is ignored on read). A cycle first
//! appends a `started` record and finally its outcome under the same cycle number; readers keep
//! the last record of each cycle. A cycle whose last record is still `started` was interrupted.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_client::Step;
use tandem_types::{DataRange, ModelVersion};

use crate::canary::CanaryReport;
use crate::gate::Decision;
use crate::{io_err, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// In progress (or interrupted, if it is a cycle's last record).
    Started,
    /// Nothing to do (too few new events).
    Skipped,
    /// The gate refused the candidate; nothing was published.
    Rejected,
    /// Published only (no fleet given).
    Published,
    /// Published, rolled out and the canary held.
    Deployed,
    /// Published and rolled out, then rolled back (canary or rollout failure).
    RolledBack,
    /// The cycle failed (bad data, training error, a crash); the fleet was left as it was.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Started => "started",
            Outcome::Skipped => "skipped",
            Outcome::Rejected => "rejected",
            Outcome::Published => "published",
            Outcome::Deployed => "deployed",
            Outcome::RolledBack => "rolled_back",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CycleRecord {
    pub cycle: u64,
    pub started_at: i64,
    #[serde(default)]
    pub finished_at: Option<i64>,
    pub outcome: Outcome,
    #[serde(default)]
    pub reason: String,
    /// The version serving when the cycle started.
    #[serde(default)]
    pub champion: Option<ModelVersion>,
    /// The candidate's version once published.
    #[serde(default)]
    pub version: Option<ModelVersion>,
    #[serde(default)]
    pub train_data: Option<DataRange>,
    #[serde(default)]
    pub heldout_events: usize,
    #[serde(default, deserialize_with = "nan_null::map")]
    pub candidate_metrics: BTreeMap<String, f64>,
    #[serde(default, deserialize_with = "nan_null::map")]
    pub champion_metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub gate: Vec<Decision>,
    #[serde(default)]
    pub rollout: Vec<Step>,
    #[serde(default)]
    pub rollback: Vec<Step>,
    #[serde(default)]
    pub canary: Vec<CanaryReport>,
    #[serde(default)]
    pub train_seconds: f64,
    #[serde(default)]
    pub seconds: f64,
}

impl CycleRecord {
    pub fn new(cycle: u64, started_at: i64) -> Self {
        CycleRecord {
            cycle,
            started_at,
            finished_at: None,
            outcome: Outcome::Started,
            reason: String::new(),
            champion: None,
            version: None,
            train_data: None,
            heldout_events: 0,
            candidate_metrics: BTreeMap::new(),
            champion_metrics: BTreeMap::new(),
            gate: Vec::new(),
            rollout: Vec::new(),
            rollback: Vec::new(),
            canary: Vec::new(),
            train_seconds: 0.0,
            seconds: 0.0,
        }
    }
}

/// Non-finite numbers are written as JSON `null`; these read them back as NaN.
pub(crate) mod nan_null {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer};

    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    pub fn map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        Ok(BTreeMap::<String, Option<f64>>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
            .collect())
    }
}

/// The history file of one model's retrainer.
pub struct History {
    path: PathBuf,
}

impl History {
    /// `<artifacts>/retrain/<model>/history.jsonl`.
    pub fn for_model(artifacts: &Path, model: &str) -> Self {
        History {
            path: artifacts.join("retrain").join(model).join("history.jsonl"),
        }
    }

    pub fn at(path: PathBuf) -> Self {
        History { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record durably.
    pub fn append(&self, r: &CycleRecord) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        let mut line = Vec::new();
        // A line torn by a crash must not swallow this one: start on a fresh line.
        let len = f.metadata().map_err(io_err(&self.path))?.len();
        if len > 0 {
            let mut last = [0u8];
            f.read_exact_at(&mut last, len - 1)
                .map_err(io_err(&self.path))?;
            if last[0] != b'\n' {
                line.push(b'\n');
            }
        }
        serde_json::to_writer(&mut line, r)?;
        line.push(b'\n');
        f.write_all(&line).map_err(io_err(&self.path))?;
        f.sync_data().map_err(io_err(&self.path))?;
        Ok(())
    }

    /// The last record of every cycle, in cycle order. A missing file is an empty history; a torn
    /// or unreadable line is skipped with a warning.
    pub fn cycles(&self) -> Result<Vec<CycleRecord>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        let mut by_cycle: BTreeMap<u64, CycleRecord> = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<CycleRecord>(line) {
                Ok(r) => {
                    by_cycle.insert(r.cycle, r);
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), line = n + 1, error = %e, "skipping an unreadable history line")
                }
            }
        }
        Ok(by_cycle.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_record_of_a_cycle_wins_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::at(dir.path().join("h.jsonl"));
        assert!(h.cycles().unwrap().is_empty());
        h.append(&CycleRecord::new(1, 10)).unwrap();
        let mut done = CycleRecord::new(1, 10);
        done.outcome = Outcome::Rejected;
        done.reason = "recall@50 too low".into();
        done.candidate_metrics.insert("recall@50".into(), f64::NAN);
        done.gate.push(crate::gate::Decision {
            rule: "vs_champion".into(),
            passed: true,
            value: 0.3,
            threshold: f64::NAN,
            reason: "no champion".into(),
        });
        h.append(&done).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(h.path())
            .unwrap()
            .write_all(b"{\"cycle\":3,\"star")
            .unwrap();
        h.append(&CycleRecord::new(2, 20)).unwrap();
        let c = h.cycles().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].outcome, Outcome::Rejected);
        assert_eq!(c[0].reason, "recall@50 too low");
        assert!(c[0].candidate_metrics["recall@50"].is_nan());
        assert!(c[0].gate[0].threshold.is_nan());
        assert_eq!(c[1].outcome, Outcome::Started);
    }
}
