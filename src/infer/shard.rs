//! How the output is split: chunks grouped into blocks (the unit of work, buffered in memory and
//! recorded when finished), and blocks split into contiguous ranges, one per HPC job.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use anyhow::{Result, bail, ensure};

/// Job `index` (0-based) of `count`; written and parsed 1-based as `i/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// This job's blocks of `n_blocks`: the `index`-th of `count` near-equal contiguous ranges.
    pub fn blocks(&self, n_blocks: usize) -> Range<usize> {
        self.index * n_blocks / self.count..(self.index + 1) * n_blocks / self.count
    }
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Shard> {
        let parsed =
            s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((i, n)) if (1..=n).contains(&i) => Ok(Shard { index: i - 1, count: n }),
            _ => bail!("--shard '{s}': expected i/n with 1 <= i <= n, e.g. 2/8"),
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

/// The output's chunk grid grouped into blocks of `per_block` chunks, in z-major order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Blocks {
    pub shape: [usize; 3],
    pub chunk: [usize; 3],
    pub per_block: [usize; 3],
}

fn div_up(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

impl Blocks {
    pub fn new(shape: [usize; 3], chunk: [usize; 3], per_block: [usize; 3]) -> Result<Blocks> {
        ensure!(
            chunk.iter().chain(&per_block).chain(&shape).all(|&n| n > 0),
            "blocks of {per_block:?} chunks of {chunk:?} over {shape:?}: every size must be positive"
        );
        Ok(Blocks { shape, chunk, per_block })
    }

    /// The largest blocks whose buffers (`bytes_per_voxel` each) fit `budget` bytes, grown one chunk
    /// at a time on the axis where the block is thinnest, so blocks stay near-cubic and few windows
    /// are predicted twice (for the blocks on both sides of a seam). At least one chunk.
    pub fn fitting(
        shape: [usize; 3],
        chunk: [usize; 3],
        bytes_per_voxel: usize,
        budget: usize,
    ) -> Result<Blocks> {
        let chunks: [usize; 3] = std::array::from_fn(|a| div_up(shape[a], chunk[a]));
        let mut per = [1; 3];
        let extent = |per: [usize; 3], a: usize| (per[a] * chunk[a]).min(shape[a]);
        loop {
            let mut axes: Vec<usize> = (0..3).filter(|&a| per[a] < chunks[a]).collect();
            axes.sort_by_key(|&a| (extent(per, a), std::cmp::Reverse(a)));
            let grown = axes.into_iter().find_map(|a| {
                let mut p = per;
                p[a] += 1;
                let bytes = (0..3).map(|a| extent(p, a)).product::<usize>() * bytes_per_voxel;
                (bytes <= budget).then_some(p)
            });
            match grown {
                Some(p) => per = p,
                None => return Blocks::new(shape, chunk, per),
            }
        }
    }

    fn grid(&self) -> [usize; 3] {
        std::array::from_fn(|a| div_up(self.shape[a], self.chunk[a] * self.per_block[a]))
    }

    pub fn len(&self) -> usize {
        self.grid().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `i`'s box: (first voxel, size), clipped to the volume.
    pub fn block(&self, i: usize) -> ([usize; 3], [usize; 3]) {
        let [_, gy, gx] = self.grid();
        let at = [i / (gy * gx), i / gx % gy, i % gx];
        let lo: [usize; 3] = std::array::from_fn(|a| at[a] * self.chunk[a] * self.per_block[a]);
        let size = std::array::from_fn(|a| (self.chunk[a] * self.per_block[a]).min(self.shape[a] - lo[a]));
        (lo, size)
    }

    /// The chunks of the box at `lo` of `size` (a block's), as (first voxel, size).
    pub fn chunks_in(&self, lo: [usize; 3], size: [usize; 3]) -> Vec<([usize; 3], [usize; 3])> {
        let axis = |a: usize| -> Vec<(usize, usize)> {
            (lo[a]..lo[a] + size[a])
                .step_by(self.chunk[a])
                .map(|s| (s, self.chunk[a].min(lo[a] + size[a] - s)))
                .collect()
        };
        let [zs, ys, xs] = [axis(0), axis(1), axis(2)];
        let mut out = Vec::with_capacity(zs.len() * ys.len() * xs.len());
        for &(z, dz) in &zs {
            for &(y, dy) in &ys {
                for &(x, dx) in &xs {
                    out.push(([z, y, x], [dz, dy, dx]));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_partition_the_blocks() {
        let s: Shard = "2/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!(s.to_string(), "2/3");
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            let err = bad.parse::<Shard>().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        for n in [1, 2, 7, 10] {
            let mut next = 0;
            for i in 0..n {
                let r = Shard { index: i, count: n }.blocks(10);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, 10);
        }
    }

    #[test]
    fn blocks_tile_the_volume_with_whole_chunks() {
        let b = Blocks::new([10, 7, 9], [4, 4, 4], [2, 1, 2]).unwrap();
        let mut covered = vec![0u8; 10 * 7 * 9];
        for i in 0..b.len() {
            let (lo, size) = b.block(i);
            let chunks = b.chunks_in(lo, size);
            assert!(chunks.iter().all(|(s, _)| s.iter().zip(&b.chunk).all(|(s, c)| s % c == 0)));
            for (s, n) in chunks {
                for z in s[0]..s[0] + n[0] {
                    for y in s[1]..s[1] + n[1] {
                        for x in s[2]..s[2] + n[2] {
                            covered[(z * 7 + y) * 9 + x] += 1;
                        }
                    }
                }
            }
        }
        assert!(covered.iter().all(|&c| c == 1));
    }

    #[test]
    fn fitting_grows_the_thinnest_axis_within_the_budget() {
        let b = Blocks::fitting([100, 100, 100], [10, 10, 10], 4, 4 * 20 * 20 * 30).unwrap();
        assert_eq!(b.per_block, [2, 2, 3]);
        let one = Blocks::fitting([100, 100, 100], [10, 10, 10], 4, 1).unwrap();
        assert_eq!(one.per_block, [1, 1, 1]);
        let all = Blocks::fitting([20, 20, 20], [10, 10, 10], 4, usize::MAX).unwrap();
        assert_eq!((all.per_block, all.len()), ([2, 2, 2], 1));
    }
}
