//! The `noa` binary: parses the command line and hands each command to the crates that do the work.

mod cli;
mod client;
mod commands;
mod infer;
mod output;
mod trust;
mod workflow;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if !matches!(cli.command, cli::Command::Up { .. }) {
        noa_node::restore_default_sigpipe();
    }
    let code = match commands::run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            e.exit_code()
        }
    };
    std::process::exit(code);
}
