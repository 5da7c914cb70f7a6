//! The non-convolution ops against PyTorch fixtures (through the Graph), their kernels against
//! float64 finite differences, and the fused norm + activation against its unfused composition.

mod common;

use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use unet3d::device::cpu::activation as act_k;
use unet3d::device::cpu::elementwise as ew_k;
use unet3d::device::cpu::linear::{self as lin_k, LinearGrads};
use unet3d::device::cpu::{norm as norm_k, pool as pool_k, reduce as red_k};
use unet3d::device::op::Act;
use unet3d::device::op::Bcast;
use unet3d::ops::{activation, elementwise, linear, norm, pool, reduce};
use unet3d::tensor::io::TensorFile;
use unet3d::{Graph, ParamStore, Tensor, Var};

const TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// PyTorch fixtures

/// Fixture tensor `name`, converted to channels-last when it is a 5-D activation.
fn get(f: &TensorFile, name: &str) -> Tensor {
    let t = f.get(name).unwrap().clone();
    if t.shape().rank() == 5 && !name.contains("weight") { to_cl(&t) } else { t }
}

/// Runs `op` on the fixture's `x` and checks `y` and, backward from `gy`, `gx`.
fn check_unary(file: &str, op: impl FnOnce(&mut Graph, Var) -> anyhow::Result<Var>) {
    let f = fixture(&format!("ops/{file}.safetensors"));
    let mut g = Graph::new();
    let mut store = ParamStore::new();
    let x = g.leaf(get(&f, "x"));
    let y = op(&mut g, x).unwrap();
    assert_close(&format!("{file} y"), g.value(y), &get(&f, "y"), TOL);
    g.backward_from(y, get(&f, "gy"), &mut store).unwrap();
    assert_close(&format!("{file} gx"), g.grad(x).unwrap(), &get(&f, "gx"), TOL);
}

#[test]
fn fixtures_activations() {
    let meta = fixture_meta(&fixture("ops/leaky_relu.safetensors"));
    let slope = meta["negative_slope"].as_f64().unwrap();
    check_unary("leaky_relu", |g, x| activation::leaky_relu(g, x, slope));
    check_unary("relu", activation::relu);
    check_unary("sigmoid", activation::sigmoid);
    // PyTorch's softmax over dim 1 (C) is the last axis in channels-last.
    check_unary("softmax_channels", activation::softmax);
}

#[test]
fn fixtures_avg_pool() {
    for file in ["avg_pool3d_k2_odd", "avg_pool3d_k122"] {
        let meta = fixture_meta(&fixture(&format!("ops/{file}.safetensors")));
        let k: Vec<usize> =
            meta["kernel"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(meta["kernel"], meta["stride"]);
        check_unary(file, |g, x| pool::avg_pool3d(g, x, [k[0], k[1], k[2]]));
    }
}

#[test]
fn fixtures_instance_norm() {
    for file in ["instance_norm_2x5", "instance_norm_1x3_big"] {
        let f = fixture(&format!("ops/{file}.safetensors"));
        let eps = fixture_meta(&f)["eps"].as_f64().unwrap();
        let mut store = ParamStore::new();
        let gamma = store.add("w", get(&f, "w")).unwrap();
        let beta = store.add("b", get(&f, "b")).unwrap();
        let mut g = Graph::new();
        let x = g.leaf(get(&f, "x"));
        let (gv, bv) = (g.param(&store, gamma), g.param(&store, beta));
        let y = norm::instance_norm(&mut g, x, gv, bv, eps).unwrap();
        assert_close(&format!("{file} y"), g.value(y), &get(&f, "y"), TOL);
        g.backward_from(y, get(&f, "gy"), &mut store).unwrap();
        assert_close(&format!("{file} gx"), g.grad(x).unwrap(), &get(&f, "gx"), TOL);
        assert_close(&format!("{file} gw"), store.grad(gamma).unwrap(), &get(&f, "gw"), TOL);
        assert_close(&format!("{file} gb"), store.grad(beta).unwrap(), &get(&f, "gb"), TOL);
    }
}

/// Squeeze-excitation composed of the ops: mean over (D, H, W), fc1, ReLU, fc2, sigmoid, gate.
#[test]
fn fixtures_squeeze_excite() {
    for file in ["squeeze_excite_c32", "squeeze_excite_c12"] {
        let f = fixture(&format!("ops/{file}.safetensors"));
        let mut store = ParamStore::new();
        let mut ids = Vec::new();
        for name in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
            let t = get(&f, name);
            // Conv3d 1x1x1 weights (out, in, 1, 1, 1) are Linear weights (out, in).
            let t = if name.ends_with("weight") { t.reshape([t.dims()[0], t.dims()[1]]).unwrap() } else { t };
            ids.push((name, store.add(name, t).unwrap()));
        }
        let mut g = Graph::new();
        let x = g.leaf(get(&f, "x"));
        let p: Vec<Var> = ids.iter().map(|&(_, id)| g.param(&store, id)).collect();
        let s = reduce::mean_axes(&mut g, x, &[1, 2, 3]).unwrap();
        let h = linear::linear(&mut g, s, p[0], Some(p[1])).unwrap();
        let h = activation::relu(&mut g, h).unwrap();
        let h = linear::linear(&mut g, h, p[2], Some(p[3])).unwrap();
        let gate = activation::sigmoid(&mut g, h).unwrap();
        let y = elementwise::mul(&mut g, x, gate).unwrap();
        assert_close(&format!("{file} y"), g.value(y), &get(&f, "y"), TOL);
        g.backward_from(y, get(&f, "gy"), &mut store).unwrap();
        assert_close(&format!("{file} gx"), g.grad(x).unwrap(), &get(&f, "gx"), TOL);
        for (name, id) in ids {
            let want = f.get(&format!("grad.{name}")).unwrap();
            let got = store.grad(id).unwrap().reshape(want.shape().clone()).unwrap();
            assert_close(&format!("{file} grad.{name}"), &got, want, TOL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// float64 finite-difference checks of the kernels

fn rng() -> StdRng {
    StdRng::seed_from_u64(0x5eed)
}

fn rand_vec(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// A kernel's output of `n` elements.
fn out(n: usize, f: impl FnOnce(&mut [f64])) -> Vec<f64> {
    let mut y = vec![0.0; n];
    f(&mut y);
    y
}

/// Asserts that `analytic` is the gradient of `loss` at `x` (central differences, step 1e-6).
fn check_grad(what: &str, analytic: &[f64], x: &[f64], loss: impl FnMut(&[f64]) -> f64) {
    let num = numeric_grad(x, 1e-6, loss);
    let e = rel_err64(analytic, &num);
    assert!(e < 1e-6, "{what}: analytic vs finite-difference gradient, relative error {e:.2e}");
}

#[test]
fn fd_instance_norm_fused_act() {
    let mut rng = rng();
    let (n, s, c) = (2, 3 * 5 * 3, 3);
    let len = n * s * c;
    for act in [Act::None, Act::Relu, Act::LeakyRelu(0.1)] {
        let x = rand_vec(&mut rng, len, -2.0, 3.0);
        let gamma = rand_vec(&mut rng, c, 0.5, 1.5);
        let beta = rand_vec(&mut rng, c, -0.5, 0.5);
        let r = rand_vec(&mut rng, len, -1.0, 1.0);
        let loss = |x: &[f64], gm: &[f64], bt: &[f64]| {
            dot(&out(len, |y| drop(norm_k::instance_norm_forward(y, x, n, gm, bt, 1e-5, act))), &r)
        };
        let stats = norm_k::instance_norm_stats(&x, n, c, 1e-5);
        let mut gx = vec![0.0; len];
        let (dg, db) = norm_k::instance_norm_backward(Some(&mut gx), &r, &x, &stats, &gamma, &beta, act);
        check_grad(&format!("norm {act:?} gx"), &gx, &x, |x| loss(x, &gamma, &beta));
        check_grad(&format!("norm {act:?} gamma"), &dg, &gamma, |gm| loss(&x, gm, &beta));
        check_grad(&format!("norm {act:?} beta"), &db, &beta, |bt| loss(&x, &gamma, bt));
        // Without gx the parameter gradients are the same.
        let (dg2, db2) = norm_k::instance_norm_backward(None, &r, &x, &stats, &gamma, &beta, act);
        assert_eq!((dg2, db2), (dg, db));
    }
}

/// A volume large enough that statistics and sums run as several parallel blocks per sample, far
/// from zero mean: statistics match a two-pass float64 reference, and sampled input gradients match
/// finite differences.
#[test]
fn instance_norm_large_blocked() {
    let mut rng = rng();
    let (n, s, c) = (2, 20 * 21 * 23, 5);
    let len = n * s * c;
    let x = rand_vec(&mut rng, len, 95.0, 105.0);
    let stats = norm_k::instance_norm_stats(&x, n, c, 1e-5);
    for nn in 0..n {
        for ch in 0..c {
            let v: Vec<f64> = (0..s).map(|i| x[(nn * s + i) * c + ch]).collect();
            let mean = v.iter().sum::<f64>() / s as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / s as f64;
            assert!((stats.mean[nn * c + ch] - mean).abs() < 1e-12 * mean);
            let rstd = 1.0 / (var + 1e-5).sqrt();
            assert!((stats.rstd[nn * c + ch] - rstd).abs() < 1e-10 * rstd);
        }
    }
    let (gamma, beta) = (rand_vec(&mut rng, c, 0.5, 1.5), rand_vec(&mut rng, c, -0.5, 0.5));
    let r = rand_vec(&mut rng, len, -1.0, 1.0);
    let act = Act::LeakyRelu(0.01);
    let mut gx = vec![0.0; len];
    norm_k::instance_norm_backward(Some(&mut gx), &r, &x, &stats, &gamma, &beta, act);
    let loss = |x: &[f64]| {
        dot(&out(len, |y| drop(norm_k::instance_norm_forward(y, x, n, &gamma, &beta, 1e-5, act))), &r)
    };
    let mut xp = x.clone();
    for _ in 0..6 {
        let i = rng.random_range(0..len);
        let h = 1e-4;
        xp[i] = x[i] + h;
        let lp = loss(&xp);
        xp[i] = x[i] - h;
        let lm = loss(&xp);
        xp[i] = x[i];
        let num = (lp - lm) / (2.0 * h);
        assert!((num - gx[i]).abs() < 1e-6 * (1.0 + gx[i].abs()), "gx[{i}]: {} vs fd {num}", gx[i]);
    }
    // The f32 kernels agree with the f64 ones on the same (f32-exact) data.
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let (g32, b32): (Vec<f32>, Vec<f32>) =
        (gamma.iter().map(|&v| v as f32).collect(), beta.iter().map(|&v| v as f32).collect());
    let (g64, b64): (Vec<f64>, Vec<f64>) =
        (g32.iter().map(|&v| v as f64).collect(), b32.iter().map(|&v| v as f64).collect());
    let mut y32 = vec![0.0f32; len];
    norm_k::instance_norm_forward(&mut y32, &x32, n, &g32, &b32, 1e-5, act);
    let y64 = out(len, |y| drop(norm_k::instance_norm_forward(y, &x64, n, &g64, &b64, 1e-5, act)));
    let y64_32: Vec<f32> = y64.iter().map(|&v| v as f32).collect();
    assert!(rel_err(&y32, &y64_32) < 1e-5, "f32 norm far from zero mean: {:.2e}", rel_err(&y32, &y64_32));
}

#[test]
fn fd_activations() {
    let mut rng = rng();
    let len = 3 * 5 * 7;
    let x = rand_vec(&mut rng, len, -3.0, 3.0);
    let r = rand_vec(&mut rng, len, -1.0, 1.0);
    for act in [Act::Relu, Act::LeakyRelu(0.01), Act::LeakyRelu(0.2)] {
        let gx = out(len, |g| act_k::act_backward(g, &r, &x, act));
        check_grad(&format!("{act:?}"), &gx, &x, |x| dot(&out(len, |y| act_k::act_forward(y, x, act)), &r));
    }
    let y = out(len, |y| act_k::sigmoid_forward(y, &x));
    let gx = out(len, |g| act_k::sigmoid_backward(g, &r, &y));
    check_grad("sigmoid", &gx, &x, |x| dot(&out(len, |y| act_k::sigmoid_forward(y, x)), &r));
    for c in [1, 5, 7] {
        let y = out(len, |y| act_k::softmax_forward(y, &x, c));
        assert!(y.chunks(c).all(|row| (row.iter().sum::<f64>() - 1.0).abs() < 1e-12));
        let gx = out(len, |g| act_k::softmax_backward(g, &r, &y, c));
        check_grad(&format!("softmax c={c}"), &gx, &x, |x| {
            dot(&out(len, |y| act_k::softmax_forward(y, x, c)), &r)
        });
    }
}

#[test]
fn fd_avg_pool() {
    let mut rng = rng();
    for (dims, k) in
        [([2, 5, 4, 3, 3], [2, 2, 2]), ([1, 3, 5, 7, 2], [1, 2, 3]), ([1, 3, 3, 3, 1], [3, 1, 1])]
    {
        let len: usize = dims.iter().product();
        let od = pool_k::avg_pool_out_dims(dims, k);
        let olen: usize = od.iter().product();
        let x = rand_vec(&mut rng, len, -1.0, 1.0);
        let r = rand_vec(&mut rng, olen, -1.0, 1.0);
        let gx = out(len, |g| pool_k::avg_pool_backward(g, &r, dims, k));
        check_grad(&format!("avg pool {dims:?} k {k:?}"), &gx, &x, |x| {
            dot(&out(olen, |y| pool_k::avg_pool_forward(y, x, dims, k)), &r)
        });
        // Dropped trailing voxels get exactly zero gradient.
        let [_, d, h, w, c] = dims;
        for (i, g) in gx.iter().enumerate() {
            let (v, z, yy, xx) = (i / c, i / c / (h * w) % d, i / c / w % h, i / c % w);
            if z >= od[1] * k[0] || yy >= od[2] * k[1] || xx >= od[3] * k[2] {
                assert_eq!(*g, 0.0, "voxel {v} is outside every window");
            }
        }
    }
}

/// Large enough for several parallel runs: the forward matches a direct window sum and the backward
/// spreads each window's gradient evenly.
#[test]
fn avg_pool_large_matches_direct_sums() {
    let mut rng = rng();
    let (dims, k) = ([2, 9, 34, 17, 8], [2, 3, 2]);
    let [n, d, h, w, c] = dims;
    let od = pool_k::avg_pool_out_dims(dims, k);
    let x = rand_vec(&mut rng, dims.iter().product(), -1.0, 1.0);
    let y = out(od.iter().product(), |y| pool_k::avg_pool_forward(y, &x, dims, k));
    let gx = out(x.len(), |g| pool_k::avg_pool_backward(g, &y, dims, k));
    let at = |nn, z, yy, xx, ch| (((nn * d + z) * h + yy) * w + xx) * c + ch;
    for (i, &v) in y.iter().enumerate() {
        let (ch, xx, yy, z, nn) = (
            i % c,
            i / c % od[3],
            i / c / od[3] % od[2],
            i / c / od[3] / od[2] % od[1],
            i / c / od[3] / od[2] / od[1],
        );
        let mut sum = 0.0;
        for dz in 0..k[0] {
            for dy in 0..k[1] {
                for dx in 0..k[2] {
                    let j = at(nn, z * k[0] + dz, yy * k[1] + dy, xx * k[2] + dx, ch);
                    sum += x[j];
                    assert!((gx[j] - v / 12.0).abs() < 1e-15);
                }
            }
        }
        assert!((v - sum / 12.0).abs() < 1e-12);
    }
    let covered = n * od[1] * od[2] * od[3] * c * 12;
    assert_eq!(gx.iter().filter(|&&g| g != 0.0).count(), covered);
}

#[test]
fn fd_broadcast_mul() {
    let mut rng = rng();
    let full = [2, 3, 5, 3, 3];
    for small in [[2, 1, 1, 1, 3], [2, 1, 1, 3, 3], [1, 1, 1, 1, 3], [2, 3, 5, 3, 3]] {
        let bc = Bcast::of(&full, &small).unwrap();
        let (len, slen) = (bc.full_len(), bc.small_len());
        let x = rand_vec(&mut rng, len, -1.0, 1.0);
        let b = rand_vec(&mut rng, slen, -1.0, 1.0);
        let r = rand_vec(&mut rng, len, -1.0, 1.0);
        let loss = |x: &[f64], b: &[f64]| dot(&out(len, |y| ew_k::bcast_mul(y, x, b, bc)), &r);
        let gx = out(len, |g| ew_k::bcast_mul(g, &r, &b, bc));
        let gb = out(slen, |g| ew_k::bcast_mul_grad_small(g, &r, &x, bc));
        check_grad(&format!("mul {small:?} gx"), &gx, &x, |x| loss(x, &b));
        check_grad(&format!("mul {small:?} gate"), &gb, &b, |b| loss(&x, b));
    }
}

#[test]
fn fd_concat() {
    let mut rng = rng();
    let (rows, widths) = (7, [2, 3, 1]);
    let total: usize = widths.iter().sum();
    let parts: Vec<Vec<f64>> = widths.iter().map(|w| rand_vec(&mut rng, rows * w, -1.0, 1.0)).collect();
    let r = rand_vec(&mut rng, rows * total, -1.0, 1.0);
    let mut start = 0;
    for (p, &w) in widths.iter().enumerate() {
        let g = ew_k::slice_last(&r, total, start, w);
        check_grad(&format!("concat part {p}"), &g, &parts[p], |xp| {
            let mut ps: Vec<&[f64]> = parts.iter().map(Vec::as_slice).collect();
            ps[p] = xp;
            dot(&out(rows * total, |y| ew_k::concat_last(y, &ps, &widths)), &r)
        });
        start += w;
    }
}

#[test]
fn fd_means() {
    let mut rng = rng();
    let full = [2, 3, 5, 3, 4];
    for small in [[2, 1, 1, 1, 4], [2, 1, 1, 3, 4]] {
        let bc = Bcast::of(&full, &small).unwrap();
        let x = rand_vec(&mut rng, bc.full_len(), -1.0, 1.0);
        let r = rand_vec(&mut rng, bc.small_len(), -1.0, 1.0);
        let gx = out(bc.full_len(), |g| red_k::mean_mid_backward(g, &r, bc));
        check_grad(&format!("mean to {small:?}"), &gx, &x, |x| {
            dot(&out(bc.small_len(), |y| red_k::mean_mid(y, x, bc)), &r)
        });
    }
}

#[test]
fn fd_linear() {
    let mut rng = rng();
    let (rows, cin, cout) = (3, 5, 7);
    let x = rand_vec(&mut rng, rows * cin, -1.0, 1.0);
    let w = rand_vec(&mut rng, cout * cin, -1.0, 1.0);
    let b = rand_vec(&mut rng, cout, -1.0, 1.0);
    let r = rand_vec(&mut rng, rows * cout, -1.0, 1.0);
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        dot(&out(rows * cout, |y| lin_k::linear_forward(y, x, w, Some(b), cin, cout)), &r)
    };
    let (mut gx, mut gw, mut gb) = (vec![0.0; rows * cin], vec![0.0; cout * cin], vec![0.0; cout]);
    let grads = LinearGrads { gx: Some(&mut gx), gw: Some(&mut gw), gb: Some(&mut gb) };
    lin_k::linear_backward(grads, &r, &x, &w, cin, cout);
    check_grad("linear gx", &gx, &x, |x| loss(x, &w, &b));
    check_grad("linear gw", &gw, &w, |w| loss(&x, w, &b));
    check_grad("linear gb", &gb, &b, |b| loss(&x, &w, b));
}

// ---------------------------------------------------------------------------------------------
// Through the Graph: fused versus composed, the remaining ops, and errors

fn rand_tensor(rng: &mut StdRng, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(dims, (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()).unwrap()
}

#[test]
fn fused_norm_act_equals_norm_then_act() {
    let mut rng = rng();
    let dims = [2, 3, 5, 3, 4];
    let (x0, gy) = (rand_tensor(&mut rng, &dims), rand_tensor(&mut rng, &dims));
    let (gm, bt) = (rand_tensor(&mut rng, &[4]), rand_tensor(&mut rng, &[4]));
    for act in [Act::Relu, Act::LeakyRelu(0.01)] {
        let run = |fused: bool| {
            let mut store = ParamStore::new();
            let (gid, bid) = (store.add("g", gm.clone()).unwrap(), store.add("b", bt.clone()).unwrap());
            let mut g = Graph::new();
            let x = g.leaf(x0.clone());
            let (gv, bv) = (g.param(&store, gid), g.param(&store, bid));
            let y = if fused {
                norm::instance_norm_act(&mut g, x, gv, bv, norm::DEFAULT_EPS, act).unwrap()
            } else {
                let z = norm::instance_norm(&mut g, x, gv, bv, norm::DEFAULT_EPS).unwrap();
                activation::activation(&mut g, z, act).unwrap()
            };
            let yv = g.value(y).clone();
            g.backward_from(y, gy.clone(), &mut store).unwrap();
            [
                yv,
                g.grad(x).unwrap().clone(),
                store.grad(gid).unwrap().clone(),
                store.grad(bid).unwrap().clone(),
            ]
        };
        let (fused, composed) = (run(true), run(false));
        for (what, (a, b)) in ["y", "gx", "ggamma", "gbeta"].iter().zip(fused.iter().zip(&composed)) {
            assert_close(&format!("fused {act:?} {what}"), a, b, 1e-6);
        }
    }
}

#[test]
fn graph_add_scale_concat_sum() {
    let mut rng = rng();
    let mut store = ParamStore::new();
    let mut g = Graph::new();
    let (ta, tb) = (rand_tensor(&mut rng, &[2, 3, 1, 2, 2]), rand_tensor(&mut rng, &[2, 3, 1, 2, 3]));
    let (a, b) = (g.leaf(ta.clone()), g.leaf(tb.clone()));
    let cat = elementwise::concat(&mut g, &[a, b, a]).unwrap();
    assert_eq!(g.shape(cat).dims(), &[2, 3, 1, 2, 7]);
    let row = &g.value(cat).data()[7..14];
    assert_eq!(row, [&ta.data()[2..4], &tb.data()[3..6], &ta.data()[2..4]].concat());
    let doubled = elementwise::add(&mut g, cat, cat).unwrap();
    let scaled = elementwise::scale(&mut g, doubled, 0.25).unwrap();
    let total = reduce::sum(&mut g, scaled).unwrap();
    let want: f32 = 0.5 * (2.0 * ta.data().iter().sum::<f32>() + tb.data().iter().sum::<f32>());
    assert!((g.value(total).item().unwrap() - want).abs() < 1e-5);
    // d total / d a = 0.5 for each of its two uses, d total / d b = 0.5.
    g.backward(total, &mut store).unwrap();
    assert!(g.grad(a).unwrap().data().iter().all(|&v| v == 1.0));
    assert!(g.grad(b).unwrap().data().iter().all(|&v| v == 0.5));
}

/// The (D, H)-only squeeze of dynamic_network_architectures: a gate that varies along W.
#[test]
fn graph_mean_dh_gate_varies_along_w() {
    let mut rng = rng();
    let mut store = ParamStore::new();
    let mut g = Graph::new();
    let tx = rand_tensor(&mut rng, &[2, 3, 4, 5, 6]);
    let x = g.leaf(tx.clone());
    let s = reduce::mean_axes(&mut g, x, &[1, 2]).unwrap();
    assert_eq!(g.shape(s).dims(), &[2, 1, 1, 5, 6]);
    let want: f32 = (0..12).map(|dh| tx.data()[(12 + dh) * 30 + 4 * 6 + 5]).sum::<f32>() / 12.0;
    assert!((g.value(s).data()[30 + 4 * 6 + 5] - want).abs() < 1e-6);
    let sv = g.value(s).clone();
    let y = elementwise::mul(&mut g, x, s).unwrap();
    g.backward_from(y, Tensor::full([2, 3, 4, 5, 6], 1.0), &mut store).unwrap();
    // d/dx of sum(x * mean_dh(x)) = mean_dh(x) + sum_dh(x) / 12 = 2 * mean_dh(x), broadcast.
    let gx = g.grad(x).unwrap().data();
    assert!((gx[(12 + 7) * 30 + 4 * 6 + 5] - 2.0 * sv.data()[30 + 4 * 6 + 5]).abs() < 1e-5);
}

#[test]
fn linear_without_bias_and_on_matrices() {
    let mut rng = rng();
    let mut store = ParamStore::new();
    let w = store.add("w", rand_tensor(&mut rng, &[3, 4])).unwrap();
    let mut g = Graph::new();
    let tx = rand_tensor(&mut rng, &[2, 4]);
    let x = g.constant(tx.clone());
    let wv = g.param(&store, w);
    let y = linear::linear(&mut g, x, wv, None).unwrap();
    assert_eq!(g.shape(y).dims(), &[2, 3]);
    g.backward_from(y, Tensor::full([2, 3], 1.0), &mut store).unwrap();
    // d sum(x w^T) / d w[o, i] = sum over rows of x[:, i].
    let gw = store.grad(w).unwrap().data();
    for i in 0..4 {
        let want = tx.data()[i] + tx.data()[4 + i];
        assert!((0..3).all(|o| (gw[o * 4 + i] - want).abs() < 1e-6));
    }
}

#[test]
fn shape_errors_name_both_shapes() {
    let mut g = Graph::new();
    let x = g.leaf(Tensor::zeros([2, 3, 4, 5, 6]));
    let err = |r: anyhow::Result<Var>| format!("{:#}", r.unwrap_err());
    let other = g.leaf(Tensor::zeros([2, 3, 4, 5, 7]));
    let e = err(elementwise::add(&mut g, x, other));
    assert!(e.contains("[2, 3, 4, 5, 6]") && e.contains("[2, 3, 4, 5, 7]"), "{e}");
    let gate = g.leaf(Tensor::zeros([2, 1, 4, 1, 6]));
    let e = err(elementwise::mul(&mut g, x, gate));
    assert!(e.contains("[2, 1, 4, 1, 6]") && e.contains("[2, 3, 4, 5, 6]"), "{e}");
    let (gm, bt) = (g.leaf(Tensor::zeros([5])), g.leaf(Tensor::zeros([6])));
    let e = err(norm::instance_norm(&mut g, x, gm, bt, 1e-5));
    assert!(e.contains("gamma") && e.contains("[5]") && e.contains("[2, 3, 4, 5, 6]"), "{e}");
    let w = g.leaf(Tensor::zeros([3, 5]));
    let e = err(linear::linear(&mut g, x, w, None));
    assert!(e.contains("[3, 5]") && e.contains("[2, 3, 4, 5, 6]"), "{e}");
    let e = err(pool::avg_pool3d(&mut g, x, [2, 2, 6]));
    assert!(e.contains("[2, 2, 6]") && e.contains("[2, 3, 4, 5, 6]"), "{e}");
    let e = err(reduce::mean_axes(&mut g, x, &[1, 3]));
    assert!(e.contains("[1, 3]") && e.contains("[2, 3, 4, 5, 6]"), "{e}");
    let e = err(elementwise::concat(&mut g, &[x, gate]));
    assert!(e.contains("[2, 1, 4, 1, 6]") && e.contains("[2, 3, 4, 5, 6]"), "{e}");
}
