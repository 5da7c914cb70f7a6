//! Inference: Gaussian sliding window over volumes larger than memory, streamed to Zarr, sharded across jobs.

pub mod blend;
pub mod cases;
pub mod gaussian;
pub mod predictor;
pub mod pyramid;
pub mod run;
pub mod shard;
pub mod tiles;

pub use blend::{OutputTarget, SlidingWindow, finish};
pub use predictor::{Mirroring, NetworkPredictor, TilePredictor};
pub use run::{Job, Layout, RunOptions, Stop, Summary, run};
pub use shard::{Blocks, Shard, ShardSpec};
pub use tiles::{Tile, TileGrid};
