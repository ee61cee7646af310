//! `eval --suite qa`: generalization accuracy on a question set, per hop class.
//!
//! A question set is JSONL, one object a line: `question` (text), `answers` (every accepted
//! answer, at least one), `hops` (1: single-hop, 2: multi-hop) and optionally `id` and `topic`.
//! Each question is asked as one chat turn from an empty conversation (the model's template and
//! its default system turn), answered greedily up to `max_tokens` tokens. A response counts as
//! correct when, after normalization, it contains an accepted answer as whole words
//! ([`is_correct`]), as the study behind kiln and SQuAD-style scorers count it. Accuracy is
//! reported per hop class and overall, with a 95 % Wilson score interval.

use std::path::Path;

use anyhow::{bail, Context, Result};
use runtime::sampling::SamplerConfig;
use runtime::session::Session;
use serde_json::Value;

/// Largest question or prompt file read (bytes): far above any real set, below memory trouble.
pub const MAX_SET_BYTES: u64 = 64 << 20;

/// One question of a set.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
    /// 1 (single-hop) or 2 (multi-hop).
    pub hops: u8,
}

/// Reads a JSONL file of bounded size, calling `row` on each non-empty line's object; errors
/// name the file and the line.
pub fn read_jsonl<T>(path: &Path, mut row: impl FnMut(&serde_json::Map<String, Value>) -> Result<T>) -> Result<Vec<T>> {
    let len = crate::data::len(path)?;
    if len > MAX_SET_BYTES {
        bail!("{} has {len} bytes, more than the {MAX_SET_BYTES} a set may have", path.display());
    }
    let text = crate::data::read(path)?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let value: Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let Value::Object(map) = value else { bail!("{}: expected a JSON object", at()) };
        out.push(row(&map).with_context(at)?);
    }
    if out.is_empty() {
        bail!("{} holds no rows", path.display());
    }
    Ok(out)
}

/// A required, non-blank string field.
pub fn text_field(map: &serde_json::Map<String, Value>, key: &str) -> Result<String> {
    match map.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => bail!("\"{key}\" is empty"),
        Some(other) => bail!("\"{key}\" must be a string, not {other}"),
        None => bail!("\"{key}\" is missing"),
    }
}

/// Reads a question set (see the module documentation).
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let mut n = 0usize;
    read_jsonl(path, |map| {
        n += 1;
        let question = text_field(map, "question")?;
        let answers = match map.get("answers") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| match v {
                    Value::String(s) if !normalize(s).is_empty() => Ok(s.clone()),
                    _ => bail!("every accepted answer must be a string with a letter or digit, not {v}"),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => bail!("\"answers\" must be a non-empty array of strings"),
            None => bail!("\"answers\" is missing"),
        };
        let hops = match map.get("hops").and_then(Value::as_u64) {
            Some(h @ (1 | 2)) => h as u8,
            _ => bail!("\"hops\" must be 1 (single-hop) or 2 (multi-hop)"),
        };
        let id = match map.get("id") {
            Some(Value::String(s)) => s.clone(),
            _ => format!("#{n}"),
        };
        Ok(Question { id, question, answers, hops })
    })
}

/// Folds the accented Latin letters of common names to their base letters.
fn fold(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => 'a',
        'ç' | 'ć' | 'č' => 'c',
        'ď' | 'đ' => 'd',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' => 'e',
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' | 'ı' => 'i',
        'ł' | 'ľ' => 'l',
        'ñ' | 'ń' | 'ň' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => 'o',
        'ř' => 'r',
        'ś' | 'š' | 'ş' => 's',
        'ť' | 'ţ' => 't',
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' => 'u',
        'ý' | 'ÿ' => 'y',
        'ź' | 'ż' | 'ž' => 'z',
        c => c,
    }
}

/// SQuAD-style normalization: lowercase, accents folded, every character that is not a letter
/// or digit a space, the articles a/an/the dropped, words joined by single spaces.
pub fn normalize(text: &str) -> String {
    let spaced: String = text
        .chars()
        .flat_map(char::to_lowercase)
        .map(fold)
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    spaced.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

/// Whether `response` contains one of `answers` as whole words, both normalized.
pub fn is_correct(response: &str, answers: &[String]) -> bool {
    let r = format!(" {} ", normalize(response));
    answers.iter().map(|a| normalize(a)).any(|a| !a.is_empty() && r.contains(&format!(" {a} ")))
}

/// A count of successes out of a total, with its Wilson score interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Proportion {
    pub successes: usize,
    pub total: usize,
}

impl Proportion {
    pub fn add(&mut self, success: bool) {
        self.successes += usize::from(success);
        self.total += 1;
    }

    /// The observed proportion (0 for an empty count).
    pub fn rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.successes as f64 / self.total as f64
        }
    }

    /// The 95 % Wilson score interval (z = 1.959964); `(0, 1)` for an empty count.
    pub fn wilson95(&self) -> (f64, f64) {
        if self.total == 0 {
            return (0.0, 1.0);
        }
        let z = 1.959_963_984_540_054_f64;
        let n = self.total as f64;
        let p = self.rate();
        let denom = 1.0 + z * z / n;
        let center = (p + z * z / (2.0 * n)) / denom;
        let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
        ((center - half).max(0.0), (center + half).min(1.0))
    }

    pub fn json(&self) -> Value {
        let (lo, hi) = self.wilson95();
        serde_json::json!({"correct": self.successes, "total": self.total, "accuracy": self.rate(), "ci95": [lo, hi]})
    }
}

/// One answered question.
#[derive(Clone, Debug)]
pub struct Answered {
    pub id: String,
    pub hops: u8,
    pub correct: bool,
    pub response: String,
}

/// Tokens a set of queries took: what the energy model and the deployment report count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub queries: usize,
    /// Prompt tokens run through the model (prefill).
    pub prompt_tokens: usize,
    /// Tokens generated (decode steps).
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Work {
    pub fn add(&mut self, stats: &runtime::session::GenerationStats) {
        self.prompt_tokens += stats.evaluated_prompt_tokens;
        self.generated_tokens += stats.generated_tokens;
        self.prefill_seconds += stats.prefill_time.as_secs_f64();
        self.decode_seconds += stats.decode_time.as_secs_f64();
    }

    pub fn json(&self) -> Value {
        serde_json::json!({
            "queries": self.queries,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
        })
    }
}

/// The figures of a question-set run.
#[derive(Clone, Debug)]
pub struct QaReport {
    pub set: String,
    pub single_hop: Proportion,
    pub multi_hop: Proportion,
    pub all: Proportion,
    pub max_tokens: usize,
    pub work: Work,
    pub answers: Vec<Answered>,
}

impl QaReport {
    pub fn json(&self) -> Value {
        serde_json::json!({
            "set": self.set,
            "rule": "correct when the normalized response contains a normalized accepted answer as whole words",
            "decoding": format!("greedy, at most {} tokens, one chat turn from an empty conversation", self.max_tokens),
            "single_hop": self.single_hop.json(),
            "multi_hop": self.multi_hop.json(),
            "all": self.all.json(),
            "work": self.work.json(),
            "answers": self.answers.iter().map(|a| serde_json::json!({
                "id": a.id, "hops": a.hops, "correct": a.correct, "response": a.response,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Asks `prompt` as the only user turn of a fresh conversation and returns the reply.
pub fn ask(
    session: &mut Session,
    prompt: &str,
    max_tokens: usize,
    sampler: &SamplerConfig,
    work: &mut Work,
) -> Result<String> {
    session.reset();
    let (reply, stats) = session.chat(prompt, max_tokens, sampler, |_| {})?;
    work.queries += 1;
    work.add(&stats);
    Ok(reply)
}

/// Asks every question greedily and scores the answers.
pub fn run_qa(
    session: &mut Session,
    set: &Path,
    questions: &[Question],
    max_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<QaReport> {
    let greedy = SamplerConfig { temperature: 0.0, ..SamplerConfig::default() };
    let mut report = QaReport {
        set: set.display().to_string(),
        single_hop: Proportion::default(),
        multi_hop: Proportion::default(),
        all: Proportion::default(),
        max_tokens,
        work: Work::default(),
        answers: vec![],
    };
    for (i, q) in questions.iter().enumerate() {
        let response = ask(session, &q.question, max_tokens, &greedy, &mut report.work)
            .with_context(|| format!("question {}", q.id))?;
        let correct = is_correct(&response, &q.answers);
        if q.hops == 1 { &mut report.single_hop } else { &mut report.multi_hop }.add(correct);
        report.all.add(correct);
        report.answers.push(Answered { id: q.id.clone(), hops: q.hops, correct, response });
        progress(i + 1, questions.len());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_is_squad_like_with_accents_folded() {
        assert_eq!(normalize("The  Eiffel-Tower, in PARIS!"), "eiffel tower in paris");
        assert_eq!(normalize("Brasília"), "brasilia");
        assert_eq!(normalize("an apple a day"), "apple day");
        assert_eq!(normalize("..."), "");
    }

    #[test]
    fn answers_match_as_whole_words_only() {
        let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(is_correct("The capital of Japan is Tokyo.", &a(&["Tokyo"])));
        assert!(is_correct("It is the Pacific Ocean", &a(&["Pacific Ocean"])));
        assert!(is_correct("Brasilia.", &a(&["Brasília"])));
        assert!(!is_correct("There are sixty of them", &a(&["six"])));
        assert!(!is_correct("Tokyoite", &a(&["Tokyo"])));
        assert!(!is_correct("", &a(&["Tokyo"])));
    }

    #[test]
    fn a_set_with_planted_answers_gives_a_known_accuracy() {
        // Responses correct for 3 of 4 single-hop and 1 of 4 multi-hop questions.
        let answers = ["yes", "yes", "yes", "no", "yes", "no", "no", "no"];
        let (mut one, mut two, mut all) = (Proportion::default(), Proportion::default(), Proportion::default());
        for (i, r) in answers.iter().enumerate() {
            let ok = is_correct(&format!("the answer is {r}"), &["yes".to_string()]);
            if i < 4 { &mut one } else { &mut two }.add(ok);
            all.add(ok);
        }
        assert_eq!((one.successes, one.total, two.successes, all.successes), (3, 4, 1, 4));
        assert_eq!(one.rate(), 0.75);
        assert_eq!(all.rate(), 0.5);
    }

    #[test]
    fn wilson_intervals_match_known_values() {
        // 8 of 10: the textbook interval (0.4902, 0.9433).
        let (lo, hi) = Proportion { successes: 8, total: 10 }.wilson95();
        assert!((lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4, "{lo} {hi}");
        // 0 of 20: (0, 0.1611), never below 0.
        let (lo, hi) = Proportion { successes: 0, total: 20 }.wilson95();
        assert!(lo == 0.0 && (hi - 0.1611).abs() < 1e-4, "{lo} {hi}");
        let (lo, hi) = Proportion { successes: 20, total: 20 }.wilson95();
        assert!((lo - 0.8389).abs() < 1e-4 && hi == 1.0, "{lo} {hi}");
    }

    #[test]
    fn bad_question_files_are_refused_with_the_line() {
        let dir = std::env::temp_dir().join(format!("kiln-qa-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = [
            ("{\"question\": \"Q?\", \"answers\": [\"Oslo\"], \"hops\": 1}\nnot json\n", "line 2: not JSON"),
            ("{\"question\": \"Q?\", \"answers\": [], \"hops\": 1}\n", "non-empty array"),
            ("{\"question\": \"Q?\", \"answers\": [\"Oslo\"], \"hops\": 3}\n", "\"hops\" must be 1"),
            ("{\"question\": \"\", \"answers\": [\"Oslo\"], \"hops\": 1}\n", "\"question\" is empty"),
            ("{\"question\": \"Q?\", \"answers\": [\"!!\"], \"hops\": 1}\n", "letter or digit"),
            ("[1, 2]\n", "expected a JSON object"),
            ("\n\n", "holds no rows"),
        ];
        for (i, (text, expected)) in cases.iter().enumerate() {
            let path = dir.join(format!("q{i}.jsonl"));
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", read_questions(&path).unwrap_err());
            assert!(err.contains(expected), "case {i}: {err}");
        }
        let ok = dir.join("ok.jsonl");
        std::fs::write(&ok, "{\"question\": \"Q?\", \"answers\": [\"A1\"], \"hops\": 2}\n").unwrap();
        assert_eq!(read_questions(&ok).unwrap()[0].id, "#1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_sets_parse() {
        let q = read_questions(&crate::data::shipped("qa.jsonl")).unwrap();
        assert_eq!(q.len(), 300);
        assert_eq!(q.iter().filter(|q| q.hops == 1).count(), 180);
        for q in &q {
            // Echoing the question must not score.
            assert!(!is_correct(&q.question, &q.answers), "{} answers itself", q.id);
        }
    }
}
