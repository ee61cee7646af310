//! kiln's runtime: everything a compiled model library needs to run, and nothing of the
//! compiler. It owns the memory (activation arena, KV cache, weights file), the thread pool
//! the generated kernels run on, the tokenizer, the chat template, sampling, and the C ABI.
//!
//! Layers, bottom up: [`program`] runs any compiled library; [`session`] turns a language
//! model library plus its bundle files into a chat session; [`capi`] exposes sessions to C.

pub mod capi;
pub mod chat_template;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "offload")]
pub mod offload;
pub mod pool;
pub mod program;
pub mod sampling;
pub mod session;
pub mod tokenizer;
