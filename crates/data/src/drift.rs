//! A drifting-engagement scenario anchored at the present, for `tandem demo`, `tandem bootstrap`
//! and the retraining tests: a synthetic log whose older part seeds the user tower's event log
//! (and trains v1) and whose newer part — where user interests have drifted — arrives live.

use std::path::{Path, PathBuf};

use crate::synth::{generate, SynthConfig};
use crate::{DataError, EventLog, Result};

/// One engagement to record live.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub user: String,
    pub item: String,
    pub ts: i64,
}

pub struct Drift {
    /// The older events, in time order.
    pub seed: EventLog,
    /// The newer events, in time order.
    pub fresh: Vec<Fresh>,
}

impl Drift {
    /// The whole log: the older part, then the newer.
    pub fn all(&self) -> EventLog {
        let mut all = self.seed.clone();
        for f in &self.fresh {
            all.push(&f.user, &f.item, f.ts, 1.0);
        }
        all
    }
}

/// Generates `cfg` shifted so its last event is about two minutes ago, and splits it in time at
/// `1 − fresh_fraction`.
pub fn drift(cfg: &SynthConfig, fresh_fraction: f64) -> Drift {
    drift_ending(cfg, fresh_fraction, tandem_types::clock::now_unix() - 120)
}

/// [`drift`] with the log's span ending at `end` (unix seconds). Models read the hour of day and
/// the day of week of each event, so a log that ends at a fixed time of the week trains the same
/// model whenever it is generated; one that ends "now" does not (tests use this).
pub fn drift_ending(cfg: &SynthConfig, fresh_fraction: f64, end: i64) -> Drift {
    let cfg = SynthConfig {
        start: end - cfg.days as i64 * 86_400,
        ..cfg.clone()
    };
    let log = generate(&cfg).events;
    let order = log.time_order();
    let cut = ((order.len() as f64) * (1.0 - fresh_fraction.clamp(0.0, 1.0))).round() as usize;
    let seed = log.subset(&order[..cut]);
    let fresh = order[cut..]
        .iter()
        .map(|&e| {
            let e = e as usize;
            Fresh {
                user: log.users.name(log.user[e]).to_string(),
                item: log.items.name(log.item[e]).to_string(),
                ts: log.ts[e],
            }
        })
        .collect();
    Drift { seed, fresh }
}

/// Writes `log` (in time order) as the first segment of an event-log directory, the layout the
/// user tower appends to and `tandem train --events DIR` reads.
pub fn seed_event_log(dir: &Path, log: &EventLog) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("segment-000000.csv");
    let order = log.time_order();
    log.write(&path, Some(&order), false)?;
    Ok(path)
}
