//! The `kiln` command line (`cargo xtask`) on bad input: every case must exit non-zero with a clear message
//! on stderr, never a panic, and must leave no bundle behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use compiler::gguf::{GgmlType, GgufWriter, MetaValue};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kiln-tests/cli").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `kiln build-model --model FILE --out DIR/bundle EXTRA...` and returns stderr,
/// asserting a clean failure.
fn build_fails(name: &str, gguf: &[u8], extra: &[&str]) -> String {
    let dir = scratch(name);
    let model = dir.join("model.gguf");
    std::fs::write(&model, gguf).unwrap();
    let out = dir.join("bundle");
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("build-model")
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{name}: expected exit code 1, stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{name}: {stderr}");
    assert!(!stderr.contains("panicked"), "{name} panicked: {stderr}");
    assert!(!out.exists(), "{name}: a failed build left {}", out.display());
    let leftovers: Vec<_> =
        std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name() != "model.gguf").collect();
    assert!(leftovers.is_empty(), "{name}: a failed build left {leftovers:?}");
    stderr
}

fn llama_meta(w: &mut GgufWriter, arch: &str) {
    llama_meta_d(w, arch, 64);
}

fn llama_meta_d(w: &mut GgufWriter, arch: &str, d: u32) {
    w.add_meta("general.architecture", MetaValue::String(arch.into()));
    for (k, v) in [
        ("block_count", 1u32),
        ("embedding_length", d),
        ("feed_forward_length", 96),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
        ("context_length", 128),
    ] {
        w.add_meta(&format!("{arch}.{k}"), MetaValue::U32(v));
    }
    w.add_meta(&format!("{arch}.attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5));
}

fn small_valid_header() -> Vec<u8> {
    let mut w = GgufWriter::new();
    llama_meta(&mut w, "llama");
    w.add_tensor("token_embd.weight", &[64, 10], GgmlType::F32, &vec![0u8; 64 * 10 * 4]);
    w.finish()
}

#[test]
fn truncated_gguf() {
    let bytes = small_valid_header();
    let e = build_fails("truncated", &bytes[..bytes.len() / 3], &[]);
    assert!(e.contains("outside the file") || e.contains("truncated"), "{e}");
    let e = build_fails("truncated_header", &bytes[..100], &[]);
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn random_bytes() {
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let e = build_fails("random", &bytes, &[]);
    assert!(e.contains("magic"), "{e}");
}

#[test]
fn another_architecture() {
    let mut w = GgufWriter::new();
    llama_meta(&mut w, "mamba");
    let e = build_fails("arch", &w.finish(), &[]);
    assert!(e.contains("unsupported architecture 'mamba'") && e.contains("llama"), "{e}");
}

#[test]
fn missing_tensor() {
    let e = build_fails("missing", &small_valid_header(), &[]);
    assert!(e.contains("blk.0.attn_norm.weight"), "{e}");
}

#[test]
fn unsupported_and_unknown_tensor_types() {
    let mut w = GgufWriter::new();
    llama_meta_d(&mut w, "llama", 256);
    w.add_tensor("token_embd.weight", &[256, 10], GgmlType::IQ4_XS, &vec![0u8; 136 * 10]);
    let e = build_fails("iq4xs", &w.finish(), &[]);
    assert!(e.contains("token_embd.weight") && e.contains("iq4_xs"), "{e}");

    // Patch the type id of the only tensor to an id no ggml version defines.
    let mut bytes = small_valid_header();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let type_at = at + 4 + 2 * 8;
    assert_eq!(bytes[type_at..type_at + 4], 0u32.to_le_bytes());
    bytes[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = build_fails("unknown_type", &bytes, &[]);
    assert!(e.contains("token_embd.weight") && e.contains("77"), "{e}");
}

#[test]
fn shape_contradicting_hyperparameters() {
    let mut w = GgufWriter::new();
    llama_meta(&mut w, "llama");
    w.add_tensor("token_embd.weight", &[64, 10], GgmlType::F32, &vec![0u8; 64 * 10 * 4]);
    w.add_tensor("blk.0.attn_norm.weight", &[32], GgmlType::F32, &[0u8; 128]);
    let e = build_fails("shape", &w.finish(), &[]);
    assert!(e.contains("blk.0.attn_norm.weight") && e.contains("[64]"), "{e}");
}

#[test]
fn bad_flags() {
    let e = build_fails("target", &small_valid_header(), &["--target", "riscv64gc-unknown-linux-gnu"]);
    assert!(e.contains("unknown target") && e.contains("x86_64-unknown-linux-gnu"), "{e}");
    let e = build_fails("context", &small_valid_header(), &["--context", "0"]);
    assert!(e.contains("context"), "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["build-model", "--context", "-5"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap rejects a negative context");
    for (budget, says) in [("speed=5", "unknown limit 'speed'"), ("memory=lots", "with a unit"), ("", "no limit given")]
    {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["build-model", "--budget", budget]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{budget}: {stderr}");
        assert!(stderr.contains(says), "{budget}: {stderr}");
    }
    let e = build_fails("x86_device", &small_valid_header(), &["--device", "epyc-zen9"]);
    assert!(
        e.contains("epyc-zen9") && e.contains("x86-64-v3") && e.contains("epyc-zen4-2vcpu") && e.contains("host"),
        "{e}"
    );
}

#[test]
fn unknown_device_lists_the_known_ones() {
    let e =
        build_fails("device", &small_valid_header(), &["--target", "aarch64-linux-android", "--device", "pixel-99"]);
    assert!(
        e.contains("pixel-99")
            && e.contains("snapdragon-865")
            && e.contains("raspberry-pi-5")
            && e.contains("generic-armv8.0"),
        "{e}"
    );
}

/// `--out` naming a directory that holds anything but a previous kiln bundle is refused before
/// any work, and nothing in it is touched.
#[test]
fn out_directory_of_the_user_is_never_replaced() {
    let dir = scratch("user_out");
    let model = dir.join("model.gguf");
    std::fs::write(&model, small_valid_header()).unwrap();
    let project = dir.join("project");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(project.join("Cargo.toml"), b"[package]\n").unwrap();
    std::fs::write(project.join("src/main.rs"), b"fn main() {}\n").unwrap();
    let file = dir.join("notes.txt");
    std::fs::write(&file, b"my notes").unwrap();
    for out in [&project, &file] {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["build-model", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("refusing to write the bundle to"), "{stderr}");
    }
    assert_eq!(std::fs::read(project.join("Cargo.toml")).unwrap(), b"[package]\n");
    assert_eq!(std::fs::read(project.join("src/main.rs")).unwrap(), b"fn main() {}\n");
    assert_eq!(std::fs::read_dir(&project).unwrap().count(), 2);
    assert_eq!(std::fs::read(&file).unwrap(), b"my notes");
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["model.gguf", "notes.txt", "project"], "nothing added beside them");
}

/// `bench` refuses what it cannot measure before building or running anything.
#[test]
fn bench_refuses_bad_input_before_any_work() {
    let dir = scratch("bench");
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("manifest.json"), r#"{"target": {"triple": "x86_64-unknown-linux-gnu"}}"#).unwrap();
    let json = dir.join("mine.json");
    std::fs::write(&json, "user data").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--vs", "llama.cpp", "--gguf", "/no/such.gguf"], "no GGUF for llama.cpp at /no/such.gguf"),
        (&["--json", json.to_str().unwrap()], "pass --force"),
        (&["--threads", "0"], "--threads must list thread counts of at least 1"),
        (&["--gguf", "/x.gguf"], "--vs"),
    ];
    for (extra, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("bench")
            .arg("--bundle")
            .arg(&bundle)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
    assert_eq!(std::fs::read_to_string(&json).unwrap(), "user data", "the user's file is kept");
}

/// Every option of the user commands is described in `--help`.
#[test]
fn help_describes_every_option() {
    for cmd in ["build-model", "optimize", "chat", "run", "tokenize", "bench", "eval", "c-chat", "test"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with("--") || t.starts_with("--help") {
                continue;
            }
            // clap puts the description after the flag on the same line, or on the next lines.
            let flag = t.split_whitespace().next().unwrap();
            let same_line = t.split("  ").skip(1).any(|s| !s.trim().is_empty());
            let next_line = lines.get(i + 1).is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
            assert!(same_line || next_line, "`kiln {cmd} --help`: {flag} has no description:\n{text}");
        }
    }
}

/// The runner refuses flags it would ignore and checks output paths before running the model.
#[test]
fn runner_refuses_ignored_flags_and_bad_outputs_before_work() {
    let dir = scratch("runner_flags");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("run").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, e) = run(&["--prompt", "hi", "--dump-logits", "x.npy"]);
    assert_eq!(code, Some(2), "{e}");
    assert!(e.contains("--dump-logits") && e.contains("cannot be used with"), "{e}");
    // An existing output file is refused before the bundle is even opened.
    let npy = dir.join("existing.npy");
    std::fs::write(&npy, b"keep").unwrap();
    let (code, e) = run(&["--bundle", "/nonexistent", "--tokens", "1,2", "--dump-logits", npy.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("exists; pass --force"), "{e}");
    assert_eq!(std::fs::read(&npy).unwrap(), b"keep");
    let (code, e) = run(&["--bundle", "/nonexistent", "--tokens", "1,x"]);
    assert_eq!(code, Some(2), "{e}");
}

/// Runs `kiln build-model --model PATH` and returns stderr, asserting a clean, quick failure.
fn build_path_fails(name: &str, model: &Path) -> String {
    let dir = scratch(name);
    let out = dir.join("bundle");
    let start = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("build-model")
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{name}: expected exit code 1, stderr: {stderr}");
    assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{name}: {stderr}");
    assert!(start.elapsed() < std::time::Duration::from_secs(10), "{name} took {:?}", start.elapsed());
    assert!(!out.exists(), "{name}: a failed build left {}", out.display());
    stderr
}

#[test]
fn model_that_is_not_a_regular_file() {
    let e = build_path_fails("dev_zero", Path::new("/dev/zero"));
    assert!(e.contains("/dev/zero") && e.contains("character device") && e.contains("not a regular file"), "{e}");
    let dir = scratch("fifo_model");
    let fifo = dir.join("model.gguf");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo").success());
    let e = build_path_fails("fifo", &fifo);
    assert!(e.contains("fifo") && e.contains("not a regular file"), "{e}");
    // A directory is read as a Hugging Face checkpoint, which this one is not.
    let e = build_path_fails("directory", &dir);
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");
}

#[test]
fn zero_context_length_in_the_file() {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::String("llama".into()));
    for (k, v) in [
        ("block_count", 1u32),
        ("embedding_length", 64),
        ("feed_forward_length", 96),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
        ("context_length", 0),
    ] {
        w.add_meta(&format!("llama.{k}"), MetaValue::U32(v));
    }
    w.add_meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5));
    w.add_tensor("token_embd.weight", &[64, 10], GgmlType::F32, &vec![0u8; 64 * 10 * 4]);
    let e = build_fails("context_0_file", &w.finish(), &[]);
    assert!(e.contains("llama.context_length is 0") && e.contains("--context"), "{e}");
    assert!(!e.contains("must be in 1..="), "{e}");
}

/// `eval` checks its text file and its --json file before the bundle is even opened, and
/// writes nothing when it fails.
#[test]
fn eval_refuses_bad_input_before_work() {
    let dir = scratch("eval_flags");
    let eval = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("eval").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (out.status.code(), stderr)
    };
    let text = dir.join("text.txt");
    std::fs::write(&text, "some text").unwrap();
    let json = dir.join("figures.json");
    std::fs::write(&json, b"keep").unwrap();
    let (code, e) =
        eval(&["--bundle", "/nonexistent", "--text", text.to_str().unwrap(), "--json", json.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("exists; pass --force"), "{e}");
    assert_eq!(std::fs::read(&json).unwrap(), b"keep");
    let missing = dir.join("missing.txt");
    let (code, e) = eval(&["--bundle", "/nonexistent", "--text", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("no text file") && e.contains("missing.txt"), "{e}");
    let (code, e) = eval(&["--bundle", "/nonexistent", "--text", text.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("not a kiln bundle"), "{e}");
    let (code, e) = eval(&["--bundle", "/nonexistent", "--text", text.to_str().unwrap(), "--force"]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("--force replaces the --json or --report file"), "{e}");
    let (code, e) = eval(&["--force"]);
    assert_eq!(code, Some(2), "--bundle is required: {e}");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"Q?\", \"answers\": \"Oslo\", \"hops\": 1}\n").unwrap();
    let (code, e) = eval(&["--bundle", "/nonexistent", "--suite", "qa", "--questions", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("bad.jsonl line 1") && e.contains("non-empty array"), "{e}");
    let (code, e) = eval(&["--bundle", "/nonexistent", "--suite", "agreement"]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("needs --reference"), "{e}");
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["bad.jsonl", "figures.json", "text.txt"], "nothing written");
}

/// `optimize` and the optimization flags of `build-model`: bad values are refused before any
/// work, an existing output file is never replaced without --force, and nothing is written.
#[test]
fn build_model_refuses_bad_auto_pruning_before_work() {
    let e = build_fails("auto-too-many", &small_valid_header(), &["--prune-layers", "auto:1"]);
    assert!(e.contains("auto:1 needs at least 2 blocks (the final block is kept), and the model has 1"), "{e}");
    let e =
        build_fails("auto-no-calib", &small_valid_header(), &["--prune-layers", "auto:1", "--calib", "/nonexistent"]);
    assert!(e.contains("cannot read the calibration text"), "{e}");
    let e = build_fails("calib-without-auto", &small_valid_header(), &["--calib", "/nonexistent"]);
    assert!(e.contains("--calib and --calib-tokens only apply to --prune-layers auto:N"), "{e}");
}

#[test]
fn optimize_refuses_bad_options_and_existing_outputs() {
    let dir = scratch("optimize");
    let model = dir.join("model.gguf");
    std::fs::write(&model, small_valid_header()).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        (out.status.code(), stderr)
    };
    let m = model.to_str().unwrap();
    let out = dir.join("small.gguf");
    let o = out.to_str().unwrap();
    for (args, code, needle) in [
        (vec!["optimize", "--model", m, "--out", o, "--prune-layers", "last:x"], 2, "bad block count"),
        (vec!["optimize", "--model", m, "--out", o, "--prune-layers", "3,3"], 2, "listed twice"),
        (vec!["build-model", "--model", m, "--prune-layers", "a"], 2, "bad block index"),
        (vec!["optimize", "--model", m, "--out", o, "--quant-tensor", "ffn_down"], 1, "expected PATTERN=FORMAT"),
        (vec!["optimize", "--model", m, "--out", o], 1, "nothing to do"),
        (vec!["optimize", "--model", m, "--out", o, "--prune-layers", "auto:0"], 2, "auto:0 prunes nothing"),
        (vec!["optimize", "--model", m, "--out", o, "--prune-layers", "auto:1"], 1, "auto:1 needs at least 2 blocks"),
        (
            vec!["optimize", "--model", m, "--out", o, "--prune-layers", "auto:1", "--calib", "/nonexistent/c.txt"],
            1,
            "cannot read the calibration text /nonexistent/c.txt",
        ),
        (vec!["optimize", "--model", m, "--out", o, "--prune-layers", "0", "--calib-tokens", "64"], 1, "only apply to"),
        (vec!["optimize", "--model", m, "--out", "/nonexistent/x.gguf", "--quant", "q8_0"], 1, "no directory"),
    ] {
        let (c, e) = run(&args);
        assert_eq!(c, Some(code), "{args:?}: {e}");
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    std::fs::write(&out, b"keep").unwrap();
    let (c, e) = run(&["optimize", "--model", m, "--out", o, "--quant", "q8_0"]);
    assert_eq!(c, Some(1), "{e}");
    assert!(e.contains("exists; pass --force to replace it"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 2, "nothing else written: {files:?}");
}

/// `heal` and `finetune` refuse what cannot work before loading anything.
#[test]
fn heal_and_finetune_bad_flags() {
    let dir = scratch("heal_flags");
    let model = dir.join("m.gguf");
    std::fs::write(&model, small_valid_header()).unwrap();
    let m = model.to_str().unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    for (args, says) in [
        (vec!["heal", "--model", m, "--out", o], "needs something to heal"),
        (vec!["heal", "--model", m, "--quant", "q4_0", "--out", o, "--resume", "--force"], "exclude each other"),
        (vec!["finetune", "--model", m, "--data", "none.jsonl", "--out", o, "--rank", "0"], "--rank 0"),
        (
            vec!["finetune", "--model", m, "--data", "none.jsonl", "--out", o, "--targets", "lm_head"],
            "unknown target module",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(!out.exists(), "a refused run created its --out");
}

/// `serve` refuses bad limits and keys before it loads anything or listens, and exits 1.
#[test]
fn serve_refuses_bad_limits_and_keys() {
    let dir = scratch("serve_flags");
    let empty_key = dir.join("key");
    std::fs::write(&empty_key, "\n").unwrap();
    let k = empty_key.to_str().unwrap();
    let missing = dir.join("no-bundle");
    let b = missing.to_str().unwrap();
    for (args, says) in [
        (vec!["serve", "--bundle", b, "--read-timeout", "0"], "--read-timeout must be"),
        (vec!["serve", "--bundle", b, "--write-timeout", "nan"], "--write-timeout must be"),
        (vec!["serve", "--bundle", b, "--queue-timeout=-1"], "--queue-timeout must be"),
        (vec!["serve", "--bundle", b, "--max-connections", "0"], "--max-connections must be"),
        (vec!["serve", "--bundle", b, "--max-sessions", "0"], "--max-sessions must be"),
        (vec!["serve", "--bundle", b, "--api-key-file", k], "the API key is empty"),
        (vec!["serve", "--bundle", b, "--api-key", "two words"], "spaces or control characters"),
        (vec!["serve", "--bundle", b, "--api-key-file", "/nonexistent/key"], "cannot read the API key file"),
        (vec!["serve", "--bundle", b, "--addr", "127.0.0.1:0"], "not a kiln bundle"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
