//! The `muscle` command line.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "muscle", version, about = "MUSCLE semi-supervised training engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print build features, devices and threads.
    Info,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn info() -> muscle::Result<()> {
    println!("muscle {}", env!("CARGO_PKG_VERSION"));
    println!("features: {}", if cfg!(feature = "cuda") { "cuda" } else { "cpu-only" });
    println!("threads: {}", muscle::cpu::threads());
    println!("devices: cpu");
    Ok(())
}
