//! `--prune-layers auto:N` (`workflow::calibrate`, `compiler::probe`): on small random models the
//! block-boundary states of the compiled probe and the angular distances computed from them
//! equal the reference executor's, auto:N picks their argmin, a block made the identity is the
//! one auto:1 drops, and bad input is refused before anything is written.

use std::path::{Path, PathBuf};

use compiler::gguf::{GgufFile, GgufWriter};
use compiler::model::Model;
use compiler::passes::prune_layers::PruneSpec;
use compiler::probe::{angular_distance, choose_run};
use ir::QuantFormat;
use tests::harness::{max_diff, scratch_dir, tiny_llama_gguf_with_tokenizer, Rng, TinyLlama};
use tests::reference::ReferenceModel;
use workflow::calibrate::{choose_auto, resolve_prune, CalibOptions, Probe};

/// Five blocks, d_model 96, context 64 (so calibration chunks hold 64 tokens).
fn tiny_cfg() -> TinyLlama {
    TinyLlama {
        n_layers: 5,
        d_model: 96,
        d_ff: 160,
        n_heads: 3,
        n_kv_heads: 1,
        vocab: 40,
        context: 64,
        format: QuantFormat::Q4_1,
        tied: false,
    }
}

fn write_tiny(dir: &Path, seed: u64) -> PathBuf {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, tiny_llama_gguf_with_tokenizer(&tiny_cfg(), &mut Rng::new(seed))).unwrap();
    path
}

/// A calibration text of the tiny tokenizer's letters: one token per letter (but "ab").
fn write_calib(dir: &Path, letters: usize) -> PathBuf {
    let text: String = (0..letters).map(|i| (b'c' + ((i * 7 + i / 5) % 24) as u8) as char).collect();
    let path = dir.join("calib.txt");
    std::fs::write(&path, text).unwrap();
    path
}

/// The reference's mean angular distance between `x_l` and `x_{l+n}` for every start `l`, over
/// `tokens` cut into chunks of `context` (each from position 0, as the probe runs them).
fn reference_distances(reference: &ReferenceModel, tokens: &[u32], context: usize, n: usize) -> Vec<f64> {
    let (layers, d) = (reference.config().n_layers, reference.d_model());
    let mut sums = vec![0.0f64; layers - n + 1];
    for chunk in tokens.chunks(context) {
        let out = reference.forward(chunk).unwrap();
        for (l, sum) in sums.iter_mut().enumerate() {
            for t in 0..chunk.len() {
                let row = |x: &Vec<f32>| x[t * d..(t + 1) * d].to_vec();
                *sum += angular_distance(&row(&out.residual[l]), &row(&out.residual[l + n]));
            }
        }
    }
    sums.into_iter().map(|s| s / tokens.len() as f64).collect()
}

#[test]
fn distances_equal_the_reference_and_auto_picks_their_argmin() {
    let dir = scratch_dir("auto-prune-reference");
    let path = write_tiny(&dir, 11);
    let cfg = tiny_cfg();
    let gguf = GgufFile::open(&path).unwrap();
    let lowered = compiler::frontend::lower(&gguf, "tiny", cfg.context).unwrap();
    let model = Model::borrowed(lowered.graph, &lowered.weights);
    let mut probe = Probe::compile(&model, cfg.n_layers, cfg.d_model as usize, cfg.context, None, &dir).unwrap();
    let reference = ReferenceModel::load(&path).unwrap();
    let mut rng = Rng::new(5);
    // Two chunks: 64 tokens and 37.
    let tokens: Vec<u32> = (0..101).map(|_| 2 + rng.below(cfg.vocab as u64 - 2) as u32).collect();

    // The states themselves: as in tests/it/model.rs, q16 activations against f32 math.
    let states = probe.states(&tokens[..64]).unwrap();
    let want = reference.forward(&tokens[..64]).unwrap();
    assert_eq!(states.len(), cfg.n_layers as usize + 1);
    for (l, (got, want)) in states.iter().zip(&want.residual).enumerate() {
        let (diff, scale) = max_diff(got, want);
        assert!(diff <= 2e-3 * scale.max(1.0), "x_{l} differs by {diff} (scale {scale})");
    }

    // The states differ only by the rounding of q16 activations (a few 1e-5 of their scale),
    // which moves a token's angle by about as much, and a mean over 101 tokens by less:
    // measured at most 6e-7 on this model. 1e-4 leaves room for other hosts and thread counts
    // and is still far below the gaps between the distances that decide the choice.
    for n in 1..cfg.n_layers {
        let got = probe.distances(&tokens, n).unwrap();
        let want = reference_distances(&reference, &tokens, cfg.context as usize, n as usize);
        assert_eq!(got.len(), want.len());
        for (l, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4, "auto:{n} start {l}: kiln {g}, reference {w}");
            assert!(*w > 0.01 && *w < 0.99, "auto:{n} start {l}: a degenerate distance {w}");
        }
        let chosen = choose_run(&got, n, cfg.n_layers).unwrap();
        let argmin = choose_run(&want, n, cfg.n_layers).unwrap();
        assert_eq!(chosen, argmin, "auto:{n}: kiln {got:?}, reference {want:?}");
    }

    // The whole path (tokenizer, chunks, choice) on a calibration text.
    let calib = write_calib(&dir, 150);
    let options = CalibOptions { text: Some(calib), tokens: None };
    let choice = choose_auto(&path, 2, &options, &[]).unwrap();
    assert_eq!(choice.distances.len(), 4);
    let eligible = &choice.distances[..3];
    let best = eligible.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(choice.distances[choice.start as usize], best);
    assert_eq!(eligible.iter().position(|&d| d == best), Some(choice.start as usize), "ties take the first");
    assert_eq!(choice.spec(), PruneSpec::Blocks(vec![choice.start, choice.start + 1]));
    let report = choice.report().join("\n");
    assert!(report.contains(&format!("auto:2 drops blocks {}..={}", choice.start, choice.start + 1)), "{report}");
    assert!(report.contains("not eligible: drops the final block"), "{report}");
}

/// `source` with the attention output and FFN down projections of `block` set to zero, so
/// that the block adds nothing to the residual stream: `x_{block+1} = x_block`.
fn with_identity_block(source: &Path, block: u32, out: &Path) {
    let gguf = GgufFile::open(source).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in gguf.metadata() {
        w.add_meta(key, value.clone());
    }
    let zeroed = [format!("blk.{block}.attn_output.weight"), format!("blk.{block}.ffn_down.weight")];
    let mut found = 0;
    for info in &gguf.tensors {
        let data = gguf.tensor_data(info);
        if zeroed.contains(&info.name) {
            found += 1;
            // Q4_1 blocks of zero bytes: scale 0 and minimum 0, every value 0.
            w.add_tensor(&info.name, &info.dims, info.ggml_type, &vec![0u8; data.len()]);
        } else {
            w.add_tensor(&info.name, &info.dims, info.ggml_type, data);
        }
    }
    assert_eq!(found, 2);
    std::fs::write(out, w.finish()).unwrap();
}

#[test]
fn auto_1_drops_a_block_that_is_the_identity() {
    let dir = scratch_dir("auto-prune-identity");
    let source = write_tiny(&dir, 12);
    let calib = write_calib(&dir, 100);
    for block in [1, 3] {
        let path = dir.join(format!("identity-{block}.gguf"));
        with_identity_block(&source, block, &path);
        let options = CalibOptions { text: Some(calib.clone()), tokens: None };
        let choice = choose_auto(&path, 1, &options, &[]).unwrap();
        assert_eq!(choice.start, block, "{:?}", choice.distances);
        assert!(choice.distances[block as usize] < 1e-6, "{:?}", choice.distances);
        let (spec, notes) = resolve_prune(&path, Some(PruneSpec::Auto(1)), &options, &[]).unwrap();
        assert_eq!(spec, Some(PruneSpec::Blocks(vec![block])));
        assert!(notes.last().unwrap().starts_with(&format!("auto:1 drops blocks {block}..={block}")), "{notes:?}");
    }
}

#[test]
fn bad_auto_input_is_refused_before_anything_is_written() {
    let dir = scratch_dir("auto-prune-errors");
    let path = write_tiny(&dir, 13);
    let calib = write_calib(&dir, 100);
    let short = dir.join("short.txt");
    std::fs::write(&short, "cdefg hij").unwrap();
    let options = |text: &Path, tokens: Option<usize>| CalibOptions { text: Some(text.to_path_buf()), tokens };
    for (spec, calib_options, needle) in [
        (PruneSpec::Auto(5), options(&calib, None), "auto:5 needs at least 6 blocks"),
        (PruneSpec::Auto(9), options(&calib, None), "the model has 5"),
        (PruneSpec::Auto(0), options(&calib, None), "auto:0 prunes nothing"),
        (PruneSpec::Auto(1), options(&dir.join("missing.txt"), None), "cannot read the calibration text"),
        (PruneSpec::Auto(1), options(&short, None), "needs at least 32 (one chunk)"),
        (PruneSpec::Auto(1), options(&calib, Some(31)), "--calib-tokens 31: auto:N needs at least 32"),
        (PruneSpec::Last(1), options(&calib, None), "--calib and --calib-tokens only apply to --prune-layers auto:N"),
    ] {
        let e = resolve_prune(&path, Some(spec.clone()), &calib_options, &[]).err();
        let e = format!("{:#}", e.unwrap_or_else(|| panic!("{spec} with {calib_options:?} was accepted")));
        assert!(e.contains(needle), "{spec}: {e}");
    }
    // The compiler refuses an unresolved auto:N, and writes nothing.
    let out = dir.join("out.gguf");
    let opts = compiler::optimize::OptimizeOptions {
        model: path.clone(),
        out: out.clone(),
        force: false,
        prune: Some(PruneSpec::Auto(1)),
        quant: Default::default(),
        lora: vec![],
    };
    let e = compiler::optimize::optimize(&opts).err().expect("auto:1 reached the compiler").to_string();
    assert!(e.contains("auto:1 is chosen by running the model on calibration text"), "{e}");
    assert!(!out.exists());
    // Nothing but the inputs is left in the directory (the probe's scratch files are removed).
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["calib.txt", "short.txt", "tiny.gguf"]);
}
