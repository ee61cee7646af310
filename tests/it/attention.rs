//! Attention over long contexts: keys are processed in tiles of `KEY_TILE` with an online
//! softmax, so results across several tiles must still match the interpreter, and the stack
//! a kernel needs must not grow with the context (a C host thread may have a small stack).
//!
//! Tolerance as in `kernels.rs`: 1e-4 of the largest output magnitude (f32 sums in another
//! order than the interpreter's f64; the online softmax adds one rescaling per tile).

use std::process::Command;

use compiler::CompileOptions;
use ir::interp::{self, KvCache, Tensor};
use ir::parse::parse_graph;
use ir::{Graph, KvDType};
use runtime::program::{Input, Program};
use tests::harness::{compile_to_shared, max_diff, random_weights, scratch_dir, Rng};

const REL_TOL: f32 = 1e-4;

/// q: 4 heads of 16, k/v: 2 heads, straight from the input (rope on q and k).
fn attention_graph(context: u32) -> String {
    shaped_graph(context, 4, 2, 16)
}

/// q: `heads` heads of `head_dim` straight from the input, k and v: `kv_heads` heads from
/// projections of it (rope on q and k).
fn shaped_graph(context: u32, heads: u32, kv_heads: u32, head_dim: u32) -> String {
    let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
    format!(
        r#"graph "attn" context={context} kv=f32
w0 = weight f32[{kvw}, {qw}] "k"
w1 = weight f32[{kvw}, {qw}] "v"
v0 = input 0 : f32[seq, {qw}]
v1 = matmul v0, w0 : f32[seq, {kvw}]
v2 = matmul v0, w1 : f32[seq, {kvw}]
v3 = rope v0 head_dim={head_dim} theta=10000 : f32[seq, {qw}]
v4 = rope v1 head_dim={head_dim} theta=10000 : f32[seq, {kvw}]
v5 = attention v3, v4, v2 layer=0 heads={heads} kv_heads={kv_heads} head_dim={head_dim} : f32[seq, {qw}]
output v5
"#
    )
}

/// Runs calls of `seqs` rows starting at `start` on the compiled graph and the interpreter
/// (whose cache, like the runtime's, starts zeroed) and compares every output.
fn compare(name: &str, context: u32, batch: u32, start: usize, seqs: &[usize], threads: &[usize]) {
    compare_graph(name, &attention_graph(context), batch, start, seqs, threads)
}

fn compare_graph(name: &str, text: &str, batch: u32, start: usize, seqs: &[usize], threads: &[usize]) {
    let graph = parse_graph(text).unwrap();
    let width = graph.ty(*graph.outputs.first().unwrap()).row_len().unwrap() as usize;
    let mut rng = Rng::new(17);
    let weights = random_weights(&graph, &mut rng, 1.0);
    let dir = scratch_dir(name);
    let (compiled, so) = compile_to_shared(&graph, &weights, &CompileOptions { batch, ..Default::default() }, &dir);
    let final_graph: Graph = parse_graph(&compiled.final_ir).unwrap();
    let weight_refs: Vec<&[u8]> = weights.iter().map(|w| w.as_slice()).collect();
    for &n_threads in threads {
        let mut program = Program::load_shared(&so, None, n_threads).unwrap();
        let mut cache = KvCache::new(&final_graph);
        let mut pos = start;
        for &seq in seqs {
            let x = rng.vec(seq * width, 2.0);
            let mut got = vec![0.0f32; seq * width];
            program.run(&[Input::F32(&x)], &mut [&mut got], seq, pos, 0).unwrap();
            let want = interp::run(&final_graph, &weight_refs, &[Tensor::F32(x)], &mut cache, seq, pos);
            let (diff, scale) = max_diff(&got, &want[0]);
            assert!(
                diff <= REL_TOL * scale.max(1.0),
                "{name}: {seq} rows at {pos}, {n_threads} threads: max diff {diff} (scale {scale})"
            );
            pos += seq;
        }
    }
}

/// Units take up to three query heads of a KV head together (one head when there are few
/// units, as in generation), and x86-64 runs head sizes that are multiples of 8 on its
/// 256-bit kernels: group sizes 1 to 5 (5 = a chunk of 3 and one of 2), head sizes on and off
/// those kernels, batches of 1 row (the one-head units) and of many, 1 to 3 threads.
#[test]
fn attention_of_every_group_size_matches_the_interpreter() {
    for (heads, kv_heads, head_dim) in [(3, 3, 8), (6, 2, 16), (8, 2, 24), (5, 1, 64), (4, 1, 12), (6, 2, 20)] {
        let name = format!("attention-h{heads}-kv{kv_heads}-d{head_dim}");
        let text = shaped_graph(64, heads, kv_heads, head_dim);
        compare_graph(&name, &text, 16, 0, &[13, 1, 1, 7, 16, 2], &[1, 2, 3]);
        // The same with an f16 cache: the interpreter rounds keys and values as it stores them.
        let text = text.replace("kv=f32", "kv=f16");
        compare_graph(&format!("{name}-f16"), &text, 16, 0, &[13, 1, 1, 7, 16, 2], &[1, 2]);
    }
}

/// An f16 cache holds each key and value rounded to nearest even (subnormals, ties, the
/// largest finite value), saturating at +-65504 for larger values, infinities and NaN, bit
/// for bit as `ir::KvDType::round`.
#[test]
fn f16_cache_rounds_keys_and_values_to_nearest_even() {
    let text = "graph \"kv\" context=8 kv=f16\nv0 = input 0 : f32[seq, 16]\nv1 = attention v0, v0, v0 layer=0 heads=1 kv_heads=1 head_dim=16 : f32[seq, 16]\noutput v1\n";
    let graph = parse_graph(text).unwrap();
    let dir = scratch_dir("attention-f16-rounding");
    let (_, so) = compile_to_shared(&graph, &[], &CompileOptions { batch: 8, ..Default::default() }, &dir);
    let tiny = 2f32.powi(-24);
    let mut special = vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        2f32.powi(-14),
        2f32.powi(-14) - tiny / 2.0,
        tiny,
        tiny / 2.0,
        1.5 * tiny,
        2.5 * tiny,
        -3.5 * tiny,
        tiny / 4.0,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1e-30,
        f32::MAX,
        f32::MIN_POSITIVE,
    ];
    let mut rng = Rng::new(99);
    while special.len() < 8 * 16 {
        let bits = rng.next_u64() as u32;
        // Exponents around f16's range, both signs.
        let x = f32::from_bits((bits & 0x807f_ffff) | ((100 + (bits >> 23) % 60) << 23));
        special.push(x);
    }
    let mut program = Program::load_shared(&so, None, 2).unwrap();
    let mut out = vec![0.0f32; 8 * 16];
    program.run(&[Input::F32(&special)], &mut [&mut out], 8, 0, 0).unwrap();
    let cache = program.kv_cache();
    for (i, &x) in special.iter().enumerate() {
        let want = half::f16::from_f32(KvDType::F16.round(x)).to_bits();
        for (what, base) in [("key", 0), ("value", 8 * 16 * 2)] {
            let got = u16::from_le_bytes([cache[base + 2 * i], cache[base + 2 * i + 1]]);
            assert_eq!(got, want, "{what} {i}: {x:e} ({:#010x}) stored as {got:#06x}, not {want:#06x}", x.to_bits());
        }
    }
}

#[test]
fn attention_across_several_key_tiles_matches_the_interpreter() {
    let tile = compiler::codegen::attention_key_tile() as usize;
    // Rows whose keys end inside the first tile, exactly at tile boundaries, and two tiles on.
    let seqs = [tile - 3, 2, 1, 1, 64, tile - 64 - 1, 3, 5];
    assert!(seqs.iter().sum::<usize>() > 2 * tile);
    compare("attention-tiles", 3 * tile as u32, tile as u32, 0, &seqs, &[1, 2]);
}

/// The work of `attention_runs_on_a_thread_with_a_small_stack`, run by it in a child process
/// (a stack overflow kills the whole process, so the parent must survive to report it).
#[test]
#[ignore = "run in a child process by attention_runs_on_a_thread_with_a_small_stack"]
fn small_stack_child() {
    // Context 65536: the old kernel kept 65540 scores (256 KiB) on the stack.
    let context = 65536;
    std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || compare("attention-small-stack", context, 4, context as usize - 6, &[3, 1, 2], &[1]))
        .unwrap()
        .join()
        .expect("attention on a 128 KiB stack failed");
}

#[test]
fn attention_runs_on_a_thread_with_a_small_stack() {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--ignored", "--exact", "attention::small_stack_child", "--nocapture", "--test-threads=1"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the child failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "the child did not run the test:\n{stdout}");
}

/// Outputs hold only rows `out_start..n_tokens`. Here output 0 is the attention result (its
/// kernel starts at out_start), output 1 a key projection that attention also needs in every
/// row (kept in the arena and copied out), output 2 the same value again and output 3 the
/// input itself (both copied): every output equals those rows of the interpreter's, and the
/// guard rows around each buffer stay untouched.
#[test]
fn outputs_needed_in_every_row_are_copied_out() {
    let text = attention_graph(16).replace("output v5\n", "output v5\noutput v1\noutput v1\noutput v0\n");
    let graph = parse_graph(&text).unwrap();
    let mut rng = Rng::new(23);
    let weights = random_weights(&graph, &mut rng, 1.0);
    let dir = scratch_dir("attn-out-rows");
    let (compiled, so) = compile_to_shared(&graph, &weights, &CompileOptions { batch: 8, ..Default::default() }, &dir);
    let final_graph: Graph = parse_graph(&compiled.final_ir).unwrap();
    let weight_refs: Vec<&[u8]> = weights.iter().map(|w| w.as_slice()).collect();
    let widths = [64usize, 32, 32, 64];
    for out_start in [0, 1, 4, 5, 6] {
        let seq = 6;
        let rows = seq - out_start;
        let x = rng.vec(seq * 64, 2.0);
        let mut bufs: Vec<Vec<f32>> = widths.iter().map(|w| vec![f32::NAN; (rows + 2) * w]).collect();
        let mut program = Program::load_shared(&so, None, 2).unwrap();
        {
            let mut outs: Vec<&mut [f32]> =
                bufs.iter_mut().zip(widths).map(|(b, w)| &mut b[w..(rows + 1) * w]).collect();
            program.run(&[Input::F32(&x)], &mut outs, seq, 0, out_start).unwrap();
        }
        let want = interp::run(&final_graph, &weight_refs, &[Tensor::F32(x)], &mut KvCache::new(&final_graph), seq, 0);
        for (k, (buf, w)) in bufs.iter().zip(widths).enumerate() {
            let guards = buf[..w].iter().chain(&buf[(rows + 1) * w..]);
            assert!(
                guards.into_iter().all(|v| v.is_nan()),
                "output {k}, out_start {out_start}: a guard row was written"
            );
            let (diff, scale) = max_diff(&buf[w..(rows + 1) * w], &want[k][out_start * w..]);
            assert!(diff <= REL_TOL * scale.max(1.0), "output {k}, out_start {out_start}: max diff {diff}");
        }
    }
}
