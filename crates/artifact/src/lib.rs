//! The artifact store: immutable, checksummed, atomically published artifact versions on a
//! filesystem path that several processes may share.
//!
//! Layout: `<root>/<kind>/<name>/<version>/` holding the payload files, `manifest.json` (names,
//! version, sha256 of every payload file, and a kind-specific `meta` object) and
//! `MANIFEST.sha256` (the checksum of `manifest.json` itself).
//!
//! A file larger than [`CHUNK_BYTES`] also records the sha256 of each consecutive chunk of it,
//! and a reader checks those chunks on every core instead of the whole file on one: a 10M-item
//! index (4.7 GB) is verified in a fraction of a second on a many-core host, and any changed
//! byte still fails its chunk. The whole-file sha256 stays in the manifest for other tools.
//!
//! A version is written into a hidden temporary directory beside its final place, every file
//! and the directory are fsynced, and only then is it renamed into place. Readers never see a
//! half-written version: a crash leaves at most a `.tmp-*` directory, which listing ignores.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_types::ModelVersion;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_CHECKSUM_FILE: &str = "MANIFEST.sha256";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: checksum mismatch (expected sha256 {expected}, found {actual}): the file is corrupt or was modified")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: checksum mismatch in bytes {start}..{end} (expected sha256 {expected}, found {actual}): the file is corrupt or was modified")]
    ChunkMismatch {
        path: PathBuf,
        start: u64,
        end: u64,
        expected: String,
        actual: String,
    },
    #[error("{path}: size mismatch (expected {expected} bytes, found {actual})")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: invalid manifest: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },
    #[error("{path}: no published version found")]
    NoVersions { path: PathBuf },
    #[error("{path}: version {version} already exists")]
    VersionExists {
        path: PathBuf,
        version: ModelVersion,
    },
    #[error("writing artifact payload: {0}")]
    Payload(String),
}

pub type Result<T, E = ArtifactError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
    /// Chunk size of `chunks` (0: the file is checked whole).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_bytes: u64,
    /// The sha256 of each consecutive `chunk_bytes` of the file (the last may be shorter).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// Files larger than this are hashed (and verified) in chunks of this size as well.
pub const CHUNK_BYTES: u64 = 16 << 20;

/// The manifest of one published artifact version. `meta` is the kind-specific payload
/// (a [`tandem_types::ModelManifest`] for models).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest<M> {
    pub format: u32,
    pub kind: String,
    pub name: String,
    pub version: ModelVersion,
    /// Unix seconds.
    pub created_at: i64,
    pub files: BTreeMap<String, FileEntry>,
    pub meta: M,
}

/// Where a kind/name lives under the store root.
pub fn series_dir(root: &Path, kind: &str, name: &str) -> PathBuf {
    root.join(kind).join(name)
}

/// Published versions of `kind/name`, oldest first. Temporary directories and directories
/// without a manifest checksum (not yet complete) are skipped.
pub fn list_versions(root: &Path, kind: &str, name: &str) -> Result<Vec<ModelVersion>> {
    let dir = series_dir(root, kind, name);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let mut versions = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if let Ok(v) = name.parse::<ModelVersion>() {
            if entry.path().join(MANIFEST_CHECKSUM_FILE).is_file() {
                versions.push(v);
            }
        }
    }
    versions.sort();
    Ok(versions)
}

/// The newest published version of `kind/name`.
pub fn newest_version(root: &Path, kind: &str, name: &str) -> Result<ModelVersion> {
    list_versions(root, kind, name)?
        .pop()
        .ok_or_else(|| ArtifactError::NoVersions {
            path: series_dir(root, kind, name),
        })
}

pub fn version_dir(root: &Path, kind: &str, name: &str, version: ModelVersion) -> PathBuf {
    series_dir(root, kind, name).join(version.to_string())
}

/// What [`publish`] produced.
#[derive(Debug, Clone)]
pub struct Published {
    pub dir: PathBuf,
    pub version: ModelVersion,
}

/// Publishes a new version of `kind/name` under `root`.
///
/// `write_payload` fills a fresh temporary directory with the payload files. Then every file
/// is hashed and fsynced, the manifest and its checksum are written, and the directory is
/// renamed into place. With `version: None` the next free version number is taken; if another
/// process publishes the same number first, the rename fails (the target is a non-empty
/// directory) and the next number is tried, so concurrent publishers never overwrite each other.
pub fn publish<M, F>(
    root: &Path,
    kind: &str,
    name: &str,
    version: Option<ModelVersion>,
    meta: &M,
    write_payload: F,
) -> Result<Published>
where
    M: Serialize,
    F: FnOnce(&Path) -> std::result::Result<(), String>,
{
    let series = series_dir(root, kind, name);
    fs::create_dir_all(&series).map_err(io_err(&series))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let tmp = series.join(format!(".tmp-{}-{nanos}", std::process::id()));
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let result = publish_inner(&series, &tmp, kind, name, version, meta, write_payload);
    if result.is_err() {
        // Best effort: a leftover temp dir is invisible to readers anyway.
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn publish_inner<M, F>(
    series: &Path,
    tmp: &Path,
    kind: &str,
    name: &str,
    version: Option<ModelVersion>,
    meta: &M,
    write_payload: F,
) -> Result<Published>
where
    M: Serialize,
    F: FnOnce(&Path) -> std::result::Result<(), String>,
{
    write_payload(tmp).map_err(ArtifactError::Payload)?;
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(tmp).map_err(io_err(tmp))? {
        let path = entry.map_err(io_err(tmp))?.path();
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !path.is_file() || file_name == MANIFEST_FILE || file_name == MANIFEST_CHECKSUM_FILE {
            continue;
        }
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&path))?;
        files.insert(file_name, hash_file(&path)?);
    }
    let created_at = tandem_types::clock::now_unix();
    let mut next = match version {
        Some(v) => v,
        None => next_free(series)?,
    };
    loop {
        let manifest = Manifest {
            format: FORMAT,
            kind: kind.to_string(),
            name: name.to_string(),
            version: next,
            created_at,
            files: files.clone(),
            meta,
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| ArtifactError::InvalidManifest {
                path: tmp.join(MANIFEST_FILE),
                reason: e.to_string(),
            })?;
        write_synced(&tmp.join(MANIFEST_FILE), &json)?;
        write_synced(
            &tmp.join(MANIFEST_CHECKSUM_FILE),
            format!("{}\n", sha256_hex(&json)).as_bytes(),
        )?;
        sync_dir(tmp)?;
        let target = series.join(next.to_string());
        match fs::rename(tmp, &target) {
            Ok(()) => {
                sync_dir(series)?;
                return Ok(Published {
                    dir: target,
                    version: next,
                });
            }
            Err(_) if target.exists() && version.is_none() => next = ModelVersion(next.0 + 1),
            Err(_) if target.exists() => {
                return Err(ArtifactError::VersionExists {
                    path: target,
                    version: next,
                })
            }
            Err(e) => return Err(io_err(&target)(e)),
        }
    }
}

/// One past the highest version number present, counting incomplete directories too so a
/// number is never reused.
fn next_free(series: &Path) -> Result<ModelVersion> {
    let mut max = 0;
    for entry in fs::read_dir(series).map_err(io_err(series))? {
        let entry = entry.map_err(io_err(series))?;
        if let Some(v) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<ModelVersion>().ok())
        {
            max = max.max(v.0);
        }
    }
    Ok(ModelVersion(max + 1))
}

/// A manifest's file entry must be a plain file name inside the version directory: no path
/// separators, no `..`, nothing hidden behind a symlink, and a regular file.
fn checked_entry(dir: &Path, file: &str) -> Result<PathBuf> {
    let plain = !file.is_empty()
        && file != "."
        && file != ".."
        && !file.contains(['/', '\\', '\0'])
        && !file.starts_with('.');
    let path = dir.join(file);
    if !plain {
        return Err(ArtifactError::InvalidManifest {
            path: dir.join(MANIFEST_FILE),
            reason: format!(
                "file entry {file:?} is not a plain file name inside the version directory"
            ),
        });
    }
    let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
    if !meta.file_type().is_file() {
        return Err(ArtifactError::InvalidManifest {
            path: dir.join(MANIFEST_FILE),
            reason: format!(
                "file entry {file:?} is not a regular file (a symlink, device or directory)"
            ),
        });
    }
    Ok(path)
}

/// Opens a published version directory, verifying the manifest checksum, that the manifest
/// describes this directory (its name and version match the path), and the sha256 and size of
/// every payload file (sizes first, so a wrong size is refused without reading the file). The
/// error names the first file that does not match.
pub fn open<M: DeserializeOwned>(dir: &Path) -> Result<Manifest<M>> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let checksum_path = dir.join(MANIFEST_CHECKSUM_FILE);
    let json = fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
    let expected = fs::read_to_string(&checksum_path).map_err(io_err(&checksum_path))?;
    let expected = expected.trim();
    let actual = sha256_hex(&json);
    if expected != actual {
        return Err(ArtifactError::ChecksumMismatch {
            path: manifest_path,
            expected: expected.to_string(),
            actual,
        });
    }
    let manifest: Manifest<M> =
        serde_json::from_slice(&json).map_err(|e| ArtifactError::InvalidManifest {
            path: manifest_path.clone(),
            reason: e.to_string(),
        })?;
    check_location(dir, &manifest)?;
    for (file, entry) in &manifest.files {
        let path = checked_entry(dir, file)?;
        let size = fs::metadata(&path).map_err(io_err(&path))?.len();
        if size != entry.bytes {
            return Err(ArtifactError::SizeMismatch {
                path,
                expected: entry.bytes,
                actual: size,
            });
        }
        if entry.chunk_bytes > 0 && !entry.chunks.is_empty() {
            verify_chunks(&path, entry)?;
            continue;
        }
        // Checked whole (no chunk checksums recorded): one pass, no chunk hashes computed.
        let (sha256, bytes) = hash_read(File::open(&path).map_err(io_err(&path))?, &path)?;
        if bytes != entry.bytes {
            return Err(ArtifactError::SizeMismatch {
                path,
                expected: entry.bytes,
                actual: bytes,
            });
        }
        if sha256 != entry.sha256 {
            return Err(ArtifactError::ChecksumMismatch {
                path,
                expected: entry.sha256.clone(),
                actual: sha256,
            });
        }
    }
    Ok(manifest)
}

/// A version directory named like a version (`…/<name>/vN`) must hold the manifest of exactly
/// that name and version: a copied directory (`cp -r v1 v3`) is not version 3.
fn check_location<M>(dir: &Path, manifest: &Manifest<M>) -> Result<()> {
    let Some(dir_version) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<ModelVersion>().ok())
    else {
        return Ok(());
    };
    let dir_name = dir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if dir_version != manifest.version || dir_name != manifest.name {
        return Err(ArtifactError::InvalidManifest {
            path: dir.join(MANIFEST_FILE),
            reason: format!(
                "the manifest is {} {}, but the directory is {dir_name}/{dir_version} (a copied or moved version is refused)",
                manifest.name, manifest.version
            ),
        });
    }
    Ok(())
}

/// The sha256 and size of the file at `path`, with chunk checksums when it is larger than
/// [`CHUNK_BYTES`].
pub fn hash_file(path: &Path) -> Result<FileEntry> {
    hash_file_chunked(path, CHUNK_BYTES)
}

/// [`hash_file`] with chunks of `chunk` bytes (for files larger than one chunk).
pub fn hash_file_chunked(path: &Path, chunk: u64) -> Result<FileEntry> {
    let size = fs::metadata(path).map_err(io_err(path))?.len();
    let chunked = chunk > 0 && size > chunk;
    // The chunks on every core, the whole file beside them on one more thread.
    let (whole, chunks) = rayon::join(
        || hash_read(File::open(path).map_err(io_err(path))?, path),
        || -> Result<Vec<String>> {
            if !chunked {
                return Ok(Vec::new());
            }
            (0..size.div_ceil(chunk))
                .into_par_iter()
                .map(|k| hash_range(path, k * chunk, chunk.min(size - k * chunk)))
                .collect()
        },
    );
    let ((sha256, bytes), chunks) = (whole?, chunks?);
    Ok(FileEntry {
        sha256,
        bytes,
        chunk_bytes: if chunked { chunk } else { 0 },
        chunks,
    })
}

/// The sha256 of `len` bytes of the file at `path` from `start` (an error if the file ends
/// sooner).
fn hash_range(path: &Path, start: u64, len: u64) -> Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
    let (sha256, read) = hash_read(file.take(len), path)?;
    if read != len {
        return Err(ArtifactError::Io {
            path: path.to_path_buf(),
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(sha256)
}

/// The sha256 of everything `r` yields, and how many bytes that was (`path` names it in
/// errors).
fn hash_read(mut r: impl Read, path: &Path) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), bytes))
}

/// Checks every chunk of a chunked entry on every core; the first chunk that differs (in file
/// order) is the one reported.
fn verify_chunks(path: &Path, entry: &FileEntry) -> Result<()> {
    let (size, chunk) = (entry.bytes, entry.chunk_bytes);
    if entry.chunks.len() as u64 != size.div_ceil(chunk) {
        return Err(ArtifactError::InvalidManifest {
            path: path.to_path_buf(),
            reason: format!(
                "{} chunk checksums for {size} bytes in chunks of {chunk}",
                entry.chunks.len()
            ),
        });
    }
    let bad = entry
        .chunks
        .par_iter()
        .enumerate()
        .map(|(k, expected)| {
            let start = k as u64 * chunk;
            let end = (start + chunk).min(size);
            match hash_range(path, start, end - start) {
                Ok(actual) if &actual == expected => None,
                Ok(actual) => Some(ArtifactError::ChunkMismatch {
                    path: path.to_path_buf(),
                    start,
                    end,
                    expected: expected.clone(),
                    actual,
                }),
                Err(e) => Some(e),
            }
        })
        .find_map_first(|e| e);
    bad.map_or(Ok(()), Err)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `bytes` to `path` and fsyncs the file.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Writes a single file atomically: temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // A bare file name's parent is "", which names no directory to sync.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_text(root: &Path, text: &str) -> Result<Published> {
        let text = text.to_string();
        publish(
            root,
            "models",
            "m",
            None,
            &serde_json::json!({"k": 1}),
            move |dir| fs::write(dir.join("weights.bin"), text).map_err(|e| e.to_string()),
        )
    }

    #[test]
    fn published_versions_are_numbered_in_order_and_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let a = publish_text(tmp.path(), "one").unwrap();
        let b = publish_text(tmp.path(), "two").unwrap();
        assert_eq!(a.version, ModelVersion(1));
        assert_eq!(b.version, ModelVersion(2));
        assert_eq!(
            list_versions(tmp.path(), "models", "m").unwrap(),
            vec![ModelVersion(1), ModelVersion(2)]
        );
        let m: Manifest<serde_json::Value> = open(&b.dir).unwrap();
        assert_eq!(m.files["weights.bin"].bytes, 3);
    }

    #[test]
    fn a_failed_payload_writer_leaves_nothing_visible() {
        let tmp = tempfile::tempdir().unwrap();
        let err = publish(tmp.path(), "models", "m", None, &0, |dir| {
            fs::write(dir.join("half.bin"), "x").unwrap();
            Err("disk full".to_string())
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert!(list_versions(tmp.path(), "models", "m").unwrap().is_empty());
        let leftovers = fs::read_dir(series_dir(tmp.path(), "models", "m"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn a_crashed_publish_directory_is_ignored_by_listing() {
        let tmp = tempfile::tempdir().unwrap();
        publish_text(tmp.path(), "one").unwrap();
        // What a crash between payload and rename leaves behind.
        let stale = series_dir(tmp.path(), "models", "m").join(".tmp-1-2");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("weights.bin"), "partial").unwrap();
        assert_eq!(
            newest_version(tmp.path(), "models", "m").unwrap(),
            ModelVersion(1)
        );
    }

    #[test]
    fn a_flipped_byte_in_any_file_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = publish_text(tmp.path(), "payload").unwrap();
        for file in ["weights.bin", MANIFEST_FILE] {
            let path = p.dir.join(file);
            let original = fs::read(&path).unwrap();
            let mut bytes = original.clone();
            bytes[2] ^= 0x01;
            fs::write(&path, &bytes).unwrap();
            let err = open::<serde_json::Value>(&p.dir).unwrap_err().to_string();
            assert!(err.contains(file), "{err}");
            assert!(err.contains("checksum mismatch"), "{err}");
            fs::write(&path, &original).unwrap();
        }
        assert!(open::<serde_json::Value>(&p.dir).is_ok());
    }

    #[test]
    fn a_large_file_is_verified_in_chunks_and_a_flip_in_any_chunk_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let size = 2 * CHUNK_BYTES + 12_345;
        let payload: Vec<u8> = (0..size)
            .map(|i| ((i * 2_654_435_761) >> 13) as u8)
            .collect();
        let whole = sha256_hex(&payload);
        let p = publish(tmp.path(), "indexes", "m", None, &0, |dir| {
            fs::write(dir.join("big.bin"), &payload).map_err(|e| e.to_string())
        })
        .unwrap();
        let m: Manifest<serde_json::Value> = open(&p.dir).unwrap();
        let entry = &m.files["big.bin"];
        assert_eq!(
            (entry.sha256.as_str(), entry.chunk_bytes, entry.chunks.len()),
            (whole.as_str(), CHUNK_BYTES, 3)
        );
        let c = CHUNK_BYTES as usize;
        assert_eq!(entry.chunks[1], sha256_hex(&payload[c..2 * c]));
        let path = p.dir.join("big.bin");
        for at in [5, c + 7, size as usize - 1] {
            let mut bad = payload.clone();
            bad[at] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            match open::<serde_json::Value>(&p.dir) {
                Err(ArtifactError::ChunkMismatch { start, end, .. }) => {
                    let k = (at / c) as u64;
                    assert_eq!(
                        (start, end),
                        (k * CHUNK_BYTES, ((k + 1) * CHUNK_BYTES).min(size))
                    );
                }
                other => panic!("a flipped byte at {at} was not refused by its chunk: {other:?}"),
            }
        }
        fs::write(&path, &payload).unwrap();
        assert!(open::<serde_json::Value>(&p.dir).is_ok());
        // A manifest whose chunk list does not cover the file is refused, not half-checked.
        let mut short = entry.clone();
        short.chunks.pop();
        assert!(matches!(
            verify_chunks(&path, &short),
            Err(ArtifactError::InvalidManifest { .. })
        ));
        // Small files stay whole-file only.
        let small = hash_file(&p.dir.join(MANIFEST_FILE)).unwrap();
        assert_eq!((small.chunk_bytes, small.chunks.len()), (0, 0));
    }

    #[test]
    fn an_explicit_existing_version_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        publish_text(tmp.path(), "one").unwrap();
        let err = publish(tmp.path(), "models", "m", Some(ModelVersion(1)), &0, |_| {
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(err, ArtifactError::VersionExists { .. }));
    }
}
