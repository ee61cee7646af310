//! The kiln runner binary (see the library's documentation): `chat`, `run`, `tokenize`, `bench`, `eval`.

use clap::Parser;

fn main() {
    let cli = chat::Cli::parse();
    if let Err(e) = chat::run(&cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
