//! Arguments shared by several commands.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tandem_data::features::parse_spec;
use tandem_data::{EventColumns, EventLog, FeatureTable};

/// Where the events are and which columns hold what.
#[derive(clap::Args, Debug, Clone)]
pub struct EventArgs {
    /// Event log: CSV, .csv.gz or Parquet (by extension).
    #[arg(long, env = "TANDEM_EVENTS")]
    pub events: PathBuf,
    /// Column holding the user id.
    #[arg(long, default_value = "user_id")]
    pub user_col: String,
    /// Column holding the item id.
    #[arg(long, default_value = "item_id")]
    pub item_col: String,
    /// Column holding the timestamp (unix seconds or RFC 3339).
    #[arg(long, default_value = "timestamp")]
    pub timestamp_col: String,
    /// Optional column holding an example weight (e.g. rating, watch time).
    #[arg(long)]
    pub weight_col: Option<String>,
}

impl EventArgs {
    pub fn columns(&self) -> EventColumns {
        EventColumns {
            user: self.user_col.clone(),
            item: self.item_col.clone(),
            timestamp: self.timestamp_col.clone(),
            weight: self.weight_col.clone(),
        }
    }

    pub fn read(&self) -> Result<EventLog> {
        Ok(EventLog::read(&self.events, &self.columns())?)
    }
}

/// Optional user and item feature tables.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FeatureArgs {
    /// User feature table keyed by the user column (CSV, .csv.gz or Parquet).
    #[arg(long)]
    pub user_features: Option<PathBuf>,
    /// Item feature table keyed by the item column.
    #[arg(long)]
    pub item_features: Option<PathBuf>,
    /// User feature columns and kinds, e.g. `age:num,gender:cat`; detected when absent.
    #[arg(long)]
    pub user_feature_spec: Option<String>,
    /// Item feature columns and kinds, e.g. `genres:multi,year:num`; detected when absent.
    #[arg(long)]
    pub item_feature_spec: Option<String>,
}

impl FeatureArgs {
    pub fn read(
        &self,
        user_key: &str,
        item_key: &str,
    ) -> Result<(Option<FeatureTable>, Option<FeatureTable>)> {
        let load = |path: &Option<PathBuf>,
                    key: &str,
                    spec: &Option<String>|
         -> Result<Option<FeatureTable>> {
            let Some(path) = path else { return Ok(None) };
            let spec = spec.as_deref().map(parse_spec).transpose()?;
            Ok(Some(FeatureTable::read(path, key, spec.as_deref())?))
        };
        Ok((
            load(&self.user_features, user_key, &self.user_feature_spec)?,
            load(&self.item_features, item_key, &self.item_feature_spec)?,
        ))
    }
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Checks that a model version directory exists before anything heavy happens.
pub fn model_dir(path: &Path) -> Result<&Path> {
    if !path.join(tandem_artifact::MANIFEST_FILE).is_file() {
        anyhow::bail!(
            "{}: not a model version directory (no {})",
            path.display(),
            tandem_artifact::MANIFEST_FILE
        );
    }
    Ok(path)
}

/// `90s`, `30m`, `6h`, `1d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 6h or 1d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (expected s, m, h or d)"
            ))
        }
    };
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// The admin token, given inline or (better: it stays out of `ps`) in a file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AdminArgs {
    /// Admin token for LoadVersion/Rollback (`authorization: Bearer <token>`); must not be
    /// empty.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", conflicts_with = "admin_token_file")]
    pub admin_token: Option<String>,
    /// A file holding the admin token (surrounding whitespace ignored).
    #[arg(long, env = "TANDEM_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl AdminArgs {
    /// The token, if one was given (an empty one is an error).
    pub fn token(&self) -> Result<Option<tandem_server::AdminToken>> {
        Ok(match (&self.admin_token, &self.admin_token_file) {
            (Some(t), _) => Some(tandem_server::AdminToken::new(t)?),
            (None, Some(f)) => Some(tandem_server::AdminToken::from_file(f)?),
            (None, None) => None,
        })
    }

    /// The token as a client sends it; an error when none was given.
    pub fn required(&self) -> Result<String> {
        let raw = match (&self.admin_token, &self.admin_token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => {
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
            }
            (None, None) => {
                anyhow::bail!("this needs the admin token: --admin-token or --admin-token-file")
            }
        };
        tandem_server::AdminToken::new(&raw)?;
        Ok(raw.trim().to_string())
    }
}

/// TLS for the services a command calls (`https://` addresses).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// CA certificate (PEM) https:// servers must chain to.
    #[arg(long, env = "TANDEM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for servers that require mutual TLS.
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// Client options with this TLS configuration (and `admin_token` when given).
    pub fn options(&self, admin_token: Option<String>) -> Result<tandem_client::ClientOptions> {
        let tls = match &self.tls_ca {
            Some(ca) => Some(tandem_client::client_tls(
                ca,
                self.tls_cert.as_deref().zip(self.tls_key.as_deref()),
            )?),
            None => None,
        };
        Ok(tandem_client::ClientOptions {
            admin_token,
            tls,
            ..Default::default()
        })
    }
}

/// How to reach the NATS JetStream engagement stream (when `--events` is a `nats://` URL).
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// The JetStream stream of engagement events (created when missing).
    #[arg(long, env = "TANDEM_STREAM", default_value = "engagements")]
    pub stream: String,
    /// Replicas of the stream when this process creates it (3 on a 3-node NATS cluster).
    #[arg(long, env = "TANDEM_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// How long the server keeps messages when this process creates the stream (90d, 12h).
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    pub stream_max_age: std::time::Duration,
    /// Token for a NATS server with token authorization (user:password can go in the URL).
    #[arg(long, env = "TANDEM_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// CA certificate (PEM) the NATS server's certificate chains to (turns TLS on).
    #[arg(long, env = "TANDEM_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a NATS server that verifies clients.
    #[arg(long, env = "TANDEM_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    #[arg(long, env = "TANDEM_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsArgs {
    pub fn options(&self, url: &str, client_name: &str) -> tandem_stream::NatsOptions {
        tandem_stream::NatsOptions {
            stream: self.stream.clone(),
            replicas: self.stream_replicas.max(1),
            max_age: self.stream_max_age,
            token: self.nats_token.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            client_name: client_name.to_string(),
            ..tandem_stream::NatsOptions::new(url)
        }
    }
}
