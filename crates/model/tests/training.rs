//! End-to-end checks of the training pipeline on small synthetic data.

use candle_core::Tensor;
use tandem_data::synth::{generate, SynthConfig};
use tandem_data::Protocol;
use tandem_model::config::{LogQ, ModelConfig, TrainConfig};
use tandem_model::eval::{metrics, EvalSet, ModelRanker, MostPopular, Recommender};
use tandem_model::publish::publish_model;
use tandem_model::train::{train, TrainInput};
use tandem_model::{TwoTower, UserRequest};
use tandem_types::{ModelManifest, ModelVersion};

fn small() -> tandem_data::synth::SynthData {
    generate(&SynthConfig {
        users: 300,
        items: 400,
        events: 20_000,
        topics: 8,
        seed: 5,
        ..Default::default()
    })
}

/// Training input of every event, no validation slice, no side features.
fn unvalidated(data: &tandem_data::synth::SynthData) -> TrainInput<'_> {
    TrainInput {
        log: &data.events,
        user_features: None,
        item_features: None,
        validation: None,
    }
}

fn configs() -> (ModelConfig, TrainConfig) {
    (
        ModelConfig {
            dim: 16,
            id_dim: 16,
            feature_dim: 4,
            hidden: 32,
            history: 10,
            ..Default::default()
        },
        TrainConfig {
            epochs: 3,
            batch_size: 256,
            lr: 5e-3,
            patience: 5,
            ..Default::default()
        },
    )
}

fn weights_hash(model: &TwoTower) -> String {
    let dir = tempfile::tempdir().unwrap();
    model.write_payload(dir.path()).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut all = Vec::new();
    for f in files {
        all.extend(std::fs::read(f).unwrap());
    }
    tandem_artifact::sha256_hex(&all)
}

#[test]
fn the_same_seed_gives_the_same_weights_and_another_seed_does_not() {
    let data = small();
    let input = TrainInput {
        log: &data.events,
        user_features: None,
        item_features: None,
        validation: Some(Protocol::User),
    };
    let (mcfg, tcfg) = configs();
    let (a, _) = train(&input, &mcfg, &tcfg, false).unwrap();
    let (b, _) = train(&input, &mcfg, &tcfg, false).unwrap();
    assert_eq!(weights_hash(&a), weights_hash(&b));
    let (c, _) = train(&input, &mcfg, &TrainConfig { seed: 99, ..tcfg }, false).unwrap();
    assert_ne!(weights_hash(&a), weights_hash(&c));
}

#[test]
fn a_trained_model_beats_popularity_on_structured_synthetic_data() {
    let data = small();
    let split = tandem_data::Split::new(&data.events, Protocol::User);
    let train_log = data.events.subset(&split.train);
    let input = TrainInput {
        log: &train_log,
        user_features: None,
        item_features: None,
        validation: Some(Protocol::User),
    };
    let (mcfg, tcfg) = configs();
    let (model, report) = train(&input, &mcfg, &TrainConfig { epochs: 20, ..tcfg }, false).unwrap();
    assert!(report.epochs.iter().all(|e| e.loss.is_finite()));
    let set = EvalSet::new(&data.events, &split);
    let ranker = ModelRanker {
        model: &model,
        log: &data.events,
        items: None,
    };
    let ours = metrics(&set, &ranker.recommend(&set, 50).unwrap()).values["recall@50"];
    let pop = metrics(&set, &MostPopular.recommend(&set, 50).unwrap()).values["recall@50"];
    assert!(
        ours > pop,
        "two-tower recall@50 {ours:.4} vs popularity {pop:.4}"
    );
}

#[test]
fn every_logq_estimator_trains_to_finite_losses() {
    let data = small();
    let input = unvalidated(&data);
    let (mcfg, tcfg) = configs();
    for logq in [LogQ::Off, LogQ::Exact, LogQ::Cms, LogQ::Yi] {
        let tcfg = TrainConfig {
            epochs: 1,
            logq,
            uniform_negatives: 64,
            learn_temperature: true,
            ..tcfg.clone()
        };
        let (_, report) = train(&input, &mcfg, &tcfg, false).unwrap();
        assert!(report.epochs[0].loss.is_finite(), "{logq:?}");
    }
}

#[test]
fn a_published_model_reloads_to_identical_embeddings_and_refuses_a_flipped_byte() {
    let data = small();
    let dir = tempfile::tempdir().unwrap();
    let items_path = dir.path().join("items.csv");
    tandem_data::table::write_strings(&items_path, &data.item_headers, &data.items).unwrap();
    let features = tandem_data::FeatureTable::read(&items_path, "item_id", None).unwrap();
    let input = TrainInput {
        log: &data.events,
        user_features: None,
        item_features: Some(&features),
        validation: None,
    };
    let (mcfg, tcfg) = configs();
    let (model, _) = train(&input, &mcfg, &TrainConfig { epochs: 1, ..tcfg }, false).unwrap();
    let meta = ModelManifest {
        dim: mcfg.dim,
        hyperparameters: serde_json::json!({}),
        ..Default::default()
    };
    let published = publish_model(dir.path(), "m", None, &model, &meta).unwrap();
    assert_eq!(published.version, ModelVersion(1));
    let loaded = TwoTower::load(&published.dir).unwrap();

    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(
        diff(
            &model.item.embed_all().unwrap(),
            &loaded.item.embed_all().unwrap()
        ),
        0.0
    );
    let req = |m: &TwoTower| UserRequest {
        user: "u3",
        history: vec![m.user.item_id("i7"), m.user.item_id("i9")],
        ts: 1_704_100_000,
        features: None,
        ..Default::default()
    };
    let a = model.user.embed_requests(&[req(&model)]).unwrap();
    let b = loaded.user.embed_requests(&[req(&loaded)]).unwrap();
    assert_eq!(diff(&a, &b), 0.0);

    let files: Vec<String> = std::fs::read_dir(&published.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(files.len() >= 6, "{files:?}");
    for file in files
        .iter()
        .filter(|f| f.as_str() != tandem_artifact::MANIFEST_CHECKSUM_FILE)
    {
        let path = published.dir.join(file);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let err = match TwoTower::load(&published.dir) {
            Ok(_) => panic!("{file}: corrupted model loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(file.as_str()), "{file}: {err}");
        std::fs::write(&path, &original).unwrap();
    }
    assert!(TwoTower::load(&published.dir).is_ok());
}

#[test]
fn unknown_users_and_items_embed_without_error() {
    let data = small();
    let input = unvalidated(&data);
    let (mcfg, tcfg) = configs();
    let (model, _) = train(&input, &mcfg, &TrainConfig { epochs: 1, ..tcfg }, false).unwrap();
    let req = UserRequest {
        user: "never-seen",
        history: vec![model.user.item_id("no-such-item")],
        ts: 0,
        features: None,
        ..Default::default()
    };
    let e = model
        .user
        .embed_requests(&[req])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let norm: f32 = e[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "embeddings are L2-normalised, got {norm}"
    );
}

/// The serving forward (fused, no candle graph) gives the offline model's embeddings: every
/// part of the input (user id, long-history summary, empty and unknown histories) within 1e-6.
#[test]
fn the_fused_serving_forward_matches_the_candle_forward() {
    let data = small();
    let input = unvalidated(&data);
    let (mcfg, tcfg) = configs();
    for cfg in [
        mcfg.clone(),
        ModelConfig {
            use_user_id: true,
            long_history: 6,
            ..mcfg.clone()
        },
    ] {
        let (model, _) = train(
            &input,
            &cfg,
            &TrainConfig {
                epochs: 1,
                ..tcfg.clone()
            },
            false,
        )
        .unwrap();
        let m = &model.user;
        let long: Vec<u32> = (1..40).map(|i| m.item_id(&format!("i{i}"))).collect();
        let reqs = [
            UserRequest {
                user: "u3",
                history: vec![m.item_id("i7"), m.item_id("i9")],
                ts: 1_704_100_000,
                ..Default::default()
            },
            UserRequest {
                user: "u5",
                history: long,
                ts: 1_704_200_000,
                ..Default::default()
            },
            UserRequest {
                user: "never-seen",
                history: vec![],
                ts: 0,
                ..Default::default()
            },
        ];
        let want = m
            .embed_requests(&reqs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = m.embed_vectors(&reqs).unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "{cfg:?}: fused and candle differ by {worst}");
        // One at a time, as the service asks.
        for (k, r) in reqs.iter().enumerate() {
            let one = m.embed_vectors(std::slice::from_ref(r)).unwrap();
            let d = want.len() / reqs.len();
            assert_eq!(one, got[k * d..(k + 1) * d], "request {k}");
        }
    }
}
