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
