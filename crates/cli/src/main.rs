//! `tandem`: the single entry point. Each subcommand lives in `cmd/`; this file only parses,
//! sets up logging and turns errors into one line on stderr and a non-zero exit code.

mod args;
mod cmd;
mod hyper;
mod plot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Training allocates and frees tens of megabytes of activations every step; glibc malloc returns
/// those to the OS each time (mmap/munmap and page faults: ~40 % of a step, measured with
/// `tandem bench train`). mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tandem: learned two-tower retrieval with version-safe serving.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the main job on the embedded default dataset and print a report.
    Demo(cmd::demo::Args),
    /// Initialise an empty artifact store for a cluster: event log and v1 (compose's one-shot).
    Bootstrap(cmd::bootstrap::Args),
    /// Generate the embedded default dataset (events, item and user features).
    Synth(cmd::synth::Args),
    /// Split an event log by an evaluation protocol into train and test files.
    Split(cmd::split::Args),
    /// Train a two-tower model and publish it as a new model version.
    Train(Box<cmd::train::Args>),
    /// Search hyper-parameters on a validation slice; write the best as TOML for --config.
    Tune(Box<cmd::tune::Args>),
    /// Evaluate a model (and the baselines) on a temporal split of an event log.
    Eval(cmd::eval::Args),
    /// Recommend top-K items per user as JSONL.
    Recommend(cmd::recommend::Args),
    /// Embed the catalogue with a model version and publish its HNSW index.
    Index(cmd::index::Args),
    /// Run a service.
    #[command(subcommand)]
    Serve(cmd::serve::Serve),
    /// Call a running service (typed gRPC client).
    #[command(subcommand)]
    Call(cmd::call::Call),
    /// Roll an index version across ANN hosts, one host at a time.
    Rollout(cmd::fleet::RolloutArgs),
    /// Roll ANN hosts back to their previous versions.
    Rollback(cmd::fleet::RollbackArgs),
    /// Retrain on fresh events, gate against the serving version, publish, roll out, watch.
    Retrain(Box<cmd::retrain::Args>),
    /// The retrain history (`--plot FILE.svg|png` draws it).
    History(cmd::retrain::HistoryArgs),
    /// Hosts × versions, user-tower versions, pins.
    Status(cmd::fleet::Fleet),
    /// Simulations on an in-process cluster.
    #[command(subcommand)]
    Sim(cmd::sim::Sim),
    /// Benchmarks that print JSON.
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the bad flag or value; when it ends in a colon
            // (missing arguments), the list that follows goes on the same line.
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().filter(|l| !l.trim().is_empty());
            let first = lines.next().unwrap_or("error: invalid arguments");
            let line = match first.strip_suffix(':') {
                Some(head) => {
                    let rest: Vec<&str> = lines
                        .take_while(|l| l.starts_with(' '))
                        .map(str::trim)
                        .collect();
                    format!("{head}: {}", rest.join(", "))
                }
                None => first.to_string(),
            };
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    let service = match &cli.command {
        Command::Serve(cmd::serve::Serve::Ann(_)) => "tandem-ann",
        Command::Serve(cmd::serve::Serve::UserTower(_)) => "tandem-user-tower",
        Command::Serve(cmd::serve::Serve::Homefeed(_)) => "tandem-homefeed",
        Command::Serve(cmd::serve::Serve::Dashboard(_)) => "tandem-dashboard",
        Command::Retrain(_) => "tandem-retrain",
        _ => "tandem",
    };
    // Flushes unsent spans when dropped, after the command has returned.
    let _telemetry = match tandem_telemetry::init(service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Bootstrap(a) => cmd::bootstrap::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Split(a) => cmd::split::run(a),
        Command::Train(a) => cmd::train::run(*a),
        Command::Tune(a) => cmd::tune::run(*a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Recommend(a) => cmd::recommend::run(a),
        Command::Index(a) => cmd::index::run(a),
        Command::Serve(s) => cmd::serve::run(s),
        Command::Call(c) => cmd::call::run(c),
        Command::Rollout(a) => cmd::fleet::rollout(a),
        Command::Rollback(a) => cmd::fleet::rollback(a),
        Command::Retrain(a) => cmd::retrain::run(*a),
        Command::History(a) => cmd::retrain::history(a),
        Command::Status(f) => cmd::fleet::status(f),
        Command::Sim(s) => cmd::sim::run(s),
        Command::Bench(b) => cmd::bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many errors repeat their source's
/// message in their own ("tcp connect error: tcp connect error: …").
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
