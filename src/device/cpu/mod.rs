//! The CPU backend: slice-level forward and backward kernels, multi-threaded with rayon.
//!
//! Every kernel is generic over [`Real`] so that the same code runs in float32 for training and in
//! float64 for finite-difference gradient checks. Activations are channels-last: a volume of shape
//! (N, D, H, W, C) is stored with C fastest.

use num_traits::Float;

/// The float types the CPU kernels are written for (f32 for work, f64 for gradient checks).
pub trait Real:
    Float + num_traits::FromPrimitive + Default + Send + Sync + std::fmt::Debug + std::iter::Sum + 'static
{
    /// Converts an f64 constant (an epsilon, a slope) into this type.
    fn c(v: f64) -> Self {
        <Self as num_traits::NumCast>::from(v).expect("constant representable")
    }
}

impl Real for f32 {}
impl Real for f64 {}

pub mod activation;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod naive;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod reduce;
