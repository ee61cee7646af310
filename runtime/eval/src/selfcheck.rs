//! `eval --suite hallucination`: hallucination by self-consistency, SelfCheckGPT's unigram
//! variant (Manakul et al. 2023, "SelfCheck-Ngram", n = 1, the Max score) with the model's own
//! samples.
//!
//! For each prompt of a biography-style set (JSONL: `prompt`, optionally `id` and `subject`),
//! the model answers once greedily (the passage checked) and `n` more times by sampling at a
//! temperature (top-k and top-p off by default). A unigram model is fitted to the words of the
//! samples and of the passage, with add-one smoothing, and each sentence of the passage gets
//! SelfCheckGPT's two scores over its words: `Max` of `-ln p(word)` (nats; a sentence whose
//! least-supported word the samples rarely or never say is likely made up; SelfCheckGPT reports
//! AUC-PR 85.6 for it against 92.5 for its NLI variant on wiki_bio_gpt3_hallucination) and
//! `Avg` of `-ln p(word)`.
//!
//! A raw score depends on the lengths of the texts, so kiln also places each between its two
//! bounds for the same passage and sample lengths: the score the sentence would get if every
//! sample repeated the passage word for word (0: fully supported) and if no sample shared a word
//! with it (1: unsupported). A sentence is counted as hallucinated when its normalized `Avg`
//! score is at least 0.5 (its words are on average closer to unsupported than to supported); the
//! hallucination rate is the share of such sentences. The rate does not use `Max`: on a small
//! model nearly every sentence has one word its samples never say, and on SmolLM2-135M `Max`
//! flagged 98-99 % of the sentences of every compressed variant alike, while `Avg` ranked the
//! variants as perplexity and KL do (86 % as shipped, 99.7 % with 4 blocks pruned).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use runtime::sampling::SamplerConfig;
use runtime::session::Session;
use serde_json::Value;

use crate::qa::{ask, read_jsonl, text_field, Work};

/// Normalized score at or above which a sentence counts as hallucinated.
pub const THRESHOLD: f64 = 0.5;

/// The passage's sentences: split after `.`, `!` or `?` followed by white space, and at line
/// breaks; sentences without a letter or digit are dropped.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = vec![];
    for line in text.lines() {
        let mut start = 0;
        let chars: Vec<(usize, char)> = line.char_indices().collect();
        for (k, &(i, c)) in chars.iter().enumerate() {
            let next_space = chars.get(k + 1).is_none_or(|&(_, n)| n.is_whitespace());
            if matches!(c, '.' | '!' | '?') && next_space {
                out.push(line[start..i + c.len_utf8()].trim().to_string());
                start = i + c.len_utf8();
            }
        }
        out.push(line[start..].trim().to_string());
    }
    out.retain(|s| !words(s).is_empty());
    out
}

/// The words of a text as the unigram model counts them (normalized like the QA scorer, but
/// keeping articles).
pub fn words(text: &str) -> Vec<String> {
    let lowered: String =
        text.chars().flat_map(char::to_lowercase).map(|c| if c.is_alphanumeric() { c } else { ' ' }).collect();
    lowered.split_whitespace().map(str::to_string).collect()
}

/// A unigram model with add-one smoothing: `p(w) = (count(w) + 1) / (total + distinct)`.
struct Unigram<'a> {
    counts: HashMap<&'a str, f64>,
    total: f64,
    distinct: f64,
}

impl Unigram<'_> {
    fn neg_log_p(&self, word: &str) -> f64 {
        let c = self.counts.get(word).copied().unwrap_or(0.0);
        -((c + 1.0) / (self.total + self.distinct)).ln()
    }
}

/// `max -ln p(w)` over the words of `sentence`.
fn max_score(model: &Unigram, sentence: &[String]) -> f64 {
    sentence.iter().map(|w| model.neg_log_p(w)).fold(0.0, f64::max)
}

/// The mean of `-ln p(w)` over the words of `sentence` (not empty).
fn avg_score(model: &Unigram, sentence: &[String]) -> f64 {
    sentence.iter().map(|w| model.neg_log_p(w)).sum::<f64>() / sentence.len() as f64
}

/// `raw` between its bounds `lo` (supported) and `hi` (unsupported), clamped to 0..=1.
fn between(raw: f64, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        ((raw - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// One scored sentence of a passage.
#[derive(Clone, Debug, PartialEq)]
pub struct SentenceScore {
    pub sentence: String,
    /// SelfCheckGPT's unigram Max and Avg scores (nats).
    pub unigram_max: f64,
    pub unigram_avg: f64,
    /// Each score between its bounds: 0 if every sample repeated the passage, 1 if none shared a word.
    pub normalized_max: f64,
    pub normalized_avg: f64,
}

/// Scores each sentence of `passage` against `samples` (see the module documentation).
pub fn score(passage: &str, samples: &[String]) -> Vec<SentenceScore> {
    let passage_words = words(passage);
    let sample_words: Vec<Vec<String>> = samples.iter().map(|s| words(s)).collect();
    fn model<'a>(texts: &[&'a [String]]) -> Unigram<'a> {
        let mut counts: HashMap<&str, f64> = HashMap::new();
        let mut total = 0.0;
        for text in texts {
            for w in text.iter() {
                *counts.entry(w.as_str()).or_default() += 1.0;
                total += 1.0;
            }
        }
        let distinct = counts.len() as f64;
        Unigram { counts, total, distinct }
    }
    let mut all: Vec<&[String]> = vec![&passage_words];
    all.extend(sample_words.iter().map(Vec::as_slice));
    let actual = model(&all);
    // Fully supported: every sample is the passage.
    let repeated: Vec<&[String]> = std::iter::repeat_n(passage_words.as_slice(), samples.len() + 1).collect();
    let supported = model(&repeated);
    // Unsupported: the samples' words counted, but none of them is a word of the passage.
    let mut unsupported = model(&[&passage_words]);
    let passage_set: std::collections::HashSet<&str> = passage_words.iter().map(String::as_str).collect();
    let mut other: std::collections::HashSet<String> = std::collections::HashSet::new();
    for w in sample_words.iter().flatten() {
        unsupported.total += 1.0;
        // A sample word that is also a passage word is counted as some other word.
        let key = if passage_set.contains(w.as_str()) { format!("{w}\u{0}other") } else { w.clone() };
        other.insert(key);
    }
    unsupported.distinct += other.len() as f64;
    sentences(passage)
        .into_iter()
        .map(|s| {
            let ws = words(&s);
            let [max, avg] =
                [max_score, avg_score].map(|f| (f(&actual, &ws), f(&supported, &ws), f(&unsupported, &ws)));
            SentenceScore {
                sentence: s,
                unigram_max: max.0,
                unigram_avg: avg.0,
                normalized_max: between(max.0, max.1, max.2),
                normalized_avg: between(avg.0, avg.1, avg.2),
            }
        })
        .collect()
}

/// One prompt of a biography-style set.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub id: String,
    pub prompt: String,
}

/// Reads a prompt set: JSONL with `prompt` and optionally `id`.
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let mut n = 0usize;
    read_jsonl(path, |map| {
        n += 1;
        let prompt = text_field(map, "prompt")?;
        let id = match map.get("id") {
            Some(Value::String(s)) => s.clone(),
            _ => format!("#{n}"),
        };
        Ok(Prompt { id, prompt })
    })
}

/// How the passages and samples are drawn.
#[derive(Clone, Copy, Debug)]
pub struct SelfCheckOptions {
    pub samples: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
}

/// One checked passage.
#[derive(Clone, Debug)]
pub struct Checked {
    pub id: String,
    pub passage: String,
    pub samples: Vec<String>,
    pub sentences: Vec<SentenceScore>,
}

/// The figures of a hallucination run.
#[derive(Clone, Debug)]
pub struct SelfCheckReport {
    pub set: String,
    pub options: SelfCheckOptions,
    pub sentences: usize,
    pub hallucinated: usize,
    pub mean_unigram_max: f64,
    pub mean_unigram_avg: f64,
    pub mean_normalized_max: f64,
    /// The mean of the sentences' normalized Avg scores: the hallucination score.
    pub mean_normalized: f64,
    pub work: Work,
    pub passages: Vec<Checked>,
}

impl SelfCheckReport {
    /// Share of sentences whose normalized score is at least [`THRESHOLD`].
    pub fn rate(&self) -> f64 {
        if self.sentences == 0 {
            0.0
        } else {
            self.hallucinated as f64 / self.sentences as f64
        }
    }

    /// The report from scored passages (means over every sentence of every passage).
    pub fn from_passages(set: String, options: SelfCheckOptions, work: Work, passages: Vec<Checked>) -> Self {
        let all: Vec<&SentenceScore> = passages.iter().flat_map(|p| &p.sentences).collect();
        let n = all.len();
        let mean = |f: &dyn Fn(&SentenceScore) -> f64| {
            if n == 0 {
                0.0
            } else {
                all.iter().map(|s| f(s)).sum::<f64>() / n as f64
            }
        };
        SelfCheckReport {
            set,
            options,
            sentences: n,
            hallucinated: all.iter().filter(|s| s.normalized_avg >= THRESHOLD).count(),
            mean_unigram_max: mean(&|s| s.unigram_max),
            mean_unigram_avg: mean(&|s| s.unigram_avg),
            mean_normalized_max: mean(&|s| s.normalized_max),
            mean_normalized: mean(&|s| s.normalized_avg),
            work,
            passages,
        }
    }

    pub fn json(&self) -> Value {
        let o = &self.options;
        serde_json::json!({
            "set": self.set,
            "variant": "SelfCheckGPT unigram (n-gram n=1) with the model's own samples, add-one smoothing; \
                        rate: normalized Avg score >= threshold",
            "samples": o.samples,
            "temperature": o.temperature,
            "top_k": o.top_k,
            "top_p": o.top_p,
            "max_tokens": o.max_tokens,
            "seed": o.seed,
            "threshold": THRESHOLD,
            "sentences": self.sentences,
            "hallucinated": self.hallucinated,
            "rate": self.rate(),
            "mean_unigram_max": self.mean_unigram_max,
            "mean_unigram_avg": self.mean_unigram_avg,
            "mean_normalized_max": self.mean_normalized_max,
            "mean_normalized": self.mean_normalized,
            "work": self.work.json(),
            "passages": self.passages.iter().map(|p| serde_json::json!({
                "id": p.id,
                "passage": p.passage,
                "samples": p.samples,
                "sentences": p.sentences.iter().map(|s| serde_json::json!({
                    "sentence": s.sentence,
                    "unigram_max": s.unigram_max,
                    "unigram_avg": s.unigram_avg,
                    "normalized_max": s.normalized_max,
                    "normalized_avg": s.normalized_avg,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Answers every prompt greedily and `samples` times by sampling, and scores the greedy answers.
/// `work` counts the greedy answers only, as queries a user would send.
pub fn run_selfcheck(
    session: &mut Session,
    set: &Path,
    prompts: &[Prompt],
    o: SelfCheckOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<SelfCheckReport> {
    let greedy = SamplerConfig { temperature: 0.0, ..SamplerConfig::default() };
    let mut work = Work::default();
    let mut sample_work = Work::default();
    let mut passages = vec![];
    for (i, p) in prompts.iter().enumerate() {
        let passage =
            ask(session, &p.prompt, o.max_tokens, &greedy, &mut work).with_context(|| format!("prompt {}", p.id))?;
        let mut samples = vec![];
        for k in 0..o.samples {
            let cfg = SamplerConfig {
                temperature: o.temperature,
                top_k: o.top_k,
                top_p: o.top_p,
                min_p: 0.0,
                seed: o.seed.wrapping_add((i * 1000 + k) as u64),
                ..SamplerConfig::default()
            };
            samples.push(
                ask(session, &p.prompt, o.max_tokens, &cfg, &mut sample_work)
                    .with_context(|| format!("prompt {}", p.id))?,
            );
        }
        passages.push(Checked { id: p.id.clone(), sentences: score(&passage, &samples), passage, samples });
        progress(i + 1, prompts.len());
    }
    Ok(SelfCheckReport::from_passages(set.display().to_string(), o, work, passages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_stops_and_lines() {
        assert_eq!(
            sentences("Ada Lovelace was born in 1815. She worked with Babbage!\nNotes: 3.14 is pi? ..."),
            vec!["Ada Lovelace was born in 1815.", "She worked with Babbage!", "Notes: 3.14 is pi?"]
        );
        assert!(sentences("").is_empty());
    }

    #[test]
    fn identical_samples_score_zero_and_disjoint_ones_the_maximum() {
        let passage = "Marie Curie was born in Warsaw in 1867. She won two Nobel prizes.";
        let same: Vec<String> = vec![passage.to_string(); 5];
        let scores = score(passage, &same);
        assert_eq!(scores.len(), 2);
        for s in &scores {
            assert_eq!((s.normalized_max, s.normalized_avg), (0.0, 0.0), "{s:?}");
        }
        let disjoint: Vec<String> =
            (0..5).map(|k| format!("Lorem ipsum dolor {k} sit amet, consectetur adipiscing elit zz{k}.")).collect();
        for s in score(passage, &disjoint) {
            assert_eq!((s.normalized_max, s.normalized_avg), (1.0, 1.0), "{s:?}");
        }
        // A report over the two: half the sentences hallucinated.
        let o = SelfCheckOptions { samples: 5, temperature: 1.0, top_k: 0, top_p: 1.0, max_tokens: 8, seed: 0 };
        let passages = vec![
            Checked {
                id: "a".into(),
                passage: passage.into(),
                samples: same.clone(),
                sentences: score(passage, &same),
            },
            Checked {
                id: "b".into(),
                passage: passage.into(),
                samples: disjoint.clone(),
                sentences: score(passage, &disjoint),
            },
        ];
        let r = SelfCheckReport::from_passages("set".into(), o, Work::default(), passages);
        assert_eq!((r.sentences, r.hallucinated), (4, 2));
        assert_eq!(r.rate(), 0.5);
        assert_eq!(r.mean_normalized, 0.5);
    }

    #[test]
    fn an_unsupported_word_raises_its_sentence_only() {
        let passage = "Curie was born in Warsaw. She was born in Atlantis.";
        let samples: Vec<String> = vec!["Curie was born in Warsaw. She was born in Poland.".to_string(); 4];
        let s = score(passage, &samples);
        assert!(s[0].normalized_max < 0.2 && s[0].normalized_avg < 0.2, "{s:?}");
        // One made-up word of six: Max flags the sentence, Avg moves by about a sixth.
        assert!(s[1].normalized_max >= THRESHOLD, "{s:?}");
        assert!(s[1].normalized_avg > s[0].normalized_avg && s[1].normalized_avg < THRESHOLD, "{s:?}");
        assert!(s[1].unigram_max > s[0].unigram_max);
        // The raw score is SelfCheckGPT's: "atlantis" is said once (by the passage) among
        // 10 + 4 x 10 words of 8 distinct ones: -ln((1 + 1) / (50 + 8)).
        assert!((s[1].unigram_max + (2.0f64 / 58.0).ln()).abs() < 1e-12, "{s:?}");
    }
}
