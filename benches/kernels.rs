//! `cargo bench --bench kernels [-- --device cuda:0] [-- --quick]`: the CUDA kernel tables of
//! `unet3d bench kernels` (TFLOP/s for the ResEncM conv layers, GB/s for the rest). The default
//! device is the sim, which runs tiny shapes only: a smoke test there, a measurement on a GPU.

use unet3d::device::kernels::bench::{self, KernelBenchOptions};
use unet3d::device::launch::Gpu;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let device = args.iter().position(|a| a == "--device").and_then(|i| args.get(i + 1));
    let gpu = Gpu::open(device.map_or("sim", String::as_str))?;
    let quick = gpu.is_sim() || args.iter().any(|a| a == "--quick");
    print!("{}", bench::report(&gpu, &KernelBenchOptions { quick })?);
    Ok(())
}
