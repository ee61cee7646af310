//! A language-model session: a compiled library whose graph maps token ids (`i32[seq]`) to
//! logits (`f32[seq, vocab]`), with its bundle's manifest, tokenizer and chat template.
//!
//! The session keeps the tokens held by the KV cache; a new chat turn re-renders the whole
//! conversation with the model's template and evaluates only what differs from the cache.

use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::chat_template::{ChatTemplate, Message};
use crate::pool::Workers;
use crate::program::{workers, Input, Library, ModelDesc, Program, ProgramError, DTYPE_F32, DTYPE_I32};
use crate::sampling::{Sampler, SamplerConfig};
use crate::tokenizer::Tokenizer;

/// The parts of a bundle's `manifest.json` the runtime reads.
#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    /// The build fingerprint (hex SHA-256 of the build's inputs and options), also stored in
    /// the library's descriptor; absent in bundles of older kiln versions.
    #[serde(default)]
    pub fingerprint: Option<String>,
    pub model: ManifestModel,
    pub tokenizer: ManifestTokenizer,
    pub files: ManifestFiles,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ManifestModel {
    pub name: String,
    pub vocab: u32,
    pub context: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ManifestTokenizer {
    pub bos_token: String,
    pub eos_token: String,
    pub add_bos: bool,
    pub bos_id: u32,
    /// Token ids that end a reply.
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ManifestFiles {
    pub tokenizer: String,
    /// `weights.bin` when the weights are not embedded in the library.
    pub weights: Option<String>,
}

/// Errors of a session; their messages are meant for the user.
#[derive(Debug)]
pub enum SessionError {
    Bundle(String),
    /// The library and the bundle come from different builds.
    Mismatch(String),
    Program(ProgramError),
    Tokenizer(String),
    Template(String),
    TokenOutOfRange {
        id: u32,
        vocab: u32,
    },
    ContextFull {
        needed: usize,
        context: usize,
    },
    EmptyPrompt,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Bundle(m) => write!(f, "bundle: {m}"),
            SessionError::Mismatch(m) => write!(f, "{m}"),
            SessionError::Program(e) => write!(f, "{e}"),
            SessionError::Tokenizer(m) => write!(f, "tokenizer: {m}"),
            SessionError::Template(m) => write!(f, "chat template: {m}"),
            SessionError::TokenOutOfRange { id, vocab } => {
                write!(f, "token id {id} is out of range (vocabulary of {vocab})")
            }
            SessionError::ContextFull { needed, context } => {
                write!(f, "the prompt needs {needed} positions but the model was compiled for a context of {context}")
            }
            SessionError::EmptyPrompt => write!(f, "the prompt is empty"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<ProgramError> for SessionError {
    fn from(e: ProgramError) -> Self {
        SessionError::Program(e)
    }
}

/// Timings of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually evaluated (the rest were already in the cache).
    pub evaluated_prompt_tokens: usize,
    pub prefill_time: Duration,
    pub generated_tokens: usize,
    pub decode_time: Duration,
    pub stopped_by: StopReason,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    StopToken,
    MaxTokens,
    ContextFull,
    /// The caller's callback asked to stop (a stop string, a client that went away).
    Caller,
}

/// One generated token, as [`Session::generate_with`] reports it.
#[derive(Clone, Debug)]
pub struct TokenEvent<'a> {
    /// The token, or `None` for the last event of a reply that ended inside a character.
    pub id: Option<u32>,
    /// The text this token completes: empty while a character spans several tokens, so the
    /// pieces of all events concatenate to the decoded reply.
    pub text: &'a str,
    /// ln p of this token under the model's distribution (before temperature or truncation),
    /// when log-probabilities were asked for.
    pub logprob: Option<f32>,
    /// The most likely tokens at this step with their ln p, most likely first (as many as
    /// asked for).
    pub top_logprobs: &'a [(u32, f32)],
}

/// Options of [`Session::generate_with`] beyond the sampler.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// `Some(k)`: report each token's ln p and the `k` most likely tokens'.
    pub logprobs: Option<usize>,
    /// Keep generating past the model's end-of-turn tokens (benchmarks, load tests).
    pub ignore_eos: bool,
}

/// ln p of `id` under softmax(`logits`), and the `top` most likely tokens with theirs.
pub fn log_probs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |x: f32| (f64::from(x) - log_z) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, y)| y >= x);
                best.insert(at, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    (lp(logits[id as usize]), best.into_iter().map(|(i, x)| (i, lp(x))).collect())
}

/// A loaded language model: its library (code, weights and thread pool), manifest, tokenizer
/// and chat template. Cloning is cheap (shared). Every [`Session`] made from one
/// ([`Session::new`]) has its own activation arena, KV cache and conversation and shares the
/// rest, so N concurrent conversations hold one copy of the weights.
#[derive(Clone)]
pub struct Model {
    inner: Arc<ModelParts>,
}

struct ModelParts {
    library: Arc<Library>,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    manifest: Manifest,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model").field("name", &self.inner.manifest.model.name).finish_non_exhaustive()
    }
}

// A model is shared by the threads of a server, each with its own sessions.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Model>();
    send::<Session>();
};

/// A language-model session: one conversation on a [`Model`].
pub struct Session {
    model: Model,
    program: Program,
    /// Tokens whose keys and values are in the cache, in order.
    cached: Vec<u32>,
    /// The system turn that opens every conversation, if any (see [`Session::set_system`]).
    system: Option<String>,
    messages: Vec<Message>,
    /// Output buffer of the library: logits of one chunk.
    logits: Vec<f32>,
}

fn read_manifest(dir: &Path) -> Result<Manifest, SessionError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| SessionError::Bundle(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| SessionError::Bundle(format!("{}: {e}", path.display())))
}

/// Refuses a library whose build fingerprint differs from the bundle's: it was compiled from
/// another model or with other options, so the bundle's tokenizer and weights are not its own.
fn check_fingerprint(desc: &ModelDesc, manifest: &Manifest, bundle: &Path) -> Result<(), SessionError> {
    let library = desc.fingerprint_hex();
    let path = bundle.join("manifest.json");
    let Some(expected) = &manifest.fingerprint else {
        return Err(SessionError::Bundle(format!(
            "{} has no build fingerprint (written by an older kiln); rebuild the bundle",
            path.display()
        )));
    };
    if *expected != library {
        let unfingerprinted = desc.fingerprint().iter().all(|&b| b == 0);
        let lib =
            if unfingerprinted { format!("{library} (no fingerprint: not built by build_model)") } else { library };
        return Err(SessionError::Mismatch(format!(
            "the model library does not belong to this bundle: the library is build {lib}, but {} (model {:?}) \
             describes build {expected}; use the library built together with this bundle",
            path.display(),
            manifest.model.name
        )));
    }
    Ok(())
}

impl Model {
    /// Loads a library linked into this program with its bundle directory.
    ///
    /// Safe for the reason [`Library::new`] is: only `unsafe` code can produce a
    /// `&'static ModelDesc`. The library must come from the same build as the bundle: its
    /// fingerprint must equal the manifest's (checked first), then the shapes must agree.
    pub fn open(desc: &'static ModelDesc, bundle: &Path, n_threads: usize) -> Result<Self, SessionError> {
        Self::open_in(&workers(n_threads)?, desc, bundle)
    }

    /// [`Model::open`] on a given thread pool ([`workers`]), which other models may share:
    /// an app with two models (a draft and a target, a device model and a router) runs both
    /// on one set of threads, one call at a time. The model keeps the pool alive.
    pub fn open_in(workers: &Arc<Workers>, desc: &'static ModelDesc, bundle: &Path) -> Result<Self, SessionError> {
        let manifest = read_manifest(bundle)?;
        check_fingerprint(desc, &manifest, bundle)?;
        let weights = manifest.files.weights.as_ref().map(|w| bundle.join(w));
        let library = Library::new_in(desc, weights.as_deref(), workers)?;
        Self::from_library(library, bundle, manifest)
    }

    /// Loads a library built as a shared object (`cc -shared`). Loading it runs code from it
    /// (see [`Library::load_shared`]); its descriptor, including the build fingerprint against
    /// `bundle`'s manifest, is checked before its `run` is called.
    pub fn open_shared(library: &Path, bundle: &Path, n_threads: usize) -> Result<Self, SessionError> {
        let manifest = read_manifest(bundle)?;
        let weights = manifest.files.weights.as_ref().map(|w| bundle.join(w));
        let check =
            |d: &ModelDesc| check_fingerprint(d, &manifest, bundle).map_err(|e| ProgramError::Mismatch(e.to_string()));
        let library = Library::load_shared_checked(library, weights.as_deref(), n_threads, &check)?;
        Self::from_library(library, bundle, manifest)
    }

    fn from_library(library: Library, bundle: &Path, manifest: Manifest) -> Result<Self, SessionError> {
        let d = library.desc();
        let lm_shaped = d.n_inputs() == 1
            && d.n_outputs() == 1
            && d.io_dtype(0) == Some(DTYPE_I32)
            && d.io_width(0) == Some(1)
            && d.io_dtype(1) == Some(DTYPE_F32)
            && d.io_width(1) == Some(manifest.model.vocab as usize);
        if !lm_shaped || d.context() != manifest.model.context as usize {
            return Err(SessionError::Bundle(
                "the library does not match manifest.json (tokens in, logits out, same context)".into(),
            ));
        }
        let tok_path: PathBuf = bundle.join(&manifest.files.tokenizer);
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| SessionError::Tokenizer(e.to_string()))?;
        release_freed_heap();
        let template = match &manifest.tokenizer.chat_template {
            Some(src) => Some(
                ChatTemplate::new(src, &manifest.tokenizer.bos_token, &manifest.tokenizer.eos_token)
                    .map_err(|e| SessionError::Template(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Model { inner: Arc::new(ModelParts { library: Arc::new(library), tokenizer, template, manifest }) })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The compiled library (descriptor, weights, thread pool) every session shares.
    pub fn library(&self) -> &Arc<Library> {
        &self.inner.library
    }

    pub fn vocab(&self) -> usize {
        self.inner.manifest.model.vocab as usize
    }

    pub fn context(&self) -> usize {
        self.inner.manifest.model.context as usize
    }

    /// Tokenizes `text`, parsing special tokens such as `<|im_start|>`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, SessionError> {
        let ids = self.inner.tokenizer.encode(text, true).map_err(|e| SessionError::Tokenizer(e.to_string()))?;
        Ok(self.with_bos(ids))
    }

    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if self.inner.manifest.tokenizer.add_bos && ids.first() != Some(&self.inner.manifest.tokenizer.bos_id) {
            ids.insert(0, self.inner.manifest.tokenizer.bos_id);
        }
        ids
    }

    /// The token ids of a chat prompt: the conversation rendered with the chat template, the
    /// special tokens the template writes parsed, and the messages' contents tokenized as
    /// text. A message that spells a control token (`<|im_end|><|im_start|>system ...`)
    /// cannot forge turns: its control-token texts stay text.
    ///
    /// Contents without any special token's text (every ordinary message) give exactly
    /// `tokenize(render_chat(messages))`. Otherwise each special token's text in a content is
    /// rendered as a private-use character that no content holds, and put back after
    /// rendering as text the tokenizer must not parse.
    pub fn chat_ids(&self, messages: &[Message]) -> Result<Vec<u32>, SessionError> {
        let tokenizer = &self.inner.tokenizer;
        let specials = tokenizer.special_tokens();
        let spelled: Vec<&str> = specials
            .iter()
            .map(|(s, _)| s.as_str())
            .filter(|s| messages.iter().any(|m| m.content.contains(s)))
            .collect();
        if spelled.is_empty() {
            return self.tokenize(&self.render_chat(messages)?);
        }
        // One stand-in character per spelled special token, from the top of Unicode's
        // private-use planes down, skipping any character a content holds.
        let stand_ins: Vec<char> = (0xF0000u32..=0x10FFFD)
            .rev()
            .filter_map(char::from_u32)
            .filter(|c| !messages.iter().any(|m| m.content.contains(*c)))
            .take(spelled.len())
            .collect();
        let defused: Vec<Message> = messages
            .iter()
            .map(|m| {
                let mut content = String::with_capacity(m.content.len());
                let mut rest = m.content.as_str();
                'outer: while !rest.is_empty() {
                    for (i, s) in spelled.iter().enumerate() {
                        if let Some(after) = rest.strip_prefix(s) {
                            content.push(stand_ins[i]);
                            rest = after;
                            continue 'outer;
                        }
                    }
                    let c = rest.chars().next().expect("not empty");
                    content.push(c);
                    rest = &rest[c.len_utf8()..];
                }
                Message { content, ..m.clone() }
            })
            .collect();
        let rendered = self.render_chat(&defused)?;
        let mut text = String::with_capacity(rendered.len());
        let mut untrusted: Vec<std::ops::Range<usize>> = vec![];
        for c in rendered.chars() {
            match stand_ins.iter().position(|&s| s == c) {
                Some(i) => {
                    untrusted.push(text.len()..text.len() + spelled[i].len());
                    text.push_str(spelled[i]);
                }
                None => text.push(c),
            }
        }
        let ids = tokenizer
            .encode_parsing_only(&text, |at| {
                let i = untrusted.partition_point(|r| r.end <= at);
                untrusted.get(i).is_none_or(|r| !r.contains(&at))
            })
            .map_err(|e| SessionError::Tokenizer(e.to_string()))?;
        Ok(self.with_bos(ids))
    }

    /// Renders `messages` with the model's chat template, ending with the assistant's turn.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, SessionError> {
        match &self.inner.template {
            Some(t) => t.render(messages, true).map_err(|e| SessionError::Template(e.to_string())),
            None => {
                Ok(messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect::<String>() + "assistant: ")
            }
        }
    }
}

impl Session {
    /// A new conversation on `model`: its own arena and an empty KV cache (resident only as
    /// far as it is used), sharing the model's weights, threads, tokenizer and template.
    pub fn new(model: &Model) -> Result<Self, SessionError> {
        let program = Program::on(Arc::clone(&model.inner.library))?;
        Ok(Session { model: model.clone(), program, cached: vec![], system: None, messages: vec![], logits: vec![] })
    }

    /// [`Model::open`] and one session on it.
    pub fn open(desc: &'static ModelDesc, bundle: &Path, n_threads: usize) -> Result<Self, SessionError> {
        Self::new(&Model::open(desc, bundle, n_threads)?)
    }

    /// [`Model::open_shared`] and one session on it.
    pub fn open_shared(library: &Path, bundle: &Path, n_threads: usize) -> Result<Self, SessionError> {
        Self::new(&Model::open_shared(library, bundle, n_threads)?)
    }

    /// The model this session runs (clone it to open more sessions on the same weights).
    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn manifest(&self) -> &Manifest {
        self.model.manifest()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.model.tokenizer()
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn vocab(&self) -> usize {
        self.model.vocab()
    }

    pub fn context(&self) -> usize {
        self.model.context()
    }

    /// Forgets the conversation and clears the cache (the system turn stays).
    pub fn reset(&mut self) {
        self.program.reset();
        self.cached.clear();
        self.messages = self.system.iter().map(|s| Message::system(s.clone())).collect();
    }

    /// Sets the system turn that opens the conversation and starts a new conversation.
    /// `Some("")` gives an empty system turn, which keeps templates that add a default system
    /// prompt when there is none (SmolLM2's, for one) from adding it; `None` lets them.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
        self.reset();
    }

    /// The conversation so far (the system turn first, if any).
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Adds a finished turn to the conversation, for an answer produced elsewhere (an offload
    /// server): the next [`Session::chat`] renders it like any other.
    pub fn record_turn(&mut self, user: &str, assistant: &str) {
        self.messages.push(Message::user(user));
        self.messages.push(Message::assistant(assistant));
    }

    /// Tokens currently held by the KV cache.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// Evaluates `tokens` after the cached ones and returns logits: of every token when
    /// `all_logits` (`[n, vocab]`), else of the last one (`[vocab]`).
    pub fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::EmptyPrompt);
        }
        let vocab = self.vocab();
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(SessionError::TokenOutOfRange { id, vocab: vocab as u32 });
        }
        let needed = self.cached.len() + tokens.len();
        if needed > self.context() {
            return Err(SessionError::ContextFull { needed, context: self.context() });
        }
        let batch = self.program.desc().batch();
        let mut out = Vec::with_capacity(if all_logits { tokens.len() * vocab } else { vocab });
        for chunk in tokens.chunks(batch) {
            let n = chunk.len();
            let is_last = chunk.as_ptr_range().end == tokens.as_ptr_range().end;
            let out_start = if all_logits {
                0
            } else if is_last {
                n - 1
            } else {
                n
            };
            let ids: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
            // The library computes and writes only rows out_start..n (one row while generating,
            // none for a chunk of the prompt before the last); reuse one buffer so that
            // decoding a token does not allocate a fresh one.
            let rows = (n - out_start) * vocab;
            if self.logits.len() < rows {
                self.logits.resize(rows, 0.0);
            }
            let logits = &mut self.logits[..rows];
            self.program.run(&[Input::I32(&ids)], &mut [logits], n, self.cached.len(), out_start)?;
            self.cached.extend_from_slice(chunk);
            out.extend_from_slice(&self.logits[..rows]);
        }
        Ok(out)
    }

    /// Drops cached tokens after the first `keep`.
    fn truncate_cache(&mut self, keep: usize) {
        self.cached.truncate(keep);
    }

    /// Tokenizes `text`, parsing special tokens such as `<|im_start|>`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, SessionError> {
        self.model.tokenize(text)
    }

    /// Renders `messages` with the model's chat template, ending with the assistant's turn.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, SessionError> {
        self.model.render_chat(messages)
    }

    /// The token ids of a chat prompt, contents tokenized as text (see [`Model::chat_ids`]).
    pub fn chat_ids(&self, messages: &[Message]) -> Result<Vec<u32>, SessionError> {
        self.model.chat_ids(messages)
    }

    /// Continues from `prompt` (token ids), reusing the longest cached prefix, sampling up
    /// to `max_tokens` tokens and passing each decoded piece of text to `on_text`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &SamplerConfig,
        mut on_text: impl FnMut(&str),
    ) -> Result<(Vec<u32>, GenerationStats), SessionError> {
        let options = GenerateOptions { max_tokens, ..Default::default() };
        self.generate_with(prompt, &options, sampler, |e| {
            if !e.text.is_empty() {
                on_text(e.text);
            }
            ControlFlow::Continue(())
        })
    }

    /// [`Session::generate`] reporting every token to `on_token`, which may stop the
    /// generation ([`StopReason::Caller`]; the token it was given is kept). With
    /// `options.logprobs = Some(k)` each event carries the token's ln p and the `k` most likely
    /// tokens'. When the reply ends inside a character (a byte-level BPE reply cut short), a
    /// last event with `id: None` carries the replacement text of its bytes.
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        sampler: &SamplerConfig,
        mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<(Vec<u32>, GenerationStats), SessionError> {
        let GenerateOptions { max_tokens, logprobs, ignore_eos } = *options;
        if prompt.is_empty() {
            return Err(SessionError::EmptyPrompt);
        }
        if prompt.len() > self.context() {
            return Err(SessionError::ContextFull { needed: prompt.len(), context: self.context() });
        }
        let mut sampler = Sampler::new(sampler.clone()).map_err(|e| SessionError::Bundle(e.to_string()))?;
        // Reuse the cached prefix, but always evaluate at least the last prompt token.
        let common = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        self.truncate_cache(common);
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            evaluated_prompt_tokens: prompt.len() - common,
            ..Default::default()
        };
        let start = Instant::now();
        let mut logits = self.eval(&prompt[common..], false)?;
        stats.prefill_time = start.elapsed();
        let mut history: Vec<u32> = prompt.to_vec();
        let mut generated = vec![];
        let mut decoder = self.model.inner.tokenizer.stream_decoder(true);
        let start = Instant::now();
        loop {
            if generated.len() >= max_tokens {
                stats.stopped_by = StopReason::MaxTokens;
                break;
            }
            let next = sampler.sample(&logits, &history);
            if !ignore_eos && self.model.inner.manifest.tokenizer.stop_ids.contains(&next) {
                stats.stopped_by = StopReason::StopToken;
                break;
            }
            generated.push(next);
            history.push(next);
            let piece = decoder.push(next).map_err(|e| SessionError::Tokenizer(e.to_string()))?;
            let (logprob, top) = match logprobs {
                Some(k) => {
                    let (lp, top) = log_probs(&logits, next, k);
                    (Some(lp), top)
                }
                None => (None, vec![]),
            };
            let event = TokenEvent { id: Some(next), text: &piece, logprob, top_logprobs: &top };
            if on_token(&event).is_break() {
                stats.stopped_by = StopReason::Caller;
                break;
            }
            if self.cached.len() >= self.context() {
                stats.stopped_by = StopReason::ContextFull;
                break;
            }
            logits = self.eval(&[next], false)?;
        }
        let rest = decoder.finish().map_err(|e| SessionError::Tokenizer(e.to_string()))?;
        if !rest.is_empty() {
            let _ = on_token(&TokenEvent { id: None, text: &rest, logprob: None, top_logprobs: &[] });
        }
        stats.decode_time = start.elapsed();
        stats.generated_tokens = generated.len();
        Ok((generated, stats))
    }

    /// One chat turn: adds `user` to the conversation, generates the assistant's reply with
    /// the model's template, streams it to `on_text`, and returns it.
    pub fn chat(
        &mut self,
        user: &str,
        max_tokens: usize,
        sampler: &SamplerConfig,
        on_text: impl FnMut(&str),
    ) -> Result<(String, GenerationStats), SessionError> {
        let mut messages = self.messages.clone();
        messages.push(Message::user(user));
        let ids = self.model.chat_ids(&messages)?;
        let (reply_ids, stats) = self.generate(&ids, max_tokens, sampler, on_text)?;
        let reply = self
            .model
            .inner
            .tokenizer
            .decode_with(&reply_ids, true)
            .map_err(|e| SessionError::Tokenizer(e.to_string()))?;
        messages.push(Message::assistant(reply.clone()));
        self.messages = messages;
        Ok((reply, stats))
    }
}

/// Hands the heap pages freed so far back to the system. Parsing `tokenizer.json` builds
/// megabytes of temporary strings that glibc's allocator otherwise keeps resident for the
/// life of the process.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the system; it takes
    // no pointers and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
