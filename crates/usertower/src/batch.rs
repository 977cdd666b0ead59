//! Micro-batching of Embed calls (off by default): concurrent requests for the same loaded
//! version are gathered by one task and embedded with a single batched forward.
//!
//! A batch opens with the oldest waiting request and takes whatever else is queued for the same
//! version, up to `max` (requests for other versions keep their order for the next batches);
//! with a positive `wait` it keeps yielding to the runtime (so connections can decode more
//! requests) until `wait` has passed since it opened or it is full. Tokio's timer ticks in
//! milliseconds, too coarse for a sub-millisecond bound, hence the yield loop: the wait costs
//! CPU while a batch is open. `tandem bench homefeed --embed-batch-max N --embed-batch-wait-us
//! U` measures it against the one-request forward.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_model::UserRequest;
use tandem_telemetry::catalogue::UT_EMBED_BATCHES;
use tandem_telemetry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::service::Loaded;

/// How Embed calls are batched; `max` ≤ 1 turns batching off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedBatching {
    pub max: usize,
    pub wait: Duration,
}

impl Default for EmbedBatching {
    fn default() -> Self {
        EmbedBatching {
            max: 1,
            wait: Duration::ZERO,
        }
    }
}

impl EmbedBatching {
    pub fn enabled(&self) -> bool {
        self.max > 1
    }
}

/// One request's model input, owned so it can wait in the queue.
pub(crate) struct Job {
    pub loaded: Arc<Loaded>,
    pub user: String,
    pub history: Vec<u32>,
    pub history_ts: Vec<i64>,
    pub ts: i64,
    pub features: HashMap<String, String>,
}

type Reply = oneshot::Sender<Result<Vec<f32>, String>>;

/// The queue in front of the batching task.
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<(Job, Reply)>,
}

impl Batcher {
    /// Starts the batching task on the current runtime (it ends when the batcher is dropped);
    /// each batch counts in `metrics`.
    pub fn start(cfg: EmbedBatching, metrics: Arc<Registry>) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, cfg, metrics));
        Batcher { tx }
    }

    /// The embedding of `job`, computed in some batch.
    pub async fn embed(&self, job: Job) -> Result<Vec<f32>, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((job, reply))
            .map_err(|_| "the embed batcher stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the embed batcher dropped the request".to_string())?
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<(Job, Reply)>,
    cfg: EmbedBatching,
    metrics: Arc<Registry>,
) {
    let max = cfg.max.max(1);
    // Requests for another version than the open batch's wait here, in arrival order, for the
    // next batches (which take them before anything newer).
    let mut held: VecDeque<(Job, Reply)> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let opened = Instant::now();
        let mut batch = vec![first];
        let same = |j: &(Job, Reply), b: &[(Job, Reply)]| Arc::ptr_eq(&j.0.loaded, &b[0].0.loaded);
        let mut k = 0;
        while k < held.len() && batch.len() < max {
            if same(&held[k], &batch) {
                batch.extend(held.remove(k));
            } else {
                k += 1;
            }
        }
        loop {
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(j) if same(&j, &batch) => batch.push(j),
                    Ok(j) => held.push_back(j),
                    Err(_) => break,
                }
            }
            if batch.len() >= max || opened.elapsed() >= cfg.wait {
                break;
            }
            tokio::task::yield_now().await;
        }
        metrics.inc(&UT_EMBED_BATCHES, &[]);
        forward(batch).await;
    }
}

/// Embeds `jobs` (all for one loaded version) with one forward, rows in the jobs' order. The
/// mean and attention encoders take ~0.1 ms for one user and run inline; the transformer runs on
/// the blocking pool so the async workers keep serving.
pub(crate) async fn embed_jobs(mut jobs: Vec<Job>) -> Result<Vec<f32>, String> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let loaded = first.loaded.clone();
    let cheap = loaded.model.cfg.user_encoder != tandem_model::config::UserEncoder::Transformer;
    tandem_server::run_cpu(cheap, move || {
        let reqs: Vec<UserRequest> = jobs.iter_mut().map(Job::request).collect();
        loaded.model.embed_vectors(&reqs).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

impl Job {
    /// The model's request for this job (its history moves into it).
    fn request(&mut self) -> UserRequest<'_> {
        let Job {
            user,
            history,
            history_ts,
            ts,
            features,
            ..
        } = self;
        let features: &HashMap<String, String> = features;
        UserRequest {
            user: user.as_str(),
            history: std::mem::take(history),
            history_ts: std::mem::take(history_ts),
            ts: *ts,
            features: (!features.is_empty()).then_some(features),
        }
    }
}

/// One batched forward; every request gets its row (or the shared error).
async fn forward(batch: Vec<(Job, Reply)>) {
    let (jobs, replies): (Vec<Job>, Vec<Reply>) = batch.into_iter().unzip();
    match embed_jobs(jobs).await {
        Ok(rows) => {
            let dim = rows.len() / replies.len().max(1);
            for (reply, row) in replies.into_iter().zip(rows.chunks(dim.max(1))) {
                let _ = reply.send(Ok(row.to_vec()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
