//! `cargo bench --bench loader [-- --workers N --batches N --patch N --size N]`: training-loader
//! throughput in patches per second with nnU-Net's full augmentation (rotation and scaling
//! forced on every patch, the worst case; the default probabilities are also timed), on an
//! in-memory volume with an input channel, a mask, a distance map and 3-channel normals, batch 2,
//! deep supervision over 6 stages. A third row without augmentation shows the loader's own share.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use unet3d::config::{Augmentation, Config};
use unet3d::data::dataset::{Dataset, Volume};
use unet3d::data::loader::{Loader, LoaderOptions};
use unet3d::data::{DType, InMemoryArray, VolumeArray};

fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .context(name.to_string()),
        None => Ok(default),
    }
}

fn volume(s: usize) -> Result<Volume> {
    let shape = [s, s, s];
    let n = s * s * s;
    let z = |i: usize| i / (s * s);
    let sheet: Vec<f32> = (0..n).map(|i| f32::from(z(i) % 16 < 3)).collect();
    let input: Vec<f32> = (0..n).map(|i| ((i * 7919) % 200) as f32 + 50.0 * sheet[i]).collect();
    let distance: Vec<f32> = (0..n).map(|i| (z(i) % 16) as f32).collect();
    let normals: Vec<f32> = (0..3 * n).map(|i| [65535.0, 32767.0, 32767.0][i % 3]).collect();
    let arr = |name: &str, c: usize, dtype: DType, d: Vec<f32>| -> Result<Arc<dyn VolumeArray>> {
        Ok(Arc::new(InMemoryArray::new(name, shape, c, dtype, d)?))
    };
    Ok(Volume {
        name: "bench".into(),
        input: arr("input", 1, DType::U8, input)?,
        targets: vec![
            arr("sheet", 1, DType::U8, sheet)?,
            arr("distance", 1, DType::F32, distance)?,
            arr("normals", 3, DType::U16, normals)?,
        ],
        ref_label: 0,
    })
}

fn main() -> Result<()> {
    let workers = arg("--workers", 2)?;
    let batches = arg("--batches", 10)?;
    let p = arg("--patch", 128)?;
    let size = arg("--size", 224)?;
    let yaml = "dataset_config:\n  sampling: random\n  normalization: zscore\n  targets:\n    \
                sheet: {channels: 1, loss_fn: BCEWithLogitsLoss}\n    distance: {channels: 1, loss_fn: MSELoss}\n    \
                normals: {channels: 3, loss_fn: MaskedCosineLoss}\n";
    let config = Config::parse(yaml, &[])?.config.dataset_config;
    let dataset = Arc::new(Dataset::from_volumes(vec![volume(size)?]));
    let forced = Augmentation { p_rotation: 1.0, p_scaling: 1.0, ..Augmentation::default() };
    let off = Augmentation { enabled: false, ..Augmentation::default() };
    for (what, aug) in [
        ("rotation + scaling on every patch", forced),
        ("nnU-Net's probabilities", Augmentation::default()),
        ("no augmentation (read, normalise, batch only)", off),
    ] {
        let opts = LoaderOptions {
            patch_size: [p; 3],
            batch_size: 2,
            workers,
            prefetch: 2 * workers.max(1),
            augmentation: Some(aug),
            deep_supervision_strides: vec![[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            seed: 0,
            tr_val_split: 1.0,
            split_seed: 0,
            first_batch: 0,
            dilate_label: false,
        };
        let mut loader = Loader::train(Arc::clone(&dataset), &config, &[0], opts)?;
        loader.next_batch()?;
        let t = Instant::now();
        for _ in 0..batches {
            loader.next_batch()?;
        }
        let secs = t.elapsed().as_secs_f64();
        let rate = (2 * batches) as f64 / secs;
        println!(
            "patch {p}^3, {what}, {workers} workers: {rate:.2} patches/s ({:.0} ms per batch of 2); a GPU at \
             0.1 s per batch of 2 needs {:.1}x this",
            1000.0 * secs / batches as f64,
            20.0 / rate
        );
    }
    Ok(())
}
