//! The `sim` device: the kernels of kernels/*.cu compiled for the host by build.rs against
//! kernels/sim/cuda_shim.h, and run by the fiber runtime of kernels/sim/fiber.cpp. Blocks run in
//! parallel on rayon's threads; the threads of a block run as fibers of one OS thread, so barriers,
//! shared memory, shuffles and votes keep their GPU semantics. Launches are synchronous.
//!
//! Its buffers are host memory with a red zone on either side that every launch checks, so a kernel
//! writing out of bounds fails the test that ran it instead of corrupting the process quietly.

use std::ffi::{c_char, c_void};
use std::marker::PhantomData;
use std::ptr::NonNull;

use anyhow::{Result, bail};
use rayon::prelude::*;

use super::launch::{DeviceScalar, Kernel, LaunchConfig};

unsafe extern "C" {
    fn unet3d_sim_run_blocks(
        kernel: unsafe extern "C" fn(*mut *mut c_void),
        params: *mut *mut c_void,
        grid: *const u32,
        block: *const u32,
        dyn_smem: u32,
        first: u64,
        count: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn unet3d_sim_use_ucontext(on: i32) -> i32;
}

/// The sim device (stateless: its runtime keeps per-OS-thread fiber stacks).
pub struct SimDevice;

/// Launch parameters read by every block at once (the kernels only read them).
struct SharedParams(*mut *mut c_void);
// SAFETY: the parameter array and the values it points to outlive the launch, which only reads them.
unsafe impl Sync for SharedParams {}

impl SimDevice {
    pub(crate) fn launch(
        &self,
        kernel: Kernel,
        cfg: &LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let blocks = cfg.blocks();
        let chunk = blocks.div_ceil(4 * rayon::current_num_threads() as u64).max(1);
        let shared = SharedParams(params.as_mut_ptr());
        let tramp = kernel.sim_trampoline();
        let failure = (0..blocks.div_ceil(chunk)).into_par_iter().find_map_any(|c| {
            let first = c * chunk;
            let count = chunk.min(blocks - first);
            let mut err = [0 as c_char; 1024];
            let shared = &shared;
            // SAFETY: the trampoline is the kernel's, the parameter array matches its signature
            // (checked by the launch layer), grid and block point to three values each, and err is
            // a writable buffer of the given length.
            let rc = unsafe {
                unet3d_sim_run_blocks(
                    tramp,
                    shared.0,
                    cfg.grid.as_ptr(),
                    cfg.block.as_ptr(),
                    cfg.shared_bytes,
                    first,
                    count,
                    err.as_mut_ptr(),
                    err.len(),
                )
            };
            (rc != 0).then(|| {
                let bytes: Vec<u8> = err.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
        });
        match failure {
            Some(e) => bail!("sim: kernel {}: {e}", kernel.name()),
            None => Ok(()),
        }
    }
}

/// Which context switch the fiber runtime uses from the next launch on: the hand-written one
/// (x86-64 only, the default there) or ucontext (the portable one, and the default elsewhere).
pub fn use_ucontext(on: bool) -> Result<()> {
    // SAFETY: sets an atomic flag in the runtime.
    if unsafe { unet3d_sim_use_ucontext(on as i32) } != 0 {
        bail!("this architecture has no hand-written fiber switch; only ucontext is available");
    }
    Ok(())
}

/// Bytes of red zone before and after each buffer.
const RED_ZONE: usize = 64;
const RED_BYTE: u8 = 0xa5;
const WORD: usize = size_of::<u128>();

/// A sim buffer: `len` elements of `T` between two red zones, 16-byte aligned like the float4 loads
/// of the kernels need. Owned through a raw pointer because kernels write it through addresses.
pub(crate) struct SimMem<T> {
    words: NonNull<u128>,
    nwords: usize,
    len: usize,
    _t: PhantomData<T>,
}

// SAFETY: SimMem owns its allocation like a Box<[T]>; kernels write it only during a launch, while
// the launch layer holds a mutable borrow of the buffer (Arg::write / Arg::reached).
unsafe impl<T: Send> Send for SimMem<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Sync> Sync for SimMem<T> {}

impl<T: DeviceScalar> SimMem<T> {
    /// `len` elements with every byte set to `byte`.
    pub(crate) fn filled(len: usize, byte: u8) -> Self {
        let data_words = (len * size_of::<T>()).div_ceil(WORD);
        let nwords = data_words + 2 * RED_ZONE / WORD;
        let mut v = vec![0u128; nwords].into_boxed_slice();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v[..]);
        bytes.fill(RED_BYTE);
        bytes[RED_ZONE..RED_ZONE + len * size_of::<T>()].fill(byte);
        let words = NonNull::new(Box::into_raw(v) as *mut u128).expect("Box pointers are non-null");
        SimMem { words, nwords, len, _t: PhantomData }
    }

    pub(crate) fn from_slice(data: &[T]) -> Self {
        let mut m = Self::filled(data.len(), 0);
        m.data_mut().copy_from_slice(data);
        m
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` points to `nwords` initialised u128 owned by self.
        bytemuck::cast_slice(unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.nwords) })
    }

    pub(crate) fn data(&self) -> &[T] {
        bytemuck::cast_slice(&self.bytes()[RED_ZONE..RED_ZONE + self.len * size_of::<T>()])
    }

    fn data_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only access.
        let words = unsafe { std::slice::from_raw_parts_mut(self.words.as_ptr(), self.nwords) };
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(words);
        bytemuck::cast_slice_mut(&mut bytes[RED_ZONE..RED_ZONE + self.len * size_of::<T>()])
    }

    /// The address of element 0, as kernels see it.
    pub(crate) fn addr(&self) -> u64 {
        self.words.as_ptr() as u64 + RED_ZONE as u64
    }

    pub(crate) fn red_zones(&self) -> RedZones<'_> {
        RedZones { bytes: self.bytes(), data_bytes: self.len * size_of::<T>() }
    }
}

impl<T> Drop for SimMem<T> {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.words.as_ptr(), self.nwords);
        // SAFETY: `words` came from Box::into_raw of a boxed slice of `nwords` u128.
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// The bytes around a sim buffer's data that no kernel may write.
#[derive(Clone, Copy)]
pub(crate) struct RedZones<'a> {
    bytes: &'a [u8],
    data_bytes: usize,
}

impl RedZones<'_> {
    pub(crate) fn intact(&self) -> bool {
        let before = &self.bytes[..RED_ZONE];
        // The padding between the data and the next 16-byte boundary counts as red zone too.
        let after = &self.bytes[RED_ZONE + self.data_bytes..];
        before.iter().chain(after).all(|&b| b == RED_BYTE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn red_zones_catch_writes_next_to_the_data() {
        let mut m = SimMem::<f32>::filled(3, 0);
        assert!(m.red_zones().intact());
        m.data_mut()[2] = 1.0;
        assert!(m.red_zones().intact());
        assert_eq!(m.addr() % 16, 0);
        let base = m.words.as_ptr() as *mut u8;
        // SAFETY: byte RED_ZONE + 12 is the padding right after the 3 floats, inside the allocation.
        unsafe { *base.add(RED_ZONE + 12) = 0 };
        assert!(!m.red_zones().intact());
    }
}
