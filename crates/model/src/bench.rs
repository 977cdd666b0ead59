//! `tandem bench train`: training steps per second on a fixed synthetic shape, kept apart from
//! the training loop so the loop's file holds training only.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{ModelConfig, TrainConfig, TrainDevice};
use crate::encode::EntityVocab;
use crate::train::{Example, Sequences, StepPhases, Trainer};
use crate::Result;

/// The fixed synthetic shape of `tandem bench train`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchShape {
    pub users: usize,
    pub items: usize,
    pub history: usize,
    pub batch_size: usize,
    pub dim: usize,
    pub hidden: usize,
}

impl Default for BenchShape {
    fn default() -> Self {
        BenchShape {
            users: 20_000,
            items: 100_000,
            history: 50,
            batch_size: 1024,
            dim: 64,
            hidden: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Trainable values: embedding tables, dense layers and the temperature.
    pub parameters: usize,
    pub steps: usize,
    pub examples_per_sec: f64,
    pub ms_per_step: f64,
    /// With profiling: milliseconds per step in each part, from a second pass over the same
    /// batches with the device synchronised between parts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<StepPhases>,
}

/// Times `steps` training steps (after 3 warm-up steps) on random full-length histories; with
/// `profile`, then steps through the same batches again timing each part of a step.
pub fn bench_train(
    shape: &BenchShape,
    steps: usize,
    device: TrainDevice,
    profile: bool,
) -> Result<BenchResult> {
    let cfg = ModelConfig {
        dim: shape.dim,
        id_dim: shape.dim,
        hidden: shape.hidden,
        history: shape.history,
        ..Default::default()
    };
    let tcfg = TrainConfig {
        batch_size: shape.batch_size,
        device,
        ..Default::default()
    };
    let user_ids: Vec<String> = (0..shape.users).map(|u| format!("u{u}")).collect();
    let item_ids: Vec<String> = (0..shape.items).map(|i| format!("i{i}")).collect();
    let users = EntityVocab::build(user_ids.iter().map(String::as_str), None, cfg.max_multi);
    let items = EntityVocab::build(item_ids.iter().map(String::as_str), None, cfg.max_multi);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let seq_len = shape.history + 10;
    let seqs: Sequences = (0..shape.users)
        .map(|_| {
            (0..seq_len)
                .map(|t| (rng.random_range(1..shape.items as u32 + 1), t as i64, 1.0))
                .collect()
        })
        .collect();
    let user_vid: Vec<u32> = (1..=shape.users as u32).collect();
    let mut t = Trainer::new(&cfg, &tcfg, users, items)?;
    let mut batch = || -> Vec<Example> {
        (0..shape.batch_size)
            .map(|_| {
                (
                    rng.random_range(0..shape.users as u32),
                    rng.random_range(shape.history as u32..seq_len as u32),
                )
            })
            .collect()
    };
    let batches: Vec<Vec<Example>> = (0..steps + 3).map(|_| batch()).collect();
    // Through `run_steps`, as training runs them (on a GPU, batches prepared ahead).
    let run = |t: &mut Trainer, batches: &[Vec<Example>]| {
        t.run_steps(
            batches.iter().map(Vec::as_slice),
            &seqs,
            &user_vid,
            |_, _| Ok(()),
        )
    };
    run(&mut t, &batches[..3])?;
    // Steps queue work on a GPU without waiting for it: time from an idle device to the end of
    // the last step's work.
    t.dev.synchronize()?;
    let started = Instant::now();
    run(&mut t, &batches[3..])?;
    t.dev.synchronize()?;
    let secs = started.elapsed().as_secs_f64();
    let phases = if profile {
        t.profile = Some(StepPhases::default());
        run(&mut t, &batches[3..])?;
        t.profile.take().map(|p| p.per_step())
    } else {
        None
    };
    Ok(BenchResult {
        parameters: t.parameters(),
        steps,
        examples_per_sec: (steps * shape.batch_size) as f64 / secs,
        ms_per_step: secs * 1000.0 / steps.max(1) as f64,
        phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profiled_bench_reports_every_part_of_its_steps() {
        let shape = BenchShape {
            users: 300,
            items: 2_000,
            history: 8,
            batch_size: 64,
            dim: 8,
            hidden: 16,
        };
        let r = bench_train(&shape, 3, TrainDevice::Cpu, true).unwrap();
        assert!(r.examples_per_sec > 0.0 && r.parameters > 0);
        let p = r.phases.expect("phases when profiling");
        assert_eq!(p.steps, 3);
        let parts = [
            p.prepare_ms,
            p.gather_ms,
            p.forward_ms,
            p.backward_ms,
            p.update_ms,
        ];
        assert!(parts.iter().all(|&ms| ms >= 0.0), "{p:?}");
        assert!(p.forward_ms > 0.0 && p.backward_ms > 0.0, "{p:?}");
        assert!(bench_train(&shape, 1, TrainDevice::Cpu, false)
            .unwrap()
            .phases
            .is_none());
    }
}
