//! `cargo xtask offload-eval`: the study's comparison of where questions are answered — the
//! device only, the server only, and offloading by each policy — on a question set.
//!
//! Every question is answered once on the device (recording its complexity score and the mean
//! ln p of the first tokens) and once by the server, through the runtime's offload client, so
//! that any routing threshold's accuracy follows from the two answers (as RouteLLM draws its
//! curves); each policy named with `--policy` is then run live, question by question, and its
//! routing and accuracy are checked against what the two passes predict (greedy decoding makes
//! them deterministic). The server is a URL, or a bundle served by `chat serve` on loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use compiler::deploy::Footprint;
use eval::qa::{is_correct, read_questions, Proportion, Question};
use plotters::prelude::*;
use runtime::chat_template::Message;
use runtime::offload::{OffloadConfig, Offloader, Origin, Policy, Routed};
use runtime::sampling::SamplerConfig;
use runtime::session::Session;
use serde_json::{json, Value};

/// Options of `cargo xtask offload-eval`.
#[derive(clap::Args, Clone, Debug)]
pub struct OffloadEvalCmd {
    /// The device's bundle (a compressed model).
    #[arg(long)]
    pub device_bundle: PathBuf,
    /// The edge server: an http:// URL of an OpenAI-compatible server, or a bundle directory
    /// to serve with `chat serve` on loopback for the run.
    #[arg(long)]
    pub server: String,
    /// The question set (JSONL: question, answers, hops).
    #[arg(long, default_value = "kiln:qa.jsonl")]
    pub questions: PathBuf,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Threads of the device (and of a served bundle).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Policies run live besides device-only and server-only (repeatable).
    #[arg(long = "policy", default_values_t = ["complexity:0.5".to_string(), "confidence:8:-1".to_string()])]
    pub policies: Vec<String>,
    /// Tokens whose mean ln p the confidence curve looks at.
    #[arg(long, default_value_t = 8)]
    pub confidence_tokens: usize,
    /// Biography prompts for the hallucination rate (SelfCheckGPT unigram, as `eval`).
    #[arg(long, default_value = "kiln:bio.jsonl")]
    pub prompts: PathBuf,
    /// How many of the prompts to check per route (0: no hallucination rate).
    #[arg(long, default_value_t = 20)]
    pub hallucination_prompts: usize,
    /// Sampled answers per prompt (temperature 1, seeded) that a passage is checked against.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Most tokens per biography.
    #[arg(long, default_value_t = 128)]
    pub bio_tokens: usize,
    /// Write every answer, the table and the curves as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML page with the table and the policy curves.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Replace existing --json and --report files.
    #[arg(long)]
    pub force: bool,
}

/// One question's answer by one route.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub correct: bool,
    pub origin: Origin,
    pub seconds: f64,
    pub bytes: u64,
    pub confidence: Option<f32>,
    pub complexity: f32,
    pub device_tokens: usize,
}

impl Outcome {
    fn of(r: &Routed, q: &Question) -> Self {
        Outcome {
            correct: is_correct(&r.text, &q.answers),
            origin: r.origin,
            seconds: r.elapsed.as_secs_f64(),
            bytes: r.bytes_sent + r.bytes_received,
            confidence: r.confidence,
            complexity: r.complexity,
            device_tokens: r.device_tokens,
        }
    }
}

/// One row of the table: a route over every question.
#[derive(Clone, Debug)]
pub struct RouteRow {
    pub name: String,
    pub outcomes: Vec<Outcome>,
    /// Device memory the route needs (None: no model on the device).
    pub device_memory: Option<u64>,
    /// Share of the biographies' sentences SelfCheckGPT flags (None: not measured).
    pub hallucination: Option<f64>,
}

impl RouteRow {
    fn accuracy(&self, questions: &[Question], hops: Option<u8>) -> Proportion {
        let mut p = Proportion::default();
        for (o, q) in self.outcomes.iter().zip(questions) {
            if hops.is_none_or(|h| (q.hops > 1) == (h > 1)) {
                p.add(o.correct);
            }
        }
        p
    }

    fn offloaded(&self) -> f64 {
        let n = self.outcomes.iter().filter(|o| o.origin != Origin::Device).count();
        n as f64 / self.outcomes.len().max(1) as f64
    }

    fn latency(&self, quantile: f64) -> f64 {
        let mut t: Vec<f64> = self.outcomes.iter().map(|o| o.seconds).collect();
        t.sort_by(f64::total_cmp);
        if t.is_empty() {
            return 0.0;
        }
        t[((t.len() - 1) as f64 * quantile).round() as usize]
    }

    fn bytes_per_query(&self) -> f64 {
        self.outcomes.iter().map(|o| o.bytes as f64).sum::<f64>() / self.outcomes.len().max(1) as f64
    }

    fn json(&self, questions: &[Question]) -> Value {
        json!({
            "route": self.name,
            "accuracy": {
                "all": self.accuracy(questions, None).json(),
                "single_hop": self.accuracy(questions, Some(1)).json(),
                "multi_hop": self.accuracy(questions, Some(2)).json(),
            },
            "offloaded_share": self.offloaded(),
            "latency_seconds": {"median": self.latency(0.5), "p95": self.latency(0.95)},
            "network_bytes_per_query": self.bytes_per_query(),
            "device_memory_bytes": self.device_memory,
            "hallucination_rate": self.hallucination,
        })
    }
}

/// A point of a policy curve: at `threshold`, the share of questions offloaded and the
/// accuracy, from the device's and the server's answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurvePoint {
    pub threshold: f64,
    pub offloaded: f64,
    pub accuracy: f64,
}

/// Routing by `score >= threshold` (offload) for every distinct score, from all-device to
/// all-server.
pub fn curve(scores: &[f64], device: &[bool], server: &[bool]) -> Vec<CurvePoint> {
    let n = scores.len().max(1) as f64;
    let mut thresholds: Vec<f64> = scores.to_vec();
    thresholds.push(f64::INFINITY);
    thresholds.retain(|t| *t > f64::NEG_INFINITY);
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    thresholds
        .iter()
        .rev()
        .map(|&t| {
            let (mut off, mut right) = (0usize, 0usize);
            for i in 0..scores.len() {
                let to_server = scores[i] >= t;
                off += usize::from(to_server);
                right += usize::from(if to_server { server[i] } else { device[i] });
            }
            CurvePoint { threshold: t, offloaded: off as f64 / n, accuracy: right as f64 / n }
        })
        .collect()
}

/// A `chat serve` process for a bundle, killed on drop.
pub(crate) struct Served {
    child: Child,
    pub(crate) url: String,
}

impl Served {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `chat serve` on `bundle` on a free loopback port, with `extra` options.
pub(crate) fn serve_bundle(bundle: &Path, threads: usize, extra: &[&str]) -> Result<Served> {
    let triple = crate::bundle_triple(bundle)?;
    let runner = crate::build_runner(&triple, &crate::root().join("target"))?;
    let mut child = runner
        .command()
        .args(["serve", "--addr", "127.0.0.1:0", "--threads", &threads.to_string(), "--bundle"])
        .arg(bundle)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start chat serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let Some(addr) = line.split("http://").nth(1).and_then(|s| s.split('/').next()) else {
        let _ = child.kill();
        bail!("chat serve did not start: {line:?}");
    };
    Ok(Served { url: format!("http://{addr}"), child })
}

fn offloader(url: &str, policy: Policy) -> Result<Offloader> {
    let config =
        OffloadConfig { timeout: Duration::from_secs(600), retries: 1, ..OffloadConfig::new(url.to_string(), policy) };
    Offloader::new(config).map_err(anyhow::Error::msg)
}

fn run_route(
    name: &str,
    o: &Offloader,
    session: &mut Session,
    questions: &[Question],
    max_tokens: usize,
    device_memory: Option<u64>,
) -> Result<RouteRow> {
    let greedy = SamplerConfig::greedy();
    let mut outcomes = vec![];
    let bar = runtime::cli::progress(questions.len() as u64, name);
    for q in questions {
        session.reset();
        let r = o.answer(session, &[Message::user(q.question.clone())], max_tokens, &greedy, |_| {})?;
        outcomes.push(Outcome::of(&r, q));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(RouteRow { name: name.to_string(), outcomes, device_memory, hallucination: None })
}

/// The full comparison.
pub struct OffloadReport {
    pub questions: Vec<Question>,
    pub rows: Vec<RouteRow>,
    pub complexity_curve: Vec<CurvePoint>,
    pub confidence_curve: Vec<CurvePoint>,
    /// For each live policy: does its routing match what the two passes predict?
    pub consistent: Vec<(String, bool)>,
}

pub fn offload_eval(c: &OffloadEvalCmd) -> Result<OffloadReport> {
    for out in c.json.iter().chain(&c.report) {
        runtime::cli::check_output_file(out, c.force)?;
    }
    let policies: Vec<(String, Policy)> = c
        .policies
        .iter()
        .map(|p| Ok((p.clone(), p.parse::<Policy>().map_err(anyhow::Error::msg)?)))
        .collect::<Result<_>>()?;
    if c.confidence_tokens == 0 || c.max_tokens == 0 {
        bail!("--confidence-tokens and --max-tokens must be at least 1");
    }
    let mut questions = read_questions(&c.questions)?;
    questions.truncate(c.limit.unwrap_or(usize::MAX));
    if questions.is_empty() {
        bail!("{} has no questions", c.questions.display());
    }
    let served;
    let url = if c.server.starts_with("http://") {
        c.server.trim_end_matches('/').to_string()
    } else {
        served = serve_bundle(Path::new(&c.server), c.threads, &[])?;
        eprintln!("serving {} at {}", c.server, served.url);
        served.url.clone()
    };
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(c.device_bundle.join("manifest.json"))
            .with_context(|| format!("{} is not a kiln bundle", c.device_bundle.display()))?,
    )?;
    let memory = Footprint::from_manifest(&manifest).map_err(anyhow::Error::msg)?.memory_bytes();
    let mut session = runtime::cli::open_session(&c.device_bundle, c.threads)?;
    let k = c.confidence_tokens;
    // The device pass records the confidence of the first k tokens and never hands over.
    let device_policy = Policy::Confidence { tokens: k, min_mean_logprob: -1e30 };
    let device = run_route(
        "device only",
        &offloader(&url, device_policy)?,
        &mut session,
        &questions,
        c.max_tokens,
        Some(memory),
    )?;
    let server =
        run_route("server only", &offloader(&url, Policy::Always)?, &mut session, &questions, c.max_tokens, None)?;
    let dev_ok: Vec<bool> = device.outcomes.iter().map(|o| o.correct).collect();
    let srv_ok: Vec<bool> = server.outcomes.iter().map(|o| o.correct).collect();
    let complexity: Vec<f64> = device.outcomes.iter().map(|o| f64::from(o.complexity)).collect();
    // Low confidence offloads: the score is -mean ln p; an answer that ended within the k
    // tokens is kept on the device whatever its confidence (as the policy does).
    let doubt: Vec<f64> = device
        .outcomes
        .iter()
        .map(|o| if o.device_tokens >= k { -f64::from(o.confidence.unwrap_or(0.0)) } else { f64::NEG_INFINITY })
        .collect();
    let complexity_curve = curve(&complexity, &dev_ok, &srv_ok);
    let confidence_curve = curve(&doubt, &dev_ok, &srv_ok);
    let mut rows = vec![device, server];
    let mut consistent = vec![];
    for (name, policy) in policies {
        let row =
            run_route(&name, &offloader(&url, policy.clone())?, &mut session, &questions, c.max_tokens, Some(memory))?;
        // Offloaded exactly where the two passes say it would be, with the same answers.
        let predicted = row.outcomes.iter().enumerate().all(|(i, o)| {
            let to_server = o.origin != Origin::Device;
            let expect = match &policy {
                Policy::Never => false,
                Policy::Always => true,
                Policy::Complexity { threshold } => complexity[i] >= f64::from(*threshold),
                Policy::Confidence { min_mean_logprob, .. } if k == policy_tokens(&policy) => {
                    -doubt[i] < f64::from(*min_mean_logprob)
                }
                _ => to_server,
            };
            to_server == expect && o.correct == if to_server { srv_ok[i] } else { dev_ok[i] }
        });
        consistent.push((name, predicted));
        rows.push(row);
    }
    if c.hallucination_prompts > 0 {
        let mut prompts = eval::selfcheck::read_prompts(&c.prompts)?;
        prompts.truncate(c.hallucination_prompts);
        let policies: Vec<Option<Policy>> = rows.iter().skip(2).map(|r| r.name.parse::<Policy>().ok()).collect();
        let rates = hallucination(&url, &mut session, &prompts, c, &policies)?;
        for (row, rate) in rows.iter_mut().zip(rates) {
            row.hallucination = Some(rate);
        }
    }
    let report = OffloadReport { questions, rows, complexity_curve, confidence_curve, consistent };
    print!("{}", report.table());
    if let Some(path) = &c.json {
        crate::evaluate::write_new(path, &(serde_json::to_string_pretty(&report.json())? + "\n"), c.force)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &c.report {
        crate::evaluate::write_new(path, &report.html(), c.force)?;
        println!("wrote {}", path.display());
    }
    Ok(report)
}

/// Hallucination rates of device only, server only, then each policy: every prompt's greedy
/// passage and sampled answers from the device and from the server, scored by SelfCheckGPT's
/// unigram method; a policy's passage and samples come from where it routes the prompt.
fn hallucination(
    url: &str,
    session: &mut Session,
    prompts: &[eval::selfcheck::Prompt],
    c: &OffloadEvalCmd,
    policies: &[Option<Policy>],
) -> Result<Vec<f64>> {
    use eval::selfcheck::{score, Checked, SelfCheckOptions, SelfCheckReport};
    let k = c.confidence_tokens;
    let device = offloader(url, Policy::Confidence { tokens: k, min_mean_logprob: -1e30 })?;
    let server = offloader(url, Policy::Always)?;
    // Per prompt and source: (passage, samples, routing facts of the device's greedy passage).
    let mut checked: Vec<[Checked; 2]> = vec![];
    let mut facts = vec![];
    let bar = runtime::cli::progress(prompts.len() as u64, "hallucination");
    for (i, p) in prompts.iter().enumerate() {
        let mut pair = vec![];
        for (j, o) in [&device, &server].into_iter().enumerate() {
            let mut answer = |cfg: &SamplerConfig| -> Result<Routed> {
                session.reset();
                Ok(o.answer(session, &[Message::user(p.prompt.clone())], c.bio_tokens, cfg, |_| {})?)
            };
            let greedy = answer(&SamplerConfig::greedy())?;
            if j == 0 {
                facts.push((greedy.complexity, greedy.confidence, greedy.device_tokens));
            }
            let mut samples = vec![];
            for s in 0..c.samples {
                let cfg = SamplerConfig {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    seed: 0x5E1F ^ (i * 1000 + s) as u64,
                    ..SamplerConfig::default()
                };
                samples.push(answer(&cfg)?.text);
            }
            pair.push(Checked {
                id: p.id.clone(),
                sentences: score(&greedy.text, &samples),
                passage: greedy.text,
                samples,
            });
        }
        let [d, s]: [Checked; 2] = pair.try_into().map_err(|_| anyhow::anyhow!("two sources"))?;
        checked.push([d, s]);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let options = SelfCheckOptions {
        samples: c.samples,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_tokens: c.bio_tokens,
        seed: 0x5E1F,
    };
    let rate = |pick: &dyn Fn(usize) -> usize| {
        let passages = (0..checked.len()).map(|i| checked[i][pick(i)].clone()).collect();
        SelfCheckReport::from_passages(c.prompts.display().to_string(), options.clone(), Default::default(), passages)
            .rate()
    };
    let mut rates = vec![rate(&|_| 0), rate(&|_| 1)];
    for policy in policies {
        let route = |i: usize| -> usize {
            let (complexity, confidence, tokens) = facts[i];
            let to_server = match policy {
                Some(Policy::Never) | None => false,
                Some(Policy::Always) => true,
                Some(Policy::Complexity { threshold }) => complexity >= *threshold,
                Some(Policy::Confidence { min_mean_logprob, .. }) => {
                    tokens >= k && confidence.unwrap_or(0.0) < *min_mean_logprob
                }
                Some(Policy::Any(_)) => false,
            };
            usize::from(to_server)
        };
        rates.push(rate(&route));
    }
    Ok(rates)
}

fn policy_tokens(p: &Policy) -> usize {
    match p {
        Policy::Confidence { tokens, .. } => *tokens,
        _ => 0,
    }
}

impl OffloadReport {
    pub fn table(&self) -> String {
        let q = &self.questions;
        let mut out = format!(
            "{:<22} {:>8} {:>8} {:>8} {:>10} {:>9} {:>8} {:>8} {:>10} {:>10}\n",
            "route", "all %", "single %", "multi %", "offloaded", "halluc %", "p50 s", "p95 s", "net B/q", "device MiB"
        );
        for r in &self.rows {
            let pct = |h| {
                let p = r.accuracy(q, h);
                if p.total == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}", 100.0 * p.rate())
                }
            };
            let mem = r.device_memory.map_or("-".to_string(), |m| format!("{:.1}", m as f64 / 1048576.0));
            out += &format!(
                "{:<22} {:>8} {:>8} {:>8} {:>9.0}% {:>9} {:>8.2} {:>8.2} {:>10.0} {:>10}\n",
                r.name,
                pct(None),
                pct(Some(1)),
                pct(Some(2)),
                100.0 * r.offloaded(),
                r.hallucination.map_or("-".to_string(), |h| format!("{:.1}", 100.0 * h)),
                r.latency(0.5),
                r.latency(0.95),
                r.bytes_per_query(),
                mem
            );
        }
        for (name, ok) in &self.consistent {
            out += &format!(
                "{name}: live routing {} the two passes' prediction\n",
                if *ok { "matches" } else { "DIFFERS from" }
            );
        }
        out
    }

    pub fn json(&self) -> Value {
        let points = |c: &[CurvePoint]| {
            c.iter()
                .map(|p| {
                    json!({"threshold": if p.threshold.is_finite() { json!(p.threshold) } else { json!(null) },
                    "offloaded": p.offloaded, "accuracy": p.accuracy})
                })
                .collect::<Vec<_>>()
        };
        let per_question: Vec<Value> = self
            .questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let routes: Vec<Value> = self
                    .rows
                    .iter()
                    .map(|r| {
                        let o = &r.outcomes[i];
                        json!({"route": r.name, "correct": o.correct, "origin": o.origin.to_string(),
                            "seconds": o.seconds, "bytes": o.bytes})
                    })
                    .collect();
                let d = &self.rows[0].outcomes[i];
                json!({"id": q.id, "hops": q.hops, "complexity": d.complexity, "confidence": d.confidence,
                    "routes": routes})
            })
            .collect();
        json!({
            "rows": self.rows.iter().map(|r| r.json(&self.questions)).collect::<Vec<_>>(),
            "curves": {"complexity": points(&self.complexity_curve), "confidence": points(&self.confidence_curve)},
            "consistent": self.consistent.iter().map(|(n, ok)| json!({"policy": n, "matches_prediction": ok})).collect::<Vec<_>>(),
            "questions": per_question,
        })
    }

    /// A self-contained page: the table and the curves (accuracy against the share offloaded).
    pub fn html(&self) -> String {
        let table: String = self.table().lines().map(|l| format!("{}\n", crate::report::escape(l))).collect();
        let chart = self.curve_svg();
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kiln offload evaluation</title>\
             <style>body{{font:14px sans-serif;margin:2em}}pre{{background:#f6f6f6;padding:1em}}</style></head>\
             <body><h1>Offloading: device, server and policies</h1><pre>{table}</pre>\
             <div id=\"curves\">{chart}</div></body></html>\n"
        )
    }

    fn curve_svg(&self) -> String {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 420)).into_drawing_area();
            let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
                root.fill(&WHITE)?;
                let mut chart = ChartBuilder::on(&root)
                    .caption("Accuracy against the share of queries offloaded", ("sans-serif", 18))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(60)
                    .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
                chart.configure_mesh().x_desc("share offloaded").y_desc("accuracy").draw()?;
                let line = |c: &[CurvePoint]| c.iter().map(|p| (p.offloaded, p.accuracy)).collect::<Vec<_>>();
                for (name, c, color) in [
                    ("complexity", &self.complexity_curve, RGBColor(31, 119, 180)),
                    ("confidence", &self.confidence_curve, RGBColor(255, 127, 14)),
                ] {
                    chart
                        .draw_series(LineSeries::new(line(c), color.stroke_width(2)))?
                        .label(name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
                }
                let (a, b) = (self.complexity_curve.first(), self.complexity_curve.last());
                if let (Some(a), Some(b)) = (a, b) {
                    chart
                        .draw_series(LineSeries::new(
                            vec![(a.offloaded, a.accuracy), (b.offloaded, b.accuracy)],
                            BLACK.mix(0.4),
                        ))?
                        .label("random routing")
                        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
                }
                chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
                root.present()?;
                Ok(())
            };
            if let Err(e) = draw() {
                return format!("<p>chart failed: {}</p>", crate::report::escape(&e.to_string()));
            }
        }
        svg
    }
}
