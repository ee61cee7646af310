//! Differential tests of the generated kernels: every compiled graph is run through the
//! runtime and compared with the scalar IR interpreter on random inputs, with odd sizes
//! (rows not a multiple of the 4-row groups, rows of f32 matrices not a multiple of 4).
//!
//! Tolerance: the interpreter evaluates the graph *after* the pipeline, so both sides use the
//! same q16 activation integers; what remains is f32 rounding in a different order (the
//! interpreter accumulates in f64), bounded by 1e-4 of the largest output magnitude.

use compiler::CompileOptions;
use ir::interp::{self, KvCache, Tensor};
use ir::parse::parse_graph;
use ir::{Graph, QuantFormat};
use runtime::program::{Input, Program};
use tests::harness::{
    compile_to_shared, kernel_test_cols, max_diff, random_weights, scratch_dir, special_f16_scale_matrix, Rng,
};

const REL_TOL: f32 = 1e-4;

fn run_both(name: &str, text: &str, seqs: &[usize], seed: u64) {
    let graph = parse_graph(text).unwrap();
    let mut rng = Rng::new(seed);
    let weights = random_weights(&graph, &mut rng, 1.0);
    let width = graph.nodes[0].ty.row_len().unwrap() as usize;
    let inputs: Vec<Vec<f32>> = seqs.iter().map(|&seq| rng.vec(seq * width, 2.0)).collect();
    run_with(name, text, &weights, &inputs);
}

/// [`run_both`] with the given weights and one input per call (`seq` rows each).
fn run_with(name: &str, text: &str, weights: &[Vec<u8>], inputs: &[Vec<f32>]) {
    let graph = parse_graph(text).unwrap();
    let dir = scratch_dir(name);
    let opts = CompileOptions { batch: 8, ..Default::default() };
    let (compiled, so) = compile_to_shared(&graph, weights, &opts, &dir);
    let final_graph: Graph = parse_graph(&compiled.final_ir).unwrap();
    let width = graph.nodes[0].ty.row_len().unwrap() as usize;
    for threads in [1, 2, 3] {
        let mut program = Program::load_shared(&so, None, threads).unwrap();
        let mut cache = KvCache::new(&final_graph);
        let mut pos = 0;
        for x in inputs {
            let seq = x.len() / width;
            let x = x.clone();
            let out_width = graph.ty(graph.outputs[0]).row_len().unwrap() as usize;
            let mut got = vec![0.0f32; seq * out_width];
            program.run(&[Input::F32(&x)], &mut [&mut got], seq, pos, 0).unwrap();
            let want = interp::run(
                &final_graph,
                &weights.iter().map(|w| w.as_slice()).collect::<Vec<_>>(),
                &[Tensor::F32(x)],
                &mut cache,
                seq,
                pos,
            );
            let (diff, scale) = max_diff(&got, &want[0]);
            assert!(
                diff <= REL_TOL * scale.max(1.0),
                "{name}: seq {seq} threads {threads}: max diff {diff} (scale {scale})"
            );
            pos += seq;
        }
    }
}

fn matmul_graph(format: QuantFormat, rows: u32, cols: u32, epilogue: &str) -> String {
    let mut text = format!(
        "graph \"mm\" context=64\nw0 = weight {}[{rows}, {cols}] \"w\"\nv0 = input 0 : f32[seq, {cols}]\n",
        format.name()
    );
    match epilogue {
        "add" | "mul" => {
            text += &format!("w1 = weight {}[{rows}, {cols}] \"w2\"\n", format.name());
            // Reorder: weights first.
            let mut lines: Vec<&str> = text.lines().collect();
            lines.swap(2, 3);
            text = lines.join("\n") + "\n";
            text += &format!("v1 = matmul v0, w1 : f32[seq, {rows}]\nv2 = matmul v0, w0 +{epilogue} v1 : f32[seq, {rows}]\noutput v2\n");
        }
        "silu" => text += &format!("v1 = matmul v0, w0 +silu : f32[seq, {rows}]\noutput v1\n"),
        _ => text += &format!("v1 = matmul v0, w0 : f32[seq, {rows}]\noutput v1\n"),
    }
    text
}

#[test]
fn matmul_kernels_match_the_interpreter() {
    let mut seed = 1;
    for format in QuantFormat::ALL {
        for &cols in kernel_test_cols(format) {
            for rows in [1, 4, 7, 13, 64] {
                for epilogue in ["none", "silu", "add", "mul"] {
                    let text = matmul_graph(format, rows, cols, epilogue);
                    let name = format!("mm_{}_{rows}x{cols}_{epilogue}", format.name());
                    // 1, 4 + 1, 3 and 4 + 2 rows: every tile height of the micro-kernels.
                    run_both(&name, &text, &[1, 5, 3, 6], seed);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
fn norm_rope_and_elementwise_kernels_match_the_interpreter() {
    for n in [37u32, 64, 96] {
        let text = format!(
            "graph \"rows\" context=64\nw0 = weight f32[{n}] \"norm\"\nv0 = input 0 : f32[seq, {n}]\nv1 = rms_norm v0, w0 eps=0.00001 : f32[seq, {n}]\nv2 = silu v1 : f32[seq, {n}]\nv3 = mul v2, v0 : f32[seq, {n}]\nv4 = add v3, v1 : f32[seq, {n}]\noutput v4\n"
        );
        run_both(&format!("rows_{n}"), &text, &[3, 1, 2], n as u64);
    }
    for (n, hd) in [(64u32, 16u32), (96, 32), (24, 8)] {
        let text = format!(
            "graph \"rope\" context=64\nv0 = input 0 : f32[seq, {n}]\nv1 = rope v0 head_dim={hd} theta=10000 : f32[seq, {n}]\noutput v1\n"
        );
        run_both(&format!("rope_{n}_{hd}"), &text, &[5, 1, 7], hd as u64);
    }
    // Scaled rotary tables (Llama 3.1's, linear, per-pair divisors) against the interpreter.
    for (i, scaling) in [
        "scaling=llama3 factor=8 low_freq_factor=1 high_freq_factor=4 original_context=32",
        "scaling=linear factor=4",
        "scaling=divisors [1, 1.5, 3, 8, 8, 8, 8, 8]",
    ]
    .iter()
    .enumerate()
    {
        let text = format!(
            "graph \"rope\" context=64\nv0 = input 0 : f32[seq, 64]\nv1 = rope v0 head_dim=16 theta=10000 {scaling} : f32[seq, 64]\noutput v1\n"
        );
        run_both(&format!("rope_scaled_{i}"), &text, &[5, 1, 7, 8, 8, 8], 16);
    }
}

#[test]
fn quantized_norm_feeds_a_matmul() {
    for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
        let text = format!(
            "graph \"nq\" context=64\nw0 = weight f32[96] \"norm\"\nw1 = weight {}[13, 96] \"w\"\nv0 = input 0 : f32[seq, 96]\nv1 = rms_norm v0, w0 eps=0.00001 : f32[seq, 96]\nv2 = matmul v1, w1 : f32[seq, 13]\noutput v2\n",
            format.name()
        );
        run_both(&format!("nq_{}", format.name()), &text, &[4, 1], 7);
    }
}

/// On the q8 activation grid (`act=q8`) the Q4, Q5 and K32 forms take the 8-bit micro-kernels
/// (4-byte chunks, `vpmaddubsw` on x86-64) and every other form reads the wider activation blocks:
/// each against the interpreter, every tile height, partial row groups, epilogues.
#[test]
fn matmul_kernels_on_the_q8_grid_match_the_interpreter() {
    let mut seed = 500;
    for format in [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q4_K,
        QuantFormat::Q5_0,
        QuantFormat::Q5_K,
        QuantFormat::Q8_0,
        QuantFormat::Q6_K,
        QuantFormat::F16,
    ] {
        for &cols in kernel_test_cols(format) {
            for rows in [1, 7, 13, 64] {
                for epilogue in ["none", "add"] {
                    let text = matmul_graph(format, rows, cols, epilogue).replace("context=64", "context=64 act=q8");
                    let name = format!("mm_q8act_{}_{rows}x{cols}_{epilogue}", format.name());
                    run_both(&name, &text, &[1, 5, 3, 6], seed);
                    seed += 1;
                }
            }
        }
    }
}

/// The 8-bit path sums a block's nibble-by-int8 products in int16 before widening them: the
/// largest products it can meet (nibbles of 15, activations of +-127 throughout) must still
/// come out exactly.
#[test]
fn q8_grid_extremes_do_not_overflow() {
    let (rows, cols) = (9usize, 96usize);
    for format in [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q5_0, QuantFormat::Q5_1] {
        // Every value 15 (q4) or 31 (q5; q4_1 and q5_1 with offset 0), scale 1.
        let block: Vec<u8> = match format {
            QuantFormat::Q4_0 => [&[0x00, 0x3c][..], &[0xff; 16]].concat(),
            QuantFormat::Q4_1 => [&[0x00, 0x3c, 0x00, 0x00][..], &[0xff; 16]].concat(),
            QuantFormat::Q5_0 => [&[0x00, 0x3c][..], &[0xff; 4], &[0xff; 16]].concat(),
            _ => [&[0x00, 0x3c, 0x00, 0x00][..], &[0xff; 4], &[0xff; 16]].concat(),
        };
        let weights = vec![block.repeat(rows * cols / 32)];
        let text = matmul_graph(format, rows as u32, cols as u32, "none").replace("context=64", "context=64 act=q8");
        // Constant blocks quantize to +-127 everywhere.
        let inputs: Vec<Vec<f32>> = [1usize, 4, 3]
            .iter()
            .enumerate()
            .map(|(i, &seq)| (0..seq * cols).map(|k| if (k / 32 + i) % 2 == 0 { 3.0 } else { -0.5 }).collect())
            .collect();
        run_with(&format!("q8act_extremes_{}", format.name()), &text, &weights, &inputs);
    }
}

/// One graph with a matrix of every format: each kind of micro-kernel is defined once, under
/// its own name, beside the others (q4_0 and q5_0 differ only in their fifth bits); once on
/// each activation grid.
#[test]
fn every_format_in_one_graph_matches_the_interpreter() {
    for act in ["", " act=q8"] {
        every_format_in_one_graph(act);
    }
}

fn every_format_in_one_graph(act: &str) {
    let mut text = format!("graph \"mixed\" context=16{act}\n");
    let formats: Vec<_> = QuantFormat::ALL.into_iter().collect();
    for (i, f) in formats.iter().enumerate() {
        text += &format!("w{i} = weight {}[9, 256] \"w{i}\"\n", f.name());
    }
    text += "v0 = input 0 : f32[seq, 256]\n";
    for i in 0..formats.len() {
        text += &format!("v{} = matmul v0, w{i} : f32[seq, 9]\n", i + 1);
    }
    let mut last = 1;
    for i in 2..=formats.len() {
        let next = formats.len() + i - 1;
        text += &format!("v{next} = add v{last}, v{i} : f32[seq, 9]\n");
        last = next;
    }
    text += &format!("output v{last}\n");
    run_both(&format!("every-format{}", act.replace([' ', '='], "-")), &text, &[5, 1], 13);
}

#[test]
fn attention_kernels_match_the_interpreter_across_calls() {
    // q: 4 heads of 16, k/v: 2 heads; prefill 5 rows, then decode rows one at a time.
    let text = "graph \"attn\" context=64\nv0 = input 0 : f32[seq, 64]\nw0 = weight f32[32, 64] \"k\"\n";
    let _ = text;
    let text = r#"graph "attn" context=64
w0 = weight f32[32, 64] "k"
w1 = weight f32[32, 64] "v"
v0 = input 0 : f32[seq, 64]
v1 = matmul v0, w0 : f32[seq, 32]
v2 = matmul v0, w1 : f32[seq, 32]
v3 = rope v0 head_dim=16 theta=10000 : f32[seq, 64]
v4 = rope v1 head_dim=16 theta=10000 : f32[seq, 32]
v5 = attention v3, v4, v2 layer=0 heads=4 kv_heads=2 head_dim=16 : f32[seq, 64]
output v5
"#;
    run_both("attention", text, &[5, 1, 1, 8, 3], 11);
}

/// Compiles `text` (input 0: `i32[seq]` token ids) and compares every call's output with the
/// interpreter bit for bit, for 1-3 threads; ids include the first and last rows and ids out
/// of range (negative, `rows`, `i32::MAX`, `i32::MIN`), which give zero rows.
fn run_embed_both(name: &str, text: &str, rows: u32, seqs: &[usize], seed: u64) {
    let graph = parse_graph(text).unwrap();
    let mut rng = Rng::new(seed);
    let weights = random_weights(&graph, &mut rng, 1.0);
    run_embed_with(name, text, weights, rows, seqs, &mut rng);
}

/// [`run_embed_both`] with the given weights.
fn run_embed_with(name: &str, text: &str, weights: Vec<Vec<u8>>, rows: u32, seqs: &[usize], rng: &mut Rng) {
    let graph = parse_graph(text).unwrap();
    let dir = scratch_dir(name);
    let opts = CompileOptions { batch: 8, ..Default::default() };
    let (compiled, so) = compile_to_shared(&graph, &weights, &opts, &dir);
    let final_graph: Graph = parse_graph(&compiled.final_ir).unwrap();
    let w: Vec<&[u8]> = weights.iter().map(|w| w.as_slice()).collect();
    let out_width = graph.ty(graph.outputs[0]).row_len().unwrap() as usize;
    let edge = [rows as i32 - 1, 0, -1, rows as i32, i32::MAX, i32::MIN, rows as i32 + 3];
    for threads in [1, 2, 3] {
        let mut program = Program::load_shared(&so, None, threads).unwrap();
        let mut cache = KvCache::new(&final_graph);
        let mut pos = 0;
        for (call, &seq) in seqs.iter().enumerate() {
            let ids: Vec<i32> = (0..seq)
                .map(|t| {
                    if call == 0 && t < edge.len() {
                        edge[t]
                    } else if rng.below(6) == 0 {
                        edge[rng.below(edge.len() as u64) as usize]
                    } else {
                        rng.below(rows as u64) as i32
                    }
                })
                .collect();
            let mut got = vec![f32::NAN; seq * out_width];
            program.run(&[Input::I32(&ids)], &mut [&mut got], seq, pos, 0).unwrap();
            let want = interp::run(&final_graph, &w, &[Tensor::I32(ids.clone())], &mut cache, seq, pos);
            // Exact equality (`==`: +0 equals -0, see the test's comment).
            let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[0][i]).collect();
            assert!(
                bad.is_empty(),
                "{name}: seq {seq} threads {threads} ids {ids:?}: {} values differ, first at {}: kernel {} vs \
                 interpreter {}",
                bad.len(),
                bad[0],
                got[bad[0]],
                want[0][bad[0]]
            );
            pos += seq;
        }
    }
}

#[test]
fn embed_kernels_match_the_interpreter_exactly() {
    // Every table format with kernels (packed as f32 rows for F32/F16/BF16, Q4 groups for
    // Q4_0/Q4_1/Q4_K, Q8 groups for Q8_0), row counts that leave a partial 4-row group, and f32 rows that are not a
    // multiple of 4 columns. The lookup is exact: dequantized products of an f16 scale and a
    // 4- or 8-bit integer fit in f32, so kernel and interpreter agree exactly, up to the sign
    // of zero: Q4_0 runs on the Q4 kernels with m = -8 d, so a zero weight (q = 8) with a negative
    // scale comes out as +0, where the interpreter (like ggml) gives (8 - 8) * d = -0.
    let mut seed = 100;
    for format in QuantFormat::ALL {
        for &cols in kernel_test_cols(format) {
            for rows in [1u32, 6, 13] {
                let f = format.name();
                let text = format!(
                    "graph \"embed\" context=64\nw0 = weight {f}[{rows}, {cols}] \"table\"\nv0 = input 0 : i32[seq]\nv1 = embed v0, w0 : f32[seq, {cols}]\noutput v1\n"
                );
                run_embed_both(&format!("embed_{f}_{rows}x{cols}"), &text, rows, &[5, 1, 8, 3], seed);
                // The embedding feeding another kernel through the arena.
                let text = format!(
                    "graph \"embed_add\" context=64\nw0 = weight {f}[{rows}, {cols}] \"table\"\nv0 = input 0 : i32[seq]\nv1 = embed v0, w0 : f32[seq, {cols}]\nv2 = add v1, v1 : f32[seq, {cols}]\noutput v2\n"
                );
                run_embed_both(&format!("embed_add_{f}_{rows}x{cols}"), &text, rows, &[3, 8], seed + 1);
                // On the q8 activation grid Q4 tables take 4-byte chunks.
                let text = text.replace("context=64", "context=64 act=q8");
                run_embed_both(&format!("embed_q8act_{f}_{rows}x{cols}"), &text, rows, &[3, 8], seed + 1);
                seed += 2;
            }
        }
    }
}

/// Scales are packed as f16 when every scale of a matrix is one (q4_0, q4_1, q8_0) and widened
/// by the kernels with integer operations: every kind of f16 (`tests::harness::SPECIAL_F16`) comes out
/// exactly as the interpreter's dequantization gives it, in the embedding lookup (exact) and
/// through a matmul. (A wrong subnormal constant fails this test.)
#[test]
fn f16_scales_of_every_kind_are_widened_exactly() {
    let mut rng = Rng::new(7);
    let (rows, cols) = (13u32, 64u32);
    for format in [QuantFormat::Q8_0, QuantFormat::Q4_1, QuantFormat::Q4_0] {
        let table = special_f16_scale_matrix(format, rows, cols, &mut rng);
        let f = format.name();
        let text = format!(
            "graph \"embed\" context=64\nw0 = weight {f}[{rows}, {cols}] \"table\"\nv0 = input 0 : i32[seq]\nv1 = embed v0, w0 : f32[seq, {cols}]\noutput v1\n"
        );
        run_embed_with(&format!("embed_f16_scales_{f}"), &text, vec![table.clone()], rows, &[8, 5], &mut rng);
        // The same matrix in a matmul (f32 sums in another order: the usual tolerance).
        let text = format!(
            "graph \"mm\" context=64\nw0 = weight {f}[{rows}, {cols}] \"w\"\nv0 = input 0 : f32[seq, {cols}]\nv1 = matmul v0, w0 : f32[seq, {rows}]\noutput v1\n"
        );
        let graph = parse_graph(&text).unwrap();
        let dir = scratch_dir(&format!("mm_f16_scales_{f}"));
        let ws = vec![table];
        let (compiled, so) = compile_to_shared(&graph, &ws, &CompileOptions { batch: 8, ..Default::default() }, &dir);
        let final_graph: Graph = parse_graph(&compiled.final_ir).unwrap();
        let mut program = Program::load_shared(&so, None, 2).unwrap();
        let x = rng.vec(3 * cols as usize, 2.0);
        let mut got = vec![0.0f32; 3 * rows as usize];
        program.run(&[Input::F32(&x)], &mut [&mut got], 3, 0, 0).unwrap();
        let w: Vec<&[u8]> = ws.iter().map(|w| w.as_slice()).collect();
        let want = interp::run(&final_graph, &w, &[Tensor::F32(x)], &mut KvCache::new(&final_graph), 3, 0);
        let (diff, scale) = max_diff(&got, &want[0]);
        assert!(diff <= REL_TOL * scale.max(1.0), "{f}: max diff {diff} (scale {scale})");
    }
}

/// f16 and bf16 matrices stay 16-bit in the library and are widened by the kernels (f16 by
/// integer operations, bf16 by a shift): a table holding every finite f16 bit pattern
/// (subnormals, zeros of both signs, the largest) and one holding every non-NaN bf16 pattern
/// (infinities included) come out of the embedding lookup exactly as the interpreter
/// dequantizes them, every row looked up. An f16 table holding infinities, which the integer
/// widening cannot give, is widened at compile time instead, with the same result.
#[test]
fn sixteen_bit_tables_of_every_pattern_are_widened_exactly() {
    let cols = 37u32;
    let f16_finite = |h: u16| h & 0x7c00 != 0x7c00;
    let f16_not_nan = |h: u16| h & 0x7fff <= 0x7c00;
    let bf16_not_nan = |h: u16| h & 0x7fff <= 0x7f80;
    let cases: [(QuantFormat, &dyn Fn(u16) -> bool, &str); 3] = [
        (QuantFormat::F16, &f16_finite, "finite"),
        (QuantFormat::F16, &f16_not_nan, "inf"),
        (QuantFormat::BF16, &bf16_not_nan, "all"),
    ];
    for (format, keep, what) in cases {
        let patterns: Vec<u16> = (0..=u16::MAX).filter(|&h| keep(h)).collect();
        let rows = patterns.len().div_ceil(cols as usize) as u32;
        let table: Vec<u8> =
            (0..(rows * cols) as usize).flat_map(|i| patterns[i % patterns.len()].to_le_bytes()).collect();
        let f = format.name();
        let text = format!(
            "graph \"embed\" context=2048\nw0 = weight {f}[{rows}, {cols}] \"table\"\nv0 = input 0 : i32[seq]\nv1 = embed v0, w0 : f32[seq, {cols}]\noutput v1\n"
        );
        let graph = parse_graph(&text).unwrap();
        let dir = scratch_dir(&format!("embed_every_{f}_{what}"));
        let opts = CompileOptions { batch: rows, ..Default::default() };
        let ws = vec![table];
        let (compiled, so) = compile_to_shared(&graph, &ws, &opts, &dir);
        let final_graph: Graph = parse_graph(&compiled.final_ir).unwrap();
        let mut program = Program::load_shared(&so, None, 2).unwrap();
        let ids: Vec<i32> = (0..rows as i32).collect();
        let mut got = vec![f32::NAN; (rows * cols) as usize];
        program.run(&[Input::I32(&ids)], &mut [&mut got], rows as usize, 0, 0).unwrap();
        let w: Vec<&[u8]> = ws.iter().map(|w| w.as_slice()).collect();
        let want =
            interp::run(&final_graph, &w, &[Tensor::I32(ids)], &mut KvCache::new(&final_graph), rows as usize, 0);
        let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[0][i].to_bits()).collect();
        assert!(
            bad.is_empty(),
            "{f} ({what}): {} of {} values differ, first at {}: kernel {:e} vs interpreter {:e}",
            bad.len(),
            got.len(),
            bad[0],
            got[bad[0]],
            want[0][bad[0]]
        );
    }
}
