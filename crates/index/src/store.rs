//! Where an index's arrays live: in vectors of its own (built, or loaded from an old file) or
//! inside one buffer holding a whole index file, either copied to the heap or memory-mapped.
//!
//! A mapped index costs no copy and no second allocation: loading it is validating it, and its
//! pages are the page cache's, shared by every process that maps the same version and dropped by
//! the kernel under pressure like any cached file. A host swapping versions therefore holds the
//! new version's working set, not two whole indexes.
//!
//! This module holds, with `simd`, the crate's `unsafe`: mapping a file.

#![allow(unsafe_code)]

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use bytemuck::Pod;

use crate::{IndexError, Result};

/// Sections of an index file start on multiples of this (a cache line; `f32`/`u64` alignment
/// follows).
pub const ALIGN: usize = 64;

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; ALIGN]);

/// The bytes of one index file.
pub struct Store(Bytes);

enum Bytes {
    /// A copy on the heap, starting on a cache line.
    Heap { lines: Vec<Line>, len: usize },
    /// The file itself, mapped read-only.
    Map(memmap2::Mmap),
}

impl Store {
    /// An aligned heap copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> Store {
        let mut lines = vec![Line([0; ALIGN]); bytes.len().div_ceil(ALIGN)];
        for (line, chunk) in lines.iter_mut().zip(bytes.chunks(ALIGN)) {
            line.0[..chunk.len()].copy_from_slice(chunk);
        }
        Store(Bytes::Heap {
            lines,
            len: bytes.len(),
        })
    }

    /// Maps the file at `path` read-only.
    pub fn map(path: &Path) -> Result<Store> {
        let io = |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: a mapping is only sound while nobody truncates or rewrites the file. Index
        // files are published once, into a fresh version directory renamed into place, and
        // never written again; removing a version unlinks the file, which keeps the mapped
        // inode alive until the last mapping goes. Writing into a published artifact by hand
        // is outside that contract (and fails its checksum on the next load).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(Store(Bytes::Map(map)))
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            Bytes::Heap { lines, len } => &bytemuck::cast_slice::<Line, u8>(lines)[..*len],
            Bytes::Map(map) => map,
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Bytes::Map(_))
    }
}

/// An array of plain values, owned or seen inside a [`Store`].
pub enum Slab<T> {
    Owned(Vec<T>),
    View {
        store: Arc<Store>,
        start: usize,
        len: usize,
    },
}

impl<T: Pod> Slab<T> {
    /// `len` values of `T` at byte `start` of `store`, refused unless they lie inside it and
    /// start aligned for `T`.
    pub fn view(store: &Arc<Store>, start: usize, len: usize, what: &str) -> Result<Self> {
        let bytes = store.bytes();
        let end = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(start))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| IndexError::Invalid(format!("truncated HNSW file ({what})")))?;
        bytemuck::try_cast_slice::<u8, T>(&bytes[start..end])
            .map_err(|e| IndexError::Invalid(format!("misaligned HNSW section {what}: {e}")))?;
        Ok(Slab::View {
            store: store.clone(),
            start,
            len,
        })
    }
}

impl<T: Pod> Deref for Slab<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match self {
            Slab::Owned(v) => v,
            Slab::View { store, start, len } => bytemuck::cast_slice(
                &store.bytes()[*start..*start + *len * std::mem::size_of::<T>()],
            ),
        }
    }
}

impl<T> From<Vec<T>> for Slab<T> {
    fn from(v: Vec<T>) -> Self {
        Slab::Owned(v)
    }
}

/// Rounds `at` up to the next section boundary.
pub fn align_up(at: usize) -> usize {
    at.div_ceil(ALIGN) * ALIGN
}

// Index files are little-endian and mapped as they are.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "index files are little-endian; a big-endian build would need a converting loader"
);
