//! Offloading: a query is answered on the device, or handed to an edge server that speaks the
//! OpenAI protocol (`kiln serve`, llama.cpp's server, vLLM...), by a [`Policy`].
//!
//! Every query gets exactly one answer, and [`Routed`] says where it was produced and why:
//! - [`Origin::Device`]: the local model answered (the policy kept it);
//! - [`Origin::Server`]: the server's streamed answer, whole;
//! - [`Origin::Fallback`]: the server failed (down, reset, slower than the timeout, a
//!   malformed response, an error status). Before any of its text reached the caller the query
//!   is retried with exponential backoff (not after a `4xx`, which a retry would not change),
//!   then answered locally; once text has reached the caller nothing is retried or repeated:
//!   the local model continues the answer from the last piece the server sent.
//!
//! Nothing here writes prompts, answers or the API key anywhere: reasons name only figures and
//! error kinds. The API key is read from an environment variable at each request.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat_template::Message;
use crate::sampling::SamplerConfig;
use crate::session::{GenerateOptions, Session, SessionError};

/// When a query goes to the server.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    /// Always on the device.
    Never,
    /// Always on the server (the device only when it fails).
    Always,
    /// On the server when the question's [`complexity`] score reaches the threshold.
    Complexity { threshold: f32 },
    /// On the server when the local model's mean ln p over its first `tokens` generated tokens
    /// falls below `min_mean_logprob`: the model is unsure, so its start is dropped.
    Confidence { tokens: usize, min_mean_logprob: f32 },
    /// On the server when any of these policies says so (complexity is asked first: it costs
    /// nothing).
    Any(Vec<Policy>),
}

impl Policy {
    pub const DEFAULT_COMPLEXITY: f32 = 0.5;
    pub const DEFAULT_CONFIDENCE_TOKENS: usize = 8;
    pub const DEFAULT_MIN_MEAN_LOGPROB: f32 = -1.0;

    fn complexity_threshold(&self) -> Option<f32> {
        match self {
            Policy::Complexity { threshold } => Some(*threshold),
            Policy::Any(ps) => ps.iter().filter_map(Policy::complexity_threshold).reduce(f32::min),
            _ => None,
        }
    }

    fn confidence(&self) -> Option<(usize, f32)> {
        match self {
            Policy::Confidence { tokens, min_mean_logprob } => Some((*tokens, *min_mean_logprob)),
            Policy::Any(ps) => ps.iter().find_map(Policy::confidence),
            _ => None,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Never => write!(f, "never"),
            Policy::Always => write!(f, "always"),
            Policy::Complexity { threshold } => write!(f, "complexity:{threshold}"),
            Policy::Confidence { tokens, min_mean_logprob } => write!(f, "confidence:{tokens}:{min_mean_logprob}"),
            Policy::Any(ps) => {
                let parts: Vec<String> = ps.iter().map(Policy::to_string).collect();
                write!(f, "{}", parts.join("+"))
            }
        }
    }
}

impl FromStr for Policy {
    type Err = String;

    /// `never`, `always`, `complexity[:THRESHOLD]`, `confidence[:TOKENS[:MIN_MEAN_LOGPROB]]`, or
    /// several joined by `+` (offload when any says so).
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('+') {
            let parts: Vec<Policy> = s.split('+').map(str::parse).collect::<Result<_, _>>()?;
            // `always` in a combination decides alone; `never` adds nothing to it.
            if parts.contains(&Policy::Always) {
                return Ok(Policy::Always);
            }
            let mut parts: Vec<Policy> = parts.into_iter().filter(|p| *p != Policy::Never).collect();
            return Ok(match parts.len() {
                0 => Policy::Never,
                1 => parts.remove(0),
                _ => Policy::Any(parts),
            });
        }
        let mut it = s.split(':');
        let name = it.next().unwrap_or("");
        let args: Vec<&str> = it.collect();
        let num = |i: usize, default: f32, what: &str| -> Result<f32, String> {
            match args.get(i) {
                None => Ok(default),
                Some(a) => {
                    a.parse::<f32>().ok().filter(|x| x.is_finite()).ok_or(format!("{what} {a:?} is not a number"))
                }
            }
        };
        let p = match name {
            "never" | "always" if !args.is_empty() => return Err(format!("policy {name} takes no arguments")),
            "never" => Policy::Never,
            "always" => Policy::Always,
            "complexity" if args.len() <= 1 => {
                let threshold = num(0, Self::DEFAULT_COMPLEXITY, "the complexity threshold")?;
                if !(0.0..=1.0).contains(&threshold) {
                    return Err(format!("the complexity threshold {threshold} is not in [0, 1]"));
                }
                Policy::Complexity { threshold }
            }
            "confidence" if args.len() <= 2 => {
                let tokens = match args.first() {
                    None => Self::DEFAULT_CONFIDENCE_TOKENS,
                    Some(a) => a.parse::<usize>().ok().filter(|&t| (1..=256).contains(&t)).ok_or(format!(
                        "the confidence window {a:?} must be a token count from 1 to 256"
                    ))?,
                };
                let min = num(1, Self::DEFAULT_MIN_MEAN_LOGPROB, "the confidence threshold")?;
                if min > 0.0 {
                    return Err(format!("the confidence threshold {min} is a log-probability: at most 0"));
                }
                Policy::Confidence { tokens, min_mean_logprob: min }
            }
            _ => {
                return Err(format!(
                    "unknown offload policy {s:?}: never, always, complexity[:T], confidence[:K[:LOGP]], or several joined by +"
                ))
            }
        };
        Ok(p)
    }
}

/// How a question looks, 0 (simple) to 1 (complex): a logistic model of its length, the
/// relations it chains ("of the", "whose", "the country where"...), comparisons, and the marks
/// of a word problem. Multi-hop questions chain facts ("the capital of the country where X
/// stands"); single-hop ones ask one. The weights were fitted (L2-regularised logistic
/// regression) to the hop labels of the shipped question set `runtime/eval/data/qa.jsonl`:
/// 5-fold cross-validated accuracy 85 %, 87 % on the whole set (300 questions, 40 % multi-hop).
pub fn complexity(question: &str) -> f32 {
    let q = question.to_lowercase();
    let words: Vec<&str> = q.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).collect();
    let count = |ws: &[&str]| words.iter().filter(|w| ws.contains(w)).count() as f32;
    let phrase = |ps: &[&str]| ps.iter().map(|p| q.matches(p).count()).sum::<usize>() as f32;
    let chains = phrase(&[" of the ", " of a ", " in the ", " by the ", " from the "]);
    // Relative words beyond the one that opens the question ("Which ...", "In which ...").
    let opening = match words.as_slice() {
        ["which" | "who" | "where" | "whose", ..] => 1.0,
        ["in", "which", ..] => 1.0,
        _ => 0.0,
    };
    let relative = (count(&["whose", "which", "that", "where", "who", "whom"]) - opening).max(0.0);
    let compare = count(&[
        "more",
        "less",
        "older",
        "younger",
        "larger",
        "smaller",
        "than",
        "both",
        "before",
        "after",
        "difference",
        "total",
        "sum",
        "times",
        "twice",
        "half",
    ]);
    let numbers = words.iter().filter(|w| w.chars().any(|c| c.is_ascii_digit())).count() as f32;
    let clauses = (q.matches(',').count() + q.matches(" and ").count()) as f32;
    let agents = phrase(&[
        "the author",
        "the composer",
        "the creator",
        "the painter",
        "the scientist",
        "the inventor",
        "the country",
        "the city",
        "the writer",
        "the director",
        "the founder",
        "the person",
        "the leader",
        "the capital of the",
    ]);
    let how_many = if numbers > 0.0 { count(&["how"]) } else { 0.0 };
    let arithmetic = how_many + count(&["altogether", "total", "each", "every", "left", "remain", "remaining"]);
    let z = -4.788 + 0.284 * words.len() as f32 + 0.617 * chains + 2.135 * relative + 1.738 * compare
        - 0.509 * numbers
        - 0.177 * clauses
        + 2.466 * agents
        + 0.44 * arithmetic;
    1.0 / (1.0 + (-z).exp())
}

/// Where an answer was produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Device,
    Server,
    /// The server failed; the device answered, or finished the server's answer.
    Fallback,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Device => "device",
            Origin::Server => "server",
            Origin::Fallback => "fallback",
        })
    }
}

/// One answered query.
#[derive(Clone, Debug)]
pub struct Routed {
    /// The whole answer, exactly the concatenation of the pieces given to `on_text`.
    pub text: String,
    pub origin: Origin,
    /// Why it was produced there (figures and error kinds, never prompt text).
    pub reason: String,
    /// The question's complexity score.
    pub complexity: f32,
    /// Mean ln p of the first tokens, when the confidence policy ran.
    pub confidence: Option<f32>,
    /// Tokens the device generated (including a start that was dropped).
    pub device_tokens: usize,
    /// Requests made to the server.
    pub server_attempts: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub elapsed: Duration,
}

/// Where and how to offload.
#[derive(Clone, Debug)]
pub struct OffloadConfig {
    /// The server's base URL (`http://host:port`; `/v1/chat/completions` is appended).
    pub url: String,
    /// The model to ask for (`None`: the server's default, omitted from the request).
    pub model: Option<String>,
    /// The API key (sent as `Authorization: Bearer`); when `None`, the key is read from the
    /// environment variable `api_key_env` names, if any.
    pub api_key: Option<ApiKey>,
    /// The environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// Whole-request limit: a server slower than this counts as failed.
    pub timeout: Duration,
    /// Further attempts after a failure that left no text with the caller.
    pub retries: u32,
    /// First wait between attempts; doubled each time, with jitter.
    pub backoff: Duration,
    pub policy: Policy,
}

impl OffloadConfig {
    pub fn new(url: impl Into<String>, policy: Policy) -> Self {
        OffloadConfig {
            url: url.into(),
            model: None,
            api_key: None,
            api_key_env: Some("KILN_OFFLOAD_API_KEY".into()),
            timeout: Duration::from_secs(30),
            retries: 2,
            backoff: Duration::from_millis(200),
            policy,
        }
    }
}

/// An API key. Its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

/// A failure of one server attempt.
#[derive(Debug)]
struct Failure {
    kind: String,
    /// A retry could help (network errors, timeouts, 5xx, malformed data), unlike a 4xx.
    retryable: bool,
}

/// The offload client.
pub struct Offloader {
    config: OffloadConfig,
    agent: ureq::Agent,
}

impl Offloader {
    pub fn new(config: OffloadConfig) -> Result<Self, String> {
        let url = config.url.trim_end_matches('/');
        if !url.starts_with("http://") {
            return Err(format!(
                "the offload URL must start with http:// (this runtime is built without TLS), got {:?}",
                config.url
            ));
        }
        if config.timeout.is_zero() {
            return Err("the offload timeout must be positive".into());
        }
        let agent_config =
            ureq::Agent::config_builder().timeout_global(Some(config.timeout)).http_status_as_error(false).build();
        Ok(Offloader { agent: ureq::Agent::new_with_config(agent_config), config })
    }

    pub fn config(&self) -> &OffloadConfig {
        &self.config
    }

    /// One chat turn of `session`'s conversation, answered where the policy says; the turn is
    /// recorded in the conversation whoever answered it.
    pub fn chat(
        &self,
        session: &mut Session,
        user: &str,
        max_tokens: usize,
        sampler: &SamplerConfig,
        on_text: impl FnMut(&str),
    ) -> Result<Routed, SessionError> {
        let mut messages = session.messages().to_vec();
        messages.push(Message::user(user));
        let routed = self.answer(session, &messages, max_tokens, sampler, on_text)?;
        session.record_turn(user, &routed.text);
        Ok(routed)
    }

    /// Answers the conversation `messages` (ending with the user's turn), streaming the answer
    /// to `on_text`, on the device or the server as the policy decides.
    pub fn answer(
        &self,
        session: &mut Session,
        messages: &[Message],
        max_tokens: usize,
        sampler: &SamplerConfig,
        mut on_text: impl FnMut(&str),
    ) -> Result<Routed, SessionError> {
        let started = Instant::now();
        let question = messages.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str());
        let score = complexity(question);
        let mut routed = Routed {
            text: String::new(),
            origin: Origin::Device,
            reason: String::new(),
            complexity: score,
            confidence: None,
            device_tokens: 0,
            server_attempts: 0,
            bytes_sent: 0,
            bytes_received: 0,
            elapsed: Duration::ZERO,
        };
        let policy = &self.config.policy;
        let to_server = match policy {
            Policy::Never => {
                routed.reason = "policy never".into();
                false
            }
            Policy::Always => {
                routed.reason = "policy always".into();
                true
            }
            _ => match policy.complexity_threshold() {
                Some(t) if score >= t => {
                    routed.reason = format!("complexity {score:.2} >= {t}");
                    true
                }
                Some(t) if policy.confidence().is_none() => {
                    routed.reason = format!("complexity {score:.2} < {t}");
                    false
                }
                _ => false,
            },
        };
        let prompt = session.chat_ids(messages)?;
        if !to_server {
            if let (Some((k, min)), Policy::Confidence { .. } | Policy::Any(_)) = (policy.confidence(), policy) {
                // Generate locally, holding the first k tokens back until their mean ln p is known.
                let mut held = String::new();
                let mut lps: Vec<f32> = vec![];
                let mut verdict: Option<bool> = None; // Some(true): confident
                let options = GenerateOptions { max_tokens, logprobs: Some(0), ignore_eos: false };
                let (ids, _) = session.generate_with(&prompt, &options, sampler, |e| {
                    if let Some(lp) = e.logprob {
                        lps.push(lp);
                    }
                    match verdict {
                        Some(_) => {
                            routed.text.push_str(e.text);
                            on_text(e.text);
                        }
                        None => {
                            held.push_str(e.text);
                            if lps.len() >= k {
                                let mean = lps.iter().sum::<f32>() / lps.len() as f32;
                                routed.confidence = Some(mean);
                                if mean < min {
                                    verdict = Some(false);
                                    return ControlFlow::Break(());
                                }
                                verdict = Some(true);
                                routed.text.push_str(&held);
                                on_text(&held);
                            }
                        }
                    }
                    ControlFlow::Continue(())
                })?;
                routed.device_tokens = ids.len();
                match verdict {
                    Some(false) => {
                        let mean = routed.confidence.unwrap_or(f32::NAN);
                        let c = if routed.reason.is_empty() { String::new() } else { format!("{}; ", routed.reason) };
                        routed.reason = format!("{c}mean log-probability {mean:.2} of the first {k} tokens < {min}");
                    }
                    Some(true) => {
                        let mean = routed.confidence.unwrap_or(f32::NAN);
                        routed.reason = format!("mean log-probability {mean:.2} of the first {k} tokens >= {min}");
                        routed.elapsed = started.elapsed();
                        return Ok(routed);
                    }
                    None => {
                        // The answer ended within the window: short answers are kept.
                        let mean = if lps.is_empty() { 0.0 } else { lps.iter().sum::<f32>() / lps.len() as f32 };
                        routed.confidence = Some(mean);
                        routed.reason = format!("the answer ended within {k} tokens (mean log-probability {mean:.2})");
                        routed.text.push_str(&held);
                        on_text(&held);
                        routed.elapsed = started.elapsed();
                        return Ok(routed);
                    }
                }
            } else {
                let (ids, _) = session.generate(&prompt, max_tokens, sampler, |t| {
                    routed.text.push_str(t);
                    on_text(t);
                })?;
                routed.device_tokens = ids.len();
                routed.elapsed = started.elapsed();
                return Ok(routed);
            }
        }
        // The server.
        let mut delay = self.config.backoff;
        let mut failure = None;
        for attempt in 0..=self.config.retries {
            routed.server_attempts += 1;
            match self.ask_server(messages, max_tokens, sampler, &mut routed, &mut on_text) {
                Ok(()) => {
                    routed.origin = Origin::Server;
                    routed.elapsed = started.elapsed();
                    return Ok(routed);
                }
                Err(f) => {
                    let retry = f.retryable && routed.text.is_empty() && attempt < self.config.retries;
                    failure = Some(f);
                    if !retry {
                        break;
                    }
                    std::thread::sleep(jittered(delay));
                    delay = delay.saturating_mul(2);
                }
            }
        }
        let failure = failure.map_or_else(|| "no attempt".to_string(), |f| f.kind);
        routed.origin = Origin::Fallback;
        let attempts = routed.server_attempts;
        let sent_chars = routed.text.chars().count();
        routed.reason = if routed.text.is_empty() {
            format!("{}; the server failed ({failure}; {attempts} attempts): answered on the device", routed.reason)
        } else {
            format!(
                "{}; the server's stream broke after {sent_chars} characters ({failure}): the device finished the answer",
                routed.reason
            )
        };
        // The local model continues from what the caller already has (nothing when the server
        // sent nothing): the chat prompt followed by the server's partial answer.
        // The server's text is untrusted: tokenized as text, control tokens it spells included.
        let mut ids = session.chat_ids(messages)?;
        ids.extend(
            session.tokenizer().encode(&routed.text, false).map_err(|e| SessionError::Tokenizer(e.to_string()))?,
        );
        let room = session.context().saturating_sub(ids.len());
        if room == 0 {
            routed.elapsed = started.elapsed();
            return Ok(routed);
        }
        let (generated, _) = session.generate(&ids, max_tokens.min(room), sampler, |t| {
            routed.text.push_str(t);
            on_text(t);
        })?;
        routed.device_tokens += generated.len();
        routed.elapsed = started.elapsed();
        Ok(routed)
    }

    /// One streamed request to the server; every content piece goes to `on_text` as it comes.
    fn ask_server(
        &self,
        messages: &[Message],
        max_tokens: usize,
        sampler: &SamplerConfig,
        routed: &mut Routed,
        on_text: &mut impl FnMut(&str),
    ) -> Result<(), Failure> {
        let fail = |kind: String, retryable: bool| Failure { kind, retryable };
        let msgs: Vec<Value> = messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let mut body = json!({"messages": msgs, "max_tokens": max_tokens, "temperature": sampler.temperature,
            "top_p": sampler.top_p, "seed": sampler.seed, "stream": true});
        if let Some(model) = &self.config.model {
            body["model"] = json!(model);
        }
        let body = body.to_string();
        routed.bytes_sent += body.len() as u64;
        let url = format!("{}/v1/chat/completions", self.config.url.trim_end_matches('/'));
        let mut request = self.agent.post(&url).header("Content-Type", "application/json");
        let key = self.config.api_key.as_ref().map(|k| k.0.clone());
        if let Some(key) = key.or_else(|| self.config.api_key_env.as_ref().and_then(|v| std::env::var(v).ok())) {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let response = request.send(body.as_str()).map_err(|e| fail(error_kind(&e), true))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(fail(format!("HTTP status {status}"), status >= 500 || status == 429));
        }
        let reader = BufReader::new(response.into_body().into_reader());
        let mut finished = false;
        for line in reader.lines() {
            let line = line.map_err(|e| fail(format!("the stream broke: {}", io_kind(&e)), true))?;
            routed.bytes_received += line.len() as u64 + 1;
            let Some(data) = line.strip_prefix("data:") else {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                return Err(fail("a malformed event stream".into(), true));
            };
            let data = data.trim();
            if data == "[DONE]" {
                return if finished {
                    Ok(())
                } else {
                    Err(fail("the stream ended without a finish reason".into(), true))
                };
            }
            let v: Value = serde_json::from_str(data).map_err(|_| fail("a malformed JSON event".into(), true))?;
            if v.get("error").is_some() {
                return Err(fail("the server reported an error mid-stream".into(), true));
            }
            let Some(choice) = v["choices"].get(0) else { continue };
            if let Some(piece) = choice["delta"]["content"].as_str().filter(|p| !p.is_empty()) {
                routed.text.push_str(piece);
                on_text(piece);
            }
            finished |= choice["finish_reason"].is_string();
        }
        Err(fail("the stream ended early".into(), true))
    }
}

/// A wait of `d` ± 25 %, so that clients failing together do not retry together.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
    let factor = 0.75 + 0.5 * (nanos % 1000) as f64 / 1000.0;
    d.mul_f64(factor)
}

fn error_kind(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "timed out".into(),
        ureq::Error::Io(io) => io_kind(io),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        other => format!("HTTP error: {}", other.to_string().chars().take(80).collect::<String>()),
    }
}

fn io_kind(e: &std::io::Error) -> String {
    let timeout = e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref().is_some_and(|inner| inner.to_string().to_lowercase().contains("timeout"));
    if timeout {
        "timed out".into()
    } else {
        e.kind().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        for s in ["never", "always", "complexity:0.4", "confidence:8:-1.5", "complexity:0.5+confidence:4:-2"] {
            let p: Policy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!("complexity".parse::<Policy>().unwrap(), Policy::Complexity { threshold: 0.5 });
        // Combinations mean what they say: `always` wins, `never` adds nothing.
        assert_eq!("always+confidence".parse::<Policy>().unwrap(), Policy::Always);
        assert_eq!("complexity+always".parse::<Policy>().unwrap(), Policy::Always);
        assert_eq!("never+complexity:0.3".parse::<Policy>().unwrap(), Policy::Complexity { threshold: 0.3 });
        assert_eq!("never+never".parse::<Policy>().unwrap(), Policy::Never);
        for bad in ["", "sometimes", "never:1", "complexity:2", "complexity:x", "confidence:0", "confidence:8:0.5"] {
            assert!(bad.parse::<Policy>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn complexity_separates_the_hop_classes_of_the_question_set() {
        let text = include_str!("../eval/data/qa.jsonl");
        let (mut right, mut n) = (0, 0);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap();
            let multi = v["hops"].as_u64().unwrap() > 1;
            right += usize::from((complexity(v["question"].as_str().unwrap()) >= 0.5) == multi);
            n += 1;
        }
        let accuracy = right as f64 / n as f64;
        assert!(accuracy >= 0.86, "the fitted complexity model classifies {accuracy:.3} of {n} questions");
        assert!(complexity("What is the capital of France?") < 0.2);
        assert!(complexity("What is the capital of the country where the Eiffel Tower stands?") > 0.5);
    }
}
