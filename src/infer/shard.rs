//! How the output is split: chunks grouped into blocks (the unit of work, buffered in memory and
//! recorded when finished), and blocks split into contiguous ranges, one per HPC job.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use anyhow::{Result, bail, ensure};

/// Job `index` of `count`, both written `i/n` and counted from 0 as SLURM array task ids are.
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

    /// This job's shard in a SLURM job array: task id minus the array's first id, of the array's
    /// task count. `env` reads a variable. A stepped array or one with gaps (`--array=0-9:2`,
    /// `--array=1,4,7`) has no contiguous numbering and is refused.
    pub fn from_slurm_array(env: &dyn Fn(&str) -> Option<String>) -> Result<Shard> {
        let var = |name: &str| -> Result<Option<usize>> {
            env(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| anyhow::anyhow!("--shard auto: {name}={v:?} is not a whole number"))
                })
                .transpose()
        };
        let (Some(id), Some(count)) = (var("SLURM_ARRAY_TASK_ID")?, var("SLURM_ARRAY_TASK_COUNT")?) else {
            bail!(
                "--shard auto: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set (not a SLURM \
                 job array: submit with sbatch --array=0-N, or give --shard i/n)"
            );
        };
        let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        if let Some(step) = var("SLURM_ARRAY_TASK_STEP")?.filter(|&s| s != 1) {
            bail!(
                "--shard auto: the array steps by {step} (SLURM_ARRAY_TASK_STEP); give --shard i/n instead"
            );
        }
        if let Some(max) = var("SLURM_ARRAY_TASK_MAX")?
            && max.checked_sub(min).map(|d| d + 1) != Some(count)
        {
            bail!(
                "--shard auto: ids {min}..={max} but SLURM_ARRAY_TASK_COUNT={count}: the array has gaps; \
                 give --shard i/n instead"
            );
        }
        match id.checked_sub(min) {
            Some(index) if index < count && count > 0 => Ok(Shard { index, count }),
            _ => bail!(
                "--shard auto: SLURM_ARRAY_TASK_ID={id} is not in the array's {count} tasks from \
                 SLURM_ARRAY_TASK_MIN={min}"
            ),
        }
    }
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Shard> {
        let parsed =
            s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((i, n)) if i < n => Ok(Shard { index: i, count: n }),
            _ => bail!(
                "--shard '{s}': expected i/n with 0 <= i < n, counted from 0 as SLURM array task ids \
                 (e.g. 0/8 to 7/8), or auto"
            ),
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What `--shard` says: a shard, or `auto` (the SLURM array's task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSpec {
    Given(Shard),
    SlurmArray,
}

impl FromStr for ShardSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<ShardSpec> {
        if s.trim() == "auto" { Ok(ShardSpec::SlurmArray) } else { s.parse().map(ShardSpec::Given) }
    }
}

impl ShardSpec {
    pub fn resolve(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Shard> {
        match self {
            ShardSpec::Given(s) => Ok(s),
            ShardSpec::SlurmArray => Shard::from_slurm_array(env),
        }
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
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!(s.to_string(), "1/3");
        assert_eq!("0/1".parse::<Shard>().unwrap(), Shard::WHOLE);
        for bad in ["3/3", "4/3", "3", "a/b", "0/0", "-1/3"] {
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
    fn a_slurm_array_task_is_its_shard() {
        let auto = |vars: &[(&str, &str)]| {
            let env = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
            ShardSpec::SlurmArray.resolve(&env)
        };
        // sbatch --array=0-7
        let s = auto(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "7"),
        ]);
        assert_eq!(s.unwrap(), Shard { index: 3, count: 8 });
        // sbatch --array=1-4: ids from 1
        let s = auto(&[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
        ]);
        assert_eq!(s.unwrap(), Shard { index: 0, count: 4 });
        let bad: [(&[(&str, &str)], &str); 5] = [
            (&[], "not set"),
            (&[("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_COUNT", "4")], "not a whole number"),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "6"),
                ],
                "gaps",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                ],
                "steps by 2",
            ),
            (&[("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_COUNT", "3")], "not in the array"),
        ];
        for (vars, want) in bad {
            let e = auto(vars).unwrap_err().to_string();
            assert!(e.contains("--shard auto") && e.contains(want), "{e}");
        }
        assert_eq!(
            "2/5".parse::<ShardSpec>().unwrap().resolve(&|_| None).unwrap(),
            Shard { index: 2, count: 5 }
        );
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
