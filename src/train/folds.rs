//! nnU-Net's cross-validation split: the cases in 5 folds, drawn once by a seeded shuffle of
//! their sorted names, written to `splits.json` in nnU-Net's `splits_final.json` layout (a list
//! of `{"train": [...], "val": [...]}` by case name) and read back by every later fold, so the
//! folds of one dataset never overlap whatever order or machine they run on.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::config::FOLDS;
use crate::tensor::io::write_atomic;

/// nnU-Net's seed for its fold split.
const SPLIT_SEED: u64 = 12345;

/// One fold's cases by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoldCases {
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// The 5 folds of `names`: the shuffled names cut into 5 near-equal parts (the first
/// `n % 5` one larger, as sklearn's KFold), part k validating fold k.
pub fn make_folds(names: &[String]) -> Result<Vec<FoldCases>> {
    ensure!(
        names.len() >= FOLDS,
        "a {FOLDS}-fold split needs at least {FOLDS} volumes, the dataset has {}; use tr_setup.fold: all \
         or tr_val_split",
        names.len()
    );
    let mut order: Vec<String> = names.to_vec();
    order.sort();
    order.shuffle(&mut StdRng::seed_from_u64(SPLIT_SEED));
    let (base, extra) = (order.len() / FOLDS, order.len() % FOLDS);
    let mut start = 0;
    Ok((0..FOLDS)
        .map(|k| {
            let end = start + base + usize::from(k < extra);
            let val = order[start..end].to_vec();
            let train = order[..start].iter().chain(&order[end..]).cloned().collect();
            start = end;
            FoldCases { train, val }
        })
        .collect())
}

/// Fold `k` of the volumes `names` as (train, val) indices into `names`: from `file` when it
/// exists (it must hold exactly these cases), else drawn and written there first.
pub fn fold_split(names: &[String], k: usize, file: &Path) -> Result<(Vec<usize>, Vec<usize>)> {
    let unique: BTreeSet<&String> = names.iter().collect();
    ensure!(unique.len() == names.len(), "the volumes' names repeat; a split by case needs unique names");
    let folds = if file.exists() {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let folds: Vec<FoldCases> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a list of folds", file.display()))?;
        ensure!(folds.len() == FOLDS, "{}: {} folds, expected {FOLDS}", file.display(), folds.len());
        for (i, f) in folds.iter().enumerate() {
            let listed: BTreeSet<&String> = f.train.iter().chain(&f.val).collect();
            if listed != unique || listed.len() != f.train.len() + f.val.len() {
                let missing: Vec<&&String> = unique.difference(&listed).take(5).collect();
                let extra: Vec<&&String> = listed.difference(&unique).take(5).collect();
                bail!(
                    "{}: fold {i} does not split this dataset's volumes exactly (missing {missing:?}, not in \
                     the dataset {extra:?}, or a case listed twice); it belongs to another dataset: move it \
                     away, or use another tr_setup.ckpt_out_base",
                    file.display()
                );
            }
        }
        folds
    } else {
        let folds = make_folds(names)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(file, serde_json::to_string_pretty(&folds)?.as_bytes())?;
        println!("wrote the {FOLDS}-fold split of {} volumes to {}", names.len(), file.display());
        folds
    };
    let index = |n: &String| names.iter().position(|m| m == n).expect("checked: every case is a volume");
    let fold = &folds[k];
    Ok((fold.train.iter().map(index).collect(), fold.val.iter().map(index).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case_{i:03}")).collect()
    }

    #[test]
    fn every_case_validates_in_exactly_one_fold() {
        let all = names(23);
        let folds = make_folds(&all).unwrap();
        let sizes: Vec<usize> = folds.iter().map(|f| f.val.len()).collect();
        assert_eq!(sizes, [5, 5, 5, 4, 4]);
        let mut seen: Vec<&String> = folds.iter().flat_map(|f| &f.val).collect();
        seen.sort();
        assert_eq!(seen, all.iter().collect::<Vec<_>>());
        for f in &folds {
            assert_eq!(f.train.len() + f.val.len(), 23);
            assert!(f.val.iter().all(|v| !f.train.contains(v)));
        }
        // The order the volumes come in does not matter; the split is seeded.
        let mut reversed = all.clone();
        reversed.reverse();
        assert_eq!(make_folds(&reversed).unwrap(), folds);
        assert!(make_folds(&names(4)).unwrap_err().to_string().contains("at least 5"));
    }

    #[test]
    fn the_splits_file_is_written_once_and_must_fit_the_dataset() {
        let dir = std::env::temp_dir().join(format!("unet3d-folds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("splits.json");
        let all = names(10);
        let (train, val) = fold_split(&all, 2, &file).unwrap();
        assert_eq!((train.len(), val.len()), (8, 2));
        // A hand-edited split is what later folds use.
        let mut folds: Vec<FoldCases> =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        folds[2] = FoldCases { train: all[2..].to_vec(), val: all[..2].to_vec() };
        std::fs::write(&file, serde_json::to_string(&folds).unwrap()).unwrap();
        assert_eq!(fold_split(&all, 2, &file).unwrap(), ((2..10).collect(), vec![0, 1]));
        // Another dataset's file is refused by name.
        let e = format!("{:#}", fold_split(&names(11), 0, &file).unwrap_err());
        assert!(e.contains("splits.json") && e.contains("case_010"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
