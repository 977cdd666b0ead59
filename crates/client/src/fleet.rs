//! Fleet operations: rollout, rollback and status of the ANN hosts, and the user-tower checks
//! that make them safe.
//!
//! Deploy order is user tower first, index second: a rollout refuses to start unless the user
//! tower already serves the target version, and a rollback refuses a host whose previous version
//! the user tower no longer holds. Every version a host serves (and the one it would roll back
//! to) is pinned in the registry under that host's name, so retention never deletes it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_registry::{LocalFs, Storage};
use tandem_types::{ModelVersion, MODELS};

use crate::{AnnClient, ClientError, ClientOptions, HostMetadata, UserTowerClient};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Registry(#[from] tandem_registry::RegistryError),
    #[error("the user tower does not serve {version} yet (serves: {}): roll out the user tower first, then the index", list(.serves))]
    UserTowerLacks {
        version: ModelVersion,
        serves: Vec<ModelVersion>,
    },
    #[error("the user tower at {url} did not load {version} within {seconds}s")]
    UserTowerTimeout {
        url: String,
        version: ModelVersion,
        seconds: u64,
    },
    /// A sharded rollout that would leave no version with a replica on every shard.
    #[error("{0}")]
    Coverage(String),
    #[error("{host} could not be reached within {seconds}s")]
    HostUnreachable {
        host: String,
        seconds: u64,
        #[source]
        source: ClientError,
    },
    #[error("{host} did not report {version} within {seconds}s")]
    HostTimeout {
        host: String,
        version: ModelVersion,
        seconds: u64,
    },
    #[error("{host}: no previous version to roll back to (serving {serving})")]
    NoPrevious { host: String, serving: ModelVersion },
    #[error("{host}: the user tower no longer holds {previous} (serves: {}): refusing to roll back", list(.serves))]
    PreviousGone {
        host: String,
        previous: ModelVersion,
        serves: Vec<ModelVersion>,
    },
}

fn list(vs: &[ModelVersion]) -> String {
    let names: Vec<String> = vs.iter().map(ToString::to_string).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

pub type Result<T, E = FleetError> = std::result::Result<T, E>;

/// One host moved from one version to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub host: String,
    /// What the host served before (none if it served nothing).
    #[serde(with = "tandem_types::version::optional", default)]
    pub from: Option<ModelVersion>,
    pub to: ModelVersion,
    pub seconds: f64,
}

impl Step {
    /// The host actually changed version.
    pub fn moved(&self) -> bool {
        self.from != Some(self.to)
    }
}

/// What one host reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub up: bool,
    #[serde(
        with = "tandem_types::version::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub model_version: Option<ModelVersion>,
    #[serde(
        with = "tandem_types::version::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub previous_version: Option<ModelVersion>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub index_id: String,
    #[serde(default)]
    pub items: u64,
    /// The shard served and the version's shard count (0 of 1 when not sharded).
    #[serde(default)]
    pub shard: u32,
    #[serde(default = "one")]
    pub shard_count: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

fn one() -> u32 {
    1
}

impl HostStatus {
    fn up(host: &str, m: HostMetadata) -> Self {
        HostStatus {
            host: host.to_string(),
            up: true,
            model_version: Some(m.model_version),
            previous_version: m.previous_version,
            index_id: m.index_id,
            items: m.item_count,
            shard: m.shard,
            shard_count: m.shard_count,
            error: String::new(),
        }
    }

    fn down(host: &str, e: ClientError) -> Self {
        HostStatus {
            host: host.to_string(),
            up: false,
            model_version: None,
            previous_version: None,
            index_id: String::new(),
            items: 0,
            shard: 0,
            shard_count: 1,
            error: e.to_string(),
        }
    }
}

/// The registry holder name of a host's pins.
pub fn holder(url: &str) -> String {
    let s: String = url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("ann-{s}")
}

/// The services a rollout touches.
#[derive(Clone)]
pub struct FleetAdmin {
    /// ANN hosts in rollout order.
    hosts: Vec<AnnClient>,
    user_tower: UserTowerClient,
    /// Artifact store root (pins live there).
    artifacts: PathBuf,
    model: String,
}

impl FleetAdmin {
    /// `opts` carries the admin token (needed by rollout and rollback, not by status).
    pub fn new(
        hosts: &[String],
        user_tower: &str,
        artifacts: PathBuf,
        model: &str,
        opts: &ClientOptions,
    ) -> Result<Self> {
        Ok(FleetAdmin {
            hosts: hosts
                .iter()
                .map(|u| AnnClient::lazy(u, opts))
                .collect::<Result<_, _>>()?,
            user_tower: UserTowerClient::lazy(user_tower, opts)?,
            artifacts,
            model: model.to_string(),
        })
    }

    /// ANN host URLs in rollout order.
    pub fn host_urls(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.url().to_string()).collect()
    }

    pub fn user_tower_url(&self) -> &str {
        self.user_tower.url()
    }

    fn client(&self, url: &str) -> Result<AnnClient> {
        match self.hosts.iter().find(|h| h.url() == url) {
            Some(c) => Ok(c.clone()),
            None => Err(ClientError::InvalidUrl {
                url: format!("{url} (not a host of this fleet)"),
            }
            .into()),
        }
    }

    /// The versions the user tower has loaded, oldest first.
    pub async fn user_tower_versions(&self) -> Result<Vec<ModelVersion>> {
        Ok(self
            .user_tower
            .versions(Some(Duration::from_secs(10)))
            .await?
            .into_iter()
            .map(|v| v.version)
            .collect())
    }

    /// Waits until the user tower serves `version` (it polls the registry on its own).
    pub async fn wait_user_tower(&self, version: ModelVersion, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.user_tower_versions().await {
                Ok(v) if v.contains(&version) => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(FleetError::UserTowerTimeout {
                        url: self.user_tower.url().to_string(),
                        version,
                        seconds: timeout.as_secs(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Pins exactly `keep` for this host's holder name.
    fn repin(&self, url: &str, keep: &[ModelVersion]) -> Result<()> {
        let pins = LocalFs::new(&self.artifacts);
        let who = holder(url);
        for v in keep {
            pins.pin(MODELS, &self.model, *v, &who)?;
        }
        for v in pins.pinned(MODELS, &self.model)? {
            if !keep.contains(&v) {
                pins.unpin(MODELS, &self.model, v, &who)?;
            }
        }
        Ok(())
    }

    async fn wait_for(host: &AnnClient, version: ModelVersion, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(m) = host.metadata(Some(Duration::from_secs(5))).await {
                if m.model_version == version {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(FleetError::HostTimeout {
                    host: host.url().to_string(),
                    version,
                    seconds: timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The host's metadata, retried until `timeout` while it cannot be reached (a host being
    /// restarted comes back within it).
    async fn reach(host: &AnnClient, timeout: Duration) -> Result<HostMetadata> {
        let deadline = Instant::now() + timeout;
        loop {
            match host.metadata(Some(Duration::from_secs(5))).await {
                Ok(m) => return Ok(m),
                Err(e) if e.code() == Some(tonic::Code::Unavailable) || e.code().is_none() => {
                    if Instant::now() >= deadline {
                        return Err(FleetError::HostUnreachable {
                            host: host.url().to_string(),
                            seconds: timeout.as_secs(),
                            source: e,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Moves `hosts` (a subset of the fleet, in order) to `to`, one at a time. Stops at the first
    /// host that fails and returns the steps done so far alongside the error, so the caller can
    /// undo exactly those.
    pub async fn rollout(
        &self,
        hosts: &[String],
        to: ModelVersion,
        pause: Duration,
        host_timeout: Duration,
    ) -> (Vec<Step>, Result<()>) {
        let mut steps = Vec::new();
        match self.user_tower_versions().await {
            Ok(served) if served.contains(&to) => {}
            Ok(served) => {
                return (
                    steps,
                    Err(FleetError::UserTowerLacks {
                        version: to,
                        serves: served,
                    }),
                )
            }
            Err(e) => return (steps, Err(e)),
        }
        // Coverage is judged over the whole fleet: a canary phase moves a few hosts while the
        // others keep serving.
        let mut urls = self.host_urls();
        let extra: Vec<String> = hosts
            .iter()
            .filter(|h| !urls.contains(h))
            .cloned()
            .collect();
        urls.extend(extra);
        let status = self.status_of(&urls).await;
        let hosts = match plan_rollout(&status, hosts, to) {
            Ok(order) => order,
            Err(e) => return (steps, Err(e)),
        };
        for (i, url) in hosts.iter().enumerate() {
            let started = Instant::now();
            match self.move_host(url, to, host_timeout).await {
                Ok(from) => {
                    tracing::info!(host = %url, from = ?from, to = %to, "host moved");
                    steps.push(Step {
                        host: url.clone(),
                        from,
                        to,
                        seconds: started.elapsed().as_secs_f64(),
                    });
                }
                Err(e) => return (steps, Err(e)),
            }
            if i + 1 < hosts.len() && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        (steps, Ok(()))
    }

    /// One rollout step: pin, load, wait until the host reports `to`. Returns what it served.
    async fn move_host(
        &self,
        url: &str,
        to: ModelVersion,
        host_timeout: Duration,
    ) -> Result<Option<ModelVersion>> {
        let host = self.client(url)?;
        let before = Self::reach(&host, host_timeout).await?;
        let from = before.model_version;
        // Pin before loading, so retention cannot delete the version mid-rollout; the host's
        // rollback target stays pinned too (a no-op move must not unpin it).
        let mut keep = vec![to, from];
        keep.extend(before.previous_version);
        self.repin(url, &keep)?;
        if from != to {
            host.load(to, Some(host_timeout)).await?;
            Self::wait_for(&host, to, host_timeout).await?;
        }
        Ok(Some(from))
    }

    /// Undoes a partial rollout: every host in `steps` that moved is loaded back onto the version
    /// it served before, newest move first. Returns the moves made; stops at the first failure.
    pub async fn undo(&self, steps: &[Step], host_timeout: Duration) -> (Vec<Step>, Result<()>) {
        let mut undone = Vec::new();
        for s in steps.iter().rev().filter(|s| s.moved()) {
            let Some(back) = s.from else { continue };
            let started = Instant::now();
            match self.move_host(&s.host, back, host_timeout).await {
                Ok(_) => undone.push(Step {
                    host: s.host.clone(),
                    from: Some(s.to),
                    to: back,
                    seconds: started.elapsed().as_secs_f64(),
                }),
                Err(e) => return (undone, Err(e)),
            }
        }
        (undone, Ok(()))
    }

    /// Rolls `hosts` back to their previous versions (refusing a host whose previous version the
    /// user tower no longer holds).
    pub async fn rollback(&self, hosts: &[String]) -> Result<Vec<Step>> {
        let served = self.user_tower_versions().await?;
        let mut steps = Vec::new();
        for url in hosts {
            let started = Instant::now();
            let host = self.client(url)?;
            let before = host.metadata(Some(Duration::from_secs(10))).await?;
            let Some(previous) = before.previous_version else {
                return Err(FleetError::NoPrevious {
                    host: url.clone(),
                    serving: before.model_version,
                });
            };
            if !served.contains(&previous) {
                return Err(FleetError::PreviousGone {
                    host: url.clone(),
                    previous,
                    serves: served,
                });
            }
            let r = host.rollback(Some(Duration::from_secs(120))).await?;
            let keep: Vec<ModelVersion> = [Some(r.now.model_version), r.now.previous_version]
                .into_iter()
                .flatten()
                .collect();
            self.repin(url, &keep)?;
            tracing::info!(host = %url, from = %before.model_version, to = %r.now.model_version, "host rolled back");
            steps.push(Step {
                host: url.clone(),
                from: Some(before.model_version),
                to: r.now.model_version,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(steps)
    }

    /// What every host reports (down hosts included).
    pub async fn hosts(&self) -> Vec<HostStatus> {
        let mut out = Vec::with_capacity(self.hosts.len());
        for h in &self.hosts {
            out.push(match h.metadata(Some(Duration::from_secs(5))).await {
                Ok(m) => HostStatus::up(h.url(), m),
                Err(e) => HostStatus::down(h.url(), e),
            });
        }
        out
    }

    /// [`Self::hosts`] for the hosts at `urls` (in that order).
    async fn status_of(&self, urls: &[String]) -> Vec<HostStatus> {
        let mut out = Vec::with_capacity(urls.len());
        for url in urls {
            let Ok(h) = self.client(url) else {
                // Not a host of this fleet: the rollout step itself reports that.
                out.push(HostStatus::down(
                    url,
                    ClientError::InvalidUrl {
                        url: format!("{url} (not a host of this fleet)"),
                    },
                ));
                continue;
            };
            out.push(match h.metadata(Some(Duration::from_secs(5))).await {
                Ok(m) => HostStatus::up(url, m),
                Err(e) => HostStatus::down(url, e),
            });
        }
        out
    }

    /// Live replicas per shard of each version (`[n]` for an unsharded one): a version can
    /// serve only while every entry is at least 1.
    pub fn replicas_per_shard(hosts: &[HostStatus]) -> BTreeMap<ModelVersion, Vec<u64>> {
        let mut out: BTreeMap<ModelVersion, Vec<u64>> = BTreeMap::new();
        for h in hosts.iter().filter(|h| h.up) {
            let Some(v) = h.model_version else { continue };
            let per = out
                .entry(v)
                .or_insert_with(|| vec![0; h.shard_count.max(1) as usize]);
            if let Some(n) = per.get_mut(h.shard as usize) {
                *n += 1;
            }
        }
        out
    }

    /// Hosts per version (the version-skew view).
    pub fn hosts_per_version(hosts: &[HostStatus]) -> BTreeMap<ModelVersion, u64> {
        let mut skew = BTreeMap::new();
        for v in hosts
            .iter()
            .filter(|h| h.up)
            .filter_map(|h| h.model_version)
        {
            *skew.entry(v).or_default() += 1;
        }
        skew
    }

    /// The version most up hosts serve (ties: the older one) — the champion of a retrain cycle.
    pub async fn serving_version(&self) -> Option<ModelVersion> {
        let skew = Self::hosts_per_version(&self.hosts().await);
        let mut best: Option<(u64, ModelVersion)> = None;
        for (v, n) in skew {
            if best.is_none_or(|(bn, _)| n > bn) {
                best = Some((n, v));
            }
        }
        best.map(|(_, v)| v)
    }
}

/// The order to move `moving` (hosts of `fleet`) to `to` in. An unsharded fleet keeps the
/// order given. A sharded one is moved shard by shard in turns (the first replica of each
/// shard, then the second, …), and the plan is refused unless, before and after every step,
/// some version has a live replica on every shard of the whole fleet, so the orchestrator
/// always has a version to answer from.
pub fn plan_rollout(
    fleet: &[HostStatus],
    moving: &[String],
    to: ModelVersion,
) -> Result<Vec<String>> {
    if fleet.iter().all(|h| h.shard_count <= 1) {
        return Ok(moving.to_vec());
    }
    let order: Vec<usize> = shard_turns(fleet)
        .into_iter()
        .filter(|&i| moving.contains(&fleet[i].host))
        .collect();
    let mut state: Vec<HostStatus> = fleet.to_vec();
    let covered = |state: &[HostStatus]| {
        FleetAdmin::replicas_per_shard(state)
            .values()
            .any(|per| per.iter().all(|&n| n > 0))
    };
    if !covered(&state) {
        return Err(FleetError::Coverage(format!(
            "no version has a live replica on every shard now ({}); fix the fleet before rolling out {to}",
            describe_coverage(&state)
        )));
    }
    for &i in &order {
        if !state[i].up {
            continue;
        }
        state[i].model_version = Some(to);
        if !covered(&state) {
            return Err(FleetError::Coverage(format!(
                "moving {} (shard {}) to {to} would leave no version with a replica on every shard ({}); add a replica to that shard first",
                fleet[i].host,
                fleet[i].shard,
                describe_coverage(&state)
            )));
        }
    }
    Ok(order.into_iter().map(|i| fleet[i].host.clone()).collect())
}

/// Hosts in shard turns: the first replica of each shard, then the second, … (fleet order
/// within a shard).
fn shard_turns(fleet: &[HostStatus]) -> Vec<usize> {
    let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, h) in fleet.iter().enumerate() {
        by_shard.entry(h.shard).or_default().push(i);
    }
    let mut order = Vec::with_capacity(fleet.len());
    for turn in 0.. {
        let before = order.len();
        order.extend(by_shard.values().filter_map(|r| r.get(turn).copied()));
        if order.len() == before {
            break;
        }
    }
    order
}

/// The canary of a rollout: the first `replicas` hosts of an unsharded fleet, or the first
/// `replicas` replicas of every shard of a sharded one (so the new version covers every shard
/// and can answer).
pub fn canary_hosts(fleet: &[HostStatus], replicas: usize) -> Vec<String> {
    if fleet.iter().all(|h| h.shard_count <= 1) {
        return fleet
            .iter()
            .take(replicas)
            .map(|h| h.host.clone())
            .collect();
    }
    let shards = fleet
        .iter()
        .map(|h| h.shard)
        .collect::<std::collections::BTreeSet<_>>();
    shard_turns(fleet)
        .into_iter()
        .take(replicas * shards.len())
        .map(|i| fleet[i].host.clone())
        .collect()
}

fn describe_coverage(state: &[HostStatus]) -> String {
    FleetAdmin::replicas_per_shard(state)
        .iter()
        .map(|(v, per)| format!("{v}: {per:?} replicas per shard"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod rollout_plan_tests {
    use super::*;

    fn host(name: &str, v: u64, shard: u32) -> HostStatus {
        HostStatus {
            host: name.into(),
            up: true,
            model_version: Some(ModelVersion(v)),
            previous_version: None,
            index_id: String::new(),
            items: 0,
            shard,
            shard_count: 2,
            error: String::new(),
        }
    }

    #[test]
    fn a_sharded_rollout_alternates_shards_and_keeps_a_covered_version() {
        let fleet = [
            host("a0", 1, 0),
            host("b0", 1, 0),
            host("a1", 1, 1),
            host("b1", 1, 1),
        ];
        let all: Vec<String> = fleet.iter().map(|h| h.host.clone()).collect();
        let order = plan_rollout(&fleet, &all, ModelVersion(2)).unwrap();
        assert_eq!(order, vec!["a0", "a1", "b0", "b1"]);
        // A canary phase: one replica per shard moves, judged against the whole fleet.
        let canary = canary_hosts(&fleet, 1);
        assert_eq!(canary, vec!["a0", "a1"]);
        assert_eq!(
            plan_rollout(&fleet, &canary, ModelVersion(2)).unwrap(),
            vec!["a0", "a1"]
        );
        // Alone, one host of shard 0 could not be judged: the rest of the fleet keeps shard 1.
        assert_eq!(
            plan_rollout(&fleet, &["b0".to_string()], ModelVersion(2)).unwrap(),
            vec!["b0"]
        );
    }

    #[test]
    fn a_plan_that_would_break_coverage_is_refused() {
        // One replica per shard: after the first move neither version covers both shards.
        let fleet = [host("a0", 1, 0), host("a1", 1, 1)];
        let all = ["a0".to_string(), "a1".to_string()];
        let e = plan_rollout(&fleet, &all, ModelVersion(2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("moving a0 (shard 0) to v2 would leave no version"),
            "{e}"
        );
        // A fleet already without coverage is refused before anything moves.
        let mut down = host("b1", 1, 1);
        down.up = false;
        let e = plan_rollout(&[host("a0", 1, 0), down], &all, ModelVersion(2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no version has a live replica on every shard now"),
            "{e}"
        );
    }

    #[test]
    fn an_unsharded_fleet_keeps_the_order_given() {
        let mut a = host("x", 1, 0);
        a.shard_count = 1;
        let mut b = host("y", 1, 0);
        b.shard_count = 1;
        let moving = ["y".to_string(), "x".to_string()];
        assert_eq!(
            plan_rollout(&[b, a], &moving, ModelVersion(2)).unwrap(),
            vec!["y", "x"]
        );
        assert_eq!(canary_hosts(&[host("p", 1, 0)], 1).len(), 1);
    }
}
