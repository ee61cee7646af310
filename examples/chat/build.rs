//! Links the model library of the bundle named by `KILN_BUNDLE` (set by `cargo xtask chat`).
//! Without it the binary is built without a model and says how to get one.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kiln_model)");
    println!("cargo::rerun-if-env-changed=KILN_BUNDLE");
    if let Ok(bundle) = std::env::var("KILN_BUNDLE") {
        let lib_dir = std::path::Path::new(&bundle).join("lib");
        let lib = lib_dir.join("libkiln_model.a");
        println!("cargo::rerun-if-changed={}", lib.display());
        println!("cargo::rustc-link-search=native={}", lib_dir.display());
        println!("cargo::rustc-link-lib=static=kiln_model");
        println!("cargo::rustc-cfg=kiln_model");
    }
}
