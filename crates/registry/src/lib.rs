//! The artifact registry: the versioned store of model and index artifacts that trainers,
//! indexers, ANN hosts and the user-tower service share — list, newest, resolve, verify, pin, and
//! retention that keeps the newest N versions and never deletes a pinned one.
//!
//! Storage sits behind [`Storage`] so an object store can back the registry later; [`LocalFs`]
//! is a directory, which may be a volume shared by several processes. Pins are one empty file
//! per (version, holder) under `<root>/pins/`, so concurrent pinners never read-modify-write a
//! shared file: creating and deleting a file are atomic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tandem_types::ModelVersion;

pub use tandem_types::INDEXES;
pub use tandem_types::MODELS;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Artifact(#[from] tandem_artifact::ArtifactError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind}/{name}: no version {version}")]
    NotFound {
        kind: String,
        name: String,
        version: String,
    },
    #[error("invalid pin holder {0:?}: use letters, digits, '-', '_' and '.'")]
    BadHolder(String),
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where artifact versions live.
pub trait Storage: Send + Sync {
    /// Complete versions of `kind/name`, oldest first.
    fn list(&self, kind: &str, name: &str) -> Result<Vec<ModelVersion>>;
    /// A local directory holding the version's files (an object store would fetch into a cache).
    fn local_dir(&self, kind: &str, name: &str, version: ModelVersion) -> Result<PathBuf>;
    /// Removes a version so that no reader ever sees it half-deleted.
    fn remove(&self, kind: &str, name: &str, version: ModelVersion) -> Result<()>;
    fn pin(&self, kind: &str, name: &str, version: ModelVersion, holder: &str) -> Result<()>;
    fn unpin(&self, kind: &str, name: &str, version: ModelVersion, holder: &str) -> Result<()>;
    /// Versions pinned by at least one holder.
    fn pinned(&self, kind: &str, name: &str) -> Result<BTreeSet<ModelVersion>>;
}

/// A registry on a local (or mounted) directory.
#[derive(Debug, Clone)]
pub struct LocalFs {
    pub root: PathBuf,
}

impl LocalFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalFs { root: root.into() }
    }

    fn pin_dir(&self, kind: &str, name: &str, version: ModelVersion) -> PathBuf {
        self.root
            .join("pins")
            .join(kind)
            .join(name)
            .join(version.to_string())
    }
}

fn check_holder(holder: &str) -> Result<()> {
    if holder.is_empty()
        || !holder
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || holder.starts_with('.')
    {
        return Err(RegistryError::BadHolder(holder.to_string()));
    }
    Ok(())
}

impl Storage for LocalFs {
    fn list(&self, kind: &str, name: &str) -> Result<Vec<ModelVersion>> {
        Ok(tandem_artifact::list_versions(&self.root, kind, name)?)
    }

    fn local_dir(&self, kind: &str, name: &str, version: ModelVersion) -> Result<PathBuf> {
        let dir = tandem_artifact::version_dir(&self.root, kind, name, version);
        if !dir.join(tandem_artifact::MANIFEST_CHECKSUM_FILE).is_file() {
            return Err(RegistryError::NotFound {
                kind: kind.into(),
                name: name.into(),
                version: version.to_string(),
            });
        }
        Ok(dir)
    }

    fn remove(&self, kind: &str, name: &str, version: ModelVersion) -> Result<()> {
        let dir = tandem_artifact::version_dir(&self.root, kind, name, version);
        // Rename out of the listing first (atomic), then delete at leisure.
        let trash = dir.with_file_name(format!(".trash-{version}-{}", std::process::id()));
        std::fs::rename(&dir, &trash).map_err(io(&dir))?;
        std::fs::remove_dir_all(&trash).map_err(io(&trash))
    }

    fn pin(&self, kind: &str, name: &str, version: ModelVersion, holder: &str) -> Result<()> {
        check_holder(holder)?;
        let dir = self.pin_dir(kind, name, version);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let f = dir.join(holder);
        std::fs::write(&f, b"").map_err(io(&f))
    }

    fn unpin(&self, kind: &str, name: &str, version: ModelVersion, holder: &str) -> Result<()> {
        check_holder(holder)?;
        let f = self.pin_dir(kind, name, version).join(holder);
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&f)(e)),
            _ => Ok(()),
        }
    }

    fn pinned(&self, kind: &str, name: &str) -> Result<BTreeSet<ModelVersion>> {
        let dir = self.root.join("pins").join(kind).join(name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut out = BTreeSet::new();
        for e in entries.flatten() {
            let holders = std::fs::read_dir(e.path())
                .map(|h| h.flatten().count())
                .unwrap_or(0);
            if let Some(v) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
                if holders > 0 {
                    out.insert(v);
                }
            }
        }
        Ok(out)
    }
}

/// The registry: queries and retention over a [`Storage`].
pub struct Registry<S: Storage = LocalFs> {
    pub storage: S,
}

impl Registry<LocalFs> {
    pub fn open(root: impl Into<PathBuf>) -> Self {
        Registry {
            storage: LocalFs::new(root),
        }
    }
}

impl<S: Storage> Registry<S> {
    pub fn list(&self, kind: &str, name: &str) -> Result<Vec<ModelVersion>> {
        self.storage.list(kind, name)
    }

    pub fn newest(&self, kind: &str, name: &str, n: usize) -> Result<Vec<ModelVersion>> {
        let all = self.list(kind, name)?;
        Ok(all[all.len().saturating_sub(n)..].to_vec())
    }

    /// `latest` or `vN` → a published version.
    pub fn resolve(&self, kind: &str, name: &str, spec: &str) -> Result<ModelVersion> {
        let all = self.list(kind, name)?;
        let found = if spec == "latest" {
            all.last().copied()
        } else {
            spec.parse().ok().filter(|v| all.contains(v))
        };
        found.ok_or_else(|| RegistryError::NotFound {
            kind: kind.into(),
            name: name.into(),
            version: spec.into(),
        })
    }

    /// Verifies every checksum of a version.
    pub fn verify(&self, kind: &str, name: &str, version: ModelVersion) -> Result<()> {
        let dir = self.storage.local_dir(kind, name, version)?;
        tandem_artifact::open::<serde_json::Value>(&dir)?;
        Ok(())
    }

    /// Deletes every version of `kind/name` except the newest `keep` and those in `pinned` or
    /// pinned in storage. Returns what it deleted.
    pub fn collect(
        &self,
        kind: &str,
        name: &str,
        keep: usize,
        pinned: &BTreeSet<ModelVersion>,
    ) -> Result<Vec<ModelVersion>> {
        let all = self.list(kind, name)?;
        let mut protected: BTreeSet<ModelVersion> = self.storage.pinned(kind, name)?;
        protected.extend(pinned.iter().copied());
        protected.extend(all.iter().rev().take(keep).copied());
        let mut removed = Vec::new();
        for v in all {
            if !protected.contains(&v) {
                self.storage.remove(kind, name, v)?;
                removed.push(v);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(root: &Path, n: usize) {
        for _ in 0..n {
            tandem_artifact::publish(root, MODELS, "m", None, &0, |d| {
                std::fs::write(d.join("w"), "x").map_err(|e| e.to_string())
            })
            .unwrap();
        }
    }

    fn v(n: u64) -> ModelVersion {
        ModelVersion(n)
    }

    #[test]
    fn retention_keeps_the_newest_and_every_pinned_version() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), 6);
        let reg = Registry::open(dir.path());
        reg.storage.pin(MODELS, "m", v(1), "ann-0").unwrap();
        let removed = reg
            .collect(MODELS, "m", 2, &BTreeSet::from([v(3)]))
            .unwrap();
        assert_eq!(removed, vec![v(2), v(4)]);
        assert_eq!(reg.list(MODELS, "m").unwrap(), vec![v(1), v(3), v(5), v(6)]);
        reg.storage.unpin(MODELS, "m", v(1), "ann-0").unwrap();
        assert_eq!(
            reg.collect(MODELS, "m", 2, &BTreeSet::new()).unwrap(),
            vec![v(1), v(3)]
        );
    }

    #[test]
    fn a_version_stays_pinned_while_any_holder_pins_it() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), 1);
        let s = LocalFs::new(dir.path());
        s.pin(MODELS, "m", v(1), "a").unwrap();
        s.pin(MODELS, "m", v(1), "b").unwrap();
        s.unpin(MODELS, "m", v(1), "a").unwrap();
        assert!(s.pinned(MODELS, "m").unwrap().contains(&v(1)));
        s.unpin(MODELS, "m", v(1), "b").unwrap();
        assert!(s.pinned(MODELS, "m").unwrap().is_empty());
        assert!(s.pin(MODELS, "m", v(1), "../escape").is_err());
    }

    #[test]
    fn resolve_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), 3);
        let reg = Registry::open(dir.path());
        assert_eq!(reg.resolve(MODELS, "m", "latest").unwrap(), v(3));
        assert_eq!(reg.resolve(MODELS, "m", "v2").unwrap(), v(2));
        assert!(reg.resolve(MODELS, "m", "v9").is_err());
        assert_eq!(reg.newest(MODELS, "m", 2).unwrap(), vec![v(2), v(3)]);
        reg.verify(MODELS, "m", v(2)).unwrap();
        std::fs::write(
            tandem_artifact::version_dir(dir.path(), MODELS, "m", v(2)).join("w"),
            "y",
        )
        .unwrap();
        assert!(reg
            .verify(MODELS, "m", v(2))
            .unwrap_err()
            .to_string()
            .contains("checksum mismatch"));
    }
}
