//! The conv kernels of kernels/conv.cu against the CPU references: the naive loops of
//! `device::cpu::naive` (f64 sums) on random odd shapes, and the PyTorch fixtures of
//! tests/fixtures/ops. fp32 within 1e-5 relative error (norm of the difference over the norm of the
//! reference), TF32 within 1e-3 in tests of their own. Tiny shapes on the sim; on cuda:0 as well
//! with UNET3D_GPU_TESTS=1, where one real layer is checked against the fast CPU conv.

mod common;

use common::{fixture, fixture_meta, rel_err, to_cl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::Tensor;
use unet3d::device::cpu::conv as cpu_conv;
use unet3d::device::cpu::naive;
use unet3d::device::kernels::conv::{self, ConvPrecision};
use unet3d::device::kernels::{GpuTensor, bench};
use unet3d::device::launch::{Gpu, test_devices};
use unet3d::device::op::{ConvDims, TransposedDims};
use unet3d::tensor::layout;

const FP32_TOL: f64 = 1e-5;
const TF32_TOL: f64 = 1e-3;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn upload(gpu: &Gpu, dims: &[usize], data: &[f32]) -> GpuTensor {
    GpuTensor::upload(gpu, &Tensor::from_vec(dims, data.to_vec()).unwrap()).unwrap()
}

fn check(what: &str, got: &GpuTensor, dims: &[usize], want: &[f32], tol: f64) {
    let on = got.gpu().describe();
    let got = got.to_host().unwrap();
    assert_eq!(got.dims(), dims, "{what}: shape");
    let e = rel_err(got.data(), want);
    assert!(e <= tol, "{what} on {on}: relative error {e:.3e} > {tol:.0e}");
}

fn each_device(f: impl Fn(&Gpu)) {
    for gpu in test_devices().unwrap() {
        f(&gpu);
    }
}

fn name(p: ConvPrecision) -> &'static str {
    match p {
        ConvPrecision::Fp32 => "fp32",
        ConvPrecision::Tf32 => "tf32",
    }
}

/// Random input, weight, bias and output gradient of the given (x, w, y) dims (seeds seed to
/// seed + 3), on the host and on `gpu`.
fn operands(gpu: &Gpu, [xd, wd, yd]: [[usize; 5]; 3], seed: u64) -> ([Vec<f32>; 4], [GpuTensor; 4]) {
    let dims = [&xd[..], &wd[..], &[yd[4]], &yd[..]];
    let host: [Vec<f32>; 4] = std::array::from_fn(|i| random(dims[i].iter().product(), seed + i as u64));
    let dev = std::array::from_fn(|i| upload(gpu, dims[i], &host[i]));
    (host, dev)
}

/// One conv3d: forward with bias, backward-data, backward-weight with the bias gradient, each
/// against the naive loops.
fn conv_case(gpu: &Gpu, d: ConvDims, p: ConvPrecision, tol: f64, seed: u64) {
    let [od, oh, ow] = d.output();
    let xd = [d.n, d.input[0], d.input[1], d.input[2], d.cin];
    let wd = [d.cout, d.kernel[0], d.kernel[1], d.kernel[2], d.cin];
    let yd = [d.n, od, oh, ow, d.cout];
    let ([xv, wv, bv, gyv], [x, w, b, gy]) = operands(gpu, [xd, wd, yd], seed);
    let what = format!("conv3d {d:?} {}", name(p));

    let mut want = vec![0.0; d.y_len()];
    naive::conv3d_forward(&mut want, &xv, &wv, Some(&bv), &d);
    check(
        &format!("{what} forward"),
        &conv::conv3d_forward(&x, &w, Some(&b), d.stride, p).unwrap(),
        &yd,
        &want,
        tol,
    );
    let mut want = vec![0.0; d.x_len()];
    naive::conv3d_backward_data(&mut want, &gyv, &wv, &d);
    let gx = conv::conv3d_backward_data(&gy, &w, d.input, d.stride, p).unwrap();
    check(&format!("{what} backward-data"), &gx, &xd, &want, tol);
    let mut want = vec![0.0; d.w_len()];
    naive::conv3d_backward_weight(&mut want, &gyv, &xv, &d);
    let (gw, gb) = conv::conv3d_backward_weight(&gy, &x, d.kernel, d.stride, p, true).unwrap();
    check(&format!("{what} backward-weight"), &gw, &wd, &want, tol);
    let mut want = vec![0.0; d.cout];
    naive::conv_backward_bias(&mut want, &gyv);
    check(&format!("{what} bias gradient"), &gb.unwrap(), &[d.cout], &want, FP32_TOL);
}

/// One transposed conv3d (kernel = stride): forward with bias and both gradients.
fn transposed_case(gpu: &Gpu, d: TransposedDims, p: ConvPrecision, tol: f64, seed: u64) {
    let [od, oh, ow] = d.output();
    let xd = [d.n, d.input[0], d.input[1], d.input[2], d.cin];
    let wd = [d.cin, d.kernel[0], d.kernel[1], d.kernel[2], d.cout];
    let yd = [d.n, od, oh, ow, d.cout];
    let ([xv, wv, bv, gyv], [x, w, b, gy]) = operands(gpu, [xd, wd, yd], seed);
    let what = format!("conv_transpose3d {d:?} {}", name(p));
    let s = d.kernel;

    let mut want = vec![0.0; d.y_len()];
    naive::conv_transpose3d_forward(&mut want, &xv, &wv, Some(&bv), &d);
    check(
        &format!("{what} forward"),
        &conv::conv_transpose3d_forward(&x, &w, Some(&b), s, p).unwrap(),
        &yd,
        &want,
        tol,
    );
    let mut want = vec![0.0; d.x_len()];
    naive::conv_transpose3d_backward_data(&mut want, &gyv, &wv, &d);
    check(
        &format!("{what} backward-data"),
        &conv::conv_transpose3d_backward_data(&gy, &w, s, p).unwrap(),
        &xd,
        &want,
        tol,
    );
    let mut want = vec![0.0; d.w_len()];
    naive::conv_transpose3d_backward_weight(&mut want, &gyv, &xv, &d);
    let (gw, gb) = conv::conv_transpose3d_backward_weight(&gy, &x, s, p, true).unwrap();
    check(&format!("{what} backward-weight"), &gw, &wd, &want, tol);
    let mut want = vec![0.0; d.cout];
    naive::conv_backward_bias(&mut want, &gyv);
    check(&format!("{what} bias gradient"), &gb.unwrap(), &[d.cout], &want, FP32_TOL);
}

fn cd(
    n: usize,
    input: [usize; 3],
    cin: usize,
    cout: usize,
    kernel: [usize; 3],
    stride: [usize; 3],
) -> ConvDims {
    ConvDims { n, input, cin, cout, kernel, stride }
}

/// Odd shapes that reach every path: scalar loads (3, 17, 33 channels) and float4 loads (8, 16),
/// sizes no tile divides, strides (1,2,2) and (2,1,2), kernels 3, 1x3x3, 1, and kernel = stride on
/// ragged sizes; a 1x1 stride-2 conv leaves input voxels that no tap reaches (zero gradient);
/// more than one row and column tile; the weight gradient split over voxel ranges.
fn conv_shapes() -> Vec<ConvDims> {
    vec![
        cd(2, [5, 6, 7], 3, 17, [3, 3, 3], [1, 1, 1]),
        cd(1, [5, 6, 7], 17, 33, [1, 3, 3], [1, 2, 2]),
        cd(1, [5, 6, 7], 33, 67, [3, 3, 3], [2, 1, 2]),
        cd(2, [3, 5, 7], 8, 12, [1, 1, 1], [1, 1, 1]),
        cd(1, [5, 6, 7], 16, 16, [3, 3, 3], [2, 2, 2]),
        cd(1, [6, 5, 7], 4, 5, [2, 2, 2], [2, 2, 2]),
        cd(1, [5, 6, 7], 5, 4, [1, 1, 1], [2, 2, 2]),
    ]
}

fn transposed_shapes() -> Vec<TransposedDims> {
    let td = |n, input, cin, cout, kernel| TransposedDims { n, input, cin, cout, kernel };
    vec![
        td(1, [3, 4, 5], 6, 5, [2, 2, 2]),
        td(2, [2, 3, 3], 17, 8, [1, 2, 2]),
        td(1, [3, 3, 2], 8, 16, [2, 2, 2]),
    ]
}

#[test]
fn conv3d_fp32_matches_the_naive_loops_on_odd_shapes() {
    each_device(|gpu| {
        for (i, d) in conv_shapes().into_iter().enumerate() {
            conv_case(gpu, d, ConvPrecision::Fp32, FP32_TOL, 10 * i as u64);
        }
    });
}

#[test]
fn conv_transpose3d_fp32_matches_the_naive_loops() {
    each_device(|gpu| {
        for (i, d) in transposed_shapes().into_iter().enumerate() {
            transposed_case(gpu, d, ConvPrecision::Fp32, FP32_TOL, 100 + 10 * i as u64);
        }
    });
}

#[test]
fn tf32_tensor_core_paths_are_within_1e3() {
    each_device(|gpu| {
        let shapes = conv_shapes();
        for (i, d) in [shapes[0], shapes[3], shapes[4], shapes[5]].into_iter().enumerate() {
            conv_case(gpu, d, ConvPrecision::Tf32, TF32_TOL, 200 + 10 * i as u64);
        }
        let td = transposed_shapes();
        for (i, d) in [td[0], td[2]].into_iter().enumerate() {
            transposed_case(gpu, d, ConvPrecision::Tf32, TF32_TOL, 300 + 10 * i as u64);
        }
    });
}

/// TF32 rounds: an input with more mantissa bits than TF32 keeps must not come out exact, so the
/// tensor-core path really is taken (and fp32 really is not).
#[test]
fn tf32_rounds_its_operands_and_fp32_does_not() {
    each_device(|gpu| {
        let d = cd(1, [1, 1, 1], 8, 8, [1, 1, 1], [1, 1, 1]);
        let xv = vec![1.0 + 1.0 / 4096.0; 8];
        let x = upload(gpu, &[1, 1, 1, 1, 8], &xv);
        let mut wv = vec![0.0; 64];
        wv[0] = 1.0;
        let w = upload(gpu, &[8, 1, 1, 1, 8], &wv);
        let y32 =
            conv::conv3d_forward(&x, &w, None, d.stride, ConvPrecision::Fp32).unwrap().to_host().unwrap();
        let y_tf =
            conv::conv3d_forward(&x, &w, None, d.stride, ConvPrecision::Tf32).unwrap().to_host().unwrap();
        assert_eq!(y32.data()[0], xv[0], "fp32 keeps every bit");
        // 1 + 2^-12 is below half a TF32 ulp (2^-11) above 1: it rounds to 1.
        assert_eq!(y_tf.data()[0], 1.0, "tf32 rounds to 10 mantissa bits");
    });
}

/// Every conv fixture of tests/fixtures/ops (PyTorch's y, gx, gw, gb) through the kernels.
#[test]
fn pytorch_fixtures_forward_and_gradients() {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture_path("index.json")).unwrap()).unwrap();
    let names: Vec<&String> = index
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["op"] == "conv3d" || v["op"] == "conv_transpose3d")
        .map(|(k, _)| k)
        .collect();
    assert!(names.len() >= 8, "expected every conv fixture, found {names:?}");
    let triple = |v: &serde_json::Value| -> [usize; 3] {
        let a: Vec<usize> = v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        a.try_into().unwrap()
    };
    each_device(|gpu| {
        for name in &names {
            let f = fixture(name);
            let meta = fixture_meta(&f);
            let transposed = meta["op"] == "conv_transpose3d";
            let stride = triple(&meta["stride"]);
            let from_torch = if transposed {
                layout::transposed_weight_from_torch
            } else {
                layout::conv_weight_from_torch
            };
            let x = to_cl(f.get("x").unwrap());
            let w = from_torch(f.get("w").unwrap()).unwrap();
            let gy = to_cl(f.get("gy").unwrap());
            let (xg, wg, gyg) = (
                GpuTensor::upload(gpu, &x).unwrap(),
                GpuTensor::upload(gpu, &w).unwrap(),
                GpuTensor::upload(gpu, &gy).unwrap(),
            );
            let b = f.tensors.get("b").map(|b| GpuTensor::upload(gpu, b).unwrap());
            let p = ConvPrecision::Fp32;
            let (y, gx, (gw, gb)) = if transposed {
                (
                    conv::conv_transpose3d_forward(&xg, &wg, b.as_ref(), stride, p).unwrap(),
                    conv::conv_transpose3d_backward_data(&gyg, &wg, stride, p).unwrap(),
                    conv::conv_transpose3d_backward_weight(&gyg, &xg, stride, p, b.is_some()).unwrap(),
                )
            } else {
                let input = [x.dims()[1], x.dims()[2], x.dims()[3]];
                let kernel = [w.dims()[1], w.dims()[2], w.dims()[3]];
                (
                    conv::conv3d_forward(&xg, &wg, b.as_ref(), stride, p).unwrap(),
                    conv::conv3d_backward_data(&gyg, &wg, input, stride, p).unwrap(),
                    conv::conv3d_backward_weight(&gyg, &xg, kernel, stride, p, b.is_some()).unwrap(),
                )
            };
            let want = |key: &str| to_cl(f.get(key).unwrap());
            check(&format!("{name} y"), &y, gy.dims(), want("y").data(), FP32_TOL);
            check(&format!("{name} gx"), &gx, x.dims(), want("gx").data(), FP32_TOL);
            let want_gw = from_torch(f.get("gw").unwrap()).unwrap();
            check(&format!("{name} gw"), &gw, w.dims(), want_gw.data(), FP32_TOL);
            assert_eq!(gb.is_some(), f.tensors.contains_key("gb"), "{name}: bias gradient");
            if let Some(gb) = gb {
                let want_gb = f.get("gb").unwrap();
                check(&format!("{name} gb"), &gb, want_gb.dims(), want_gb.data(), FP32_TOL);
            }
        }
    });
}

/// One ResEncM layer at its real size on a GPU, against the fast CPU conv (the naive loops would
/// take minutes); the sim skips it.
#[test]
fn real_layer_on_a_gpu() {
    each_device(|gpu| {
        if gpu.is_sim() {
            return;
        }
        for (d, p, tol) in [
            (cd(2, [32, 32, 32], 32, 64, [3, 3, 3], [2, 2, 2]), ConvPrecision::Fp32, FP32_TOL),
            (cd(2, [16, 16, 16], 128, 128, [3, 3, 3], [1, 1, 1]), ConvPrecision::Tf32, TF32_TOL),
        ] {
            let [od, oh, ow] = d.output();
            let xd = [d.n, d.input[0], d.input[1], d.input[2], d.cin];
            let wd = [d.cout, d.kernel[0], d.kernel[1], d.kernel[2], d.cin];
            let yd = [d.n, od, oh, ow, d.cout];
            let (xv, wv, gyv) = (random(d.x_len(), 1), random(d.w_len(), 2), random(d.y_len(), 3));
            let (x, w, gy) = (upload(gpu, &xd, &xv), upload(gpu, &wd, &wv), upload(gpu, &yd, &gyv));
            let mut want = vec![0.0; d.y_len()];
            cpu_conv::conv3d_forward(&mut want, &xv, &wv, None, &d);
            check("real forward", &conv::conv3d_forward(&x, &w, None, d.stride, p).unwrap(), &yd, &want, tol);
            let mut want = vec![0.0; d.x_len()];
            cpu_conv::conv3d_backward_data(&mut want, &gyv, &wv, &d);
            let gx = conv::conv3d_backward_data(&gy, &w, d.input, d.stride, p).unwrap();
            check("real backward-data", &gx, &xd, &want, tol);
            let mut want = vec![0.0; d.w_len()];
            cpu_conv::conv3d_backward_weight(&mut want, &gyv, &xv, &d);
            let (gw, _) = conv::conv3d_backward_weight(&gy, &x, d.kernel, d.stride, p, false).unwrap();
            check("real backward-weight", &gw, &wd, &want, tol);
        }
    });
}

#[test]
fn precision_selector_and_shape_errors() {
    let big = cd(2, [64, 64, 64], 64, 64, [3, 3, 3], [1, 1, 1]);
    assert_eq!(ConvPrecision::for_conv(&big), ConvPrecision::Tf32);
    assert_eq!(ConvPrecision::for_conv(&ConvDims { cin: 33, ..big }), ConvPrecision::Fp32);
    assert_eq!(ConvPrecision::for_conv(&ConvDims { input: [4, 4, 4], ..big }), ConvPrecision::Fp32);

    let gpu = Gpu::sim();
    let x = upload(&gpu, &[1, 4, 4, 4, 3], &random(192, 1));
    let w = upload(&gpu, &[5, 3, 3, 3, 4], &random(540, 2));
    let p = ConvPrecision::Fp32;
    let e = conv::conv3d_forward(&x, &w, None, [1, 1, 1], p).unwrap_err().to_string();
    assert!(
        e.contains("conv3d forward") && e.contains("[5, 3, 3, 3, 4]") && e.contains("[1, 4, 4, 4, 3]"),
        "{e}"
    );
    let gy = upload(&gpu, &[1, 4, 4, 4, 5], &random(320, 3));
    let e = conv::conv3d_backward_weight(&gy, &x, [3, 3, 3], [2, 2, 2], p, false).unwrap_err().to_string();
    assert!(e.contains("conv3d backward-weight") && e.contains("[1, 2, 2, 2, 5]"), "{e}");
    let wt = upload(&gpu, &[3, 2, 2, 2, 4], &random(96, 4));
    let e = conv::conv_transpose3d_forward(&x, &wt, None, [1, 2, 2], p).unwrap_err().to_string();
    assert!(e.contains("conv_transpose3d forward") && e.contains("kernel = stride"), "{e}");
    let b = upload(&gpu, &[3], &[0.0; 3]);
    let e = conv::conv_transpose3d_forward(&x, &wt, Some(&b), [2, 2, 2], p).unwrap_err().to_string();
    assert!(e.contains("bias [3] must be [4]"), "{e}");
}

#[test]
fn conv_benchmarks_run_on_the_sim() {
    let gpu = Gpu::sim();
    let rows = bench::run_conv(&gpu, &bench::KernelBenchOptions { quick: true }).unwrap();
    // 4 layer kinds x 3 passes x 2 precisions.
    assert_eq!(rows.len(), 24);
    assert!(rows.iter().all(|r| r.ms > 0.0 && r.tflop_per_s > 0.0 && r.tflop_per_s.is_finite()), "{rows:?}");
    let table = bench::format_conv_table(&gpu, &rows);
    assert!(table.contains("| conv_transpose3d bwd-weight tf32 | t2s2 1x16@3^3 -> 8 |"), "{table}");
}

/// The conv throughput table at the ResEncM sizes on the GPU (quick sizes on the sim without one);
/// appended to the file UNET3D_BENCH_OUT names, if set. Run by scripts/gpu-check.sh.
#[test]
#[ignore = "benchmark: cargo test --test sim_conv -- --ignored conv_throughput"]
fn conv_throughput() {
    let devices = test_devices().unwrap();
    let gpu_present = devices.iter().any(|g| !g.is_sim());
    for gpu in devices.into_iter().filter(|g| !(gpu_present && g.is_sim())) {
        let rows = bench::run_conv(&gpu, &bench::KernelBenchOptions { quick: gpu.is_sim() }).unwrap();
        let table = bench::format_conv_table(&gpu, &rows);
        println!("{table}");
        if let Some(path) = std::env::var_os("UNET3D_BENCH_OUT") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(f, "{table}").unwrap();
        }
    }
}
