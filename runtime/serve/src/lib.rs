//! `chat serve`: an OpenAI-compatible HTTP server on one bundle, made to face a network.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (with `stream` as
//! server-sent events), `GET /v1/models`, `GET /health`, and at `/` a chat page that streams
//! answers. One `Model` (weights, code, threads, tokenizer) serves every request; each
//! generation runs on a session of the pool (`pool.rs`: `--max-sessions`, a bounded queue with
//! a timeout, prefix reuse).
//!
//! Every byte of a request is untrusted. Before a request reaches the model:
//! - the HTTP limits of `http.rs` (connections, header and body sizes, read and write
//!   timeouts) have held;
//! - on a loopback address, the `Host` header names a loopback host (403 otherwise: a web
//!   page cannot reach the server through DNS rebinding);
//! - with `--api-key`, every `/v1/*` route needs `Authorization: Bearer KEY` (401 with
//!   OpenAI's error object; compared in constant time); `/health` and the page stay open;
//! - JSON routes need `Content-Type: application/json` (415: a browser cannot send one
//!   across origins without a preflight, which is answered only for `--cors-origin`);
//! - bodies are bounded (413), JSON is checked field by field (`api.rs`, 400 naming the
//!   field), an unknown model is 404, a prompt that does not fit the context is 400 with code
//!   `context_length_exceeded`.
//!
//! Message contents are tokenized as text: a control token spelled in a message stays text
//! (`Model::chat_ids`). A client that goes away stops its generation at the next token,
//! streamed or not. Prompts are not logged.

mod api;
mod http;
mod pool;

use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use runtime::session::Session;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use api::{finish_reason, ApiResult, LogprobsOut};
pub use api::{parse_request, ApiError, Endpoint, GenRequest, Prompt, StopMatcher};
use http::{ConnectionCounters, HttpResponse, Limits, ResponseBody};
use pool::{Lease, Pool};

use runtime::cli::BundleArgs;

/// The environment variable `serve` reads its API key from when no flag gives one.
pub const API_KEY_ENV: &str = "KILN_API_KEY";

/// Options of `chat serve`.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// Host to listen on: 127.0.0.1 (the default) is this machine only, 0.0.0.0 every interface.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// HOST:PORT in one, instead of --host and --port.
    #[arg(long, conflicts_with_all = ["host", "port"])]
    pub addr: Option<String>,
    /// Generations running at once, each with its own KV cache.
    #[arg(long, default_value_t = 4)]
    pub max_sessions: usize,
    /// Requests that may wait for a session; more get 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Seconds a request may wait for a session before it gets 503 with Retry-After.
    #[arg(long, default_value_t = 60.0)]
    pub queue_timeout: f64,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Connections open at once; more are closed as they arrive.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a request's headers, and then its body, may take to arrive; also how long a
    /// connection may sit idle between requests.
    #[arg(long, default_value_t = 30.0)]
    pub read_timeout: f64,
    /// Seconds a client may take nothing of its response (a stream included) before it is
    /// cut off and its generation stopped.
    #[arg(long, default_value_t = 30.0)]
    pub write_timeout: f64,
    /// Seconds requests in flight may take to finish after SIGINT or SIGTERM.
    #[arg(long, default_value_t = 10.0)]
    pub shutdown_grace: f64,
    /// The API key clients must send (`Authorization: Bearer KEY`) on /v1/*; also read from
    /// --api-key-file or the environment variable KILN_API_KEY. None: the API is open.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// A file whose first line is the API key.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// An origin whose web pages may call the API (CORS), such as https://app.example.com;
    /// repeatable; `*` allows any. None: no CORS headers, browsers keep other origins out.
    #[arg(long)]
    pub cors_origin: Vec<String>,
    /// The model id clients name (default: the bundle's model name).
    #[arg(long)]
    pub model_name: Option<String>,
}

impl ServeArgs {
    /// The address to listen on: `--addr`, or `--host` and `--port`.
    pub fn listen_addr(&self) -> String {
        match &self.addr {
            Some(a) => a.clone(),
            None if self.host.contains(':') && !self.host.starts_with('[') => format!("[{}]:{}", self.host, self.port),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    /// Checks every option that needs no bundle: limits, timeouts and the key.
    pub fn check(&self) -> Result<()> {
        self.checked().map(drop)
    }

    /// The HTTP limits and the API key, once every option is checked.
    fn checked(&self) -> Result<(Limits, Option<String>)> {
        let limits = self.limits()?;
        anyhow::ensure!(self.max_sessions >= 1, "--max-sessions must be at least 1");
        anyhow::ensure!(
            self.queue_timeout.is_finite() && self.queue_timeout > 0.0 && self.queue_timeout <= 86_400.0,
            "--queue-timeout must be between 0 and 86400 seconds"
        );
        Ok((limits, self.api_key()?))
    }

    fn limits(&self) -> Result<Limits> {
        let secs = |name: &str, v: f64| -> Result<Duration> {
            anyhow::ensure!(v.is_finite() && v > 0.0 && v <= 86_400.0, "--{name} must be between 0 and 86400 seconds");
            Ok(Duration::from_secs_f64(v))
        };
        anyhow::ensure!(self.max_connections >= 1, "--max-connections must be at least 1");
        Ok(Limits {
            max_connections: self.max_connections,
            read_timeout: secs("read-timeout", self.read_timeout)?,
            write_timeout: secs("write-timeout", self.write_timeout)?,
            max_body: self.max_body_bytes,
            shutdown_grace: secs("shutdown-grace", self.shutdown_grace)?,
        })
    }

    /// The API key from the flag, the file or the environment, in that order.
    fn api_key(&self) -> Result<Option<String>> {
        let key = if let Some(k) = &self.api_key {
            Some(k.clone())
        } else if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the API key file {}", path.display()))?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        } else {
            std::env::var(API_KEY_ENV).ok()
        };
        match key {
            Some(k) if k.is_empty() => anyhow::bail!("the API key is empty"),
            Some(k) if k.chars().any(|c| c.is_control() || c == ' ') => {
                anyhow::bail!("the API key holds spaces or control characters")
            }
            k => Ok(k),
        }
    }
}

/// The server's state, shared by every request.
struct Server {
    pool: Arc<Pool>,
    name: String,
    fingerprint: String,
    /// The body size and the read and write timeouts apply to requests here too.
    limits: Limits,
    created: u64,
    ids: AtomicU64,
    /// SHA-256 of the API key: requests are compared digest to digest, in constant time.
    key_digest: Option<[u8; 32]>,
    cors: Vec<String>,
    /// Bound to a loopback address: the Host header must name a loopback host.
    loopback: bool,
    counters: Counters,
    connections: Arc<ConnectionCounters>,
}

/// What `/health` reports besides the sessions.
#[derive(Default)]
struct Counters {
    /// Generation requests answered (whole or streamed to the end).
    completed: AtomicU64,
    /// Generations whose client went away before the end (they stopped).
    cancelled: AtomicU64,
    /// Requests refused with a 4xx or 5xx status.
    errors: AtomicU64,
    /// Tokens generated.
    generated_tokens: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Equal digests, by a comparison whose time does not depend on where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a Host header names this machine's loopback (any port): `localhost`, a name under
/// `.localhost`, 127.0.0.0/8 or `[::1]`.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a Content-Type is JSON (`application/json`, parameters such as charset allowed).
fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

fn json_response(status: u16, v: &Value) -> HttpResponse {
    let mut r = Response::new(ResponseBody::Full(serde_json::to_vec(v).unwrap_or_default().into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> HttpResponse {
    let mut r = json_response(e.status, &e.json());
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if e.status == 401 {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// Sets a flag when dropped: the request's future was dropped because its client went away.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Server {
    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:06x}", self.created, self.ids.fetch_add(1, Ordering::Relaxed))
    }

    fn fail(&self, e: ApiError) -> HttpResponse {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        error_response(&e)
    }

    /// Answers one request (never fails: errors are responses).
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut response = self.route(req).await;
        if let Some(allowed) = origin.as_deref().and_then(|o| self.cors_allows(o)) {
            let h = response.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        response
    }

    /// The Access-Control-Allow-Origin value for a request from `origin`, if `--cors-origin`
    /// allows it.
    fn cors_allows(&self, origin: &str) -> Option<HeaderValue> {
        if self.cors.iter().any(|c| c == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        self.cors.iter().any(|c| c == origin).then(|| HeaderValue::from_str(origin).ok()).flatten()
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        if self.loopback {
            if let Some(host) = req.headers().get(header::HOST) {
                if !host.to_str().is_ok_and(loopback_host) {
                    return self.fail(ApiError::new(
                        403,
                        "invalid_request_error",
                        "this server listens on loopback and answers only requests addressed to a loopback host \
                         (localhost, 127.0.0.1, [::1])",
                    ));
                }
            }
        }
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let api = path.starts_with("/v1/");
        if method == Method::OPTIONS && api {
            return self.preflight(&req);
        }
        if api {
            if let Err(e) = self.authorize(&req) {
                return self.fail(e);
            }
        }
        let endpoint = match (&method, path.as_str()) {
            (&Method::GET, "/") => {
                let mut r = Response::new(ResponseBody::Full(CHAT_PAGE.as_bytes().to_vec().into()));
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
                return r;
            }
            (&Method::GET, "/health") => return json_response(200, &self.health()),
            (&Method::GET, "/v1/models") => {
                let v = json!({"object": "list", "data": [{"id": self.name, "object": "model",
                    "created": self.created, "owned_by": "kiln"}]});
                return json_response(200, &v);
            }
            (&Method::POST, "/v1/chat/completions") => Endpoint::Chat,
            (&Method::POST, "/v1/completions") => Endpoint::Completion,
            (_, "/" | "/health" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => {
                return self.fail(ApiError::new(
                    405,
                    "invalid_request_error",
                    format!("{method} is not allowed on {path}"),
                ));
            }
            _ => {
                return self.fail(ApiError::new(
                    404,
                    "invalid_request_error",
                    format!("no such endpoint: {method} {path}"),
                ))
            }
        };
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return self.fail(ApiError::new(
                415,
                "invalid_request_error",
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let body = match http::read_body(req.into_body(), self.limits.max_body, self.limits.read_timeout).await {
            Ok(b) => b,
            Err(e) => return self.fail(e),
        };
        let request = match parse_request(endpoint, &body, &self.name) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        match self.generate(request).await {
            Ok(r) => r,
            Err(e) => self.fail(e),
        }
    }

    /// Checks the API key of a `/v1/*` request.
    fn authorize(&self, req: &Request<Incoming>) -> ApiResult<()> {
        let Some(want) = &self.key_digest else { return Ok(()) };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match given {
            Some(k) if same_digest(&digest(k.as_bytes()), want) => Ok(()),
            given => Err(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(
                    401,
                    "invalid_request_error",
                    if given.is_some() {
                        "Incorrect API key provided."
                    } else {
                        "You didn't provide an API key: send it as `Authorization: Bearer KEY`."
                    },
                )
            }),
        }
    }

    /// A CORS preflight: answered for the origins of `--cors-origin`, refused otherwise.
    fn preflight(&self, req: &Request<Incoming>) -> HttpResponse {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if origin.and_then(|o| self.cors_allows(o)).is_none() {
            return self.fail(ApiError::new(
                403,
                "invalid_request_error",
                "cross-origin requests are not allowed here (serve --cors-origin ORIGIN allows them)",
            ));
        }
        let mut r = Response::new(ResponseBody::Full(Bytes::new().into()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Authorization, Content-Type"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        r
    }

    fn health(&self) -> Value {
        let p = self.pool.status();
        let c = &self.counters;
        let n = &self.connections;
        json!({"status": "ok", "model": self.name,
            "sessions": {"busy": p.busy, "idle": p.idle, "max": self.pool.max, "waiting": p.waiting},
            "requests": {
                "completed": c.completed.load(Ordering::Relaxed),
                "cancelled": c.cancelled.load(Ordering::Relaxed),
                "errors": c.errors.load(Ordering::Relaxed),
                "generated_tokens": c.generated_tokens.load(Ordering::Relaxed)},
            "connections": {
                "open": n.open.load(Ordering::Relaxed),
                "refused": n.refused.load(Ordering::Relaxed),
                "accept_errors": n.accept_errors.load(Ordering::Relaxed)}})
    }

    /// Tokenizes the request's prompt and checks it against the context (blocking).
    fn prompt_ids(&self, req: &GenRequest) -> ApiResult<(Vec<u32>, usize)> {
        let model = &self.pool.model;
        let ids = match (&req.endpoint, &req.prompt) {
            (Endpoint::Chat, _) => model
                .chat_ids(&req.messages)
                .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))?,
            // A raw completion prompt is the caller's own text, control tokens included (as
            // llama.cpp's and vLLM's completion endpoints take it).
            (Endpoint::Completion, Prompt::Text(t)) => {
                model.tokenize(t).map_err(|e| ApiError::invalid("prompt", e.to_string()))?
            }
            (Endpoint::Completion, Prompt::Ids(ids)) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= model.vocab()) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {}", model.vocab()),
                    ));
                }
                ids.clone()
            }
            (Endpoint::Completion, Prompt::None) => return Err(ApiError::invalid("prompt", "no prompt")),
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        let context = model.context();
        let room = context.saturating_sub(ids.len());
        let max_tokens = req.max_tokens.unwrap_or(room);
        if room == 0 || max_tokens > room {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                param: Some(if req.endpoint == Endpoint::Chat { "messages" } else { "prompt" }.into()),
                ..ApiError::new(
                    400,
                    "invalid_request_error",
                    format!(
                        "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                         ({} in the prompt, {max_tokens} for the completion). Please reduce the prompt or the \
                         completion.",
                        ids.len() + max_tokens.max(1),
                        ids.len()
                    ),
                )
            });
        }
        Ok((ids, max_tokens))
    }

    /// Runs a generation: the prompt tokenized, a session taken (waiting in the queue), then
    /// the tokens generated on a blocking thread, streamed or answered whole.
    async fn generate(self: &Arc<Self>, req: GenRequest) -> ApiResult<HttpResponse> {
        let server = Arc::clone(self);
        let (req, ids, max_tokens) = tokio::task::spawn_blocking(move || {
            let (ids, max_tokens) = server.prompt_ids(&req)?;
            Ok::<_, ApiError>((req, ids, max_tokens))
        })
        .await
        .map_err(|e| ApiError::new(500, "server_error", format!("tokenizing failed: {e}")))??;
        let lease = self.pool.take(&ids).await?;
        let server = Arc::clone(self);
        if req.stream {
            // A few events of slack; a client that reads nothing fills it, and the write
            // timeout then closes its connection, which closes this channel.
            let (tx, rx) = mpsc::channel(16);
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || server.stream(lease, &req, &ids, max_tokens, &tx, &runtime));
            let mut r = Response::new(ResponseBody::Events(rx));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            Ok(r)
        } else {
            let cancelled = Arc::new(AtomicBool::new(false));
            let _cancel = CancelOnDrop(Arc::clone(&cancelled));
            let v = tokio::task::spawn_blocking(move || server.complete(lease, &req, &ids, max_tokens, &cancelled))
                .await
                .map_err(|e| ApiError::new(500, "server_error", format!("generation failed: {e}")))??;
            Ok(json_response(200, &v))
        }
    }

    fn object(&self, req: &GenRequest, chunk: bool) -> (&'static str, String) {
        match (req.endpoint, chunk) {
            (Endpoint::Chat, false) => ("chat.completion", self.next_id("chatcmpl")),
            (Endpoint::Chat, true) => ("chat.completion.chunk", self.next_id("chatcmpl")),
            (Endpoint::Completion, _) => ("text_completion", self.next_id("cmpl")),
        }
    }

    /// A whole answer (blocking); stops early when `cancelled` is set.
    fn complete(
        &self,
        mut lease: Lease,
        req: &GenRequest,
        ids: &[u32],
        max_tokens: usize,
        cancelled: &AtomicBool,
    ) -> ApiResult<Value> {
        let session: &mut Session = lease.session()?;
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut text = String::new();
        let mut logprobs = LogprobsOut::new(&self.pool.model, req);
        let mut tokens = 0u64;
        let outcome = session.generate_with(ids, &req.options(max_tokens), &req.sampler, |e| {
            tokens += u64::from(e.id.is_some());
            if cancelled.load(Ordering::Acquire) {
                return ControlFlow::Break(());
            }
            logprobs.add(e, text.len());
            let (out, stop) = stops.push(e.text);
            text.push_str(&out);
            if stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        self.counters.generated_tokens.fetch_add(tokens, Ordering::Relaxed);
        if cancelled.load(Ordering::Acquire) {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(499, "server_error", "the client went away"));
        }
        let (generated, stats) =
            outcome.map_err(|e| ApiError::new(500, "server_error", format!("generation failed: {e}")))?;
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
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        Ok(json!({"id": id, "object": object, "created": now_secs(), "model": self.name,
            "system_fingerprint": self.fingerprint, "choices": [choice], "usage": usage}))
    }

    /// A streamed answer (blocking): each event goes to `tx`; a client that stops taking
    /// them for the write timeout, or goes away, ends the generation.
    fn stream(
        &self,
        mut lease: Lease,
        req: &GenRequest,
        ids: &[u32],
        max_tokens: usize,
        tx: &mpsc::Sender<Bytes>,
        runtime: &tokio::runtime::Handle,
    ) {
        let send_bytes = |event: Bytes| -> bool {
            matches!(runtime.block_on(tokio::time::timeout(self.limits.write_timeout, tx.send(event))), Ok(Ok(())))
        };
        let send = |v: &Value| send_bytes(Bytes::from(format!("data: {v}\n\n")));
        let session = match lease.session() {
            Ok(s) => s,
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                send(&e.json());
                return;
            }
        };
        let (object, id) = self.object(req, true);
        let created = now_secs();
        let chunk = |choice: Value| {
            json!({"id": id, "object": object, "created": created, "model": self.name,
                "system_fingerprint": self.fingerprint, "choices": [choice]})
        };
        let cancelled = || {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        };
        if req.endpoint == Endpoint::Chat {
            let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                "finish_reason": null});
            if !send(&chunk(first)) {
                return cancelled();
            }
        }
        let piece_of = |text: &str, logprobs: Value| -> bool {
            if text.is_empty() && logprobs.is_null() {
                return true;
            }
            let choice = match req.endpoint {
                Endpoint::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": logprobs,
                    "finish_reason": null}),
                Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": logprobs,
                    "finish_reason": null}),
            };
            send(&chunk(choice))
        };
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut gone = false;
        let mut tokens = 0u64;
        let mut sent = 0usize;
        let mut logprobs = LogprobsOut::new(&self.pool.model, req);
        let outcome = session.generate_with(ids, &req.options(max_tokens), &req.sampler, |e| {
            tokens += u64::from(e.id.is_some());
            logprobs.add(e, sent);
            let (text, stop) = stops.push(e.text);
            if !piece_of(&text, logprobs.take_json()) {
                gone = true; // the client went away or stopped reading: stop generating
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
            return cancelled();
        }
        let (generated, stats) = match outcome {
            Ok(x) => x,
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                send(&ApiError::new(500, "server_error", format!("generation failed: {e}")).json());
                return;
            }
        };
        if !piece_of(&stops.finish(), Value::Null) {
            return cancelled();
        }
        let finish = finish_reason(stats.stopped_by);
        let last = match req.endpoint {
            Endpoint::Chat => json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}),
            Endpoint::Completion => json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish}),
        };
        let mut delivered = send(&chunk(last));
        if delivered && req.include_usage {
            let mut v = chunk(json!(null));
            v["choices"] = json!([]);
            v["usage"] = json!({"prompt_tokens": ids.len(), "completion_tokens": generated.len(),
                "total_tokens": ids.len() + generated.len()});
            delivered = send(&v);
        }
        delivered = delivered && send_bytes(Bytes::from_static(b"data: [DONE]\n\n"));
        if delivered {
            self.counters.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            cancelled();
        }
    }
}

/// `chat serve`: loads the bundle once and serves until SIGINT or SIGTERM.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let started = Instant::now();
    let (limits, key) = a.checked()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-serve")
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    let result = runtime.block_on(async {
        let signals = http::Signals::new()?;
        let listener = http::bind(&a.listen_addr()).await?;
        let addr = listener.local_addr()?;
        let model = runtime::cli::open_model(&a.bundle.bundle, a.bundle.threads)?;
        let manifest = model.manifest();
        let name = a.model_name.clone().unwrap_or_else(|| manifest.model.name.clone());
        let fingerprint = manifest.fingerprint.clone().unwrap_or_default();
        let connections = Arc::new(ConnectionCounters::default());
        let server = Arc::new(Server {
            pool: Arc::new(Pool::new(model, a.max_sessions, a.max_queue, Duration::from_secs_f64(a.queue_timeout))),
            name,
            fingerprint: format!("kiln-{}", &fingerprint[..fingerprint.len().min(12)]),
            limits: limits.clone(),
            created: now_secs(),
            ids: AtomicU64::new(0),
            key_digest: key.as_deref().map(|k| digest(k.as_bytes())),
            cors: a.cors_origin.clone(),
            loopback: addr.ip().is_loopback(),
            counters: Counters::default(),
            connections: Arc::clone(&connections),
        });
        if !addr.ip().is_loopback() && key.is_none() {
            eprintln!(
                "warning: serving on {addr}, beyond loopback, without an API key: anyone who can reach this \
                 address can use the model (give --api-key, --api-key-file or {API_KEY_ENV})"
            );
        }
        println!(
            "serving {} at http://{addr}/ (OpenAI API under /v1; {} sessions; {}; loaded in {:.2} s)",
            server.name,
            a.max_sessions,
            if key.is_some() { "API key required" } else { "no API key" },
            started.elapsed().as_secs_f64()
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        let handler = move |req: Request<Incoming>, _peer: SocketAddr| Arc::clone(&server).handle(req);
        http::serve_connections(listener, limits, connections, signals, handler).await
    });
    // Generations still running past the grace period are abandoned with the process.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

/// The chat page at `/`: streams answers from `/v1/chat/completions` (no network beyond this
/// server). `?q=TEXT` sends TEXT at load; `#status` reads `done` when an answer has ended.
const CHAT_PAGE: &str = include_str!("../serve_page.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_from_others() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "127.5.6.7",
            "[::1]:80",
            "[::1]",
            "a.localhost:9",
            "LOCALHOST.",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in ["example.com", "evil.com:8080", "10.0.0.1", "localhost.evil.com", "[::2]:80", "", "127.0.0.1.nip.io"]
        {
            assert!(!loopback_host(h), "{h}");
        }
    }

    #[test]
    fn json_content_types() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_json(Some(&v("application/json"))));
        assert!(is_json(Some(&v("Application/JSON; charset=utf-8"))));
        assert!(!is_json(Some(&v("text/plain"))));
        assert!(!is_json(Some(&v("application/x-www-form-urlencoded"))));
        assert!(!is_json(Some(&v("multipart/form-data; boundary=x"))));
        assert!(!is_json(None));
    }

    #[test]
    fn keys_compare_by_digest() {
        let k = digest(b"sk-kiln-1");
        assert!(same_digest(&digest(b"sk-kiln-1"), &k));
        assert!(!same_digest(&digest(b"sk-kiln-2"), &k));
        assert!(!same_digest(&digest(b""), &k));
    }
}
