//! One retraining cycle and the daemon loop around it.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_client::fleet::canary_hosts;
use tandem_client::{ClientOptions, FleetAdmin, HostStatus};
use tandem_data::{EventColumns, EventLog};
use tandem_pipeline::publish_together;
use tandem_registry::Registry;
use tandem_telemetry::catalogue as m;
use tandem_types::clock::now_unix;
use tandem_types::{error_chain, ModelVersion, INDEXES, MODELS};

use crate::canary::{self, CanaryReport, ProbeUser};
use crate::config::RetrainConfig;
use crate::gate;
use crate::history::{CycleRecord, History, Outcome};
use crate::prepare::{prepare, Prep, Prepared};
use crate::{Result, RetrainError};

pub use crate::prepare::{eval_set, holdout, window};

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
    /// Read the window from this NATS JetStream engagement stream instead of `events`.
    pub events_stream: Option<tandem_stream::NatsOptions>,
    pub user_features: Option<PathBuf>,
    pub item_features: Option<PathBuf>,
    /// Without a fleet a passing candidate is published but not rolled out.
    pub fleet: Option<FleetAdmin>,
    /// The homefeed orchestrator the canary probes (no canary without it).
    pub homefeed: Option<String>,
    /// TLS and timeouts for the canary's homefeed calls.
    pub client: ClientOptions,
    pub fault: Option<Fault>,
    /// Progress lines for humans (the daemon logs them; the demo prints them).
    pub say: Arc<dyn Fn(&str) + Send + Sync>,
    /// Print the candidate's training progress (a line per epoch) on stderr.
    pub training_progress: bool,
}

impl CycleOptions {
    pub fn new(artifacts: PathBuf, model: &str, events: PathBuf) -> Self {
        CycleOptions {
            artifacts,
            model: model.to_string(),
            events,
            events_stream: None,
            user_features: None,
            item_features: None,
            fleet: None,
            homefeed: None,
            client: ClientOptions::default(),
            fault: None,
            say: Arc::new(|m| tracing::info!("{m}")),
            training_progress: false,
        }
    }
}

pub struct Retrainer {
    opts: CycleOptions,
    cfg: RetrainConfig,
    history: History,
    metrics: Arc<tandem_telemetry::Registry>,
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
        if let (Some(fleet), Some(v)) = (&self.opts.fleet, last.version) {
            let moved: Vec<String> = fleet
                .hosts()
                .await
                .into_iter()
                .filter(|h| h.up && h.model_version == Some(v))
                .map(|h| h.host)
                .collect();
            if !moved.is_empty() {
                match fleet.rollback(&moved).await {
                    Ok(steps) => {
                        last.reason += &format!("; rolled {} host(s) back from {v}", steps.len());
                        last.rollback = steps;
                    }
                    Err(e) => {
                        last.reason += &format!("; rolling back {v} failed: {}", error_chain(&e))
                    }
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
        let bad: HashSet<ModelVersion> = self
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
            .find(|v| !bad.contains(v)))
    }

    /// Runs one cycle to its end and records it. Never returns an error: failures are outcomes.
    pub async fn run_cycle(&self) -> CycleRecord {
        let rec = self.run_to_end().await;
        let outcome = [("outcome", rec.outcome.as_str())];
        self.metrics.inc(&m::RETRAIN_CYCLES, &outcome);
        self.metrics
            .set(&m::RETRAIN_LAST_CYCLE, &outcome, now_unix() as f64);
        let serving = match rec.outcome {
            Outcome::Deployed => rec.version,
            _ => rec.champion,
        };
        if let Some(v) = serving {
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
            rec.reason = format!("cannot write the history: {}", error_chain(&e));
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
                rec.reason = error_chain(&e);
            }
        }
        rec.finished_at = Some(now_unix());
        rec.seconds = started.elapsed().as_secs_f64();
        if let Err(e) = self.history.append(&rec) {
            tracing::error!(error = %error_chain(&e), "cannot record the cycle outcome");
        }
        self.say(&format!(
            "cycle {cycle}: {}{}{}",
            rec.outcome.as_str(),
            rec.version.map(|v| format!(" {v}")).unwrap_or_default(),
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
        rec.champion = champion;
        self.say(&format!(
            "cycle {}: training a candidate on {} (champion: {})",
            rec.cycle,
            self.opts.events_stream.as_ref().map_or_else(
                || self.opts.events.display().to_string(),
                |n| format!("stream {} at {}", n.stream, n.url)
            ),
            champion.map_or_else(|| "none".to_string(), |v| v.to_string())
        ));
        let p = match self.prepare(champion).await? {
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
        rec.version = Some(version);
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

    /// The CPU-bound part, on a blocking thread; a panic there (a crashed trainer) is an error.
    async fn prepare(&self, champion: Option<ModelVersion>) -> Result<Prep> {
        let opts = self.opts.clone();
        let cfg = self.cfg.clone();
        let streamed = match &self.opts.events_stream {
            Some(n) => Some(read_stream(n, cfg.window.days).await?),
            None => None,
        };
        tokio::task::spawn_blocking(move || {
            let log = match streamed {
                Some(log) => log,
                None => EventLog::read(&opts.events, &EventColumns::default())?,
            };
            prepare(&opts, &cfg, log, champion)
        })
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
            RetrainError::Crashed(what)
        })?
    }

    /// Publishes index then model under the next free version of either series (the model is
    /// the commit point; see `tandem_pipeline::publish_together`).
    fn publish(&self, p: &Prepared) -> Result<ModelVersion> {
        let manifest = tandem_types::ModelManifest {
            dim: self.cfg.model.dim,
            feature_schema_hash: tandem_model::publish::feature_schema_hash(&p.model),
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
        Ok(publish_together(
            &self.opts.artifacts,
            &self.opts.model,
            None,
            &p.model,
            &manifest,
            &p.built,
        )?)
    }

    /// The rollout of a published version: wait for the user tower, measure the champion's
    /// baseline, then move the canary hosts and the rest of the fleet, watching after each
    /// phase; any failure rolls back every host this cycle moved.
    async fn deploy(
        &self,
        rec: &mut CycleRecord,
        fleet: &FleetAdmin,
        version: ModelVersion,
        champion: Option<ModelVersion>,
        probes: &[ProbeUser],
    ) -> Result<(Outcome, String)> {
        let r = &self.cfg.rollout;
        fleet
            .wait_user_tower(version, Duration::from_secs(r.user_tower_timeout_s))
            .await?;
        self.say(&format!(
            "cycle {}: the user tower serves {version}",
            rec.cycle
        ));
        let probe = match (&self.opts.homefeed, probes.is_empty()) {
            (Some(url), false) => Some(url.as_str()),
            _ => None,
        };
        let baseline = match probe {
            Some(url) => {
                let c = &self.cfg.canary;
                let b = canary::measure(
                    url,
                    &self.opts.client,
                    probes,
                    c,
                    Duration::ZERO,
                    "baseline",
                    champion,
                )
                .await?;
                rec.canary.push(b.clone());
                Some(b)
            }
            None => None,
        };
        let hosts = fleet.host_urls();
        let phases = self.phases(&hosts, &fleet.hosts().await);
        for (phase, hosts) in &phases {
            if let Err(why) = self
                .roll_phase(
                    rec,
                    fleet,
                    phase,
                    hosts,
                    version,
                    probe,
                    baseline.as_ref(),
                    probes,
                )
                .await?
            {
                return self.undo(rec, fleet, why).await;
            }
        }
        self.retain();
        let canary_note = match (probe, phases.len()) {
            (None, _) => "no canary (no homefeed to probe)",
            (Some(_), 1) => "watch held (no separate canary phase: the canary covers every host)",
            (Some(_), _) => "canary held",
        };
        Ok((
            Outcome::Deployed,
            format!("{version} on {} host(s), {canary_note}", hosts.len()),
        ))
    }

    /// The rollout phases: `canary` (the first `[canary] hosts`; over a sharded fleet that many
    /// replicas of every shard, so the new version covers every shard and answers) and `fleet`
    /// (the rest), or one `fleet` phase when the canary would cover every host.
    fn phases(&self, hosts: &[String], status: &[HostStatus]) -> Vec<(&'static str, Vec<String>)> {
        let c = self.cfg.canary.hosts;
        let canary = if c == 0 {
            hosts.to_vec()
        } else {
            canary_hosts(status, c)
        };
        let rest: Vec<String> = hosts
            .iter()
            .filter(|h| !canary.contains(h))
            .cloned()
            .collect();
        if canary.is_empty() || rest.is_empty() {
            vec![("fleet", hosts.to_vec())]
        } else {
            vec![("canary", canary), ("fleet", rest)]
        }
    }

    /// Moves one phase's hosts and watches them. `Ok(Err(why))`: the phase failed and the
    /// cycle must roll back.
    #[allow(clippy::too_many_arguments)]
    async fn roll_phase(
        &self,
        rec: &mut CycleRecord,
        fleet: &FleetAdmin,
        phase: &str,
        hosts: &[String],
        version: ModelVersion,
        probe: Option<&str>,
        baseline: Option<&CanaryReport>,
        probes: &[ProbeUser],
    ) -> Result<Result<(), String>> {
        let r = &self.cfg.rollout;
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
            return Ok(Err(format!("rollout failed: {}", error_chain(&e))));
        }
        self.say(&format!(
            "cycle {}: {phase}: {} host(s) on {version}",
            rec.cycle,
            rec.rollout.len()
        ));
        let (Some(url), Some(base)) = (probe, baseline) else {
            return Ok(Ok(()));
        };
        let c = &self.cfg.canary;
        let watch = Duration::from_secs_f64(c.watch_seconds);
        let mut report = canary::measure(
            url,
            &self.opts.client,
            probes,
            c,
            watch,
            phase,
            Some(version),
        )
        .await?;
        canary::judge(&mut report, base, c);
        let (passed, why) = (report.passed, report.reason.clone());
        rec.canary.push(report);
        self.say(&format!(
            "cycle {}: {phase} watch: {}",
            rec.cycle,
            if passed { "ok" } else { "FAILED" }
        ));
        Ok(if passed {
            Ok(())
        } else {
            Err(format!("canary failed: {why}"))
        })
    }

    /// Rolls back every host this cycle moved.
    async fn undo(
        &self,
        rec: &mut CycleRecord,
        fleet: &FleetAdmin,
        why: String,
    ) -> Result<(Outcome, String)> {
        let moved: Vec<String> = rec
            .rollout
            .iter()
            .filter(|s| s.moved())
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
                format!("{why}; and the rollback failed: {}", error_chain(&e)),
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
        for kind in [MODELS, INDEXES] {
            match reg.collect(kind, name, keep, &pinned) {
                Ok(gone) if !gone.is_empty() => tracing::info!(kind, removed = ?gone, "retention"),
                Ok(_) => {}
                Err(e) => tracing::warn!(kind, error = %error_chain(&e), "retention failed"),
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

/// The training window from the engagement stream: every message published in the last
/// `days` plus a day (events carry their own times; [`crate::prepare::window`] cuts by those).
async fn read_stream(n: &tandem_stream::NatsOptions, days: f64) -> Result<EventLog> {
    let stream = tandem_stream::EventStream::connect(n)
        .await
        .map_err(|e| RetrainError::Stream(e.to_string()))?;
    let since = tandem_types::clock::now_unix() - ((days + 1.0) * 86_400.0) as i64;
    let events = stream
        .read_since(since)
        .await
        .map_err(|e| RetrainError::Stream(e.to_string()))?;
    let mut log = EventLog::default();
    for e in &events {
        log.push(&e.user, &e.item, e.ts, e.weight);
    }
    Ok(log)
}
