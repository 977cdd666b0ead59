//! Feature tables: one row per user or item, keyed by its id. Each column is categorical,
//! multi-valued categorical (`a|b|c`) or numeric; kinds are given explicitly
//! (`genres:multi,year:num`) or detected from the values.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::table;
use crate::{DataError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// One value from a vocabulary.
    Cat,
    /// Several values from a vocabulary, separated by `|`.
    Multi,
    /// A real number (missing → the column mean).
    Num,
}

impl std::str::FromStr for FeatureKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cat" | "categorical" => Ok(FeatureKind::Cat),
            "multi" => Ok(FeatureKind::Multi),
            "num" | "numeric" => Ok(FeatureKind::Num),
            other => Err(format!(
                "unknown feature kind {other:?} (expected cat, multi or num)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FeatureColumn {
    pub name: String,
    pub kind: FeatureKind,
    /// Raw values, one per row of the table.
    pub values: Vec<String>,
}

/// A feature table loaded into memory.
#[derive(Debug, Clone, Default)]
pub struct FeatureTable {
    pub keys: Vec<String>,
    pub index: HashMap<String, usize>,
    pub columns: Vec<FeatureColumn>,
}

/// Parses `name:kind,name:kind`.
pub fn parse_spec(spec: &str) -> Result<Vec<(String, FeatureKind)>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|part| {
            let (name, kind) = part.split_once(':').ok_or_else(|| {
                DataError::Invalid(format!(
                    "feature spec {part:?}: expected name:kind (kind is cat, multi or num)"
                ))
            })?;
            let kind = kind.trim().parse().map_err(DataError::Invalid)?;
            Ok((name.trim().to_string(), kind))
        })
        .collect()
}

impl FeatureTable {
    /// Reads a feature table keyed by `key`. With `spec`, exactly those columns are read with
    /// those kinds; without it, every other column is read and its kind detected: numeric if every
    /// non-empty value parses as a number, multi if any value contains `|`, otherwise categorical.
    /// Detected categorical columns whose values are nearly unique (more distinct values than
    /// half the rows, e.g. titles or URLs) carry no shared signal and are skipped.
    pub fn read(path: &Path, key: &str, spec: Option<&[(String, FeatureKind)]>) -> Result<Self> {
        let present = table::columns(path)?;
        let names: Vec<String> = match spec {
            Some(spec) => spec.iter().map(|(n, _)| n.clone()).collect(),
            None => present.iter().filter(|c| *c != key).cloned().collect(),
        };
        let mut wanted: Vec<&str> = vec![key];
        wanted.extend(names.iter().map(String::as_str));
        let mut out = FeatureTable::default();
        let mut raw: Vec<Vec<String>> = vec![Vec::new(); names.len()];
        table::scan(path, &wanted, |row, v| {
            if v[0].is_empty() {
                return Err(DataError::BadValue {
                    path: path.to_path_buf(),
                    row,
                    reason: format!("empty {key}"),
                });
            }
            if out.index.contains_key(v[0]) {
                // Later rows win: a feature file may be an append-only log of profile updates.
                let r = out.index[v[0]];
                for (c, col) in raw.iter_mut().enumerate() {
                    col[r] = v[c + 1].to_string();
                }
                return Ok(());
            }
            out.index.insert(v[0].to_string(), out.keys.len());
            out.keys.push(v[0].to_string());
            for (c, col) in raw.iter_mut().enumerate() {
                col.push(v[c + 1].to_string());
            }
            Ok(())
        })?;
        for (c, (name, values)) in names.into_iter().zip(raw).enumerate() {
            let kind = match spec {
                Some(spec) => spec[c].1,
                None => match detect(&values) {
                    Some(kind) => kind,
                    None => continue,
                },
            };
            if kind == FeatureKind::Num {
                if let Some((row, bad)) = values.iter().enumerate().find(|(_, v)| {
                    !v.is_empty() && v.parse::<f64>().map_or(true, |f| !f.is_finite())
                }) {
                    return Err(DataError::BadValue {
                        path: path.to_path_buf(),
                        row: row + 1,
                        reason: format!("column {name}: {bad:?} is not a number"),
                    });
                }
            }
            out.columns.push(FeatureColumn { name, kind, values });
        }
        Ok(out)
    }

    pub fn row(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }
}

fn detect(values: &[String]) -> Option<FeatureKind> {
    let non_empty: Vec<&String> = values.iter().filter(|v| !v.is_empty()).collect();
    if non_empty.is_empty() {
        return None;
    }
    if non_empty
        .iter()
        .all(|v| v.parse::<f64>().is_ok_and(f64::is_finite))
    {
        return Some(FeatureKind::Num);
    }
    if non_empty.iter().any(|v| v.contains('|')) {
        return Some(FeatureKind::Multi);
    }
    let distinct: std::collections::HashSet<&String> = non_empty.iter().copied().collect();
    if distinct.len() * 2 > values.len() {
        return None;
    }
    Some(FeatureKind::Cat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_detected_and_id_like_columns_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.csv");
        std::fs::write(
            &path,
            "item_id,title,genres,year,color\n1,A,x|y,1990,red\n2,B,y,,red\n3,C,z,2001,blue\n4,D,x,1999,red\n",
        )
        .unwrap();
        let t = FeatureTable::read(&path, "item_id", None).unwrap();
        let kinds: Vec<(&str, FeatureKind)> = t
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("genres", FeatureKind::Multi),
                ("year", FeatureKind::Num),
                ("color", FeatureKind::Cat)
            ]
        );
        assert_eq!(t.row("3"), Some(2));
    }

    #[test]
    fn an_explicit_spec_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.csv");
        std::fs::write(&path, "user_id,age\nu1,old\n").unwrap();
        let spec = parse_spec("age:num").unwrap();
        let err = FeatureTable::read(&path, "user_id", Some(&spec)).unwrap_err();
        assert!(err.to_string().contains("\"old\" is not a number"), "{err}");
        assert!(parse_spec("age:weird").is_err());
        let spec = parse_spec("height:num").unwrap();
        let err = FeatureTable::read(&path, "user_id", Some(&spec)).unwrap_err();
        assert!(
            err.to_string().contains("missing column \"height\""),
            "{err}"
        );
    }
}
