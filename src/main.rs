//! `leadrelay`: runs any LeadRelay service by subcommand, all of them with `up`, and the operator
//! commands.

#![forbid(unsafe_code)]

mod admin;
mod cli;
mod healthcheck;
mod services;
mod up;

use std::process::ExitCode;

use clap::Parser;

/// See the workspace manifest for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cli::run(cli))
}
