//! Offloading: a query is answered on the device, or handed to an edge server that speaks the
//! OpenAI protocol (`kiln serve`, llama.cpp's server, vLLM...), by a [`Policy`].
//!
//! Every query gets exactly one answer, and [`Routed`] says where it was produced and why:
//! - [`Origin::Device`]: the local model answered (the policy kept it);
//! - [`Origin::Server`]: the server's streamed answer, whole;
//! - [`Origin::Fallback`]: the server failed (down, reset, slower than the timeout, a
//!   malformed response, an error status, an answer over its limits). Before any of its text
//!   reached the caller the query is retried with exponential backoff (not after a `4xx` or an
//!   answer over its limits, which a retry would not change), then answered locally; once text
//!   has reached the caller nothing is retried or repeated: the local model continues the
//!   answer from the last piece the server sent, within what is left of `max_tokens`.
//!
//! The server is not trusted:
//! - Its answer is bounded ([`AnswerLimits`]): the text to [`BYTES_PER_TOKEN`] bytes per token
//!   asked for, and to [`TOKEN_SLACK`] times that many tokens of the local tokenizer (the
//!   server's tokenizer may differ) but never more than the session's context has room for;
//!   each line of the event stream and the whole stream are bounded too. A piece of text that
//!   would cross a limit is not shown: the client stops reading and hangs up, and the turn
//!   ends as a server failure, so memory stays bounded and a recorded turn cannot fill the
//!   context.
//! - Its text is text: tokenized without parsing control tokens (a `<|im_end|>` it spells is
//!   not an end of turn), here and when the conversation is rendered again
//!   ([`Session::chat_ids`]).
//! - Time is bounded: each request by `timeout`, the whole answer, retries and their waits
//!   included, by `deadline`; waits double from `backoff` up to `max_backoff`.
//! - No redirects are followed. A loopback host (`localhost`, 127.0.0.0/8, `::1`) is reached
//!   directly; others through the proxy the environment names (`ALL_PROXY`, `HTTP_PROXY`...,
//!   `NO_PROXY` honoured), if any.
//!
//! This runtime speaks plain `http://` only (no TLS), so an API key goes out in clear text:
//! one is sent to a loopback host only, unless the configuration says `insecure` (the chat
//! CLI's `--offload-insecure`); otherwise the configuration is refused.
//!
//! Nothing here writes prompts, answers or the API key anywhere: reasons name only figures and
//! error kinds. The API key is read from an environment variable at each request.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat_template::Message;
use crate::sampling::SamplerConfig;
use crate::session::{GenerateOptions, Session, SessionError};
use crate::tokenizer::Tokenizer;

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
    /// Limit of one whole answer from the server, all attempts and the waits between them
    /// included (the device's own generation is not counted); each attempt gets at most what
    /// is left of it. `None`: [`DEFAULT_DEADLINE`], or `timeout` when that is longer.
    pub deadline: Option<Duration>,
    /// Further attempts after a failure that left no text with the caller (within the
    /// deadline).
    pub retries: u32,
    /// First wait between attempts; doubled each time up to `max_backoff`, with jitter.
    pub backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// Most bytes of text one answer may have; `None`: [`BYTES_PER_TOKEN`] per token asked for
    /// (see [`AnswerLimits`]).
    pub max_answer_bytes: Option<usize>,
    /// Send the API key even to a host that is not loopback, in clear text (`http://`).
    pub insecure: bool,
    pub policy: Policy,
}

/// The whole-answer deadline when the configuration sets none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// The longest wait between attempts when the configuration sets none.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Bytes of server text allowed per token asked for: tokens are a few bytes on average, 16 or
/// so at most in common vocabularies; 32 leaves room for any honest answer.
pub const BYTES_PER_TOKEN: usize = 32;
/// Tokens of the local tokenizer allowed per token asked for: the server's model may split text
/// more coarsely than the local one (a larger vocabulary, another language).
pub const TOKEN_SLACK: usize = 4;
/// Bytes of one event-stream line beyond the JSON of the text it may carry.
const LINE_BASE: usize = 64 << 10;
/// Bytes of the whole event stream: a base, plus per token asked for (one event a token,
/// a few hundred bytes each), plus the escaped text.
const STREAM_BASE: u64 = 1 << 20;
const STREAM_PER_TOKEN: u64 = 4 << 10;
/// Exact recounts of an answer's tokens when the piecewise count passes the limit.
const MAX_RECOUNTS: u32 = 8;

/// What one answer from the server may hold, derived from the tokens asked for and the room
/// left in the session's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerLimits {
    /// `max_tokens` sent to the server: the caller's, but no more than the context has room for.
    pub request_tokens: usize,
    /// Bytes of text (UTF-8).
    pub text_bytes: usize,
    /// Tokens of the text by the local tokenizer (never more than the room in the context).
    pub text_tokens: usize,
    /// Bytes of one line of the event stream.
    pub line_bytes: usize,
    /// Bytes of the whole event stream.
    pub stream_bytes: u64,
}

impl AnswerLimits {
    /// The limits for an answer of up to `max_tokens` tokens with `room` positions left in the
    /// context; `max_bytes` overrides the text's byte limit.
    pub fn new(max_tokens: usize, room: usize, max_bytes: Option<usize>) -> Self {
        let request_tokens = max_tokens.min(room);
        let text_bytes = max_bytes.unwrap_or_else(|| request_tokens.saturating_mul(BYTES_PER_TOKEN));
        // JSON escapes a byte in at most 6 (`\u00XX`).
        let escaped = text_bytes.saturating_mul(6);
        AnswerLimits {
            request_tokens,
            text_bytes,
            text_tokens: request_tokens.saturating_mul(TOKEN_SLACK).min(room),
            line_bytes: LINE_BASE.saturating_add(escaped),
            stream_bytes: STREAM_BASE
                .saturating_add(STREAM_PER_TOKEN.saturating_mul(request_tokens as u64))
                .saturating_add(escaped as u64),
        }
    }
}

/// The wait before retry number `retry` (0 for the first): `base` doubled `retry` times, at most
/// `cap`, then ± 25 % of jitter (still at most `cap`). Saturates instead of overflowing.
pub fn backoff_delay(base: Duration, cap: Duration, retry: u32) -> Duration {
    let factor = 2u32.checked_pow(retry).unwrap_or(u32::MAX);
    jittered(base.saturating_mul(factor).min(cap)).min(cap)
}

/// Whether `host` (of a URL: a name, an IPv4 address or a bracketed IPv6 one) is this machine:
/// `localhost`, 127.0.0.0/8 or `::1` (also IPv4-mapped).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        Err(_) => false,
    }
}

impl OffloadConfig {
    pub fn new(url: impl Into<String>, policy: Policy) -> Self {
        OffloadConfig {
            url: url.into(),
            model: None,
            api_key: None,
            api_key_env: Some("KILN_OFFLOAD_API_KEY".into()),
            timeout: Duration::from_secs(30),
            deadline: None,
            retries: 2,
            backoff: Duration::from_millis(200),
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_answer_bytes: None,
            insecure: false,
            policy,
        }
    }

    /// The whole-answer deadline: `deadline`, or the default (at least `timeout`).
    pub fn deadline(&self) -> Duration {
        self.deadline.unwrap_or(DEFAULT_DEADLINE.max(self.timeout))
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
    /// The server is this machine.
    loopback: bool,
}

impl Offloader {
    /// Checks `config` (an `http://` URL with a host, positive timeouts, no API key in clear
    /// text to another machine unless `insecure`) and makes the client.
    pub fn new(config: OffloadConfig) -> Result<Self, String> {
        let url = config.url.trim_end_matches('/');
        if !url.starts_with("http://") {
            return Err(format!(
                "the offload URL must start with http:// (this runtime is built without TLS), got {:?}",
                config.url
            ));
        }
        let uri: ureq::http::Uri =
            url.parse().map_err(|_| format!("the offload URL {:?} is not a valid URL", config.url))?;
        let host =
            uri.host().filter(|h| !h.is_empty()).ok_or(format!("the offload URL {:?} has no host", config.url))?;
        if config.timeout.is_zero() {
            return Err("the offload timeout must be positive".into());
        }
        if config.deadline().is_zero() {
            return Err("the offload deadline must be positive".into());
        }
        let loopback = is_loopback_host(host);
        if !loopback && !config.insecure {
            let source = if config.api_key.is_some() {
                Some("the API key".to_string())
            } else {
                config
                    .api_key_env
                    .as_ref()
                    .filter(|v| std::env::var_os(v).is_some_and(|k| !k.is_empty()))
                    .map(|v| format!("the API key in ${v}"))
            };
            if let Some(source) = source {
                return Err(format!(
                    "refusing to send {source} in clear text: {url} is plain http:// to {host}, which is not this \
                     machine (loopback), so anyone on the way can read the key; use a loopback URL (an SSH tunnel, \
                     a local TLS proxy), leave the key out, or allow it with --offload-insecure \
                     (OffloadConfig::insecure, kiln_session_set_offload_insecure)"
                ));
            }
        }
        let mut agent_config = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .max_redirects(0);
        if loopback {
            // ureq takes a proxy from the environment by default; loopback never goes through one.
            agent_config = agent_config.proxy(None);
        }
        Ok(Offloader { agent: ureq::Agent::new_with_config(agent_config.build()), config, loopback })
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
        let limits =
            AnswerLimits::new(max_tokens, session.context().saturating_sub(prompt.len()), self.config.max_answer_bytes);
        let deadline = self.config.deadline();
        let server_started = Instant::now();
        let mut attempt: u32 = 0;
        let failure = loop {
            let left = deadline.saturating_sub(server_started.elapsed());
            if left.is_zero() {
                break format!("the deadline of {:.1} s passed", deadline.as_secs_f64());
            }
            routed.server_attempts = routed.server_attempts.saturating_add(1);
            let timeout = self.config.timeout.min(left);
            match self.ask_server(session.tokenizer(), messages, &limits, timeout, sampler, &mut routed, &mut on_text) {
                Ok(()) => {
                    routed.origin = Origin::Server;
                    routed.elapsed = started.elapsed();
                    return Ok(routed);
                }
                Err(f) => {
                    if !(f.retryable && routed.text.is_empty() && attempt < self.config.retries) {
                        break f.kind;
                    }
                    let wait = backoff_delay(self.config.backoff, self.config.max_backoff, attempt);
                    if wait >= deadline.saturating_sub(server_started.elapsed()) {
                        break format!("{}; no time for another attempt within the deadline", f.kind);
                    }
                    std::thread::sleep(wait);
                    attempt += 1;
                }
            }
        };
        routed.origin = Origin::Fallback;
        let attempts = routed.server_attempts;
        let sent_chars = routed.text.chars().count();
        // The local model continues from what the caller already has (nothing when the server
        // sent nothing): the chat prompt followed by the server's partial answer, within what
        // is left of max_tokens.
        // The server's text is untrusted: tokenized as text, control tokens it spells included.
        let mut ids = prompt;
        let server_ids =
            session.tokenizer().encode(&routed.text, false).map_err(|e| SessionError::Tokenizer(e.to_string()))?;
        let left = max_tokens.saturating_sub(server_ids.len());
        ids.extend(server_ids);
        let room = session.context().saturating_sub(ids.len());
        let device_tokens = left.min(room);
        routed.reason = if routed.text.is_empty() {
            format!("{}; the server failed ({failure}; {attempts} attempts): answered on the device", routed.reason)
        } else if device_tokens == 0 {
            format!(
                "{}; the server's stream stopped after {sent_chars} characters ({failure}): no tokens left for the device",
                routed.reason
            )
        } else {
            format!(
                "{}; the server's stream broke after {sent_chars} characters ({failure}): the device finished the answer",
                routed.reason
            )
        };
        if device_tokens == 0 {
            routed.elapsed = started.elapsed();
            return Ok(routed);
        }
        let (generated, _) = session.generate(&ids, device_tokens, sampler, |t| {
            routed.text.push_str(t);
            on_text(t);
        })?;
        routed.device_tokens += generated.len();
        routed.elapsed = started.elapsed();
        Ok(routed)
    }

    /// The API key, if any: the configured one, or the environment variable's (not empty).
    fn api_key(&self) -> Option<String> {
        let key = self.config.api_key.as_ref().map(|k| k.0.clone());
        key.or_else(|| self.config.api_key_env.as_ref().and_then(|v| std::env::var(v).ok())).filter(|k| !k.is_empty())
    }

    /// One streamed request to the server, within `limits` and `timeout`; every content piece
    /// goes to `on_text` as it comes.
    #[allow(clippy::too_many_arguments)]
    fn ask_server(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        limits: &AnswerLimits,
        timeout: Duration,
        sampler: &SamplerConfig,
        routed: &mut Routed,
        on_text: &mut impl FnMut(&str),
    ) -> Result<(), Failure> {
        let fail = |kind: String, retryable: bool| Failure { kind, retryable };
        let msgs: Vec<Value> = messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let mut body = json!({"messages": msgs, "max_tokens": limits.request_tokens, "temperature": sampler.temperature,
            "top_p": sampler.top_p, "seed": sampler.seed, "stream": true});
        if let Some(model) = &self.config.model {
            body["model"] = json!(model);
        }
        let body = body.to_string();
        routed.bytes_sent += body.len() as u64;
        let url = format!("{}/v1/chat/completions", self.config.url.trim_end_matches('/'));
        let mut request = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json");
        if let Some(key) = self.api_key() {
            // The key may have come into the environment after the configuration was checked.
            if !self.loopback && !self.config.insecure {
                return Err(fail(
                    "refused to send the API key in clear text to a host that is not loopback".into(),
                    false,
                ));
            }
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let response = request.send(body.as_str()).map_err(|e| fail(error_kind(&e), true))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(fail(format!("HTTP status {status}"), status >= 500 || status == 429));
        }
        let mut reader = BufReader::new(response.into_body().into_reader());
        let mut finished = false;
        let mut line = Vec::new();
        let (mut stream_bytes, mut text_bytes, mut text_tokens, mut recounts) = (0u64, 0usize, 0usize, 0u32);
        loop {
            line.clear();
            let read = read_line_bounded(&mut reader, &mut line, limits.line_bytes)
                .map_err(|e| fail(format!("the stream broke: {}", io_kind(&e)), true))?;
            routed.bytes_received += read as u64;
            stream_bytes += read as u64;
            if read == 0 {
                break;
            }
            if line.len() > limits.line_bytes && line.last() != Some(&b'\n') {
                return Err(fail(format!("an event line exceeded {} bytes", limits.line_bytes), false));
            }
            if stream_bytes > limits.stream_bytes {
                return Err(fail(format!("the event stream exceeded {} bytes", limits.stream_bytes), false));
            }
            let Ok(line) = std::str::from_utf8(&line) else {
                return Err(fail("a malformed event stream (not UTF-8)".into(), true));
            };
            let line = line.strip_suffix('\n').unwrap_or(line);
            let line = line.strip_suffix('\r').unwrap_or(line);
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
                // A piece that would cross a limit is not shown: the answer stops before it.
                if text_bytes.saturating_add(piece.len()) > limits.text_bytes {
                    return Err(fail(
                        format!(
                            "the answer exceeded {} bytes for max_tokens {}",
                            limits.text_bytes, limits.request_tokens
                        ),
                        false,
                    ));
                }
                // Tokens are counted piece by piece (at least the whole text's count: pieces
                // split words); when that passes the limit, the whole text is counted exactly,
                // a few times at most, so that a server streaming characters is not cut early.
                let encode = |text: &str| {
                    tokenizer
                        .encode(text, false)
                        .map(|ids| ids.len())
                        .map_err(|_| fail("the answer could not be tokenized".into(), false))
                };
                let mut tokens = text_tokens.saturating_add(encode(piece)?);
                if tokens > limits.text_tokens && recounts < MAX_RECOUNTS {
                    recounts += 1;
                    tokens = encode(&(routed.text.clone() + piece))?;
                }
                if tokens > limits.text_tokens {
                    return Err(fail(
                        format!(
                            "the answer exceeded {} tokens for max_tokens {}",
                            limits.text_tokens, limits.request_tokens
                        ),
                        false,
                    ));
                }
                text_bytes += piece.len();
                text_tokens = tokens;
                routed.text.push_str(piece);
                on_text(piece);
            }
            finished |= choice["finish_reason"].is_string();
        }
        Err(fail("the stream ended early".into(), true))
    }
}

/// A wait of `d` ± 25 %, so that clients failing together do not retry together (saturating
/// at `Duration::MAX`).
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
    let per_mille = 750 + (nanos % 501);
    (d / 1000).saturating_mul(per_mille)
}

/// Reads one line (up to and including `\n`, or to the end of the stream) into `line`, but no
/// more than `max` bytes and its newline: a longer line leaves `line` at `max + 1` bytes without
/// a newline for the caller to refuse, instead of growing without bound. Returns the bytes read
/// (0 at the end).
fn read_line_bounded(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    let mut read = 0;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(read);
        }
        let room = max.saturating_add(1).saturating_sub(line.len());
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) if i < room => (i + 1, true),
            _ => (buf.len().min(room), buf.len() >= room),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        read += take;
        if done {
            return Ok(read);
        }
    }
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
    fn backoff_stays_under_its_cap_whatever_the_retry_count() {
        let cap = Duration::from_secs(10);
        let base = Duration::from_millis(200);
        for retry in [0, 1, 5, 6, 31, 32, 63, 64, 1000, u32::MAX - 1, u32::MAX] {
            let d = backoff_delay(base, cap, retry);
            assert!(d <= cap, "retry {retry}: {d:?}");
            assert!(d >= base.mul_f64(0.75), "retry {retry}: {d:?}");
        }
        assert!(backoff_delay(base, cap, 0) <= base.mul_f64(1.25));
        assert!(backoff_delay(Duration::MAX, Duration::MAX, u32::MAX) >= Duration::MAX.mul_f64(0.5));
        assert!(backoff_delay(Duration::MAX, cap, 3) <= cap);
        assert_eq!(backoff_delay(Duration::ZERO, cap, u32::MAX), Duration::ZERO);
        assert!(jittered(Duration::MAX) <= Duration::MAX, "no overflow panic");
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for h in
            ["localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.1.2.3", "[::1]", "::1", "[::ffff:127.0.0.1]"]
        {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in
            ["example.com", "localhost.example.com", "10.0.0.1", "192.168.1.2", "[2001:db8::1]", "0.0.0.0", "[::]", ""]
        {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn keys_go_in_clear_text_to_loopback_only_unless_insecure() {
        let with_key = |url: &str, insecure: bool| {
            let mut c = OffloadConfig::new(url, Policy::Always);
            c.api_key_env = None;
            c.api_key = Some(ApiKey("sk-unit".into()));
            c.insecure = insecure;
            Offloader::new(c)
        };
        for url in ["http://10.1.2.3:8080", "http://edge.local", "http://[2001:db8::1]:80/"] {
            let e = with_key(url, false).err().unwrap_or_else(|| panic!("{url}"));
            assert!(e.contains("clear text") && e.contains("--offload-insecure") && !e.contains("sk-unit"), "{e}");
            assert!(with_key(url, true).is_ok(), "{url}");
            let mut no_key = OffloadConfig::new(url, Policy::Always);
            no_key.api_key_env = None;
            assert!(Offloader::new(no_key).is_ok(), "{url}: no key, nothing to protect");
        }
        for url in ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9"] {
            let o = with_key(url, false).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(o.loopback);
            assert!(o.agent.config().proxy().is_none(), "{url}: loopback through a proxy");
        }
        for bad in ["http://", "http:///v1", "http://a b"] {
            assert!(Offloader::new(OffloadConfig::new(bad, Policy::Always)).is_err(), "{bad}");
        }
        let mut c = OffloadConfig::new("http://127.0.0.1:1", Policy::Always);
        c.deadline = Some(Duration::ZERO);
        assert!(Offloader::new(c).is_err());
    }

    #[test]
    fn answer_limits_follow_max_tokens_and_the_room_in_the_context() {
        let l = AnswerLimits::new(48, 400, None);
        assert_eq!((l.request_tokens, l.text_bytes, l.text_tokens), (48, 48 * BYTES_PER_TOKEN, 48 * TOKEN_SLACK));
        let l = AnswerLimits::new(1000, 100, None);
        assert_eq!((l.request_tokens, l.text_tokens), (100, 100), "never more than the room");
        let l = AnswerLimits::new(usize::MAX, usize::MAX, None);
        assert_eq!(l.text_bytes, usize::MAX, "saturates");
        assert_eq!(AnswerLimits::new(10, 100, Some(7)).text_bytes, 7);
        assert!(l.line_bytes >= LINE_BASE && l.stream_bytes >= STREAM_BASE);
    }

    #[test]
    fn lines_are_read_up_to_their_limit() {
        let text = b"data: one\r\n\ndata: two";
        let mut r = std::io::BufReader::with_capacity(3, &text[..]);
        let mut line = vec![];
        let mut lines = vec![];
        loop {
            line.clear();
            if read_line_bounded(&mut r, &mut line, 64).unwrap() == 0 {
                break;
            }
            lines.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(lines, ["data: one\r\n", "\n", "data: two"]);
        // An endless line stops one byte past the limit, whatever the reader holds.
        let endless = std::io::repeat(b'a');
        let mut r = std::io::BufReader::with_capacity(4096, endless);
        line.clear();
        assert_eq!(read_line_bounded(&mut r, &mut line, 10_000).unwrap(), 10_001);
        assert_eq!(line.len(), 10_001);
        let mut r = std::io::BufReader::new(&b"abc\n"[..]);
        line.clear();
        assert_eq!(read_line_bounded(&mut r, &mut line, 3).unwrap(), 4, "a line of exactly the limit, newline apart");
        assert_eq!(line, b"abc\n");
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
