//! `tandem bench …`: benchmarks that print JSON.

use std::process::Command;

use anyhow::{Context, Result};
use tandem_model::bench::{bench_train, BenchShape};

#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// Training throughput (forward + backward + optimiser step) on a fixed synthetic shape.
    Train(TrainArgs),
    /// ANN recall, QPS and latency per ef against brute force (fvecs or synthetic vectors).
    Ann(crate::cmd::bench_ann::AnnArgs),
    /// User-tower Embed latency/throughput, in-process and over gRPC, concurrency 1 and 64.
    UserTower(crate::cmd::bench_usertower::UserTowerArgs),
    /// GetCandidates latency and CPU per request at one or more offered loads, across separate
    /// service processes.
    Homefeed(crate::cmd::bench_homefeed::HomefeedArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Measure only this many threads (default: 1 and 2, each in a child process, because the
    /// thread count is fixed per process).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed steps (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = BenchShape::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = BenchShape::default().items)]
    pub items: usize,
    #[arg(long, default_value_t = BenchShape::default().users)]
    pub users: usize,
    /// Where the steps run: cpu, cuda or cuda:N (CUDA: one in-process run, no thread sweep).
    #[arg(long, default_value = "cpu")]
    pub device: tandem_model::config::TrainDevice,
    /// Then run the same steps again timing each part (prepare, gather, forward, backward,
    /// update; the device synchronised between parts), reported as `phases` in ms per step.
    #[arg(long)]
    pub profile: bool,
    /// Output is always JSON; accepted for symmetry with other commands.
    #[arg(long)]
    pub json: bool,
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Train(a) => train(a),
        Bench::Ann(a) => crate::cmd::bench_ann::run_ann(a),
        Bench::UserTower(a) => crate::cmd::bench_usertower::run(a),
        Bench::Homefeed(a) => crate::cmd::bench_homefeed::run(a),
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let shape = BenchShape {
        batch_size: a.batch_size,
        items: a.items,
        users: a.users,
        ..Default::default()
    };
    if a.device != tandem_model::config::TrainDevice::Cpu {
        let r = bench_train(&shape, a.steps, a.device, a.profile)?;
        let out = serde_json::json!({
            "bench": "train",
            "device": a.device.to_string(),
            "shape": shape,
            "result": r,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if let Some(threads) = a.threads {
        let r = bench_train(&shape, a.steps, a.device, a.profile)?;
        let out = serde_json::json!({ "threads": threads, "shape": shape, "result": r });
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the tandem binary")?;
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        let output = Command::new(&exe)
            .args([
                "bench",
                "train",
                "--threads",
                &threads.to_string(),
                "--steps",
                &a.steps.to_string(),
            ])
            .args([
                "--batch-size",
                &a.batch_size.to_string(),
                "--items",
                &a.items.to_string(),
                "--users",
                &a.users.to_string(),
            ])
            .args(a.profile.then_some("--profile"))
            .env("RAYON_NUM_THREADS", threads.to_string())
            .output()
            .context("running the benchmark child process")?;
        if !output.status.success() {
            anyhow::bail!(
                "benchmark with {threads} thread(s) failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let row: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("parsing benchmark output")?;
        rows.push(row);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "bench": "train", "runs": rows }))?
    );
    Ok(())
}
