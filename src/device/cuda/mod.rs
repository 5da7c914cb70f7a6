//! The `cuda:N` device: cudarc with `dynamic-loading` (nothing CUDA is needed to build, libcuda is
//! opened at run time) and the CUDA 13.0 bindings. One stream per device; allocations are
//! stream-ordered from the device's memory pool (cudarc uses `cuMemAllocAsync` / `cuMemFreeAsync`
//! when the device supports pools), which is told to keep freed memory for reuse; copies are
//! asynchronous on that stream; uploads go through page-locked staging buffers, so an upload
//! returns at once and its copy runs in stream order behind the kernels already queued (a step's
//! batch is uploaded while the previous step still computes); the embedded fatbin is loaded once
//! as one module and every kernel's function looked up at creation.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice,
    result, sys,
};
use cudarc::nvrtc::Ptx;

use super::launch::{DeviceScalar, Kernel, LaunchConfig};

#[cfg(unet3d_kernels)]
const FATBIN: Option<&[u8]> = Some(include_bytes!(concat!(env!("OUT_DIR"), "/unet3d_kernels.fatbin")));
#[cfg(not(unet3d_kernels))]
const FATBIN: Option<&[u8]> = None;

/// Whether build.rs found nvcc and embedded the kernels.
pub fn kernels_embedded() -> bool {
    FATBIN.is_some()
}

/// Whether libcuda can be loaded. cudarc panics on the first driver call without it, so this is
/// checked before anything else touches the driver.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library names cudarc would use.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// One CUDA GPU with the unet3d kernels loaded.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Vec<CudaFunction>,
    name: String,
    arch: (i32, i32),
    sync_each_launch: bool,
    staging: Mutex<Vec<Staging>>,
}

/// A page-locked upload buffer and the event recorded after the last copy out of it: the host may
/// write it again once that event is complete.
struct Staging {
    host: PinnedHostSlice<u8>,
    copied: CudaEvent,
}

/// Staging buffers kept for reuse; beyond this many in flight an upload waits for the oldest.
const STAGING_BUFFERS: usize = 32;

impl CudaDevice {
    /// Opens GPU `ordinal`. Fails with a message (never panics) when the driver library, the GPU or
    /// the embedded kernels are missing. With `UNET3D_CUDA_SYNC=1` every launch is followed by a
    /// synchronisation, so a faulting kernel is named in the error.
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = format!("cuda:{ordinal}");
        ensure!(
            driver_present(),
            "{dev}: the CUDA driver library (libcuda.so) is not installed on this machine; \
             use the cpu or sim device, or install an NVIDIA driver"
        );
        let fatbin = FATBIN.ok_or_else(|| {
            anyhow!(
                "{dev}: this unet3d has no CUDA kernels (nvcc was not found when it was built); rebuild \
                 with NVCC set, e.g. after `bash scripts/install-cuda-toolchain.sh`"
            )
        })?;
        let count =
            CudaContext::device_count().map_err(|e| anyhow!("{dev}: initialising the CUDA driver: {e}"))?;
        ensure!(
            ordinal < count.max(0) as usize,
            "{dev}: no such device (this machine has {count} CUDA devices)"
        );
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("{dev}: creating a context: {e}"))?;
        // SAFETY: the device uses one stream, so there is nothing for cross-stream events to order;
        // this runs before the first allocation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| anyhow!("{dev}: creating a stream: {e}"))?;
        keep_freed_pool_memory(&ctx).map_err(|e| anyhow!("{dev}: configuring the memory pool: {e}"))?;
        let module = ctx
            .load_module(Ptx::from_binary(fatbin.to_vec()))
            .map_err(|e| anyhow!("{dev}: loading the kernels (sm_80 and sm_90 code, compute_80 PTX): {e}"))?;
        let functions = Kernel::all()
            .map(|k| {
                module
                    .load_function(k.name())
                    .map_err(|e| anyhow!("{dev}: kernel {} is not in the module: {e}", k.name()))
            })
            .collect::<Result<Vec<_>>>()?;
        let name = ctx.name().map_err(|e| anyhow!("{dev}: reading the device name: {e}"))?;
        let arch =
            ctx.compute_capability().map_err(|e| anyhow!("{dev}: reading the compute capability: {e}"))?;
        let sync_each_launch = std::env::var_os("UNET3D_CUDA_SYNC").is_some_and(|v| v == "1");
        Ok(CudaDevice {
            ordinal,
            ctx,
            stream,
            functions,
            name,
            arch,
            sync_each_launch,
            staging: Mutex::default(),
        })
    }

    pub fn describe(&self) -> String {
        format!("cuda:{} ({}, sm_{}{})", self.ordinal, self.name, self.arch.0, self.arch.1)
    }

    fn err(&self, what: &str, e: result::DriverError) -> anyhow::Error {
        anyhow!("cuda:{}: {what}: {e}", self.ordinal)
    }

    /// At least one element: CUDA does not allocate zero bytes; the buffer keeps its own length.
    pub(crate) fn alloc<T: DeviceScalar>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the contents are unspecified, as Gpu::alloc documents.
        unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| self.err(&format!("allocating {len} elements"), e))
    }

    pub(crate) fn zeros<T: DeviceScalar>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| self.err(&format!("allocating {len} elements"), e))
    }

    /// A copy of `data` on the device, through a page-locked staging buffer: the host copies into
    /// it and returns while the DMA waits its turn on the stream (from pageable memory the driver
    /// would first wait for every kernel queued before it).
    pub(crate) fn upload<T: DeviceScalar>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        let mut s = self.alloc(data.len())?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.is_empty() {
            return Ok(s);
        }
        let mut pool = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let free = pool.iter().position(|b| b.copied.is_complete() && b.host.len() >= bytes.len());
        let slot = match free {
            Some(i) => i,
            None if pool.len() < STAGING_BUFFERS => {
                // SAFETY: the buffer is written below before any copy reads it.
                let host =
                    unsafe { self.ctx.alloc_pinned::<u8>(bytes.len().next_power_of_two()) }.map_err(|e| {
                        self.err(&format!("allocating {} bytes of page-locked memory", bytes.len()), e)
                    })?;
                let copied = self
                    .ctx
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .map_err(|e| self.err("creating an event", e))?;
                pool.push(Staging { host, copied });
                pool.len() - 1
            }
            None => {
                // Every buffer is in flight: wait for the first one's copy (and grow it if small).
                let i = 0;
                pool[i].copied.synchronize().map_err(|e| self.err("waiting for an upload", e))?;
                if pool[i].host.len() < bytes.len() {
                    // SAFETY: as above.
                    pool[i].host = unsafe { self.ctx.alloc_pinned::<u8>(bytes.len().next_power_of_two()) }
                        .map_err(|e| self.err("allocating page-locked memory", e))?;
                }
                pool.rotate_left(1);
                pool.len() - 1
            }
        };
        let b = &mut pool[slot];
        let host = b.host.as_mut_slice().map_err(|e| self.err("writing page-locked memory", e))?;
        host[..bytes.len()].copy_from_slice(bytes);
        {
            let (dst, _record) = s.device_ptr_mut(&self.stream);
            // SAFETY: `dst` holds `bytes.len()` bytes (allocated for `data` above); the source is
            // page-locked and is not written again before `copied`, recorded right after the copy
            // on the same stream, is complete.
            unsafe { result::memcpy_htod_async(dst, &host[..bytes.len()], self.stream.cu_stream()) }
                .map_err(|e| self.err("copying to the device", e))?;
        }
        b.copied.record(&self.stream).map_err(|e| self.err("recording an upload", e))?;
        Ok(s)
    }

    pub(crate) fn download<T: DeviceScalar>(&self, s: &CudaSlice<T>, len: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&s.slice(..len), &mut v)
                .map_err(|e| self.err("copying to the host", e))?;
        }
        self.synchronize()?;
        Ok(v)
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| self.err("running kernels", e))?;
        self.ctx.check_err().map_err(|e| self.err("freeing memory", e))
    }

    pub(crate) fn time_ms(&self, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let event = || {
            self.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| self.err("creating a timing event", e))
        };
        let (start, end) = (event()?, event()?);
        start.record(&self.stream).map_err(|e| self.err("recording an event", e))?;
        for _ in 0..reps {
            f()?;
        }
        end.record(&self.stream).map_err(|e| self.err("recording an event", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| self.err("timing kernels", e))?;
        Ok(ms as f64 / reps as f64)
    }

    pub(crate) fn addr<T>(s: &CudaSlice<T>) -> u64 {
        s.device_ptr(s.stream()).0
    }

    pub(crate) fn launch(
        &self,
        kernel: Kernel,
        cfg: &LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let f = &self.functions[kernel.index()];
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        self.ctx.bind_to_thread().map_err(|e| self.err("binding the context", e))?;
        // SAFETY: the launch layer checked `params` against the kernel's parameter list; each points
        // to a value of the parameter's size, buffer addresses are live allocations of this context
        // borrowed for the launch, and their stream-ordered free cannot run before the kernel.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (gx, gy, gz),
                (bx, by, bz),
                cfg.shared_bytes,
                self.stream.cu_stream(),
                params,
            )
        }
        .map_err(|e| self.err(&format!("launching {}", kernel.name()), e))?;
        if self.sync_each_launch {
            self.stream.synchronize().map_err(|e| self.err(&format!("kernel {}", kernel.name()), e))?;
        }
        Ok(())
    }
}

/// The default pool returns freed memory to the system at every synchronisation; a training step
/// frees and reallocates the same sizes each iteration, so keep it.
fn keep_freed_pool_memory(ctx: &CudaContext) -> Result<(), result::DriverError> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut threshold = u64::MAX;
    // SAFETY: `cu_device` is this context's device, and the release threshold attribute is a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_device_without_a_driver_is_an_error_not_a_panic() {
        if driver_present() {
            // A GPU machine: an ordinal past the last device is the error to check instead.
            let e = CudaDevice::new(4096).err().expect("no machine has 4097 GPUs").to_string();
            assert!(e.contains("cuda:4096") && e.contains("no such device"), "{e}");
            return;
        }
        let e = CudaDevice::new(0).err().expect("no driver, no device").to_string();
        assert!(e.contains("cuda:0") && e.contains("libcuda.so") && e.contains("not installed"), "{e}");
        let e = crate::device::launch::Gpu::open("cuda:1").err().expect("no driver").to_string();
        assert!(e.contains("cuda:1") && e.contains("libcuda.so"), "{e}");
    }

    #[test]
    fn an_embedded_fatbin_is_one() {
        // Fatbin files start with the magic 0xBA55ED50 (little-endian).
        if let Some(f) = FATBIN {
            assert_eq!(f[..4], 0xBA55_ED50u32.to_le_bytes());
        }
    }
}
