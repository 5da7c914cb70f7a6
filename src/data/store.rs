//! A Zarr filesystem store whose writes are whole or absent.
//!
//! zarrs' filesystem store writes a key in place (open, truncate, write), so a job killed or a
//! disk filled mid-write leaves a truncated chunk that every later read of it fails on ("incomplete
//! frame"). This store writes each value to `.<name>.partial` beside its key and renames it over
//! the key; a rename replaces the name atomically, so a reader or a rerun sees the old chunk, the
//! new one, or none. The temporary name is fixed per key: one writer owns a chunk at a time (a
//! block's chunks belong to one job), and a rerun that writes the chunk again replaces what a
//! killed write left. Reads, listings and erasures are the filesystem store's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::byte_range::ByteRangeIterator;
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, OffsetBytesIterator, ReadableStorageTraits,
    StorageError, StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix, WritableStorageTraits,
    store_set_partial_many,
};

#[derive(Debug)]
pub struct AtomicStore {
    inner: FilesystemStore,
}

impl AtomicStore {
    pub fn new(base: &Path) -> anyhow::Result<AtomicStore> {
        let inner = FilesystemStore::new(base)
            .map_err(|e| anyhow::anyhow!("{}: cannot open as a Zarr store: {e}", base.display()))?;
        Ok(AtomicStore { inner })
    }

    /// Where a key's value is written before its rename.
    pub fn partial_path(&self, key: &StoreKey) -> PathBuf {
        let path = self.inner.key_to_fspath(key);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        path.with_file_name(format!(".{name}.partial"))
    }
}

fn io(e: std::io::Error) -> StorageError {
    StorageError::IOError(Arc::new(e))
}

impl ReadableStorageTraits for AtomicStore {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        self.inner.get_partial_many(key, byte_ranges)
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        self.inner.size_key(key)
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

impl WritableStorageTraits for AtomicStore {
    fn set(&self, key: &StoreKey, value: Bytes) -> Result<(), StorageError> {
        let path = self.inner.key_to_fspath(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let tmp = self.partial_path(key);
        // Synced before the rename, as the filesystem store syncs its writes: a power loss must
        // not leave the new name on unwritten blocks.
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&value).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    /// A whole-value rewrite through [`Self::set`], so partial writes are atomic too.
    fn set_partial_many(
        &self,
        key: &StoreKey,
        offset_values: OffsetBytesIterator,
    ) -> Result<(), StorageError> {
        store_set_partial_many(self, key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> Result<(), StorageError> {
        self.inner.erase(key)
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> Result<(), StorageError> {
        self.inner.erase_prefix(prefix)
    }

    fn supports_set_partial(&self) -> bool {
        false
    }
}

impl ListableStorageTraits for AtomicStore {
    fn list(&self) -> Result<StoreKeys, StorageError> {
        self.inner.list()
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> Result<StoreKeys, StorageError> {
        self.inner.list_prefix(prefix)
    }

    fn list_dir(&self, prefix: &StorePrefix) -> Result<StoreKeysPrefixes, StorageError> {
        self.inner.list_dir(prefix)
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> Result<u64, StorageError> {
        self.inner.size_prefix(prefix)
    }
}
