//! Builds a Hugging Face `tokenizer.json` from the vocabulary stored in a GGUF file.
//!
//! A GGUF model carries its tokenizer as metadata (`tokenizer.ggml.*`): the token strings,
//! their types, the BPE merges and the name of the pre-tokenizer family. kiln's compiled
//! programs tokenize with the `tokenizers` crate, which reads the JSON format this module
//! writes, so a compiled model needs nothing but its GGUF file.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported, with these
//! pre-tokenizer families (`tokenizer.ggml.pre`), which mirror llama.cpp's regexes:
//! - `smollm` and the families llama.cpp treats identically (`starcoder`, `refact`,
//!   `command-r`, `codeshell`, `exaone`, `minerva-7b`): every `\p{N}` character is split off
//!   on its own, then the GPT-2 byte-level regex applies. This is a `Split` (behavior
//!   `Isolated`) followed by `ByteLevel` with its regex on.
//! - `gpt2` and its equivalents (`mpt`, `olmo`, `jais`): plain `ByteLevel` with its regex on.
//! - `llama-bpe` (Llama 3's; also written `llama3`, `llama-v3`): Llama 3's regex as a `Split`
//!   (behavior `Isolated`), then `ByteLevel` without its regex, and BPE with `ignore_merges`
//!   (a word that is a whole token is not merged), as llama.cpp and Llama 3's own
//!   `tokenizer.json` do.
//!
//! Anything else (SentencePiece `llama` vocabularies, other regex families, a missing `pre`,
//! which llama.cpp treats as its multi-regex "default") is refused with a clear error rather
//! than producing a tokenizer that silently disagrees with llama.cpp.
//!
//! Tokens whose `tokenizer.ggml.token_type` is CONTROL (3) or USER_DEFINED (4) become
//! `added_tokens`, so that text like `<|im_start|>` is matched as one token before
//! pre-tokenization; CONTROL tokens are marked `special` (skipped by
//! `decode(.., skip_special_tokens = true)`).
//!
//! The JSON is written by hand, in a fixed order (vocabulary by id, merges by rank), so the
//! same GGUF always gives byte-identical output.

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write as _;

use crate::gguf::{clip, GgufError, GgufFile};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub mod token_type {
    pub const UNDEFINED: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The `Split` pattern of the digit-splitting families: every numeric character alone.
const DIGIT_SPLIT_REGEX: &str = r"\p{N}";

/// Pre-tokenizer families llama.cpp handles as "split off each `\p{N}`, then GPT-2 regex".
const DIGIT_SPLIT_FAMILIES: [&str; 7] =
    ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"];
/// Pre-tokenizer families llama.cpp handles with the plain GPT-2 regex.
const GPT2_FAMILIES: [&str; 4] = ["gpt2", "mpt", "olmo", "jais"];
/// Llama 3's pre-tokenizer names.
const LLAMA3_FAMILIES: [&str; 3] = ["llama-bpe", "llama3", "llama-v3"];
/// Llama 3's pre-tokenizer regex (its `tokenizer.json`'s, and llama.cpp's for `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Why a `tokenizer.json` could not be built.
#[derive(Debug)]
pub enum TokenizerError {
    /// A required key is missing or malformed.
    Gguf(GgufError),
    /// `tokenizer.ggml.model` is not `gpt2`.
    UnsupportedTokenizer { model: String },
    /// `tokenizer.ggml.pre` names a family whose regex kiln does not reproduce.
    UnsupportedPreTokenizer { pre: String },
    /// The vocabulary is empty.
    EmptyVocab,
    /// `tokenizer.ggml.token_type` does not have one entry per token.
    LengthMismatch { tokens: usize, token_types: usize },
    /// Two ids share one token string (a JSON vocabulary cannot represent that).
    DuplicateToken { token: String, first: u32, second: u32 },
    /// A merge is not `"left right"` with both halves and their concatenation in the vocabulary.
    BadMerge { rank: usize, merge: String, reason: String },
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gguf(e) => write!(f, "cannot read the tokenizer: {e}"),
            Self::UnsupportedTokenizer { model } => {
                write!(f, "unsupported tokenizer.ggml.model {model:?} (kiln supports only \"gpt2\" byte-level bpe)")
            }
            Self::UnsupportedPreTokenizer { pre } => write!(
                f,
                "unsupported tokenizer.ggml.pre {pre:?} (supported: {}, {})",
                DIGIT_SPLIT_FAMILIES.join(", "),
                GPT2_FAMILIES.join(", ")
            ),
            Self::EmptyVocab => write!(f, "tokenizer.ggml.tokens is empty"),
            Self::LengthMismatch { tokens, token_types } => {
                write!(f, "tokenizer.ggml.token_type has {token_types} entries for {tokens} tokens")
            }
            Self::DuplicateToken { token, first, second } => {
                write!(f, "token {token:?} appears twice in the vocabulary (ids {first} and {second})")
            }
            Self::BadMerge { rank, merge, reason } => {
                write!(f, "tokenizer.ggml.merges[{rank}] {merge:?}: {reason}")
            }
        }
    }
}

impl std::error::Error for TokenizerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Gguf(e) => Some(e),
            _ => None,
        }
    }
}

impl From<GgufError> for TokenizerError {
    fn from(e: GgufError) -> Self {
        Self::Gguf(e)
    }
}

/// Appends `s` as a JSON string literal.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

const BYTE_LEVEL: &str = r#"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}"#;

/// Builds the `tokenizer.json` text for the tokenizer stored in `gguf`.
pub fn tokenizer_json(gguf: &GgufFile) -> Result<String, TokenizerError> {
    let model = gguf.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedTokenizer { model: clip(model) });
    }
    let pre = match gguf.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => gguf.get_str("tokenizer.ggml.pre")?,
    };
    let pre_tokenizer = if DIGIT_SPLIT_FAMILIES.contains(&pre) {
        let mut p = String::from(r#"{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"#);
        json_str(&mut p, DIGIT_SPLIT_REGEX);
        p.push_str(r#"},"behavior":"Isolated","invert":false},"#);
        p.push_str(BYTE_LEVEL);
        p.push_str("]}");
        p
    } else if GPT2_FAMILIES.contains(&pre) {
        BYTE_LEVEL.to_owned()
    } else if LLAMA3_FAMILIES.contains(&pre) {
        let mut p = String::from(r#"{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"#);
        json_str(&mut p, LLAMA3_REGEX);
        p.push_str(r#"},"behavior":"Isolated","invert":false},"#);
        p.push_str(r#"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false}]}"#);
        p
    } else {
        return Err(TokenizerError::UnsupportedPreTokenizer { pre: clip(pre) });
    };

    let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(TokenizerError::EmptyVocab);
    }
    let types = match gguf.get("tokenizer.ggml.token_type") {
        None => vec![token_type::NORMAL; tokens.len()],
        Some(_) => gguf.get_i32_array("tokenizer.ggml.token_type")?,
    };
    if types.len() != tokens.len() {
        return Err(TokenizerError::LengthMismatch { tokens: tokens.len(), token_types: types.len() });
    }
    let merges = gguf.get_str_array("tokenizer.ggml.merges")?;

    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (id, &tok) in tokens.iter().enumerate() {
        let id = id as u32;
        if let Some(first) = vocab.insert(tok, id) {
            return Err(TokenizerError::DuplicateToken { token: clip(tok), first, second: id });
        }
    }
    let mut joined = String::new();
    for (rank, &merge) in merges.iter().enumerate() {
        let bad = |reason: String| TokenizerError::BadMerge { rank, merge: clip(merge), reason };
        let mut parts = merge.split(' ');
        let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected two tokens separated by one space".to_owned()));
        };
        joined.clear();
        joined.push_str(left);
        joined.push_str(right);
        for part in [left, right, joined.as_str()] {
            if part.is_empty() || !vocab.contains_key(part) {
                return Err(bad(format!("{:?} is not in the vocabulary", clip(part))));
            }
        }
    }

    // Assemble the JSON, one vocabulary entry / merge per line.
    let mut out = String::with_capacity(tokens.len() * 24 + merges.len() * 16 + 4096);
    out.push_str("{\n\"version\":\"1.0\",\n\"truncation\":null,\n\"padding\":null,\n\"added_tokens\":[");
    let mut first = true;
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty != token_type::CONTROL && ty != token_type::USER_DEFINED {
            continue;
        }
        out.push_str(if first { "\n" } else { ",\n" });
        first = false;
        let _ = write!(out, r#"{{"id":{id},"content":"#);
        json_str(&mut out, tok);
        let _ = write!(
            out,
            r#","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":{}}}"#,
            ty == token_type::CONTROL
        );
    }
    out.push_str("\n],\n\"normalizer\":null,\n\"pre_tokenizer\":");
    out.push_str(&pre_tokenizer);
    out.push_str(
        ",\n\"post_processor\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":false,\"use_regex\":true}",
    );
    out.push_str(
        ",\n\"decoder\":{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":true,\"use_regex\":true}",
    );
    out.push_str(
        ",\n\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":null,\"continuing_subword_prefix\":null,\
         \"end_of_word_suffix\":null,\"fuse_unk\":false,\"byte_fallback\":false,\"ignore_merges\":",
    );
    out.push_str(if LLAMA3_FAMILIES.contains(&pre) { "true" } else { "false" });
    out.push_str(",\n\"vocab\":{");
    for (id, &tok) in tokens.iter().enumerate() {
        out.push_str(if id == 0 { "\n" } else { ",\n" });
        json_str(&mut out, tok);
        let _ = write!(out, ":{id}");
    }
    out.push_str("\n},\n\"merges\":[");
    for (rank, &merge) in merges.iter().enumerate() {
        out.push_str(if rank == 0 { "\n" } else { ",\n" });
        json_str(&mut out, merge);
    }
    out.push_str("\n]\n}\n}\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, MetaValue};
    use std::path::Path;
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    fn strs(v: &[&str]) -> MetaValue {
        MetaValue::Array(v.iter().map(|s| MetaValue::String((*s).to_owned())).collect())
    }

    /// A tiny byte-level vocabulary: the 256 byte symbols, a few merges, three specials.
    fn tiny(model: &str, pre: Option<&str>) -> GgufWriter {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        let mut types = vec![3, 3, 3];
        // GPT-2's byte-to-unicode table.
        let mut extra = 0;
        let mut symbols = Vec::new();
        for b in 0..256u32 {
            let c =
                if (b'!' as u32..=b'~' as u32).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
                {
                    char::from_u32(b).unwrap()
                } else {
                    extra += 1;
                    char::from_u32(255 + extra).unwrap()
                };
            symbols.push(c.to_string());
        }
        tokens.extend(symbols.iter().cloned());
        types.extend(std::iter::repeat_n(1, 256));
        for t in ["he", "ll", "hell", "hello", "Ġw", "Ġwor", "Ġworld", "or", "ld", "\\\""] {
            tokens.push(t.into());
            types.push(1);
        }
        tokens.push("<user>".into());
        types.push(4);
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "\\ \""];
        let mut w = GgufWriter::new();
        w.add_meta("tokenizer.ggml.model", MetaValue::String(model.into()));
        if let Some(pre) = pre {
            w.add_meta("tokenizer.ggml.pre", MetaValue::String(pre.into()));
        }
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        w.add_meta("tokenizer.ggml.tokens", strs(&token_refs));
        w.add_meta("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()));
        w.add_meta("tokenizer.ggml.merges", strs(&merges));
        w
    }

    fn build(w: &GgufWriter) -> Result<String, TokenizerError> {
        tokenizer_json(&GgufFile::parse(w.finish()).unwrap())
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn tiny_vocab_smollm() {
        let json = build(&tiny("gpt2", Some("smollm"))).unwrap();
        let tok = Tokenizer::from_str(&json).unwrap();
        let id = |s: &str| tok.token_to_id(s).unwrap();
        assert_eq!(ids(&tok, "hello world"), [id("hello"), id("Ġworld")]);
        assert_eq!(ids(&tok, "<|im_start|>hello<|im_end|>"), [1, id("hello"), 2]);
        assert_eq!(ids(&tok, "x\\\""), [id("x"), id("\\\"")]);
        // Digits are split one by one.
        assert_eq!(ids(&tok, "12"), [id("1"), id("2")]);
        assert_eq!(ids(&tok, " 1"), [id("Ġ"), id("1")]);
        // User-defined tokens are matched whole but are not special.
        assert_eq!(ids(&tok, "a<user>b"), [id("a"), id("<user>"), id("b")]);
        let enc = tok.encode("<|im_end|><user>", false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "<user>");
        for text in ["hello world", "tab\there\nnew  line", "héllo wörld 🎉 12.5", ""] {
            let enc = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        // Deterministic.
        assert_eq!(build(&tiny("gpt2", Some("smollm"))).unwrap(), json);
    }

    #[test]
    fn tiny_vocab_gpt2_pre() {
        let json = build(&tiny("gpt2", Some("gpt2"))).unwrap();
        let tok = Tokenizer::from_str(&json).unwrap();
        assert!(!json.contains("Split"));
        assert_eq!(ids(&tok, "hello world").len(), 2);
    }

    #[test]
    fn unsupported_tokenizers() {
        let e = build(&tiny("llama", Some("default"))).unwrap_err();
        assert!(matches!(&e, TokenizerError::UnsupportedTokenizer { model } if model == "llama"));
        assert!(e.to_string().contains("llama"));
        let e = build(&tiny("gpt2", Some("qwen2"))).unwrap_err();
        assert!(matches!(&e, TokenizerError::UnsupportedPreTokenizer { pre } if pre == "qwen2"));
        assert!(e.to_string().contains("qwen2"));
        let e = build(&tiny("gpt2", None)).unwrap_err();
        assert!(matches!(&e, TokenizerError::UnsupportedPreTokenizer { pre } if pre == "default"));
        let e = build(&GgufWriter::new()).unwrap_err();
        assert!(matches!(e, TokenizerError::Gguf(GgufError::MissingKey { .. })), "{e}");
    }

    #[test]
    fn malformed_vocabularies() {
        let mut w = tiny("gpt2", Some("smollm"));
        w.add_meta("tokenizer.ggml.merges", strs(&["h e"]));
        // Duplicate key is rejected by the GGUF reader itself.
        assert!(GgufFile::parse(w.finish()).is_err());

        let bad_merge = |merge: &str| {
            let mut w = GgufWriter::new();
            w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
                .add_meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
                .add_meta("tokenizer.ggml.tokens", strs(&["a", "b", "ab"]))
                .add_meta("tokenizer.ggml.merges", strs(&[merge]));
            build(&w)
        };
        assert!(bad_merge("a b").is_ok());
        for merge in ["ab", "a  b", "a b c", "b a", "a c", " a"] {
            let e = bad_merge(merge).unwrap_err();
            assert!(matches!(e, TokenizerError::BadMerge { rank: 0, .. }), "{merge:?}: {e}");
        }

        let mut w = GgufWriter::new();
        w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .add_meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
            .add_meta("tokenizer.ggml.tokens", strs(&["a", "b", "a"]))
            .add_meta("tokenizer.ggml.merges", strs(&[]));
        let e = build(&w).unwrap_err();
        assert!(matches!(e, TokenizerError::DuplicateToken { first: 0, second: 2, .. }), "{e}");

        let mut w = GgufWriter::new();
        w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .add_meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
            .add_meta("tokenizer.ggml.tokens", strs(&["a", "b"]))
            .add_meta("tokenizer.ggml.token_type", MetaValue::Array(vec![MetaValue::I32(1)]))
            .add_meta("tokenizer.ggml.merges", strs(&[]));
        let e = build(&w).unwrap_err();
        assert!(matches!(e, TokenizerError::LengthMismatch { tokens: 2, token_types: 1 }), "{e}");
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, r#""a\"b\\c\n\u0001é""#);
    }

    /// Builds the real SmolLM2 tokenizer named by `KILN_MODEL` (`cargo xtask test` sets it; unset, the test fails)
    /// and checks it against ids produced by llama.cpp.
    #[test]
    fn real_model_tokenizer() {
        let path = std::env::var("KILN_MODEL")
            .expect("KILN_MODEL is not set: point it at the test model's GGUF (`cargo xtask test` sets it)");
        let gguf = GgufFile::open(Path::new(&path)).unwrap();
        let json = tokenizer_json(&gguf).unwrap();
        assert_eq!(tokenizer_json(&gguf).unwrap(), json, "output must be deterministic");
        let tok = Tokenizer::from_str(&json).unwrap();
        assert_eq!(tok.get_vocab_size(true), 49152);

        assert_eq!(ids(&tok, "Hello world"), [19556, 905]);
        assert_eq!(ids(&tok, "  leading spaces"), [216, 2899, 5600]);
        assert_eq!(
            ids(&tok, "numbers 1234567 and 3.14159"),
            [28707, 216, 33, 34, 35, 36, 37, 38, 39, 284, 216, 35, 30, 33, 36, 33, 37, 41]
        );
        assert_eq!(ids(&tok, "<|im_start|>user\nhi<|im_end|>"), [1, 4093, 198, 6004, 2]);
        // Control tokens are special: skipped when decoding with skip_special_tokens.
        assert_eq!(tok.decode(&[1, 4093, 198, 6004, 2], true).unwrap(), "user\nhi");
        let added = tok.get_added_tokens_decoder();
        assert_eq!(added.len(), 17);
        assert!(added.values().all(|t| t.special));

        for text in [
            "Hello, world! How are you?",
            "tabs\tand\nnewlines\r\n  and   runs of spaces ",
            "unicode: héllo wörld, 日本語のテキスト, Ελληνικά, русский",
            "emoji 🎉🚀👩‍👩‍👧 and ZWJ sequences",
            "numbers 0123456789 ٣٤٥ ½",
            "code: fn main() { println!(\"{}\", 1 + 2); }",
            "",
        ] {
            let enc = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text, "{text:?}");
        }
    }

    #[test]
    fn huge_strings_are_clipped_in_messages() {
        let long = "x".repeat(1 << 20);
        for (model, pre) in [(long.as_str(), None), ("gpt2", Some(long.as_str()))] {
            let msg = build(&tiny(model, pre)).unwrap_err().to_string();
            assert!(msg.len() < 300 && msg.contains("(1048576 bytes)"), "{}", &msg[..msg.len().min(300)]);
        }
        let mut w = GgufWriter::new();
        w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
        w.add_meta("tokenizer.ggml.pre", MetaValue::String("gpt2".into()));
        w.add_meta("tokenizer.ggml.tokens", strs(&[long.as_str(), "y"]));
        w.add_meta("tokenizer.ggml.merges", strs(&[format!("{long}z y").as_str()]));
        let msg = build(&w).unwrap_err().to_string();
        assert!(msg.len() < 400 && msg.contains("(1048577 bytes)"), "{}", &msg[..msg.len().min(400)]);
        let mut w = GgufWriter::new();
        w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
        w.add_meta("tokenizer.ggml.pre", MetaValue::String("gpt2".into()));
        w.add_meta("tokenizer.ggml.tokens", strs(&[long.as_str(), long.as_str()]));
        w.add_meta("tokenizer.ggml.merges", strs(&[]));
        let msg = build(&w).unwrap_err().to_string();
        assert!(msg.len() < 300 && msg.contains("(1048576 bytes)"), "{}", &msg[..msg.len().min(300)]);
    }
}
