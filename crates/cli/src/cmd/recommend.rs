//! `tandem recommend`: top-K per user as JSONL, `{"user_id": "...", "items": [...]}` — the
//! contract an external evaluator uses.

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use tandem_data::EventColumns;
use tandem_data::EventLog;
use tandem_model::eval::top_k;
use tandem_model::{TwoTower, UserRequest};

use crate::args::model_dir;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model version directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Events that make up each user's history (all of a user's events count).
    #[arg(long)]
    pub history: PathBuf,
    #[arg(long, default_value = "user_id")]
    pub user_col: String,
    #[arg(long, default_value = "item_id")]
    pub item_col: String,
    #[arg(long, default_value = "timestamp")]
    pub timestamp_col: String,
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Users to recommend for, one id per line (default: every user in --history).
    #[arg(long)]
    pub users: Option<PathBuf>,
    /// Leave out items already in the user's history.
    #[arg(long)]
    pub exclude_seen: bool,
    /// Write JSONL here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if a.k == 0 {
        anyhow::bail!("--k must be positive");
    }
    let model = TwoTower::load(model_dir(&a.model)?)?;
    let cols = EventColumns {
        user: a.user_col.clone(),
        item: a.item_col.clone(),
        timestamp: a.timestamp_col.clone(),
        weight: None,
    };
    let log = EventLog::read(&a.history, &cols)?;
    let users: Vec<String> = match &a.users {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| path.display().to_string())?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != a.user_col)
            .map(String::from)
            .collect(),
        None => log.users.names().to_vec(),
    };
    // Per log user: model item ids, time order, and the last timestamp.
    let history = model.user.histories(&log);
    let latest = log.ts.iter().copied().max().unwrap_or(0);
    let items = model.item.embed_all()?;
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(BufWriter::new(
            std::fs::File::create(p).with_context(|| p.display().to_string())?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    for chunk in users.chunks(256) {
        let reqs: Vec<UserRequest> = chunk
            .iter()
            .map(|u| {
                // Unknown users get a cold-start embedding from their stored profile, if any.
                match log.users.get(u) {
                    Some(lu) => model.user.request_of(&history, u, lu as usize),
                    None => UserRequest {
                        user: u,
                        ts: latest,
                        ..Default::default()
                    },
                }
            })
            .collect();
        let scores = model
            .user
            .embed_requests(&reqs)?
            .matmul(&items.t()?)?
            .to_vec2::<f32>()?;
        for (req, row) in reqs.iter().zip(scores) {
            let seen: HashSet<u32> = if a.exclude_seen {
                req.history.iter().copied().collect()
            } else {
                HashSet::new()
            };
            let top = top_k(&row, a.k, |m| m == 0 || seen.contains(&(m as u32)));
            let items: Vec<&str> = top
                .iter()
                .map(|&m| model.item.items.ids[m].as_str())
                .collect();
            serde_json::to_writer(
                &mut out,
                &serde_json::json!({ "user_id": req.user, "items": items }),
            )?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}
