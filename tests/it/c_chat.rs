//! `examples/c-chat`, a C11 program on the runtime's C API (`runtime/include/kiln.h`),
//! compiled with `cc -Wall -Wextra -Werror` against a bundle whose weights ship as
//! `weights.bin`, exactly as `cargo xtask c-chat` builds it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use compiler::bundle::{build_model, BuildOptions};
use tests::harness::scratch_dir;

const PROMPT: &str = "What is the capital of France?";

fn model_path() -> PathBuf {
    std::env::var_os("KILN_MODEL").map(PathBuf::from).expect(
        "set KILN_MODEL to a SmolLM2-135M-Instruct GGUF (e.g. the path printed by \
         `cargo xtask fetch-model`) to run the c-chat tests",
    )
}

/// The bundle (weights in weights.bin) and the c-chat binary linked against it, built once.
fn app() -> &'static (PathBuf, PathBuf) {
    static APP: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    APP.get_or_init(|| {
        let bundle = scratch_dir("c-chat").join("bundle");
        let opts = BuildOptions {
            model: model_path(),
            target: "x86_64-unknown-linux-gnu".into(),
            device: None,
            out: bundle.clone(),
            context: Some(512),
            batch: 64,
            embed_weights: false,
            dump_after: vec![],
            shared_linker: None,
        };
        build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
        assert!(bundle.join("weights.bin").exists(), "a bundle built without embedded weights has weights.bin");
        // A target dir of its own: the outer `cargo test` holds the main one's lock.
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kiln-tests/apps");
        let exe = xtask::build_c_chat(&bundle, Some(&target))
            .unwrap_or_else(|e| panic!("building examples/c-chat failed: {e:#}"));
        (bundle, exe)
    })
}

fn run(exe: &Path, bundle: &Path, prompt: &str) -> Output {
    let out = Command::new(exe)
        .arg(bundle)
        .arg(prompt)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    eprintln!(
        "c-chat exited with {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Copies a directory tree, leaving out files named `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &str) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst, skip);
        } else if entry.file_name() != skip {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[test]
fn c_program_chats_through_the_c_abi() {
    let (bundle, exe) = app();
    let out = run(exe, bundle, PROMPT);
    assert!(out.status.success(), "c-chat failed: {}", out.status);
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("Paris"), "reply does not name Paris: {reply:?}");
}

#[test]
fn c_program_reports_missing_weights() {
    let (bundle, exe) = app();
    let broken = scratch_dir("c-chat-no-weights").join("bundle");
    copy_tree(bundle, &broken, "weights.bin");
    assert!(!broken.join("weights.bin").exists());
    let out = run(exe, &broken, PROMPT);
    assert!(!out.status.success(), "c-chat succeeded without weights.bin");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("weights"), "stderr does not mention the weights: {stderr:?}");
    assert!(
        out.stdout.is_empty(),
        "c-chat printed a reply without weights: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}
