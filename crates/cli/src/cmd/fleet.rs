//! Fleet operations: `tandem rollout`, `tandem rollback`, `tandem status`.
//!
//! Deploy order is user tower first, index second: a rollout refuses to start unless the user
//! tower already serves the target version, and a rollback refuses a host whose previous version
//! the user tower no longer holds. Every version a host serves (and the one it would roll back
//! to) is pinned in the registry under that host's name, so retention never deletes it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_proto::ann::v1 as ann;
use tandem_proto::ann::v1::ann_search_client::AnnSearchClient;
use tandem_proto::tonic;
use tandem_proto::usertower::v1 as ut;
use tandem_proto::usertower::v1::user_tower_client::UserTowerClient;
use tandem_registry::{LocalFs, Storage, MODELS};
use tandem_types::ModelVersion;

use crate::cmd::call::admin;

#[derive(clap::Args, Debug, Clone)]
pub struct Fleet {
    /// ANN host URLs, comma-separated, in rollout order.
    #[arg(long, env = "TANDEM_ANN_HOSTS", value_delimiter = ',', required = true)]
    pub hosts: Vec<String>,
    /// User-tower URL.
    #[arg(long, env = "TANDEM_USER_TOWER")]
    pub user_tower: String,
    /// Artifact store root (for pins).
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: PathBuf,
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// Version to roll out.
    #[arg(long)]
    pub to: ModelVersion,
    #[command(flatten)]
    pub fleet: Fleet,
    #[arg(long, env = "TANDEM_ADMIN_TOKEN")]
    pub admin_token: String,
    /// Pause between hosts, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// How long to wait for one host to report the version and be healthy, in seconds.
    #[arg(long, default_value_t = 120)]
    pub host_timeout_s: u64,
}

#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub fleet: Fleet,
    #[arg(long, env = "TANDEM_ADMIN_TOKEN")]
    pub admin_token: String,
}

fn holder(url: &str) -> String {
    let s: String = url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("ann-{s}")
}

async fn host(url: &str) -> Result<AnnSearchClient<tonic::transport::Channel>> {
    AnnSearchClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))
}

async fn metadata(url: &str) -> Result<ann::VersionMetadata> {
    Ok(host(url)
        .await?
        .get_version_metadata(ann::GetVersionMetadataRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{url}: {:?}: {}", s.code(), s.message()))?
        .into_inner())
}

async fn user_tower_versions(url: &str) -> Result<Vec<String>> {
    let mut c = UserTowerClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(c.list_versions(ut::ListVersionsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{url}: {}", s.message()))?
        .into_inner()
        .versions
        .into_iter()
        .map(|v| v.model_version)
        .collect())
}

/// Pins exactly `keep` for this host's holder name.
fn repin(pins: &LocalFs, model: &str, url: &str, keep: &[ModelVersion]) -> Result<()> {
    let who = holder(url);
    for v in keep {
        pins.pin(MODELS, model, *v, &who)?;
    }
    for v in pins.pinned(MODELS, model)? {
        if !keep.contains(&v) {
            pins.unpin(MODELS, model, v, &who)?;
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
            bail!(
                "{url} did not report {version} within {}s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn rollout(a: RolloutArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let to = a.to.to_string();
        let served = user_tower_versions(&a.fleet.user_tower).await?;
        if !served.contains(&to) {
            bail!("the user tower does not serve {to} yet (serves: {}): roll out the user tower first, then the index", served.join(", "));
        }
        let pins = LocalFs::new(&a.fleet.artifacts);
        let mut steps = Vec::new();
        for (i, url) in a.fleet.hosts.iter().enumerate() {
            let started = Instant::now();
            let before = metadata(url).await?;
            let from: Option<ModelVersion> = before.model_version.parse().ok();
            // Pin before loading, so retention cannot delete the version mid-rollout.
            repin(&pins, &a.fleet.model, url, &[Some(a.to), from].into_iter().flatten().collect::<Vec<_>>())?;
            if before.model_version != to {
                host(url).await?.load_version(admin(ann::LoadVersionRequest { version: to.clone() }, &a.admin_token)?).await.map_err(|s| anyhow::anyhow!("{url}: {:?}: {}", s.code(), s.message()))?;
                wait_for(url, &to, Duration::from_secs(a.host_timeout_s)).await?;
            }
            if !a.fleet.json {
                eprintln!("{url}: {} → {to} in {:.1}s", before.model_version, started.elapsed().as_secs_f64());
            }
            steps.push(serde_json::json!({"host": url, "from": before.model_version, "to": to, "seconds": started.elapsed().as_secs_f64()}));
            if i + 1 < a.fleet.hosts.len() && a.pause_ms > 0 {
                tokio::time::sleep(Duration::from_millis(a.pause_ms)).await;
            }
        }
        if a.fleet.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"rolled_out": to, "steps": steps}))?);
        }
        Ok(())
    })
}

pub fn rollback(a: RollbackArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let served = user_tower_versions(&a.fleet.user_tower).await?;
        let pins = LocalFs::new(&a.fleet.artifacts);
        let mut steps = Vec::new();
        for url in &a.fleet.hosts {
            let before = metadata(url).await?;
            if before.previous_version.is_empty() {
                bail!(
                    "{url}: no previous version to roll back to (serving {})",
                    before.model_version
                );
            }
            if !served.contains(&before.previous_version) {
                bail!(
                    "{url}: the user tower no longer holds {} (serves: {}): refusing to roll back",
                    before.previous_version,
                    served.join(", ")
                );
            }
            let r = host(url)
                .await?
                .rollback(admin(ann::RollbackRequest {}, &a.admin_token)?)
                .await
                .map_err(|s| anyhow::anyhow!("{url}: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            let now = r.metadata.map(|m| m.model_version).unwrap_or_default();
            let after = metadata(url).await?;
            let keep: Vec<ModelVersion> = [now.parse().ok(), after.previous_version.parse().ok()]
                .into_iter()
                .flatten()
                .collect();
            repin(&pins, &a.fleet.model, url, &keep)?;
            if !a.fleet.json {
                eprintln!("{url}: {} → {now}", before.model_version);
            }
            steps.push(serde_json::json!({"host": url, "from": before.model_version, "to": now}));
        }
        if a.fleet.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"steps": steps}))?
            );
        }
        Ok(())
    })
}

pub fn status(f: Fleet) -> Result<()> {
    runtime()?.block_on(async move {
        let mut hosts = Vec::new();
        for url in &f.hosts {
            hosts.push(match metadata(url).await {
                Ok(m) => serde_json::json!({"host": url, "up": true, "model_version": m.model_version, "previous_version": m.previous_version, "index_id": m.index_id, "items": m.item_count}),
                Err(e) => serde_json::json!({"host": url, "up": false, "error": e.to_string()}),
            });
        }
        let user_tower = match user_tower_versions(&f.user_tower).await {
            Ok(v) => serde_json::json!({"url": f.user_tower, "up": true, "versions": v}),
            Err(e) => serde_json::json!({"url": f.user_tower, "up": false, "error": e.to_string()}),
        };
        let pins: Vec<String> = LocalFs::new(&f.artifacts).pinned(MODELS, &f.model).unwrap_or_default().iter().map(|v| v.to_string()).collect();
        let mut skew = std::collections::BTreeMap::<String, u64>::new();
        for h in &hosts {
            if let Some(v) = h["model_version"].as_str() {
                *skew.entry(v.to_string()).or_default() += 1;
            }
        }
        let out = serde_json::json!({"model": f.model, "hosts": hosts, "hosts_per_version": skew, "user_tower": user_tower, "pinned": pins});
        if f.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for h in out["hosts"].as_array().into_iter().flatten() {
                println!("{}\t{}", h["host"].as_str().unwrap_or(""), h["model_version"].as_str().unwrap_or("DOWN"));
            }
            println!("user tower\t{}", out["user_tower"]["versions"]);
            println!("pinned\t{}", pins.join(", "));
        }
        Ok(())
    })
}
