//! Writes the seed corpora (`seeds/<target>/`) and the small `tokenizer.json` of this crate.

#![forbid(unsafe_code)]

fn main() {
    let dir = kiln_fuzz::crate_dir();
    match kiln_fuzz::write_seeds(&dir) {
        Ok(n) => println!("wrote {n} seeds under {}", dir.join("seeds").display()),
        Err(e) => {
            eprintln!("error: writing seeds under {}: {e}", dir.display());
            std::process::exit(1);
        }
    }
}
