//! `chat serve`: an OpenAI-compatible HTTP server on one bundle.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (with `stream` as
//! server-sent events), `GET /v1/models`, `GET /health`, and at `/` a chat page that streams
//! answers. One [`Model`] (weights, code, threads, tokenizer) serves every request; each
//! generation runs on a [`Session`] of its own (arena and KV cache), taken from a pool of at
//! most `--max-sessions` and kept afterwards with its cache, so a conversation's next turn
//! reuses the prefix it shares with the previous one. Requests beyond the sessions wait in a
//! bounded queue; beyond the queue they get `503`.
//!
//! Every request is untrusted input: bodies are bounded (`413`), JSON is checked field by
//! field with the error naming the field (`400`), an unknown model is `404`, a prompt that does
//! not fit the context is `400` with code `context_length_exceeded`, and the server keeps
//! serving. A streaming client that goes away stops its generation at the next token.
//! Prompts are not logged.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use runtime::chat_template::Message;
use runtime::sampling::SamplerConfig;
use runtime::session::{GenerateOptions, Model, Session, StopReason, TokenEvent};
use serde_json::{json, Map, Value};

use crate::BundleArgs;

/// Options of `chat serve`.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// Address to listen on (port 0: any free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Generations running at once, each with its own KV cache.
    #[arg(long, default_value_t = 4)]
    pub max_sessions: usize,
    /// Requests that may wait for a session; more get 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// The model id clients name (default: the bundle's model name).
    #[arg(long)]
    pub model_name: Option<String>,
}

/// An error as the OpenAI API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }

    pub fn json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Which endpoint a generation request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// A checked generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub endpoint: Endpoint,
    /// Chat: the conversation; completion: empty.
    pub messages: Vec<Message>,
    /// Completion: the prompt text or token ids.
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// None: no log-probabilities; Some(k): the chosen token's and the k most likely.
    pub logprobs: Option<usize>,
    /// Generate past end-of-turn tokens (`ignore_eos`, as llama.cpp's and vLLM's servers take it).
    pub ignore_eos: bool,
}

impl GenRequest {
    fn options(&self, max_tokens: usize) -> GenerateOptions {
        GenerateOptions { max_tokens, logprobs: self.logprobs, ignore_eos: self.ignore_eos }
    }
}

#[derive(Clone, Debug, Default)]
pub enum Prompt {
    #[default]
    None,
    Text(String),
    Ids(Vec<u32>),
}

fn field<'a>(body: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn number(body: &Map<String, Value>, name: &str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid(name, format!("'{name}' must be between {lo} and {hi}, got {x}"))),
            None => Err(ApiError::invalid(name, format!("'{name}' must be a number, got {v}"))),
        },
    }
}

fn integer(body: &Map<String, Value>, name: &str, lo: u64, hi: u64) -> ApiResult<Option<u64>> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::invalid(name, format!("'{name}' must be an integer from {lo} to {hi}, got {v}"))),
        },
    }
}

fn boolean(body: &Map<String, Value>, name: &str) -> ApiResult<bool> {
    match field(body, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid(name, format!("'{name}' must be a boolean, got {v}"))),
    }
}

/// The text of a message's `content`: a string, or an array of `{"type": "text", "text": ...}`.
fn content_text(v: &Value, at: &str) -> ApiResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{at}[{i}]"),
                            format!("{at}[{i}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        other => Err(ApiError::invalid(at, format!("{at} must be a string or an array of text parts, got {other}"))),
    }
}

/// Checks a request body against what kiln implements of the OpenAI API. Unknown fields are
/// ignored, as OpenAI's own server does with fields it does not know; known fields with values
/// kiln cannot honour (`n` > 1, non-text content) are errors.
pub fn parse_request(endpoint: Endpoint, body: &[u8], model_name: &str) -> ApiResult<GenRequest> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "invalid_request_error", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ApiError::new(400, "invalid_request_error", "the body must be a JSON object"));
    };
    match field(&body, "model") {
        None => {}
        Some(Value::String(m)) if m == model_name || m == "kiln" => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                status: 404,
                message: format!("The model '{m}' does not exist; this server serves '{model_name}'"),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            })
        }
        Some(v) => return Err(ApiError::invalid("model", format!("'model' must be a string, got {v}"))),
    }
    let mut req = GenRequest {
        endpoint,
        messages: vec![],
        prompt: Prompt::None,
        max_tokens: None,
        sampler: SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, ..SamplerConfig::default() },
        stop: vec![],
        stream: boolean(&body, "stream")?,
        include_usage: false,
        logprobs: None,
        ignore_eos: boolean(&body, "ignore_eos")?,
    };
    match endpoint {
        Endpoint::Chat => {
            let Some(Value::Array(messages)) = field(&body, "messages") else {
                return Err(ApiError::invalid("messages", "'messages' must be a non-empty array of messages"));
            };
            if messages.is_empty() {
                return Err(ApiError::invalid("messages", "'messages' must not be empty"));
            }
            for (i, m) in messages.iter().enumerate() {
                let at = format!("messages[{i}]");
                let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                if !["system", "developer", "user", "assistant"].contains(&role) {
                    return Err(ApiError::invalid(
                        &format!("{at}.role"),
                        format!("{at}.role must be system, developer, user or assistant, got {}", m["role"]),
                    ));
                }
                let content = match m.get("content") {
                    None | Some(Value::Null) if role == "assistant" => String::new(),
                    Some(v) => content_text(v, &format!("{at}.content"))?,
                    None => return Err(ApiError::invalid(&format!("{at}.content"), format!("{at} has no content"))),
                };
                let role = if role == "developer" { "system" } else { role };
                req.messages.push(Message::new(role, content));
            }
            req.max_tokens = match integer(&body, "max_completion_tokens", 1, u32::MAX as u64)? {
                Some(n) => Some(n as usize),
                None => integer(&body, "max_tokens", 1, u32::MAX as u64)?.map(|n| n as usize),
            };
            if boolean(&body, "logprobs")? {
                req.logprobs = Some(integer(&body, "top_logprobs", 0, 20)?.unwrap_or(0) as usize);
            } else if field(&body, "top_logprobs").is_some() {
                return Err(ApiError::invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true"));
            }
        }
        Endpoint::Completion => {
            req.prompt = match field(&body, "prompt") {
                Some(Value::String(s)) => Prompt::Text(s.clone()),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
                }
                Some(Value::Array(a))
                    if !a.is_empty() && a.iter().all(|x| x.as_u64().is_some_and(|x| x <= u32::MAX as u64)) =>
                {
                    Prompt::Ids(a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect())
                }
                _ => {
                    return Err(ApiError::invalid(
                        "prompt",
                        "'prompt' must be a string, an array of one string, or an array of token ids",
                    ))
                }
            };
            req.max_tokens = Some(integer(&body, "max_tokens", 1, u32::MAX as u64)?.unwrap_or(16) as usize);
            req.logprobs = integer(&body, "logprobs", 0, 5)?.map(|k| k as usize);
        }
    }
    if let Some(n) = integer(&body, "n", 1, u64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    if let Some(t) = number(&body, "temperature", 0.0, 2.0)? {
        req.sampler.temperature = t as f32;
    }
    if let Some(p) = number(&body, "top_p", 0.0, 1.0)? {
        if p == 0.0 {
            return Err(ApiError::invalid("top_p", "'top_p' must be greater than 0"));
        }
        req.sampler.top_p = p as f32;
    }
    if let Some(seed) = field(&body, "seed") {
        req.sampler.seed = match (seed.as_u64(), seed.as_i64()) {
            (Some(s), _) => s,
            (None, Some(s)) => s as u64,
            _ => return Err(ApiError::invalid("seed", format!("'seed' must be an integer, got {seed}"))),
        };
    } else {
        req.sampler.seed = fresh_seed();
    }
    req.stop = match field(&body, "stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).map(str::to_string).collect()
        }
        Some(v) => {
            return Err(ApiError::invalid("stop", format!("'stop' must be a string or up to 4 strings, got {v}")))
        }
    };
    if req.stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if let Some(opts) = field(&body, "stream_options") {
        if !req.stream {
            return Err(ApiError::invalid("stream_options", "'stream_options' needs 'stream': true"));
        }
        req.include_usage = opts.get("include_usage").and_then(Value::as_bool).unwrap_or(false);
    }
    req.sampler
        .validate()
        .map_err(|e| ApiError::new(400, "invalid_request_error", format!("invalid sampling parameters: {e}")))?;
    Ok(req)
}

/// A seed for a request that gives none: different for every request.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E3779B97F4A7C15)
}

/// Holds back generated text that could be the beginning of a stop string, and cuts the text
/// at the first stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, pending: String::new() }
    }

    /// Adds `piece`; returns the text that is safe to emit and whether a stop string was met
    /// (the text before it is emitted, the stop string and what follows are dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// The text held back when the generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Sessions shared by the request threads.
struct Pool {
    model: Model,
    max: usize,
    max_queue: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Session>,
    busy: usize,
    waiting: usize,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session for `prompt`: the idle one whose cache shares the longest prefix with it, a
    /// new one while fewer than `max` exist, or the next one freed (`503` when the queue is
    /// full).
    fn take(&self, prompt: &[u32]) -> ApiResult<Lease<'_>> {
        let mut st = self.lock();
        if st.busy >= self.max && st.waiting >= self.max_queue {
            return Err(ApiError::new(
                503,
                "server_error",
                "the server is busy: every session and queue place is taken",
            ));
        }
        st.waiting += 1;
        while st.busy >= self.max {
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.waiting -= 1;
        st.busy += 1;
        let shared = |s: &Session| s.cached_tokens().iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let best = (0..st.idle.len()).max_by_key(|&i| shared(&st.idle[i]));
        let reused = best.map(|i| st.idle.swap_remove(i));
        drop(st);
        let mut lease = Lease { pool: self, session: reused };
        if lease.session.is_none() {
            let fresh = Session::new(&self.model)
                .map_err(|e| ApiError::new(500, "server_error", format!("cannot open a session: {e}")))?;
            lease.session = Some(fresh);
        }
        Ok(lease)
    }

    fn give_back(&self, session: Option<Session>) {
        let mut st = self.lock();
        st.busy -= 1;
        st.idle.extend(session);
        drop(st);
        self.freed.notify_one();
    }

    fn status(&self) -> (usize, usize, usize) {
        let st = self.lock();
        (st.busy, st.idle.len(), st.waiting)
    }
}

/// A session taken from the pool, given back when dropped; a request thread that panicked
/// gives back only its place (its session's state is unknown).
struct Lease<'a> {
    pool: &'a Pool,
    session: Option<Session>,
}

impl Lease<'_> {
    fn session(&mut self) -> &mut Session {
        self.session.as_mut().expect("a lease holds a session until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let session = if std::thread::panicking() { None } else { self.session.take() };
        self.pool.give_back(session);
    }
}

/// Decrements the count of request threads when the thread ends, even by a panic.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The server's state.
pub struct Server {
    pool: Pool,
    name: String,
    fingerprint: String,
    max_body: usize,
    created: u64,
    ids: AtomicU64,
    /// Request threads alive, bounded by sessions + queue + a margin for cheap requests.
    in_flight: AtomicUsize,
    counters: Counters,
}

/// What `/health` reports besides the sessions.
#[derive(Default)]
struct Counters {
    /// Generation requests answered (whole or streamed to the end).
    completed: AtomicU64,
    /// Streams whose client went away before the end (their generation stopped).
    cancelled: AtomicU64,
    /// Requests refused with a 4xx or 5xx status.
    errors: AtomicU64,
    /// Tokens generated.
    generated_tokens: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Server {
    pub fn new(model: Model, a: &ServeArgs) -> Result<Self> {
        anyhow::ensure!(a.max_sessions >= 1, "--max-sessions must be at least 1");
        let manifest = model.manifest();
        let name = a.model_name.clone().unwrap_or_else(|| manifest.model.name.clone());
        let fingerprint = manifest.fingerprint.clone().unwrap_or_default();
        Ok(Server {
            pool: Pool {
                model,
                max: a.max_sessions,
                max_queue: a.max_queue,
                state: Mutex::new(PoolState::default()),
                freed: Condvar::new(),
            },
            name,
            fingerprint: format!("kiln-{}", &fingerprint[..fingerprint.len().min(12)]),
            max_body: a.max_body_bytes,
            created: now_secs(),
            ids: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            counters: Counters::default(),
        })
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:06x}", self.created, self.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// Serves requests from `listener` until it fails.
    pub fn run(self: Arc<Self>, http: tiny_http::Server) -> Result<()> {
        let max_threads = self.pool.max + self.pool.max_queue + 16;
        for request in http.incoming_requests() {
            if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max_threads {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                let e = ApiError::new(503, "server_error", "the server is busy: too many open requests");
                self.fail(request, e);
                continue;
            }
            let server = Arc::clone(&self);
            let spawned = std::thread::Builder::new().name("kiln-serve".into()).spawn(move || {
                let _in_flight = InFlight(&server.in_flight);
                server.handle(request);
            });
            if spawned.is_err() {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn handle(&self, mut request: tiny_http::Request) {
        let path = request.url().split('?').next().unwrap_or("").to_string();
        let method = request.method().clone();
        use tiny_http::Method::{Get, Post};
        let endpoint = match (&method, path.as_str()) {
            (Get, "/") => return respond(request, html_response(CHAT_PAGE)),
            (Get, "/health") => {
                let (busy, idle, waiting) = self.pool.status();
                let c = &self.counters;
                let v = json!({"status": "ok", "model": self.name, "sessions": {"busy": busy, "idle": idle,
                    "max": self.pool.max, "waiting": waiting}, "requests": {
                    "completed": c.completed.load(Ordering::Relaxed),
                    "cancelled": c.cancelled.load(Ordering::Relaxed),
                    "errors": c.errors.load(Ordering::Relaxed),
                    "generated_tokens": c.generated_tokens.load(Ordering::Relaxed)}});
                return respond(request, json_response(200, &v));
            }
            (Get, "/v1/models") => {
                let v = json!({"object": "list", "data": [{"id": self.name, "object": "model",
                    "created": self.created, "owned_by": "kiln"}]});
                return respond(request, json_response(200, &v));
            }
            (Post, "/v1/chat/completions") => Endpoint::Chat,
            (Post, "/v1/completions") => Endpoint::Completion,
            (_, "/" | "/health" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => {
                let e = ApiError::new(405, "invalid_request_error", format!("{method} is not allowed on {path}"));
                return self.fail(request, e);
            }
            _ => {
                let e = ApiError::new(404, "invalid_request_error", format!("no such endpoint: {method} {path}"));
                return self.fail(request, e);
            }
        };
        let body = match self.read_body(&mut request) {
            Ok(b) => b,
            Err(e) => return self.fail(request, e),
        };
        let req = match parse_request(endpoint, &body, &self.name) {
            Ok(r) => r,
            Err(e) => return self.fail(request, e),
        };
        if let Err(e) = self.generate(request, req) {
            eprintln!("serve: {e:#}");
        }
    }

    /// Answers `request` with `e` (OpenAI's error object).
    fn fail(&self, request: tiny_http::Request, e: ApiError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        respond(request, json_response(e.status, &e.json()));
    }

    fn read_body(&self, request: &mut tiny_http::Request) -> ApiResult<Vec<u8>> {
        let too_big =
            || ApiError::new(413, "invalid_request_error", format!("the body is larger than {} bytes", self.max_body));
        if request.body_length().is_some_and(|n| n > self.max_body) {
            return Err(too_big());
        }
        let mut body = vec![];
        request
            .as_reader()
            .take(self.max_body as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| ApiError::new(400, "invalid_request_error", format!("cannot read the body: {e}")))?;
        if body.len() > self.max_body {
            return Err(too_big());
        }
        Ok(body)
    }

    /// Tokenizes the request's prompt and checks it against the context.
    fn prompt_ids(&self, req: &GenRequest) -> ApiResult<(Vec<u32>, usize)> {
        let model = &self.pool.model;
        let text = match (&req.endpoint, &req.prompt) {
            (Endpoint::Chat, _) => Some(
                model
                    .render_chat(&req.messages)
                    .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))?,
            ),
            (Endpoint::Completion, Prompt::Text(t)) => Some(t.clone()),
            (Endpoint::Completion, _) => None,
        };
        let ids = match (text, &req.prompt) {
            (Some(t), _) => model.tokenize(&t).map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
            (None, Prompt::Ids(ids)) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= model.vocab()) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {}", model.vocab()),
                    ));
                }
                ids.clone()
            }
            (None, _) => return Err(ApiError::invalid("prompt", "no prompt")),
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        let context = model.context();
        let room = context.saturating_sub(ids.len());
        let max_tokens = req.max_tokens.unwrap_or(room);
        if room == 0 || max_tokens > room {
            return Err(ApiError {
                status: 400,
                message: format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                     ({} in the prompt, {max_tokens} for the completion). Please reduce the prompt or the completion.",
                    ids.len() + max_tokens.max(1),
                    ids.len()
                ),
                kind: "invalid_request_error",
                param: Some(if req.endpoint == Endpoint::Chat { "messages" } else { "prompt" }.into()),
                code: Some("context_length_exceeded"),
            });
        }
        Ok((ids, max_tokens))
    }

    fn generate(&self, request: tiny_http::Request, req: GenRequest) -> Result<()> {
        let (ids, max_tokens) = match self.prompt_ids(&req) {
            Ok(x) => x,
            Err(e) => {
                self.fail(request, e);
                return Ok(());
            }
        };
        let mut lease = match self.pool.take(&ids) {
            Ok(s) => s,
            Err(e) => {
                self.fail(request, e);
                return Ok(());
            }
        };
        if req.stream {
            self.stream(request, &req, lease.session(), &ids, max_tokens)
        } else {
            self.complete(request, &req, lease.session(), &ids, max_tokens)
        }
    }

    fn object(&self, req: &GenRequest, chunk: bool) -> (&'static str, String) {
        match (req.endpoint, chunk) {
            (Endpoint::Chat, false) => ("chat.completion", self.next_id("chatcmpl")),
            (Endpoint::Chat, true) => ("chat.completion.chunk", self.next_id("chatcmpl")),
            (Endpoint::Completion, _) => ("text_completion", self.next_id("cmpl")),
        }
    }

    fn complete(
        &self,
        request: tiny_http::Request,
        req: &GenRequest,
        session: &mut Session,
        ids: &[u32],
        max_tokens: usize,
    ) -> Result<()> {
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut text = String::new();
        let mut logprobs = LogprobsOut::new(&self.pool.model, req);
        let outcome = session.generate_with(ids, &req.options(max_tokens), &req.sampler, |e| {
            logprobs.add(e, text.len());
            let (out, stop) = stops.push(e.text);
            text.push_str(&out);
            if stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        let (generated, stats) = match outcome {
            Ok(x) => x,
            Err(e) => {
                let e = ApiError::new(500, "server_error", format!("generation failed: {e}"));
                self.fail(request, e);
                return Ok(());
            }
        };
        text.push_str(&stops.finish());
        let finish = finish_reason(stats.stopped_by);
        let (object, id) = self.object(req, false);
        let usage = json!({"prompt_tokens": ids.len(), "completion_tokens": generated.len(),
            "total_tokens": ids.len() + generated.len()});
        let choice = match req.endpoint {
            Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs.json(), "finish_reason": finish}),
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": logprobs.json(),
                "finish_reason": finish}),
        };
        let v = json!({"id": id, "object": object, "created": now_secs(), "model": self.name,
            "system_fingerprint": self.fingerprint, "choices": [choice], "usage": usage});
        self.counters.generated_tokens.fetch_add(generated.len() as u64, Ordering::Relaxed);
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        respond(request, json_response(200, &v));
        Ok(())
    }

    fn stream(
        &self,
        request: tiny_http::Request,
        req: &GenRequest,
        session: &mut Session,
        ids: &[u32],
        max_tokens: usize,
    ) -> Result<()> {
        let mut out = EventStream::start(request)?;
        let (object, id) = self.object(req, true);
        let created = now_secs();
        let chunk = |choice: Value| {
            json!({"id": id, "object": object, "created": created, "model": self.name,
                "system_fingerprint": self.fingerprint, "choices": [choice]})
        };
        let send = |out: &mut EventStream, v: &Value| out.send(format!("data: {v}\n\n").as_bytes());
        if req.endpoint == Endpoint::Chat {
            let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                "finish_reason": null});
            send(&mut out, &chunk(first))?;
        }
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut gone = false;
        let mut tokens = 0u64;
        let mut sent = 0usize;
        let piece_of = |text: &str, logprobs: Value, out: &mut EventStream| -> bool {
            if text.is_empty() && logprobs.is_null() {
                return true;
            }
            let choice = match req.endpoint {
                Endpoint::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": logprobs,
                    "finish_reason": null}),
                Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": logprobs,
                    "finish_reason": null}),
            };
            send(out, &chunk(choice)).is_ok()
        };
        let mut logprobs = LogprobsOut::new(&self.pool.model, req);
        let outcome = session.generate_with(ids, &req.options(max_tokens), &req.sampler, |e| {
            tokens += u64::from(e.id.is_some());
            logprobs.add(e, sent);
            let (text, stop) = stops.push(e.text);
            if !piece_of(&text, logprobs.take_json(), &mut out) {
                gone = true; // the client went away: stop generating
                return ControlFlow::Break(());
            }
            sent += text.len();
            if stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        self.counters.generated_tokens.fetch_add(tokens, Ordering::Relaxed);
        if gone {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let (generated, stats) = match outcome {
            Ok(x) => x,
            Err(e) => {
                let e = ApiError::new(500, "server_error", format!("generation failed: {e}"));
                send(&mut out, &e.json())?;
                return Ok(());
            }
        };
        let rest = stops.finish();
        if !piece_of(&rest, Value::Null, &mut out) {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let finish = finish_reason(stats.stopped_by);
        let last = match req.endpoint {
            Endpoint::Chat => json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}),
            Endpoint::Completion => json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish}),
        };
        send(&mut out, &chunk(last))?;
        if req.include_usage {
            let mut v = chunk(json!(null));
            v["choices"] = json!([]);
            v["usage"] = json!({"prompt_tokens": ids.len(), "completion_tokens": generated.len(),
                "total_tokens": ids.len() + generated.len()});
            send(&mut out, &v)?;
        }
        out.send(b"data: [DONE]\n\n")?;
        out.finish()?;
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A server-sent event stream: chunked transfer encoding on HTTP/1.1, so that the connection
/// can carry the client's next request; on HTTP/1.0 the body ends when the connection closes.
struct EventStream {
    out: Box<dyn Write + Send>,
    chunked: bool,
}

impl EventStream {
    fn start(request: tiny_http::Request) -> std::io::Result<Self> {
        let chunked = *request.http_version() != tiny_http::HTTPVersion(1, 0);
        let mut out = request.into_writer();
        let framing = if chunked { "Transfer-Encoding: chunked" } else { "Connection: close" };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             X-Accel-Buffering: no\r\n{framing}\r\n\r\n"
        );
        out.write_all(head.as_bytes())?;
        out.flush()?;
        Ok(EventStream { out, chunked })
    }

    /// Sends `data` at once (an error means the client went away).
    fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.chunked {
            self.out.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
            self.out.write_all(data)?;
            self.out.write_all(b"\r\n")?;
        } else {
            self.out.write_all(data)?;
        }
        self.out.flush()
    }

    /// Ends the body.
    fn finish(mut self) -> std::io::Result<()> {
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}

/// OpenAI's `finish_reason`: `stop` for a stop token or string, `length` for the token limit
/// or the end of the context.
fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::StopToken | StopReason::Caller => "stop",
    }
}

/// Log-probabilities in the endpoint's format (chat: `content` entries; completions: parallel
/// `tokens`/`token_logprobs`/`top_logprobs`/`text_offset` arrays).
struct LogprobsOut<'m> {
    model: &'m Model,
    endpoint: Endpoint,
    on: bool,
    content: Vec<Value>,
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top: Vec<Value>,
    offsets: Vec<Value>,
}

impl<'m> LogprobsOut<'m> {
    fn new(model: &'m Model, req: &GenRequest) -> Self {
        LogprobsOut {
            model,
            endpoint: req.endpoint,
            on: req.logprobs.is_some(),
            content: vec![],
            tokens: vec![],
            token_logprobs: vec![],
            top: vec![],
            offsets: vec![],
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.model.tokenizer().decode_with(&[id], false).unwrap_or_default()
    }

    fn add(&mut self, e: &TokenEvent, offset: usize) {
        let (true, Some(id), Some(lp)) = (self.on, e.id, e.logprob) else { return };
        let token = self.token_text(id);
        match self.endpoint {
            Endpoint::Chat => {
                let top: Vec<Value> = e
                    .top_logprobs
                    .iter()
                    .map(|&(t, l)| {
                        let s = self.token_text(t);
                        json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
                    })
                    .collect();
                self.content.push(json!({"token": token, "logprob": lp, "bytes": token.as_bytes(),
                    "top_logprobs": top}));
            }
            Endpoint::Completion => {
                let top: Map<String, Value> =
                    e.top_logprobs.iter().map(|&(t, l)| (self.token_text(t), json!(l))).collect();
                self.tokens.push(json!(token));
                self.token_logprobs.push(json!(lp));
                self.top.push(Value::Object(top));
                self.offsets.push(json!(offset));
            }
        }
    }

    fn json(&self) -> Value {
        if !self.on {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Chat => json!({"content": self.content}),
            Endpoint::Completion => json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top, "text_offset": self.offsets}),
        }
    }

    /// The entries added since the last call (streaming sends them with each chunk).
    fn take_json(&mut self) -> Value {
        let v = self.json();
        self.content.clear();
        self.tokens.clear();
        self.token_logprobs.clear();
        self.top.clear();
        self.offsets.clear();
        if self.on && v.get("content").is_some_and(|c| c.as_array().is_some_and(Vec::is_empty)) {
            return Value::Null;
        }
        if self.on && v.get("tokens").is_some_and(|c| c.as_array().is_some_and(Vec::is_empty)) {
            return Value::Null;
        }
        v
    }
}

fn json_response(status: u16, v: &Value) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("a valid header");
    tiny_http::Response::from_data(serde_json::to_vec(v).unwrap_or_default())
        .with_status_code(status)
        .with_header(header)
}

fn html_response(page: &str) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/html; charset=utf-8"[..]).expect("a valid header");
    tiny_http::Response::from_data(page.as_bytes().to_vec()).with_header(header)
}

fn respond(request: tiny_http::Request, response: tiny_http::Response<std::io::Cursor<Vec<u8>>>) {
    let _ = request.respond(response); // a client that went away needs no answer
}

/// `chat serve`: loads the bundle once and serves until killed.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let started = Instant::now();
    let model = crate::open_model(&a.bundle.bundle, a.bundle.threads)?;
    let server = Arc::new(Server::new(model, a)?);
    let http = tiny_http::Server::http(&a.addr).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", a.addr))?;
    let addr = http.server_addr().to_ip().context("the server is not on an IP address")?;
    println!(
        "serving {} at http://{addr}/ (OpenAI API under /v1; {} sessions; loaded in {:.2} s)",
        server.name,
        a.max_sessions,
        started.elapsed().as_secs_f64()
    );
    std::io::stdout().flush()?;
    server.run(http)
}

/// The chat page at `/`: streams answers from `/v1/chat/completions` (no network beyond this
/// server). `?q=TEXT` sends TEXT at load; `#status` reads `done` when an answer has ended.
const CHAT_PAGE: &str = include_str!("serve_page.html");
