//! `freehint-bench`: the benchmark suite's runner and report writer.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "freehint-bench", about = "The freehint benchmark suite")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes docs/BENCHMARKS.md (tables and PNG plots) from the results in
    /// a folder (`make bench` writes them to target/bench).
    Report {
        /// The folder of results.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// The Markdown report.
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        out: PathBuf,
        /// Where the plots go (linked from the report by relative path).
        #[arg(long, default_value = "docs/bench")]
        plots_dir: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::Report {
            dir,
            out,
            plots_dir,
        }) => freehint_bench::report::write_report(&dir, &out, &plots_dir),
        None => Err(anyhow::anyhow!("the runner is not written yet")),
    };
    if let Err(e) = result {
        eprintln!("freehint-bench: {e:#}");
        std::process::exit(1);
    }
}
