//! Losses against PyTorch / nnU-Net fixtures, hand-computed seed formulas, and float64 finite
//! differences of every kernel.

mod common;

use common::{assert_close, fixture, fixture_meta, numeric_grad, rel_err, rel_err64, to_cl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use unet3d::device::cpu::loss as k;
use unet3d::device::op;
use unet3d::loss::{
    DiceCe, LOSS_NAMES, LabelResample, LabelSmoothing, Loss, Pointwise, Reduction, deep_supervision,
    deep_supervision_labels, deep_supervision_weights, downsample_labels,
};
use unet3d::{Graph, ParamStore, Tensor};

const FIXTURE_TOL: f64 = 1e-5;

/// The loss value and d loss / d input through the graph.
fn run(loss: &Loss, input: &Tensor, target: &Tensor) -> (f32, Tensor) {
    let mut g = Graph::new();
    let x = g.leaf(input.clone());
    let l = loss.apply(&mut g, x, target).unwrap();
    let v = g.value(l).item().unwrap();
    g.backward(l, &mut ParamStore::new()).unwrap();
    (v, g.grad(x).expect("input gradient").clone())
}

fn apply_err(loss: &Loss, input: &Tensor, target: &Tensor) -> String {
    let mut g = Graph::new();
    let x = g.leaf(input.clone());
    format!("{:#}", loss.apply(&mut g, x, target).unwrap_err())
}

fn config(name: &str, kwargs: serde_json::Value) -> Loss {
    Loss::from_config(name, &kwargs).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn assert_scalar(what: &str, got: f64, want: f64, tol: f64) {
    let e = if want == 0.0 { got.abs() } else { ((got - want) / want).abs() };
    assert!(e <= tol, "{what}: got {got}, want {want} (relative error {e:.2e} > {tol:.0e})");
}

// ---------------------------------------------------------------------------------------------
// PyTorch / nnU-Net fixtures

fn check_fixture(file: &str, loss: &Loss, input: &str, target: &str, target_is_label: bool) {
    let f = fixture(&format!("loss/{file}.safetensors"));
    let x = to_cl(f.get(input).unwrap());
    let t = to_cl(f.get(target).unwrap());
    let want = f.get("loss").unwrap().item().unwrap();
    if target_is_label {
        assert_eq!(t.shape().last(), 1, "{file}: label has one channel");
    }
    let (v, gx) = run(loss, &x, &t);
    assert_scalar(&format!("{file} loss"), v as f64, want as f64, FIXTURE_TOL);
    assert_close(&format!("{file} gx"), &gx, &to_cl(f.get("gx").unwrap()), FIXTURE_TOL);
}

#[test]
fn dice_ce_matches_nnunet() {
    for batch_dice in [true, false] {
        let file = format!("dice_ce_batchdice_{batch_dice}");
        let meta = fixture_meta(&fixture(&format!("loss/{file}.safetensors")));
        assert_eq!(meta["batch_dice"], json!(batch_dice));
        assert_eq!((meta["smooth"].as_f64(), meta["do_bg"].as_bool()), (Some(1e-5), Some(false)));
        let loss = config("DC_and_CE_loss", json!({ "batch_dice": batch_dice }));
        check_fixture(&file, &loss, "logits", "label", true);
    }
}

#[test]
fn regression_and_bce_match_pytorch() {
    for (file, name) in [
        ("mse", "MSELoss"),
        ("l1", "L1Loss"),
        ("smooth_l1", "SmoothL1Loss"),
        ("bce_with_logits", "BCEWithLogitsLoss"),
    ] {
        let meta = fixture_meta(&fixture(&format!("loss/{file}.safetensors")));
        assert_eq!(meta["reduction"], "mean");
        let kwargs = if file == "smooth_l1" { json!({ "beta": meta["beta"] }) } else { json!({}) };
        check_fixture(file, &config(name, kwargs), "pred", "target", false);
    }
}

#[test]
fn deep_supervision_matches_nnunet() {
    let f = fixture("loss/deep_supervision_dice_ce.safetensors");
    let meta = fixture_meta(&f);
    let weights = deep_supervision_weights(4);
    let want_w: Vec<f64> = meta["weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(weights.iter().zip(&want_w).all(|(a, b)| (a - b).abs() < 1e-15), "{weights:?} vs {want_w:?}");

    // The label maps: full resolution, then every 2nd, 4th, 8th voxel from 0.
    let labels: Vec<Tensor> = (0..4).map(|i| to_cl(f.get(&format!("label.{i}")).unwrap())).collect();
    let made = deep_supervision_labels(
        &labels[0],
        &[[1; 3], [2; 3], [2; 3], [2; 3], [2; 3]],
        LabelResample::Nearest,
    )
    .unwrap();
    assert_eq!(made.len(), 4);
    for (i, (m, l)) in made.iter().zip(&labels).enumerate() {
        assert_eq!(m.dims(), l.dims(), "label {i}");
        assert_eq!(m.data(), l.data(), "label {i}");
    }

    let loss = config("DiceCELoss", json!({ "batch_dice": true }));
    let mut g = Graph::new();
    let outs: Vec<_> = (0..4).map(|i| g.leaf(to_cl(f.get(&format!("logits.{i}")).unwrap()))).collect();
    let total = deep_supervision(&mut g, &loss, &outs, &made, &weights).unwrap();
    let v = g.value(total).item().unwrap();
    g.backward(total, &mut ParamStore::new()).unwrap();
    assert_scalar(
        "deep supervision loss",
        v as f64,
        f.get("loss").unwrap().item().unwrap() as f64,
        FIXTURE_TOL,
    );
    for (i, &o) in outs.iter().enumerate() {
        let want = to_cl(f.get(&format!("gx.{i}")).unwrap());
        match g.grad(o) {
            Some(gx) => assert_close(&format!("gx.{i}"), gx, &want, FIXTURE_TOL),
            // Weight 0: not computed, as nnU-Net; PyTorch's gradient is zero there.
            None => assert!(weights[i] == 0.0 && want.data().iter().all(|&v| v == 0.0), "gx.{i}"),
        }
    }
}

#[test]
fn deep_supervision_labels_match_the_model_fixture() {
    let f = fixture("model/resenc_unet_small.safetensors");
    let meta = fixture_meta(&f);
    let strides: Vec<[usize; 3]> = meta["config"]["strides"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let v: Vec<usize> = s.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            [v[0], v[1], v[2]]
        })
        .collect();
    let label0 = to_cl(f.get("label.0").unwrap());
    let made = deep_supervision_labels(&label0, &strides, LabelResample::Nearest).unwrap();
    assert_eq!(made.len(), 3);
    for (i, m) in made.iter().enumerate() {
        let want = to_cl(f.get(&format!("label.{i}")).unwrap());
        assert_eq!((m.dims(), m.data()), (want.dims(), want.data()), "label.{i}");
    }
    let ds: Vec<f64> = meta["ds_weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(deep_supervision_weights(3).iter().zip(&ds).all(|(a, b)| (a - b).abs() < 1e-15));
}

#[test]
fn deep_supervision_weights_and_label_sizes() {
    let w = deep_supervision_weights(5);
    let want = [8.0 / 15.0, 4.0 / 15.0, 2.0 / 15.0, 1.0 / 15.0, 0.0];
    assert!(w.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-15), "{w:?}");
    assert_eq!(deep_supervision_weights(1), vec![1.0]);

    // One row of 8 voxels, values 0..8: nearest takes 0,2,4,6; nearest-exact takes 1,3,5,7.
    let row = Tensor::from_vec([1, 1, 1, 8, 1], (0..8).map(|v| v as f32).collect()).unwrap();
    let near = downsample_labels(&row, [1, 1, 4], LabelResample::Nearest).unwrap();
    let exact = downsample_labels(&row, [1, 1, 4], LabelResample::NearestExact).unwrap();
    assert_eq!((near.dims(), near.data()), (&[1, 1, 1, 4, 1][..], &[0.0, 2.0, 4.0, 6.0][..]));
    assert_eq!(exact.data(), &[1.0, 3.0, 5.0, 7.0]);
    // A factor of 2.5 (5 -> 2): floor(i * 2.5) = 0, 2; floor((i + 0.5) * 2.5) = 1, 3.
    let five = Tensor::from_vec([1, 5, 1, 1], (0..5).map(|v| v as f32).collect()).unwrap();
    assert_eq!(downsample_labels(&five, [2, 1, 1], LabelResample::Nearest).unwrap().data(), &[0.0, 2.0]);
    assert_eq!(downsample_labels(&five, [2, 1, 1], LabelResample::NearestExact).unwrap().data(), &[1.0, 3.0]);

    // Sizes round half to even as Python: 5/2 = 2.5 -> 2, 7/2 = 3.5 -> 4, 6/4 = 1.5 -> 2.
    let label = Tensor::zeros([1, 5, 7, 6]);
    let maps = deep_supervision_labels(
        &label,
        &[[1, 1, 1], [2, 2, 2], [1, 1, 2], [1, 1, 1]],
        LabelResample::NearestExact,
    )
    .unwrap();
    let dims: Vec<&[usize]> = maps.iter().map(|m| m.dims()).collect();
    assert_eq!(dims, vec![&[1, 5, 7, 6][..], &[1, 2, 4, 3][..], &[1, 2, 4, 2][..]]);
    assert!(deep_supervision_labels(&label, &[[1, 1, 1]], LabelResample::Nearest).is_err());
}

// ---------------------------------------------------------------------------------------------
// The seed's losses and the others without fixtures: plain loops over the formulas.

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// BCE of probability `p` against `t`, written from the definition.
fn bce_ref(p: f64, t: f64) -> f64 {
    -(t * p.ln().max(-100.0) + (1.0 - t) * (1.0 - p).ln().max(-100.0))
}

fn random(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn binary(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| if rng.random_bool(0.4) { 1.0 } else { 0.0 }).collect()
}

fn tensor(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::from_vec(shape.to_vec(), data).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

#[test]
fn bce_with_logits_smoothing_by_hand() {
    let mut rng = StdRng::seed_from_u64(1);
    let shape = [2, 5, 2, 3, 2];
    let n = 2 * 5 * 2 * 3 * 2;
    let (x, t) = (random(&mut rng, n, -3.0, 3.0), binary(&mut rng, n));
    let (xt, tt) = (tensor(&shape, x.clone()), tensor(&shape, t.clone()));
    // Constant smoothing 0.1 (the default) and 0.2.
    for (kwargs, s) in [(json!({}), 0.1), (json!({ "smoothing": 0.2 }), 0.2)] {
        let want: f64 = x
            .iter()
            .zip(&t)
            .map(|(&x, &t)| bce_ref(sig(x as f64), t as f64 * (1.0 - 2.0 * s) + s))
            .sum::<f64>()
            / n as f64;
        let (v, _) = run(&config("BCEWithLogitsLossLabelSmoothing", kwargs), &xt, &tt);
        assert_scalar("label smoothing", v as f64, want, 1e-5);
    }
    // Per-slice smoothing along D for D = 5 (odd), 4 (even) and 1 (the seed's 0/0 case: center).
    for d in [5usize, 4, 1] {
        let shape = [2, d, 2, 3, 2];
        let n = 24 * d;
        let (x, t) = (random(&mut rng, n, -3.0, 3.0), binary(&mut rng, n));
        let (c, e) = (0.05, 0.3);
        let mut sum = 0.0;
        for (i, (&x, &t)) in x.iter().zip(&t).enumerate() {
            let z = (i / 12) % d;
            let s = if d == 1 {
                c
            } else {
                c + (e - c) * (z as f64 - (d as f64 - 1.0) / 2.0).abs() / (d / 2) as f64
            };
            sum += bce_ref(sig(x as f64), t as f64 * (1.0 - 2.0 * s) + s);
        }
        let loss = config("BCEWithLogitsLossZSmooth", json!({ "center_smoothing": c, "edge_smoothing": e }));
        let (v, _) = run(&loss, &tensor(&shape, x), &tensor(&shape, t));
        assert_scalar(&format!("z smoothing D={d}"), v as f64, sum / n as f64, 1e-5);
    }
    let s = LabelSmoothing::ZSlices { center: 0.1, edge: 0.4 }.per_slice(5);
    assert!(s.iter().zip([0.4, 0.25, 0.1, 0.25, 0.4]).all(|(a, b)| (a - b).abs() < 1e-15), "{s:?}");
}

#[test]
fn bce_on_probabilities_by_hand() {
    // Includes p = 0 and p = 1, where PyTorch clamps the logs at -100.
    let p = [0.0f32, 1.0, 0.25, 0.9, 0.5, 0.01];
    let t = [0.3f32, 0.6, 1.0, 0.0, 0.5, 1.0];
    let want: f64 = p.iter().zip(&t).map(|(&p, &t)| bce_ref(p as f64, t as f64)).sum::<f64>() / 6.0;
    assert!(want > 10.0, "the clamped terms dominate");
    let (v, _) = run(&config("BCELoss", json!({})), &tensor(&[6], p.to_vec()), &tensor(&[6], t.to_vec()));
    assert_scalar("BCELoss", v as f64, want, 1e-5);
    let (v, _) = run(
        &config("BCELoss", json!({"reduction": "sum"})),
        &tensor(&[6], p.to_vec()),
        &tensor(&[6], t.to_vec()),
    );
    assert_scalar("BCELoss sum", v as f64, want * 6.0, 1e-5);
}

#[test]
fn bce_dice_by_hand() {
    let mut rng = StdRng::seed_from_u64(2);
    let (shape, c) = ([2, 3, 2, 2, 3], 3);
    let n = 2 * 3 * 2 * 2 * 3;
    let (x, t) = (random(&mut rng, n, -3.0, 3.0), binary(&mut rng, n));
    for (kwargs, alpha, beta) in [(json!({}), 0.5, 0.5), (json!({ "alpha": 0.3, "beta": 1 }), 0.3, 1.0)] {
        let bce: f64 =
            x.iter().zip(&t).map(|(&x, &t)| bce_ref(sig(x as f64), t as f64 * 0.8 + 0.1)).sum::<f64>()
                / n as f64;
        let mut dice = 0.0;
        for ch in 0..c {
            let (mut i, mut pp, mut tt) = (0.0, 0.0, 0.0);
            for v in 0..n / c {
                let (p, t) = (sig(x[v * c + ch] as f64), t[v * c + ch] as f64);
                i += p * t;
                pp += p * p;
                tt += t * t;
            }
            dice += 2.0 * i / (pp + tt).max(1e-6);
        }
        let want = alpha * bce + beta * (1.0 - dice / c as f64);
        let (v, _) =
            run(&config("BCEDiceLoss", kwargs), &tensor(&shape, x.clone()), &tensor(&shape, t.clone()));
        assert_scalar("BCEDiceLoss", v as f64, want, 1e-5);
    }
}

/// Labels in 0..c for `voxels` voxels.
fn labels(rng: &mut StdRng, voxels: usize, c: usize) -> Vec<f32> {
    (0..voxels).map(|_| rng.random_range(0..c) as f32).collect()
}

fn softmax_ref(x: &[f32]) -> Vec<f64> {
    let e: Vec<f64> = x.iter().map(|&v| (v as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn cross_entropy_and_dice_ce_by_hand() {
    let mut rng = StdRng::seed_from_u64(3);
    let (n, sp, c) = (2, 3 * 2 * 2, 4);
    let x = random(&mut rng, n * sp * c, -2.0, 2.0);
    let y = labels(&mut rng, n * sp, c);
    let (xt, yt) = (tensor(&[n, 3, 2, 2, c], x.clone()), tensor(&[n, 3, 2, 2, 1], y.clone()));
    let probs: Vec<Vec<f64>> = (0..n * sp).map(|v| softmax_ref(&x[v * c..(v + 1) * c])).collect();
    let ce: f64 = probs.iter().zip(&y).map(|(p, &y)| -p[y as usize].ln()).sum::<f64>() / (n * sp) as f64;
    let (v, _) = run(&config("CrossEntropyLoss", json!({})), &xt, &yt);
    assert_scalar("CrossEntropyLoss", v as f64, ce, 1e-5);
    // A (N, D, H, W) label map works too.
    let (v, _) = run(
        &config("CrossEntropyLoss", json!({"reduction": "sum"})),
        &xt,
        &yt.reshape([n, 3, 2, 2]).unwrap(),
    );
    assert_scalar("CrossEntropyLoss sum", v as f64, ce * (n * sp) as f64, 1e-5);

    // Dice + CE with the background included, per sample and over the batch.
    for batch_dice in [false, true] {
        let mut dcs = vec![];
        let samples: Vec<Vec<usize>> =
            if batch_dice { vec![(0..n).collect()] } else { (0..n).map(|b| vec![b]).collect() };
        for group in &samples {
            for k in 0..c {
                let (mut i, mut p, mut g) = (0.0, 0.0, 0.0);
                for &b in group {
                    let voxels = b * sp..(b + 1) * sp;
                    for (pv, &yv) in probs[voxels.clone()].iter().zip(&y[voxels]) {
                        let hit = if yv as usize == k { 1.0 } else { 0.0 };
                        i += pv[k] * hit;
                        p += pv[k];
                        g += hit;
                    }
                }
                dcs.push((2.0 * i + 1e-5) / (g + p + 1e-5));
            }
        }
        let want = 0.7 * ce - 2.0 * dcs.iter().sum::<f64>() / dcs.len() as f64;
        let loss = config(
            "DC_and_CE_loss",
            json!({ "batch_dice": batch_dice, "do_bg": true, "weight_ce": 0.7, "weight_dice": 2 }),
        );
        let (v, _) = run(&loss, &xt, &yt);
        assert_scalar("DC_and_CE_loss with background", v as f64, want, 1e-5);
    }
}

#[test]
fn masked_cosine_by_hand() {
    let mut rng = StdRng::seed_from_u64(4);
    let (voxels, c) = (2 * 2 * 3 * 2, 3);
    let p = random(&mut rng, voxels * c, -1.0, 1.0);
    let mut t = random(&mut rng, voxels * c, -1.0, 1.0);
    for v in [0, 5, 6, 17] {
        t[v * c..(v + 1) * c].iter_mut().for_each(|x| *x = 0.0); // masked out
    }
    let (mut sum, mut count) = (0.0, 0.0);
    for v in 0..voxels {
        let (pv, tv) = (&p[v * c..(v + 1) * c], &t[v * c..(v + 1) * c]);
        let norm = |a: &[f32]| a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        if norm(tv) > 1e-6 {
            let dot: f64 = pv.iter().zip(tv).map(|(&a, &b)| a as f64 * b as f64).sum();
            sum += dot / (norm(pv) * norm(tv));
            count += 1.0;
        }
    }
    let want = 1.0 - sum / (count + 1e-8);
    let shape = [2, 2, 3, 2, c];
    let (v, gx) = run(&config("MaskedCosineLoss", json!(null)), &tensor(&shape, p), &tensor(&shape, t));
    assert_scalar("MaskedCosineLoss", v as f64, want, 1e-5);
    assert!(
        gx.data()[..c].iter().chain(&gx.data()[5 * c..7 * c]).all(|&g| g == 0.0),
        "masked voxels get no gradient"
    );
}

#[test]
fn smooth_l1_beta_and_sum_reduction_by_hand() {
    let d = [-2.0f32, -0.3, 0.0, 0.2, 0.45, 1.5];
    let x: Vec<f32> = d.iter().map(|v| v + 1.0).collect();
    let t = vec![1.0f32; 6];
    let beta = 0.5;
    let want: f64 = d
        .iter()
        .map(|&d| {
            let a = (d as f64).abs();
            if a < beta { 0.5 * a * a / beta } else { a - 0.5 * beta }
        })
        .sum::<f64>()
        / 6.0;
    let (v, _) = run(
        &config("SmoothL1Loss", json!({"beta": beta})),
        &tensor(&[6], x.clone()),
        &tensor(&[6], t.clone()),
    );
    assert_scalar("SmoothL1 beta 0.5", v as f64, want, 1e-5);
    let mse: f64 = d.iter().map(|&d| (d as f64).powi(2)).sum();
    let (v, gx) = run(&config("MSELoss", json!({"reduction": "sum"})), &tensor(&[6], x), &tensor(&[6], t));
    assert_scalar("MSE sum", v as f64, mse, 1e-5);
    assert_eq!(gx.data()[0], -4.0);
}

// ---------------------------------------------------------------------------------------------
// float64 finite differences of every kernel, and the float32 graph against the float64 kernels.

/// The f64 backward matches central differences of the f64 forward, and the f32 graph gives the
/// f64 values.
fn check_grad(
    name: &str,
    loss: &Loss,
    x: &Tensor,
    target: &Tensor,
    f: impl Fn(&[f64]) -> f64,
    df: impl Fn(&[f64]) -> Vec<f64>,
) {
    let x64 = f64s(x);
    let analytic = df(&x64);
    let numeric = numeric_grad(&x64, 1e-6, &f);
    let e = rel_err64(&analytic, &numeric);
    assert!(e < 1e-6, "{name}: backward vs finite differences: relative error {e:.2e}");
    assert!(analytic.iter().any(|&g| g != 0.0), "{name}: gradient is not trivially zero");
    let (v, gx) = run(loss, x, target);
    assert_scalar(&format!("{name} f32 value"), v as f64, f(&x64), 1e-5);
    let a32: Vec<f32> = analytic.iter().map(|&g| g as f32).collect();
    let e = rel_err(gx.data(), &a32);
    assert!(e < 1e-5, "{name}: f32 graph gradient vs f64 kernel: relative error {e:.2e}");
}

#[test]
fn pointwise_gradients() {
    let mut rng = StdRng::seed_from_u64(5);
    let shape = [2, 3, 2, 3, 2];
    let n: usize = shape.iter().product();
    let cases = [
        ("MSELoss", json!({}), Pointwise::Mse, (-2.0, 2.0)),
        ("L1Loss", json!({"reduction": "sum"}), Pointwise::L1, (-2.0, 2.0)),
        ("SmoothL1Loss", json!({}), Pointwise::SmoothL1 { beta: 1.0 }, (-2.0, 2.0)),
        ("SmoothL1Loss", json!({"beta": 0.3}), Pointwise::SmoothL1 { beta: 0.3 }, (-2.0, 2.0)),
        ("BCEWithLogitsLoss", json!({}), Pointwise::BceWithLogits(LabelSmoothing::None), (-4.0, 4.0)),
        (
            "BCEWithLogitsLossLabelSmoothing",
            json!({}),
            Pointwise::BceWithLogits(LabelSmoothing::Constant(0.1)),
            (-4.0, 4.0),
        ),
        (
            "BCEWithLogitsLossZSmooth",
            json!({}),
            Pointwise::BceWithLogits(LabelSmoothing::ZSlices { center: 0.1, edge: 0.4 }),
            (-4.0, 4.0),
        ),
        ("BCELoss", json!({}), Pointwise::Bce, (0.05, 0.95)),
    ];
    for (name, kwargs, kind, (lo, hi)) in cases {
        let loss = config(name, kwargs);
        let Loss::Pointwise(k2, reduction) = loss else { panic!("{name} is pointwise") };
        assert_eq!(k2, kind, "{name}");
        let scale = if reduction == Reduction::Mean { 1.0 / n as f64 } else { 1.0 };
        let x = tensor(&shape, random(&mut rng, n, lo, hi));
        let t = tensor(
            &shape,
            if name.starts_with("BCE") { binary(&mut rng, n) } else { random(&mut rng, n, -2.0, 2.0) },
        );
        let t64 = f64s(&t);
        let slices = op::Slices { depth: 3, len: 12 };
        check_grad(
            name,
            &loss,
            &x,
            &t,
            |x| k::pointwise_forward(kind, x, &t64, slices, scale),
            |x| {
                let mut gx = vec![0.0; n];
                k::pointwise_backward(kind, x, &t64, slices, scale, &mut gx);
                gx
            },
        );
    }
}

#[test]
fn softmax_loss_gradients() {
    let mut rng = StdRng::seed_from_u64(6);
    let (n, c) = (2, 3);
    let shape = [n, 3, 2, 2, c];
    let voxels = n * 12;
    let x = tensor(&shape, random(&mut rng, voxels * c, -2.0, 2.0));
    let y = tensor(&[n, 3, 2, 2, 1], labels(&mut rng, voxels, c));
    let y64 = f64s(&y);
    let mut cases =
        vec![("CrossEntropyLoss".to_string(), Loss::CrossEntropy(Reduction::Mean), 1.0 / voxels as f64, 0.0)];
    for (batch_dice, do_bg) in [(false, false), (true, false), (false, true), (true, true)] {
        let cfg = DiceCe { batch_dice, do_bg, weight_ce: 0.5, weight_dice: 1.5, ..DiceCe::default() };
        cases.push((format!("DC_and_CE_loss {cfg:?}"), Loss::DiceCe(cfg), 0.5 / voxels as f64, 1.5));
    }
    for (name, loss, ce_scale, dice_weight) in cases {
        let (batch_dice, do_bg, smooth) = match loss {
            Loss::DiceCe(d) => (d.batch_dice, d.do_bg, d.smooth),
            _ => (false, true, 0.0),
        };
        let cfg = op::SoftmaxLoss { ce_scale, dice_weight, batch_dice, do_bg, smooth };
        check_grad(
            &name,
            &loss,
            &x,
            &y,
            |x| k::softmax_loss_forward(x, &y64, n, c, &cfg).0,
            |x| {
                let (_, grad) = k::softmax_loss_forward(x, &y64, n, c, &cfg);
                let mut gx = vec![0.0; x.len()];
                k::softmax_loss_backward(x, &y64, &grad, 1.0, &mut gx);
                gx
            },
        );
    }
}

#[test]
fn bce_dice_and_masked_cosine_gradients() {
    let mut rng = StdRng::seed_from_u64(7);
    let c = 3;
    let shape = [2, 3, 2, 2, c];
    let len = 2 * 12 * c;
    let x = tensor(&shape, random(&mut rng, len, -3.0, 3.0));
    let t = tensor(&shape, binary(&mut rng, len));
    let t64 = f64s(&t);
    let cfg = op::BceDice { alpha: 0.3, beta: 0.7, smoothing: 0.1 };
    check_grad(
        "BCEDiceLoss",
        &config("BCEDiceLoss", json!({"alpha": 0.3, "beta": 0.7})),
        &x,
        &t,
        |x| k::bce_dice_forward(x, &t64, c, &cfg).0,
        |x| {
            let (_, grad) = k::bce_dice_forward(x, &t64, c, &cfg);
            let mut gx = vec![0.0; x.len()];
            k::bce_dice_backward(x, &t64, &grad, 1.0, &mut gx);
            gx
        },
    );

    let mut tv = random(&mut rng, len, -1.0, 1.0);
    tv[3 * c..5 * c].iter_mut().for_each(|v| *v = 0.0);
    let t = tensor(&shape, tv);
    let t64 = f64s(&t);
    check_grad(
        "MaskedCosineLoss",
        &Loss::MaskedCosine,
        &x,
        &t,
        |x| k::masked_cosine_forward(x, &t64, c).0,
        |x| {
            let (_, scale) = k::masked_cosine_forward(x, &t64, c);
            let mut gx = vec![0.0; x.len()];
            k::masked_cosine_backward(x, &t64, c, scale, &mut gx);
            gx
        },
    );
}

#[test]
fn results_do_not_depend_on_block_boundaries() {
    // More voxels than one parallel block: the sums still match a single-threaded loop.
    let mut rng = StdRng::seed_from_u64(8);
    let (n, sp, c) = (2, 5000, 2);
    let x = random(&mut rng, n * sp * c, -2.0, 2.0);
    let t = binary(&mut rng, n * sp * c);
    let (v, _) = run(
        &config("MSELoss", json!({})),
        &tensor(&[n, 5000, 1, 1, c], x.clone()),
        &tensor(&[n, 5000, 1, 1, c], t.clone()),
    );
    let want: f64 = x.iter().zip(&t).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum::<f64>() / x.len() as f64;
    assert_scalar("MSE over blocks", v as f64, want, 1e-6);
    let y: Vec<f32> = t.iter().step_by(c).copied().collect();
    let xt = tensor(&[n, 5000, 1, 1, c], x.clone());
    let yt = tensor(&[n, 5000, 1, 1, 1], y.clone());
    let (v1, g1) = run(&config("DC_and_CE_loss", json!({})), &xt, &yt);
    let (v2, g2) = run(&config("DC_and_CE_loss", json!({})), &xt, &yt);
    assert_eq!((v1, g1.data()), (v2, g2.data()), "deterministic");
    let mut dcs = 0.0;
    let mut ce = 0.0;
    for b in 0..n {
        let (mut i, mut p, mut g) = (0.0, 0.0, 0.0);
        for v in b * sp..(b + 1) * sp {
            let pr = softmax_ref(&x[v * c..(v + 1) * c]);
            ce -= pr[y[v] as usize].ln();
            let hit = y[v] as f64;
            i += pr[1] * hit;
            p += pr[1];
            g += hit;
        }
        dcs += (2.0 * i + 1e-5) / (g + p + 1e-5);
    }
    assert_scalar("Dice CE over blocks", v1 as f64, ce / (n * sp) as f64 - dcs / n as f64, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Construction and input errors

#[test]
fn constructor_defaults_and_aliases() {
    for name in LOSS_NAMES {
        Loss::from_config(name, &json!({})).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
    assert_eq!(config("BCEDiceLoss", json!({})), Loss::BceDice { alpha: 0.5, beta: 0.5 });
    assert_eq!(config("BCEDiceLoss", json!(null)), Loss::BceDice { alpha: 0.5, beta: 0.5 });
    assert_eq!(
        config("BCEDiceLoss", json!({"alpha": 1, "beta": 0.25})),
        Loss::BceDice { alpha: 1.0, beta: 0.25 }
    );
    assert_eq!(
        config("DiceCELoss", json!({"batch_dice": true})),
        config("DC_and_CE_loss", json!({"batch_dice": true}))
    );
    assert_eq!(config("DC_and_CE_loss", json!({})), Loss::DiceCe(DiceCe::default()));
    assert_eq!(
        config("BCEWithLogitsLossLabelSmoothing", json!({})),
        Loss::Pointwise(Pointwise::BceWithLogits(LabelSmoothing::Constant(0.1)), Reduction::Mean)
    );
    assert_eq!(
        config("BCEWithLogitsLossZSmooth", json!({})),
        Loss::Pointwise(
            Pointwise::BceWithLogits(LabelSmoothing::ZSlices { center: 0.1, edge: 0.4 }),
            Reduction::Mean
        )
    );
    assert_eq!(
        config("SmoothL1Loss", json!({})),
        Loss::Pointwise(Pointwise::SmoothL1 { beta: 1.0 }, Reduction::Mean)
    );
    assert_eq!(config("CrossEntropyLoss", json!({"reduction": "sum"})), Loss::CrossEntropy(Reduction::Sum));
}

#[test]
fn constructor_errors_name_the_problem() {
    let err = |name: &str, kwargs: serde_json::Value| {
        format!("{:#}", Loss::from_config(name, &kwargs).unwrap_err())
    };
    let e = err("DiceLoss", json!({}));
    assert!(e.contains("DiceLoss") && e.contains("DC_and_CE_loss") && e.contains("MaskedCosineLoss"), "{e}");
    let e = err("BCEDiceLoss", json!({"alpha": 0.5, "gamma": 2}));
    assert!(e.contains("'gamma'") && e.contains("alpha, beta"), "{e}");
    let e = err("BCEDiceLoss", json!({"alpha": "half"}));
    assert!(e.contains("'alpha'") && e.contains("half"), "{e}");
    let e = err("DC_and_CE_loss", json!({"batch_dice": 1}));
    assert!(e.contains("'batch_dice'"), "{e}");
    let e = err("MSELoss", json!({"reduction": "none"}));
    assert!(e.contains("'reduction'") && e.contains("none"), "{e}");
    let e = err("MSELoss", json!({"reduction": 3}));
    assert!(e.contains("'reduction'"), "{e}");
    let e = err("MaskedCosineLoss", json!({"eps": 1e-8}));
    assert!(e.contains("'eps'"), "{e}");
    let e = err("BCEWithLogitsLossLabelSmoothing", json!({"smoothing": 1.5}));
    assert!(e.contains("'smoothing'") && e.contains("1.5"), "{e}");
    let e = err("SmoothL1Loss", json!({"beta": -1}));
    assert!(e.contains("'beta'"), "{e}");
    let e = err("L1Loss", json!([1, 2]));
    assert!(e.contains("L1Loss") && e.contains("mapping"), "{e}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let mse = config("MSELoss", json!({}));
    let e = apply_err(&mse, &Tensor::zeros([2, 3, 4]), &Tensor::zeros([2, 4, 3]));
    assert!(e.contains("MSELoss") && e.contains("[2, 3, 4]") && e.contains("[2, 4, 3]"), "{e}");

    let dice = config("DC_and_CE_loss", json!({}));
    let logits = Tensor::zeros([1, 2, 2, 2, 3]);
    let e = apply_err(&dice, &logits, &Tensor::zeros([1, 2, 2, 3, 1]));
    assert!(e.contains("label") && e.contains("[1, 2, 2, 3, 1]") && e.contains("[1, 2, 2, 2, 3]"), "{e}");
    let mut bad = vec![0.0; 8];
    bad[5] = 3.0;
    let e = apply_err(&dice, &logits, &tensor(&[1, 2, 2, 2, 1], bad));
    assert!(e.contains("label value 3") && e.contains("0..3"), "{e}");
    let e = apply_err(&dice, &logits, &tensor(&[1, 2, 2, 2], vec![0.5; 8]));
    assert!(e.contains("0.5"), "{e}");
    let e = apply_err(&dice, &Tensor::zeros([1, 2, 2, 2, 1]), &Tensor::zeros([1, 2, 2, 2, 1]));
    assert!(e.contains("2 classes"), "{e}");
    let e = apply_err(&dice, &Tensor::zeros([8, 3]), &Tensor::zeros([8, 1]));
    assert!(e.contains("[8, 3]"), "{e}");

    let bce = config("BCELoss", json!({}));
    let e = apply_err(&bce, &tensor(&[2], vec![0.5, 1.5]), &Tensor::zeros([2]));
    assert!(e.contains("1.5") && e.contains("probability"), "{e}");
    let z = config("BCEWithLogitsLossZSmooth", json!({}));
    let e = apply_err(&z, &Tensor::zeros([4, 4]), &Tensor::zeros([4, 4]));
    assert!(e.contains("[4, 4]"), "{e}");

    let mut g = Graph::new();
    let a = g.leaf(Tensor::zeros([1, 2, 2, 2, 3]));
    let e = deep_supervision(&mut g, &dice, &[a], &[], &[1.0]).unwrap_err().to_string();
    assert!(e.contains("1 outputs") && e.contains("0 targets"), "{e}");
}
