//! Zarr v2 and v3 volumes through zarrs. Training reads many small, overlapping patches out of
//! large compressed chunks, so every read goes through one decoded-chunk cache shared by the whole
//! dataset instead of decoding a chunk again per patch.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;
use zarrs::array::CodecOptions;
use zarrs::array::codec::ZstdCodec;
use zarrs::array::data_type::{
    self, Float16DataType, Float32DataType, Int16DataType, UInt8DataType, UInt16DataType,
};
use zarrs::array::{Array, ArrayBuilder, ArrayMetadataOptions, ArraySubset, ElementOwned};

use super::array::{DType, VolumeArray, check_box};
use super::store::AtomicStore;
use crate::tensor::memory::check_allocation;

/// A stored element type: how it becomes the f32 values every reader returns, and back.
trait Elem: ElementOwned + Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Rounds and clamps to the type's range for integers (NaN becomes 0).
    fn from_f32(v: f32) -> Self;
    fn chunk(values: Vec<Self>) -> Chunk;
}

macro_rules! int_elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            fn to_f32(self) -> f32 {
                f32::from(self)
            }
            fn from_f32(v: f32) -> Self {
                // `as` saturates and maps NaN to 0.
                v.round() as $t
            }
            fn chunk(values: Vec<Self>) -> Chunk {
                Chunk::$variant(values)
            }
        }
    };
}
int_elem!(u8, U8);
int_elem!(u16, U16);
int_elem!(i16, I16);

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn chunk(values: Vec<Self>) -> Chunk {
        Chunk::F32(values)
    }
}

impl Elem for half::f16 {
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    /// Rounds to nearest; beyond 65504 becomes infinite, as numpy's astype(float16).
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn chunk(values: Vec<Self>) -> Chunk {
        Chunk::F16(values)
    }
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype`.
macro_rules! with_elem {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::U8 => {
                type $t = u8;
                $body
            }
            DType::U16 => {
                type $t = u16;
                $body
            }
            DType::I16 => {
                type $t = i16;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
        }
    };
}

/// One decoded chunk in its stored type (a uint8 chunk costs a quarter of its f32 copy).
enum Chunk {
    U8(Vec<u8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl Chunk {
    fn bytes(&self) -> usize {
        match self {
            Chunk::U8(v) => v.len(),
            Chunk::U16(v) => v.len() * 2,
            Chunk::I16(v) => v.len() * 2,
            Chunk::F32(v) => v.len() * 4,
            Chunk::F16(v) => v.len() * 2,
        }
    }
}

/// Cache counters: `misses` is the number of chunk decodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Decoded bytes held now.
    pub bytes: usize,
}

/// (array id, chunk indices).
type ChunkKey = (u64, Vec<u64>);

#[derive(Default)]
struct CacheInner {
    /// Chunk and the tick of its last use.
    chunks: HashMap<ChunkKey, (Arc<Chunk>, u64)>,
    /// Last-use tick -> key, oldest first.
    by_use: BTreeMap<u64, ChunkKey>,
    tick: u64,
    stats: CacheStats,
}

/// Decoded chunks shared by every array of a dataset, bounded in bytes (LRU). Clone = same cache.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Mutex<CacheInner>>,
    max_bytes: usize,
}

impl ChunkCache {
    pub fn new(max_bytes: usize) -> Self {
        ChunkCache { inner: Arc::default(), max_bytes }
    }

    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // A panic elsewhere cannot leave the map inconsistent (every update is a few plain steps).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &ChunkKey) -> Option<Arc<Chunk>> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let (chunk, used) = inner.chunks.get_mut(key)?;
        let (chunk, old) = (chunk.clone(), std::mem::replace(used, tick));
        inner.by_use.remove(&old);
        inner.by_use.insert(tick, key.clone());
        inner.stats.hits += 1;
        Some(chunk)
    }

    /// Records a decode and keeps the chunk unless it alone exceeds the bound.
    fn insert(&self, key: ChunkKey, chunk: Arc<Chunk>) {
        let mut inner = self.lock();
        inner.stats.misses += 1;
        let size = chunk.bytes();
        if size > self.max_bytes {
            return;
        }
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((old, used)) = inner.chunks.insert(key.clone(), (chunk, tick)) {
            inner.by_use.remove(&used);
            inner.stats.bytes -= old.bytes();
        }
        inner.by_use.insert(tick, key);
        inner.stats.bytes += size;
        while inner.stats.bytes > self.max_bytes {
            let Some((_, oldest)) = inner.by_use.pop_first() else { break };
            if let Some((evicted, _)) = inner.chunks.remove(&oldest) {
                inner.stats.bytes -= evicted.bytes();
            }
        }
    }
}

/// Where the channels are in a stored 4D array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelAxis {
    /// A 3D array: one channel.
    None,
    First,
    Last,
}

impl ChannelAxis {
    /// The array axis of output axis d, h, w, c (c = usize::MAX for a 3D array).
    fn array_axes(self) -> [usize; 4] {
        match self {
            ChannelAxis::None => [0, 1, 2, usize::MAX],
            ChannelAxis::Last => [0, 1, 2, 3],
            ChannelAxis::First => [1, 2, 3, 0],
        }
    }
}

fn supported_dtype(name: &str, array: &Array<AtomicStore>) -> Result<DType> {
    let dt = array.data_type();
    Ok(if dt.is::<UInt8DataType>() {
        DType::U8
    } else if dt.is::<UInt16DataType>() {
        DType::U16
    } else if dt.is::<Int16DataType>() {
        DType::I16
    } else if dt.is::<Float32DataType>() {
        DType::F32
    } else if dt.is::<Float16DataType>() {
        DType::F16
    } else {
        bail!("{name}: data type {dt} is not supported (uint8, uint16, int16, float32 or float16)")
    })
}

/// Opens the array stored in directory `path` (v2 `.zarray` or v3 `zarr.json`), through the store
/// every array here is read and written with.
fn open_array(path: &Path) -> Result<Array<AtomicStore>> {
    let name = path.display();
    if path.to_str().is_some_and(|p| p.starts_with("http://") || p.starts_with("https://")) {
        bail!("{name}: HTTP stores are not supported; copy the array to a local disk");
    }
    let is_v3_group = || {
        let meta = std::fs::read_to_string(path.join("zarr.json")).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&meta).is_ok_and(|m| m["node_type"] == "group")
    };
    if path.join(".zgroup").is_file() || is_v3_group() {
        bail!(
            "{name}: a Zarr group, not an array; give the path of an array inside it (e.g. {name}/0, \
             the full resolution of an OME-Zarr image)"
        );
    }
    if !has_array_metadata(path) {
        bail!("{name}: no Zarr array here (neither .zarray nor zarr.json exists)");
    }
    let array = Array::open(Arc::new(AtomicStore::new(path)?), "/")
        .with_context(|| format!("{name}: cannot open the Zarr array"))?;
    // Sizes from the metadata, checked before anything is allocated by them: the voxel count must
    // be countable and one decoded chunk (and its f32 copy) must fit in memory.
    let shape = array.shape();
    ensure!(
        shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).is_some(),
        "{name}: zarr.json shape {shape:?} holds more voxels than can be counted"
    );
    let chunk = array
        .chunk_shape_usize(&vec![0; shape.len()])
        .with_context(|| format!("{name}: the chunk grid has no first chunk"))?;
    let bytes = chunk.iter().try_fold(8u64, |n, &d| n.checked_mul(d as u64));
    check_allocation(bytes, format_args!("{name}: a chunk of shape {chunk:?} (zarr.json chunk_shape)"))?;
    Ok(array)
}

fn to_usize(v: &[u64]) -> Vec<usize> {
    v.iter().map(|&x| x as usize).collect()
}

static NEXT_ARRAY_ID: AtomicU64 = AtomicU64::new(0);

/// A Zarr array read by region through a [`ChunkCache`].
pub struct ZarrArray {
    name: String,
    /// Distinguishes this array's chunks in the shared cache.
    id: u64,
    array: Array<AtomicStore>,
    shape: [usize; 3],
    channels: usize,
    dtype: DType,
    axis: ChannelAxis,
    /// Spatial (D, H, W) shape of the first chunk.
    chunk_shape: [usize; 3],
    cache: ChunkCache,
    /// Whether a chunk absent from the store reads as the fill value (sparse label arrays) or is
    /// an error (an input copied or written only in part).
    missing_chunks_read_as_fill: bool,
}

impl ZarrArray {
    /// `path` is an array directory (v2 .zarray or v3 zarr.json), e.g. data/vol0.zarr/input.
    /// `channels`: the expected channel count; a 4D array has its channel axis last (the seed) or
    /// first, whichever has that length (last wins a tie); 3D arrays have 1 channel.
    pub fn open(path: &Path, channels: usize, cache: &ChunkCache) -> Result<ZarrArray> {
        let name = path.display().to_string();
        let array = open_array(path)?;
        let dtype = supported_dtype(&name, &array)?;
        let s = to_usize(array.shape());
        let (shape, axis) = match s.len() {
            3 => {
                ensure!(
                    channels == 1,
                    "{name}: a 3D array of shape {s:?} has 1 channel, but {channels} are expected; \
                     store the channels as a 4th axis (last or first)"
                );
                ([s[0], s[1], s[2]], ChannelAxis::None)
            }
            4 if s[3] == channels => ([s[0], s[1], s[2]], ChannelAxis::Last),
            4 if s[0] == channels => ([s[1], s[2], s[3]], ChannelAxis::First),
            4 => bail!(
                "{name}: shape {s:?} has no channel axis of length {channels} (the expected channel \
                 count) first or last"
            ),
            n => bail!("{name}: {n}D array of shape {s:?}; expected 3D (D, H, W) or 4D with a channel axis"),
        };
        let c = array.chunk_shape_usize(&vec![0; s.len()]).expect("open_array checks the first chunk");
        let ax = axis.array_axes();
        let chunk_shape = [c[ax[0]], c[ax[1]], c[ax[2]]];
        Ok(ZarrArray {
            chunk_shape,
            name,
            id: NEXT_ARRAY_ID.fetch_add(1, Ordering::Relaxed),
            array,
            shape,
            channels,
            dtype,
            axis,
            cache: cache.clone(),
            missing_chunks_read_as_fill: true,
        })
    }

    /// Opens an array whose channel count is whatever it holds: 3D arrays have 1, 4D arrays their
    /// last axis (unet3d's own layout), for readers that have no expected count (`evaluate`).
    pub fn open_channels_last(path: &Path, cache: &ChunkCache) -> Result<ZarrArray> {
        let shape = open_array(path)?.shape().to_vec();
        let channels = if shape.len() == 4 { shape[3] as usize } else { 1 };
        ZarrArray::open(path, channels, cache)
    }

    /// Makes a chunk absent from the store an error naming it, instead of the fill value.
    pub fn refusing_missing_chunks(self) -> ZarrArray {
        ZarrArray { missing_chunks_read_as_fill: false, ..self }
    }

    /// The spatial (D, H, W) shape of the first chunk.
    pub fn chunk_shape(&self) -> [usize; 3] {
        self.chunk_shape
    }

    pub fn attributes(&self) -> serde_json::Map<String, serde_json::Value> {
        self.array.attributes().clone()
    }

    fn chunk(&self, indices: Vec<u64>) -> Result<Arc<Chunk>> {
        let key = (self.id, indices);
        if let Some(c) = self.cache.get(&key) {
            return Ok(c);
        }
        let chunk = with_elem!(self.dtype, T => {
            let decode = || format!("{}: cannot decode chunk {:?}", self.name, key.1);
            let values: Vec<T> = if self.missing_chunks_read_as_fill {
                self.array.retrieve_chunk(&key.1).with_context(decode)?
            } else {
                match self.array.retrieve_chunk_if_exists(&key.1).with_context(decode)? {
                    Some(v) => v,
                    None => bail!(
                        "{}: chunk {:?} is missing from the store (copied or written only in part?); set \
                         dataset_config.allow_missing_chunks: true to read missing chunks as the fill value",
                        self.name,
                        key.1
                    ),
                }
            };
            T::chunk(values)
        });
        let chunk = Arc::new(chunk);
        self.cache.insert(key, chunk.clone());
        Ok(chunk)
    }

    /// Copies the part of `chunk` (at array indices `indices`) inside the box into `out`.
    fn copy_chunk(
        &self,
        indices: &[u64],
        chunk: &Chunk,
        start: [usize; 4],
        size: [usize; 4],
        out: &mut [f32],
    ) -> Result<()> {
        let subset = self
            .array
            .chunk_subset(indices)
            .with_context(|| format!("{}: no chunk {indices:?} in the chunk grid", self.name))?;
        let (cs, csh) = (to_usize(subset.start()), to_usize(subset.shape()));
        let nd = csh.len();
        let mut strides = vec![1; nd];
        for k in (0..nd - 1).rev() {
            strides[k] = strides[k + 1] * csh[k + 1];
        }
        let ax = self.axis.array_axes();
        // Chunk start, end and stride per output axis (d, h, w, c).
        let (mut c0, mut c1, mut st) = ([0; 4], [1; 4], [0; 4]);
        for o in 0..4 {
            if ax[o] < nd {
                (c0[o], c1[o], st[o]) = (cs[ax[o]], cs[ax[o]] + csh[ax[o]], strides[ax[o]]);
            }
        }
        let overlap = Overlap {
            lo: std::array::from_fn(|o| start[o].max(c0[o])),
            hi: std::array::from_fn(|o| (start[o] + size[o]).min(c1[o])),
            start,
            size,
            chunk_start: c0,
            strides: st,
        };
        match chunk {
            Chunk::U8(v) => overlap.copy(v, out),
            Chunk::U16(v) => overlap.copy(v, out),
            Chunk::I16(v) => overlap.copy(v, out),
            Chunk::F32(v) => overlap.copy(v, out),
            Chunk::F16(v) => overlap.copy(v, out),
        }
        Ok(())
    }
}

impl VolumeArray for ZarrArray {
    fn name(&self) -> &str {
        &self.name
    }

    fn shape(&self) -> [usize; 3] {
        self.shape
    }

    fn channels(&self) -> usize {
        self.channels
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn read(&self, start: [usize; 3], size: [usize; 3]) -> Result<Vec<f32>> {
        check_box(&self.name, self.shape, start, size)?;
        let start4 = [start[0], start[1], start[2], 0];
        let size4 = [size[0], size[1], size[2], self.channels];
        let mut out = vec![0.0; size4.iter().product()];
        if out.is_empty() {
            return Ok(out);
        }
        let ax = self.axis.array_axes();
        let nd = self.array.dimensionality();
        let mut ranges = vec![0..0; nd];
        for o in 0..4 {
            if ax[o] < nd {
                ranges[ax[o]] = start4[o] as u64..(start4[o] + size4[o]) as u64;
            }
        }
        let chunks = self
            .array
            .chunks_in_array_subset(&ArraySubset::new_with_ranges(&ranges))
            .ok()
            .flatten()
            .with_context(|| format!("{}: cannot find the chunks of region {ranges:?}", self.name))?;
        let indices = cartesian(&chunks.to_ranges());
        let decoded: Vec<Arc<Chunk>> =
            indices.par_iter().map(|i| self.chunk(i.clone())).collect::<Result<_>>()?;
        for (i, chunk) in indices.iter().zip(&decoded) {
            self.copy_chunk(i, chunk, start4, size4, &mut out)?;
        }
        Ok(out)
    }
}

/// The part of one chunk inside a read box, per output axis (d, h, w, c).
struct Overlap {
    lo: [usize; 4],
    hi: [usize; 4],
    /// The box.
    start: [usize; 4],
    size: [usize; 4],
    chunk_start: [usize; 4],
    /// Of the chunk's elements along each output axis.
    strides: [usize; 4],
}

impl Overlap {
    fn copy<T: Elem>(&self, chunk: &[T], out: &mut [f32]) {
        let Overlap { lo, hi, start: p, size, chunk_start: c0, strides: st } = self;
        for z in lo[0]..hi[0] {
            for y in lo[1]..hi[1] {
                for x in lo[2]..hi[2] {
                    let o = (((z - p[0]) * size[1] + (y - p[1])) * size[2] + (x - p[2])) * size[3];
                    let i = (z - c0[0]) * st[0] + (y - c0[1]) * st[1] + (x - c0[2]) * st[2];
                    for c in lo[3]..hi[3] {
                        out[o + c - p[3]] = chunk[i + (c - c0[3]) * st[3]].to_f32();
                    }
                }
            }
        }
    }
}

/// Every index tuple in the product of `ranges`, last axis fastest.
fn cartesian(ranges: &[Range<u64>]) -> Vec<Vec<u64>> {
    let mut all = vec![vec![]];
    for r in ranges {
        all = all.into_iter().flat_map(|p| r.clone().map(move |i| [p.as_slice(), &[i]].concat())).collect();
    }
    all
}

/// What a [`ZarrWriter`] creates.
#[derive(Debug, Clone, PartialEq)]
pub struct ArraySpec {
    pub shape: [usize; 3],
    pub channels: usize,
    /// Spatial chunk shape; the channel axis is one chunk.
    pub chunks: [usize; 3],
    pub dtype: DType,
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// Writes Zarr v3 arrays, zstd-compressed, channel axis last (omitted when channels == 1), each
/// chunk whole or not at all ([`AtomicStore`]).
pub struct ZarrWriter {
    path: PathBuf,
    array: Array<AtomicStore>,
    spec: ArraySpec,
}

impl ZarrWriter {
    /// Fails if the array exists unless `overwrite`; what it replaces must be a Zarr array.
    pub fn create(path: &Path, spec: &ArraySpec, overwrite: bool) -> Result<ZarrWriter> {
        let name = path.display();
        if path.exists() {
            ensure!(
                overwrite,
                "{name}: already exists; refusing to overwrite it (pass --overwrite to replace it)"
            );
            remove_array(path)?;
        }
        Self::build(path, spec)
    }

    /// The array at `path` if its metadata is there (it must hold `spec`'s shape, channels, chunks
    /// and type), else a new one. Its metadata appears whole or not at all and jobs with one spec
    /// write the same bytes, so racing jobs, and a job after one killed while creating, agree.
    pub fn create_or_open(path: &Path, spec: &ArraySpec) -> Result<ZarrWriter> {
        if !has_array_metadata(path) {
            return Self::build(path, spec);
        }
        let writer = Self::open(path)?;
        let (have, want) = (writer.spec(), spec);
        let clipped: [usize; 3] = std::array::from_fn(|a| want.chunks[a].min(want.shape[a]));
        ensure!(
            (have.shape, have.channels, have.chunks, have.dtype)
                == (want.shape, want.channels, clipped, want.dtype),
            "{}: holds a {:?} array of shape {:?} x {} channels in chunks of {:?}; this run writes {:?} \
             of {:?} x {} in chunks of {clipped:?}",
            path.display(),
            have.dtype,
            have.shape,
            have.channels,
            have.chunks,
            want.dtype,
            want.shape,
            want.channels
        );
        Ok(writer)
    }

    fn build(path: &Path, spec: &ArraySpec) -> Result<ZarrWriter> {
        let name = path.display();
        ensure!(spec.channels >= 1, "{name}: an array needs at least one channel");
        ensure!(
            spec.shape.iter().chain(&spec.chunks).all(|&n| n > 0),
            "{name}: shape {:?} and chunks {:?} must be positive",
            spec.shape,
            spec.chunks
        );
        if let Some(group) = path.parent().filter(|p| p.extension().is_some_and(|e| e == "zarr")) {
            write_group(group)?;
        }
        std::fs::create_dir_all(path).with_context(|| format!("{name}: cannot create the directory"))?;
        let mut shape: Vec<u64> = spec.shape.iter().map(|&n| n as u64).collect();
        let spec =
            ArraySpec { chunks: std::array::from_fn(|a| spec.chunks[a].min(spec.shape[a])), ..spec.clone() };
        let mut chunks: Vec<u64> = spec.chunks.iter().map(|&c| c as u64).collect();
        let mut dims = vec!["z", "y", "x"];
        if spec.channels > 1 {
            shape.push(spec.channels as u64);
            chunks.push(spec.channels as u64);
            dims.push("c");
        }
        let store = Arc::new(AtomicStore::new(path)?);
        let (dt, fill) = match spec.dtype {
            DType::U8 => (data_type::uint8(), zarrs::array::FillValue::from(0u8)),
            DType::U16 => (data_type::uint16(), 0u16.into()),
            DType::I16 => (data_type::int16(), 0i16.into()),
            DType::F32 => (data_type::float32(), 0f32.into()),
            DType::F16 => (data_type::float16(), half::f16::ZERO.into()),
        };
        let array = ArrayBuilder::new(shape, chunks, dt, fill)
            .bytes_to_bytes_codecs(vec![Arc::new(ZstdCodec::new(3, false))])
            .dimension_names(Some(dims))
            .attributes(spec.attributes.clone())
            .build(store, "/")
            .with_context(|| format!("{name}: cannot create the array"))?;
        // Without zarrs' provenance attribute, so `attributes` read back are the spec's.
        let options = ArrayMetadataOptions::default().with_include_zarrs_metadata(false);
        array.store_metadata_opt(&options).with_context(|| format!("{name}: cannot write zarr.json"))?;
        Ok(ZarrWriter { path: path.to_path_buf(), array, spec })
    }

    /// An existing array, to resume writing.
    pub fn open(path: &Path) -> Result<ZarrWriter> {
        let name = path.display().to_string();
        let array = open_array(path)?;
        let dtype = supported_dtype(&name, &array)?;
        let s = to_usize(array.shape());
        let c = array.chunk_shape_usize(&vec![0; s.len()]).expect("open_array checks the first chunk");
        let channels = match s.len() {
            3 => 1,
            4 => s[3],
            n => bail!("{name}: {n}D array of shape {s:?}; a writer needs (D, H, W) or (D, H, W, C)"),
        };
        let spec = ArraySpec {
            shape: [s[0], s[1], s[2]],
            channels,
            chunks: [c[0], c[1], c[2]],
            dtype,
            attributes: array.attributes().clone(),
        };
        Ok(ZarrWriter { path: path.to_path_buf(), array, spec })
    }

    pub fn spec(&self) -> &ArraySpec {
        &self.spec
    }

    /// Removes every chunk the box at `start` of `size` touches, so a region written again starts
    /// from the fill value as it did the first time, whatever an interrupted write left.
    pub fn erase_region(&self, start: [usize; 3], size: [usize; 3]) -> Result<()> {
        let name = self.path.display().to_string();
        check_box(&name, self.spec.shape, start, size)?;
        let mut chunks: Vec<Range<u64>> = (0..3)
            .map(|a| {
                let c = self.spec.chunks[a];
                (start[a] / c) as u64..(start[a] + size[a]).div_ceil(c) as u64
            })
            .collect();
        if self.spec.channels > 1 {
            chunks.push(0..1);
        }
        self.array.erase_chunks(&ArraySubset::new_with_ranges(&chunks)).with_context(|| {
            format!("{name}: cannot erase the chunks of the region at {start:?} of size {size:?}")
        })
    }

    /// (D,H,W,C) f32 values cast to the dtype (round + clamp for integers). Concurrent calls must not
    /// touch the same chunk (zarrs does not lock); whole-chunk writes from different threads/processes are fine.
    pub fn write_region(&self, start: [usize; 3], size: [usize; 3], data: &[f32]) -> Result<()> {
        let name = self.path.display().to_string();
        check_box(&name, self.spec.shape, start, size)?;
        let c = self.spec.channels;
        ensure!(
            data.len() == size.iter().product::<usize>() * c,
            "{name}: {} values for a region of {size:?} x {c} channels",
            data.len()
        );
        let mut ranges: Vec<Range<u64>> =
            (0..3).map(|a| start[a] as u64..(start[a] + size[a]) as u64).collect();
        if c > 1 {
            ranges.push(0..c as u64);
        }
        let subset = ArraySubset::new_with_ranges(&ranges);
        with_elem!(self.spec.dtype, T => {
            let values: Vec<T> = data.iter().map(|&v| T::from_f32(v)).collect();
            // Every chunk is stored, the all-fill ones too: a chunk missing from an array
            // unet3d wrote then means an incomplete copy, which readers of inputs refuse.
            let options = CodecOptions::default().with_store_empty_chunks(true);
            self.array.store_array_subset_opt(&subset, values, &options)
        })
        .with_context(|| format!("{name}: cannot write region at {start:?} of size {size:?}"))
    }
}

/// Whether `path` holds a Zarr array's metadata (v3 `zarr.json` or v2 `.zarray`).
pub fn has_array_metadata(path: &Path) -> bool {
    // A v3 zarr.json may be a group's; one that does not parse is left to the reader to report.
    let v3_array = || {
        let meta = std::fs::read_to_string(path.join("zarr.json")).ok()?;
        let node = serde_json::from_str::<serde_json::Value>(&meta).ok().map(|m| m["node_type"].clone());
        Some(node.is_none_or(|n| n == "array"))
    };
    path.join(".zarray").is_file() || v3_array().unwrap_or(false)
}

/// Removes the Zarr array at `path`, refusing anything that is not one: a name that ends up
/// somewhere unexpected must not take a folder of other files with it.
pub fn remove_array(path: &Path) -> Result<()> {
    ensure!(
        has_array_metadata(path),
        "{}: not a Zarr array (neither zarr.json nor .zarray); refusing to remove it",
        path.display()
    );
    std::fs::remove_dir_all(path).with_context(|| format!("{}: cannot remove the old array", path.display()))
}

/// Writes the v3 group metadata of `dir` with `attributes` (e.g. OME-Zarr multiscales), whole or
/// not at all; an earlier group's metadata is replaced.
pub fn write_group_attributes(dir: &Path, attributes: serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let meta = serde_json::json!({"zarr_format": 3, "node_type": "group", "attributes": attributes});
    crate::tensor::io::write_atomic(&dir.join("zarr.json"), serde_json::to_vec_pretty(&meta)?.as_slice())
}

/// Marks a `.zarr` directory holding arrays as a v3 group, so Zarr tools open it, unless it
/// already is one.
fn write_group(dir: &Path) -> Result<()> {
    if dir.join("zarr.json").exists() || dir.join(".zgroup").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let meta = serde_json::json!({"zarr_format": 3, "node_type": "group", "attributes": {}});
    crate::tensor::io::write_atomic(&dir.join("zarr.json"), meta.to_string().as_bytes())
}
