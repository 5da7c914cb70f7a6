//! Where the sliding windows go: nnU-Net's step rule over a volume padded to at least one patch
//! (reference-spec 4.6), and the global tile grid every block and shard shares.

use anyhow::{Result, ensure};

/// nnU-Net's `compute_steps_for_sliding_window` on one axis: the fewest windows of `tile` whose
/// spacing is at most `tile * step_fraction`, spread evenly from 0 to `size - tile` and rounded
/// half to even as `np.round` does. `size` must be at least `tile` (pad first).
pub fn steps(size: usize, tile: usize, step_fraction: f64) -> Vec<usize> {
    assert!(tile > 0 && size >= tile && step_fraction > 0.0, "steps({size}, {tile}, {step_fraction})");
    let span = (size - tile) as f64;
    let n = (span / (tile as f64 * step_fraction)).ceil() as usize + 1;
    if n == 1 {
        return vec![0];
    }
    let actual = span / (n - 1) as f64;
    (0..n).map(|i| (actual * i as f64).round_ties_even() as usize).collect()
}

/// One window: its index in the global z-major order and its first voxel in volume coordinates
/// (negative where the volume is padded, i.e. smaller than the patch on that axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub index: usize,
    pub start: [isize; 3],
}

/// The windows over a whole volume. Every block and shard tiles with this one grid, so a voxel is
/// always predicted by the same windows, summed in the same order: results do not depend on how
/// the output is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileGrid {
    pub shape: [usize; 3],
    pub patch: [usize; 3],
    /// nnU-Net's `pad_nd_image`: an axis shorter than the patch is padded by half the difference
    /// before (rounded down) and the rest after.
    pub pad_before: [usize; 3],
    /// Window starts per axis, in padded coordinates.
    pub steps: [Vec<usize>; 3],
}

impl TileGrid {
    /// `overlap` is the seed's: the step is `1 - overlap` of the patch.
    pub fn new(shape: [usize; 3], patch: [usize; 3], overlap: f64) -> Result<TileGrid> {
        ensure!(shape.iter().all(|&s| s > 0), "cannot tile an empty volume of shape {shape:?}");
        ensure!(patch.iter().all(|&p| p > 0), "patch size {patch:?} has an empty axis");
        ensure!((0.0..1.0).contains(&overlap), "overlap {overlap} is not in [0, 1)");
        let pad_before = std::array::from_fn(|a| patch[a].saturating_sub(shape[a]) / 2);
        let steps = std::array::from_fn(|a| steps(shape[a].max(patch[a]), patch[a], 1.0 - overlap));
        Ok(TileGrid { shape, patch, pad_before, steps })
    }

    pub fn len(&self) -> usize {
        self.steps.iter().map(Vec::len).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn tile_at(&self, i: [usize; 3]) -> Tile {
        let [_, ny, nx] = self.steps.each_ref().map(Vec::len);
        Tile {
            index: (i[0] * ny + i[1]) * nx + i[2],
            start: std::array::from_fn(|a| self.steps[a][i[a]] as isize - self.pad_before[a] as isize),
        }
    }

    /// Every window whose box meets the box `[lo, hi)` of the volume, in global order.
    pub fn touching(&self, lo: [usize; 3], hi: [usize; 3]) -> Vec<Tile> {
        let per_axis: [Vec<usize>; 3] = std::array::from_fn(|a| {
            let (lo, hi) = ((lo[a] + self.pad_before[a]) as isize, (hi[a] + self.pad_before[a]) as isize);
            let p = self.patch[a] as isize;
            (0..self.steps[a].len())
                .filter(|&i| {
                    let s = self.steps[a][i] as isize;
                    s < hi && s + p > lo
                })
                .collect()
        });
        let mut tiles = Vec::with_capacity(per_axis.iter().map(Vec::len).product());
        for &z in &per_axis[0] {
            for &y in &per_axis[1] {
                for &x in &per_axis[2] {
                    tiles.push(self.tile_at([z, y, x]));
                }
            }
        }
        tiles
    }

    /// Every window, in global order.
    pub fn all(&self) -> Vec<Tile> {
        self.touching([0; 3], self.shape)
    }
}

/// The part of the box `[lo, hi)` inside a window starting at `start` of `patch`: (first voxel
/// in the volume, first voxel in the window, size); None when they do not meet.
pub fn overlap_box(
    start: [isize; 3],
    patch: [usize; 3],
    lo: [usize; 3],
    hi: [usize; 3],
) -> Option<([usize; 3], [usize; 3], [usize; 3])> {
    let mut at = [0; 3];
    let mut within = [0; 3];
    let mut size = [0; 3];
    for a in 0..3 {
        let first = start[a].max(lo[a] as isize);
        let last = (start[a] + patch[a] as isize).min(hi[a] as isize);
        if last <= first {
            return None;
        }
        at[a] = first as usize;
        within[a] = (first - start[a]) as usize;
        size[a] = (last - first) as usize;
    }
    Some((at, within, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_and_nnunet_examples() {
        // reference-spec 4.6: L 110, P 64, step 0.5 -> [0, 23, 46]
        assert_eq!(steps(110, 64, 0.5), vec![0, 23, 46]);
        assert_eq!(steps(64, 64, 0.5), vec![0]);
        // 64.5 rounds to even
        assert_eq!(steps(257, 128, 0.75), vec![0, 64, 129]);
    }

    #[test]
    fn small_volumes_are_padded_around_the_centre() {
        let g = TileGrid::new([5, 20, 64], [8, 16, 32], 0.5).unwrap();
        assert_eq!(g.pad_before, [1, 0, 0]);
        assert_eq!(g.steps[0], vec![0]);
        let all = g.all();
        assert_eq!(all.len(), g.len());
        assert_eq!(all[0].start, [-1, 0, 0]);
        assert!(all.windows(2).all(|w| w[0].index + 1 == w[1].index));
    }

    #[test]
    fn touching_finds_exactly_the_overlapping_windows() {
        let g = TileGrid::new([40, 33, 50], [16, 16, 16], 0.5).unwrap();
        let (lo, hi) = ([10, 0, 17], [24, 8, 33]);
        let want: Vec<Tile> =
            g.all().into_iter().filter(|t| overlap_box(t.start, g.patch, lo, hi).is_some()).collect();
        assert_eq!(g.touching(lo, hi), want);
        assert!(!want.is_empty() && want.len() < g.len());
    }

    #[test]
    fn overlap_box_clips_padding() {
        let b = overlap_box([-2, 0, 4], [8, 8, 8], [0, 0, 0], [5, 6, 20]).unwrap();
        assert_eq!(b, ([0, 0, 4], [2, 0, 0], [5, 6, 8]));
        assert!(overlap_box([0, 0, 0], [4, 4, 4], [4, 0, 0], [8, 4, 4]).is_none());
    }
}
