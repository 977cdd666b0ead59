//! `tandem demo`: the main job on the embedded default dataset — synthesise, split, train,
//! publish, evaluate against the baselines and print a short report. Needs nothing outside the
//! binary.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use tandem_data::synth::{generate, SynthConfig};
use tandem_data::table::write_strings;
use tandem_data::{FeatureTable, Protocol, Split};
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::eval::{metrics, EvalSet, ItemCosine, ModelRanker, MostPopular, Recommender};
use tandem_model::publish::{feature_schema_hash, publish_model};
use tandem_model::train::{train, TrainInput};
use tandem_types::ModelManifest;

use crate::args::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Working directory for the data and the artifact store.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    #[arg(long, default_value_t = SynthConfig::default().seed)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let started = Instant::now();
    let say = |msg: &str| {
        if !a.json {
            eprintln!("[{:>5.1}s] {msg}", started.elapsed().as_secs_f64());
        }
    };
    let cfg = SynthConfig {
        seed: a.seed,
        ..Default::default()
    };
    say(&format!(
        "synthesising {} users, {} items, {} events",
        cfg.users, cfg.items, cfg.events
    ));
    let data = generate(&cfg);
    let data_dir = a.out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let items_path = data_dir.join("items.csv.gz");
    let users_path = data_dir.join("users.csv.gz");
    data.events
        .write(&data_dir.join("events.csv.gz"), None, false)?;
    write_strings(&items_path, &data.item_headers, &data.items)?;
    write_strings(&users_path, &data.user_headers, &data.users)?;
    let item_features = FeatureTable::read(&items_path, "item_id", None)?;
    let user_features = FeatureTable::read(&users_path, "user_id", None)?;

    let split = Split::new(&data.events, Protocol::User);
    let train_log = data.events.subset(&split.train);
    say(&format!(
        "training on {} events (each user's last 20 % held out for the report)",
        train_log.len()
    ));
    let model_cfg = ModelConfig::default();
    let train_cfg = TrainConfig {
        epochs: 10,
        ..Default::default()
    };
    let input = TrainInput {
        log: &train_log,
        user_features: Some(&user_features),
        item_features: Some(&item_features),
        validation: Some(Protocol::User),
    };
    let (model, report) = train(&input, &model_cfg, &train_cfg, !a.json)?;
    let meta = ModelManifest {
        dim: model_cfg.dim,
        feature_schema_hash: feature_schema_hash(&model),
        data: train_log.data_range(),
        hyperparameters: serde_json::json!({ "model": model_cfg, "train": train_cfg, "synth": cfg }),
        validation: report.validation.clone(),
        train_seconds: report.seconds,
    };
    let published = publish_model(&a.out.join("artifacts"), "tandem", None, &model, &meta)?;
    say(&format!(
        "published {} at {}",
        published.version,
        published.dir.display()
    ));

    let set = EvalSet::new(&data.events, &split);
    let rankers: Vec<Box<dyn Recommender>> = vec![
        Box::new(ModelRanker {
            model: &model,
            log: &data.events,
            items: None,
        }),
        Box::new(MostPopular),
        Box::new(ItemCosine::default()),
    ];
    let mut results = serde_json::Map::new();
    for r in &rankers {
        let m = metrics(&set, &r.recommend(&set, 100)?);
        results.insert(r.name(), serde_json::to_value(&m.values)?);
    }
    let out = serde_json::json!({
        "version": published.version,
        "model_dir": published.dir,
        "train_events": train_log.len(),
        "test_users": set.users.len(),
        "best_epoch": report.best_epoch,
        "train_seconds": report.seconds,
        "results": results,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        return print_json(&out);
    }
    println!(
        "\nTandem demo — model {} on the embedded synthetic dataset",
        published.version
    );
    println!(
        "{:<14}{:>12}{:>12}{:>12}{:>14}",
        "", "recall@10", "recall@50", "ndcg@10", "coverage@10"
    );
    for (name, m) in &results {
        println!(
            "{name:<14}{:>12.4}{:>12.4}{:>12.4}{:>14.4}",
            m["recall@10"].as_f64().unwrap_or(0.0),
            m["recall@50"].as_f64().unwrap_or(0.0),
            m["ndcg@10"].as_f64().unwrap_or(0.0),
            m["coverage@10"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "trained in {:.1}s ({} epochs); total {:.1}s",
        report.seconds,
        report.epochs.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
