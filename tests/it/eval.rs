//! `eval` (perplexity and KL divergence, `runtime/eval/src/lib.rs`): its figures equal an
//! independent computation from the logits of direct `Session` calls, a bundle against itself
//! gives KL 0, bad input is refused with a clear error before anything is written, and the real
//! model's perplexity on the shipped text is sane.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use compiler::bundle::{build_model, BuildOptions};
use eval::{evaluate, run_eval, EvalArgs, EvalSpec, Suite};
use runtime::cli::BundleArgs;
use runtime::session::Session;
use tests::harness::{scratch_dir, tiny_llama_gguf_with_tokenizer, Rng};

/// Context of the tiny bundles; batch 4, so a chunk is fed in several prefill batches.
const CONTEXT: u32 = 64;

fn build(model: &Path, out: &Path, context: u32, batch: u32) {
    let opts = BuildOptions {
        context: Some(context),
        batch,
        shared_linker: Some("cc".into()),
        ..BuildOptions::new(
            model.to_path_buf(),
            targets::host_triple().expect("a supported host").to_string(),
            out.to_path_buf(),
        )
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
}

/// Two tiny random models (seeds 1 and 2) built into bundles, and a text of 400 random letters.
/// Returns (dir, bundle of seed 1, bundle of seed 2, text file).
fn tiny() -> &'static (PathBuf, PathBuf, PathBuf, PathBuf) {
    static TINY: OnceLock<(PathBuf, PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    TINY.get_or_init(|| {
        let dir = scratch_dir("eval").keep();
        let mut bundles = vec![];
        for seed in [1u64, 2] {
            let gguf = dir.join(format!("tiny{seed}.gguf"));
            let bytes = tiny_llama_gguf_with_tokenizer(&crate::abi::tiny_cfg(CONTEXT), &mut Rng::new(seed));
            std::fs::write(&gguf, bytes).unwrap();
            let out = dir.join(format!("bundle{seed}"));
            build(&gguf, &out, CONTEXT, 4);
            bundles.push(out);
        }
        let mut rng = Rng::new(7);
        let text: String = (0..400).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
        let text_file = dir.join("text.txt");
        std::fs::write(&text_file, text).unwrap();
        (dir, bundles[0].clone(), bundles[1].clone(), text_file)
    })
}

fn args(bundle: &Path, text: &Path, ctx: usize) -> EvalArgs {
    EvalArgs {
        bundle: BundleArgs { bundle: bundle.to_path_buf(), threads: 1 },
        spec: spec(&[Suite::Perplexity], text, ctx),
        json: None,
        force: false,
    }
}

/// The suites `suites` on `text` at `ctx`, with the shipped question and prompt sets.
fn spec(suites: &[Suite], text: &Path, ctx: usize) -> EvalSpec {
    EvalSpec {
        suite: suites.to_vec(),
        text: Some(text.to_path_buf()),
        ctx,
        chunks: None,
        reference: None,
        questions: None,
        prompts: None,
        limit: None,
        qa_tokens: 256,
        samples: 5,
        sample_temperature: 1.0,
        sample_top_k: 0,
        sample_top_p: 1.0,
        bio_tokens: 128,
        seed: 1,
    }
}

fn open(bundle: &Path) -> Session {
    Session::open_shared(&bundle.join(runtime::cli::SHARED_LIBRARY), bundle, 1).unwrap_or_else(|e| panic!("{e}"))
}

/// The negative log-likelihood of `target` under `row`, written apart from eval.rs's:
/// `ln(sum_j exp(x_j - x_target))`.
fn nll(row: &[f32], target: u32) -> f64 {
    let x_t = f64::from(row[target as usize]);
    row.iter().map(|&x| (f64::from(x) - x_t).exp()).sum::<f64>().ln()
}

/// The log-probabilities of `row`, written apart from eval.rs's.
fn log_probs(row: &[f32]) -> Vec<f64> {
    let total: f64 = row.iter().map(|&x| f64::from(x).exp()).sum();
    row.iter().map(|&x| f64::from(x) - total.ln()).collect()
}

fn assert_close(what: &str, got: f64, want: f64) {
    let rel = ((got - want) / want).abs();
    assert!(rel <= 1e-9, "{what}: eval gives {got}, the direct computation {want} (relative {rel:e})");
}

/// Per chunk, the logits of every position from one direct `Session::eval` call.
fn chunk_logits(session: &mut Session, tokens: &[u32], ctx: usize) -> Vec<Vec<f32>> {
    (0..tokens.len() / ctx)
        .map(|c| {
            session.reset();
            session.eval(&tokens[c * ctx..(c + 1) * ctx], true).unwrap()
        })
        .collect()
}

#[test]
fn perplexity_of_both_rules_and_kl_equal_a_direct_computation() {
    let (_, bundle, other, text) = tiny();
    for ctx in [32usize, 20, 7] {
        let mut a = args(bundle, text, ctx);
        a.spec.reference = Some(other.clone());
        let report = evaluate(&a).unwrap_or_else(|e| panic!("{e:#}"));

        let mut session = open(bundle);
        assert!(!session.manifest().tokenizer.add_bos, "the tiny model adds no BOS");
        let tokens = session.tokenizer().encode(&std::fs::read_to_string(text).unwrap(), false).unwrap();
        assert!(tokens.len() > 3 * ctx, "the text spans several chunks");
        assert_eq!(report.text_tokens, tokens.len());
        assert_eq!(report.chunks, tokens.len() / ctx);
        let vocab = session.vocab();
        let logits = chunk_logits(&mut session, &tokens, ctx);
        let ref_logits = chunk_logits(&mut open(other), &tokens, ctx);

        let (mut llama, mut all, mut ref_llama, mut kls) = (vec![], vec![], vec![], vec![]);
        let mut agree = 0usize;
        for (c, (chunk, ref_chunk)) in logits.iter().zip(&ref_logits).enumerate() {
            for pos in 0..ctx - 1 {
                let target = tokens[c * ctx + pos + 1];
                let row = &chunk[pos * vocab..(pos + 1) * vocab];
                all.push(nll(row, target));
                if pos >= ctx / 2 {
                    llama.push(nll(row, target));
                    let ref_row = &ref_chunk[pos * vocab..(pos + 1) * vocab];
                    ref_llama.push(nll(ref_row, target));
                    let (p, q) = (log_probs(ref_row), log_probs(row));
                    kls.push(p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum::<f64>());
                    agree += usize::from(tests::harness::argmax(ref_row) == tests::harness::argmax(row));
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let ppl_err = |v: &[f64]| {
            let m = mean(v);
            let sample_var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64;
            (sample_var / v.len() as f64).sqrt() * m.exp()
        };
        assert_eq!(report.llama_cpp.scored, report.chunks * (ctx - 1 - ctx / 2), "ctx {ctx}");
        assert_eq!(report.all_but_first.scored, report.chunks * (ctx - 1), "ctx {ctx}");
        assert_close("llama.cpp rule perplexity", report.llama_cpp.perplexity, mean(&llama).exp());
        assert_close("all-but-first perplexity", report.all_but_first.perplexity, mean(&all).exp());
        assert!((report.llama_cpp.perplexity_err - ppl_err(&llama)).abs() <= 1e-6 * ppl_err(&llama));
        assert!((report.all_but_first.perplexity_err - ppl_err(&all)).abs() <= 1e-6 * ppl_err(&all));
        let kl = report.kl.expect("a reference was given");
        assert_eq!(kl.positions, llama.len());
        assert_close("reference perplexity", kl.reference.perplexity, mean(&ref_llama).exp());
        assert_close("KL mean", kl.mean, mean(&kls));
        let max = kls.iter().cloned().fold(f64::MIN, f64::max);
        assert_close("KL max", kl.max, max);
        assert!(kl.mean > 0.0 && kl.median <= kl.p99 && kl.p99 <= kl.max, "{kl:?}");
        assert_eq!(kl.top1_agreement, agree as f64 / llama.len() as f64);
    }
}

#[test]
fn a_bundle_against_itself_has_kl_zero_and_full_agreement() {
    let (_, bundle, _, text) = tiny();
    let mut a = args(bundle, text, 32);
    a.spec.reference = Some(bundle.clone());
    let report = evaluate(&a).unwrap_or_else(|e| panic!("{e:#}"));
    let kl = report.kl.expect("a reference was given");
    assert_eq!((kl.mean, kl.median, kl.p99, kl.max), (0.0, 0.0, 0.0, 0.0), "{kl:?}");
    assert_eq!(kl.top1_agreement, 1.0);
    assert_eq!(kl.reference, report.llama_cpp);
}

/// `cargo xtask eval --reference GGUF`: the GGUF is compiled into a temporary bundle, which is
/// removed afterwards; the same model as the bundle gives KL 0.
#[test]
fn a_gguf_reference_is_compiled_for_the_occasion() {
    let (dir, bundle, _, text) = tiny();
    let json = dir.join("xtask-eval.json");
    let _ = std::fs::remove_file(&json);
    let mut a = args(bundle, text, 32);
    a.spec.reference = Some(dir.join("tiny1.gguf"));
    a.json = Some(json.clone());
    let cmd = workflow::evaluate::EvalCmd {
        bundles: vec![bundle.clone()],
        threads: 1,
        spec: a.spec,
        device: None,
        json: Some(json.clone()),
        report: None,
        force: false,
    };
    let rows = workflow::evaluate::eval(&cmd).unwrap_or_else(|e| panic!("{e:#}"));
    let figures: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let figures = &figures["bundles"][0];
    assert_eq!(figures["kl_divergence"]["max"], 0.0, "{figures}");
    assert_eq!(figures["kl_divergence"]["top1_agreement"], 1.0, "{figures}");
    // Other tests compile references concurrently: look only at the one this command made.
    let compiled = rows[0].reference.as_ref().expect("the row names its reference");
    assert!(compiled.starts_with(workflow::root().join("target/kiln-eval")), "{}", compiled.display());
    assert!(!compiled.exists(), "the temporary reference bundle {} is left", compiled.display());
}

#[test]
fn json_holds_the_printed_figures_and_existing_files_are_kept() {
    let (dir, bundle, _, text) = tiny();
    let json = dir.join("figures.json");
    let _ = std::fs::remove_file(&json);
    let mut a = args(bundle, text, 32);
    a.json = Some(json.clone());
    let report = run_eval(&a).unwrap_or_else(|e| panic!("{e:#}"));
    let figures: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(figures["perplexity"][0]["rule"], "llama.cpp");
    let report = report.perplexity.expect("the perplexity suite ran");
    assert_eq!(figures["perplexity"][0]["perplexity"].as_f64(), Some(report.llama_cpp.perplexity));
    assert_eq!(figures["perplexity"][1]["rule"], "all-but-first");
    assert_eq!(figures["perplexity"][1]["perplexity"].as_f64(), Some(report.all_but_first.perplexity));
    assert!(figures["kl_divergence"].is_null());

    std::fs::write(&json, b"the user's file").unwrap();
    let e = format!("{:#}", run_eval(&a).unwrap_err());
    assert!(e.contains("exists; pass --force"), "{e}");
    assert_eq!(std::fs::read(&json).unwrap(), b"the user's file");
    a.force = true;
    run_eval(&a).unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(std::fs::read(&json).unwrap(), b"the user's file", "--force replaces it");
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let (dir, bundle, _, text) = tiny();
    let json = dir.join("never-written.json");
    let _ = std::fs::remove_file(&json);
    let fails = |a: EvalArgs| -> String {
        let mut a = a;
        a.json = Some(json.clone());
        let e = format!("{:#}", run_eval(&a).unwrap_err());
        assert!(!json.exists(), "a failed eval wrote {}: {e}", json.display());
        e
    };
    let e = fails(args(bundle, text, CONTEXT as usize + 1));
    assert!(e.contains("--ctx 65 is larger than the context 64"), "{e}");

    let short = dir.join("short.txt");
    std::fs::write(&short, "abcdefghij").unwrap();
    let e = fails(args(bundle, &short, 32));
    assert!(e.contains("has 9 tokens, fewer than one chunk of --ctx 32"), "{e}"); // "ab" is one token

    let e = fails(args(bundle, &dir.join("no-such-text.txt"), 32));
    assert!(e.contains("no text file") && e.contains("no-such-text.txt"), "{e}");

    let e = fails(args(bundle, text, 2));
    assert!(e.contains("--ctx must be at least 4"), "{e}");

    let mut a = args(bundle, text, 32);
    a.spec.reference = Some(dir.join("tiny2.gguf"));
    let e = fails(a);
    assert!(e.contains("is a file") && e.contains("cargo xtask eval"), "{e}");

    let mut a = args(bundle, text, 32);
    a.spec.reference = Some(dir.join("no-such-bundle"));
    let e = fails(a);
    assert!(e.contains("reference") && e.contains("not a kiln bundle"), "{e}");

    let not_utf8 = dir.join("latin1.txt");
    std::fs::write(&not_utf8, b"caf\xe9 ".repeat(50)).unwrap();
    let e = fails(args(bundle, &not_utf8, 32));
    assert!(e.contains("cannot read") && e.contains("latin1.txt"), "{e}");
}

/// The real model on the shipped text at ctx 128 (8 chunks): an integration check that the
/// figures are finite and in a sane range, not a quality bar.
#[test]
fn real_model_perplexity_on_the_shipped_text_is_sane() {
    let Some(model) = std::env::var_os("KILN_MODEL").map(PathBuf::from) else {
        tests::harness::not_run(
            "eval::real_model_perplexity_on_the_shipped_text_is_sane",
            "KILN_MODEL is not set (the SmolLM2-135M-Instruct GGUF)",
        );
        return;
    };
    let dir = scratch_dir("eval-smollm");
    let bundle = dir.join("bundle");
    build(&model, &bundle, 128, 128);
    let mut a = args(&bundle, &eval::default_text(), 128);
    a.spec.text = None;
    a.spec.chunks = Some(8);
    a.bundle.threads = 2;
    let report = evaluate(&a).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(report.chunks, 8);
    assert!(report.text_tokens > 4000, "the shipped text has {} tokens", report.text_tokens);
    for score in [&report.llama_cpp, &report.all_but_first] {
        assert!(
            score.perplexity.is_finite() && (2.0..100.0).contains(&score.perplexity),
            "{}: perplexity {}",
            score.rule,
            score.perplexity
        );
        assert!(score.perplexity_err > 0.0 && score.perplexity_err < score.perplexity / 4.0, "{score:?}");
    }
    // The second halves of the chunks have more context, so they are predicted better.
    assert!(report.llama_cpp.perplexity < report.all_but_first.perplexity, "{report:?}");
}

/// Headless Chromium, when installed.
pub(crate) fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let ok = std::process::Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
        ok.then(|| PathBuf::from(name))
    })
}

/// Every suite of `cargo xtask eval` on two tiny bundles in one run: a question set whose
/// answers are planted from bundle 1's own greedy responses gives exactly the planted accuracy
/// per hop class, agreement with bundle 1's GGUF is exact for bundle 1 only, hallucination,
/// footprint and energy are filled (energy by the device model's arithmetic), and the report
/// page, rendered by headless Chromium, lays out its five charts and their bars.
#[test]
fn every_suite_on_two_bundles_and_the_report_in_a_browser() {
    use eval::qa::{ask, normalize, Work};
    let (dir, b1, b2, text) = tiny();
    let work = dir.join("suites");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // Bundle 1's greedy answers, asked as the runner asks them.
    let questions = ["What is one?", "Name two.", "Say three.", "Four?", "Where is five?", "Who is six?"];
    let greedy = runtime::sampling::SamplerConfig { temperature: 0.0, ..Default::default() };
    let mut session = open(b1);
    let responses: Vec<String> =
        questions.iter().map(|q| ask(&mut session, q, 16, &greedy, &mut Work::default()).unwrap()).collect();
    drop(session);
    // Single-hop: correct, correct, wrong; multi-hop: correct, wrong, wrong.
    let planted = [true, true, false, true, false, false];
    let mut set = String::new();
    for (i, q) in questions.iter().enumerate() {
        let first_word = normalize(&responses[i]).split(' ').next().unwrap_or("").to_string();
        assert!(!first_word.is_empty(), "response {i} has no word: {:?}", responses[i]);
        let answer = if planted[i] { first_word } else { "nowhere in any answer 0123".to_string() };
        assert_eq!(eval::qa::is_correct(&responses[i], std::slice::from_ref(&answer)), planted[i]);
        let hops = if i < 3 { 1 } else { 2 };
        set +=
            &serde_json::json!({"id": format!("t{i}"), "question": q, "answers": [answer], "hops": hops}).to_string();
        set += "\n";
    }
    let questions_file = work.join("qa.jsonl");
    std::fs::write(&questions_file, set).unwrap();
    let prompts_file = work.join("bio.jsonl");
    std::fs::write(&prompts_file, "{\"prompt\": \"Tell me about Ada.\"}\n{\"prompt\": \"Tell me about Bob.\"}\n")
        .unwrap();

    let mut spec = spec(&[], text, 32);
    spec.chunks = Some(2);
    spec.reference = Some(dir.join("tiny1.gguf"));
    spec.questions = Some(questions_file);
    spec.prompts = Some(prompts_file);
    spec.qa_tokens = 16;
    spec.samples = 3;
    spec.bio_tokens = 16;
    let json = work.join("eval.json");
    let report = work.join("report.html");
    let cmd = workflow::evaluate::EvalCmd {
        bundles: vec![b1.clone(), b2.clone()],
        threads: 1,
        spec,
        device: None,
        json: Some(json.clone()),
        report: Some(report.clone()),
        force: false,
    };
    let rows = workflow::evaluate::eval(&cmd).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(rows.len(), 2);
    let (r1, r2) = (&rows[0], &rows[1]);
    assert_eq!(r1.accuracy("single_hop").unwrap().0, 2.0 / 3.0, "{}", r1.figures["qa"]);
    assert_eq!(r1.accuracy("multi_hop").unwrap().0, 1.0 / 3.0, "{}", r1.figures["qa"]);
    assert_eq!(r1.accuracy("all").unwrap().0, 0.5);
    assert_eq!(r1.figures["kl_divergence"]["max"], 0.0);
    assert!(r2.kl_mean().unwrap() > 0.0, "another model differs from the reference");
    for r in &rows {
        let h = &r.figures["hallucination"];
        let sentences: usize =
            h["passages"].as_array().unwrap().iter().map(|p| p["sentences"].as_array().unwrap().len()).sum();
        assert_eq!(h["sentences"].as_u64(), Some(sentences as u64), "{h}");
        assert!((0.0..=1.0).contains(&r.hallucination_rate().unwrap()));
        assert_eq!(h["samples"], 3);
        let rss = r.peak_rss_bytes.expect("peak RSS measured (wait4)");
        assert!(rss > r.footprint.weights_bytes, "peak RSS {rss} below the weights {}", r.footprint.weights_bytes);
        let e = r.energy.as_ref().expect("energy suite ran");
        let work = &r.figures["qa"]["work"];
        let q = work["queries"].as_f64().unwrap();
        assert_eq!(q, 6.0);
        assert_eq!(e.query.prompt_tokens, work["prompt_tokens"].as_f64().unwrap() / q);
        if e.how == "modeled" {
            let device =
                workflow::evaluate::resolve_device(targets::host_triple().unwrap(), &r.manifest, None, 1).unwrap();
            let p = compiler::deploy::predict(&r.footprint, &device, e.query);
            assert_eq!(e.joules, p.query_joules());
        }
        assert!(e.joules > 0.0);
    }
    let figures: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(figures["bundles"][0]["qa"]["all"]["correct"], 3);
    let page = std::fs::read_to_string(&report).unwrap();
    assert_eq!(page.matches("<svg id=\"chart-").count(), 5, "five charts");
    assert!(!page.contains("could not be drawn"), "{page}");
    for fetch in ["src=\"http", "href=\"http", "<link", "url(http", "@import"] {
        assert!(!page.contains(fetch), "the page fetches something at view time: {fetch}");
    }

    // As a user sees it: Chromium lays the page out and its script counts the drawn bars.
    let Some(browser) = chromium() else {
        tests::harness::not_run(
            "eval::every_suite_on_two_bundles_and_the_report_in_a_browser",
            "headless Chromium is not installed (apt-get install chromium)",
        );
        return;
    };
    let out = std::process::Command::new(&browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", report.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let rendered = dom.split("id=\"rendered\">").nth(1).and_then(|s| s.split('<').next()).unwrap_or("");
    let nonzero_bars: usize = rows
        .iter()
        .map(|r| {
            let acc = ["single_hop", "multi_hop", "all"].iter().filter(|c| r.accuracy(c).unwrap().0 > 0.0).count();
            acc + usize::from(r.hallucination_rate().unwrap() > 0.0) + 3 + 1 + 1
        })
        .sum();
    let drawn: usize =
        rendered.strip_prefix("charts=5 drawn-rects=").and_then(|n| n.parse().ok()).unwrap_or_else(|| {
            panic!("the page's check did not run in Chromium: {rendered:?}\n{}", String::from_utf8_lossy(&out.stderr))
        });
    assert!(drawn >= nonzero_bars, "{drawn} rectangles drawn, {nonzero_bars} non-zero bars expected");
}

/// `build-model --budget`: a build whose deployment report misses a limit fails naming each
/// limit and by how much, and writes nothing; one that meets its budget is written, with the
/// report saying so; the report describes the device the bundle is for.
#[test]
fn a_build_that_misses_its_budget_writes_nothing_and_says_by_how_much() {
    let (dir, _, _, _) = tiny();
    let opts = |target: &str, device: Option<&str>, out: &Path| BuildOptions {
        device: device.map(str::to_string),
        context: Some(CONTEXT),
        batch: 4,
        ..BuildOptions::new(dir.join("tiny1.gguf"), target, out)
    };
    let host = targets::host_triple().unwrap();
    let out = dir.join("budget-bundle");
    let _ = std::fs::remove_dir_all(&out);
    let tight: compiler::deploy::Budget = "memory=1KiB,decode=1e12tok/s,energy=1e-12J".parse().unwrap();
    let (result, report) =
        workflow::evaluate::build_with_budget(&opts(host, None, &out), None, Some(&tight), &mut |_| {}, &|_, _| {});
    let e = format!("{:#}", result.unwrap_err());
    for says in ["memory:", "the budget is 0.0 MiB", "decode:", "energy per query:", "% off", "nothing was written"] {
        assert!(e.contains(says), "{says}: {e}");
    }
    assert!(!out.exists(), "a build over budget wrote {}", out.display());
    assert!(report.contains("deployment report for x86-64-v3") && report.contains("3 limit(s) missed"), "{report}");

    let roomy: compiler::deploy::Budget = "memory=1GiB,decode=1tok/s".parse().unwrap();
    let (result, report) =
        workflow::evaluate::build_with_budget(&opts(host, None, &out), None, Some(&roomy), &mut |_| {}, &|_, _| {});
    result.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.join("manifest.json").is_file());
    assert!(report.contains("budget memory 1024.0 MiB, decode 1 tok/s: met"), "{report}");

    let arm = dir.join("budget-arm");
    let _ = std::fs::remove_dir_all(&arm);
    let (result, report) = workflow::evaluate::build_with_budget(
        &opts("aarch64-linux-android", Some("raspberry-pi-5"), &arm),
        Some("raspberry-pi-5"),
        None,
        &mut |_| {},
        &|_, _| {},
    );
    result.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(report.contains("deployment report for raspberry-pi-5") && report.contains("at 17.0 GB/s"), "{report}");
    let _ = std::fs::remove_dir_all(&arm);
}
