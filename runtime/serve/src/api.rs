//! What the OpenAI API says, checked: request bodies parsed field by field into a
//! [`GenRequest`], errors as OpenAI's error object, stop strings and log-probabilities in the
//! endpoints' formats. No I/O here: the HTTP side is in `http.rs`, generation in `mod.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use runtime::chat_template::Message;
use runtime::sampling::SamplerConfig;
use runtime::session::{GenerateOptions, Model, StopReason, TokenEvent};
use serde_json::{json, Map, Value};

/// An error as the OpenAI API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before trying again (`Retry-After`, with 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub(super) fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
            retry_after: None,
        }
    }

    pub(super) fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 503: try again in `seconds`.
    pub(super) fn busy(message: impl Into<String>, seconds: u32) -> Self {
        ApiError { retry_after: Some(seconds), ..ApiError::new(503, "server_error", message) }
    }

    pub fn json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

pub(super) type ApiResult<T> = std::result::Result<T, ApiError>;

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
    pub(super) fn options(&self, max_tokens: usize) -> GenerateOptions {
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
                retry_after: None,
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
    // llama.cpp's sampling fields, honoured; OpenAI's that kiln's sampler lacks, refused
    // unless they ask for nothing.
    if let Some(k) = integer(&body, "top_k", 0, 1 << 20)? {
        req.sampler.top_k = k as usize;
    }
    if let Some(p) = number(&body, "min_p", 0.0, 1.0)? {
        req.sampler.min_p = p as f32;
    }
    if let Some(r) = number(&body, "repeat_penalty", 0.0, 10.0)? {
        if r == 0.0 {
            return Err(ApiError::invalid("repeat_penalty", "'repeat_penalty' must be greater than 0 (1: off)"));
        }
        req.sampler.repeat_penalty = r as f32;
    }
    if let Some(n) = integer(&body, "repeat_last_n", 0, 1 << 20)? {
        req.sampler.repeat_last_n = n as usize;
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        if number(&body, name, -2.0, 2.0)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::invalid(name, format!("'{name}' is not supported here; 'repeat_penalty' is")));
        }
    }
    match field(&body, "logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => return Err(ApiError::invalid("logit_bias", "'logit_bias' is not supported")),
    }
    for name in ["tools", "functions", "tool_choice", "function_call"] {
        if field(&body, name).is_some_and(|v| !v.as_array().is_some_and(Vec::is_empty)) {
            return Err(ApiError::invalid(name, format!("'{name}' is not supported: this server generates text only")));
        }
    }
    if let Some(f) = field(&body, "response_format") {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid("response_format", "only {\"type\": \"text\"} is supported"));
        }
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
/// OpenAI's `finish_reason`: `stop` for a stop token or string, `length` for the token limit
/// or the end of the context.
pub(super) fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::StopToken | StopReason::Caller => "stop",
    }
}

/// Log-probabilities in the endpoint's format (chat: `content` entries; completions: parallel
/// `tokens`/`token_logprobs`/`top_logprobs`/`text_offset` arrays).
pub(super) struct LogprobsOut<'m> {
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
    pub(super) fn new(model: &'m Model, req: &GenRequest) -> Self {
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

    pub(super) fn add(&mut self, e: &TokenEvent, offset: usize) {
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

    pub(super) fn json(&self) -> Value {
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
    pub(super) fn take_json(&mut self) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: Value) -> ApiResult<GenRequest> {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        parse_request(Endpoint::Chat, body.to_string().as_bytes(), "m")
    }

    #[test]
    fn llama_cpp_sampling_fields_are_honoured() {
        let r = chat(json!({"top_k": 7, "min_p": 0.05, "repeat_penalty": 1.1, "repeat_last_n": 32, "temperature": 0.5,
            "top_p": 0.9, "seed": 3}))
        .unwrap();
        let s = &r.sampler;
        assert_eq!((s.top_k, s.repeat_last_n, s.seed), (7, 32, 3));
        assert_eq!((s.min_p, s.repeat_penalty, s.temperature, s.top_p), (0.05, 1.1, 0.5, 0.9));
        // Fields that ask for nothing are accepted.
        let r = chat(json!({"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [],
            "response_format": {"type": "text"}}));
        assert!(r.is_ok(), "{:?}", r.err());
    }

    #[test]
    fn fields_kiln_cannot_honour_are_refused_by_name() {
        for (extra, param) in [
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"frequency_penalty": -1}), "frequency_penalty"),
            (json!({"logit_bias": {"42": 5}}), "logit_bias"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (json!({"response_format": {"type": "json_object"}}), "response_format"),
            (json!({"repeat_penalty": 0}), "repeat_penalty"),
            (json!({"min_p": 2}), "min_p"),
            (json!({"top_k": -1}), "top_k"),
        ] {
            let e = chat(extra.clone()).expect_err(&extra.to_string());
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn stop_strings_are_held_back_until_they_cannot_match() {
        let mut m = StopMatcher::new(vec!["</s>".into(), "\n\n".into()]);
        assert_eq!(m.push("Hello <"), ("Hello ".to_string(), false));
        assert_eq!(m.push("/"), (String::new(), false));
        assert_eq!(m.push("x"), ("</x".to_string(), false));
        assert_eq!(m.push(" end\n"), (" end".to_string(), false));
        assert_eq!(m.push("\nmore"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("ST"), (String::new(), false));
        assert_eq!(m.finish(), "ST");
    }

    #[test]
    fn errors_are_openai_error_objects() {
        let e = ApiError::busy("full", 5);
        assert_eq!((e.status, e.retry_after), (503, Some(5)));
        let v = ApiError::invalid("n", "only n = 1").json();
        assert_eq!(v["error"]["param"], "n");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["code"].is_null());
    }
}
