//! `unet3d example-data`: a small synthetic multi-task dataset in the layout tasks/demo.yaml
//! reads, so a new user can train and infer without data of their own. Each volume holds a few
//! tilted, wavy sheets (like the layers of a scanned scroll): a binary `sheet` label, the
//! `distance` to the nearest sheet, its unit `normals`, and a noisy uint8 `input` rendering.

use std::f64::consts::TAU;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};

use super::DType;
use super::zarr::{ArraySpec, ZarrWriter};

/// Distances are clipped here; normals are zero (undefined) at and beyond it.
pub const DISTANCE_CLIP: f32 = 8.0;
const SHEETS: usize = 3;

#[derive(Debug, Clone)]
pub struct ExampleOptions {
    pub volumes: usize,
    /// Edge length of each cubic volume.
    pub size: usize,
    pub seed: u64,
    pub overwrite: bool,
}

impl Default for ExampleOptions {
    fn default() -> Self {
        ExampleOptions { volumes: 4, size: 64, seed: 0, overwrite: false }
    }
}

/// One synthetic volume, every array (D, H, W, C) channels-last.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleVolume {
    pub size: usize,
    /// uint8 values.
    pub input: Vec<f32>,
    /// 1 on a sheet (distance < 1), else 0.
    pub sheet: Vec<f32>,
    /// Distance to the nearest sheet in voxels, clipped at [`DISTANCE_CLIP`].
    pub distance: Vec<f32>,
    /// Unit normal of the nearest sheet, 3 channels: the components along W, H, D (channel k along
    /// array axis 2 - k, the seed's x, y, z); zero where the distance is clipped.
    pub normals: Vec<f32>,
}

/// The level set f(p) = n·(p - c) - a·sin(k u·p + phase) = 0 in (d, h, w) coordinates: a plane
/// with normal n (mostly along D), rippled along u (perpendicular to n).
struct Sheet {
    n: [f64; 3],
    u: [f64; 3],
    center: [f64; 3],
    amplitude: f64,
    wavenumber: f64,
    phase: f64,
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn unit(a: [f64; 3]) -> [f64; 3] {
    let l = dot(a, a).sqrt();
    a.map(|v| v / l)
}

impl Sheet {
    fn random(rng: &mut StdRng, size: f64, offset: f64) -> Sheet {
        let n = unit([1.0, rng.random_range(-0.3..0.3), rng.random_range(-0.3..0.3)]);
        let r = unit([rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]);
        // u = the part of r perpendicular to n.
        let along = dot(r, n);
        let u = unit([r[0] - along * n[0], r[1] - along * n[1], r[2] - along * n[2]]);
        let mid = size / 2.0;
        Sheet {
            n,
            u,
            center: [mid + offset * n[0], mid + offset * n[1], mid + offset * n[2]],
            amplitude: rng.random_range(0.5..size / 16.0 + 1.0),
            wavenumber: TAU / rng.random_range(size / 2.0..size),
            phase: rng.random_range(0.0..TAU),
        }
    }

    /// First-order distance |f| / |grad f| and the unit gradient (oriented along n).
    fn distance_normal(&self, p: [f64; 3]) -> (f64, [f64; 3]) {
        let rel = [p[0] - self.center[0], p[1] - self.center[1], p[2] - self.center[2]];
        let arg = self.wavenumber * dot(self.u, p) + self.phase;
        let f = dot(self.n, rel) - self.amplitude * arg.sin();
        let slope = self.amplitude * self.wavenumber * arg.cos();
        let g = [0, 1, 2].map(|k| self.n[k] - slope * self.u[k]);
        let len = dot(g, g).sqrt();
        (f.abs() / len, g.map(|v| v / len))
    }
}

/// The volume for `seed`: the same seed gives the same volume.
pub fn synth_volume(size: usize, seed: u64) -> ExampleVolume {
    let mut rng = StdRng::seed_from_u64(seed);
    let s = size as f64;
    let sheets: Vec<Sheet> = (0..SHEETS)
        .map(|k| Sheet::random(&mut rng, s, ((k + 1) as f64 / (SHEETS + 1) as f64 - 0.5) * s))
        .collect();
    let noise = Normal::new(0.0, 20.0).expect("a positive std");
    let voxels = size * size * size;
    let mut v = ExampleVolume {
        size,
        input: Vec::with_capacity(voxels),
        sheet: Vec::with_capacity(voxels),
        distance: Vec::with_capacity(voxels),
        normals: Vec::with_capacity(voxels * 3),
    };
    for z in 0..size {
        for y in 0..size {
            for x in 0..size {
                let p = [z as f64, y as f64, x as f64];
                let (d, n) = sheets
                    .iter()
                    .map(|sh| sh.distance_normal(p))
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .expect("at least one sheet");
                let d = (d as f32).min(DISTANCE_CLIP);
                v.distance.push(d);
                v.sheet.push(if d < 1.0 { 1.0 } else { 0.0 });
                let n = if d < DISTANCE_CLIP { [n[2], n[1], n[0]].map(|c| c as f32) } else { [0.0; 3] };
                v.normals.extend(n);
                let bright = 30.0 + 170.0 * (-(d * d) / 2.0).exp() + noise.sample(&mut rng) as f32;
                v.input.push(bright.round().clamp(0.0, 255.0));
            }
        }
    }
    v
}

/// Writes `dir/volume{k}.zarr/{input,sheet,distance,normals}` for k < volumes; returns the
/// `.zarr` directories.
pub fn write_example_data(dir: &Path, opts: &ExampleOptions) -> Result<Vec<PathBuf>> {
    ensure!(opts.volumes > 0 && opts.size >= 8, "need at least one volume of at least 8^3 voxels");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let bar = super::convert::progress(opts.volumes, "example-data", "volumes");
    let mut written = Vec::new();
    for k in 0..opts.volumes {
        let out = dir.join(format!("volume{k}.zarr"));
        let v = synth_volume(opts.size, opts.seed.wrapping_mul(1_000_003).wrapping_add(k as u64));
        let shape = [opts.size; 3];
        let arrays: [(&str, DType, usize, &[f32]); 4] = [
            ("input", DType::U8, 1, &v.input),
            ("sheet", DType::U8, 1, &v.sheet),
            ("distance", DType::F32, 1, &v.distance),
            ("normals", DType::F32, 3, &v.normals),
        ];
        for (name, dtype, channels, data) in arrays {
            let mut attributes = serde_json::Map::new();
            attributes.insert(
                "source".into(),
                format!("unet3d example-data, seed {}, volume {k}", opts.seed).into(),
            );
            let spec = ArraySpec { shape, channels, chunks: [64; 3], dtype, attributes };
            ZarrWriter::create(&out.join(name), &spec, opts.overwrite)?.write_region([0; 3], shape, data)?;
        }
        written.push(out);
        bar.inc(1);
    }
    bar.finish();
    Ok(written)
}
