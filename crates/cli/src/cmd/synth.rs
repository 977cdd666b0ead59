//! `tandem synth`: writes the embedded default dataset.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tandem_data::synth::{generate, SynthConfig};
use tandem_data::table::{write_strings, Format};

use crate::args::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory (created if missing): events, items and users files.
    #[arg(long, default_value = "data")]
    pub out: PathBuf,
    #[arg(long, default_value_t = SynthConfig::default().users)]
    pub users: usize,
    #[arg(long, default_value_t = SynthConfig::default().items)]
    pub items: usize,
    #[arg(long, default_value_t = SynthConfig::default().events)]
    pub events: usize,
    /// Latent interest topics.
    #[arg(long, default_value_t = SynthConfig::default().topics)]
    pub topics: usize,
    /// Days covered by the log.
    #[arg(long, default_value_t = SynthConfig::default().days)]
    pub days: u32,
    /// Fraction of user interest drifted to new topics by the end of the log.
    #[arg(long, default_value_t = SynthConfig::default().drift)]
    pub drift: f64,
    /// Probability that an event repeats one of the user's own past items (grocery-like).
    #[arg(long, default_value_t = SynthConfig::default().repeat)]
    pub repeat: f64,
    #[arg(long, default_value_t = SynthConfig::default().seed)]
    pub seed: u64,
    /// csv, csv.gz or parquet.
    #[arg(long, default_value = "csv.gz")]
    pub format: Format,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.users == 0 || a.items == 0 || a.events == 0 {
        anyhow::bail!("--users, --items and --events must be positive");
    }
    let started = Instant::now();
    let cfg = SynthConfig {
        users: a.users,
        items: a.items,
        events: a.events,
        topics: a.topics,
        days: a.days,
        drift: a.drift,
        repeat: a.repeat,
        seed: a.seed,
        ..Default::default()
    };
    let data = generate(&cfg);
    let generated = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let ext = a.format.extension();
    let events = a.out.join(format!("events.{ext}"));
    let items = a.out.join(format!("items.{ext}"));
    let users = a.out.join(format!("users.{ext}"));
    // Each file is written under a temporary name and renamed, so a reader never sees half a file.
    write_then_rename(&events, |p| Ok(data.events.write(p, None, false)?))?;
    write_then_rename(&items, |p| {
        Ok(write_strings(p, &data.item_headers, &data.items)?)
    })?;
    write_then_rename(&users, |p| {
        Ok(write_strings(p, &data.user_headers, &data.users)?)
    })?;
    let summary = serde_json::json!({
        "out": a.out,
        "events": data.events.len(),
        "users": a.users,
        "items": a.items,
        "files": { "events": events, "items": items, "users": users },
        "config": cfg,
        "generate_seconds": generated,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        print_json(&summary)?;
    } else {
        println!(
            "wrote {} events, {} users, {} items to {} in {:.1}s",
            data.events.len(),
            a.users,
            a.items,
            a.out.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn write_then_rename(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    // The temporary name keeps the extension: it selects the format.
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}
