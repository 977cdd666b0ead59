//! One look at the fleet, and the sampler loop that takes one per interval.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tandem_client::{FleetAdmin, HostStatus, UserTowerClient};
use tandem_registry::{LocalFs, Storage};
use tandem_types::{ModelVersion, MODELS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;

/// What the charts plot: one point per interval.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_ms: i64,
    pub hosts_per_version: BTreeMap<ModelVersion, u64>,
    pub versions_live: usize,
    pub hosts_down: usize,
    /// Answers per second by index version since the previous sample; none when the
    /// orchestrator's metrics are not watched or could not be read.
    pub answers_per_s: Option<BTreeMap<String, f64>>,
}

/// Whether hosts are moving between versions, read from what they report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// No host is up and serving.
    NoHosts,
    /// Every serving host is on one version.
    Steady { version: ModelVersion },
    /// Hosts serve two or more versions and the newer one is being rolled out: `moved` of
    /// `of` serving hosts are on `to`.
    RollingOut {
        from: ModelVersion,
        to: ModelVersion,
        moved: usize,
        of: usize,
    },
    /// As `RollingOut`, but hosts went back from `from` (newer) to `to` (older).
    RollingBack {
        from: ModelVersion,
        to: ModelVersion,
        moved: usize,
        of: usize,
    },
}

impl RolloutState {
    /// Read from the hosts' current and previous versions. With several versions live, the
    /// move is a rollback when a host on the older version came from the newer one.
    pub fn of(hosts: &[HostStatus]) -> RolloutState {
        let serving: Vec<&HostStatus> = hosts
            .iter()
            .filter(|h| h.up && h.model_version.is_some())
            .collect();
        let versions: std::collections::BTreeSet<ModelVersion> =
            serving.iter().filter_map(|h| h.model_version).collect();
        let (Some(&oldest), Some(&newest)) = (versions.first(), versions.last()) else {
            return RolloutState::NoHosts;
        };
        if oldest == newest {
            return RolloutState::Steady { version: newest };
        }
        let on = |v: ModelVersion| {
            serving
                .iter()
                .filter(|h| h.model_version == Some(v))
                .count()
        };
        let back = serving.iter().any(|h| {
            h.model_version == Some(oldest) && h.previous_version.is_some_and(|p| p > oldest)
        });
        if back {
            RolloutState::RollingBack {
                from: newest,
                to: oldest,
                moved: on(oldest),
                of: serving.len(),
            }
        } else {
            RolloutState::RollingOut {
                from: oldest,
                to: newest,
                moved: on(newest),
                of: serving.len(),
            }
        }
    }
}

/// One loaded user-tower version.
#[derive(Debug, Clone, Serialize)]
pub struct TowerVersion {
    pub version: ModelVersion,
    pub pinned: bool,
    pub dim: u32,
    pub loaded_at_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserTowerView {
    pub url: String,
    pub up: bool,
    pub versions: Vec<TowerVersion>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HomefeedView {
    pub url: Option<String>,
    pub metrics_url: Option<String>,
    /// Answers since the orchestrator started, by index version.
    pub answers_total: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The newest full look at the fleet (`GET /api/state` returns it with the series).
#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    pub at_ms: i64,
    pub model: String,
    pub hosts: Vec<HostStatus>,
    pub hosts_per_version: BTreeMap<ModelVersion, u64>,
    pub replicas_per_shard: BTreeMap<ModelVersion, Vec<u64>>,
    pub versions_live: usize,
    pub rollout: RolloutState,
    pub user_tower: UserTowerView,
    /// Versions pinned in the registry (served or rollback targets: retention keeps them).
    pub pins: Vec<ModelVersion>,
    pub homefeed: HomefeedView,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The sampler: one look per interval until aborted.
pub(crate) async fn run(shared: Arc<Shared>, fleet: FleetAdmin, user_tower: UserTowerClient) {
    let mut tick = tokio::time::interval(shared.cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keep = (shared.cfg.window.as_millis() / shared.cfg.interval.as_millis().max(1)).max(2);
    let mut previous: Option<(Instant, BTreeMap<String, f64>)> = None;
    loop {
        tick.tick().await;
        let (view, answers) = look(&shared, &fleet, &user_tower).await;
        let rates = answers.map(|totals| {
            let now = Instant::now();
            let rates = match &previous {
                Some((at, before)) => {
                    let dt = now.duration_since(*at).as_secs_f64().max(1e-3);
                    totals
                        .iter()
                        .map(|(v, n)| {
                            // A restarted orchestrator's counters start again from 0.
                            let d = n - before.get(v).copied().unwrap_or(0.0);
                            (v.clone(), if d < 0.0 { 0.0 } else { d / dt })
                        })
                        .collect()
                }
                None => BTreeMap::new(),
            };
            previous = Some((now, totals));
            rates
        });
        let sample = Sample {
            at_ms: view.at_ms,
            hosts_per_version: view.hosts_per_version.clone(),
            versions_live: view.versions_live,
            hosts_down: view.hosts.iter().filter(|h| !h.up).count(),
            answers_per_s: rates,
        };
        let mut live = shared.live.write().unwrap_or_else(|e| e.into_inner());
        live.view = Some(view);
        live.series.push_back(sample);
        while live.series.len() as u128 > keep {
            live.series.pop_front();
        }
    }
}

/// One look at hosts, user tower, pins and the orchestrator's answer counters.
async fn look(
    shared: &Shared,
    fleet: &FleetAdmin,
    user_tower: &UserTowerClient,
) -> (FleetView, Option<BTreeMap<String, f64>>) {
    let cfg = &shared.cfg;
    let timeout = Some(Duration::from_secs(2));
    let (hosts, tower, answers) =
        tokio::join!(fleet.hosts(), user_tower.versions(timeout), async {
            match &cfg.homefeed_metrics {
                Some(url) => Some(scrape(url).await.map(|text| answers_total(&text))),
                None => None,
            }
        });
    let user_tower = match tower {
        Ok(vs) => UserTowerView {
            url: cfg.user_tower.clone(),
            up: true,
            versions: vs
                .into_iter()
                .map(|v| TowerVersion {
                    version: v.version,
                    pinned: v.pinned,
                    dim: v.dim,
                    loaded_at_unix_ms: v.loaded_at_unix_ms,
                })
                .collect(),
            error: String::new(),
        },
        Err(e) => UserTowerView {
            url: cfg.user_tower.clone(),
            up: false,
            versions: Vec::new(),
            error: tandem_types::error_chain(&e),
        },
    };
    let pins = LocalFs::new(&cfg.artifacts)
        .pinned(MODELS, &cfg.model)
        .map(|p| p.into_iter().collect())
        .unwrap_or_default();
    let (answers_total, error) = match &answers {
        Some(Ok(t)) => (t.clone(), String::new()),
        Some(Err(e)) => (BTreeMap::new(), e.clone()),
        None => (BTreeMap::new(), String::new()),
    };
    let hosts_per_version = FleetAdmin::hosts_per_version(&hosts);
    let view = FleetView {
        at_ms: now_ms(),
        model: cfg.model.clone(),
        versions_live: hosts_per_version.len(),
        replicas_per_shard: FleetAdmin::replicas_per_shard(&hosts),
        rollout: RolloutState::of(&hosts),
        hosts_per_version,
        hosts,
        user_tower,
        pins,
        homefeed: HomefeedView {
            url: cfg.homefeed.clone(),
            metrics_url: cfg.homefeed_metrics.clone(),
            answers_total,
            error,
        },
    };
    (view, answers.and_then(Result::ok))
}

/// `tandem_homefeed_answers_total{version="vN"} X` lines of a Prometheus exposition, by version.
pub fn answers_total(exposition: &str) -> BTreeMap<String, f64> {
    exposition
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("tandem_homefeed_answers_total{")?;
            let (labels, value) = rest.split_once("} ")?;
            let version = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("version=\""))?
                .trim_end_matches('"');
            Some((version.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `GET url` (HTTP/1.1: `http://host:port/path`, or `host:port` for `/metrics`) within 2 s;
/// the body of a 200 answer.
pub async fn scrape(url: &str) -> Result<String, String> {
    if url.starts_with("https://") {
        return Err(format!("{url}: metrics endpoints are plain http"));
    }
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{p}")),
        None => (rest, "/metrics".to_string()),
    };
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(authority).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = match tokio::time::timeout(Duration::from_secs(2), fetch).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(format!("{url}: {e}")),
        Err(_) => return Err(format!("{url}: no answer within 2s")),
    };
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        return Err(format!("{url}: {status}"));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(url: &str, v: u64, previous: Option<u64>) -> HostStatus {
        HostStatus {
            host: url.into(),
            up: true,
            model_version: Some(ModelVersion(v)),
            previous_version: previous.map(ModelVersion),
            index_id: String::new(),
            items: 10,
            shard: 0,
            shard_count: 1,
            error: String::new(),
        }
    }

    #[test]
    fn the_rollout_state_follows_hosts_forward_and_back() {
        let v = ModelVersion;
        assert_eq!(RolloutState::of(&[]), RolloutState::NoHosts);
        assert_eq!(
            RolloutState::of(&[host("a", 1, None), host("b", 1, None)]),
            RolloutState::Steady { version: v(1) }
        );
        assert_eq!(
            RolloutState::of(&[host("a", 2, Some(1)), host("b", 1, None)]),
            RolloutState::RollingOut {
                from: v(1),
                to: v(2),
                moved: 1,
                of: 2
            }
        );
        assert_eq!(
            RolloutState::of(&[host("a", 1, Some(2)), host("b", 2, Some(1))]),
            RolloutState::RollingBack {
                from: v(2),
                to: v(1),
                moved: 1,
                of: 2
            }
        );
        let mut down = host("c", 3, None);
        down.up = false;
        assert_eq!(
            RolloutState::of(&[host("a", 2, Some(1)), down]),
            RolloutState::Steady { version: v(2) },
            "a down host's last version does not count"
        );
    }

    #[test]
    fn answers_are_read_per_version_from_the_exposition() {
        let text = "# HELP tandem_homefeed_answers_total x\n\
                    tandem_homefeed_answers_total{version=\"v1\"} 12\n\
                    tandem_homefeed_answers_total{version=\"v2\"} 3.5\n\
                    tandem_homefeed_answers_total_other{version=\"v9\"} 1\n\
                    tandem_rpc_requests_total{method=\"x\"} 4\n";
        let a = answers_total(text);
        assert_eq!(a.len(), 2);
        assert_eq!(a["v1"], 12.0);
        assert_eq!(a["v2"], 3.5);
    }
}
