//! Vocabularies and feature encoding: turns string ids and raw feature values into the integer
//! slots and standardised numbers the towers consume.
//!
//! Each tower side (users, items) has one feature embedding table shared by all of its
//! categorical fields; field `f` owns the id range `offset_f ..= offset_f + |vocab_f|`, where
//! `offset_f` itself means "missing or unknown value". Global id 0 is padding (masked out), used
//! only for unfilled multi-valued slots. Entity id 0 is the out-of-vocabulary entity.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tandem_data::{FeatureKind, FeatureTable};

/// Name of entity id 0.
pub const OOV: &str = "<oov>";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FieldSpec {
    pub name: String,
    pub kind: FeatureKind,
    #[serde(default)]
    pub vocab: Vec<String>,
    #[serde(default)]
    pub mean: f32,
    #[serde(default = "one")]
    pub std: f32,
    /// Slots taken: 1 for categorical, `max_multi` for multi-valued, 0 for numeric.
    pub width: usize,
    /// First id of this field in the side's feature table.
    pub offset: u32,
    #[serde(skip)]
    index: HashMap<String, u32>,
}

fn one() -> f32 {
    1.0
}

/// The fields of one side and the size of their shared embedding table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FeatureSchema {
    pub fields: Vec<FieldSpec>,
    /// Rows of the feature embedding table (≥ 1: row 0 is padding).
    pub table_rows: usize,
    /// Total categorical slots per entity.
    pub slot_width: usize,
    /// Numeric values per entity.
    pub numeric: usize,
}

impl FeatureSchema {
    /// Learns vocabularies (in first-seen order) and numeric statistics from a feature table.
    pub fn fit(table: &FeatureTable, max_multi: usize) -> FeatureSchema {
        let mut schema = FeatureSchema {
            table_rows: 1,
            ..Default::default()
        };
        for col in &table.columns {
            let mut spec = FieldSpec {
                name: col.name.clone(),
                kind: col.kind,
                vocab: Vec::new(),
                mean: 0.0,
                std: 1.0,
                width: 0,
                offset: 0,
                index: HashMap::new(),
            };
            match col.kind {
                FeatureKind::Num => {
                    let xs: Vec<f64> = col.values.iter().filter_map(|v| v.parse().ok()).collect();
                    if !xs.is_empty() {
                        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
                        let var =
                            xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
                        spec.mean = mean as f32;
                        spec.std = if var > 0.0 { var.sqrt() as f32 } else { 1.0 };
                    }
                    schema.numeric += 1;
                }
                FeatureKind::Cat | FeatureKind::Multi => {
                    for v in &col.values {
                        let values: Vec<&str> = if col.kind == FeatureKind::Multi {
                            split_multi(v).collect()
                        } else {
                            vec![v.as_str()]
                        };
                        for value in values {
                            if !value.is_empty() && !spec.index.contains_key(value) {
                                spec.index
                                    .insert(value.to_string(), spec.vocab.len() as u32);
                                spec.vocab.push(value.to_string());
                            }
                        }
                    }
                    spec.width = if col.kind == FeatureKind::Multi {
                        max_multi.max(1)
                    } else {
                        1
                    };
                    spec.offset = schema.table_rows as u32;
                    schema.table_rows += spec.vocab.len() + 1;
                    schema.slot_width += spec.width;
                }
            }
            schema.fields.push(spec);
        }
        schema
    }

    /// Rebuilds lookup maps after deserialisation.
    pub fn reindex(&mut self) {
        for f in &mut self.fields {
            f.index = f
                .vocab
                .iter()
                .enumerate()
                .map(|(i, v)| (v.clone(), i as u32))
                .collect();
        }
    }

    /// Encodes one entity. `value(field_name)` returns the raw value, or `None` when missing.
    pub fn encode<'a>(
        &self,
        mut value: impl FnMut(&str) -> Option<&'a str>,
        slots: &mut Vec<u32>,
        numeric: &mut Vec<f32>,
    ) {
        for f in &self.fields {
            let raw = value(&f.name).unwrap_or("");
            match f.kind {
                FeatureKind::Num => {
                    let x = raw
                        .parse::<f32>()
                        .ok()
                        .filter(|x| x.is_finite())
                        .map_or(0.0, |x| (x - f.mean) / f.std);
                    numeric.push(x);
                }
                FeatureKind::Cat => slots.push(f.id(raw)),
                FeatureKind::Multi => {
                    let start = slots.len();
                    slots.extend(split_multi(raw).take(f.width).map(|v| f.id(v)));
                    slots.resize(start + f.width, 0);
                }
            }
        }
    }

    /// (field name, kind, vocabulary size, width) of every field, for the schema hash.
    pub fn signature(&self) -> Vec<(String, FeatureKind, usize, usize)> {
        self.fields
            .iter()
            .map(|f| (f.name.clone(), f.kind, f.vocab.len(), f.width))
            .collect()
    }

    /// Categorical fields with their slot range, in slot order.
    pub fn cat_fields(&self) -> impl Iterator<Item = (usize, &FieldSpec)> {
        let mut start = 0;
        self.fields
            .iter()
            .filter(|f| f.kind != FeatureKind::Num)
            .map(move |f| {
                let s = start;
                start += f.width;
                (s, f)
            })
    }
}

impl FieldSpec {
    /// Feature-table id of a value: unknown and missing values share the field's own id.
    fn id(&self, value: &str) -> u32 {
        match self.index.get(value) {
            Some(&k) => self.offset + 1 + k,
            None => self.offset,
        }
    }
}

fn split_multi(v: &str) -> impl Iterator<Item = &str> {
    v.split('|').map(str::trim).filter(|s| !s.is_empty())
}

/// One side's vocabulary of entities with their encoded features.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EntityVocab {
    /// Entity ids; index 0 is [`OOV`].
    pub ids: Vec<String>,
    pub schema: FeatureSchema,
    /// `ids.len() × schema.slot_width`.
    pub slots: Vec<u32>,
    /// `ids.len() × schema.numeric`.
    pub numeric: Vec<f32>,
    #[serde(skip)]
    index: HashMap<String, u32>,
}

impl EntityVocab {
    /// Entities from the events (first-seen order) followed by those only in the feature table.
    pub fn build<'a>(
        from_events: impl IntoIterator<Item = &'a str>,
        table: Option<&FeatureTable>,
        max_multi: usize,
    ) -> EntityVocab {
        let schema = table
            .map(|t| FeatureSchema::fit(t, max_multi))
            .unwrap_or(FeatureSchema {
                table_rows: 1,
                ..Default::default()
            });
        let mut vocab = EntityVocab {
            ids: vec![OOV.to_string()],
            schema,
            ..Default::default()
        };
        vocab.index.insert(OOV.to_string(), 0);
        let mut add = |id: &str| {
            if !vocab.index.contains_key(id) {
                vocab.index.insert(id.to_string(), vocab.ids.len() as u32);
                vocab.ids.push(id.to_string());
            }
        };
        from_events.into_iter().for_each(&mut add);
        if let Some(t) = table {
            t.keys.iter().for_each(|k| add(k));
        }
        let mut slots = Vec::with_capacity(vocab.ids.len() * vocab.schema.slot_width);
        let mut numeric = Vec::with_capacity(vocab.ids.len() * vocab.schema.numeric);
        for id in &vocab.ids {
            let row = table.and_then(|t| t.row(id));
            vocab.schema.encode(
                |name| {
                    let (t, r) = (table?, row?);
                    let col = t.columns.iter().find(|c| c.name == name)?;
                    Some(col.values[r].as_str())
                },
                &mut slots,
                &mut numeric,
            );
        }
        vocab.slots = slots;
        vocab.numeric = numeric;
        vocab
    }

    /// Rebuilds lookup maps after deserialisation.
    pub fn reindex(&mut self) {
        self.index = self
            .ids
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone(), i as u32))
            .collect();
        self.schema.reindex();
    }

    /// Entity id, 0 when unknown.
    pub fn get(&self, id: &str) -> u32 {
        self.index.get(id).copied().unwrap_or(0)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.len() <= 1
    }

    pub fn slots_of(&self, e: u32) -> &[u32] {
        let w = self.schema.slot_width;
        &self.slots[e as usize * w..(e as usize + 1) * w]
    }

    pub fn numeric_of(&self, e: u32) -> &[f32] {
        let n = self.schema.numeric;
        &self.numeric[e as usize * n..(e as usize + 1) * n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_data::features::FeatureColumn;

    fn table() -> FeatureTable {
        let mut t = FeatureTable::default();
        for (i, k) in ["a", "b"].iter().enumerate() {
            t.keys.push(k.to_string());
            t.index.insert(k.to_string(), i);
        }
        t.columns = vec![
            FeatureColumn {
                name: "genre".into(),
                kind: FeatureKind::Multi,
                values: vec!["x|y".into(), "y|z|w".into()],
            },
            FeatureColumn {
                name: "year".into(),
                kind: FeatureKind::Num,
                values: vec!["1990".into(), "2000".into()],
            },
            FeatureColumn {
                name: "color".into(),
                kind: FeatureKind::Cat,
                values: vec!["red".into(), "".into()],
            },
        ];
        t
    }

    #[test]
    fn entities_and_values_are_encoded_with_oov_and_padding_ids() {
        let t = table();
        let v = EntityVocab::build(["b", "c"], Some(&t), 2);
        assert_eq!(v.ids, vec![OOV, "b", "c", "a"]);
        // genre owns ids 1 (unknown) + x,y,z,w = 2..=5; color owns 6 (unknown) + red = 7.
        assert_eq!(v.schema.table_rows, 8);
        assert_eq!(v.slots_of(v.get("a")), &[2, 3, 7]);
        // "w" is cut by max_multi = 2; a missing colour gets the field's unknown id.
        assert_eq!(v.slots_of(v.get("b")), &[3, 4, 6]);
        // "c" has no feature row: unknown colour, padding for the multi-valued slots.
        assert_eq!(v.slots_of(v.get("c")), &[0, 0, 6]);
        assert_eq!(v.numeric_of(v.get("a")), &[-1.0]);
        assert_eq!(v.numeric_of(v.get("c")), &[0.0]);
        assert_eq!(v.get("never-seen"), 0);
    }

    #[test]
    fn a_vocabulary_survives_serialisation() {
        let v = EntityVocab::build(["b"], Some(&table()), 2);
        let mut back: EntityVocab =
            serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        back.reindex();
        assert_eq!(back.get("a"), v.get("a"));
        let (mut s1, mut s2, mut n1, mut n2) = (vec![], vec![], vec![], vec![]);
        let raw = |name: &str| if name == "genre" { Some("z|x") } else { None };
        v.schema.encode(raw, &mut s1, &mut n1);
        back.schema.encode(raw, &mut s2, &mut n2);
        assert_eq!(s1, s2);
        assert_eq!(s1, vec![4, 2, 6]);
    }
}
