//! `tandem bench user-tower`: Embed latency and throughput in-process and over gRPC on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tandem_data::synth::{generate, SynthConfig};
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::publish::publish_model;
use tandem_model::train::{train, TrainInput};
use tandem_proto::usertower::v1 as pb;
use tandem_proto::usertower::v1::user_tower_client::UserTowerClient;
use tandem_types::ModelManifest;
use tandem_usertower::online::Event;
use tandem_usertower::service::{now_secs, EmbedInput};
use tandem_usertower::{UserTower, UserTowerConfig};

#[derive(clap::Args, Debug)]
pub struct UserTowerArgs {
    /// Embed calls per measurement.
    #[arg(long, default_value_t = 4000)]
    pub requests: usize,
    /// Output is always JSON; accepted for symmetry with other commands.
    #[arg(long)]
    pub json: bool,
}

fn summary(mut lat: Vec<f64>, wall: f64) -> serde_json::Value {
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    serde_json::json!({ "requests": lat.len(), "p50_us": p(0.5), "p99_us": p(0.99), "throughput_rps": lat.len() as f64 / wall })
}

pub fn run(a: UserTowerArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = generate(&SynthConfig {
        users: 2_000,
        items: 3_000,
        events: 60_000,
        ..Default::default()
    });
    let input = TrainInput {
        log: &data.events,
        user_features: None,
        item_features: None,
        validation: None,
    };
    let (model, _) = train(
        &input,
        &ModelConfig::default(),
        &TrainConfig {
            epochs: 1,
            ..Default::default()
        },
        false,
    )?;
    let meta = ModelManifest {
        dim: 64,
        hyperparameters: serde_json::json!({}),
        ..Default::default()
    };
    publish_model(dir.path(), "bench", None, &model, &meta)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let core = Arc::new(UserTower::open(UserTowerConfig::new(dir.path().to_path_buf(), "bench", dir.path().join("log")))?);
        core.refresh().await?;
        // Give every user a full 50-item history through the real intake path.
        let now = now_secs();
        let events: Vec<Event> = (0..data.events.len())
            .rev()
            .take(100_000)
            .map(|e| Event { user: data.events.users.name(data.events.user[e]).into(), item: data.events.items.name(data.events.item[e]).into(), ts: now, action: "view".into(), weight: 1.0 })
            .collect();
        core.record(events)?;
        let users: Arc<Vec<String>> = Arc::new((0..2_000).map(|u| format!("u{u}")).collect());
        let req = |k: usize, users: &Vec<String>| EmbedInput {
            model_name: String::new(),
            model_version: "v1".into(),
            user_id: users[k % users.len()].clone(),
            recent_items: Vec::new(),
            features: Default::default(),
            request_time: None,
        };
        let mut out = serde_json::Map::new();

        for conc in [1usize, 64] {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..conc {
                let (core, users) = (core.clone(), users.clone());
                let n = a.requests / conc;
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(n);
                    for k in 0..n {
                        let t = Instant::now();
                        core.embed(req(w * n + k, &users)).await.expect("embed");
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await?);
            }
            out.insert(format!("in_process_c{conc}"), summary(lat, start.elapsed().as_secs_f64()));
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tandem_usertower::serve(core.clone(), listener, async move {
            let _ = rx.await;
        }));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
        for conc in [1usize, 64] {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..conc {
                let mut client = UserTowerClient::new(channel.clone());
                let users = users.clone();
                let n = a.requests / conc;
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(n);
                    for k in 0..n {
                        let r = req(w * n + k, &users);
                        let t = Instant::now();
                        client
                            .embed(pb::EmbedRequest { model_name: String::new(), model_version: r.model_version, user_id: r.user_id, recent_items: vec![], features: Default::default(), request_time_unix: None })
                            .await
                            .expect("embed");
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await?);
            }
            out.insert(format!("grpc_c{conc}"), summary(lat, start.elapsed().as_secs_f64()));
        }
        let _ = tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "bench": "user-tower", "history": 50, "dim": 64, "results": out }))?);
        anyhow::Ok(())
    })
}
