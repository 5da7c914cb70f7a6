//! The fused kernels of kernels/{norm,se,loss}.cu against the CPU references (`device::cpu::norm`,
//! the autograd ops of squeeze-excitation, `device::cpu::loss`) and the PyTorch fixtures, at 1e-5
//! relative error, on odd shapes (channels 3, 17, 33; voxel counts that fill no block evenly):
//! tiny ones on the sim, larger ones on cuda:0 when UNET3D_GPU_TESTS=1.

mod common;

use common::{fixture, fixture_meta, rel_err, to_cl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::arch::SePool;
use unet3d::device::cpu::activation as cpu_act;
use unet3d::device::cpu::loss as cpu_loss;
use unet3d::device::cpu::norm as cpu_norm;
use unet3d::device::kernels::{GpuTensor, bench, loss, norm, se};
use unet3d::device::launch::{Gpu, test_devices};
use unet3d::device::op::Act;
use unet3d::device::op::{BceDice, LabelSmoothing, Pointwise, Slices, SoftmaxLoss};
use unet3d::ops::{activation, elementwise, linear, reduce};
use unet3d::tensor::io::TensorFile;
use unet3d::{Graph, ParamStore, Tensor};

const TOL: f64 = 1e-5;

fn real_sizes(gpu: &Gpu) -> bool {
    !gpu.is_sim() && std::env::var_os("UNET3D_GPU_SMALL").is_none_or(|v| v != "1")
}

fn each_device(f: impl Fn(&Gpu)) {
    for gpu in test_devices().unwrap() {
        f(&gpu);
    }
}

fn random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn labels(n: usize, classes: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..classes) as f32).collect()
}

fn upload(gpu: &Gpu, dims: &[usize], data: &[f32]) -> GpuTensor {
    GpuTensor::upload(gpu, &Tensor::from_vec(dims, data.to_vec()).unwrap()).unwrap()
}

/// A loss's upstream gradient `v` as the tape passes it: a scalar on `like`'s device.
fn upstream(like: &GpuTensor, v: f32) -> GpuTensor {
    GpuTensor::full(like.gpu(), unet3d::Shape::new(&[]), v).unwrap()
}

fn check(what: &str, got: &GpuTensor, want: &[f32]) {
    let on = got.gpu().describe();
    let e = rel_err(got.to_host().unwrap().data(), want);
    assert!(e <= TOL, "{what} on {on}: relative error {e:.3e} > {TOL:.0e}");
}

fn check_value(what: &str, got: f64, want: f64) {
    let e = if want == 0.0 { got.abs() } else { ((got - want) / want).abs() };
    assert!(e <= TOL, "{what}: {got} vs {want} (relative error {e:.3e})");
}

/// A fixture tensor, channels-last where it is a (N, C, D, H, W) activation.
fn get(f: &TensorFile, name: &str) -> Tensor {
    let t = f.get(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e:#}")).clone();
    if t.shape().rank() == 5 && !name.contains("weight") { to_cl(&t) } else { t }
}

fn up(gpu: &Gpu, t: &Tensor) -> GpuTensor {
    GpuTensor::upload(gpu, t).unwrap()
}

// ---- instance norm -------------------------------------------------------------------------------

/// The CPU reference of the fused norm (norm + act, or norm, residual add, act): y and the statistics.
struct NormRef {
    y: Vec<f32>,
    stats: cpu_norm::NormStats<f32>,
}

fn norm_ref(x: &[f32], n: usize, gamma: &[f32], beta: &[f32], act: Act, r: Option<&[f32]>) -> NormRef {
    let mut y = vec![0.0; x.len()];
    match r {
        None => {
            let stats = cpu_norm::instance_norm_forward(&mut y, x, n, gamma, beta, 1e-5, act);
            NormRef { y, stats }
        }
        Some(r) => {
            let mut z = vec![0.0; x.len()];
            let stats = cpu_norm::instance_norm_forward(&mut z, x, n, gamma, beta, 1e-5, Act::None);
            let pre: Vec<f32> = z.iter().zip(r).map(|(a, b)| a + b).collect();
            cpu_act::act_forward(&mut y, &pre, act);
            NormRef { y, stats }
        }
    }
}

#[test]
fn instance_norm_fused_forward_and_backward_match_the_cpu() {
    each_device(|gpu| {
        let shapes: Vec<[usize; 5]> = if real_sizes(gpu) {
            vec![[2, 32, 32, 32, 32], [2, 8, 8, 8, 320], [1, 9, 10, 11, 33]]
        } else {
            vec![[2, 5, 7, 3, 3], [1, 3, 4, 5, 17], [2, 2, 3, 5, 33], [3, 1, 1, 2, 1]]
        };
        for (si, d) in shapes.into_iter().enumerate() {
            let (n, c, len) = (d[0], d[4], d.iter().product::<usize>());
            let seed = 100 * si as u64;
            // An offset far from zero checks the shifted sums against cancellation.
            let offset = if si == 1 { 40.0 } else { 0.0 };
            let xv: Vec<f32> = random(len, seed, -2.0, 2.0).iter().map(|v| v + offset).collect();
            let (gv, bv) = (random(c, seed + 1, 0.5, 1.5), random(c, seed + 2, -0.5, 0.5));
            let (gyv, rv) = (random(len, seed + 3, -1.0, 1.0), random(len, seed + 4, -1.0, 1.0));
            let (x, gamma, beta) = (upload(gpu, &d, &xv), upload(gpu, &[c], &gv), upload(gpu, &[c], &bv));
            let (gy, r) = (upload(gpu, &d, &gyv), upload(gpu, &d, &rv));
            for act in [Act::None, Act::LeakyRelu(0.01), Act::Relu] {
                for residual in [false, true] {
                    let what = format!("{d:?} {act:?} residual {residual}");
                    let want = norm_ref(&xv, n, &gv, &bv, act, residual.then_some(rv.as_slice()));
                    let (y, stats) =
                        norm::instance_norm_forward(&x, &gamma, &beta, 1e-5, act, residual.then_some(&r))
                            .unwrap();
                    check(&format!("{what}: y"), &y, &want.y);
                    check(&format!("{what}: mean"), &stats.mean, &want.stats.mean);
                    check(&format!("{what}: rstd"), &stats.rstd, &want.stats.rstd);
                    let backward = || {
                        norm::instance_norm_backward(
                            &gy,
                            &x,
                            &stats,
                            &gamma,
                            &beta,
                            act,
                            residual.then_some(&y),
                        )
                        .unwrap()
                    };
                    let g = backward();
                    // The backward reference takes the device's statistics: they may differ from
                    // the CPU's in the last bit, which can flip act' of a pre-activation next to 0.
                    let dev_stats = cpu_norm::NormStats {
                        mean: stats.mean.to_host().unwrap().into_vec(),
                        rstd: stats.rstd.to_host().unwrap().into_vec(),
                    };
                    let mut wgx = vec![0.0; len];
                    let (wdg, wdb) = if residual {
                        let mut pre = vec![0.0; len];
                        cpu_norm::instance_norm_apply(&mut pre, &xv, &dev_stats, &gv, &bv, Act::None);
                        pre.iter_mut().zip(&rv).for_each(|(p, r)| *p += r);
                        let mut gpre = vec![0.0; len];
                        cpu_act::act_backward(&mut gpre, &gyv, &pre, act);
                        check(&format!("{what}: dresidual"), g.dresidual.as_ref().unwrap(), &gpre);
                        cpu_norm::instance_norm_backward(
                            Some(&mut wgx),
                            &gpre,
                            &xv,
                            &dev_stats,
                            &gv,
                            &bv,
                            Act::None,
                        )
                    } else {
                        assert!(g.dresidual.is_none());
                        cpu_norm::instance_norm_backward(Some(&mut wgx), &gyv, &xv, &dev_stats, &gv, &bv, act)
                    };
                    check(&format!("{what}: gx"), &g.gx, &wgx);
                    // No atomics: a second run is bit for bit the same.
                    let again = backward();
                    for (a, b) in [(&g.gx, &again.gx), (&g.dgamma, &again.dgamma)] {
                        assert_eq!(
                            a.to_host().unwrap().data(),
                            b.to_host().unwrap().data(),
                            "{what}: not deterministic"
                        );
                    }
                    check(&format!("{what}: dgamma"), &g.dgamma, &wdg);
                    check(&format!("{what}: dbeta"), &g.dbeta, &wdb);
                }
            }
        }
        let (x, g3) = (upload(gpu, &[1, 2, 2, 2, 4], &[0.5; 32]), upload(gpu, &[3], &[1.0; 3]));
        let e = norm::instance_norm_forward(&x, &g3, &g3, 1e-5, Act::None, None)
            .err()
            .expect("channel mismatch")
            .to_string();
        assert!(e.contains("instance norm") && e.contains("[1, 2, 2, 2, 4]"), "{e}");
    });
}

#[test]
fn instance_norm_matches_the_pytorch_fixtures() {
    each_device(|gpu| {
        for file in ["instance_norm_2x5", "instance_norm_1x3_big"] {
            let f = fixture(&format!("ops/{file}.safetensors"));
            let eps = fixture_meta(&f)["eps"].as_f64().unwrap();
            let (x, w, b) = (up(gpu, &get(&f, "x")), up(gpu, &get(&f, "w")), up(gpu, &get(&f, "b")));
            let (y, stats) = norm::instance_norm_forward(&x, &w, &b, eps, Act::None, None).unwrap();
            check(&format!("{file} y"), &y, get(&f, "y").data());
            let g =
                norm::instance_norm_backward(&up(gpu, &get(&f, "gy")), &x, &stats, &w, &b, Act::None, None)
                    .unwrap();
            check(&format!("{file} gx"), &g.gx, get(&f, "gx").data());
            check(&format!("{file} gw"), &g.dgamma, get(&f, "gw").data());
            check(&format!("{file} gb"), &g.dbeta, get(&f, "gb").data());
        }
    });
}

// ---- squeeze-excitation --------------------------------------------------------------------------

/// SE through the autograd ops (the CPU reference): y and the gradients of x, fc1.w, fc1.b, fc2.w, fc2.b.
fn se_reference(x: &Tensor, params: &[Tensor; 4], gy: &Tensor, pool: SePool) -> (Tensor, Vec<Tensor>) {
    let mut store = ParamStore::new();
    let ids: Vec<_> =
        params.iter().enumerate().map(|(i, t)| store.add(&format!("p{i}"), t.clone()).unwrap()).collect();
    let mut g = Graph::new();
    let xv = g.leaf(x.clone());
    let p: Vec<_> = ids.iter().map(|&id| g.param(&store, id)).collect();
    let axes: &[usize] = if pool == SePool::Dhw { &[1, 2, 3] } else { &[1, 2] };
    let s = reduce::mean_axes(&mut g, xv, axes).unwrap();
    let h = linear::linear(&mut g, s, p[0], Some(p[1])).unwrap();
    let h = activation::relu(&mut g, h).unwrap();
    let h = linear::linear(&mut g, h, p[2], Some(p[3])).unwrap();
    let gate = activation::sigmoid(&mut g, h).unwrap();
    let y = elementwise::mul(&mut g, xv, gate).unwrap();
    let yv = g.value(y).clone();
    g.backward_from(y, gy.clone(), &mut store).unwrap();
    let mut grads = vec![g.grad(xv).unwrap().clone()];
    grads.extend(ids.iter().map(|&id| store.grad(id).unwrap().clone()));
    (yv, grads)
}

fn check_se(gpu: &Gpu, what: &str, x: &Tensor, params: &[Tensor; 4], gy: &Tensor, pool: SePool) {
    let (want_y, want_g) = se_reference(x, params, gy, pool);
    let p: Vec<GpuTensor> = params.iter().map(|t| up(gpu, t)).collect();
    let sp = se::SeParams { w1: &p[0], b1: &p[1], w2: &p[2], b2: &p[3] };
    let xg = up(gpu, x);
    let (y, saved) = se::se_forward(&xg, &sp, pool).unwrap();
    check(&format!("{what}: y"), &y, want_y.data());
    let g = se::se_backward(&up(gpu, gy), &xg, &sp, &saved).unwrap();
    for (name, (got, want)) in ["gx", "gw1", "gb1", "gw2", "gb2"]
        .iter()
        .zip([&g.gx, &g.gw1, &g.gb1, &g.gw2, &g.gb2].into_iter().zip(&want_g))
    {
        assert_eq!(got.dims(), want.dims(), "{what}: {name} shape");
        check(&format!("{what}: {name}"), got, want.data());
    }
}

#[test]
fn squeeze_excitation_matches_the_autograd_ops_in_both_pool_modes() {
    each_device(|gpu| {
        let shapes: Vec<[usize; 5]> = if real_sizes(gpu) {
            vec![[2, 16, 16, 16, 320], [2, 9, 7, 5, 33]]
        } else {
            vec![[2, 3, 4, 5, 17], [1, 2, 3, 3, 33]]
        };
        for (i, d) in shapes.into_iter().enumerate() {
            let c = d[4];
            let r = unet3d::arch::se_reduced_channels(c);
            let s = 10 * i as u64;
            let t = |dims: &[usize], seed: u64| {
                Tensor::from_vec(dims, random(dims.iter().product(), seed, -1.0, 1.0)).unwrap()
            };
            let params = [t(&[r, c], s + 1), t(&[r], s + 2), t(&[c, r], s + 3), t(&[c], s + 4)];
            let (x, gy) = (t(&d, s + 5), t(&d, s + 6));
            for pool in [SePool::Dhw, SePool::Dh] {
                check_se(gpu, &format!("SE {d:?} {pool:?}"), &x, &params, &gy, pool);
            }
        }
    });
}

#[test]
fn squeeze_excitation_matches_the_pytorch_fixtures() {
    each_device(|gpu| {
        for file in ["squeeze_excite_c32", "squeeze_excite_c12"] {
            let f = fixture(&format!("ops/{file}.safetensors"));
            let names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
            let p: Vec<GpuTensor> = names.iter().map(|n| up(gpu, &get(&f, n))).collect();
            let sp = se::SeParams { w1: &p[0], b1: &p[1], w2: &p[2], b2: &p[3] };
            let x = up(gpu, &get(&f, "x"));
            let (y, saved) = se::se_forward(&x, &sp, SePool::Dhw).unwrap();
            check(&format!("{file} y"), &y, get(&f, "y").data());
            let g = se::se_backward(&up(gpu, &get(&f, "gy")), &x, &sp, &saved).unwrap();
            check(&format!("{file} gx"), &g.gx, get(&f, "gx").data());
            for (name, got) in names.iter().zip([&g.gw1, &g.gb1, &g.gw2, &g.gb2]) {
                check(&format!("{file} grad.{name}"), got, get(&f, &format!("grad.{name}")).data());
            }
        }
    });
}

// ---- losses ----------------------------------------------------------------------------------------

#[test]
fn softmax_dice_ce_matches_the_cpu_for_each_dice_mode() {
    each_device(|gpu| {
        let spatial = if real_sizes(gpu) { [2, 64, 64, 64] } else { [2, 6, 7, 9] };
        let vox: usize = spatial.iter().product();
        for (ci, c) in [2usize, 3, 5, 16].into_iter().enumerate() {
            let dims = [spatial[0], spatial[1], spatial[2], spatial[3], c];
            let lab_dims = [spatial[0], spatial[1], spatial[2], spatial[3], 1];
            let xv = random(vox * c, 200 + ci as u64, -3.0, 3.0);
            let lv = labels(vox, c, 300 + ci as u64);
            let (x, l) = (upload(gpu, &dims, &xv), upload(gpu, &lab_dims, &lv));
            for (batch_dice, do_bg, dice_weight) in
                [(true, false, 1.0), (false, false, 1.0), (false, true, 0.7), (true, true, 0.0)]
            {
                let cfg =
                    SoftmaxLoss { ce_scale: 1.0 / vox as f64, dice_weight, batch_dice, do_bg, smooth: 1e-5 };
                let what =
                    format!("{c} classes, batch dice {batch_dice}, bg {do_bg}, dice weight {dice_weight}");
                let (want, wgrad) = cpu_loss::softmax_loss_forward(&xv, &lv, spatial[0], c, &cfg);
                let (value, grad) = loss::softmax_loss_forward(&x, &l, &cfg).unwrap();
                check_value(&format!("{what}: loss"), value.value().unwrap(), want);
                let mut wgx = vec![0.0; xv.len()];
                cpu_loss::softmax_loss_backward(&xv, &lv, &wgrad, 0.8, &mut wgx);
                check(
                    &format!("{what}: gx"),
                    &loss::softmax_loss_backward(&x, &l, &grad, &upstream(&x, 0.8)).unwrap(),
                    &wgx,
                );
            }
        }
        // A label outside 0..C is reported when the value is read; 17 classes have no kernel.
        let mut lv = labels(vox, 3, 9);
        lv[5] = 3.0;
        let x = upload(
            gpu,
            &[spatial[0], spatial[1], spatial[2], spatial[3], 3],
            &random(vox * 3, 10, -1.0, 1.0),
        );
        let l = upload(gpu, &[spatial[0], spatial[1], spatial[2], spatial[3], 1], &lv);
        let cfg =
            SoftmaxLoss { ce_scale: 1.0, dice_weight: 1.0, batch_dice: true, do_bg: false, smooth: 1e-5 };
        let e = loss::softmax_loss_forward(&x, &l, &cfg).unwrap().0.value().unwrap_err().to_string();
        assert!(e.contains("1 label values are not class indices in 0..3"), "{e}");
        let x17 = upload(gpu, &[1, 1, 1, 2, 17], &[0.0; 34]);
        let l17 = upload(gpu, &[1, 1, 1, 2, 1], &[0.0; 2]);
        let e = loss::softmax_loss_forward(&x17, &l17, &cfg).err().unwrap().to_string();
        assert!(e.contains("17 classes"), "{e}");
    });
}

#[test]
fn dice_ce_matches_the_nnunet_fixtures() {
    each_device(|gpu| {
        for batch_dice in [true, false] {
            let f = fixture(&format!("loss/dice_ce_batchdice_{batch_dice}.safetensors"));
            let (x, l) = (get(&f, "logits"), get(&f, "label"));
            let cfg = SoftmaxLoss {
                ce_scale: 1.0 / l.numel() as f64,
                dice_weight: 1.0,
                batch_dice,
                do_bg: false,
                smooth: 1e-5,
            };
            let (xg, lg) = (up(gpu, &x), up(gpu, &l));
            let (value, grad) = loss::softmax_loss_forward(&xg, &lg, &cfg).unwrap();
            check_value(
                &format!("dice_ce batch {batch_dice}: loss"),
                value.value().unwrap(),
                f.get("loss").unwrap().item().unwrap() as f64,
            );
            check(
                &format!("dice_ce batch {batch_dice}: gx"),
                &loss::softmax_loss_backward(&xg, &lg, &grad, &upstream(&xg, 1.0)).unwrap(),
                get(&f, "gx").data(),
            );
        }
    });
}

/// Every pointwise kind, forward and backward, against the CPU; BCE with both smoothing variants.
#[test]
fn pointwise_losses_match_the_cpu() {
    each_device(|gpu| {
        let d = if real_sizes(gpu) { [2, 64, 64, 64, 3] } else { [2, 5, 6, 7, 3] };
        let len: usize = d.iter().product();
        let slices_z = Slices { depth: d[1], len: d[2] * d[3] * d[4] };
        let flat = Slices { depth: 1, len };
        let kinds = [
            (Pointwise::Mse, flat),
            (Pointwise::L1, flat),
            (Pointwise::SmoothL1 { beta: 0.5 }, flat),
            (Pointwise::SmoothL1 { beta: 0.0 }, flat),
            (Pointwise::BceWithLogits(LabelSmoothing::None), flat),
            (Pointwise::BceWithLogits(LabelSmoothing::Constant(0.1)), flat),
            (Pointwise::BceWithLogits(LabelSmoothing::ZSlices { center: 0.05, edge: 0.3 }), slices_z),
            (Pointwise::Bce, flat),
        ];
        for (i, (kind, slices)) in kinds.into_iter().enumerate() {
            let (mut xv, tv) = if kind == Pointwise::Bce {
                (random(len, 400 + i as u64, 0.01, 0.99), random(len, 500 + i as u64, 0.0, 1.0))
            } else {
                (random(len, 400 + i as u64, -3.0, 3.0), random(len, 500 + i as u64, 0.0, 1.0))
            };
            if kind != Pointwise::Bce {
                xv[3] = tv[3]; // the zero-difference branch of L1 / SmoothL1
            }
            let (x, t) = (upload(gpu, &d, &xv), upload(gpu, &d, &tv));
            let scale = 1.0 / len as f64;
            let want = cpu_loss::pointwise_forward(kind, &xv, &tv, slices, scale);
            let got = loss::pointwise_forward(kind, &x, &t, slices, scale).unwrap().value().unwrap();
            check_value(&format!("{kind:?}: loss"), got, want);
            let mut wgx = vec![0.0; len];
            cpu_loss::pointwise_backward(kind, &xv, &tv, slices, 0.3, &mut wgx);
            check(
                &format!("{kind:?}: gx"),
                &loss::pointwise_backward(kind, &x, &t, slices, 0.3, &upstream(&x, 1.0)).unwrap(),
                &wgx,
            );
        }
    });
}

#[test]
fn pointwise_losses_match_the_pytorch_fixtures() {
    each_device(|gpu| {
        for file in ["mse", "l1", "smooth_l1", "bce_with_logits"] {
            let f = fixture(&format!("loss/{file}.safetensors"));
            let kind = match file {
                "mse" => Pointwise::Mse,
                "l1" => Pointwise::L1,
                "smooth_l1" => Pointwise::SmoothL1 { beta: fixture_meta(&f)["beta"].as_f64().unwrap() },
                _ => Pointwise::BceWithLogits(LabelSmoothing::None),
            };
            let (x, t) = (get(&f, "pred"), get(&f, "target"));
            let slices = Slices { depth: 1, len: x.numel() };
            let (xg, tg) = (up(gpu, &x), up(gpu, &t));
            let scale = 1.0 / x.numel() as f64;
            let got = loss::pointwise_forward(kind, &xg, &tg, slices, scale).unwrap().value().unwrap();
            check_value(&format!("{file} loss"), got, f.get("loss").unwrap().item().unwrap() as f64);
            let gx =
                loss::pointwise_backward(kind, &xg, &tg, slices, scale as f32, &upstream(&xg, 1.0)).unwrap();
            check(&format!("{file} gx"), &gx, get(&f, "gx").data());
        }
    });
}

#[test]
fn bce_dice_and_masked_cosine_match_the_cpu() {
    each_device(|gpu| {
        let spatial = if real_sizes(gpu) { [2, 48, 48, 48] } else { [2, 5, 6, 9] };
        let vox: usize = spatial.iter().product();
        for (i, c) in [1usize, 3, 17, 33].into_iter().enumerate() {
            let d = [spatial[0], spatial[1], spatial[2], spatial[3], c];
            let s = 600 + 10 * i as u64;
            let xv = random(vox * c, s, -3.0, 3.0);
            let tv: Vec<f32> = random(vox * c, s + 1, 0.0, 1.0).iter().map(|v| v.round()).collect();
            let (x, t) = (upload(gpu, &d, &xv), upload(gpu, &d, &tv));
            let cfg = BceDice { alpha: 0.6, beta: 0.4, smoothing: 0.1 };
            let (want, wgrad) = cpu_loss::bce_dice_forward(&xv, &tv, c, &cfg);
            let (value, grad) = loss::bce_dice_forward(&x, &t, &cfg).unwrap();
            check_value(&format!("BCEDice {c} channels: loss"), value.value().unwrap(), want);
            let mut wgx = vec![0.0; xv.len()];
            cpu_loss::bce_dice_backward(&xv, &tv, &wgrad, 1.5, &mut wgx);
            check(
                &format!("BCEDice {c} channels: gx"),
                &loss::bce_dice_backward(&x, &t, &grad, &upstream(&x, 1.5)).unwrap(),
                &wgx,
            );

            // Cosine: continuous targets, every 4th voxel's target zero (outside the mask), one
            // prediction zero (the clamped norm).
            let mut tc = random(vox * c, s + 2, -1.0, 1.0);
            for v in (0..vox).step_by(4) {
                tc[v * c..(v + 1) * c].iter_mut().for_each(|t| *t = 0.0);
            }
            let mut pc = xv.clone();
            pc[c..2 * c].iter_mut().for_each(|p| *p = 0.0);
            let (p, t) = (upload(gpu, &d, &pc), upload(gpu, &d, &tc));
            let (want, wscale) = cpu_loss::masked_cosine_forward(&pc, &tc, c);
            let (value, grad) = loss::masked_cosine_forward(&p, &t).unwrap();
            check_value(&format!("cosine {c} channels: loss"), value.value().unwrap(), want);
            let mut wgx = vec![0.0; pc.len()];
            cpu_loss::masked_cosine_backward(&pc, &tc, c, wscale * 0.7, &mut wgx);
            check(
                &format!("cosine {c} channels: gx"),
                &loss::masked_cosine_backward(&p, &t, &grad, &upstream(&p, 0.7)).unwrap(),
                &wgx,
            );
        }
    });
}

#[test]
fn fused_kernel_benchmarks_run_on_the_sim() {
    let gpu = Gpu::sim();
    let rows = bench::run_fused(&gpu, &bench::KernelBenchOptions { quick: true }).unwrap();
    assert!(rows.len() >= 8, "{rows:?}");
    assert!(rows.iter().all(|r| r.ms > 0.0 && r.gb_per_s.is_finite() && r.gb_per_s > 0.0), "{rows:?}");
    assert!(rows.iter().any(|r| r.op.contains("dice + CE")), "{rows:?}");
}

/// The fused kernels' throughput table at real sizes on the GPU (quick sizes on the sim without
/// one); written to the file UNET3D_BENCH_OUT names, if set. Run by scripts/gpu-check.sh.
#[test]
#[ignore = "benchmark: cargo test --test sim_fused -- --ignored fused_throughput"]
fn fused_throughput() {
    let devices = test_devices().unwrap();
    let gpu_present = devices.iter().any(|g| !g.is_sim());
    for gpu in devices.into_iter().filter(|g| !(gpu_present && g.is_sim())) {
        let rows = bench::run_fused(&gpu, &bench::KernelBenchOptions { quick: gpu.is_sim() }).unwrap();
        let table = bench::format_table(&gpu, &rows);
        println!("{table}");
        if let Some(path) = std::env::var_os("UNET3D_BENCH_OUT") {
            std::fs::write(path, &table).unwrap();
        }
    }
}
