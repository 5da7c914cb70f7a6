//! Inference: Gaussian sliding window over volumes larger than memory, streamed to Zarr, sharded across jobs.

pub mod blend;
pub mod gaussian;
pub mod predictor;
pub mod tiles;

pub use blend::{OutputTarget, SlidingWindow, finish};
pub use predictor::{Mirroring, NetworkPredictor, TilePredictor};
pub use tiles::{Tile, TileGrid};
