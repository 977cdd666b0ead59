//! Index artifacts: `ARTIFACTS/indexes/<model>/<version>/` holding `index.bin` (the engine's
//! bytes), `items.json` (row → item id) and a manifest whose `versions` map (model name → model
//! version) is generated together with the index. The index version is the model version it was
//! built from, so "index v3" always means "item tower v3".
//!
//! **Shards.** A version built with `shards = S > 1` holds, instead of one index, S of them:
//! `shard-<i>.bin` and `shard-<i>-items.json` for shard `i`, the items partitioned by
//! [`shard_of`] (a stable hash of the item id). The S shards are published together as one
//! version (no host can see some shards of a version and miss others); a host loads one shard
//! ([`load_shard`]) and so holds 1/S of the catalogue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_artifact::{Manifest, Published};
use tandem_types::ModelVersion;

use crate::{AnnIndex, HnswParams, IndexError, Result};

pub use tandem_types::INDEXES;
pub const INDEX_FILE: &str = "index.bin";
pub const ITEMS_FILE: &str = "items.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexManifest {
    /// Model name → model version of every model whose embeddings are in this index.
    pub versions: BTreeMap<String, ModelVersion>,
    /// Unique per build (model, version, content hash prefix).
    pub index_id: String,
    pub model_name: String,
    pub model_version: ModelVersion,
    pub item_count: u64,
    pub dim: usize,
    pub params: HnswParams,
    pub build_seconds: f64,
    /// ANN recall@10 against exact search at the default `ef`.
    pub ann_recall_at_10: f64,
    pub recall_queries: usize,
    /// Where the recall queries came from (user histories from an event log, or profiles).
    pub recall_query_source: String,
    /// The model's feature-schema hash, for operators comparing versions.
    #[serde(default)]
    pub feature_schema_hash: String,
    /// How many shards the catalogue is split into (0 or 1: one index, no shards).
    #[serde(default)]
    pub shards: u32,
    /// Items per shard, when sharded.
    #[serde(default)]
    pub shard_items: Vec<u64>,
}

impl IndexManifest {
    /// The number of shards, 1 for an unsharded version.
    pub fn shard_count(&self) -> u32 {
        self.shards.max(1)
    }
}

/// The shard (of `shards`) that item `id` belongs to: FNV-1a of its bytes, stable across
/// processes, platforms and releases.
pub fn shard_of(id: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % shards.max(1) as u64) as u32
}

pub fn shard_index_file(shard: u32) -> String {
    format!("shard-{shard}.bin")
}

pub fn shard_items_file(shard: u32) -> String {
    format!("shard-{shard}-items.json")
}

pub fn index_dir(root: &Path, model: &str, version: ModelVersion) -> PathBuf {
    tandem_artifact::version_dir(root, INDEXES, model, version)
}

/// Publishes an index as version `meta.model_version` of `indexes/<model_name>`.
pub fn publish(
    root: &Path,
    index: &dyn AnnIndex,
    items: &[String],
    meta: &IndexManifest,
) -> Result<Published> {
    if items.len() != index.len() {
        return Err(IndexError::Invalid(format!(
            "{} item ids for {} vectors",
            items.len(),
            index.len()
        )));
    }
    let bytes = index.to_bytes();
    let items_json = serde_json::to_vec(items).map_err(|e| IndexError::Invalid(e.to_string()))?;
    Ok(tandem_artifact::publish(
        root,
        INDEXES,
        &meta.model_name,
        Some(meta.model_version),
        meta,
        |dir| {
            std::fs::write(dir.join(INDEX_FILE), &bytes).map_err(|e| e.to_string())?;
            std::fs::write(dir.join(ITEMS_FILE), &items_json).map_err(|e| e.to_string())
        },
    )?)
}

/// Publishes a sharded version: `parts[i]` is shard `i` (its index and item ids), every item
/// in the shard [`shard_of`] says. `meta.shards` must be `parts.len()`.
pub fn publish_sharded(
    root: &Path,
    parts: &[(&dyn AnnIndex, &[String])],
    meta: &IndexManifest,
) -> Result<Published> {
    let s = parts.len() as u32;
    if s < 2 || meta.shards != s {
        return Err(IndexError::Invalid(format!(
            "{} parts for a manifest of {} shards (a sharded version has at least 2)",
            parts.len(),
            meta.shards
        )));
    }
    let mut files = Vec::with_capacity(parts.len());
    for (i, (index, items)) in parts.iter().enumerate() {
        if items.len() != index.len() {
            return Err(IndexError::Invalid(format!(
                "shard {i}: {} item ids for {} vectors",
                items.len(),
                index.len()
            )));
        }
        if let Some(bad) = items.iter().find(|id| shard_of(id, s) != i as u32) {
            return Err(IndexError::Invalid(format!(
                "item {bad:?} is in shard {i} but hashes to shard {}",
                shard_of(bad, s)
            )));
        }
        let items_json =
            serde_json::to_vec(items).map_err(|e| IndexError::Invalid(e.to_string()))?;
        files.push((i as u32, index.to_bytes(), items_json));
    }
    Ok(tandem_artifact::publish(
        root,
        INDEXES,
        &meta.model_name,
        Some(meta.model_version),
        meta,
        |dir| {
            for (i, bytes, items) in &files {
                std::fs::write(dir.join(shard_index_file(*i)), bytes).map_err(|e| e.to_string())?;
                std::fs::write(dir.join(shard_items_file(*i)), items).map_err(|e| e.to_string())?;
            }
            Ok(())
        },
    )?)
}

/// A loaded, verified index version (or one shard of it).
pub struct LoadedIndex {
    pub dir: PathBuf,
    pub manifest: Manifest<IndexManifest>,
    pub index: Box<dyn AnnIndex>,
    pub items: ItemIds,
    /// Which shard this is (0 for an unsharded version).
    pub shard: u32,
    /// Rows sorted by item id, built on the first [`LoadedIndex::row_of`] (4 bytes an item,
    /// none spent by hosts that never look an id up).
    by_id: std::sync::OnceLock<Vec<u32>>,
}

impl LoadedIndex {
    /// The row of item `id`, if this index (shard) holds it.
    pub fn row_of(&self, id: &str) -> Option<u32> {
        let by_id = self.by_id.get_or_init(|| {
            let mut rows: Vec<u32> = (0..self.items.len() as u32).collect();
            rows.sort_unstable_by(|&a, &b| self.items[a as usize].cmp(&self.items[b as usize]));
            rows
        });
        by_id
            .binary_search_by(|&r| self.items[r as usize].cmp(id))
            .ok()
            .map(|i| by_id[i])
    }
}

impl std::fmt::Debug for LoadedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedIndex")
            .field("dir", &self.dir)
            .field("index_id", &self.manifest.meta.index_id)
            .finish()
    }
}

/// Loads an unsharded index version, refusing it if any file fails its checksum.
pub fn load(dir: &Path) -> Result<LoadedIndex> {
    load_shard(dir, None)
}

/// Loads shard `shard` of a sharded version, or (`None`) an unsharded one, refusing it if any
/// file of the version fails its checksum. Asking an unsharded version for a shard other than
/// 0, or a sharded one for none, is an error naming what the version holds.
pub fn load_shard(dir: &Path, shard: Option<u32>) -> Result<LoadedIndex> {
    let manifest: Manifest<IndexManifest> = tandem_artifact::open(dir)?;
    let read = |name: &str| -> Result<Vec<u8>> {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| IndexError::Io { path, source })
    };
    let count = manifest.meta.shard_count();
    let (shard, index_file, items_file) = match (count, shard) {
        (1, None | Some(0)) => (0, INDEX_FILE.to_string(), ITEMS_FILE.to_string()),
        (1, Some(s)) => {
            return Err(IndexError::Invalid(format!(
                "{}: shard {s} asked for, but this version is not sharded",
                dir.display()
            )))
        }
        (n, None) => {
            return Err(IndexError::Invalid(format!(
                "{}: this version is split into {n} shards; a host serves one (--shard 0..{})",
                dir.display(),
                n - 1
            )))
        }
        (n, Some(s)) if s >= n => {
            return Err(IndexError::Invalid(format!(
                "{}: shard {s} asked for, but this version has shards 0..{}",
                dir.display(),
                n - 1
            )))
        }
        (_, Some(s)) => (s, shard_index_file(s), shard_items_file(s)),
    };
    let params = &manifest.meta.params;
    let index = crate::open_with(&dir.join(&index_file), params.engine, params.layout)?;
    let items = ItemIds::from_json(&read(&items_file)?)
        .map_err(|e| IndexError::Invalid(format!("{}: {e}", dir.join(&items_file).display())))?;
    if items.len() != index.len() || index.dim() != manifest.meta.dim {
        return Err(IndexError::Invalid(format!(
            "{}: index does not match its manifest",
            dir.display()
        )));
    }
    Ok(LoadedIndex {
        dir: dir.to_path_buf(),
        manifest,
        index,
        items,
        shard,
        by_id: std::sync::OnceLock::new(),
    })
}

/// The item ids of a loaded index, row by row, in one buffer: no allocation per id (at 10M
/// items, parsing them into one `String` each was most of a host's load, and 24 bytes of
/// `String` plus an allocation per item).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ItemIds {
    text: String,
    /// `text[end[r - 1]..end[r]]` is row `r`'s id (from 0 for row 0).
    end: Vec<usize>,
}

impl ItemIds {
    /// Parses the JSON array of strings an index version stores. Ids without escapes (all of
    /// them, in practice) are copied straight from the text, which is checked as UTF-8 once; at
    /// 10M ids this is several times faster than a general JSON parse. Anything else — an
    /// escape, odd spacing, malformed input — is handed to `serde_json`, whose errors name the
    /// place.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<ItemIds> {
        if let Some(ids) = Self::scan_plain(bytes) {
            return Ok(ids);
        }
        use serde::Deserializer as _;
        let mut ids = ItemIds::default();
        let mut de = serde_json::Deserializer::from_slice(bytes);
        de.deserialize_seq(Rows(&mut ids))?;
        de.end()?;
        Ok(ids)
    }

    /// The fast path: `["a","b",…]` as `serde_json::to_vec` writes it, with no escapes or
    /// control characters inside the strings (`None` for anything else).
    fn scan_plain(bytes: &[u8]) -> Option<ItemIds> {
        let text = std::str::from_utf8(bytes).ok()?;
        let body = text.trim().strip_prefix('[')?.strip_suffix(']')?;
        let mut ids = ItemIds::default();
        if body.is_empty() {
            return Some(ids);
        }
        ids.text.reserve(body.len());
        let mut rest = body;
        loop {
            rest = rest.strip_prefix('"')?;
            let end = rest
                .bytes()
                .position(|b| b == b'"' || b == b'\\' || b < 0x20)?;
            if rest.as_bytes()[end] != b'"' {
                return None;
            }
            ids.push(&rest[..end]);
            rest = &rest[end + 1..];
            if rest.is_empty() {
                return Some(ids);
            }
            rest = rest.strip_prefix(',')?;
        }
    }

    pub fn len(&self) -> usize {
        self.end.len()
    }

    pub fn is_empty(&self) -> bool {
        self.end.is_empty()
    }

    /// Row `row`'s id.
    pub fn get(&self, row: usize) -> Option<&str> {
        let end = *self.end.get(row)?;
        let start = row.checked_sub(1).map_or(0, |p| self.end[p]);
        Some(&self.text[start..end])
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|r| &self[r])
    }

    fn push(&mut self, id: &str) {
        self.text.push_str(id);
        self.end.push(self.text.len());
    }
}

impl std::ops::Index<usize> for ItemIds {
    type Output = str;

    fn index(&self, row: usize) -> &str {
        self.get(row).expect("item row out of range")
    }
}

impl<S: AsRef<str>> FromIterator<S> for ItemIds {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut ids = ItemIds::default();
        iter.into_iter().for_each(|s| ids.push(s.as_ref()));
        ids
    }
}

/// Deserialises the id array straight into an [`ItemIds`].
struct Rows<'a>(&'a mut ItemIds);

impl<'de> serde::de::Visitor<'de> for Rows<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of item id strings")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(n) = seq.size_hint() {
            self.0.end.reserve(n);
        }
        while seq.next_element_seed(Id(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// One id, appended to the buffer.
struct Id<'a>(&'a mut ItemIds);

impl<'de> serde::de::DeserializeSeed<'de> for Id<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Id<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an item id string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push(v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_parse_into_one_buffer_exactly_as_strings_do() {
        let ids = vec![
            "i0".to_string(),
            String::new(),
            "quote \" and \\ backslash".into(),
            "ünïcødé ✓".into(),
            "tab\tnewline\n".into(),
        ];
        let json = serde_json::to_vec(&ids).unwrap();
        let parsed = ItemIds::from_json(&json).unwrap();
        assert_eq!(parsed.len(), ids.len());
        assert_eq!(parsed.iter().collect::<Vec<_>>(), ids);
        assert_eq!(&parsed[3], "ünïcødé ✓");
        assert_eq!(parsed.get(5), None);
        assert_eq!(parsed, ids.iter().collect::<ItemIds>());
        for bad in [&b"[\"a\", 3]"[..], b"{\"a\": 1}", b"[\"a\"", b"[\"a\"] x"] {
            assert!(
                ItemIds::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(ItemIds::from_json(b"[]").unwrap().is_empty());
        // The fast path and the general parser agree wherever both apply.
        let plain = vec!["a".to_string(), "b c".into(), "é".into(), String::new()];
        let json = serde_json::to_vec(&plain).unwrap();
        let fast = ItemIds::scan_plain(&json).expect("plain ids take the fast path");
        assert_eq!(fast.iter().collect::<Vec<_>>(), plain);
        let spaced = b" [ \"a\" , \"b\" ] ";
        assert!(ItemIds::scan_plain(spaced).is_none());
        assert_eq!(
            ItemIds::from_json(spaced)
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(ItemIds::scan_plain(br#"["a\"b"]"#).is_none());
        for bad in [
            &b"[\"a\",]"[..],
            b"[\"a\"\"b\"]",
            b"[\"a",
            b"[,]",
            b"[\"\x01\"]",
        ] {
            assert!(
                ItemIds::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
