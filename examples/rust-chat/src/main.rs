//! The smallest Rust app with a kiln model linked into it: answers one prompt, greedily, with
//! the model's chat template.
//!
//! ```text
//! cargo xtask build-model --out bundle
//! KILN_BUNDLE=$PWD/bundle cargo build --release -p rust-chat
//! target/release/rust-chat bundle "What is the capital of France?"
//! ```
//!
//! The model's code and weights are in the binary (`lib/libkiln_model.a`, linked by
//! `build.rs`); the bundle directory supplies the tokenizer and the chat template (and the
//! weights, for bundles built with `--weights file`).

#[cfg(kiln_model)]
extern "C" {
    /// The descriptor exported by the linked model library.
    static kiln_model: runtime::program::ModelDesc;
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (bundle, prompt, max_tokens) = match &args[..] {
        [_, bundle, prompt] => (bundle, prompt, Some(256)),
        [_, bundle, prompt, n] => (bundle, prompt, n.parse().ok()),
        _ => (&args[0], &args[0], None),
    };
    let Some(max_tokens) = max_tokens.filter(|&n| args.len() >= 3 && n > 0) else {
        eprintln!("usage: rust-chat BUNDLE_DIR PROMPT [MAX_TOKENS (default 256)]");
        std::process::exit(2);
    };
    if let Err(e) = answer(std::path::Path::new(bundle), prompt, max_tokens) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(kiln_model)]
fn answer(bundle: &std::path::Path, prompt: &str, max_tokens: usize) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;

    use runtime::sampling::SamplerConfig;
    use runtime::session::{Model, Session};

    // SAFETY: `kiln_model` is the immutable descriptor of the statically linked model library;
    // `Model::open` checks its ABI version and its fingerprint against the bundle's files.
    let desc = unsafe { &*std::ptr::addr_of!(kiln_model) };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = Model::open(desc, bundle, threads)?;
    let mut session = Session::new(&model)?;
    let mut out = std::io::stdout().lock();
    session.chat(prompt, max_tokens, &SamplerConfig::greedy(), |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    Ok(())
}

#[cfg(not(kiln_model))]
fn answer(_: &std::path::Path, _: &str, _: usize) -> Result<(), Box<dyn std::error::Error>> {
    Err("this rust-chat was built without a model: build it with KILN_BUNDLE=<bundle dir> \
         (cargo xtask build-model writes one)"
        .into())
}
