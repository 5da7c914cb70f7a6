//! Differentiable operations on [`Var`](crate::Var)s: each computes its forward with the CPU
//! backend and records a backward closure on the [`Graph`](crate::Graph).

pub mod activation;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod reduce;
