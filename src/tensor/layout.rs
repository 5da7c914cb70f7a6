//! Conversions between unet3d's channels-last layouts and PyTorch's channels-first ones.
//!
//! | what | PyTorch | unet3d |
//! |---|---|---|
//! | activations | (N, C, D, H, W) | (N, D, H, W, C) |
//! | conv3d weight | (K, C, T, R, S) | (K, T, R, S, C) |
//! | transposed conv3d weight | (C_in, C_out, T, R, S) | (C_in, T, R, S, C_out) |
//!
//! Conversions happen at the checkpoint and fixture boundary only.

use super::Tensor;

/// Reorders the axes of a tensor: output axis `i` is input axis `axes[i]`.
pub fn permute(t: &Tensor, axes: &[usize]) -> anyhow::Result<Tensor> {
    let dims = t.dims();
    let rank = dims.len();
    anyhow::ensure!(
        axes.len() == rank && (0..rank).all(|a| axes.contains(&a)),
        "permute of shape {} needs a permutation of 0..{rank}, got {axes:?}",
        t.shape()
    );
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let out_dims: Vec<usize> = axes.iter().map(|&a| dims[a]).collect();
    let strides: Vec<usize> = axes.iter().map(|&a| in_strides[a]).collect();
    let src = t.data();
    let mut out = Vec::with_capacity(src.len());
    let mut idx = vec![0usize; rank];
    let mut offset = 0usize;
    for _ in 0..src.len() {
        out.push(src[offset]);
        // Odometer increment over the output index, keeping the source offset in step.
        for ax in (0..rank).rev() {
            idx[ax] += 1;
            offset += strides[ax];
            if idx[ax] < out_dims[ax] {
                break;
            }
            offset -= strides[ax] * out_dims[ax];
            idx[ax] = 0;
        }
    }
    Tensor::from_vec(out_dims, out)
}

fn expect_rank5(t: &Tensor, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(t.shape().rank() == 5, "{what} must have 5 dimensions, got shape {}", t.shape());
    Ok(())
}

/// (N, C, D, H, W) to (N, D, H, W, C).
pub fn ncdhw_to_ndhwc(t: &Tensor) -> anyhow::Result<Tensor> {
    expect_rank5(t, "a PyTorch activation")?;
    permute(t, &[0, 2, 3, 4, 1])
}

/// (N, D, H, W, C) to (N, C, D, H, W).
pub fn ndhwc_to_ncdhw(t: &Tensor) -> anyhow::Result<Tensor> {
    expect_rank5(t, "a channels-last activation")?;
    permute(t, &[0, 4, 1, 2, 3])
}

/// PyTorch conv3d weight (K, C, T, R, S) to unet3d's (K, T, R, S, C).
pub fn conv_weight_from_torch(w: &Tensor) -> anyhow::Result<Tensor> {
    expect_rank5(w, "a conv3d weight")?;
    permute(w, &[0, 2, 3, 4, 1])
}

/// unet3d conv3d weight (K, T, R, S, C) to PyTorch's (K, C, T, R, S).
pub fn conv_weight_to_torch(w: &Tensor) -> anyhow::Result<Tensor> {
    expect_rank5(w, "a conv3d weight")?;
    permute(w, &[0, 4, 1, 2, 3])
}

/// PyTorch transposed conv3d weight (C_in, C_out, T, R, S) to unet3d's (C_in, T, R, S, C_out).
pub fn transposed_weight_from_torch(w: &Tensor) -> anyhow::Result<Tensor> {
    expect_rank5(w, "a transposed conv3d weight")?;
    permute(w, &[0, 2, 3, 4, 1])
}

/// unet3d transposed conv3d weight (C_in, T, R, S, C_out) to PyTorch's (C_in, C_out, T, R, S).
pub fn transposed_weight_to_torch(w: &Tensor) -> anyhow::Result<Tensor> {
    expect_rank5(w, "a transposed conv3d weight")?;
    permute(w, &[0, 4, 1, 2, 3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_moves_channels_last_and_back() {
        let n = 2 * 3 * 2 * 2 * 4;
        let t = Tensor::from_vec([2, 3, 2, 2, 4], (0..n).map(|v| v as f32).collect()).unwrap();
        let cl = ncdhw_to_ndhwc(&t).unwrap();
        assert_eq!(cl.dims(), &[2, 2, 2, 4, 3]);
        // Element (n=1, c=2, d=1, h=0, w=3) sits at index ((1*3+2)*2+1)*2*4 + 0*4 + 3 in NCDHW.
        let src = ((((3 + 2) * 2 + 1) * 2) * 4 + 3) as f32;
        let dst = (((2 + 1) * 2) * 4 + 3) * 3 + 2;
        assert_eq!(cl.data()[dst], src);
        assert_eq!(ndhwc_to_ncdhw(&cl).unwrap().data(), t.data());
    }

    #[test]
    fn permute_rejects_bad_axes() {
        let t = Tensor::zeros([2, 3]);
        assert!(permute(&t, &[0, 0]).is_err());
        assert!(ncdhw_to_ndhwc(&t).is_err());
    }
}
