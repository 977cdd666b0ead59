//! Fleet operations over gRPC: rollout, rollback and status of the ANN hosts, and the user-tower
//! checks that make them safe.
//!
//! Deploy order is user tower first, index second: a rollout refuses to start unless the user
//! tower already serves the target version, and a rollback refuses a host whose previous version
//! the user tower no longer holds. Every version a host serves (and the one it would roll back
//! to) is pinned in the registry under that host's name, so retention never deletes it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_proto::ann::v1 as ann;
use tandem_proto::ann::v1::ann_search_client::AnnSearchClient;
use tandem_proto::usertower::v1 as ut;
use tandem_proto::usertower::v1::user_tower_client::UserTowerClient;
use tandem_registry::{LocalFs, Storage, MODELS};
use tandem_types::ModelVersion;
use tonic::transport::Channel;

use crate::{Result, RetrainError};

/// The services a rollout touches.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// ANN host URLs in rollout order.
    pub hosts: Vec<String>,
    pub user_tower: String,
    /// Artifact store root (pins live there).
    pub artifacts: PathBuf,
    pub model: String,
    pub admin_token: String,
}

/// One host moved from one version to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub host: String,
    pub from: String,
    pub to: String,
    pub seconds: f64,
}

/// What one host reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub up: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub index_id: String,
    #[serde(default)]
    pub items: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Adds the admin bearer token to a request.
pub fn with_token<T>(msg: T, token: &str) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| RetrainError::Invalid("admin token is not valid header text".into()))?,
    );
    Ok(r)
}

fn rpc(url: &str) -> impl FnOnce(tonic::Status) -> RetrainError + '_ {
    move |s| RetrainError::Rpc {
        url: url.to_string(),
        code: s.code(),
        message: s.message().to_string(),
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

async fn host(url: &str) -> Result<AnnSearchClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| RetrainError::Invalid(format!("{url}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60));
    let ch = endpoint
        .connect()
        .await
        .map_err(|e| RetrainError::Connect {
            url: url.to_string(),
            message: e.to_string(),
        })?;
    Ok(AnnSearchClient::new(ch))
}

/// The version metadata of one host.
pub async fn metadata(url: &str) -> Result<ann::VersionMetadata> {
    Ok(host(url)
        .await?
        .get_version_metadata(ann::GetVersionMetadataRequest {})
        .await
        .map_err(rpc(url))?
        .into_inner())
}

impl Fleet {
    /// The versions the user tower has loaded.
    pub async fn user_tower_versions(&self) -> Result<Vec<String>> {
        let url = &self.user_tower;
        let mut c =
            UserTowerClient::connect(url.clone())
                .await
                .map_err(|e| RetrainError::Connect {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
        Ok(c.list_versions(ut::ListVersionsRequest {})
            .await
            .map_err(rpc(url))?
            .into_inner()
            .versions
            .into_iter()
            .map(|v| v.model_version)
            .collect())
    }

    /// Waits until the user tower serves `version` (it polls the registry on its own).
    pub async fn wait_user_tower(&self, version: ModelVersion, timeout: Duration) -> Result<()> {
        let want = version.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            match self.user_tower_versions().await {
                Ok(v) if v.contains(&want) => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(RetrainError::Fleet(format!(
                        "the user tower at {} did not load {want} within {}s",
                        self.user_tower,
                        timeout.as_secs()
                    )))
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

    async fn wait_for(url: &str, version: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(m) = metadata(url).await {
                if m.model_version == version {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(RetrainError::Fleet(format!(
                    "{url} did not report {version} within {}s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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
        let target = to.to_string();
        match self.user_tower_versions().await {
            Ok(served) if served.contains(&target) => {}
            Ok(served) => {
                return (steps, Err(RetrainError::Fleet(format!(
                    "the user tower does not serve {target} yet (serves: {}): roll out the user tower first, then the index",
                    served.join(", ")
                ))))
            }
            Err(e) => return (steps, Err(e)),
        }
        for (i, url) in hosts.iter().enumerate() {
            let started = Instant::now();
            let r = async {
                let before = metadata(url).await?;
                let from: Option<ModelVersion> = before.model_version.parse().ok();
                // Pin before loading, so retention cannot delete the version mid-rollout.
                self.repin(
                    url,
                    &[Some(to), from].into_iter().flatten().collect::<Vec<_>>(),
                )?;
                if before.model_version != target {
                    host(url)
                        .await?
                        .load_version(with_token(
                            ann::LoadVersionRequest {
                                version: target.clone(),
                            },
                            &self.admin_token,
                        )?)
                        .await
                        .map_err(rpc(url))?;
                    Self::wait_for(url, &target, host_timeout).await?;
                }
                Ok::<_, RetrainError>(before.model_version)
            }
            .await;
            match r {
                Ok(from) => {
                    tracing::info!(host = %url, %from, to = %target, "host moved");
                    steps.push(Step {
                        host: url.clone(),
                        from,
                        to: target.clone(),
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

    /// Rolls `hosts` back to their previous versions (refusing a host whose previous version the
    /// user tower no longer holds).
    pub async fn rollback(&self, hosts: &[String]) -> Result<Vec<Step>> {
        let served = self.user_tower_versions().await?;
        let mut steps = Vec::new();
        for url in hosts {
            let started = Instant::now();
            let before = metadata(url).await?;
            if before.previous_version.is_empty() {
                return Err(RetrainError::Fleet(format!(
                    "{url}: no previous version to roll back to (serving {})",
                    before.model_version
                )));
            }
            if !served.contains(&before.previous_version) {
                return Err(RetrainError::Fleet(format!(
                    "{url}: the user tower no longer holds {} (serves: {}): refusing to roll back",
                    before.previous_version,
                    served.join(", ")
                )));
            }
            let r = host(url)
                .await?
                .rollback(with_token(ann::RollbackRequest {}, &self.admin_token)?)
                .await
                .map_err(rpc(url))?
                .into_inner();
            let now = r.metadata.map(|m| m.model_version).unwrap_or_default();
            let after = metadata(url).await?;
            let keep: Vec<ModelVersion> = [now.parse().ok(), after.previous_version.parse().ok()]
                .into_iter()
                .flatten()
                .collect();
            self.repin(url, &keep)?;
            tracing::info!(host = %url, from = %before.model_version, to = %now, "host rolled back");
            steps.push(Step {
                host: url.clone(),
                from: before.model_version,
                to: now,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(steps)
    }

    /// What every host reports (down hosts included).
    pub async fn hosts(&self) -> Vec<HostStatus> {
        let mut out = Vec::new();
        for url in &self.hosts {
            out.push(match metadata(url).await {
                Ok(m) => HostStatus {
                    host: url.clone(),
                    up: true,
                    model_version: m.model_version,
                    previous_version: m.previous_version,
                    index_id: m.index_id,
                    items: m.item_count,
                    error: String::new(),
                },
                Err(e) => HostStatus {
                    host: url.clone(),
                    up: false,
                    model_version: String::new(),
                    previous_version: String::new(),
                    index_id: String::new(),
                    items: 0,
                    error: e.to_string(),
                },
            });
        }
        out
    }

    /// Hosts per version (the version-skew view).
    pub fn hosts_per_version(hosts: &[HostStatus]) -> BTreeMap<String, u64> {
        let mut skew = BTreeMap::new();
        for h in hosts.iter().filter(|h| h.up) {
            *skew.entry(h.model_version.clone()).or_default() += 1;
        }
        skew
    }

    /// The version most up hosts serve (ties: the older one) — the champion of a retrain cycle.
    pub async fn serving_version(&self) -> Option<ModelVersion> {
        let skew = Self::hosts_per_version(&self.hosts().await);
        let mut best: Option<(u64, ModelVersion)> = None;
        for (v, n) in skew {
            let Ok(v) = v.parse::<ModelVersion>() else {
                continue;
            };
            if best.is_none_or(|(bn, bv)| n > bn || (n == bn && v < bv)) {
                best = Some((n, v));
            }
        }
        best.map(|(_, v)| v)
    }
}
