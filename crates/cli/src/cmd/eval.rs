//! `tandem eval`: splits the events it is given, and scores the model and the baselines on the
//! same split.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use tandem_data::{Protocol, Split};
use tandem_model::ease::Ease;
use tandem_model::eval::{metrics, EvalSet, ItemCosine, ModelRanker, MostPopular, Recommender};
use tandem_model::TwoTower;

use crate::args::{model_dir, print_json, EventArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub events: EventArgs,
    /// user (each user's last 20 %) or global (last 10 % of all events).
    #[arg(long, default_value = "user")]
    pub protocol: Protocol,
    /// Model version directory to evaluate (e.g. artifacts/models/tandem/v1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Skip the baselines (most popular, item-item cosine, EASE).
    #[arg(long)]
    pub no_baselines: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let model = a
        .model
        .as_deref()
        .map(|p| model_dir(p).and_then(|p| Ok(TwoTower::load(p)?)))
        .transpose()?;
    let log = a.events.read()?;
    let split = Split::new(&log, a.protocol);
    let set = EvalSet::new(&log, &split);
    if set.users.is_empty() {
        anyhow::bail!(
            "{}: the {:?} split leaves no test user with unseen items",
            a.events.events.display(),
            a.protocol
        );
    }
    let mut rankers: Vec<Box<dyn Recommender + '_>> = Vec::new();
    if let Some(m) = &model {
        rankers.push(Box::new(ModelRanker {
            model: m,
            log: &log,
            items: None,
        }));
    }
    if !a.no_baselines {
        rankers.push(Box::new(MostPopular));
        rankers.push(Box::new(ItemCosine::default()));
        if set.train_items() <= tandem_model::ease::MAX_ITEMS {
            rankers.push(Box::new(Ease::default()));
        } else {
            eprintln!(
                "EASE skipped: {} train items (a dense inverse above {} items would not fit)",
                set.train_items(),
                tandem_model::ease::MAX_ITEMS
            );
        }
    }
    if rankers.is_empty() {
        anyhow::bail!("nothing to evaluate: give --model or drop --no-baselines");
    }
    let mut rows = Vec::new();
    for r in &rankers {
        let started = Instant::now();
        let lists = r.recommend(&set, 100)?;
        let m = metrics(&set, &lists);
        rows.push(serde_json::json!({
            "name": r.name(),
            "users": m.users,
            "metrics": m.values,
            "seconds": started.elapsed().as_secs_f64(),
        }));
    }
    let out = serde_json::json!({
        "events": log.len(),
        "protocol": a.protocol,
        "train_events": split.train.len(),
        "test_events": split.test.len(),
        "test_users": set.users.len(),
        "results": rows,
    });
    if a.json {
        return print_json(&out);
    }
    println!(
        "{} events, protocol {:?}: {} train / {} test events, {} test users",
        log.len(),
        a.protocol,
        split.train.len(),
        split.test.len(),
        set.users.len()
    );
    let cols = [
        "recall@10",
        "recall@50",
        "recall@100",
        "ndcg@10",
        "hr@10",
        "coverage@10",
        "pop-pct@10",
    ];
    println!(
        "{:<14}{}",
        "",
        cols.iter().map(|c| format!("{c:>12}")).collect::<String>()
    );
    for row in &rows {
        let vals: String = cols
            .iter()
            .map(|c| format!("{:>12.4}", row["metrics"][c].as_f64().unwrap_or(f64::NAN)))
            .collect();
        println!("{:<14}{vals}", row["name"].as_str().unwrap_or(""));
    }
    Ok(())
}
