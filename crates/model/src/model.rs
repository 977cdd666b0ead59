//! Trained towers ready for inference, and their on-disk form.
//!
//! A model version directory holds the two towers as separate files so each service loads only
//! its own side: `user_tower.safetensors` + `user_vocab.json` (the user-tower service) and
//! `item_tower.safetensors` + `item_vocab.json` (the indexer), plus `config.json`. The item-id
//! table is written twice — as the item tower's id embedding and as the user tower's history
//! embedding — because the user-tower service must not need the item tower to embed a history.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use tandem_artifact::Manifest;
use tandem_types::ModelManifest;

use crate::config::{ModelConfig, UserEncoder};
use crate::encode::EntityVocab;
use crate::params::Table;
use crate::sequence::{gap_bucket, Block, LayerNorm, SeqEncoder};
use crate::towers::{
    context, ItemInput, ItemTables, ItemTower, Linear, Mlp, UserInput, UserTables, UserTower,
};
use crate::{ModelError, Result};

pub const USER_TOWER_FILE: &str = "user_tower.safetensors";
pub const ITEM_TOWER_FILE: &str = "item_tower.safetensors";
pub const USER_VOCAB_FILE: &str = "user_vocab.json";
pub const ITEM_VOCAB_FILE: &str = "item_vocab.json";
pub const CONFIG_FILE: &str = "config.json";

/// Everything the user tower needs at request time.
pub struct UserModel {
    pub cfg: ModelConfig,
    pub users: EntityVocab,
    /// Item ids known to this version (index = history embedding row; 0 is out-of-vocabulary).
    pub items: Vec<String>,
    item_index: HashMap<String, u32>,
    pub tower: UserTower,
    pub id_emb: Tensor,
    pub feat_emb: Tensor,
    pub history_emb: Tensor,
    pub temperature: f32,
    /// The candle-free forward for serving, made on first use (see [`crate::fused`]).
    fused: std::sync::OnceLock<Option<crate::fused::FusedUser>>,
}

/// Everything needed to embed catalogue items.
pub struct ItemModel {
    pub cfg: ModelConfig,
    pub items: EntityVocab,
    pub tower: ItemTower,
    pub id_emb: Tensor,
    pub feat_emb: Tensor,
}

pub struct TwoTower {
    pub user: UserModel,
    pub item: ItemModel,
}

/// One user-embedding request: history as item ids of this version, most recent first.
#[derive(Debug, Clone, Default)]
pub struct UserRequest<'a> {
    pub user: &'a str,
    pub history: Vec<u32>,
    /// When each history item was engaged with (unix seconds, aligned with `history`); empty
    /// when unknown. The transformer encoder reads the gaps between events.
    pub history_ts: Vec<i64>,
    /// Request time (unix seconds) for the time context.
    pub ts: i64,
    /// Raw profile features overriding the stored profile (cold start from request features).
    pub features: Option<&'a HashMap<String, String>>,
}

/// Every user's history in a log (see [`UserModel::histories`]).
pub struct Histories {
    pub items: Vec<Vec<u32>>,
    pub times: Vec<Vec<i64>>,
}

#[derive(Serialize, Deserialize)]
struct UserVocabFile {
    users: EntityVocab,
    items: Vec<String>,
}

/// Appends the first `n` distinct non-zero ids of `ids` to `out`, padded with 0 to `n`
/// (`scratch` is working space, left empty).
pub(crate) fn push_distinct(
    out: &mut Vec<u32>,
    ids: impl Iterator<Item = u32>,
    n: usize,
    scratch: &mut std::collections::HashSet<u32>,
) {
    let start = out.len();
    for i in ids {
        if out.len() - start == n {
            break;
        }
        if i != 0 && scratch.insert(i) {
            out.push(i);
        }
    }
    scratch.clear();
    out.resize(start + n, 0);
}

/// Appends the transformer's window of one request: its last `l` known items oldest first,
/// left-padded with 0, and their gap buckets (from `history_ts` when given).
fn push_window(seq: &mut Vec<u32>, gaps: &mut Vec<u32>, r: &UserRequest, l: usize) {
    let known: Vec<(u32, Option<i64>)> = r
        .history
        .iter()
        .enumerate()
        .filter(|(_, &i)| i != 0)
        .map(|(k, &i)| (i, r.history_ts.get(k).copied()))
        .collect();
    let n = known.len().min(l);
    // `known` is most recent first: its first n are the window, the (n+1)-th precedes it.
    let window: Vec<(u32, Option<i64>)> = known[..n].iter().rev().copied().collect();
    let before = known.get(n).and_then(|e| e.1);
    seq.extend(std::iter::repeat_n(0, l - n));
    gaps.extend(std::iter::repeat_n(0, l - n));
    for (k, &(item, ts)) in window.iter().enumerate() {
        seq.push(item);
        let prev = if k == 0 { before } else { window[k - 1].1 };
        gaps.push(match (ts, prev) {
            (Some(t), Some(p)) => gap_bucket(Some(t - p)),
            _ => gap_bucket(None),
        });
    }
}

impl UserModel {
    pub fn new(
        cfg: ModelConfig,
        users: EntityVocab,
        items: Vec<String>,
        tower: UserTower,
        tables: [Tensor; 3],
        temperature: f32,
    ) -> Self {
        let item_index = items
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let [id_emb, feat_emb, history_emb] = tables;
        UserModel {
            cfg,
            users,
            items,
            item_index,
            tower,
            id_emb,
            feat_emb,
            history_emb,
            temperature,
            fused: std::sync::OnceLock::new(),
        }
    }

    /// Item id of this version, 0 when unknown (out-of-vocabulary items are ignored in history).
    pub fn item_id(&self, item: &str) -> u32 {
        self.item_index.get(item).copied().unwrap_or(0)
    }

    /// Every user's engaged items in `log` as item ids of this version (time order; items unknown
    /// to the version are 0 and ignored by [`UserModel::input`]), with their event times,
    /// indexed by the log's user index.
    pub fn histories(&self, log: &tandem_data::EventLog) -> Histories {
        let n = log.users.len();
        let mut h = Histories {
            items: vec![Vec::new(); n],
            times: vec![Vec::new(); n],
        };
        for e in log.time_order() {
            let e = e as usize;
            let u = log.user[e] as usize;
            h.items[u].push(self.item_id(log.items.name(log.item[e])));
            h.times[u].push(log.ts[e]);
        }
        h
    }

    /// The request of log user `u` at the time of their last event (history most recent first).
    pub fn request_of<'a>(&self, h: &Histories, user: &'a str, u: usize) -> UserRequest<'a> {
        UserRequest {
            user,
            history: h.items[u].iter().rev().copied().collect(),
            history_ts: h.times[u].iter().rev().copied().collect(),
            ts: h.times[u].last().copied().unwrap_or(0),
            features: None,
        }
    }

    /// Encodes requests into one batch. Histories longer than L are cut to the L most recent.
    pub fn input(&self, reqs: &[UserRequest]) -> UserInput {
        let l = self.cfg.history;
        let mut x = UserInput::default();
        let mut scratch = std::collections::HashSet::new();
        for r in reqs {
            let u = self.users.get(r.user);
            x.users.push(u);
            match r.features {
                Some(f) => self.users.schema.encode(
                    |name| f.get(name).map(String::as_str),
                    &mut x.slots,
                    &mut x.numeric,
                ),
                None => {
                    x.slots.extend_from_slice(self.users.slots_of(u));
                    x.numeric.extend_from_slice(self.users.numeric_of(u));
                }
            }
            let start = x.history.len();
            x.history
                .extend(r.history.iter().copied().filter(|&i| i != 0).take(l));
            x.history.resize(start + l, 0);
            if self.cfg.user_encoder == UserEncoder::Transformer {
                push_window(&mut x.seq, &mut x.seq_gaps, r, l);
            }
            if self.cfg.long_history > 0 {
                push_distinct(
                    &mut x.long,
                    r.history.iter().copied().filter(|&i| i != 0).skip(l),
                    self.cfg.long_history,
                    &mut scratch,
                );
            }
            x.context.extend_from_slice(&context(r.ts));
        }
        x
    }

    pub fn embed(&self, x: &UserInput) -> Result<Tensor> {
        let tables = UserTables {
            user_id: Table::Full(&self.id_emb),
            user_feat: Table::Full(&self.feat_emb),
            history: Table::Full(&self.history_emb),
        };
        Ok(self.tower.forward(&tables, &self.users.schema, x)?)
    }

    pub fn embed_requests(&self, reqs: &[UserRequest]) -> Result<Tensor> {
        self.embed(&self.input(reqs))
    }

    /// [`embed_requests`](Self::embed_requests) as plain rows (`reqs.len() × dim`), the serving
    /// path: the fused forward where the encoder has one (equal to the candle forward within
    /// float rounding), the candle graph otherwise.
    pub fn embed_vectors(&self, reqs: &[UserRequest]) -> Result<Vec<f32>> {
        let fused = self.fused.get_or_init(|| {
            crate::fused::FusedUser::new(self).unwrap_or_else(|e| {
                tracing::warn!("fused user tower unavailable, serving on candle: {e}");
                None
            })
        });
        match fused {
            Some(f) => Ok(f.forward(&self.input(reqs))),
            None => Ok(self.embed_requests(reqs)?.flatten_all()?.to_vec1::<f32>()?),
        }
    }

    pub fn load(dir: &Path) -> Result<Self> {
        open(dir)?;
        let cfg: ModelConfig = read_json(&dir.join(CONFIG_FILE))?;
        let mut vocab: UserVocabFile = read_json(&dir.join(USER_VOCAB_FILE))?;
        vocab.users.reindex();
        let mut t = Tensors::load(&dir.join(USER_TOWER_FILE))?;
        let tower = t.user_tower(&cfg)?;
        let temperature = t.take("temperature")?.flatten_all()?.to_vec1::<f32>()?[0];
        let tables = [
            t.take("user.id_emb")?,
            t.take("user.feat_emb")?,
            t.take("user.history_emb")?,
        ];
        Ok(UserModel::new(
            cfg,
            vocab.users,
            vocab.items,
            tower,
            tables,
            temperature,
        ))
    }
}

impl ItemModel {
    pub fn input(&self, items: &[u32]) -> ItemInput {
        let mut x = ItemInput {
            items: items.to_vec(),
            ..Default::default()
        };
        for &i in items {
            x.slots.extend_from_slice(self.items.slots_of(i));
            x.numeric.extend_from_slice(self.items.numeric_of(i));
        }
        x
    }

    pub fn embed(&self, items: &[u32]) -> Result<Tensor> {
        let tables = ItemTables {
            item_id: Table::Full(&self.id_emb),
            item_feat: Table::Full(&self.feat_emb),
        };
        Ok(self
            .tower
            .forward(&tables, &self.items.schema, &self.input(items))?)
    }

    /// Embeddings of every item of this version, row = item id (row 0 is the OOV item).
    pub fn embed_all(&self) -> Result<Tensor> {
        let ids: Vec<u32> = (0..self.items.len() as u32).collect();
        let parts = ids
            .chunks(8192)
            .map(|c| self.embed(c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    pub fn load(dir: &Path) -> Result<Self> {
        open(dir)?;
        let cfg: ModelConfig = read_json(&dir.join(CONFIG_FILE))?;
        let mut items: EntityVocab = read_json(&dir.join(ITEM_VOCAB_FILE))?;
        items.reindex();
        let mut t = Tensors::load(&dir.join(ITEM_TOWER_FILE))?;
        let tower = ItemTower {
            cfg: cfg.clone(),
            mlp: t.mlp("item.mlp")?,
        };
        Ok(ItemModel {
            cfg,
            items,
            tower,
            id_emb: t.take("item.id_emb")?,
            feat_emb: t.take("item.feat_emb")?,
        })
    }
}

impl TwoTower {
    pub fn load(dir: &Path) -> Result<Self> {
        Ok(TwoTower {
            user: UserModel::load(dir)?,
            item: ItemModel::load(dir)?,
        })
    }

    /// Writes the payload files of a model version into `dir` (the artifact store adds the
    /// manifest and checksums).
    pub fn write_payload(&self, dir: &Path) -> Result<()> {
        let u = &self.user;
        let mut user = HashMap::new();
        user.insert("user.id_emb".to_string(), u.id_emb.clone());
        user.insert("user.feat_emb".to_string(), u.feat_emb.clone());
        user.insert("user.history_emb".to_string(), u.history_emb.clone());
        user.insert(
            "temperature".to_string(),
            Tensor::new(&[u.temperature], &Device::Cpu)?,
        );
        for (name, var) in u.tower.named_vars() {
            user.insert(name, var.as_tensor().clone());
        }
        candle_core::safetensors::save(&user, dir.join(USER_TOWER_FILE))?;
        let i = &self.item;
        let mut item = HashMap::new();
        item.insert("item.id_emb".to_string(), i.id_emb.clone());
        item.insert("item.feat_emb".to_string(), i.feat_emb.clone());
        for (name, var) in i.tower.named_vars() {
            item.insert(name, var.as_tensor().clone());
        }
        candle_core::safetensors::save(&item, dir.join(ITEM_TOWER_FILE))?;
        write_json(&dir.join(CONFIG_FILE), &u.cfg)?;
        write_json(
            &dir.join(USER_VOCAB_FILE),
            &UserVocabFile {
                users: u.users.clone(),
                items: u.items.clone(),
            },
        )?;
        write_json(&dir.join(ITEM_VOCAB_FILE), &i.items)?;
        Ok(())
    }
}

/// Opens (and fully verifies) a model version directory.
pub fn open(dir: &Path) -> Result<Manifest<ModelManifest>> {
    Ok(tandem_artifact::open(dir)?)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes =
        std::fs::read(path).map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| ModelError::Invalid(e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))
}

/// Named tensors of one safetensors file (or of a training snapshot), taken out one by one.
pub(crate) struct Tensors {
    file: String,
    map: HashMap<String, Tensor>,
}

/// A deep copy of `t` in host memory: snapshots of a training run are inference models, which
/// run on the CPU whatever device trained them.
pub(crate) fn host_copy(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.device() {
        Device::Cpu => t.copy(),
        _ => t.to_device(&Device::Cpu),
    }
}

impl Tensors {
    /// Deep copies of `vars` (a training snapshot).
    pub(crate) fn copies(vars: Vec<(String, Var)>) -> Result<Self> {
        let map = vars
            .into_iter()
            .map(|(n, v)| Ok((n, host_copy(v.as_tensor())?)))
            .collect::<Result<_>>()?;
        Ok(Tensors {
            file: "snapshot".into(),
            map,
        })
    }

    fn var(&mut self, name: &str) -> Result<Var> {
        Ok(Var::from_tensor(&self.take(name)?)?)
    }

    fn linear(&mut self, prefix: &str) -> Result<Linear> {
        Ok(Linear {
            weight: self.var(&format!("{prefix}.weight"))?,
            bias: self.var(&format!("{prefix}.bias"))?,
        })
    }

    fn layer_norm(&mut self, prefix: &str) -> Result<LayerNorm> {
        Ok(LayerNorm {
            gamma: self.var(&format!("{prefix}.gamma"))?,
            beta: self.var(&format!("{prefix}.beta"))?,
        })
    }

    fn seq_encoder(&mut self, prefix: &str, cfg: &ModelConfig) -> Result<SeqEncoder> {
        let mut blocks = Vec::new();
        while self
            .map
            .contains_key(&format!("{prefix}.{}.qkv.weight", blocks.len()))
        {
            let p = format!("{prefix}.{}", blocks.len());
            blocks.push(Block {
                ln1: self.layer_norm(&format!("{p}.ln1"))?,
                qkv: self.linear(&format!("{p}.qkv"))?,
                proj: self.linear(&format!("{p}.proj"))?,
                ln2: self.layer_norm(&format!("{p}.ln2"))?,
                ff1: self.linear(&format!("{p}.ff1"))?,
                ff2: self.linear(&format!("{p}.ff2"))?,
            });
        }
        let rel_bias = self.var(&format!("{prefix}.rel_bias"))?;
        Ok(SeqEncoder {
            heads: rel_bias.as_tensor().dim(0)?,
            max_len: cfg.history,
            gap_emb: self.var(&format!("{prefix}.gap_emb"))?,
            rel_bias,
            blocks,
            ln_f: self.layer_norm(&format!("{prefix}.ln_f"))?,
        })
    }

    /// The user tower of `cfg` from its named tensors.
    pub(crate) fn user_tower(&mut self, cfg: &ModelConfig) -> Result<UserTower> {
        Ok(UserTower {
            cfg: cfg.clone(),
            mlp: self.mlp("user.mlp")?,
            attn_query: self
                .take_opt("user.attn_query")
                .map(|q| Var::from_tensor(&q))
                .transpose()?,
            seq: match cfg.user_encoder {
                UserEncoder::Transformer => Some(self.seq_encoder("user.seq", cfg)?),
                _ => None,
            },
        })
    }

    fn load(path: &Path) -> Result<Self> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)?;
        Ok(Tensors {
            file: path.display().to_string(),
            map,
        })
    }

    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.map
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                file: self.file.clone(),
                name: name.to_string(),
            })
    }

    fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        self.map.remove(name)
    }

    fn mlp(&mut self, prefix: &str) -> Result<Mlp> {
        let mut layers = Vec::new();
        while let Some(w) = self.take_opt(&format!("{prefix}.{}.weight", layers.len())) {
            let b = self.take(&format!("{prefix}.{}.bias", layers.len()))?;
            layers.push(Linear {
                weight: Var::from_tensor(&w)?,
                bias: Var::from_tensor(&b)?,
            });
        }
        if layers.is_empty() {
            return Err(ModelError::MissingTensor {
                file: self.file.clone(),
                name: format!("{prefix}.0.weight"),
            });
        }
        Ok(Mlp { layers })
    }
}
