//! Fleet operations: `tandem rollout`, `tandem rollback`, `tandem status` — thin wrappers over
//! [`tandem_retrain::fleet`], which the retrainer uses too.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tandem_registry::{LocalFs, Storage, MODELS};
use tandem_retrain::fleet::{Fleet as FleetClient, Step};
use tandem_types::ModelVersion;

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

impl Fleet {
    pub fn client(&self, admin_token: &str) -> FleetClient {
        FleetClient {
            hosts: self.hosts.clone(),
            user_tower: self.user_tower.clone(),
            artifacts: self.artifacts.clone(),
            model: self.model.clone(),
            admin_token: admin_token.to_string(),
        }
    }
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn report(steps: &[Step], json: bool, extra: serde_json::Value) -> Result<()> {
    if json {
        let mut out = extra;
        out["steps"] = serde_json::to_value(steps)?;
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for s in steps {
            eprintln!("{}: {} → {} in {:.1}s", s.host, s.from, s.to, s.seconds);
        }
    }
    Ok(())
}

pub fn rollout(a: RolloutArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let f = a.fleet.client(&a.admin_token);
        let (steps, done) = f
            .rollout(
                &f.hosts,
                a.to,
                Duration::from_millis(a.pause_ms),
                Duration::from_secs(a.host_timeout_s),
            )
            .await;
        if let Err(e) = done {
            report(&steps, false, serde_json::json!({}))?;
            return Err(e.into());
        }
        report(
            &steps,
            a.fleet.json,
            serde_json::json!({"rolled_out": a.to}),
        )
    })
}

pub fn rollback(a: RollbackArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let f = a.fleet.client(&a.admin_token);
        let steps = f.rollback(&f.hosts).await?;
        report(&steps, a.fleet.json, serde_json::json!({}))
    })
}

pub fn status(f: Fleet) -> Result<()> {
    runtime()?.block_on(async move {
        let client = f.client("");
        let hosts = client.hosts().await;
        let skew = FleetClient::hosts_per_version(&hosts);
        let user_tower = match client.user_tower_versions().await {
            Ok(v) => serde_json::json!({"url": f.user_tower, "up": true, "versions": v}),
            Err(e) => serde_json::json!({"url": f.user_tower, "up": false, "error": e.to_string()}),
        };
        let pins: Vec<String> = LocalFs::new(&f.artifacts)
            .pinned(MODELS, &f.model)
            .unwrap_or_default()
            .iter()
            .map(|v| v.to_string())
            .collect();
        let out = serde_json::json!({"model": f.model, "hosts": hosts, "hosts_per_version": skew, "user_tower": user_tower, "pinned": pins});
        if f.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for h in &hosts {
                let v = if h.up { h.model_version.as_str() } else { "DOWN" };
                println!("{}\t{v}", h.host);
            }
            println!("user tower\t{}", out["user_tower"]["versions"]);
            println!("pinned\t{}", pins.join(", "));
        }
        Ok(())
    })
}
