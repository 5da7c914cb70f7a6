//! Lower-resolution levels of an output, written by the streaming pass itself: each block is
//! reduced to every level as it is written, so no second pass reads the volume back, and sharded
//! jobs, which never see each other's blocks, still write the whole pyramid.
//!
//! Each level halves the axes whose voxel size is below twice the finest of the level before (as
//! nnU-Net's planner pools an anisotropic axis only once the others have caught up), so a
//! 3 x 1 x 1 mm volume halves y and x first. A level voxel stands for the full-resolution box
//! [j f, (j + 1) f) per axis, clipped to the volume: a label map takes the box's first voxel (every
//! value stays a class), values take the box's mean. A block holds whole boxes when its corners
//! are multiples of the factors, which holds when the chunk is (blocks are made of whole chunks):
//! [`Pyramid::new`] refuses levels that would split a box between two blocks.

use anyhow::{Result, ensure};
use rayon::prelude::*;

use crate::data::ome;

/// How a level voxel is computed from its box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// The box's first voxel (label maps).
    First,
    /// The mean of the box (values).
    Mean,
}

/// The levels below full resolution of one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pyramid {
    /// Per level 1.., how many full-resolution voxels one of its voxels spans per axis.
    factors: Vec<[usize; 3]>,
    shape: [usize; 3],
    chunk: [usize; 3],
}

const AXES: [&str; 3] = ["z", "y", "x"];

impl Pyramid {
    /// `levels` below full resolution of a volume of `shape` (voxel size `spacing`, isotropic if
    /// unknown) written in chunks of `chunk`. An axis down to one voxel is not halved further.
    pub fn new(
        levels: usize,
        shape: [usize; 3],
        spacing: Option<[f64; 3]>,
        chunk: [usize; 3],
    ) -> Result<Pyramid> {
        let mut factors: Vec<[usize; 3]> = Vec::with_capacity(levels);
        let mut f = [1usize; 3];
        let spacing = spacing.unwrap_or([1.0; 3]);
        for level in 1..=levels {
            let size: [f64; 3] = std::array::from_fn(|a| spacing[a] * f[a] as f64);
            let open: [bool; 3] = std::array::from_fn(|a| shape[a].div_ceil(f[a]) > 1);
            let finest = (0..3).filter(|&a| open[a]).map(|a| size[a]).fold(f64::INFINITY, f64::min);
            let halve: [bool; 3] = std::array::from_fn(|a| open[a] && size[a] < 2.0 * finest);
            ensure!(
                halve.iter().any(|&h| h),
                "inference_config.pyramid_levels: {levels} levels, but level {} of a {shape:?} volume is \
                 one voxel along every axis it could halve",
                level - 1
            );
            f = std::array::from_fn(|a| if halve[a] { 2 * f[a] } else { f[a] });
            for a in 0..3 {
                // One chunk along the axis means one block along it: nothing to align.
                ensure!(
                    chunk[a] >= shape[a] || chunk[a].is_multiple_of(f[a]),
                    "inference_config.pyramid_levels: level {level} spans {} voxels along {} per voxel, \
                     which does not divide the output's chunks of {} voxels (the window) along it, so a \
                     block could not write its own part of the level; ask for {} levels or a patch size \
                     divisible by {}",
                    f[a],
                    AXES[a],
                    chunk[a],
                    level - 1,
                    f[a]
                );
            }
            factors.push(f);
        }
        Ok(Pyramid { factors, shape, chunk })
    }

    /// The number of levels below full resolution.
    pub fn len(&self) -> usize {
        self.factors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.factors.is_empty()
    }

    /// Level `k`'s factor per axis (1 at full resolution, level 0).
    pub fn factor(&self, k: usize) -> [usize; 3] {
        if k == 0 { [1; 3] } else { self.factors[k - 1] }
    }

    /// Where level `k`'s first voxel centre is, in full-resolution voxels from the first one's:
    /// 0 where it samples its box's first voxel, (factor - 1) / 2 where it averages the box.
    pub fn offset(&self, k: usize, how: Reduction) -> [f64; 3] {
        let f = self.factor(k);
        match how {
            Reduction::First => [0.0; 3],
            Reduction::Mean => std::array::from_fn(|a| (f[a] as f64 - 1.0) / 2.0),
        }
    }

    pub fn shape(&self, k: usize) -> [usize; 3] {
        let f = self.factor(k);
        std::array::from_fn(|a| self.shape[a].div_ceil(f[a]))
    }

    /// Level `k`'s chunks: the full-resolution chunks reduced, so a block's part of a level is whole
    /// chunks of it (and no two blocks write one chunk).
    pub fn chunk(&self, k: usize) -> [usize; 3] {
        let f = self.factor(k);
        std::array::from_fn(|a| self.chunk[a].min(self.shape[a]).div_ceil(f[a]))
    }

    /// Level `k`'s part of the block at `lo` of `size`: its corner and size there.
    pub fn region(&self, k: usize, lo: [usize; 3], size: [usize; 3]) -> ([usize; 3], [usize; 3]) {
        let f = self.factor(k);
        (std::array::from_fn(|a| lo[a] / f[a]), std::array::from_fn(|a| size[a].div_ceil(f[a])))
    }

    /// The OME-Zarr levels of an image whose full resolution is at `path` and level k at
    /// `level_path(k)`, for `how`'s sampling.
    pub fn ome_levels(
        &self,
        path: String,
        level_path: impl Fn(usize) -> String,
        how: Reduction,
    ) -> Vec<ome::Level> {
        let mut levels = vec![ome::Level { path, factor: [1; 3], offset: [0.0; 3] }];
        levels.extend((1..=self.len()).map(|k| ome::Level {
            path: level_path(k),
            factor: self.factor(k),
            offset: self.offset(k, how),
        }));
        levels
    }
}

/// The (D, H, W, C) `values` of a block of `size` reduced by `factor` (the block's corner a multiple
/// of it), with the reduced size.
pub fn reduce(
    values: &[f32],
    size: [usize; 3],
    c: usize,
    factor: [usize; 3],
    how: Reduction,
) -> (Vec<f32>, [usize; 3]) {
    let out: [usize; 3] = std::array::from_fn(|a| size[a].div_ceil(factor[a]));
    let plane = out[1] * out[2] * c;
    let mut reduced = vec![0.0; out[0] * plane];
    reduced.par_chunks_mut(plane.max(1)).enumerate().for_each(|(z, plane)| {
        let span = |a: usize, j: usize| j * factor[a]..((j + 1) * factor[a]).min(size[a]);
        let at = |z: usize, y: usize, x: usize| ((z * size[1] + y) * size[2] + x) * c;
        for y in 0..out[1] {
            for x in 0..out[2] {
                let v = &mut plane[(y * out[2] + x) * c..][..c];
                match how {
                    Reduction::First => {
                        let from = at(z * factor[0], y * factor[1], x * factor[2]);
                        v.copy_from_slice(&values[from..from + c]);
                    }
                    Reduction::Mean => {
                        let mut sum = vec![0.0f64; c];
                        let mut n = 0usize;
                        for zz in span(0, z) {
                            for yy in span(1, y) {
                                for xx in span(2, x) {
                                    let from = at(zz, yy, xx);
                                    sum.iter_mut()
                                        .zip(&values[from..from + c])
                                        .for_each(|(s, &x)| *s += f64::from(x));
                                    n += 1;
                                }
                            }
                        }
                        v.iter_mut().zip(&sum).for_each(|(v, s)| *v = (s / n as f64) as f32);
                    }
                }
            }
        }
    });
    (reduced, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anisotropic_axes_wait_for_the_others() {
        let p = Pyramid::new(3, [20, 64, 64], Some([3.0, 1.0, 1.0]), [20, 32, 32]).unwrap();
        // 3 x 1 x 1 mm -> 3 x 2 x 2 -> 6 x 4 x 4 (3 < 2 x 2) -> 12 x 8 x 8 (6 < 2 x 4).
        assert_eq!((p.factor(1), p.factor(2), p.factor(3)), ([1, 2, 2], [2, 4, 4], [4, 8, 8]));
        assert_eq!(p.shape(3), [5, 8, 8]);
        assert_eq!(p.chunk(2), [10, 8, 8]);
        assert_eq!(p.region(2, [0, 32, 0], [20, 32, 32]), ([0, 8, 0], [10, 8, 8]));
        // Isotropic without a spacing; an axis of one voxel stays.
        let p = Pyramid::new(2, [1, 8, 6], None, [1, 8, 6]).unwrap();
        assert_eq!((p.factor(1), p.factor(2)), ([1, 2, 2], [1, 4, 4]));
        assert_eq!(p.shape(2), [1, 2, 2]);
    }

    #[test]
    fn levels_that_would_split_a_box_between_blocks_are_refused() {
        let e = Pyramid::new(3, [100, 100, 100], None, [20, 20, 20]).unwrap_err().to_string();
        assert!(e.contains("level 3 spans 8 voxels along z") && e.contains("ask for 2 levels"), "{e}");
        // One chunk along an axis needs no alignment there.
        assert!(Pyramid::new(3, [20, 20, 20], None, [20, 20, 20]).is_ok());
        let e = Pyramid::new(3, [1, 2, 2], None, [1, 2, 2]).unwrap_err().to_string();
        assert!(e.contains("one voxel along every axis"), "{e}");
    }

    #[test]
    fn reduction_takes_the_first_voxel_or_the_mean_of_the_clipped_box() {
        // A 1 x 3 x 3 block of two channels, reduced by 1 x 2 x 2: boxes of 4, 2, 2 and 1 voxels.
        let values: Vec<f32> = (0..9).flat_map(|i| [i as f32, 10.0 * i as f32]).collect();
        let (first, size) = reduce(&values, [1, 3, 3], 2, [1, 2, 2], Reduction::First);
        assert_eq!(size, [1, 2, 2]);
        assert_eq!(first, [0.0, 0.0, 2.0, 20.0, 6.0, 60.0, 8.0, 80.0]);
        let (mean, _) = reduce(&values, [1, 3, 3], 2, [1, 2, 2], Reduction::Mean);
        // (0+1+3+4)/4, (2+5)/2, (6+7)/2, 8.
        assert_eq!(mean, [2.0, 20.0, 3.5, 35.0, 6.5, 65.0, 8.0, 80.0]);
    }
}
