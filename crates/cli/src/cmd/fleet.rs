//! Fleet operations: `tandem rollout`, `tandem rollback`, `tandem status` — thin wrappers over
//! [`tandem_client::FleetAdmin`], which the retrainer uses too.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tandem_client::{FleetAdmin, Step};
use tandem_registry::{LocalFs, Storage};
use tandem_types::{ModelVersion, MODELS};

use crate::args::{AdminArgs, ClientTlsArgs};

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
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl Fleet {
    pub fn client(&self, admin_token: Option<String>) -> Result<FleetAdmin> {
        let opts = self.tls.options(admin_token)?;
        Ok(FleetAdmin::new(
            &self.hosts,
            &self.user_tower,
            self.artifacts.clone(),
            &self.model,
            &opts,
        )?)
    }
}

#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// Version to roll out.
    #[arg(long)]
    pub to: ModelVersion,
    #[command(flatten)]
    pub fleet: Fleet,
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Pause between hosts, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// How long to wait for one host to report the version and be healthy, in seconds.
    #[arg(long, default_value_t = 120)]
    pub host_timeout_s: u64,
    /// On a failure, leave the hosts already moved on the new version instead of moving them
    /// back.
    #[arg(long)]
    pub allow_partial: bool,
}

#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub fleet: Fleet,
    #[command(flatten)]
    pub admin: AdminArgs,
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
            let from = s
                .from
                .map_or_else(|| "nothing".to_string(), |v| v.to_string());
            eprintln!("{}: {from} → {} in {:.1}s", s.host, s.to, s.seconds);
        }
    }
    Ok(())
}

pub fn rollout(a: RolloutArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let f = a.fleet.client(Some(a.admin.required()?))?;
        let timeout = Duration::from_secs(a.host_timeout_s);
        let (steps, done) = f
            .rollout(
                &a.fleet.hosts,
                a.to,
                Duration::from_millis(a.pause_ms),
                timeout,
            )
            .await;
        let Err(e) = done else {
            return report(
                &steps,
                a.fleet.json,
                serde_json::json!({"rolled_out": a.to}),
            );
        };
        let failed = tandem_types::error_chain(&e);
        if a.allow_partial || !steps.iter().any(Step::moved) {
            report(
                &steps,
                a.fleet.json,
                serde_json::json!({"rolled_out": null, "partial": true, "error": failed}),
            )?;
            anyhow::bail!(
                "rollout stopped ({failed}); the hosts it moved stay on {}",
                a.to
            );
        }
        if !a.fleet.json {
            eprintln!("rollout failed: {failed}; undoing the hosts it moved");
        }
        let (undone, back) = f.undo(&steps, timeout).await;
        let undo_error = back.as_ref().err().map(|e| tandem_types::error_chain(e));
        if a.fleet.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "rolled_out": null,
                    "error": failed,
                    "steps": steps,
                    "undone": undone,
                    "undo_error": undo_error,
                }))?
            );
        } else {
            report(&undone, false, serde_json::json!({}))?;
        }
        match undo_error {
            None => anyhow::bail!("rollout failed and was undone: {failed}"),
            Some(u) => anyhow::bail!("rollout failed ({failed}) and undoing it failed too: {u}"),
        }
    })
}

pub fn rollback(a: RollbackArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let f = a.fleet.client(Some(a.admin.required()?))?;
        let steps = f.rollback(&a.fleet.hosts).await?;
        report(&steps, a.fleet.json, serde_json::json!({}))
    })
}

pub fn status(f: Fleet) -> Result<()> {
    runtime()?.block_on(async move {
        let client = f.client(None)?;
        let hosts = client.hosts().await;
        let skew = FleetAdmin::hosts_per_version(&hosts);
        let user_tower = match client.user_tower_versions().await {
            Ok(v) => serde_json::json!({"url": f.user_tower, "up": true, "versions": v}),
            Err(e) => serde_json::json!({"url": f.user_tower, "up": false, "error": tandem_types::error_chain(&e)}),
        };
        let pins: Vec<String> = LocalFs::new(&f.artifacts)
            .pinned(MODELS, &f.model)
            .unwrap_or_default()
            .iter()
            .map(|v| v.to_string())
            .collect();
        let shards = FleetAdmin::replicas_per_shard(&hosts);
        let out = serde_json::json!({"model": f.model, "hosts": hosts, "hosts_per_version": skew, "replicas_per_shard": shards, "user_tower": user_tower, "pinned": pins});
        if f.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for h in &hosts {
                let v = match (h.up, h.model_version) {
                    (true, Some(v)) if h.shard_count > 1 => {
                        format!("{v}\tshard {} of {}", h.shard, h.shard_count)
                    }
                    (true, Some(v)) => v.to_string(),
                    _ => "DOWN".to_string(),
                };
                println!("{}\t{v}", h.host);
            }
            for (v, per) in &shards {
                let full = per.iter().all(|&n| n > 0);
                let per: Vec<String> = per.iter().map(u64::to_string).collect();
                println!(
                    "{v}\treplicas per shard [{}]{}",
                    per.join(", "),
                    if full { "" } else { " (not every shard covered)" }
                );
            }
            println!("user tower\t{}", out["user_tower"]["versions"]);
            println!("pinned\t{}", pins.join(", "));
        }
        // The report is printed either way; a script reads the exit code.
        let down = hosts.iter().filter(|h| !h.up).count();
        if down > 0 || out["user_tower"]["up"] != true {
            anyhow::bail!(
                "fleet degraded: {down} of {} hosts unreachable, user tower {}",
                hosts.len(),
                if out["user_tower"]["up"] == true { "up" } else { "unreachable" }
            );
        }
        Ok(())
    })
}
