//! conv3d and conv_transpose3d: PyTorch fixtures through the autograd ops, the fast kernels
//! against the naive loops on random shapes, and float64 finite-difference gradients.

mod common;

use common::{assert_close, fixture, fixture_meta, numeric_grad, rel_err, rel_err64, to_cl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::device::cpu::conv;
use unet3d::device::cpu::naive;
use unet3d::device::op::{ConvDims, TransposedDims};
use unet3d::ops::conv::{conv_transpose3d, conv3d};
use unet3d::tensor::{Tensor, layout};
use unet3d::{Graph, ParamStore};

const TOL: f64 = 1e-5;

fn conv_fixtures() -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture_path("index.json")).unwrap()).unwrap();
    let names: Vec<String> = index
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["op"] == "conv3d" || v["op"] == "conv_transpose3d")
        .map(|(k, _)| k.clone())
        .collect();
    assert!(names.len() >= 8, "expected every conv fixture, found {names:?}");
    names
}

fn triple(v: &serde_json::Value) -> [usize; 3] {
    let a: Vec<usize> = v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    a.try_into().unwrap()
}

/// A weight conversion between PyTorch's layout and unet3d's.
type WeightLayout = fn(&Tensor) -> anyhow::Result<Tensor>;

/// Every conv fixture: y, gx, gw, gb within 1e-5 through the ops (and through the naive loops).
#[test]
fn pytorch_fixtures_forward_and_gradients() {
    for name in conv_fixtures() {
        let f = fixture(&name);
        let meta = fixture_meta(&f);
        let transposed = meta["op"] == "conv_transpose3d";
        let stride = triple(&meta["stride"]);
        let (to_unet, to_torch): (WeightLayout, WeightLayout) = if transposed {
            (layout::transposed_weight_from_torch, layout::transposed_weight_to_torch)
        } else {
            (layout::conv_weight_from_torch, layout::conv_weight_to_torch)
        };
        if !transposed {
            assert_eq!(triple(&meta["padding"]), triple(&meta["kernel"]).map(|k| (k - 1) / 2), "{name}");
        }
        let x = to_cl(f.get("x").unwrap());
        let w = to_unet(f.get("w").unwrap()).unwrap();
        let b = f.tensors.get("b").cloned();
        let mut g = Graph::new();
        let (xv, wv) = (g.leaf(x.clone()), g.leaf(w.clone()));
        let bv = b.clone().map(|b| g.leaf(b));
        let y = if transposed {
            conv_transpose3d(&mut g, xv, wv, bv, stride)
        } else {
            conv3d(&mut g, xv, wv, bv, stride)
        }
        .unwrap();
        let want_y = to_cl(f.get("y").unwrap());
        assert_close(&format!("{name} y"), g.value(y), &want_y, TOL);
        let gy = to_cl(f.get("gy").unwrap());
        g.backward_from(y, gy.clone(), &mut ParamStore::new()).unwrap();
        let gx = layout::ndhwc_to_ncdhw(g.grad(xv).unwrap()).unwrap();
        assert_close(&format!("{name} gx"), &gx, f.get("gx").unwrap(), TOL);
        let gw = to_torch(g.grad(wv).unwrap()).unwrap();
        assert_close(&format!("{name} gw"), &gw, f.get("gw").unwrap(), TOL);
        if let Some(bv) = bv {
            assert_close(&format!("{name} gb"), g.grad(bv).unwrap(), f.get("gb").unwrap(), TOL);
        }

        // The naive loops, which the random tests below trust, meet the same fixture.
        let xd = x.dims();
        let bias = b.as_ref().map(Tensor::data);
        let (mut ny, mut ngx, mut ngw) =
            (vec![0.0; want_y.numel()], vec![0.0; x.numel()], vec![0.0; w.numel()]);
        if transposed {
            let d = TransposedDims {
                n: xd[0],
                input: [xd[1], xd[2], xd[3]],
                cin: xd[4],
                cout: w.dims()[4],
                kernel: stride,
            };
            naive::conv_transpose3d_forward(&mut ny, x.data(), w.data(), bias, &d);
            naive::conv_transpose3d_backward_data(&mut ngx, gy.data(), w.data(), &d);
            naive::conv_transpose3d_backward_weight(&mut ngw, gy.data(), x.data(), &d);
        } else {
            let wd = w.dims();
            let d = ConvDims {
                n: xd[0],
                input: [xd[1], xd[2], xd[3]],
                cin: xd[4],
                cout: wd[0],
                kernel: [wd[1], wd[2], wd[3]],
                stride,
            };
            naive::conv3d_forward(&mut ny, x.data(), w.data(), bias, &d);
            naive::conv3d_backward_data(&mut ngx, gy.data(), w.data(), &d);
            naive::conv3d_backward_weight(&mut ngw, gy.data(), x.data(), &d);
        }
        assert!(rel_err(&ny, want_y.data()) <= TOL, "{name}: naive y");
        assert!(rel_err(&ngx, to_cl(f.get("gx").unwrap()).data()) <= TOL, "{name}: naive gx");
        assert!(rel_err(&ngw, to_unet(f.get("gw").unwrap()).unwrap().data()) <= TOL, "{name}: naive gw");
        if let Some(b) = &b {
            let mut ngb = vec![0.0; b.numel()];
            naive::conv_backward_bias(&mut ngb, gy.data());
            assert!(rel_err(&ngb, f.get("gb").unwrap().data()) <= TOL, "{name}: naive gb");
        }
    }
}

fn random<T: From<f32>>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from(rng.random_range(-1.0f32..1.0))).collect()
}

/// Runs `f` on `pool`, or on the default pool when None.
fn on(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() + Send) {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Asserts one fast pass against its naive twin (both f32).
fn check(what: &str, fast: &[f32], slow: &[f32]) {
    let e = rel_err(fast, slow);
    assert!(e <= TOL, "{what}: relative error {e:.2e}");
}

const CHANNELS: [usize; 5] = [1, 3, 5, 17, 2];

fn random_conv(rng: &mut StdRng, kernel: [usize; 3], big: bool) -> ConvDims {
    let stride = if kernel == [2; 3] { [2; 3] } else { [0; 3].map(|_| rng.random_range(1..=2)) };
    let max = if big { 13 } else { 7 };
    let input = kernel.map(|k| rng.random_range(k.max(1)..=max));
    let (cin, cout) = if big {
        (CHANNELS[rng.random_range(2..4)], CHANNELS[rng.random_range(2..4)])
    } else {
        (CHANNELS[rng.random_range(0..5)], CHANNELS[rng.random_range(0..5)])
    };
    ConvDims { n: rng.random_range(1..=2), input, cin, cout, kernel, stride }
}

/// The fast kernels (every path: gather, pointwise, blocked, phased backward-data, tiled and
/// multi-threaded) against the naive loops on a few hundred random shapes.
#[test]
fn fast_conv3d_matches_naive_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(7);
    let kernels = [[3, 3, 3], [1, 3, 3], [1, 1, 1], [3, 1, 3], [2, 2, 2]];
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut cases = 0;
    for round in 0..60 {
        for kernel in kernels {
            // Every 5th round uses sizes and channels big enough to split into many tiles, half of
            // those on 3 threads (uneven partial sums) instead of the default pool.
            let d = random_conv(&mut rng, kernel, round % 5 == 0);
            let pool = (round % 10 == 5).then_some(&three);
            d.validate().unwrap();
            let what = format!("{d:?}");
            let x: Vec<f32> = random(&mut rng, d.x_len());
            let w: Vec<f32> = random(&mut rng, d.w_len());
            let b: Vec<f32> = random(&mut rng, d.cout);
            let gy: Vec<f32> = random(&mut rng, d.y_len());
            let (mut fast, mut slow) = (vec![0.0; d.y_len()], vec![0.0; d.y_len()]);
            on(pool, || conv::conv3d_forward(&mut fast, &x, &w, Some(&b), &d));
            naive::conv3d_forward(&mut slow, &x, &w, Some(&b), &d);
            check(&format!("forward {what}"), &fast, &slow);
            let (mut fast, mut slow) = (vec![f32::NAN; d.x_len()], vec![0.0; d.x_len()]);
            on(pool, || conv::conv3d_backward_data(&mut fast, &gy, &w, &d));
            naive::conv3d_backward_data(&mut slow, &gy, &w, &d);
            check(&format!("backward-data {what}"), &fast, &slow);
            let (mut fast, mut slow) = (vec![f32::NAN; d.w_len()], vec![0.0; d.w_len()]);
            on(pool, || conv::conv3d_backward_weight(&mut fast, &gy, &x, &d));
            naive::conv3d_backward_weight(&mut slow, &gy, &x, &d);
            check(&format!("backward-weight {what}"), &fast, &slow);
            let (mut fast, mut slow) = (vec![0.0; d.cout], vec![0.0; d.cout]);
            conv::conv_backward_bias(&mut fast, &gy);
            naive::conv_backward_bias(&mut slow, &gy);
            check(&format!("bias {what}"), &fast, &slow);
            cases += 1;
        }
    }
    assert_eq!(cases, 300);
}

#[test]
fn fast_transposed_conv_matches_naive_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(11);
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for round in 0..100 {
        for kernel in [[2, 2, 2], [1, 2, 2]] {
            let big = round % 5 == 0;
            let pool = (round % 10 == 5).then_some(&three);
            let max = if big { 9 } else { 5 };
            let pick = |rng: &mut StdRng| {
                CHANNELS[if big { rng.random_range(2..4) } else { rng.random_range(0..5) }]
            };
            let d = TransposedDims {
                n: rng.random_range(1..=2),
                input: [0; 3].map(|_| rng.random_range(1..=max)),
                cin: pick(&mut rng),
                cout: pick(&mut rng),
                kernel,
            };
            let what = format!("{d:?}");
            let x: Vec<f32> = random(&mut rng, d.x_len());
            let w: Vec<f32> = random(&mut rng, d.w_len());
            let b: Vec<f32> = random(&mut rng, d.cout);
            let gy: Vec<f32> = random(&mut rng, d.y_len());
            let (mut fast, mut slow) = (vec![f32::NAN; d.y_len()], vec![0.0; d.y_len()]);
            on(pool, || conv::conv_transpose3d_forward(&mut fast, &x, &w, Some(&b), &d));
            naive::conv_transpose3d_forward(&mut slow, &x, &w, Some(&b), &d);
            check(&format!("forward {what}"), &fast, &slow);
            let (mut fast, mut slow) = (vec![f32::NAN; d.x_len()], vec![0.0; d.x_len()]);
            on(pool, || conv::conv_transpose3d_backward_data(&mut fast, &gy, &w, &d));
            naive::conv_transpose3d_backward_data(&mut slow, &gy, &w, &d);
            check(&format!("backward-data {what}"), &fast, &slow);
            let (mut fast, mut slow) = (vec![f32::NAN; d.w_len()], vec![0.0; d.w_len()]);
            on(pool, || conv::conv_transpose3d_backward_weight(&mut fast, &gy, &x, &d));
            naive::conv_transpose3d_backward_weight(&mut slow, &gy, &x, &d);
            check(&format!("backward-weight {what}"), &fast, &slow);
        }
    }
}

/// Deep-layer regime: few voxels and a large weight (the weight gradient splits the output
/// channels, alone or together with groups of tiles; the flipped weight of backward-data is
/// transposed in parallel), on pools of 1, 2, 3 and 8 threads.
#[test]
fn deep_layer_shapes_match_naive_on_any_thread_count() {
    let mut rng = StdRng::seed_from_u64(13);
    let cases = [
        (1, [4, 4, 4], [1, 1, 1], 40),
        (1, [5, 6, 5], [2, 2, 2], 40),
        (1, [3, 4, 4], [1, 2, 1], 24),
        (2, [4, 4, 4], [1, 1, 1], 80),
    ];
    for (n, input, stride, cout) in cases {
        let d = ConvDims { n, input, cin: 64, cout, kernel: [3; 3], stride };
        let x: Vec<f32> = random(&mut rng, d.x_len());
        let w: Vec<f32> = random(&mut rng, d.w_len());
        let gy: Vec<f32> = random(&mut rng, d.y_len());
        let mut want = (vec![0.0; d.y_len()], vec![0.0; d.x_len()], vec![0.0; d.w_len()]);
        naive::conv3d_forward(&mut want.0, &x, &w, None, &d);
        naive::conv3d_backward_data(&mut want.1, &gy, &w, &d);
        naive::conv3d_backward_weight(&mut want.2, &gy, &x, &d);
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let what = format!("{d:?} on {threads} threads");
            let mut got = (vec![0.0; d.y_len()], vec![0.0; d.x_len()], vec![f32::NAN; d.w_len()]);
            on(Some(&pool), || {
                conv::conv3d_forward(&mut got.0, &x, &w, None, &d);
                conv::conv3d_backward_data(&mut got.1, &gy, &w, &d);
                conv::conv3d_backward_weight(&mut got.2, &gy, &x, &d);
            });
            check(&format!("forward {what}"), &got.0, &want.0);
            check(&format!("backward-data {what}"), &got.1, &want.1);
            check(&format!("backward-weight {what}"), &got.2, &want.2);
        }
    }
}

/// Finite differences of `loss = sum(y * r)` in float64 against the analytic gradients
/// `(gx, gw, gb)` that the fast kernels give for upstream gradient `r`.
fn fd_check(
    what: &str,
    rng: &mut StdRng,
    lens: [usize; 4],
    forward: impl Fn(&mut [f64], &[f64], &[f64], &[f64]),
    grads: impl Fn(&[f64], &[f64], &[f64]) -> [Vec<f64>; 3],
) {
    let [xl, wl, bl, yl] = lens;
    let (x, w, b, r): (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) =
        (random(rng, xl), random(rng, wl), random(rng, bl), random(rng, yl));
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut y = vec![0.0; yl];
        forward(&mut y, x, w, b);
        y.iter().zip(&r).map(|(y, r)| y * r).sum::<f64>()
    };
    let [gx, gw, gb] = grads(&r, &x, &w);
    let h = 1e-4;
    let checks = [
        ("x", gx, numeric_grad(&x, h, |x| loss(x, &w, &b))),
        ("w", gw, numeric_grad(&w, h, |w| loss(&x, w, &b))),
        ("b", gb, numeric_grad(&b, h, |b| loss(&x, &w, b))),
    ];
    for (name, analytic, numeric) in checks {
        let e = rel_err64(&analytic, &numeric);
        assert!(e <= 1e-6, "{what} d/d{name}: relative error {e:.2e}");
    }
}

#[test]
fn conv3d_gradients_match_finite_differences_in_f64() {
    let mut rng = StdRng::seed_from_u64(3);
    let shapes = [
        ([3, 3, 3], [1, 1, 1], [4, 3, 5]),
        ([3, 3, 3], [2, 1, 2], [5, 4, 3]),
        ([1, 3, 3], [1, 2, 2], [2, 5, 4]),
        ([3, 1, 3], [2, 2, 1], [3, 3, 4]),
        ([2, 2, 2], [2, 2, 2], [5, 4, 4]),
        ([1, 1, 1], [1, 1, 1], [2, 3, 3]),
        ([1, 1, 1], [2, 1, 2], [3, 3, 4]),
    ];
    for (kernel, stride, input) in shapes {
        let d = ConvDims { n: 2, input, cin: 2, cout: 3, kernel, stride };
        fd_check(
            &format!("conv3d {d:?}"),
            &mut rng,
            [d.x_len(), d.w_len(), d.cout, d.y_len()],
            |y, x, w, b| conv::conv3d_forward(y, x, w, Some(b), &d),
            |r, x, w| {
                let (mut gx, mut gw, mut gb) =
                    (vec![0.0; d.x_len()], vec![0.0; d.w_len()], vec![0.0; d.cout]);
                conv::conv3d_backward_data(&mut gx, r, w, &d);
                conv::conv3d_backward_weight(&mut gw, r, x, &d);
                conv::conv_backward_bias(&mut gb, r);
                [gx, gw, gb]
            },
        );
    }
}

#[test]
fn conv_transpose3d_gradients_match_finite_differences_in_f64() {
    let mut rng = StdRng::seed_from_u64(5);
    for (kernel, input) in [([2, 2, 2], [2, 3, 2]), ([1, 2, 2], [3, 2, 3])] {
        let d = TransposedDims { n: 2, input, cin: 3, cout: 2, kernel };
        fd_check(
            &format!("conv_transpose3d {d:?}"),
            &mut rng,
            [d.x_len(), d.w_len(), d.cout, d.y_len()],
            |y, x, w, b| conv::conv_transpose3d_forward(y, x, w, Some(b), &d),
            |r, x, w| {
                let (mut gx, mut gw, mut gb) =
                    (vec![0.0; d.x_len()], vec![0.0; d.w_len()], vec![0.0; d.cout]);
                conv::conv_transpose3d_backward_data(&mut gx, r, w, &d);
                conv::conv_transpose3d_backward_weight(&mut gw, r, x, &d);
                conv::conv_backward_bias(&mut gb, r);
                [gx, gw, gb]
            },
        );
    }
}

/// Only the gradients that inputs need are produced, and the weight gradient is deterministic.
#[test]
fn backward_skips_unneeded_gradients() {
    let mut rng = StdRng::seed_from_u64(9);
    let x = Tensor::from_vec([1, 4, 5, 6, 3], random(&mut rng, 360)).unwrap();
    let w = Tensor::from_vec([2, 3, 3, 3, 3], random(&mut rng, 162)).unwrap();
    let mut g = Graph::new();
    let (xv, wv) = (g.constant(x), g.leaf(w));
    let y = conv3d(&mut g, xv, wv, None, [1, 1, 1]).unwrap();
    assert_eq!(g.shape(y).dims(), &[1, 4, 5, 6, 2]);
    let gy = Tensor::full([1, 4, 5, 6, 2], 1.0);
    g.backward_from(y, gy, &mut ParamStore::new()).unwrap();
    assert!(g.grad(xv).is_none());
    assert_eq!(g.grad(wv).unwrap().dims(), &[2, 3, 3, 3, 3]);
    // No gradient wanted at all: nothing recorded.
    let mut g = Graph::no_grad();
    let (xv, wv) = (g.leaf(Tensor::zeros([1, 2, 2, 2, 3])), g.leaf(Tensor::zeros([3, 2, 2, 2, 4])));
    let y = conv_transpose3d(&mut g, xv, wv, None, [2, 2, 2]).unwrap();
    assert_eq!(g.shape(y).dims(), &[1, 4, 4, 4, 4]);
    assert!(!g.requires_grad(y));

    let d = ConvDims { n: 2, input: [9, 10, 11], cin: 17, cout: 5, kernel: [3; 3], stride: [1; 3] };
    let (gy, x): (Vec<f32>, Vec<f32>) = (random(&mut rng, d.y_len()), random(&mut rng, d.x_len()));
    let (mut a, mut b) = (vec![0.0; d.w_len()], vec![0.0; d.w_len()]);
    conv::conv3d_backward_weight(&mut a, &gy, &x, &d);
    conv::conv3d_backward_weight(&mut b, &gy, &x, &d);
    assert_eq!(a, b);
}

#[test]
fn shape_errors_name_the_op_and_both_shapes() {
    let mut g = Graph::new();
    let x = g.leaf(Tensor::zeros([1, 4, 4, 4, 3]));
    let w = g.leaf(Tensor::zeros([2, 3, 3, 3, 5]));
    let e = format!("{:#}", conv3d(&mut g, x, w, None, [1, 1, 1]).unwrap_err());
    assert!(e.contains("conv3d") && e.contains("[1, 4, 4, 4, 3]") && e.contains("[2, 3, 3, 3, 5]"), "{e}");

    let w = g.leaf(Tensor::zeros([2, 3, 3, 3, 3]));
    let b = g.leaf(Tensor::zeros([3]));
    let e = format!("{:#}", conv3d(&mut g, x, w, Some(b), [1, 1, 1]).unwrap_err());
    assert!(e.contains("bias") && e.contains("[3]"), "{e}");
    let e = format!("{:#}", conv3d(&mut g, x, w, None, [0, 1, 1]).unwrap_err());
    assert!(e.contains("stride"), "{e}");
    // "Same" padding only leaves an even kernel on a 1-voxel axis without room.
    let thin = g.leaf(Tensor::zeros([1, 1, 4, 4, 3]));
    let w2 = g.leaf(Tensor::zeros([2, 2, 3, 3, 3]));
    let e = format!("{:#}", conv3d(&mut g, thin, w2, None, [1, 1, 1]).unwrap_err());
    assert!(e.contains("does not fit"), "{e}");
    let flat = g.leaf(Tensor::zeros([4, 3]));
    let e = format!("{:#}", conv3d(&mut g, flat, w, None, [1, 1, 1]).unwrap_err());
    assert!(e.contains("[4, 3]"), "{e}");

    let wt = g.leaf(Tensor::zeros([3, 2, 2, 2, 4]));
    let e = format!("{:#}", conv_transpose3d(&mut g, x, wt, None, [1, 2, 2]).unwrap_err());
    assert!(
        e.contains("conv_transpose3d") && e.contains("kernel = stride") && e.contains("[3, 2, 2, 2, 4]"),
        "{e}"
    );
    let wt = g.leaf(Tensor::zeros([5, 2, 2, 2, 4]));
    let e = format!("{:#}", conv_transpose3d(&mut g, x, wt, None, [2, 2, 2]).unwrap_err());
    assert!(e.contains("input channels") && e.contains("[1, 4, 4, 4, 3]"), "{e}");
}

/// A sample's forward output is bit-identical whatever else is in its batch: tiled inference
/// batches windows freely and must not change a window's prediction by doing so. Shapes are big
/// enough for several tiles per sample (the tiling used to be sized from the whole batch).
#[test]
fn forward_of_a_sample_does_not_depend_on_its_batch() {
    let mut rng = StdRng::seed_from_u64(11);
    for (kernel, stride, input, cin, cout) in [
        ([3, 3, 3], [1, 1, 1], [7, 9, 11], 8, 16),
        ([3, 3, 3], [1, 1, 1], [32, 32, 32], 1, 8),
        ([3, 3, 3], [1, 1, 1], [16, 16, 16], 16, 16),
        ([3, 3, 3], [2, 2, 2], [32, 32, 32], 8, 16),
        ([3, 3, 3], [1, 1, 1], [4, 4, 4], 64, 64),
        ([3, 3, 3], [1, 1, 1], [8, 8, 8], 32, 32),
        ([3, 3, 3], [2, 2, 2], [16, 16, 16], 16, 32),
        ([3, 3, 3], [1, 1, 1], [8, 8, 8], 64, 64),
        ([1, 1, 1], [1, 1, 1], [32, 32, 32], 8, 3),
    ] {
        let n = 3;
        let d = ConvDims { n, input, cin, cout, kernel, stride };
        let x: Vec<f32> = random(&mut rng, n * input.iter().product::<usize>() * cin);
        let w: Vec<f32> = random(&mut rng, cout * kernel.iter().product::<usize>() * cin);
        let b: Vec<f32> = random(&mut rng, cout);
        let per_out = d.output().iter().product::<usize>() * cout;
        let mut y = vec![0f32; n * per_out];
        conv::conv3d_forward(&mut y, &x, &w, Some(&b), &d);
        let per_in = x.len() / n;
        for s in 0..n {
            let one = ConvDims { n: 1, ..d };
            let mut ys = vec![0f32; per_out];
            conv::conv3d_forward(&mut ys, &x[s * per_in..(s + 1) * per_in], &w, Some(&b), &one);
            assert!(
                ys == y[s * per_out..(s + 1) * per_out],
                "conv3d {kernel:?} s{stride:?}: sample {s} differs"
            );
        }
    }
    let (n, input, cin, cout, kernel) = (3, [8, 8, 8], 32, 16, [2, 2, 2]);
    let d = TransposedDims { n, input, cin, cout, kernel };
    let x: Vec<f32> = random(&mut rng, n * input.iter().product::<usize>() * cin);
    let w: Vec<f32> = random(&mut rng, cin * 8 * cout);
    let per_out = d.output().iter().product::<usize>() * cout;
    let mut y = vec![0f32; n * per_out];
    conv::conv_transpose3d_forward(&mut y, &x, &w, None, &d);
    let per_in = x.len() / n;
    for s in 0..n {
        let mut ys = vec![0f32; per_out];
        let one = TransposedDims { n: 1, ..d };
        conv::conv_transpose3d_forward(&mut ys, &x[s * per_in..(s + 1) * per_in], &w, None, &one);
        assert!(ys == y[s * per_out..(s + 1) * per_out], "conv_transpose3d: sample {s} differs");
    }
}
