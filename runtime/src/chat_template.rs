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
//! Not provided (the workspace builds minijinja without its `json` and `loop_controls`
//! features, and without minijinja-contrib): the `tojson` filter, `{% break %}` /
//! `{% continue %}`, and `strftime_now`. Templates using them fail with an error, never a
//! panic.

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

/// A template that failed to compile or render (including `raise_exception` calls).
#[derive(Debug)]
pub struct TemplateError {
    inner: Error,
}

impl TemplateError {
    /// The template engine's own error.
    pub fn inner(&self) -> &Error {
        &self.inner
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chat template: {}", self.inner)
    }
}

impl std::error::Error for TemplateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.inner)
    }
}

impl From<Error> for TemplateError {
    fn from(inner: Error) -> Self {
        TemplateError { inner }
    }
}

const TEMPLATE_NAME: &str = "chat_template";

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
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(python_methods);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Renders the conversation; with `add_generation_prompt` the template appends the header
    /// that starts the assistant's reply.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let ctx = context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        Ok(template.render(ctx)?)
    }
}

/// `raise_exception(msg)`: what HF templates call to reject a conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// A few Python `str` and `dict` methods that chat templates commonly call.
fn python_methods(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    use minijinja::value::from_args;

    if let Some(s) = value.as_str() {
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
}
