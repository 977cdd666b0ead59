//! `tandem call …`: typed gRPC clients for operators and scripts (no grpcurl needed).

use anyhow::{Context, Result};
use tandem_proto::ann::v1 as pb;
use tandem_proto::ann::v1::ann_search_client::AnnSearchClient;
use tandem_proto::tonic;

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
        model_version: String,
        #[arg(long)]
        user: String,
        /// Recent items overriding the stored history, most recent first (comma-separated).
        #[arg(long, value_delimiter = ',')]
        recent_items: Vec<String>,
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
        model_version: String,
        /// Comma-separated floats.
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        embedding: Vec<f32>,
        #[arg(long, default_value_t = 10)]
        k: i32,
        #[arg(long)]
        ef: Option<u32>,
    },
    /// Load a version (admin).
    Load {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        version: String,
        #[arg(long, env = "TANDEM_ADMIN_TOKEN")]
        admin_token: String,
    },
    /// Roll back to the previous version (admin).
    Rollback {
        #[command(flatten)]
        target: Target,
        #[arg(long, env = "TANDEM_ADMIN_TOKEN")]
        admin_token: String,
    },
}

/// A request carrying the admin token (`authorization: Bearer <token>`).
pub fn admin<T>(msg: T, token: &str) -> Result<tonic::Request<T>> {
    Ok(tandem_retrain::fleet::with_token(msg, token)?)
}

/// `[{"item_id", "score"}, …]` for JSON output.
fn scored_json<'a>(items: impl Iterator<Item = (&'a str, f32)>) -> Vec<serde_json::Value> {
    items
        .map(|(item_id, score)| serde_json::json!({"item_id": item_id, "score": score}))
        .collect()
}

fn status_line(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn metadata_json(m: &pb::VersionMetadata) -> serde_json::Value {
    serde_json::json!({
        "model_name": m.model_name,
        "model_version": m.model_version,
        "versions": m.versions,
        "index_id": m.index_id,
        "item_count": m.item_count,
        "dim": m.dim,
        "loaded_at_unix_ms": m.loaded_at_unix_ms,
        "ann_recall_at_10": m.ann_recall_at_10,
    })
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
        }
    })
}

async fn connect(addr: &str) -> Result<AnnSearchClient<tonic::transport::Channel>> {
    AnnSearchClient::connect(addr.to_string())
        .await
        .with_context(|| format!("connecting to {addr}"))
}

async fn ann(call: AnnCall) -> Result<()> {
    match call {
        AnnCall::Metadata(t) => {
            let m = connect(&t.addr)
                .await?
                .get_version_metadata(pb::GetVersionMetadataRequest {})
                .await
                .map_err(status_line)?
                .into_inner();
            if t.json {
                println!("{}", serde_json::to_string_pretty(&metadata_json(&m))?);
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
        } => {
            let r = connect(&target.addr)
                .await?
                .search(pb::SearchRequest {
                    model_name,
                    model_version,
                    embedding,
                    k,
                    ef,
                    allow_version_mismatch: false,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            if target.json {
                let items = scored_json(r.items.iter().map(|i| (i.item_id.as_str(), i.score)));
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"model_name": r.model_name, "model_version": r.model_version, "index_id": r.index_id, "items": items})
                    )?
                );
            } else {
                for i in &r.items {
                    println!("{}\t{:.6}", i.item_id, i.score);
                }
            }
        }
        AnnCall::Load {
            target,
            version,
            admin_token,
        } => {
            let r = connect(&target.addr)
                .await?
                .load_version(admin(pb::LoadVersionRequest { version }, &admin_token)?)
                .await
                .map_err(status_line)?
                .into_inner();
            print_load(&r, target.json)?;
        }
        AnnCall::Rollback {
            target,
            admin_token,
        } => {
            let r = connect(&target.addr)
                .await?
                .rollback(admin(pb::RollbackRequest {}, &admin_token)?)
                .await
                .map_err(status_line)?
                .into_inner();
            print_load(&r, target.json)?;
        }
    }
    Ok(())
}

fn print_load(r: &pb::LoadVersionResponse, json: bool) -> Result<()> {
    let m = r.metadata.clone().unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"previous_version": r.previous_version, "metadata": metadata_json(&m)})
            )?
        );
    } else {
        println!(
            "now serving {} {} (was {})",
            m.model_name,
            m.model_version,
            if r.previous_version.is_empty() {
                "nothing"
            } else {
                &r.previous_version
            }
        );
    }
    Ok(())
}

async fn user_tower(call: UserTowerCall) -> Result<()> {
    use tandem_proto::usertower::v1 as ut;
    use tandem_proto::usertower::v1::user_tower_client::UserTowerClient;
    let connect = |addr: String| async move {
        UserTowerClient::connect(addr.clone())
            .await
            .with_context(|| format!("connecting to {addr}"))
    };
    match call {
        UserTowerCall::Embed {
            target,
            model_name,
            model_version,
            user,
            recent_items,
        } => {
            let r = connect(target.addr)
                .await?
                .embed(ut::EmbedRequest {
                    model_name,
                    model_version,
                    user_id: user,
                    recent_items,
                    features: Default::default(),
                    request_time_unix: None,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            if target.json {
                println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({"model_name": r.model_name, "model_version": r.model_version, "history_length": r.history_length, "embedding": r.embedding})
                    )?
                );
            } else {
                println!(
                    "{} {} (history {}): {:?}",
                    r.model_name, r.model_version, r.history_length, r.embedding
                );
            }
        }
        UserTowerCall::Versions(t) => {
            let r = connect(t.addr)
                .await?
                .list_versions(ut::ListVersionsRequest {})
                .await
                .map_err(status_line)?
                .into_inner();
            if t.json {
                let v: Vec<_> = r.versions.iter().map(|v| serde_json::json!({"model_version": v.model_version, "dim": v.dim, "loaded_at_unix_ms": v.loaded_at_unix_ms, "pinned": v.pinned, "feature_schema_hash": v.feature_schema_hash})).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"model_name": r.model_name, "versions": v})
                    )?
                );
            } else {
                let names: Vec<&str> = r
                    .versions
                    .iter()
                    .map(|v| v.model_version.as_str())
                    .collect();
                println!("{}: {}", r.model_name, names.join(", "));
            }
        }
        UserTowerCall::Record {
            target,
            user,
            item,
            timestamp,
            action,
        } => {
            let r = connect(target.addr)
                .await?
                .record_engagement(ut::EngagementEvent {
                    user_id: user,
                    item_id: item,
                    timestamp,
                    action,
                    weight: 1.0,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            if target.json {
                println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({"accepted": r.accepted, "rejected": r.rejected, "errors": r.errors})
                    )?
                );
            } else {
                println!("accepted {}", r.accepted);
            }
        }
    }
    Ok(())
}

async fn homefeed(call: HomefeedCall) -> Result<()> {
    use tandem_proto::homefeed::v1 as hf;
    use tandem_proto::homefeed::v1::homefeed_client::HomefeedClient;
    match call {
        HomefeedCall::Candidates {
            target,
            user,
            k,
            exclude_seen,
        } => {
            let mut c = HomefeedClient::connect(target.addr.clone())
                .await
                .with_context(|| format!("connecting to {}", target.addr))?;
            let r = c
                .get_candidates(hf::GetCandidatesRequest {
                    user_id: user,
                    k,
                    exclude_seen,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            if target.json {
                let items = scored_json(r.items.iter().map(|i| (i.item_id.as_str(), i.score)));
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "model_name": r.model_name,
                        "model_version": r.model_version,
                        "embedding_version": r.embedding_version,
                        "ann_host": r.ann_host,
                        "attempts": r.attempts,
                        "items": items,
                    }))?
                );
            } else {
                println!(
                    "{} {} from {} ({} attempt(s))",
                    r.model_name, r.model_version, r.ann_host, r.attempts
                );
                for i in &r.items {
                    println!("{}\t{:.6}", i.item_id, i.score);
                }
            }
        }
    }
    Ok(())
}
