//! The `unet3d` command line.

use std::process::ExitCode;

use clap::Parser;

/// Errors reach the user as one message with its chain of causes, never as a backtrace (whatever
/// RUST_BACKTRACE says): the message names the file, key or tensor to fix. A job that stopped
/// early on purpose exits with `EXIT_RERUN` (75).
fn main() -> ExitCode {
    match unet3d::cli::Cli::parse().run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<unet3d::cli::Unfinished>() {
            Some(stopped) => {
                eprintln!("{stopped}");
                ExitCode::from(unet3d::cli::EXIT_RERUN)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
