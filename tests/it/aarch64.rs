//! The aarch64 target, run under qemu-user: kernels against the interpreter (on a generic
//! ARMv8.0 core and a dotprod phone profile), the real model against the x86-64 build and the
//! burn reference, and disassembly snapshots of the key kernels for both targets.
//!
//! Needs `aarch64-linux-gnu-gcc`, `qemu-aarch64-static` and the Rust target
//! `aarch64-unknown-linux-gnu`; `.ci/run` installs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use compiler::bundle::{build_model, BuildOptions, WeightsPlacement};
use compiler::{compile, CompileOptions};
use ir::interp::{self, KvCache, Tensor};
use ir::parse::parse_graph;
use ir::{DType, Graph, QuantFormat};
use tests::harness::{argmax, max_diff, random_weights, scratch_dir, special_f16_scale_matrix, Rng};

use crate::reference::{model, model_path};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";

fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kiln-tests/apps")
}

fn exec_graph() -> &'static workflow::App {
    static APP: OnceLock<workflow::App> = OnceLock::new();
    APP.get_or_init(|| workflow::runner::build_exec_graph(TRIPLE, &apps_dir()).unwrap_or_else(|e| panic!("{e:#}")))
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Compiles `text` for aarch64 on `device`, runs it under qemu for calls of `seqs` rows and
/// compares every call's output with the interpreter. Returns the largest relative error.
/// A graph whose input is `i32[seq]` (token ids, for `embed`) gets ids in range and out of
/// range (negative, past the table, `i32::MAX`/`MIN`) and must match exactly.
fn check_graph(name: &str, text: &str, seqs: &[usize], seed: u64, device: &str) -> f32 {
    let graph = parse_graph(text).unwrap();
    let mut rng = Rng::new(seed);
    let weights = random_weights(&graph, &mut rng, 1.0);
    check_graph_with(name, text, weights, seqs, &mut rng, device)
}

/// [`check_graph`] with the given weights.
fn check_graph_with(name: &str, text: &str, weights: Vec<Vec<u8>>, seqs: &[usize], rng: &mut Rng, device: &str) -> f32 {
    let graph = parse_graph(text).unwrap();
    let dir = scratch_dir(&format!("aarch64/{name}_{device}"));
    let target = targets::lookup_device(TRIPLE, Some(device)).unwrap();
    let compiled =
        compile(graph.clone(), &weights, target.as_ref(), &CompileOptions { batch: 8, ..Default::default() }).unwrap();
    let (obj, so) = (dir.join("model.o"), dir.join("model.so"));
    std::fs::write(&obj, &compiled.object).unwrap();
    let status = Command::new(workflow::runner::c_compiler(TRIPLE))
        .arg("-shared")
        .arg("-o")
        .arg(&so)
        .arg(&obj)
        .status()
        .unwrap();
    assert!(status.success(), "linking the aarch64 object failed");

    let final_graph: Graph = parse_graph(&compiled.final_ir).unwrap();
    let total: usize = seqs.iter().sum();
    let ids_input = graph.nodes[0].ty.dtype == DType::I32;
    let (width, inputs): (usize, Vec<Tensor>) = if ids_input {
        let rows = graph.weights[0].shape[0] as i32;
        let edge = [rows - 1, 0, -1, rows, i32::MAX, i32::MIN, rows + 3];
        let ids: Vec<i32> =
            (0..total)
                .map(|t| {
                    if t < edge.len() || rng.below(6) == 0 {
                        edge[t % edge.len()]
                    } else {
                        rng.below(rows as u64) as i32
                    }
                })
                .collect();
        let mut at = 0;
        (
            1,
            seqs.iter()
                .map(|&s| {
                    at += s;
                    Tensor::I32(ids[at - s..at].to_vec())
                })
                .collect(),
        )
    } else {
        let width = graph.nodes[0].ty.row_len().unwrap() as usize;
        let x = rng.vec(total * width, 2.0);
        let mut at = 0;
        (
            width,
            seqs.iter()
                .map(|&s| {
                    at += s * width;
                    Tensor::F32(x[at - s * width..at].to_vec())
                })
                .collect(),
        )
    };
    let bytes: Vec<u8> = inputs
        .iter()
        .flat_map(|t| match t {
            Tensor::I32(v) => v.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>(),
            Tensor::F32(v) => f32_bytes(v),
        })
        .collect();
    assert_eq!(bytes.len(), total * width * 4);
    std::fs::write(dir.join("in.bin"), bytes).unwrap();
    let seq_arg: Vec<String> = seqs.iter().map(|s| s.to_string()).collect();
    let out = exec_graph()
        .command()
        .arg(&so)
        .arg(dir.join("in.bin"))
        .arg(dir.join("out.f32"))
        .arg(seq_arg.join(","))
        .output()
        .unwrap();
    assert!(out.status.success(), "{name}: exec_graph failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<f32> = std::fs::read(dir.join("out.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();

    let w: Vec<&[u8]> = weights.iter().map(|w| w.as_slice()).collect();
    let mut cache = KvCache::new(&final_graph);
    let (mut pos, mut out_at) = (0, 0);
    let out_w = graph.ty(graph.outputs[0]).row_len().unwrap() as usize;
    assert_eq!(got.len(), total * out_w, "{name}: output length");
    let mut worst = 0.0f32;
    for (&seq, input) in seqs.iter().zip(inputs) {
        let want = interp::run(&final_graph, &w, &[input], &mut cache, seq, pos);
        let got = &got[out_at..out_at + seq * out_w];
        if ids_input {
            // Exact (`==`: +0 equals -0; see kernels.rs, embed_kernels_match_the_interpreter_exactly).
            let bad = (0..got.len()).filter(|&i| got[i] != want[0][i]).count();
            assert_eq!(bad, 0, "{name} on {device}: seq {seq}: {bad} values differ from the interpreter");
        } else {
            let (diff, scale) = max_diff(got, &want[0]);
            let rel = diff / scale.max(1.0);
            assert!(rel <= 1e-4, "{name} on {device}: seq {seq}: max diff {diff} (scale {scale})");
            worst = worst.max(rel);
        }
        pos += seq;
        out_at += seq * out_w;
    }
    worst
}

/// One row length per format: odd for the float formats, 3 blocks for the 32-value block
/// formats, one super-block for the K-quants, 3 groups for the 64-value formats.
fn aarch64_cols(format: QuantFormat) -> u32 {
    match format.block_values() {
        1 => 67,
        256 => 256,
        64 => 192,
        _ => 96,
    }
}

#[test]
fn aarch64_kernels_match_the_interpreter_under_qemu() {
    let mut worst = 0.0f32;
    for device in ["generic-armv8.0", "snapdragon-865"] {
        for (i, format) in QuantFormat::ALL.into_iter().enumerate() {
            let cols = aarch64_cols(format);
            for (rows, epilogue) in [(13u32, "silu"), (64, "add"), (7, "none")] {
                let f = format.name();
                let text = match epilogue {
                    "add" => format!(
                        "graph \"mm\" context=64\nw0 = weight {f}[{rows}, {cols}] \"a\"\nw1 = weight {f}[{rows}, {cols}] \"b\"\nv0 = input 0 : f32[seq, {cols}]\nv1 = matmul v0, w1 : f32[seq, {rows}]\nv2 = matmul v0, w0 +add v1 : f32[seq, {rows}]\noutput v2\n"
                    ),
                    "silu" => format!("graph \"mm\" context=64\nw0 = weight {f}[{rows}, {cols}] \"a\"\nv0 = input 0 : f32[seq, {cols}]\nv1 = matmul v0, w0 +silu : f32[seq, {rows}]\noutput v1\n"),
                    _ => format!("graph \"mm\" context=64\nw0 = weight {f}[{rows}, {cols}] \"a\"\nv0 = input 0 : f32[seq, {cols}]\nv1 = matmul v0, w0 : f32[seq, {rows}]\noutput v1\n"),
                };
                worst = worst.max(check_graph(
                    &format!("mm_{f}_{rows}_{epilogue}"),
                    &text,
                    &[1, 5, 3],
                    i as u64 + rows as u64,
                    device,
                ));
            }
        }
        // The embedding in every table layout (f32 rows, Q4 and Q8 groups), partial 4-row groups.
        for (i, format) in QuantFormat::ALL.into_iter().enumerate() {
            let f = format.name();
            let cols = aarch64_cols(format);
            for rows in [6u32, 13] {
                let text = format!(
                    "graph \"embed\" context=64\nw0 = weight {f}[{rows}, {cols}] \"table\"\nv0 = input 0 : i32[seq]\nv1 = embed v0, w0 : f32[seq, {cols}]\nv2 = add v1, v1 : f32[seq, {cols}]\noutput v2\n"
                );
                check_graph(&format!("embed_{f}_{rows}"), &text, &[8, 1, 4], 50 + i as u64 + rows as u64, device);
            }
        }
        let block = r#"graph "block" context=64
w0 = weight f32[64] "norm"
w1 = weight q4_1[64, 64] "q"
w2 = weight q8_0[32, 64] "k"
w3 = weight q4_0[32, 64] "v"
v0 = input 0 : f32[seq, 64]
v1 = rms_norm v0, w0 eps=0.00001 : f32[seq, 64]
v2 = matmul v1, w1 : f32[seq, 64]
v3 = matmul v1, w2 : f32[seq, 32]
v4 = matmul v1, w3 : f32[seq, 32]
v5 = rope v2 head_dim=16 theta=10000 : f32[seq, 64]
v6 = rope v3 head_dim=16 theta=10000 : f32[seq, 32]
v7 = attention v5, v6, v4 layer=0 heads=4 kv_heads=2 head_dim=16 : f32[seq, 64]
v8 = silu v7 : f32[seq, 64]
v9 = mul v8, v0 : f32[seq, 64]
v10 = add v9, v1 : f32[seq, 64]
output v10
"#;
        worst = worst.max(check_graph("block", block, &[5, 1, 1, 8], 3, device));
        // The q8 activation grid: wider activation blocks for every kernel.
        let q8_block = block.replace("context=64", "context=64 act=q8");
        worst = worst.max(check_graph("block-q8-act", &q8_block, &[5, 1, 1, 8], 6, device));
        // An f16 KV cache, and a head size off the 256-bit kernels (the portable code).
        let f16_block = block.replace("context=64", "context=64 kv=f16");
        worst = worst.max(check_graph("block-f16-kv", &f16_block, &[5, 1, 1, 8], 4, device));
        let odd_heads =
            f16_block.replace("head_dim=16", "head_dim=8").replace("heads=4 kv_heads=2", "heads=8 kv_heads=4");
        worst = worst.max(check_graph("block-f16-kv-hd8", &odd_heads, &[5, 1, 1, 8], 5, device));
        // f16 scales of every kind (subnormals, zeros, the largest finite), widened exactly:
        // the embedding is compared exactly, the matmul to the usual tolerance.
        let mut rng = Rng::new(11);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_1, QuantFormat::Q4_0] {
            let f = format.name();
            let table = special_f16_scale_matrix(format, 13, 64, &mut rng);
            let text = format!(
                "graph \"embed\" context=64\nw0 = weight {f}[13, 64] \"table\"\nv0 = input 0 : i32[seq]\nv1 = embed v0, w0 : f32[seq, 64]\noutput v1\n"
            );
            check_graph_with(&format!("embed_f16_{f}"), &text, vec![table.clone()], &[8, 3], &mut rng, device);
            let text = format!(
                "graph \"mm\" context=64\nw0 = weight {f}[13, 64] \"a\"\nv0 = input 0 : f32[seq, 64]\nv1 = matmul v0, w0 : f32[seq, 13]\noutput v1\n"
            );
            worst = worst.max(check_graph_with(&format!("mm_f16_{f}"), &text, vec![table], &[1, 5], &mut rng, device));
        }
    }
    eprintln!("aarch64 kernels: largest error {worst:.2e} of the output scale");
}

fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn aarch64_model_matches_x86_64_and_the_reference_under_qemu() {
    let dir = scratch_dir("aarch64/smollm");
    let bundle = dir.join("bundle");
    let opts = BuildOptions {
        device: Some("snapdragon-865".into()),
        context: Some(512),
        batch: 16,
        shared_linker: Some("aarch64-linux-gnu-gcc".into()),
        ..BuildOptions::new(model_path(), TRIPLE, bundle.clone())
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let runner = workflow::build_runner(TRIPLE, &apps_dir()).unwrap_or_else(|e| panic!("{e:#}"));

    // The chat-formatted Paris question, tokenized by the x86-64 session.
    let x86 = crate::model::session_ids("What is the capital of France?");
    let (ids, x86_logits, x86_reply) = (x86.0, x86.1, x86.2);
    let ids_arg: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
    let npy = dir.join("logits.npy");
    // The runner, which opens the bundle's shared library, evaluates the tokens ...
    let out = runner
        .command()
        .args(["run", "--bundle"])
        .arg(&bundle)
        .args(["--tokens", &ids_arg.join(","), "--dump-logits"])
        .arg(&npy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = read_npy(&npy);
    let vocab = got.len() / ids.len();
    let want = model().forward(&ids).unwrap().logits;
    let (diff_x86, _) = max_diff(&got, &x86_logits);
    let (diff_ref, _) = max_diff(&got, &want);
    let top1_equal = got.chunks(vocab).zip(want.chunks(vocab)).filter(|(g, w)| argmax(g) == argmax(w)).count();
    eprintln!(
        "aarch64 vs x86-64: max |logit diff| {diff_x86:.2e}; vs reference: {diff_ref:.4}; top-1 equal to the reference at {top1_equal}/{} positions",
        ids.len()
    );
    assert_eq!(top1_equal, ids.len());
    assert!(diff_ref <= 0.05, "aarch64 logits differ from the reference by {diff_ref}");
    assert!(diff_x86 <= 0.01, "aarch64 logits differ from x86-64 by {diff_x86}");

    // ... and the example app with the static library linked in answers the question.
    let app = workflow::runner::build_rust_chat(&bundle, Some(&apps_dir())).unwrap_or_else(|e| panic!("{e:#}"));
    let out = app.command().arg(&bundle).args(["What is the capital of France?", "48"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("aarch64 reply: {reply:?}");
    assert_eq!(reply, x86_reply.trim(), "aarch64 and x86-64 greedy replies differ");
    assert!(reply.contains("Paris"));
}

/// Disassembles the kernels of a small graph for `triple` and compares them with the
/// committed snapshot; `BLESS=1` rewrites it.
fn check_disassembly(triple: &str, device: Option<&str>, objdump: &str) {
    let text = r#"graph "snapshot" context=64
w0 = weight f32[64] "norm"
w1 = weight q4_1[64, 64] "q4"
w2 = weight q8_0[64, 64] "q8"
v0 = input 0 : f32[seq, 64]
v1 = rms_norm v0, w0 eps=0.00001 : f32[seq, 64]
v2 = matmul v1, w1 +silu : f32[seq, 64]
v3 = matmul v1, w2 +mul v2 : f32[seq, 64]
v4 = rope v3 head_dim=16 theta=10000 : f32[seq, 64]
v5 = attention v4, v4, v4 layer=0 heads=4 kv_heads=4 head_dim=16 : f32[seq, 64]
output v5
"#;
    let graph = parse_graph(text).unwrap();
    let weights = random_weights(&graph, &mut Rng::new(5), 1.0);
    let target = targets::lookup_device(triple, device).unwrap();
    let compiled = compile(
        graph,
        &weights,
        target.as_ref(),
        &CompileOptions { batch: 8, embed_weights: false, ..Default::default() },
    )
    .unwrap();
    let dir = scratch_dir(&format!("disasm/{triple}"));
    let obj = dir.join("k.o");
    std::fs::write(&obj, &compiled.object).unwrap();
    let out = Command::new(objdump).args(["-d", "--no-show-raw-insn", "--no-addresses"]).arg(&obj).output().unwrap();
    assert!(out.status.success(), "{objdump} failed");
    let listing: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| !l.contains("Disassembly"))
        .map(|l| l.trim_end().to_string() + "\n")
        .collect();
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("snapshots/kernels-{triple}.s"));
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&snapshot, &listing).unwrap();
    }
    let expected = std::fs::read_to_string(&snapshot).unwrap_or_default();
    assert!(
        listing == expected,
        "the generated code for {triple} changed; inspect and run with BLESS=1 to accept:\n{}",
        diff_summary(&expected, &listing)
    );
}

fn diff_summary(old: &str, new: &str) -> String {
    let (o, n): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let first = o.iter().zip(&n).position(|(a, b)| a != b).unwrap_or(o.len().min(n.len()));
    format!(
        "{} lines before, {} now; first difference at line {}:\n- {:?}\n+ {:?}",
        o.len(),
        n.len(),
        first + 1,
        o.get(first),
        n.get(first)
    )
}

#[test]
fn kernel_disassembly_matches_the_snapshots() {
    check_disassembly("x86_64-unknown-linux-gnu", None, "objdump");
    check_disassembly(TRIPLE, Some("snapdragon-865"), "aarch64-linux-gnu-objdump");
}

#[test]
fn android_bundle_holds_aarch64_code_and_the_runtime_builds_for_android() {
    let dir = scratch_dir("aarch64/android");
    let bundle = dir.join("bundle");
    let opts = BuildOptions {
        device: Some("snapdragon-865".into()),
        context: Some(1024),
        batch: 64,
        weights: WeightsPlacement::File,
        ..BuildOptions::new(model_path(), "aarch64-linux-android", bundle.clone())
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let archive = std::fs::read(bundle.join("lib/libkiln_model.a")).unwrap();
    assert_eq!(&archive[..8], b"!<arch>\n");
    let elf = archive.windows(4).position(|w| w == b"\x7fELF").expect("an ELF member");
    let e_machine = u16::from_le_bytes([archive[elf + 18], archive[elf + 19]]);
    assert_eq!(e_machine, 183, "EM_AARCH64");
    let manifest = std::fs::read_to_string(bundle.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"aarch64-linux-android\"") && manifest.contains("dotprod"), "{manifest}");
    let err = workflow::runner::build_rust_chat(&bundle, Some(&apps_dir()))
        .err()
        .expect("an Android bundle cannot run here")
        .to_string();
    assert!(err.contains("runs on Android"), "{err}");

    // The runtime as a static library for Android: no linker (and no NDK) needed.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "runtime",
            "--lib",
            "--target",
            "aarch64-linux-android",
            "--target-dir",
        ])
        .arg(apps_dir())
        .current_dir(workflow::root())
        .status()
        .unwrap();
    assert!(status.success(), "building the runtime for aarch64-linux-android failed");
    assert!(apps_dir().join("aarch64-linux-android/release/libruntime.a").exists());
}
