//! `cargo bench --bench conv [-- --quick]`: the conv3d throughput table of `unet3d bench conv`.

use unet3d::bench::conv::{self, ConvBenchOptions};

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    print!("{}", conv::format_table(&conv::run(&ConvBenchOptions { quick, threads: None })?));
    Ok(())
}
