//! `tandem split`: applies an evaluation protocol and writes both sides.

use std::path::PathBuf;

use anyhow::Result;
use tandem_data::{Protocol, Split};

use crate::args::{print_json, EventArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub events: EventArgs,
    /// user (each user's last 20 %) or global (last 10 % of all events).
    #[arg(long, default_value = "user")]
    pub protocol: Protocol,
    /// Where to write the train side (format by extension).
    #[arg(long)]
    pub train_out: PathBuf,
    /// Where to write the test side.
    #[arg(long)]
    pub test_out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let log = a.events.read()?;
    let split = Split::new(&log, a.protocol);
    let weighted = a.events.weight_col.is_some();
    log.write(&a.train_out, Some(&split.train), weighted)?;
    log.write(&a.test_out, Some(&split.test), weighted)?;
    let summary = serde_json::json!({
        "protocol": a.protocol,
        "events": log.len(),
        "train": split.train.len(),
        "test": split.test.len(),
        "test_users": split.ground_truth(&log).len(),
    });
    if a.json {
        print_json(&summary)?;
    } else {
        println!(
            "{} train events → {}, {} test events → {}",
            split.train.len(),
            a.train_out.display(),
            split.test.len(),
            a.test_out.display()
        );
    }
    Ok(())
}
