//! Every kernel of kernels/{elementwise,activation,reduce,pool,optim}.cu against its CPU reference in
//! `device::cpu` (1e-6 relative error, norm of the difference over the norm of the reference), on
//! random odd shapes: small ones on the sim, real sizes on cuda:0 when UNET3D_GPU_TESTS=1 (small
//! there too with UNET3D_GPU_SMALL=1, for runs under compute-sanitizer).

mod common;

use common::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::Tensor;
use unet3d::device::cpu::activation as cpu_act;
use unet3d::device::cpu::elementwise as cpu_ew;
use unet3d::device::cpu::optim as cpu_optim;
use unet3d::device::cpu::{pool as cpu_pool, reduce as cpu_reduce};
use unet3d::device::kernels::{GpuTensor, activation, bench, elementwise, optim, pool, reduce};
use unet3d::device::launch::{Gpu, test_devices};
use unet3d::device::op::Act;
use unet3d::device::op::Bcast;
use unet3d::device::op::{AdamHyper, SgdHyper};

const TOL: f64 = 1e-6;

/// Whether to test at a real layer's size (on a GPU, unless UNET3D_GPU_SMALL=1).
fn real_sizes(gpu: &Gpu) -> bool {
    !gpu.is_sim() && std::env::var_os("UNET3D_GPU_SMALL").is_none_or(|v| v != "1")
}

/// An activation-sized volume: odd and small, or a real layer's size.
fn volume(gpu: &Gpu) -> [usize; 5] {
    if real_sizes(gpu) { [2, 64, 64, 64, 32] } else { [2, 5, 7, 3, 11] }
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn upload(gpu: &Gpu, dims: &[usize], data: &[f32]) -> GpuTensor {
    GpuTensor::upload(gpu, &Tensor::from_vec(dims, data.to_vec()).unwrap()).unwrap()
}

fn random_on(gpu: &Gpu, dims: &[usize], seed: u64) -> (GpuTensor, Vec<f32>) {
    let v = random(dims.iter().product(), seed);
    (upload(gpu, dims, &v), v)
}

fn check(what: &str, got: &GpuTensor, dims: &[usize], want: &[f32]) {
    let on = got.gpu().describe();
    let got = got.to_host().unwrap();
    assert_eq!(got.dims(), dims, "{what}: shape");
    let e = rel_err(got.data(), want);
    assert!(e <= TOL, "{what} on {on}: relative error {e:.3e} > {TOL:.0e}");
}

fn each_device(f: impl Fn(&Gpu)) {
    for gpu in test_devices().unwrap() {
        f(&gpu);
    }
}

#[test]
fn add_mul_and_scale() {
    each_device(|gpu| {
        let d = volume(gpu);
        let n: usize = d.iter().product();
        let ((a, av), (b, bv), (gy, gv)) =
            (random_on(gpu, &d, 1), random_on(gpu, &d, 2), random_on(gpu, &d, 3));
        let mut want = vec![0.0; n];
        cpu_ew::map2(&mut want, &av, &bv, |a, b| a + b);
        check("add", &elementwise::add(&a, &b).unwrap(), &d, &want);
        cpu_ew::map2(&mut want, &av, &bv, |a, b| a * b);
        check("mul", &elementwise::mul(&a, &b).unwrap(), &d, &want);
        let (ga, gb) = elementwise::mul_backward(&gy, &a, &b).unwrap();
        cpu_ew::map2(&mut want, &gv, &bv, |g, b| g * b);
        check("mul backward, a", &ga, &d, &want);
        cpu_ew::map2(&mut want, &gv, &av, |g, a| g * a);
        check("mul backward, b", &gb, &d, &want);
        let mut s = a;
        elementwise::scale_in_place(&mut s, 0.37).unwrap();
        let mut want = av.clone();
        cpu_optim::scale_in_place(&mut want, 0.37);
        check("scale in place", &s, &d, &want);
    });
}

#[test]
fn gate_broadcast_multiply_and_its_gradients() {
    each_device(|gpu| {
        let d = volume(gpu);
        let [n, _, _, w, c] = d;
        for (k, gate) in [[n, 1, 1, 1, c], [n, 1, 1, w, c]].into_iter().enumerate() {
            let seed = 10 * k as u64;
            let ((x, xv), (g, gv), (gy, gyv)) =
                (random_on(gpu, &d, seed + 1), random_on(gpu, &gate, seed + 2), random_on(gpu, &d, seed + 3));
            let bc = Bcast::of(&d, &gate).unwrap();
            let mut want = vec![0.0; xv.len()];
            cpu_ew::bcast_mul(&mut want, &xv, &gv, bc);
            check("bcast_mul", &elementwise::bcast_mul(&x, &g).unwrap(), &d, &want);
            let (gx, gg) = elementwise::bcast_mul_backward(&gy, &x, &g).unwrap();
            cpu_ew::bcast_mul(&mut want, &gyv, &gv, bc);
            check("bcast_mul backward, x", &gx, &d, &want);
            let mut want_g = vec![0.0; gv.len()];
            cpu_ew::bcast_mul_grad_small(&mut want_g, &gyv, &xv, bc);
            check("bcast_mul backward, gate", &gg, &gate, &want_g);
        }
        let (x, _) = random_on(gpu, &d, 7);
        let (bad, _) = random_on(gpu, &[d[0], 2, 1, 1, d[4]], 8);
        let e = elementwise::bcast_mul(&x, &bad).unwrap_err().to_string();
        assert!(e.contains("bcast_mul") && e.contains(&format!("{}", x.shape())), "{e}");
    });
}

#[test]
fn leaky_relu_family_sigmoid_and_softmax() {
    each_device(|gpu| {
        let d = volume(gpu);
        let n: usize = d.iter().product();
        let mut xv = random(n, 21);
        // Exact zeros take the derivative's x == 0 branch; large values the saturated sigmoid.
        for i in (0..n).step_by(7) {
            xv[i] = 0.0;
        }
        xv[1] = 90.0;
        xv[2] = -90.0;
        let x = upload(gpu, &d, &xv);
        let (gy, gyv) = random_on(gpu, &d, 22);
        let mut want = vec![0.0; n];
        for act in [Act::None, Act::Relu, Act::LeakyRelu(0.01)] {
            cpu_act::act_forward(&mut want, &xv, act);
            check(&format!("{act:?} forward"), &activation::act_forward(&x, act).unwrap(), &d, &want);
            cpu_act::act_backward(&mut want, &gyv, &xv, act);
            check(&format!("{act:?} backward"), &activation::act_backward(&gy, &x, act).unwrap(), &d, &want);
        }
        cpu_act::sigmoid_forward(&mut want, &xv);
        let y = activation::sigmoid_forward(&x).unwrap();
        check("sigmoid forward", &y, &d, &want);
        let yv = want.clone();
        cpu_act::sigmoid_backward(&mut want, &gyv, &yv);
        check("sigmoid backward", &activation::sigmoid_backward(&gy, &y).unwrap(), &d, &want);
        for c in [1, 3, 7] {
            let sd = [d[0], d[1], d[2], d[3], c];
            let m: usize = sd.iter().product();
            let (x, xv) = random_on(gpu, &sd, 30 + c as u64);
            let (gy, gyv) = random_on(gpu, &sd, 40 + c as u64);
            let mut want = vec![0.0; m];
            cpu_act::softmax_forward(&mut want, &xv, c);
            let y = activation::softmax_forward(&x).unwrap();
            check(&format!("softmax forward, {c} channels"), &y, &sd, &want);
            let yv = y.to_host().unwrap().into_vec();
            cpu_act::softmax_backward(&mut want, &gyv, &yv, c);
            check(
                &format!("softmax backward, {c} channels"),
                &activation::softmax_backward(&gy, &y).unwrap(),
                &sd,
                &want,
            );
        }
    });
}

#[test]
fn sums_and_means_over_spatial_axes_and_their_backward() {
    each_device(|gpu| {
        let d = volume(gpu);
        let [n, _, _, w, c] = d;
        let (x, xv) = random_on(gpu, &d, 50);
        for small in [[n, 1, 1, 1, c], [n, 1, 1, w, c], [1, 1, 1, 1, 1], [n, 1, 1, 1, 1]] {
            let bc = Bcast::of(&d, &small).unwrap();
            let mut want = vec![0.0; bc.small_len()];
            cpu_reduce::mean_mid(&mut want, &xv, bc);
            check(&format!("mean to {small:?}"), &reduce::mean_over(&x, small).unwrap(), &small, &want);
            // The sum of x * 1 is the sum of x: the broadcast-gradient reference computes it.
            cpu_ew::bcast_mul_grad_small(&mut want, &xv, &vec![1.0; xv.len()], bc);
            check(&format!("sum to {small:?}"), &reduce::sum_over(&x, small).unwrap(), &small, &want);
            let (gy, gyv) = random_on(gpu, &small, 51);
            let mut want = vec![0.0; xv.len()];
            cpu_reduce::mean_mid_backward(&mut want, &gyv, bc);
            check(
                &format!("mean backward from {small:?}"),
                &reduce::mean_over_backward(&gy, d).unwrap(),
                &d,
                &want,
            );
            cpu_ew::bcast_expand(&mut want, &gyv, bc, 1.0);
            check(
                &format!("sum backward from {small:?}"),
                &reduce::sum_over_backward(&gy, d).unwrap(),
                &d,
                &want,
            );
        }
        let total = reduce::sum_all(&x).unwrap();
        let want = cpu_reduce::sum_all(&xv);
        assert!(((total - want) / want).abs() as f64 <= TOL, "sum_all {total} vs {want}");
        let e = reduce::mean_over(&x, [n, 2, 1, 1, c]).unwrap_err().to_string();
        assert!(e.contains("mean") && e.contains("does not broadcast"), "{e}");
    });
}

#[test]
fn average_pooling_with_dropped_borders() {
    each_device(|gpu| {
        let d = if real_sizes(gpu) { [2, 65, 64, 63, 32] } else { [2, 5, 7, 6, 3] };
        let (x, xv) = random_on(gpu, &d, 60);
        for k in [[2, 2, 2], [1, 2, 3]] {
            let od = cpu_pool::avg_pool_out_dims(d, k);
            let mut want = vec![0.0; od.iter().product()];
            cpu_pool::avg_pool_forward(&mut want, &xv, d, k);
            check(&format!("avg pool {k:?}"), &pool::avg_pool(&x, k).unwrap(), &od, &want);
            let (gy, gyv) = random_on(gpu, &od, 61);
            let mut want = vec![0.0; xv.len()];
            cpu_pool::avg_pool_backward(&mut want, &gyv, d, k);
            check(
                &format!("avg pool {k:?} backward"),
                &pool::avg_pool_backward(&gy, d, k).unwrap(),
                &d,
                &want,
            );
        }
        let e = pool::avg_pool_backward(&x, d, [2, 2, 2]).unwrap_err().to_string();
        assert!(e.contains("avg pool backward"), "{e}");
    });
}

#[test]
fn channel_concat_and_split() {
    each_device(|gpu| {
        let d = volume(gpu);
        let widths = [3, 1, 5];
        let parts: Vec<(GpuTensor, Vec<f32>)> = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| random_on(gpu, &[d[0], d[1], d[2], d[3], w], 70 + i as u64))
            .collect();
        let refs: Vec<&GpuTensor> = parts.iter().map(|p| &p.0).collect();
        let y = elementwise::concat_channels(&refs).unwrap();
        let total: usize = widths.iter().sum();
        let rows = d[0] * d[1] * d[2] * d[3];
        let mut want = vec![0.0; rows * total];
        let host: Vec<&[f32]> = parts.iter().map(|p| p.1.as_slice()).collect();
        cpu_ew::concat_last(&mut want, &host, &widths);
        let out_dims = [d[0], d[1], d[2], d[3], total];
        check("concat", &y, &out_dims, &want);
        let (gy, gyv) = random_on(gpu, &out_dims, 80);
        let back = elementwise::concat_channels_backward(&gy, &widths).unwrap();
        let mut start = 0;
        for (g, &w) in back.iter().zip(&widths) {
            check(
                &format!("concat backward, width {w}"),
                g,
                &[d[0], d[1], d[2], d[3], w],
                &cpu_ew::slice_last(&gyv, total, start, w),
            );
            start += w;
        }
        let (odd, _) = random_on(gpu, &[d[0], d[1] + 1, d[2], d[3], 2], 81);
        let e = elementwise::concat_channels(&[&parts[0].0, &odd]).unwrap_err().to_string();
        assert!(e.contains("concat") && e.contains("outside the last axis"), "{e}");
    });
}

/// Parameter lengths around the kernels' 4096-element chunks.
fn param_lens(gpu: &Gpu) -> Vec<usize> {
    let mut v = vec![1, 4095, 4097, 9001];
    if real_sizes(gpu) {
        v.extend([320 * 320 * 27, 2_000_003]);
    }
    v
}

struct HostParam {
    p: Vec<f32>,
    g: Vec<f32>,
    s1: Vec<f32>,
    s2: Vec<f32>,
}

fn host_params(gpu: &Gpu, seed: u64) -> Vec<HostParam> {
    param_lens(gpu)
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let s = seed + 10 * i as u64;
            let v2: Vec<f32> = random(n, s + 3).iter().map(|v| v * v * 0.01).collect();
            HostParam { p: random(n, s), g: random(n, s + 1), s1: random(n, s + 2), s2: v2 }
        })
        .collect()
}

fn check_buf(what: &str, gpu: &Gpu, b: &unet3d::device::launch::GpuBuffer<f32>, want: &[f32]) {
    let e = rel_err(&gpu.download(b).unwrap(), want);
    assert!(e <= TOL, "{what} on {}: relative error {e:.3e} > {TOL:.0e}", gpu.describe());
}

#[test]
fn sgd_nesterov_over_all_parameters_in_one_launch() {
    each_device(|gpu| {
        let h = SgdHyper { lr: 0.01, momentum: 0.99, nesterov: true, weight_decay: 3e-5 };
        for first in [true, false] {
            let host = host_params(gpu, 100);
            let mut p: Vec<_> = host.iter().map(|h| gpu.upload(&h.p).unwrap()).collect();
            let g: Vec<_> = host.iter().map(|h| gpu.upload(&h.g).unwrap()).collect();
            let mut b: Vec<_> = host.iter().map(|h| gpu.upload(&h.s1).unwrap()).collect();
            let mut segs: Vec<optim::SgdParam> = p
                .iter_mut()
                .zip(&g)
                .zip(b.iter_mut())
                .map(|((param, grad), buf)| optim::SgdParam { param, grad, momentum: Some(buf) })
                .collect();
            optim::sgd_step(gpu, &mut optim::TableCache::default(), &mut segs, &h, first).unwrap();
            for (i, hp) in host.iter().enumerate() {
                let (mut pw, mut bw) = (hp.p.clone(), hp.s1.clone());
                cpu_optim::sgd_step(&mut pw, &hp.g, Some(&mut bw), first, &h);
                check_buf(&format!("sgd param {i} (first {first})"), gpu, &p[i], &pw);
                check_buf(&format!("sgd momentum {i} (first {first})"), gpu, &b[i], &bw);
            }
        }
        // Plain SGD: no momentum buffers.
        let plain = SgdHyper { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 1e-3 };
        let host = host_params(gpu, 200);
        let mut p: Vec<_> = host.iter().map(|h| gpu.upload(&h.p).unwrap()).collect();
        let g: Vec<_> = host.iter().map(|h| gpu.upload(&h.g).unwrap()).collect();
        let mut segs: Vec<optim::SgdParam> = p
            .iter_mut()
            .zip(&g)
            .map(|(param, grad)| optim::SgdParam { param, grad, momentum: None })
            .collect();
        optim::sgd_step(gpu, &mut optim::TableCache::default(), &mut segs, &plain, false).unwrap();
        for (i, hp) in host.iter().enumerate() {
            let mut pw = hp.p.clone();
            cpu_optim::sgd_step(&mut pw, &hp.g, None, false, &plain);
            check_buf(&format!("plain sgd param {i}"), gpu, &p[i], &pw);
        }
        // A gradient of the wrong length is an error naming the parameter, before any launch.
        let mut q = gpu.upload(&[1.0f32; 5]).unwrap();
        let short = gpu.upload(&[1.0f32; 4]).unwrap();
        let mut segs = [optim::SgdParam { param: &mut q, grad: &short, momentum: None }];
        let e = optim::sgd_step(gpu, &mut optim::TableCache::default(), &mut segs, &plain, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameter 0 has 5 elements but its gradient has 4"), "{e}");
    });
}

#[test]
fn adam_and_adamw_over_all_parameters_in_one_launch() {
    each_device(|gpu| {
        for decoupled in [false, true] {
            let h = AdamHyper { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, decoupled };
            let host = host_params(gpu, 300);
            let mut p: Vec<_> = host.iter().map(|h| gpu.upload(&h.p).unwrap()).collect();
            let g: Vec<_> = host.iter().map(|h| gpu.upload(&h.g).unwrap()).collect();
            let mut m: Vec<_> = host.iter().map(|h| gpu.upload(&h.s1).unwrap()).collect();
            let mut v: Vec<_> = host.iter().map(|h| gpu.upload(&h.s2).unwrap()).collect();
            let mut segs: Vec<optim::AdamParam> = p
                .iter_mut()
                .zip(&g)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .map(|((param, grad), (exp_avg, exp_avg_sq))| optim::AdamParam {
                    param,
                    grad,
                    exp_avg,
                    exp_avg_sq,
                })
                .collect();
            optim::adam_step(gpu, &mut optim::TableCache::default(), &mut segs, 3, &h).unwrap();
            for (i, hp) in host.iter().enumerate() {
                let (mut pw, mut mw, mut vw) = (hp.p.clone(), hp.s1.clone(), hp.s2.clone());
                cpu_optim::adam_step(&mut pw, &hp.g, &mut mw, &mut vw, 3, &h);
                let what = if decoupled { "adamw" } else { "adam" };
                check_buf(&format!("{what} param {i}"), gpu, &p[i], &pw);
                check_buf(&format!("{what} exp_avg {i}"), gpu, &m[i], &mw);
                check_buf(&format!("{what} exp_avg_sq {i}"), gpu, &v[i], &vw);
            }
        }
    });
}

#[test]
fn global_gradient_norm() {
    each_device(|gpu| {
        let host = host_params(gpu, 400);
        let g: Vec<_> = host.iter().map(|h| gpu.upload(&h.g).unwrap()).collect();
        let refs: Vec<_> = g.iter().collect();
        let mut tables = optim::TableCache::default();
        let got = optim::grad_norm(gpu, &mut tables, &refs).unwrap();
        let want = host.iter().map(|h| cpu_optim::sum_squares(&h.g)).sum::<f64>().sqrt();
        assert!(((got - want) / want).abs() <= 1e-12, "grad norm {got} vs {want} on {}", gpu.describe());
        // The same buffers again: the launch tables are reused, nothing goes up, the norm comes down.
        let before = gpu.counters();
        assert_eq!(optim::grad_norm(gpu, &mut tables, &refs).unwrap(), got);
        let moved = gpu.counters().since(&before);
        assert_eq!(moved.host_to_device_bytes, 0, "{moved}");
        assert_eq!(moved.device_to_host_bytes, 8, "{moved}");
        // Another set of buffers rebuilds them.
        let fewer = &refs[1..];
        let got = optim::grad_norm(gpu, &mut tables, fewer).unwrap();
        let want = host[1..].iter().map(|h| cpu_optim::sum_squares(&h.g)).sum::<f64>().sqrt();
        assert!(((got - want) / want).abs() <= 1e-12, "grad norm {got} vs {want} on {}", gpu.describe());
        assert_eq!(optim::grad_norm(gpu, &mut tables, &[]).unwrap(), 0.0);
    });
}

#[test]
fn kernel_benchmarks_run_on_the_sim() {
    let gpu = Gpu::sim();
    let rows = bench::run(&gpu, &bench::KernelBenchOptions { quick: true }).unwrap();
    assert_eq!(rows.len(), 13);
    assert!(rows.iter().all(|r| r.ms > 0.0 && r.gb_per_s.is_finite()), "{rows:?}");
    let table = bench::format_table(&gpu, &rows);
    assert!(table.contains("| adamw step |") && table.contains("sim"), "{table}");
}

/// The throughput table at real sizes on the GPU (quick sizes on the sim without one); appended to
/// the file UNET3D_BENCH_OUT names, if set. Run by scripts/gpu-check.sh.
#[test]
#[ignore = "benchmark: cargo test --test sim_kernels -- --ignored kernel_throughput"]
fn kernel_throughput() {
    let devices = test_devices().unwrap();
    let gpu_present = devices.iter().any(|g| !g.is_sim());
    // With a GPU there, the sim's table would only be noise next to it.
    for gpu in devices.into_iter().filter(|g| !(gpu_present && g.is_sim())) {
        let rows = bench::run(&gpu, &bench::KernelBenchOptions { quick: gpu.is_sim() }).unwrap();
        let table = bench::format_table(&gpu, &rows);
        println!("{table}");
        if let Some(path) = std::env::var_os("UNET3D_BENCH_OUT") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(f, "{table}").unwrap();
        }
    }
}
