//! The deployment report's prediction against a measurement taken in the same run.
//!
//! `build-model --device host` predicts decode tokens/s from the bandwidth it measures on this
//! machine and the bytes the library reads per token (`compiler::deploy`); `bench` measures
//! decode. The prediction must be within 25 % of the measurement (issue 13), on whichever CPU
//! the machine has. This binary holds nothing else, so no other test competes for the cores.

use chat::BenchArgs;
use compiler::bundle::{build_model, BuildOptions};
use compiler::deploy::{predict, Footprint, Query};
use runtime::cli::BundleArgs;
use tests::harness::scratch_dir;

#[test]
fn predicted_decode_on_the_host_is_within_25_percent_of_bench() {
    let Some(model) = std::env::var_os("KILN_MODEL").map(std::path::PathBuf::from) else {
        tests::harness::not_run(
            "perf::predicted_decode_on_the_host_is_within_25_percent_of_bench",
            "KILN_MODEL is not set (the SmolLM2-135M-Instruct GGUF)",
        );
        return;
    };
    let triple = targets::host_triple().expect("a supported host");
    let scratch = scratch_dir("perf-predict");
    let out = scratch.join("bundle");
    let opts = BuildOptions {
        context: Some(2048),
        shared_linker: Some("cc".into()),
        ..BuildOptions::new(model, triple.to_string(), out.clone())
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let threads = 2;
    let decode = 128;
    // Prediction and measurement alternate three times; the medians are compared.
    let (mut predicted, mut measured) = (vec![], vec![]);
    for _ in 0..3 {
        let device = workflow::evaluate::resolve_device(triple, &manifest, Some("host"), threads).unwrap();
        let footprint = Footprint::from_manifest(&manifest).unwrap();
        // bench decodes `decode` tokens after one, from an empty cache.
        let query = Query { prompt_tokens: 1.0, generated_tokens: decode as f64 };
        predicted.push(predict(&footprint, &device, query).decode_tok_s);
        let rows = chat::bench(&BenchArgs {
            bundle: BundleArgs { bundle: out.clone(), threads },
            prefill: vec![],
            decode,
            runs: 3,
            jsonl: false,
        })
        .unwrap();
        measured.push(rows[0].median_tok_s);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let (p, m) = (median(predicted.clone()), median(measured.clone()));
    eprintln!(
        "decode tg{decode} at {threads} threads: predicted {predicted:?}, measured {measured:?}; ratio {:.3}",
        p / m
    );
    assert!((0.75..=1.25).contains(&(p / m)), "predicted {p:.1} tok/s, measured {m:.1} tok/s: off by more than 25 %");
}
