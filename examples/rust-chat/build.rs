//! Links the model library of the bundle named by `KILN_BUNDLE` into the app. Without it the
//! app is built without a model and says how to get one.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kiln_model)");
    println!("cargo::rerun-if-env-changed=KILN_BUNDLE");
    if let Ok(bundle) = std::env::var("KILN_BUNDLE") {
        let lib_dir = std::path::Path::new(&bundle).join("lib");
        println!("cargo::rerun-if-changed={}", lib_dir.join("libkiln_model.a").display());
        println!("cargo::rustc-link-search=native={}", lib_dir.display());
        println!("cargo::rustc-link-lib=static=kiln_model");
        println!("cargo::rustc-cfg=kiln_model");
    }
}
