//! One retraining cycle and the daemon loop around it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_data::{EventColumns, EventLog, FeatureTable, Protocol, Split};
use tandem_index::HnswParams;
use tandem_model::eval::{metrics, EvalSet, ModelRanker, Recommender};
use tandem_model::publish::{feature_schema_hash, publish_model};
use tandem_model::train::{train, TrainInput};
use tandem_model::TwoTower;
use tandem_registry::{Registry, MODELS};
use tandem_telemetry::catalogue as m;
use tandem_types::{DataRange, ModelManifest, ModelVersion};

use crate::canary::{self, CanaryReport, ProbeUser};
use crate::candidate::{build_index, history_queries, max_norm_error, BuiltIndex};
use crate::config::RetrainConfig;
use crate::fleet::Fleet;
use crate::gate::{self, Decision, Evidence};
use crate::history::{CycleRecord, History, Outcome};
use crate::{now_unix, Result, RetrainError};

/// Deliberate faults, for drills and tests of the safety nets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Train on events whose item ids were randomly permuted (the held-out slice stays intact):
    /// a candidate that has learnt nothing real.
    ShuffleTrainItems,
    /// Panic in the middle of training (a crashed trainer).
    CrashTraining,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shuffle-train-items" => Ok(Fault::ShuffleTrainItems),
            "crash-training" => Ok(Fault::CrashTraining),
            o => Err(format!(
                "unknown fault {o:?} (expected shuffle-train-items or crash-training)"
            )),
        }
    }
}

/// Where a cycle reads and writes, and whom it deploys to.
#[derive(Clone)]
pub struct CycleOptions {
    pub artifacts: PathBuf,
    pub model: String,
    /// The event log: a directory of segments as the user tower writes them, or one file.
    pub events: PathBuf,
    pub user_features: Option<PathBuf>,
    pub item_features: Option<PathBuf>,
    /// Without a fleet a passing candidate is published but not rolled out.
    pub fleet: Option<Fleet>,
    /// The homefeed orchestrator the canary probes (no canary without it).
    pub homefeed: Option<String>,
    pub fault: Option<Fault>,
    /// Progress lines for humans (the daemon logs them; the demo prints them).
    pub say: Arc<dyn Fn(&str) + Send + Sync>,
}

impl CycleOptions {
    pub fn new(artifacts: PathBuf, model: &str, events: PathBuf) -> Self {
        CycleOptions {
            artifacts,
            model: model.to_string(),
            events,
            user_features: None,
            item_features: None,
            fleet: None,
            homefeed: None,
            fault: None,
            say: Arc::new(|m| tracing::info!("{m}")),
        }
    }
}

pub struct Retrainer {
    opts: CycleOptions,
    cfg: RetrainConfig,
    history: History,
    metrics: Arc<tandem_telemetry::Registry>,
}

/// Everything the CPU-bound part of a cycle produces.
struct Prepared {
    model: TwoTower,
    built: BuiltIndex,
    train_data: DataRange,
    heldout_events: usize,
    /// The newest event of the window (the held-out slice included).
    seen_until: i64,
    candidate_metrics: BTreeMap<String, f64>,
    champion_metrics: Option<BTreeMap<String, f64>>,
    gate: Vec<Decision>,
    probes: Vec<ProbeUser>,
    train_seconds: f64,
    validation: BTreeMap<String, f64>,
}

enum Prep {
    Skip(String),
    Ready(Box<Prepared>),
}

impl Retrainer {
    pub fn new(opts: CycleOptions, cfg: RetrainConfig) -> Self {
        let history = History::for_model(&opts.artifacts, &opts.model);
        let metrics = tandem_telemetry::Registry::new();
        metrics.register(&[
            m::RETRAIN_CYCLES,
            m::RETRAIN_LAST_CYCLE,
            m::RETRAIN_SERVING_VERSION,
        ]);
        Retrainer {
            opts,
            cfg,
            history,
            metrics,
        }
    }

    /// Cycle outcomes and the serving version (the `/metrics` endpoint renders them).
    pub fn metrics(&self) -> &Arc<tandem_telemetry::Registry> {
        &self.metrics
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    fn say(&self, m: &str) {
        (self.opts.say)(m)
    }

    /// Settles a cycle a previous process left unfinished: records it as failed and rolls back
    /// any host it had already moved to its candidate. Returns the settled record.
    pub async fn resume(&self) -> Result<Option<CycleRecord>> {
        let Some(mut last) = self.history.cycles()?.pop() else {
            return Ok(None);
        };
        if last.outcome != Outcome::Started {
            return Ok(None);
        }
        let started = Instant::now();
        last.outcome = Outcome::Failed;
        last.reason = "interrupted: the retrainer stopped mid-cycle".into();
        if let (Some(fleet), Some(v)) = (&self.opts.fleet, last.version.clone()) {
            let moved: Vec<String> = fleet
                .hosts()
                .await
                .into_iter()
                .filter(|h| h.up && h.model_version == v)
                .map(|h| h.host)
                .collect();
            if !moved.is_empty() {
                match fleet.rollback(&moved).await {
                    Ok(steps) => {
                        last.reason += &format!("; rolled {} host(s) back from {v}", steps.len());
                        last.rollback = steps;
                    }
                    Err(e) => last.reason += &format!("; rolling back {v} failed: {e}"),
                }
            }
        }
        last.finished_at = Some(now_unix());
        last.seconds += started.elapsed().as_secs_f64();
        self.history.append(&last)?;
        self.say(&format!("cycle {}: {}", last.cycle, last.reason));
        Ok(Some(last))
    }

    /// The version currently serving: what most ANN hosts serve, or without a fleet the newest
    /// published version that was not rolled back.
    async fn champion(&self) -> Result<Option<ModelVersion>> {
        if let Some(f) = &self.opts.fleet {
            if let Some(v) = f.serving_version().await {
                return Ok(Some(v));
            }
        }
        let bad: HashSet<String> = self
            .history
            .cycles()?
            .into_iter()
            .filter(|c| c.outcome == Outcome::RolledBack)
            .filter_map(|c| c.version)
            .collect();
        let reg = Registry::open(&self.opts.artifacts);
        Ok(reg
            .list(MODELS, &self.opts.model)?
            .into_iter()
            .rev()
            .find(|v| !bad.contains(&v.to_string())))
    }

    /// Runs one cycle to its end and records it. Never returns an error: failures are outcomes.
    pub async fn run_cycle(&self) -> CycleRecord {
        let rec = self.run_to_end().await;
        let outcome = [("outcome", rec.outcome.as_str())];
        self.metrics.inc(&m::RETRAIN_CYCLES, &outcome);
        self.metrics
            .set(&m::RETRAIN_LAST_CYCLE, &outcome, now_unix() as f64);
        let serving = match rec.outcome {
            Outcome::Deployed => rec.version.as_deref(),
            _ => rec.champion.as_deref(),
        };
        if let Some(v) = serving.and_then(|v| v.parse::<ModelVersion>().ok()) {
            self.metrics
                .set(&m::RETRAIN_SERVING_VERSION, &[], v.0 as f64);
        }
        rec
    }

    async fn run_to_end(&self) -> CycleRecord {
        let cycle = self
            .history
            .cycles()
            .ok()
            .and_then(|c| c.last().map(|r| r.cycle))
            .unwrap_or(0)
            + 1;
        let started = Instant::now();
        let mut rec = CycleRecord::new(cycle, now_unix());
        if let Err(e) = self.history.append(&rec) {
            rec.outcome = Outcome::Failed;
            rec.reason = format!("cannot write the history: {e}");
            return rec;
        }
        self.say(&format!("cycle {cycle}: started"));
        match self.cycle(&mut rec).await {
            Ok((outcome, reason)) => {
                rec.outcome = outcome;
                rec.reason = reason;
            }
            Err(e) => {
                rec.outcome = Outcome::Failed;
                rec.reason = e.to_string();
            }
        }
        rec.finished_at = Some(now_unix());
        rec.seconds = started.elapsed().as_secs_f64();
        if let Err(e) = self.history.append(&rec) {
            tracing::error!(error = %e, "cannot record the cycle outcome");
        }
        self.say(&format!(
            "cycle {cycle}: {} {}{}",
            rec.outcome.as_str(),
            rec.version.as_deref().unwrap_or(""),
            if rec.reason.is_empty() {
                String::new()
            } else {
                format!(" — {}", rec.reason)
            }
        ));
        rec
    }

    async fn cycle(&self, rec: &mut CycleRecord) -> Result<(Outcome, String)> {
        let champion = self.champion().await?;
        rec.champion = champion.map(|v| v.to_string());
        let opts = self.opts.clone();
        let cfg = self.cfg.clone();
        self.say(&format!(
            "cycle {}: training a candidate on {} (champion: {})",
            rec.cycle,
            opts.events.display(),
            rec.champion.as_deref().unwrap_or("none")
        ));
        let prep = tokio::task::spawn_blocking(move || prepare(&opts, &cfg, champion))
            .await
            .map_err(|e| {
                let what = e
                    .try_into_panic()
                    .ok()
                    .and_then(|p| {
                        p.downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                    })
                    .unwrap_or_else(|| "cancelled".into());
                RetrainError::Invalid(format!("training crashed: {what}"))
            })??;
        let p = match prep {
            Prep::Skip(reason) => return Ok((Outcome::Skipped, reason)),
            Prep::Ready(p) => p,
        };
        rec.train_data = Some(p.train_data.clone());
        rec.heldout_events = p.heldout_events;
        rec.candidate_metrics = p.candidate_metrics.clone();
        rec.champion_metrics = p.champion_metrics.clone().unwrap_or_default();
        rec.gate = p.gate.clone();
        rec.train_seconds = p.train_seconds;
        let failed = gate::failures(&p.gate);
        if !failed.is_empty() {
            return Ok((Outcome::Rejected, failed));
        }
        let metric = &self.cfg.gate.metric;
        self.say(&format!(
            "cycle {}: gate passed ({metric} {:.4} vs champion {})",
            rec.cycle,
            p.candidate_metrics.get(metric).copied().unwrap_or(0.0),
            p.champion_metrics
                .as_ref()
                .and_then(|m| m.get(metric))
                .map_or("none".into(), |v| format!("{v:.4}"))
        ));

        let version = self.publish(&p)?;
        rec.version = Some(version.to_string());
        // Recorded before anything moves, so a restart knows which version to undo.
        self.history.append(rec)?;
        self.say(&format!("cycle {}: published {version}", rec.cycle));
        let Some(fleet) = self.opts.fleet.clone() else {
            return Ok((
                Outcome::Published,
                "published; no fleet to roll out to".into(),
            ));
        };
        self.deploy(rec, &fleet, version, champion, &p.probes).await
    }

    /// Publishes index then model under the next free version of either series. The model is
    /// the commit point: the user tower loads models, and a rollout needs the user tower, so an
    /// index left alone by a crash is never served.
    fn publish(&self, p: &Prepared) -> Result<ModelVersion> {
        let reg = Registry::open(&self.opts.artifacts);
        let name = &self.opts.model;
        let newest = reg
            .list(MODELS, name)?
            .into_iter()
            .chain(reg.list(tandem_index::artifact::INDEXES, name)?)
            .max()
            .map_or(0, |v| v.0);
        let version = ModelVersion(newest + 1);
        let hash = feature_schema_hash(&p.model);
        p.built
            .publish(&self.opts.artifacts, name, version, &hash)?;
        let meta = ModelManifest {
            dim: self.cfg.model.dim,
            feature_schema_hash: hash,
            data: p.train_data.clone(),
            hyperparameters: serde_json::json!({
                "model": self.cfg.model,
                "train": self.cfg.train,
                "window": self.cfg.window,
                "seen_until": p.seen_until,
            }),
            validation: p.validation.clone(),
            train_seconds: p.train_seconds,
        };
        publish_model(&self.opts.artifacts, name, Some(version), &p.model, &meta)?;
        Ok(version)
    }

    async fn deploy(
        &self,
        rec: &mut CycleRecord,
        fleet: &Fleet,
        version: ModelVersion,
        champion: Option<ModelVersion>,
        probes: &[ProbeUser],
    ) -> Result<(Outcome, String)> {
        let r = &self.cfg.rollout;
        let c = &self.cfg.canary;
        fleet
            .wait_user_tower(version, Duration::from_secs(r.user_tower_timeout_s))
            .await?;
        self.say(&format!(
            "cycle {}: the user tower serves {version}",
            rec.cycle
        ));
        let probe = match (&self.opts.homefeed, probes.is_empty()) {
            (Some(url), false) => Some(url.clone()),
            _ => None,
        };
        let baseline = match &probe {
            Some(url) => Some(
                canary::measure(
                    url,
                    probes,
                    c,
                    Duration::ZERO,
                    "baseline",
                    champion.map(|v| v.to_string()).as_deref(),
                )
                .await?,
            ),
            None => None,
        };
        if let Some(b) = &baseline {
            rec.canary.push(b.clone());
        }
        let n_canary = if c.hosts == 0 {
            fleet.hosts.len()
        } else {
            c.hosts.min(fleet.hosts.len())
        };
        let phases: Vec<(&str, &[String])> = if n_canary < fleet.hosts.len() {
            vec![
                ("canary", &fleet.hosts[..n_canary]),
                ("fleet", &fleet.hosts[n_canary..]),
            ]
        } else {
            vec![("fleet", &fleet.hosts[..])]
        };
        let v = version.to_string();
        for (phase, hosts) in phases {
            let (steps, moved) = fleet
                .rollout(
                    hosts,
                    version,
                    Duration::from_millis(r.pause_ms),
                    Duration::from_secs(r.host_timeout_s),
                )
                .await;
            rec.rollout.extend(steps);
            if let Err(e) = moved {
                let why = format!("rollout failed: {e}");
                return self.undo(rec, fleet, why).await;
            }
            self.say(&format!(
                "cycle {}: {phase}: {} host(s) on {v}",
                rec.cycle,
                rec.rollout.len()
            ));
            let (Some(url), Some(base)) = (&probe, &baseline) else {
                continue;
            };
            let mut report: CanaryReport = canary::measure(
                url,
                probes,
                c,
                Duration::from_secs_f64(c.watch_seconds),
                phase,
                Some(&v),
            )
            .await?;
            canary::judge(&mut report, base, c);
            let passed = report.passed;
            let why = report.reason.clone();
            rec.canary.push(report);
            self.say(&format!(
                "cycle {}: {phase} watch: {}",
                rec.cycle,
                if passed { "ok" } else { "FAILED" }
            ));
            if !passed {
                return self.undo(rec, fleet, format!("canary failed: {why}")).await;
            }
        }
        self.retain();
        let canary_note = if probe.is_some() {
            "canary held"
        } else {
            "no canary (no homefeed to probe)"
        };
        Ok((
            Outcome::Deployed,
            format!("{v} on {} host(s), {canary_note}", fleet.hosts.len()),
        ))
    }

    /// Rolls back every host this cycle moved.
    async fn undo(
        &self,
        rec: &mut CycleRecord,
        fleet: &Fleet,
        why: String,
    ) -> Result<(Outcome, String)> {
        let moved: Vec<String> = rec
            .rollout
            .iter()
            .filter(|s| s.from != s.to)
            .map(|s| s.host.clone())
            .collect();
        self.say(&format!(
            "cycle {}: {why}; rolling back {} host(s)",
            rec.cycle,
            moved.len()
        ));
        match fleet.rollback(&moved).await {
            Ok(steps) => {
                rec.rollback = steps;
                Ok((Outcome::RolledBack, why))
            }
            Err(e) => Ok((
                Outcome::Failed,
                format!("{why}; and the rollback failed: {e}"),
            )),
        }
    }

    /// Retention after a deploy: the newest `keep_versions` plus every pinned version survive.
    fn retain(&self) {
        let reg = Registry::open(&self.opts.artifacts);
        let keep = self.cfg.rollout.keep_versions.max(2);
        let name = &self.opts.model;
        let pinned: BTreeSet<ModelVersion> =
            tandem_registry::Storage::pinned(&reg.storage, MODELS, name).unwrap_or_default();
        for kind in [MODELS, tandem_index::artifact::INDEXES] {
            match reg.collect(kind, name, keep, &pinned) {
                Ok(gone) if !gone.is_empty() => tracing::info!(kind, removed = ?gone, "retention"),
                Ok(_) => {}
                Err(e) => tracing::warn!(kind, error = %e, "retention failed"),
            }
        }
    }

    /// Runs a cycle every `every` until `shutdown` resolves. The schedule resumes from the
    /// history: after a restart the next cycle is due `every` after the last one started.
    pub async fn run_every(
        &self,
        every: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        self.resume().await?;
        tokio::pin!(shutdown);
        loop {
            let last = self.history.cycles()?.last().map(|c| c.started_at);
            let wait = match last {
                Some(t) => (t + every.as_secs() as i64 - now_unix()).max(0) as u64,
                None => 0,
            };
            if wait > 0 {
                self.say(&format!("next cycle in {wait}s"));
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = self.run_cycle() => {}
            }
        }
    }
}

/// The events of the last `days` before the newest one.
pub fn window(log: &EventLog, days: f64) -> EventLog {
    let newest = log.ts.iter().copied().max().unwrap_or(0);
    let from = newest - (days * 86_400.0) as i64;
    let idx: Vec<u32> = (0..log.len() as u32)
        .filter(|&e| log.ts[e as usize] >= from)
        .collect();
    log.subset(&idx)
}

/// The most recent `fraction` of `window` (by time) held out; the rest is for training.
pub fn holdout(window: &EventLog, fraction: f64) -> Result<Split> {
    let order = window.time_order();
    let n_test = ((order.len() as f64) * fraction).round() as usize;
    if n_test == 0 || n_test >= order.len() {
        return Err(RetrainError::Invalid(format!(
            "{} events in the window: too few to hold out a slice",
            order.len()
        )));
    }
    Ok(Split {
        train: order[..order.len() - n_test].to_vec(),
        test: order[order.len() - n_test..].to_vec(),
    })
}

/// The held-out users the gate scores: a seeded sample of at most `eval_users`.
pub fn eval_set(window: &EventLog, split: &Split, cfg: &RetrainConfig) -> EvalSet {
    EvalSet::new(window, split).sample(cfg.window.eval_users, cfg.train.seed)
}

/// Reads the window, trains, evaluates candidate and champion, builds the index and applies the
/// gate. CPU-bound: runs on a blocking thread.
fn prepare(
    opts: &CycleOptions,
    cfg: &RetrainConfig,
    champion: Option<ModelVersion>,
) -> Result<Prep> {
    let window = window(
        &EventLog::read(&opts.events, &EventColumns::default())?,
        cfg.window.days,
    );
    let newest = window.ts.iter().copied().max().unwrap_or(0);

    let champ = match champion {
        Some(v) => {
            let dir = tandem_artifact::version_dir(&opts.artifacts, MODELS, &opts.model, v);
            let manifest = tandem_model::model::open(&dir)?;
            // A retrained version records the newest event its cycle saw (held-out slice
            // included); other versions saw their training data.
            let seen = manifest.meta.hyperparameters["seen_until"]
                .as_i64()
                .unwrap_or(manifest.meta.data.max_timestamp);
            Some((TwoTower::load(&dir)?, seen))
        }
        None => None,
    };
    if let Some((_, seen_until)) = &champ {
        let fresh = window.ts.iter().filter(|&&t| t > *seen_until).count();
        if fresh < cfg.window.min_new_events {
            return Ok(Prep::Skip(format!(
                "{fresh} events newer than the champion's data (need {})",
                cfg.window.min_new_events
            )));
        }
    }

    let split = holdout(&window, cfg.window.holdout_fraction)?;
    let n_test = split.test.len();
    let mut train_log = window.subset(&split.train);
    if opts.fault == Some(Fault::ShuffleTrainItems) {
        shuffle_items(&mut train_log, cfg.train.seed);
    }
    let read = |p: &Option<PathBuf>, key: &str| -> Result<Option<FeatureTable>> {
        Ok(match p {
            Some(p) => Some(FeatureTable::read(p, key, None)?),
            None => None,
        })
    };
    let user_features = read(&opts.user_features, "user_id")?;
    let item_features = read(&opts.item_features, "item_id")?;
    if opts.fault == Some(Fault::CrashTraining) {
        panic!("fault injected: crash-training");
    }
    let input = TrainInput {
        log: &train_log,
        user_features: user_features.as_ref(),
        item_features: item_features.as_ref(),
        validation: Some(Protocol::Global),
    };
    let (model, report) = train(&input, &cfg.model, &cfg.train, false)?;

    let set = eval_set(&window, &split, cfg);
    let evaluate = |m: &TwoTower| -> Result<BTreeMap<String, f64>> {
        let ranker = ModelRanker {
            model: m,
            log: &window,
            items: None,
        };
        Ok(metrics(&set, &ranker.recommend(&set, 100)?).values)
    };
    let candidate_metrics = evaluate(&model)?;
    let champion_metrics = match &champ {
        Some((m, _)) => Some(evaluate(m)?),
        None => None,
    };

    let queries = history_queries(&model, &window, 1000)?;
    let user_norm_error = max_norm_error(&queries.0, cfg.model.dim);
    let built = build_index(&model, &HnswParams::default(), queries)?;
    let norm_error = if user_norm_error.is_nan() || built.item_norm_error.is_nan() {
        f64::NAN
    } else {
        user_norm_error.max(built.item_norm_error)
    };
    let gate = gate::evaluate(
        &cfg.gate,
        &Evidence {
            candidate: candidate_metrics.clone(),
            champion: champion_metrics.clone(),
            ann_recall_at_10: built.ann_recall_at_10,
            max_norm_error: norm_error,
        },
    );
    let probes = set
        .users
        .iter()
        .zip(&set.truth)
        .take(cfg.canary.probe_users)
        .map(|(&u, truth)| ProbeUser {
            user: window.users.name(u).to_string(),
            targets: truth
                .iter()
                .map(|&i| window.items.name(i).to_string())
                .collect(),
        })
        .collect();
    Ok(Prep::Ready(Box::new(Prepared {
        model,
        built,
        train_data: train_log.data_range(),
        heldout_events: n_test,
        seen_until: newest,
        candidate_metrics,
        champion_metrics,
        gate,
        probes,
        train_seconds: report.seconds,
        validation: report.validation,
    })))
}

/// Permutes the item ids of every event (seeded): same popularity, no real user–item signal.
fn shuffle_items(log: &mut EventLog, seed: u64) {
    let n = log.items.len();
    let mut perm: Vec<u32> = (0..n as u32).collect();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        perm.swap(i, (s % (i as u64 + 1)) as usize);
    }
    for it in &mut log.item {
        *it = perm[*it as usize];
    }
}
