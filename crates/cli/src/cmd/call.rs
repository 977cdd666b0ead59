//! `tandem call …`: typed gRPC clients for operators and scripts (no grpcurl needed).

use anyhow::Result;
use tandem_client::usertower::EngagementEvent;
use tandem_client::{
    AnnClient, ClientOptions, EmbedQuery, HomefeedClient, HostMetadata, SearchQuery, Swapped,
    UserTowerClient,
};
use tandem_types::ModelVersion;

use crate::args::{AdminArgs, ClientTlsArgs};

#[derive(clap::Subcommand, Debug)]
pub enum Call {
    /// An ANN host.
    #[command(subcommand)]
    Ann(AnnCall),
    /// The user-tower service.
    #[command(subcommand)]
    UserTower(UserTowerCall),
    /// The homefeed orchestrator.
    #[command(subcommand)]
    Homefeed(HomefeedCall),
    /// Any Tandem server's readiness (grpc.health.v1, the overall status): exits 0 when
    /// SERVING, 1 otherwise (for container health checks).
    Health(Target),
}

#[derive(clap::Subcommand, Debug)]
pub enum HomefeedCall {
    /// Candidates for a user.
    Candidates {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 50)]
        k: i32,
        /// Leave out items in the user's recent history.
        #[arg(long)]
        exclude_seen: bool,
        /// Read-your-writes: embed from user state that includes this engagement sequence (the
        /// `sequence` a record printed).
        #[arg(long)]
        min_sequence: Option<u64>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum UserTowerCall {
    /// A user's embedding from one model version.
    Embed {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "tandem")]
        model_name: String,
        #[arg(long)]
        model_version: ModelVersion,
        #[arg(long)]
        user: String,
        /// Recent items overriding the stored history, most recent first (comma-separated).
        #[arg(long, value_delimiter = ',')]
        recent_items: Vec<String>,
        /// Read-your-writes: answer from state that includes this engagement sequence (the
        /// `sequence` a record printed); UNAVAILABLE if the replica does not get there in time.
        #[arg(long)]
        min_sequence: Option<u64>,
    },
    /// Versions loaded right now.
    Versions(Target),
    /// Record one engagement event.
    Record {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        user: String,
        #[arg(long)]
        item: String,
        /// Unix seconds (default: now).
        #[arg(long, default_value_t = 0)]
        timestamp: i64,
        #[arg(long, default_value = "click")]
        action: String,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Server address, e.g. http://127.0.0.1:7101.
    #[arg(long, env = "TANDEM_ADDR")]
    pub addr: String,
    /// Print the response as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl Target {
    fn options(&self, admin_token: Option<String>) -> Result<ClientOptions> {
        self.tls.options(admin_token)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum AnnCall {
    /// The index version this host serves.
    Metadata(Target),
    /// Nearest items for an embedding.
    Search {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "tandem")]
        model_name: String,
        /// The model version the embedding came from.
        #[arg(long)]
        model_version: ModelVersion,
        /// Comma-separated floats.
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        embedding: Vec<f32>,
        #[arg(long, default_value_t = 10)]
        k: i32,
        #[arg(long)]
        ef: Option<u32>,
        /// Item ids to leave out of the answer (comma-separated); it still holds k items.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
    },
    /// Load a version (admin).
    Load {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        version: ModelVersion,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Roll back to the previous version (admin).
    Rollback {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `[{"item_id", "score"}, …]` for JSON output.
fn scored_json(items: &[(String, f32)]) -> Vec<serde_json::Value> {
    items
        .iter()
        .map(|(item_id, score)| serde_json::json!({"item_id": item_id, "score": score}))
        .collect()
}

fn metadata_json(m: &HostMetadata) -> serde_json::Value {
    serde_json::json!({
        "model_name": m.model_name,
        "model_version": m.model_version,
        "versions": m.versions,
        "index_id": m.index_id,
        "item_count": m.item_count,
        "dim": m.dim,
        "loaded_at_unix_ms": m.loaded_at_unix_ms,
        "ann_recall_at_10": m.ann_recall_at_10,
        "previous_version": m.previous_version,
        "shard": m.shard,
        "shard_count": m.shard_count,
    })
}

fn print_json(v: &serde_json::Value, pretty: bool) -> Result<()> {
    if pretty {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{}", serde_json::to_string(v)?);
    }
    Ok(())
}

pub fn run(c: Call) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match c {
            Call::Ann(call) => ann(call).await,
            Call::UserTower(call) => user_tower(call).await,
            Call::Homefeed(call) => homefeed(call).await,
            Call::Health(t) => health(t).await,
        }
    })
}

async fn ann(call: AnnCall) -> Result<()> {
    match call {
        AnnCall::Metadata(t) => {
            let m = AnnClient::connect(&t.addr, &t.options(None)?)
                .await?
                .metadata(None)
                .await?;
            if t.json {
                print_json(&metadata_json(&m), true)?;
            } else {
                println!(
                    "{} {} index {} ({} items, dim {})",
                    m.model_name, m.model_version, m.index_id, m.item_count, m.dim
                );
            }
        }
        AnnCall::Search {
            target,
            model_name,
            model_version,
            embedding,
            k,
            ef,
            exclude,
        } => {
            let r = AnnClient::connect(&target.addr, &target.options(None)?)
                .await?
                .search(
                    SearchQuery {
                        model_name,
                        version: model_version,
                        embedding,
                        k,
                        ef,
                        allow_version_mismatch: false,
                        exclude,
                    },
                    None,
                )
                .await?;
            if target.json {
                print_json(
                    &serde_json::json!({"model_name": r.model_name, "model_version": r.version, "index_id": r.index_id, "items": scored_json(&r.items)}),
                    true,
                )?;
            } else {
                for (item, score) in &r.items {
                    println!("{item}\t{score:.6}");
                }
            }
        }
        AnnCall::Load {
            target,
            version,
            admin,
        } => {
            let r = AnnClient::connect(&target.addr, &target.options(Some(admin.required()?))?)
                .await?
                .load(version, None)
                .await?;
            print_swap(&r, target.json)?;
        }
        AnnCall::Rollback { target, admin } => {
            let r = AnnClient::connect(&target.addr, &target.options(Some(admin.required()?))?)
                .await?
                .rollback(None)
                .await?;
            print_swap(&r, target.json)?;
        }
    }
    Ok(())
}

fn print_swap(r: &Swapped, json: bool) -> Result<()> {
    if json {
        return print_json(
            &serde_json::json!({"previous_version": r.replaced, "metadata": metadata_json(&r.now)}),
            true,
        );
    }
    println!(
        "now serving {} {} (was {})",
        r.now.model_name,
        r.now.model_version,
        r.replaced
            .map_or_else(|| "nothing".to_string(), |v| v.to_string())
    );
    Ok(())
}

async fn user_tower(call: UserTowerCall) -> Result<()> {
    match call {
        UserTowerCall::Embed {
            target,
            model_name,
            model_version,
            user,
            recent_items,
            min_sequence,
        } => {
            let q = EmbedQuery {
                model_name,
                user_id: user,
                recent_items,
                min_sequence,
                ..Default::default()
            };
            let r = UserTowerClient::connect(&target.addr, &target.options(None)?)
                .await?
                .embed(model_version, q, None)
                .await?;
            if target.json {
                print_json(
                    &serde_json::json!({"model_name": r.model_name, "model_version": r.version, "history_length": r.history_length, "history": r.history, "embedding": r.vector}),
                    false,
                )?;
            } else {
                println!(
                    "{} {} (history {}): {:?}",
                    r.model_name, r.version, r.history_length, r.vector
                );
            }
        }
        UserTowerCall::Versions(t) => {
            let (model_name, versions) = UserTowerClient::connect(&t.addr, &t.options(None)?)
                .await?
                .list_versions(None)
                .await?;
            if t.json {
                let v: Vec<_> = versions.iter().map(|v| serde_json::json!({"model_version": v.version, "dim": v.dim, "loaded_at_unix_ms": v.loaded_at_unix_ms, "pinned": v.pinned, "feature_schema_hash": v.feature_schema_hash})).collect();
                print_json(
                    &serde_json::json!({"model_name": model_name, "versions": v}),
                    true,
                )?;
            } else {
                let names: Vec<String> = versions.iter().map(|v| v.version.to_string()).collect();
                println!("{model_name}: {}", names.join(", "));
            }
        }
        UserTowerCall::Record {
            target,
            user,
            item,
            timestamp,
            action,
        } => {
            let r = UserTowerClient::connect(&target.addr, &target.options(None)?)
                .await?
                .record(
                    EngagementEvent {
                        user_id: user,
                        item_id: item,
                        timestamp,
                        action,
                        weight: 1.0,
                    },
                    None,
                )
                .await?;
            if target.json {
                print_json(
                    &serde_json::json!({"accepted": r.accepted, "rejected": r.rejected, "errors": r.errors, "sequence": r.sequence}),
                    false,
                )?;
            } else {
                println!("accepted {} (sequence {})", r.accepted, r.sequence);
            }
        }
    }
    Ok(())
}

async fn homefeed(call: HomefeedCall) -> Result<()> {
    match call {
        HomefeedCall::Candidates {
            target,
            user,
            k,
            exclude_seen,
            min_sequence,
        } => {
            let r = HomefeedClient::connect(&target.addr, &target.options(None)?)
                .await?
                .candidates_after(&user, k, exclude_seen, min_sequence, None)
                .await?;
            if target.json {
                print_json(
                    &serde_json::json!({
                        "model_name": r.model_name,
                        "model_version": r.index_version,
                        "embedding_version": r.embedding_version,
                        "ann_host": r.ann_host,
                        "attempts": r.attempts,
                        "items": scored_json(&r.items),
                    }),
                    true,
                )?;
            } else {
                println!(
                    "{} {} from {} ({} attempt(s))",
                    r.model_name, r.index_version, r.ann_host, r.attempts
                );
                for (item, score) in &r.items {
                    println!("{item}\t{score:.6}");
                }
            }
        }
    }
    Ok(())
}

async fn health(t: Target) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = tandem_client::connect(&t.addr, &t.options(None)?).await?;
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: health check failed: {}", t.addr, s.message()))?
        .into_inner()
        .status;
    let name = ServingStatus::try_from(status)
        .map_or("UNKNOWN", |s| s.as_str_name())
        .to_string();
    if t.json {
        print_json(&serde_json::json!({"addr": t.addr, "status": name}), false)?;
    } else {
        println!("{name}");
    }
    if status != ServingStatus::Serving as i32 {
        anyhow::bail!("{}: {name}", t.addr);
    }
    Ok(())
}
