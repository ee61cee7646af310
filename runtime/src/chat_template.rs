//! Chat templates: renders a model's Jinja chat template (the GGUF key
//! `tokenizer.chat_template`, or `chat_template` in `tokenizer_config.json`) into the prompt
//! text, with [minijinja].
//!
//! The environment is set up the way Hugging Face transformers sets up its own
//! (`apply_chat_template`): `trim_blocks` and `lstrip_blocks` on, a `raise_exception(msg)`
//! function that aborts rendering with an error, and the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`. For templates written against
//! Python's jinja2, a few common Python methods are also provided: on strings `strip`,
//! `lstrip`, `rstrip` (each with optional characters), `startswith`, `endswith`, `upper`,
//! `lower`, `replace`, `split`; on maps `items`, `keys`, `values` and `get`.
//!
//! Templates are untrusted input (a GGUF file carries its own), so rendering is bounded:
//! a step budget (minijinja's fuel: about one unit per instruction and per 64 bytes of data
//! the template creates) that grows with the size of the conversation up to [`MAX_STEPS`], a
//! recursion limit, and a cap on the rendered text. A template that exceeds one fails with an
//! error that says which ([`TemplateLimit`]), quickly and without exhausting memory.
//!
//! The engine walks nested data recursively (printing, comparing, dropping a list of lists),
//! and a template can nest data one level per step (`{% set ns.x = [ns.x] %}` in a loop), so
//! the stack a render needs grows with its step budget. Each render therefore runs on a
//! thread of its own whose stack is sized from the budget ([`STACK_PER_STEP`] per step,
//! measured with margin on the deepest walks), never on the caller's thread, whose stack may
//! be a C host's small one.
//!
//! Not provided (the workspace builds minijinja without its `json` and `loop_controls`
//! features, and without minijinja-contrib): the `tojson` filter, `{% break %}` /
//! `{% continue %}`, and `strftime_now`; nor the `pprint` filter and `debug()` function, whose
//! time grows faster than their fuel charge on nested data. Templates using them fail with an
//! error, never a panic.

use std::fmt;

use minijinja::value::{Serde, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, State};
use serde::Serialize;

/// One chat message, as the template sees it (`message['role']`, `message['content']`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// Which bound a template exceeded while rendering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateLimit {
    /// The step budget (instructions plus data created), of this many steps.
    Steps(u64),
    /// Macro calls, loops and conditionals nested deeper than the recursion limit.
    Recursion,
    /// The rendered text would exceed this many bytes.
    Output(usize),
    /// The template's source is longer than this many bytes ([`MAX_SOURCE_BYTES`]).
    Source(usize),
}

/// A template that failed to compile or render (including `raise_exception` calls and
/// templates that exceed a bound, see [`TemplateError::limit`]).
#[derive(Debug)]
pub struct TemplateError {
    inner: Error,
    limit: Option<TemplateLimit>,
}

impl TemplateError {
    /// The template engine's own error.
    pub fn inner(&self) -> &Error {
        &self.inner
    }

    /// The bound the template exceeded, when that is why it failed.
    pub fn limit(&self) -> Option<TemplateLimit> {
        self.limit
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Some(TemplateLimit::Steps(n)) => write!(
                f,
                "chat template exceeded its step budget of {n} (a runaway loop or data growth in the template?): {}",
                self.inner
            ),
            Some(TemplateLimit::Recursion) => write!(
                f,
                "chat template exceeded the recursion limit of {RECURSION_LIMIT} (runaway macro recursion?): {}",
                self.inner
            ),
            Some(TemplateLimit::Output(n)) => {
                write!(f, "chat template output exceeded {n} bytes (runaway output in the template?)")
            }
            Some(TemplateLimit::Source(n)) => {
                write!(
                    f,
                    "chat template is longer than the {n} bytes kiln compiles (real ones are a few KiB): {}",
                    self.inner
                )
            }
            None => write!(f, "chat template: {}", self.inner),
        }
    }
}

impl std::error::Error for TemplateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.inner)
    }
}

impl From<Error> for TemplateError {
    fn from(inner: Error) -> Self {
        let limit = match inner.kind() {
            // The budget is filled in by `render`, which knows it.
            ErrorKind::OutOfFuel => Some(TemplateLimit::Steps(0)),
            ErrorKind::InvalidOperation if inner.detail().is_some_and(|d| d == "recursion limit exceeded") => {
                Some(TemplateLimit::Recursion)
            }
            _ => None,
        };
        TemplateError { inner, limit }
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// Steps every render may take, whatever the conversation (real templates take a few hundred
/// per message, and 20 to 50 for ChatML-like ones); 100k steps take a few milliseconds.
#[cfg(not(fuzzing))]
pub const BASE_STEPS: u64 = 100_000;
/// Under the fuzzer a smaller budget: the same checks, but hostile inputs that spend the whole
/// budget cost milliseconds per execution.
#[cfg(fuzzing)]
pub const BASE_STEPS: u64 = 50_000;
/// Extra steps per message and per 16 bytes of the conversation, so long chats still render.
const STEPS_PER_MESSAGE: u64 = 300;
const INPUT_BYTES_PER_STEP: u64 = 16;
/// No render takes more steps than this, however long the conversation (about 1,300 messages;
/// far more than any context holds). It bounds the data a template creates (about 32 MB) and
/// the stack a render can need (see [`STACK_PER_STEP`]).
pub const MAX_STEPS: u64 = 500_000;
/// Stack bytes the render thread gets per step of its budget, plus [`BASE_STACK`]. A template
/// nests data at best one level per step (nested list literals in a loop: 1.1 steps per level);
/// minijinja's deepest walk, printing nested maps, takes about 440 bytes of stack per level in
/// a release build (measured: 8 MiB overflow between 18k and 20k levels), so 512 bytes per step
/// leaves a margin. A build with debug assertions (the fuzz targets' build: larger frames and
/// coverage counters) took about 5.2 KiB per level printing a nested list inside a map (a fuzz
/// input reached 198k levels in a 500k-step budget and overflowed 2 KiB per step), so it gets
/// 8 KiB per step. The stack is reserved, not touched: only the pages a render uses are
/// resident.
#[cfg(not(debug_assertions))]
pub const STACK_PER_STEP: usize = 512;
#[cfg(debug_assertions)]
pub const STACK_PER_STEP: usize = 8192;
/// The render thread's stack beyond what the budget asks for (the engine's own recursion:
/// macro calls up to [`RECURSION_LIMIT`]).
pub const BASE_STACK: usize = 8 << 20;
/// Nesting of macro calls (about 10 each), loops and conditionals (1 each); real templates
/// stay far below it, and it keeps the engine's recursion well inside a 2 MiB thread stack.
pub const RECURSION_LIMIT: usize = 200;
/// Printing a value (`{{ x }}`) walks it recursively, at a few hundred bytes of stack per level
/// of nesting or more: a value nested deeper than this is refused before it is printed, so the
/// stack a print needs does not depend on how deep a template managed to nest its data.
pub const MAX_PRINT_DEPTH: usize = 256;
/// The most containers and items one print may walk (the check costs a step per 64 of them).
pub const MAX_PRINT_NODES: usize = 1 << 20;
/// The longest template source kiln compiles. Real chat templates are a few KiB (Llama 3.1's
/// and Qwen3's about 4-7 KiB); 256 KiB bounds the time and the stack compiling one takes.
pub const MAX_SOURCE_BYTES: usize = 256 << 10;
/// Stack bytes the compiling thread gets per byte of the template's source, plus
/// [`BASE_STACK`]. minijinja parses a chain of operators (`1+1+1...`, `-----1`, `x()()()`,
/// `{% elif %}` after `{% elif %}`) without a depth limit and then compiles and drops the
/// syntax tree recursively: measured on a release build's 8 MiB main thread, a chain of
/// unary minus overflowed at 21k levels of 1 byte each (400 bytes of stack per source byte;
/// binary operators and calls 160-180, `elif` about 90), so 1 KiB per byte leaves a margin.
/// Builds with debug assertions (the fuzz targets') get 4 KiB.
#[cfg(not(debug_assertions))]
pub const COMPILE_STACK_PER_BYTE: usize = 1024;
#[cfg(debug_assertions)]
pub const COMPILE_STACK_PER_BYTE: usize = 4096;
/// The rendered prompt may hold this many bytes plus `OUTPUT_PER_INPUT_BYTE` per byte of the
/// conversation.
pub const BASE_OUTPUT_BYTES: usize = 4 << 20;
const OUTPUT_PER_INPUT_BYTE: usize = 4;

/// Collects the rendered text and refuses to grow past `limit` bytes.
struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template with its special-token strings.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. Syntax errors are reported here; `bos_token` and `eos_token` are the
    /// strings the template sees under those names.
    ///
    /// Compiling is bounded too: a source longer than [`MAX_SOURCE_BYTES`] is refused
    /// ([`TemplateLimit::Source`]), and the parse runs on a thread of its own whose stack is
    /// sized from the source's length ([`COMPILE_STACK_PER_BYTE`]), never on the caller's.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        if source.len() > MAX_SOURCE_BYTES {
            let inner = Error::new(ErrorKind::SyntaxError, format!("the template is {} bytes", source.len()));
            return Err(TemplateError { inner, limit: Some(TemplateLimit::Source(MAX_SOURCE_BYTES)) });
        }
        let stack = BASE_STACK.saturating_add(COMPILE_STACK_PER_BYTE.saturating_mul(source.len()));
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("kiln-chat-template-compile".into())
                .stack_size(stack)
                .spawn_scoped(scope, || Self::compile(source, bos_token, eos_token))
                .map_err(|e| TemplateError {
                    inner: Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "cannot start the thread that compiles the chat template ({stack} bytes of stack): {e}"
                        ),
                    ),
                    limit: None,
                })?;
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// [`ChatTemplate::new`] on the calling thread.
    fn compile(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(python_methods);
        env.set_recursion_limit(RECURSION_LIMIT);
        // `pprint` and `debug()` print nested data in time that grows faster than their fuel
        // charge (a 400-level list: a quarter of a second; 2,000 levels: over 20 seconds); chat
        // templates do not use them.
        // (`debug()` is not built: the workspace leaves out minijinja's `debug` feature.)
        env.remove_filter("pprint");
        env.set_formatter(|out, state, value| {
            check_printable(state, value)?;
            minijinja::escape_formatter(out, state, value)
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Renders the conversation; with `add_generation_prompt` the template appends the header
    /// that starts the assistant's reply.
    ///
    /// Rendering is bounded (see the module documentation): a template that loops, recurses or
    /// grows data beyond the budget for this conversation fails with a [`TemplateLimit`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let input_bytes = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .fold(self.bos_token.len() + self.eos_token.len(), usize::saturating_add);
        let steps = BASE_STEPS
            .saturating_add(STEPS_PER_MESSAGE.saturating_mul(messages.len() as u64))
            .saturating_add(input_bytes as u64 / INPUT_BYTES_PER_STEP)
            .min(MAX_STEPS);
        let max_output = BASE_OUTPUT_BYTES.saturating_add(OUTPUT_PER_INPUT_BYTE.saturating_mul(input_bytes));
        let stack = BASE_STACK.saturating_add(STACK_PER_STEP.saturating_mul(steps as usize));
        // Everything the template creates is made, walked and dropped on this thread.
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("kiln-chat-template".into())
                .stack_size(stack)
                .spawn_scoped(scope, || self.render_here(messages, add_generation_prompt, steps, max_output))
                .map_err(|e| TemplateError {
                    inner: Error::new(
                        ErrorKind::InvalidOperation,
                        format!("cannot start the thread that renders the chat template ({stack} bytes of stack): {e}"),
                    ),
                    limit: None,
                })?;
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// [`ChatTemplate::render`] on the calling thread, with its budgets.
    fn render_here(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        steps: u64,
        max_output: usize,
    ) -> Result<String, TemplateError> {
        // The budget depends on the conversation; the environment's clone shares its compiled
        // template and functions (reference-counted).
        let mut env = self.env.clone();
        env.set_fuel(Some(steps));
        let template = env.get_template(TEMPLATE_NAME)?;
        let ctx = context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut out = BoundedOutput { buf: Vec::new(), limit: max_output, exceeded: false };
        let result = template.render_captured_to(ctx, &mut out);
        match result {
            Ok(_) => {}
            Err(_) if out.exceeded => {
                let inner = Error::new(ErrorKind::WriteFailure, "output limit");
                return Err(TemplateError { inner, limit: Some(TemplateLimit::Output(max_output)) });
            }
            Err(e) => {
                let mut err = TemplateError::from(e);
                if let Some(TemplateLimit::Steps(n)) = &mut err.limit {
                    *n = steps;
                }
                return Err(err);
            }
        }
        // minijinja writes whole `str` fragments, so this never fails; it is checked anyway.
        String::from_utf8(out.buf).map_err(|_| Error::new(ErrorKind::WriteFailure, "rendered text is not UTF-8").into())
    }
}

/// `raise_exception(msg)`: what HF templates call to reject a conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// A few Python `str` and `dict` methods that chat templates commonly call.
/// Refuses to print a value nested deeper than [`MAX_PRINT_DEPTH`] or holding more than
/// [`MAX_PRINT_NODES`] containers and items; the walk is iterative (its own stack on the heap).
fn check_printable(state: &mut State, value: &Value) -> Result<(), Error> {
    let container = |v: &Value| matches!(v.kind(), ValueKind::Seq | ValueKind::Map | ValueKind::Iterable);
    if !container(value) {
        return Ok(());
    }
    let mut pending: Vec<(Value, usize)> = vec![(value.clone(), 1)];
    let mut nodes = 0usize;
    while let Some((v, depth)) = pending.pop() {
        if depth > MAX_PRINT_DEPTH {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("the value printed is nested more than {MAX_PRINT_DEPTH} levels deep"),
            ));
        }
        let is_map = v.kind() == ValueKind::Map;
        let Ok(items) = v.try_iter() else { continue };
        for item in items {
            nodes += 1;
            if nodes > MAX_PRINT_NODES {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("the value printed holds more than {MAX_PRINT_NODES} items"),
                ));
            }
            let child = if is_map { v.get_item(&item).unwrap_or_default() } else { Value::UNDEFINED };
            for c in [item, child] {
                if container(&c) {
                    pending.push((c, depth + 1));
                }
            }
        }
    }
    state.consume_fuel(nodes as u64 / 64 + 1)
}

fn python_methods(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    use minijinja::value::from_args;

    if let Some(s) = value.as_str() {
        // Every method walks the string: charge for it (the engine charges only for the
        // returned value, after it exists).
        state.consume_fuel(s.len() as u64 / 64 + 1)?;
        return match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let pred = |c: char| match chars {
                    Some(set) => set.contains(c),
                    None => c.is_whitespace(),
                };
                let out = match method {
                    "strip" => s.trim_matches(pred),
                    "lstrip" => s.trim_start_matches(pred),
                    _ => s.trim_end_matches(pred),
                };
                Ok(Value::from(out))
            }
            "startswith" => {
                let (prefix,): (&str,) = from_args(args)?;
                Ok(Value::from(s.starts_with(prefix)))
            }
            "endswith" => {
                let (suffix,): (&str,) = from_args(args)?;
                Ok(Value::from(s.ends_with(suffix)))
            }
            "upper" => {
                let () = from_args(args)?;
                Ok(Value::from(s.to_uppercase()))
            }
            "lower" => {
                let () = from_args(args)?;
                Ok(Value::from(s.to_lowercase()))
            }
            "replace" => {
                let (old, new): (&str, &str) = from_args(args)?;
                // The result can be far larger than the string (`'x'.replace('', long)`):
                // charge for its size before building it.
                let count = if old.is_empty() { s.chars().count() + 1 } else { s.matches(old).count() };
                let out_len = (s.len() as u64).saturating_add((count as u64).saturating_mul(new.len() as u64));
                state.consume_fuel(out_len / 64)?;
                Ok(Value::from(s.replace(old, new)))
            }
            "split" => {
                let (sep,): (Option<&str>,) = from_args(args)?;
                let parts: Vec<Value> = match sep {
                    Some("") => return Err(Error::new(ErrorKind::InvalidOperation, "empty separator")),
                    Some(sep) => s.split(sep).map(Value::from).collect(),
                    None => s.split_whitespace().map(Value::from).collect(),
                };
                Ok(Value::from(parts))
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        };
    }

    if value.kind() == ValueKind::Map {
        state.consume_fuel(value.len().unwrap_or(0) as u64 + 1)?;
        return match method {
            "items" => {
                let () = from_args(args)?;
                state.apply_filter("items", std::slice::from_ref(value))
            }
            "keys" => {
                let () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                let () = from_args(args)?;
                let values = value.try_iter()?.map(|k| value.get_item(&k)).collect::<Result<Vec<_>, _>>()?;
                Ok(Value::from(values))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() { default.unwrap_or(Value::from(())) } else { v })
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        };
    }

    Err(Error::from(ErrorKind::UnknownMethod))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `tokenizer.chat_template` of SmolLM2-135M-Instruct (GGUF), verbatim (368 bytes;
    /// the newlines inside its string literals are real newline characters).
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap()
    }

    #[test]
    fn types_are_send_and_sync() {
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<ChatTemplate>();
        is_send_sync::<TemplateError>();
    }

    #[test]
    fn fixture_is_the_gguf_template() {
        assert_eq!(SMOLLM2_TEMPLATE.len(), 368);
    }

    // Expected strings below were produced by Python jinja2 (ImmutableSandboxedEnvironment,
    // trim_blocks=True, lstrip_blocks=True), as transformers renders them.

    #[test]
    fn single_user_message_with_generation_prompt() {
        let out = smollm().render(&[Message::user("What is the capital of France?")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn multi_turn_conversation() {
        let t = smollm();
        let conv =
            [Message::system("Be terse."), Message::user("Hi"), Message::assistant("Hello!"), Message::user("2+2?")];
        assert_eq!(
            t.render(&conv, false).unwrap(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        );
        assert_eq!(
            t.render(&conv[1..], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.render(&[], true).unwrap(), "<|im_start|>assistant\n");
    }

    #[test]
    fn whitespace_control_and_tokens() {
        // trim_blocks drops the newline after a block tag; lstrip_blocks drops the indentation
        // before one. bos/eos come from the constructor.
        let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&[Message::user("a"), Message::assistant("b")], false).unwrap();
        assert_eq!(out, "<s>\nU:a\n</s>");
    }

    #[test]
    fn python_methods_work() {
        let src = "{% for m in messages %}{{ m.content.strip() }}|{{ m.content.lstrip('x ') }}|{{ m.role.upper() }}|{{ m.content.split()|length }}|{% if m.content.startswith('  x') %}T{% endif %}{% if m.content.endswith('x') %}F{% endif %}|{{ m.get('role') }}|{{ m.get('nope', 'dflt') }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t.render(&[Message::user("  x y  ")], false).unwrap();
        assert_eq!(out, "x y|y  |USER|2|T|user|dflt");
    }

    #[test]
    fn errors_are_reported_not_panics() {
        // Syntax error: reported by new().
        assert!(ChatTemplate::new("{% for m in messages %}", "", "").is_err());
        assert!(ChatTemplate::new("{{ 1 + }}", "", "").is_err());
        // raise_exception: reported by render(), with the message.
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[Message::user("x")], false).unwrap(), "ok");
        let err = t.render(&[Message::assistant("x")], false).unwrap_err();
        assert!(err.to_string().contains("Conversation must start with user"), "{err}");
        // Runtime errors: unknown filter, unknown method, bad operation.
        for src in [
            "{{ messages|tojson }}",
            "{{ messages[0].content.nonexistent() }}",
            "{{ 1 + 'a' }}",
            "{{ strftime_now('%d') }}",
        ] {
            let res = ChatTemplate::new(src, "", "").and_then(|t| t.render(&[Message::user("x")], true));
            assert!(res.is_err(), "{src} rendered: {res:?}");
        }
    }

    /// Renders on another thread and fails the test when that takes longer than `secs` (the
    /// unbounded renderer spins forever on these templates; the thread is left behind).
    fn render_within(src: &str, messages: Vec<Message>, secs: u64) -> Result<String, TemplateError> {
        let src = src.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let start = std::time::Instant::now();
        std::thread::spawn(move || {
            let res = ChatTemplate::new(&src, "<s>", "</s>").and_then(|t| t.render(&messages, true));
            let _ = tx.send(res);
        });
        let res = rx
            .recv_timeout(std::time::Duration::from_secs(secs))
            .unwrap_or_else(|_| panic!("rendering took more than {secs} s"));
        assert!(start.elapsed().as_secs() < secs, "rendering took {:?}", start.elapsed());
        res
    }

    #[test]
    fn hostile_templates_fail_fast_with_a_clear_error() {
        let steps = Some(TemplateLimit::Steps(BASE_STEPS + STEPS_PER_MESSAGE + (1 + 4 + 3 + 4) / INPUT_BYTES_PER_STEP));
        let cases: &[(&str, &str, Option<TemplateLimit>)] = &[
            // A billion steps: minijinja's range refuses more than 100k items.
            ("billion-loop", "{% for i in range(1000000000) %}x{% endfor %}", None),
            // Ten billion steps in nested loops.
            (
                "nested-loops",
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                steps,
            ),
            // 2^100 bytes by string doubling (through a namespace: a plain `set` in a loop body is
            // local to the iteration).
            ("doubling", "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", steps),
            // A gigabyte by repetition, never output.
            ("repeat", "{% set s = 'x' * 1000000000 %}{{ s|length }}", steps),
            // Ten gigabytes through a Python method (charged before it is built).
            ("replace", "{{ ('y' * 100000).replace('', 'x' * 100000)|length }}", steps),
            // 4^12 macro calls, 12 deep.
            (
                "exponential-macro",
                "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(12) }}",
                steps,
            ),
            // Unbounded recursion.
            ("deep-recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", Some(TemplateLimit::Recursion)),
            // 10 MB of output from little work.
            (
                "output",
                "{% set s = 'x' * 100000 %}{% for i in range(100) %}{{ s }}{% endfor %}",
                Some(TemplateLimit::Output(BASE_OUTPUT_BYTES + OUTPUT_PER_INPUT_BYTE * (1 + 4 + 3 + 4))),
            ),
        ];
        for (name, src, limit) in cases {
            let err = render_within(src, vec![Message::user("x")], 5).expect_err(name);
            assert_eq!(err.limit(), *limit, "{name}: {err}");
            let msg = err.to_string();
            match limit {
                Some(TemplateLimit::Steps(_)) => assert!(msg.contains("exceeded its step budget"), "{name}: {msg}"),
                Some(TemplateLimit::Recursion) => assert!(msg.contains("recursion limit"), "{name}: {msg}"),
                Some(TemplateLimit::Output(_)) => assert!(msg.contains("output exceeded"), "{name}: {msg}"),
                Some(TemplateLimit::Source(_)) => assert!(msg.contains("longer than"), "{name}: {msg}"),
                None => assert!(msg.starts_with("chat template: "), "{name}: {msg}"),
            }
        }
    }

    #[test]
    fn values_nested_too_deep_to_print_are_refused_and_shallow_ones_print() {
        let nest = |n: usize| {
            format!(
                "{{% set ns = namespace(x=[]) %}}{{% for i in range({n}) %}}{{% set ns.x = [ns.x, {{'k': [i]}}] %}}{{% endfor %}}{{{{ ns.x }}}}"
            )
        };
        let t = ChatTemplate::new(&nest(2000), "", "").unwrap();
        let e = t.render(&[Message::user("hi")], false).unwrap_err().to_string();
        assert!(e.contains("nested more than 256 levels"), "{e}");
        let t = ChatTemplate::new(&nest(3), "", "").unwrap();
        let out = t.render(&[Message::user("hi")], false).unwrap();
        assert_eq!(out, "[[[[], {'k': [0]}], {'k': [1]}], {'k': [2]}]");
        let t = ChatTemplate::new("{{ {'a': [1, {'b': 'c'}]} }}|{{ messages[0] }}", "", "").unwrap();
        let out = t.render(&[Message::user("hi")], false).unwrap();
        assert!(out.contains("[1, {'b': 'c'}]") && out.contains("hi"), "{out}");
    }

    /// A template may nest data one level per step or two (`{% set ns.x = [ns.x] %}` in a loop)
    /// and then make the engine walk it recursively (print it, compare it, drop it): with the
    /// largest budget ([`MAX_STEPS`], from a long conversation), built to just under and just
    /// over the budget, every walk ends in text or a step-budget error, never a stack overflow
    /// (which aborts this test process). The fuzzer found the printing case.
    #[test]
    fn deeply_nested_data_never_overflows_the_stack() {
        // Steps per loop iteration and levels per iteration of each way of nesting, measured.
        let builders: &[(&str, &str, f64, u64)] = &[
            ("list", "[ns.x]", 8.5, 1),
            ("map", "{'a': ns.x}", 10.0, 1),
            ("literal", "[[[[[[[[[[ns.x]]]]]]]]]]", 17.0, 10),
            ("batch", "[ns.x]|batch(1)|list", 12.0, 2),
        ];
        let walks = [
            "{{ ns.x }}",
            "{{ ns.x|string|length }}",
            "{{ (ns.x ~ '')|length }}",
            "{{ [ns.x, ns.y]|sort|length }}",
            "{{ ns.x == ns.y }}",
            "{{ [ns.x, ns.y]|unique|length }}",
            "{{ ns.x in [ns.y] }}",
            "dropped",
        ];
        // A conversation long enough for the largest budget.
        let conv: Vec<Message> = (0..(MAX_STEPS / STEPS_PER_MESSAGE) as usize).map(|_| Message::user("x")).collect();
        let mut deepest = 0;
        for (name, nest, steps_per_iter, levels) in builders {
            for fraction in [0.45, 0.55] {
                // Two structures (`ns.x`, `ns.y`) of the same depth, built separately, so that
                // comparing them walks both.
                let iters = (MAX_STEPS as f64 * fraction / steps_per_iter) as u64;
                let build = format!(
                    "{{% set ns = namespace(x=[], y=[]) %}}{{% for i in range({iters}) %}}{{% set ns.x = {nest} %}}{{% endfor %}}\
                     {{% for i in range({iters}) %}}{{% set ns.y = {} %}}{{% endfor %}}",
                    nest.replace("ns.x", "ns.y")
                );
                for walk in walks {
                    let src = format!("{build}{walk}");
                    match render_within(&src, conv.clone(), 60) {
                        Ok(_) => deepest = deepest.max(iters * levels),
                        // Printing refuses deep values before walking them (MAX_PRINT_DEPTH).
                        Err(e) if walk == "{{ ns.x }}" && e.to_string().contains("nested more than") => {}
                        Err(e) => assert_eq!(e.limit(), Some(TemplateLimit::Steps(MAX_STEPS)), "{name} {walk}: {e}"),
                    }
                }
            }
        }
        // The walks did reach deep data (not all stopped early by the budget).
        assert!(deepest > 20_000, "deepest walked structure: {deepest} levels");
    }

    /// Chains of operators as long as a template may be: minijinja parses them without a depth
    /// limit and compiles and drops the tree recursively (a release build's 8 MiB main thread
    /// overflowed on 21k unary minuses). Compiled from a thread with a C host's small stack
    /// (256 KiB), each compiles or fails with an error, and a longer source is refused.
    #[test]
    fn long_operator_chains_compile_on_a_small_stack() {
        let fill = |head: &str, unit: &str, tail: &str| {
            let n = (MAX_SOURCE_BYTES - head.len() - tail.len()) / unit.len();
            format!("{head}{}{tail}", unit.repeat(n))
        };
        let sources = [
            ("minus", fill("{{ ", "-", "1 }}")),
            ("not", fill("{{ ", "not ", "1 }}")),
            ("plus", fill("{{ 1", "+1", " }}")),
            ("call", fill("{{ x", "()", " }}")),
            ("method", fill("{{ x", ".strip()", " }}")),
            ("test", fill("{{ x", " is not none", " }}")),
            ("and", fill("{{ 1", " and 1", " }}")),
            ("elif", fill("{% if 0 %}", "{% elif 0 %}", "{% endif %}")),
        ];
        for (name, source) in &sources {
            assert!(source.len() <= MAX_SOURCE_BYTES && source.len() > MAX_SOURCE_BYTES - 16, "{name}");
            let result = std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn({
                    let source = source.clone();
                    move || {
                        ChatTemplate::new(&source, "", "")
                            .and_then(|t| t.render(&[Message::user("x")], true))
                            .map(|_| ())
                    }
                })
                .unwrap()
                .join()
                .unwrap();
            if let Err(e) = result {
                assert_ne!(e.limit(), Some(TemplateLimit::Source(MAX_SOURCE_BYTES)), "{name}: {e}");
            }
        }
        let long = format!("{}x", " ".repeat(MAX_SOURCE_BYTES));
        let err = ChatTemplate::new(&long, "", "").unwrap_err();
        assert_eq!(err.limit(), Some(TemplateLimit::Source(MAX_SOURCE_BYTES)));
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    /// The Llama 3 Instruct template (Meta-Llama-3-8B-Instruct `tokenizer_config.json`).
    const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn real_templates_render_within_the_bounds() {
        let t = ChatTemplate::new(LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&[Message::system("Be terse. "), Message::user(" Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // A long conversation (1,000 messages, 4.5 MB: more than the fixed part of the output
        // budget) renders: the budgets grow with the input.
        let conv: Vec<Message> = (0..1000)
            .map(|i| if i % 2 == 0 { Message::user("u".repeat(4500)) } else { Message::assistant("a".repeat(4500)) })
            .collect();
        for t in [smollm(), t] {
            let start = std::time::Instant::now();
            let out = t.render(&conv, true).unwrap();
            assert!(out.len() > BASE_OUTPUT_BYTES && out.len() > 4_500_000, "{}", out.len());
            assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
        }
    }
}
