#!/usr/bin/env python3
"""Writes tests/fixtures/eval/: three cases of predicted and reference label maps as NIfTI
(anisotropic spacing), one regression pair, and expected.json with every metric `unet3d evaluate`
reports, computed independently with numpy and scipy (distance_transform_edt) by the definitions
of docs/evaluation.md.

    python3 -m venv venv && venv/bin/pip install numpy scipy nibabel
    venv/bin/python scripts/make-eval-fixture.py
"""
import json
import pathlib

import nibabel as nib
import numpy as np
from scipy import ndimage

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "eval"
TOLERANCE = 1.5
rng = np.random.default_rng(7)


def blob(shape, spacing, centre, radius, noise):
    """A rough ellipsoid: voxels within `radius` mm of `centre`, its boundary jittered."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    d = np.sqrt((((grid - centre) * spacing) ** 2).sum(-1))
    return d + noise * rng.standard_normal(shape) < radius


def surface(m):
    return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)


def scores(p, r, spacing):
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    tn = p.size - tp - fp - fn
    voxel = float(np.prod(spacing))
    s = {
        "Dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "IoU": tp / (tp + fp + fn) if tp + fp + fn else None,
        "TP": tp, "FP": fp, "FN": fn, "TN": tn, "n_pred": tp + fp, "n_ref": tp + fn,
        "volume_pred_mm3": (tp + fp) * voxel, "volume_ref_mm3": (tp + fn) * voxel,
    }
    sp, sr = surface(p), surface(r)
    if not sp.any() and not sr.any():
        s["HD95"], s["NSD"] = None, None
    elif not sp.any() or not sr.any():
        s["HD95"], s["NSD"] = None, 0.0
    else:
        to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
        to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
        a, b = to_ref[sp], to_pred[sr]
        s["HD95"] = float(max(np.percentile(a, 95), np.percentile(b, 95)))
        s["NSD"] = float(((a <= TOLERANCE).sum() + (b <= TOLERANCE).sum()) / (a.size + b.size))
    return s


def save(array, spacing, path):
    """(z, y, x) array -> NIfTI voxel axes (i, j, k) = (x, y, z), zooms likewise."""
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.diag([*spacing[::-1], 1.0]))
    img.header.set_zooms(spacing[::-1])
    nib.save(img, path)


def main():
    for sub in ["pred", "ref"]:
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    cases = {}
    # The spacing as the float32 header stores it, so both sides measure the same distances.
    shape, spacing = (14, 20, 18), tuple(float(np.float32(s)) for s in (2.5, 0.8, 1.0))
    for k, case in enumerate(["case_a", "case_b", "case_c"]):
        ref = np.zeros(shape, np.uint8)
        pred = np.zeros(shape, np.uint8)
        c1, c2 = np.array([6.0, 8, 7]), np.array([8.0, 12, 11])
        ref[blob(shape, spacing, c1, 6.0, 0.5)] = 1
        ref[blob(shape, spacing, c2, 4.0, 0.5)] = 2
        pred[blob(shape, spacing, c1 + [0.4 * k, 0.5, 0], 5.5, 0.8)] = 1
        if k != 1:  # case_b misses label 2 entirely
            pred[blob(shape, spacing, c2 + [0, -0.5 * k, 0.5], 4.5, 0.8)] = 2
        if k == 2:  # case_c predicts a label the reference lacks
            pred[0:2, 0:3, 0:3] = 3
        save(ref, spacing, OUT / "ref" / f"{case}.nii.gz")
        save(pred, spacing, OUT / "pred" / f"{case}.nii.gz")
        cases[case] = {str(l): scores(pred == l, ref == l, spacing) for l in [1, 2, 3]}
    # A regression pair (float32, two channels is not NIfTI-3D; one channel here).
    ref = rng.standard_normal(shape).astype(np.float32)
    pred = (ref + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    save(ref, spacing, OUT / "regression_ref.nii.gz")
    save(pred, spacing, OUT / "regression_pred.nii.gz")
    e = pred.astype(np.float64) - ref.astype(np.float64)
    r = ref.astype(np.float64)
    regression = {
        "MAE": float(np.abs(e).mean()),
        "RMSE": float(np.sqrt((e ** 2).mean())),
        "R2": float(1 - (e ** 2).sum() / ((r - r.mean()) ** 2).sum()),
    }
    expected = {"tolerance_mm": TOLERANCE, "cases": cases, "regression": regression}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
