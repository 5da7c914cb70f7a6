//! Differentiable 3D convolutions on channels-last (N, D, H, W, C) activations.
//!
//! Weights are in unet3d's layouts (see [`tensor::layout`](crate::tensor::layout)): conv3d
//! (K, T, R, S, C), transposed conv3d (C_in, T, R, S, C_out). Backward saves only what the wanted
//! gradients need: the input for the weight gradient, the weight for the input gradient.

use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::conv as kernels;
use crate::device::kernels::conv::{self as kc, ConvPrecision};
use crate::device::op::{ConvDims, TransposedDims};
use crate::tensor::Tensor;
use anyhow::{Context, Result};

/// The input's (N, D, H, W, C) and the 5-D weight's dims, checked: weight axis `w_in_axis` must
/// match the input channels and the bias, if any, the length of axis `w_out_axis`.
fn check_operands(
    g: &Graph,
    x: Var,
    w: Var,
    b: Option<Var>,
    w_in_axis: usize,
    w_out_axis: usize,
) -> anyhow::Result<([usize; 5], [usize; 5])> {
    let operands: Vec<&Tensor> = [Some(x), Some(w), b].into_iter().flatten().map(|v| g.value(v)).collect();
    super::same_device("convolution", &operands)?;
    let xd = g.shape(x).ndhwc()?;
    let wd: [usize; 5] = g
        .shape(w)
        .dims()
        .try_into()
        .map_err(|_| anyhow::anyhow!("weight must have 5 dimensions, got {}", g.shape(w)))?;
    anyhow::ensure!(
        wd[w_in_axis] == xd[4],
        "weight {} expects {} input channels, input {} has {}",
        g.shape(w),
        wd[w_in_axis],
        g.shape(x),
        xd[4]
    );
    if let Some(b) = b {
        g.value(b).expect_shape(&format!("bias for weight {}", g.shape(w)), &[wd[w_out_axis]])?;
    }
    Ok((xd, wd))
}

/// A zero-filled tensor of `shape` written by `f`.
fn compute(shape: [usize; 5], f: impl FnOnce(&mut [f32])) -> Tensor {
    let mut t = Tensor::zeros(shape);
    f(t.data_mut());
    t
}

/// A forward pass on flat slices: (y, x, w, bias, dims).
type ForwardFn<D> = fn(&mut [f32], &[f32], &[f32], Option<&[f32]>, &D);
/// A backward pass on flat slices: (gx, gy, w, dims) or (gw, gy, x, dims).
type GradFn<D> = fn(&mut [f32], &[f32], &[f32], &D);

/// The three passes of a conv-like op on flat slices, with the dims they share.
struct ConvOp<D> {
    name: &'static str,
    dims: D,
    x_dims: [usize; 5],
    w_dims: [usize; 5],
    y_dims: [usize; 5],
    forward: ForwardFn<D>,
    /// (gx, gy, w)
    data: GradFn<D>,
    /// (gw, gy, x)
    weight: GradFn<D>,
    /// The passes on a kernel device.
    gpu: GpuConv,
}

/// Which conv a kernel device runs, with what its wrappers need beyond the tensors.
#[derive(Clone, Copy)]
enum GpuConv {
    Conv { kernel: [usize; 3], stride: [usize; 3] },
    Transposed { stride: [usize; 3] },
}

/// fp32 on CUDA cores: parity with the CPU reference first (TF32 and bf16 selection is the
/// tensor-core work's).
const PRECISION: ConvPrecision = ConvPrecision::Fp32;

/// The device half of [`record`]: forward on the kernels, backward recorded there too.
fn record_gpu(
    g: &mut Graph,
    name: &'static str,
    conv: GpuConv,
    x: Var,
    w: Var,
    b: Option<Var>,
) -> Result<Var> {
    let (xt, wt) = (g.value(x).clone(), g.value(w).clone());
    let bt = b.map(|b| g.value(b).clone());
    let (xg, wg) = (xt.gpu(name)?, wt.gpu(name)?);
    let bg = bt.as_ref().map(|t| t.gpu(name)).transpose()?;
    let y = match conv {
        GpuConv::Conv { stride, .. } => kc::conv3d_forward(xg, wg, bg, stride, PRECISION)?,
        GpuConv::Transposed { stride } => kc::conv_transpose3d_forward(xg, wg, bg, stride, PRECISION)?,
    };
    let need_b = b.is_some_and(|b| g.requires_grad(b));
    let saved_x = g.requires_grad(w).then(|| xt.clone());
    let saved_w = g.requires_grad(x).then_some(wt);
    let in_dims = xt.shape().ndhwc()?;
    let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
    Ok(g.record(name, Tensor::from_gpu(y), &inputs, move |gy| {
        let gy = gy.gpu(name)?;
        let gx = saved_w
            .map(|w| -> Result<Tensor> {
                let w = w.gpu(name)?;
                Ok(Tensor::from_gpu(match conv {
                    GpuConv::Conv { stride, .. } => kc::conv3d_backward_data(
                        gy,
                        w,
                        [in_dims[1], in_dims[2], in_dims[3]],
                        stride,
                        PRECISION,
                    )?,
                    GpuConv::Transposed { stride } => {
                        kc::conv_transpose3d_backward_data(gy, w, stride, PRECISION)?
                    }
                }))
            })
            .transpose()?;
        let (gw, gb) = match saved_x {
            Some(x) => {
                let x = x.gpu(name)?;
                let (gw, gb) = match conv {
                    GpuConv::Conv { kernel, stride } => {
                        kc::conv3d_backward_weight(gy, x, kernel, stride, PRECISION, need_b)?
                    }
                    GpuConv::Transposed { stride } => {
                        kc::conv_transpose3d_backward_weight(gy, x, stride, PRECISION, need_b)?
                    }
                };
                (Some(Tensor::from_gpu(gw)), gb)
            }
            None => (None, None),
        };
        // A bias gradient without a weight gradient comes from its own reduction.
        let gb = match (need_b, gb) {
            (true, Some(gb)) => Some(Tensor::from_gpu(gb)),
            (true, None) => Some(Tensor::from_gpu(kc::bias_grad(gy)?)),
            (false, _) => None,
        };
        let mut out = vec![gx, gw];
        if b.is_some() {
            out.push(gb);
        }
        Ok(out)
    }))
}

/// Runs the forward and records a backward that computes only the wanted gradients.
fn record<D: Copy + 'static>(g: &mut Graph, op: ConvOp<D>, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
    if g.value(x).device() != Device::Cpu {
        return record_gpu(g, op.name, op.gpu, x, w, b);
    }
    let (xt, wt) = (g.value(x).clone(), g.value(w).clone());
    let bt = b.map(|b| g.value(b).clone());
    let y = compute(op.y_dims, |y| {
        (op.forward)(y, xt.data(), wt.data(), bt.as_ref().map(Tensor::data), &op.dims)
    });
    let need_b = b.is_some_and(|b| g.requires_grad(b));
    let saved_x = g.requires_grad(w).then_some(xt);
    let saved_w = g.requires_grad(x).then_some(wt);
    let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
    Ok(g.record(op.name, y, &inputs, move |gy| {
        let gy_data = gy.data();
        let gx = saved_w.map(|w| compute(op.x_dims, |gx| (op.data)(gx, gy_data, w.data(), &op.dims)));
        let gw = saved_x.map(|x| compute(op.w_dims, |gw| (op.weight)(gw, gy_data, x.data(), &op.dims)));
        let mut out = vec![gx, gw];
        if b.is_some() {
            let cout = op.y_dims[4];
            out.push(need_b.then(|| {
                let mut gb = Tensor::zeros([cout]);
                kernels::conv_backward_bias(gb.data_mut(), gy_data);
                gb
            }));
        }
        Ok(out)
    }))
}

/// 3D convolution with "same" padding `(k - 1) / 2` per axis and the given stride:
/// x (N, D, H, W, C), w (K, T, R, S, C), b (K) gives (N, D', H', W', K) with
/// `D' = floor((D + 2p - T) / stride) + 1`.
pub fn conv3d(g: &mut Graph, x: Var, w: Var, b: Option<Var>, stride: [usize; 3]) -> anyhow::Result<Var> {
    let ctx = || format!("conv3d of input {} with weight {} and stride {stride:?}", g.shape(x), g.shape(w));
    let (xd, wd) = check_operands(g, x, w, b, 4, 0).with_context(ctx)?;
    let kernel = [wd[1], wd[2], wd[3]];
    let d = ConvDims { n: xd[0], input: [xd[1], xd[2], xd[3]], cin: xd[4], cout: wd[0], kernel, stride };
    d.validate().with_context(ctx)?;
    let [od, oh, ow] = d.output();
    let op = ConvOp {
        name: "conv3d",
        dims: d,
        x_dims: xd,
        w_dims: wd,
        y_dims: [d.n, od, oh, ow, d.cout],
        forward: kernels::conv3d_forward::<f32>,
        data: kernels::conv3d_backward_data::<f32>,
        weight: kernels::conv3d_backward_weight::<f32>,
        gpu: GpuConv::Conv { kernel, stride },
    };
    record(g, op, x, w, b)
}

/// Transposed 3D convolution whose kernel equals its stride (the U-Net decoder's upsampling):
/// x (N, D, H, W, C_in), w (C_in, T, R, S, C_out), b (C_out) gives (N, D*T, H*R, W*S, C_out).
pub fn conv_transpose3d(
    g: &mut Graph,
    x: Var,
    w: Var,
    b: Option<Var>,
    stride: [usize; 3],
) -> anyhow::Result<Var> {
    let ctx = || {
        format!("conv_transpose3d of input {} with weight {} and stride {stride:?}", g.shape(x), g.shape(w))
    };
    let (xd, wd) = check_operands(g, x, w, b, 0, 4).with_context(ctx)?;
    let kernel = [wd[1], wd[2], wd[3]];
    anyhow::ensure!(
        kernel == stride && kernel.iter().all(|&k| k > 0),
        "{}: only kernel = stride (positive) is supported, got kernel {kernel:?}",
        ctx()
    );
    let d = TransposedDims { n: xd[0], input: [xd[1], xd[2], xd[3]], cin: xd[4], cout: wd[4], kernel };
    let [od, oh, ow] = d.output();
    let op = ConvOp {
        name: "conv_transpose3d",
        dims: d,
        x_dims: xd,
        w_dims: wd,
        y_dims: [d.n, od, oh, ow, d.cout],
        forward: kernels::conv_transpose3d_forward::<f32>,
        data: kernels::conv_transpose3d_backward_data::<f32>,
        weight: kernels::conv_transpose3d_backward_weight::<f32>,
        gpu: GpuConv::Transposed { stride },
    };
    record(g, op, x, w, b)
}
