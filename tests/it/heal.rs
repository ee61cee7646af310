//! `heal` and `finetune` (the `heal` crate) end to end: an adapter trained on a small random model
//! compiles (`--prune-layers` + `--lora`) into a library whose logits equal the student it was
//! trained as; a run stopped between checkpoints and resumed writes the same adapter, bit for
//! bit, as one never stopped; bad input is refused with the problem named and nothing of the
//! user's touched; `finetune` on the real model's chat template lowers the loss of held-out
//! answers.

use std::path::{Path, PathBuf};

use compiler::bundle::{build_model, BuildOptions};
use compiler::passes::prune_layers::PruneSpec;
use compiler::passes::requantize::QuantOptions;
use heal::llama::{values, Llama, Shape};
use heal::lora::Lora;
use heal::{run, RunOptions, Task, TrainArgs};
use ir::QuantFormat;
use runtime::session::Session;
use tests::harness::{max_diff, scratch_dir, tiny_llama_gguf_with_tokenizer, Rng, Scratch, TinyLlama};

fn cfg() -> TinyLlama {
    TinyLlama {
        n_layers: 3,
        d_model: 64,
        d_ff: 96,
        n_heads: 4,
        n_kv_heads: 2,
        vocab: 40,
        context: 64,
        format: QuantFormat::F32,
        tied: true,
    }
}

/// A tiny model, a calibration text and an evaluation text (letters the tiny tokenizer knows).
fn setup(name: &str) -> (Scratch, PathBuf, PathBuf, PathBuf) {
    let dir = scratch_dir(name);
    let mut rng = Rng::new(21);
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, tiny_llama_gguf_with_tokenizer(&cfg(), &mut rng)).unwrap();
    let letters: Vec<char> = "abcdefghijklmnopqrstuvwxyz".chars().collect();
    let mut text = |n: usize| -> String { (0..n).map(|_| letters[rng.below(26) as usize]).collect() };
    let calib = dir.join("calib.txt");
    std::fs::write(&calib, text(300)).unwrap();
    let eval = dir.join("eval.txt");
    std::fs::write(&eval, text(120)).unwrap();
    (dir, model, calib, eval)
}

fn train_args(out: &Path) -> TrainArgs {
    TrainArgs {
        out: out.to_path_buf(),
        rank: 2,
        alpha: Some(4.0),
        targets: "all-linear".into(),
        steps: 8,
        batch: 2,
        seq_len: 24,
        lr: 1e-2,
        seed: 1,
        checkpoint_every: 3,
        resume: false,
        force: false,
        threads: Some(2),
        stop_after: None,
    }
}

fn q4_0() -> QuantOptions {
    QuantOptions { default: Some("q4_0".into()), tensors: vec![] }
}

fn heal_options(model: &Path, calib: &Path, eval: &Path, train: TrainArgs) -> RunOptions {
    RunOptions {
        model: model.to_path_buf(),
        prune: Some(PruneSpec::Blocks(vec![1])),
        quant: q4_0(),
        base_lora: vec![],
        task: Task::Heal {
            calib: calib.to_path_buf(),
            eval_text: eval.to_path_buf(),
            eval_tokens: 100,
            hidden_weight: 0.0,
        },
        train,
    }
}

/// The student as `heal` built it: the model lowered, pruned and requantized to q4_0 as a build
/// does it.
fn student(model: &Path, prune: &[u32]) -> Llama {
    let source = compiler::source::open(model).unwrap();
    let hp = compiler::frontend::hyperparameters(source.as_ref()).unwrap();
    let lowered = compiler::frontend::lower(source.as_ref(), "t", 64).unwrap();
    let mut m = compiler::model::Model::borrowed(lowered.graph, &lowered.weights);
    let o = compiler::passes::PipelineOptions {
        prune: Some(PruneSpec::Blocks(prune.to_vec())),
        quant: q4_0(),
        ..Default::default()
    };
    compiler::passes::run_model_passes(&mut m, &o).unwrap();
    let kept = (0..hp.n_layers).filter(|l| !prune.contains(l)).collect();
    Llama::from_model(&m, Shape::from_hyper(&hp), kept).unwrap()
}

fn build(model: &Path, out: &Path, lora: Vec<PathBuf>, lora_low_rank: bool) -> Session {
    let opts = BuildOptions {
        context: Some(64),
        batch: 16,
        shared_linker: Some("cc".into()),
        prune: Some(PruneSpec::Blocks(vec![1])),
        quant: q4_0(),
        lora,
        lora_mode: if lora_low_rank { compiler::lora::LoraMode::LowRank } else { compiler::lora::LoraMode::Merge },
        ..BuildOptions::new(
            model.to_path_buf(),
            targets::host_triple().expect("a supported host").to_string(),
            out.to_path_buf(),
        )
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
    Session::open_shared(&out.join("lib/libkiln_model.so"), out, 2).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_healed_adapter_compiles_into_the_student_it_was_trained_as() {
    let (dir, model, calib, eval) = setup("heal_compile");
    let out = dir.join("adapter");
    let summary = run(heal_options(&model, &calib, &eval, train_args(&out))).unwrap();
    let (before, after) = (summary.before.kl.unwrap(), summary.after.kl.unwrap());
    assert!(before > 0.0 && after < before, "held-out KL to the teacher {before} -> {after}");
    assert_eq!(summary.steps, 8);
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_log.jsonl",
        "summary.json",
        "checkpoint/state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let log = std::fs::read_to_string(out.join("training_log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"step\"")).count(), 8);

    // The adapter names the source's layers 0 and 2 (block 1 pruned), as merge_lora (which
    // runs before pruning) needs.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["layers_to_transform"], serde_json::json!([0, 2]));
    assert_eq!(config["r"], 2);

    let student = student(&model, &[1]);
    let lora = Lora::from_adapter(&student, &out).unwrap();
    assert_eq!(lora.modules.len(), 14);
    // Kept low-rank beside the q4_0 weights, the compiled model is the student exactly (to
    // q16 activations); merged before requantization, it is near it.
    let mut low_rank = build(&model, &dir.join("bundle-low-rank"), vec![out.clone()], true);
    let mut merged = build(&model, &dir.join("bundle-merged"), vec![out.clone()], false);
    let mut plain = build(&model, &dir.join("bundle-plain"), vec![], false);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bundle-low-rank/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["compile_options"]["lora_mode"], "low-rank");
    let mut rng = Rng::new(5);
    for len in [1usize, 7, 19] {
        let ids: Vec<u32> = (0..len).map(|_| 2 + rng.below(38) as u32).collect();
        for s in [&mut low_rank, &mut merged, &mut plain] {
            s.reset();
        }
        let got = low_rank.eval(&ids, true).unwrap();
        let want = values(&student.forward(&ids, Some(&lora)).unwrap().logits).unwrap();
        let (diff, scale) = max_diff(&got, &want);
        assert!(diff <= 2e-3 * scale.max(1.0), "{len} tokens: compiled logits differ from the student's by {diff}");
        let (moved, _) = max_diff(&plain.eval(&ids, true).unwrap(), &want);
        assert!(moved > 20.0 * diff.max(1e-4), "{len} tokens: the adapter moved the logits by only {moved}");
        let (merge_diff, _) = max_diff(&merged.eval(&ids, true).unwrap(), &want);
        assert!(merge_diff < moved, "{len} tokens: merged, the adapter is lost ({merge_diff} vs {moved})");
        eprintln!(
            "{len} tokens: low-rank {diff:.2e}, merged {merge_diff:.2e}, no adapter {moved:.2e} from the student"
        );
    }
}

#[test]
fn a_stopped_run_resumes_to_the_same_adapter() {
    let (dir, model, calib, eval) = setup("heal_resume");
    let whole = dir.join("whole");
    run(heal_options(&model, &calib, &eval, train_args(&whole))).unwrap();

    let stopped = dir.join("stopped");
    // Stopped after 5 steps: the checkpoint of step 3 is the last; steps 4 and 5 are lost.
    let err = run(heal_options(&model, &calib, &eval, TrainArgs { stop_after: Some(5), ..train_args(&stopped) }))
        .unwrap_err()
        .to_string();
    assert!(err.contains("stopped after 5 steps"), "{err}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stopped.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 3);
    // Neither a plain rerun nor --resume with other options may overwrite it.
    let err = run(heal_options(&model, &calib, &eval, train_args(&stopped))).unwrap_err().to_string();
    assert!(err.contains("--resume") && err.contains("--force"), "{err}");
    let err = run(heal_options(&model, &calib, &eval, TrainArgs { resume: true, lr: 2e-2, ..train_args(&stopped) }))
        .unwrap_err()
        .to_string();
    assert!(err.contains("other options"), "{err}");

    let summary = run(heal_options(&model, &calib, &eval, TrainArgs { resume: true, ..train_args(&stopped) })).unwrap();
    assert_eq!(summary.steps, 8);
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(
            std::fs::read(whole.join(f)).unwrap() == std::fs::read(stopped.join(f)).unwrap(),
            "{f} of the resumed run differs from the uninterrupted run's"
        );
    }
    let log = std::fs::read_to_string(stopped.join("training_log.jsonl")).unwrap();
    let steps: Vec<u64> =
        log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("step")?.as_u64()).collect();
    assert_eq!(steps, (0..8).collect::<Vec<_>>(), "each step logged once");
    assert_eq!(log.lines().filter(|l| l.contains("\"eval\":\"before\"")).count(), 1);
}

#[test]
fn bad_input_is_refused_and_nothing_of_the_users_is_touched() {
    let (dir, model, calib, eval) = setup("heal_bad");
    let out = dir.join("out");
    let fails = |opts: RunOptions, want: &[&str]| {
        let err = format!("{:#}", run(opts).unwrap_err());
        for w in want {
            assert!(err.contains(w), "expected {w:?} in: {err}");
        }
    };
    let short = dir.join("short.txt");
    std::fs::write(&short, "abcab").unwrap();
    fails(
        heal_options(&model, &short, &eval, train_args(&out)),
        &["calibration text has", "shorter than one training sequence"],
    );
    fails(heal_options(&model, &calib, &eval, TrainArgs { rank: 0, ..train_args(&out) }), &["--rank 0"]);
    fails(
        heal_options(&model, &calib, &eval, TrainArgs { rank: 33, targets: "k_proj".into(), ..train_args(&out) }),
        &["--rank 33", "k_proj (32)"],
    );
    fails(
        heal_options(&model, &calib, &eval, TrainArgs { targets: "q_proj,lm_head".into(), ..train_args(&out) }),
        &["unknown target module \"lm_head\"", "q_proj"],
    );
    let data = dir.join("data.jsonl");
    std::fs::write(&data, "{\"prompt\": \"ab\", \"completion\": \"c\"}\n{\"messages\": [{\"role\": \"user\"}]}\n")
        .unwrap();
    let finetune = RunOptions {
        task: Task::Finetune { data: data.clone() },
        prune: None,
        ..heal_options(&model, &calib, &eval, train_args(&out))
    };
    // The tiny model has no chat template: said before the rows are read.
    fails(finetune, &["no chat template"]);

    // A directory of the user's is never written into.
    let user = dir.join("project");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "mine").unwrap();
    fails(
        heal_options(&model, &calib, &eval, TrainArgs { force: true, ..train_args(&user) }),
        &["notes.txt", "nothing was changed"],
    );
    assert_eq!(std::fs::read_to_string(user.join("notes.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&user).unwrap().count(), 1);
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    fails(heal_options(&model, &calib, &eval, train_args(&file)), &["not a directory"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    fails(
        heal_options(&model, &calib, &eval, TrainArgs { resume: true, ..train_args(&dir.join("none")) }),
        &["no checkpoint"],
    );
    // Every refusal above happened before any output was written.
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().count() == 0);
}

fn kiln_model() -> PathBuf {
    PathBuf::from(
        std::env::var_os("KILN_MODEL")
            .expect("KILN_MODEL is not set: point it at the test model's GGUF file (cargo xtask test sets it)"),
    )
}

/// `finetune` on SmolLM2 with its ChatML template: a handful of steps on examples whose answers
/// follow one pattern lower the loss on held-out examples of the same pattern; malformed rows
/// are refused with their line.
#[test]
fn finetune_learns_answers_in_the_chat_format() {
    let dir = scratch_dir("finetune_real");
    let data = dir.join("data.jsonl");
    let mut rows = String::new();
    let words = [
        "apple", "river", "stone", "cloud", "lamp", "garden", "violin", "harbor", "pencil", "meadow", "candle",
        "bridge",
    ];
    for (i, w) in words.iter().enumerate() {
        let row = serde_json::json!({"messages": [
            {"role": "user", "content": format!("Code word {i}?")},
            {"role": "assistant", "content": format!("ZORP-{w}-ZORP")},
        ]});
        rows.push_str(&row.to_string());
        rows.push('\n');
    }
    std::fs::write(&data, &rows).unwrap();
    let out = dir.join("adapter");
    let opts = |data: PathBuf, out: PathBuf| RunOptions {
        model: kiln_model(),
        prune: None,
        quant: QuantOptions::default(),
        base_lora: vec![],
        task: Task::Finetune { data },
        train: TrainArgs {
            targets: "q_proj,v_proj".into(),
            rank: 4,
            alpha: Some(8.0),
            steps: 6,
            batch: 2,
            seq_len: 48,
            lr: 5e-3,
            checkpoint_every: 6,
            ..train_args(&out)
        },
    };
    let summary = run(opts(data.clone(), out.clone())).unwrap();
    assert!(summary.eval_set.contains("1 held-out"), "{}", summary.eval_set);
    assert!(
        summary.after.perplexity < 0.8 * summary.before.perplexity,
        "held-out answer perplexity {} -> {}",
        summary.before.perplexity,
        summary.after.perplexity
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj"]));

    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}\n",
            &rows[..rows.find('\n').unwrap() + 1]
        ),
    )
    .unwrap();
    let err = format!("{:#}", run(opts(bad, dir.join("adapter-bad"))).unwrap_err());
    assert!(err.contains("line 2") && err.contains("no assistant message"), "{err}");
    let bad = dir.join("bad2.jsonl");
    std::fs::write(&bad, "{\"messages\": [\n").unwrap();
    let err = format!("{:#}", run(opts(bad, dir.join("adapter-bad2"))).unwrap_err());
    assert!(err.contains("line 1") && err.contains("not valid JSON"), "{err}");
}
