//! Differentiable average pooling with kernel = stride (the BasicBlockD shortcut's AvgPool3d).

use super::dev;
use super::elementwise::{filled, value};
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::pool as k;
use crate::device::kernels::pool as kg;
use crate::tensor::Shape;
use anyhow::{Result, ensure};

/// Mean over non-overlapping `kernel` windows of a channels-last (N, D, H, W, C) volume; trailing
/// voxels that do not fill a window are dropped, as PyTorch's AvgPool3d(k, stride=k) does.
pub fn avg_pool3d(g: &mut Graph, x: Var, kernel: [usize; 3]) -> Result<Var> {
    let tx = value(g, x);
    let dims = tx.shape().ndhwc()?;
    ensure!(
        kernel.iter().zip(&dims[1..4]).all(|(&k, &d)| k > 0 && k <= d),
        "avg pool: kernel {kernel:?} does not fit input of shape {}: each window must be 1..=its axis",
        tx.shape()
    );
    let in_shape = tx.shape().clone();
    if tx.device() != Device::Cpu {
        let y = dev(kg::avg_pool(tx.gpu("avg pool")?, kernel)?);
        return Ok(g.record("avg_pool3d", y, &[x], move |gy| {
            Ok(vec![Some(dev(kg::avg_pool_backward(gy.gpu("avg pool backward")?, in_shape, kernel)?))])
        }));
    }
    let out = Shape::new(&k::avg_pool_out_dims(dims, kernel));
    let y = filled(&out, |y| k::avg_pool_forward(y, tx.data(), dims, kernel))?;
    Ok(g.record("avg_pool3d", y, &[x], move |gy| {
        Ok(vec![Some(filled(&in_shape, |gx| k::avg_pool_backward(gx, gy.data(), dims, kernel))?)])
    }))
}
