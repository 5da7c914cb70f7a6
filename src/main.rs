//! The `unet3d` command line.

use std::process::ExitCode;

use clap::Parser;

/// Errors reach the user as one message with its chain of causes, never as a backtrace (whatever
/// RUST_BACKTRACE says): the message names the file, key or tensor to fix.
fn main() -> ExitCode {
    match unet3d::cli::Cli::parse().run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
