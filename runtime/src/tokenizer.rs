//! Text ⇄ token ids, on top of Hugging Face `tokenizers` (a `tokenizer.json`).
//!
//! [`Tokenizer`] encodes without ever adding BOS/EOS or other post-processor tokens
//! (`add_special_tokens = false`: the chat template or the caller decides), and can either
//! recognise special tokens written in the text (`parse_special = true`, e.g.
//! `<|im_start|>` → one id) or treat them as plain text. Truncation and padding from the
//! file are switched off.
//!
//! [`StreamDecoder`] turns a stream of generated ids into text pieces: it emits nothing while
//! the decoded text ends in an incomplete UTF-8 sequence (byte-level BPE can split one
//! character across tokens), and the concatenation of all pieces (plus [`StreamDecoder::finish`])
//! equals [`Tokenizer::decode_with`] of all ids with the same `skip_special` flag.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A tokenizer failed to load, encode or decode.
#[derive(Debug)]
pub struct TokenizerError {
    message: String,
    source: Option<tokenizers::Error>,
}

impl TokenizerError {
    fn new(context: &str, source: tokenizers::Error) -> Self {
        TokenizerError { message: format!("{context}: {source}"), source: Some(source) }
    }

    fn msg(message: String) -> Self {
        TokenizerError { message, source: None }
    }
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tokenizer: {}", self.message)
    }
}

impl std::error::Error for TokenizerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, TokenizerError>;

struct Inner {
    /// Splits special tokens out of the text.
    parse: tokenizers::Tokenizer,
    /// A copy that encodes special tokens as plain text; built on first use.
    literal: OnceLock<tokenizers::Tokenizer>,
    /// The special tokens' texts and ids, longest text first; built on first use.
    specials: OnceLock<Vec<(String, u32)>>,
}

/// A loaded tokenizer. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path)
            .map_err(|e| TokenizerError::msg(format!("reading {}: {e}", path.display())))?;
        Self::from_json_str(&json).map_err(|e| TokenizerError::msg(format!("{}: {}", path.display(), e.message)))
    }

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_json_str(json: &str) -> Result<Self> {
        // The `tokenizers` parser panics on some malformed files instead of failing (its
        // decoder and normalizer parsers `expect` well-formed JSON; the fuzz target
        // hf_checkpoint found them). The compiler refuses those before writing a bundle, but a
        // bundle's tokenizer.json is a file like any other: a panic here becomes an error.
        let parsed = std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>());
        let tok = match parsed {
            Ok(result) => result.map_err(|e| TokenizerError::new("parsing tokenizer.json", e))?,
            Err(_) => {
                return Err(TokenizerError::msg(
                    "parsing tokenizer.json: the tokenizers parser failed on this file".into(),
                ))
            }
        };
        Ok(Self::from_tokenizer(tok))
    }

    /// Wraps an already built `tokenizers` tokenizer.
    pub fn from_tokenizer(mut tok: tokenizers::Tokenizer) -> Self {
        tok.set_encode_special_tokens(false);
        tok.with_padding(None);
        // Removing truncation cannot fail (only setting invalid parameters can).
        let _ = tok.with_truncation(None);
        Tokenizer { inner: Arc::new(Inner { parse: tok, literal: OnceLock::new(), specials: OnceLock::new() }) }
    }

    /// The underlying `tokenizers` tokenizer (special tokens parsed).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner.parse
    }

    fn literal(&self) -> &tokenizers::Tokenizer {
        self.inner.literal.get_or_init(|| {
            let mut t = self.inner.parse.clone();
            t.set_encode_special_tokens(true);
            t
        })
    }

    /// Encodes `text`. With `parse_special`, special tokens written in the text (such as
    /// `<|im_start|>`) become their ids; without it they are tokenized as ordinary text.
    /// Never adds BOS/EOS.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special { &self.inner.parse } else { self.literal() };
        let enc = tok.encode(text, false).map_err(|e| TokenizerError::new("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text, special tokens included. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Decodes `ids` to text, leaving special tokens out if `skip_special`.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.parse.decode(ids, skip_special).map_err(|e| TokenizerError::new("decode", e))
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.parse.get_vocab_size(true)
    }

    /// The id of a token (as written in the vocabulary, e.g. `Ġworld`, or a special token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.parse.token_to_id(token)
    }

    /// The vocabulary string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.parse.id_to_token(id)
    }

    /// Whether `id` is a special (added, `special: true`) token such as `<|im_end|>`.
    pub fn is_special(&self, id: u32) -> bool {
        let t = &self.inner.parse;
        t.get_added_vocabulary().simple_id_to_token(id).is_some_and(|s| t.get_added_vocabulary().is_special_token(&s))
    }

    /// The special tokens (such as `<|im_start|>`) as texts with their ids, longest text first.
    pub fn special_tokens(&self) -> &[(String, u32)] {
        self.inner.specials.get_or_init(|| {
            let mut v: Vec<(String, u32)> = self
                .inner
                .parse
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special && !t.content.is_empty())
                .map(|(id, t)| (t.content, id))
                .collect();
            v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
            v
        })
    }

    /// Encodes `text`, parsing as special tokens only the occurrences that start at the byte
    /// offsets `trusted` allows: elsewhere a special token's text is ordinary text. The text
    /// is split at the parsed special tokens (as `tokenizers` does), and each piece between
    /// them is encoded without special-token parsing.
    pub fn encode_parsing_only(&self, text: &str, trusted: impl Fn(usize) -> bool) -> Result<Vec<u32>> {
        let specials = self.special_tokens();
        let mut ids = vec![];
        let mut piece_start = 0;
        let mut at = 0;
        while at < text.len() {
            let here = &text[at..];
            let found = if trusted(at) { specials.iter().find(|(s, _)| here.starts_with(s.as_str())) } else { None };
            match found {
                Some((s, id)) => {
                    if piece_start < at {
                        ids.extend(self.encode(&text[piece_start..at], false)?);
                    }
                    ids.push(*id);
                    at += s.len();
                    piece_start = at;
                }
                None => at += here.chars().next().map_or(1, char::len_utf8),
            }
        }
        if piece_start < text.len() {
            ids.extend(self.encode(&text[piece_start..], false)?);
        }
        Ok(ids)
    }

    /// A stream decoder sharing this tokenizer.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(self.clone(), skip_special)
    }
}

/// Incremental detokenizer: feed ids one at a time, get the newly completed text.
///
/// It keeps a small window of ids: the ones behind the last emitted piece (as context, so
/// decoders that treat the first token specially stay consistent) and the ones not yet
/// emitted. Each [`push`](Self::push) decodes that window twice.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    /// `ids[..read]` produced `prefix` (already emitted); `ids[read..]` are pending.
    ids: Vec<u32>,
    read: usize,
    prefix: String,
}

impl StreamDecoder {
    /// A decoder for `tokenizer`; `skip_special` leaves special tokens out of the text.
    pub fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        StreamDecoder { tokenizer, skip_special, ids: Vec::new(), read: 0, prefix: String::new() }
    }

    /// Adds one id; returns the text it completes (possibly empty, e.g. while a multi-byte
    /// character is split across tokens).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        if text.len() <= self.prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let piece = self.new_text(text)?;
        // Slide the window: what was pending becomes the context of the next piece.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        Ok(piece)
    }

    /// Flushes the pending ids (an incomplete character comes out as U+FFFD) and resets the
    /// decoder for a new stream.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        let piece = if text.len() > self.prefix.len() { self.new_text(text)? } else { String::new() };
        self.reset();
        Ok(piece)
    }

    /// Forgets all state (pending ids are dropped).
    pub fn reset(&mut self) {
        self.ids.clear();
        self.read = 0;
        self.prefix.clear();
    }

    /// Whether ids are waiting for more input to form complete text.
    pub fn has_pending(&self) -> bool {
        self.read < self.ids.len()
    }

    fn new_text(&self, text: String) -> Result<String> {
        match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => Ok(rest.to_owned()),
            None => Err(TokenizerError::msg(format!(
                "stream decode: decoding token {} rewrote earlier text {:?} into {:?}",
                self.ids.last().copied().unwrap_or(0),
                self.prefix,
                text
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tokenizer.json files on which the `tokenizers` parser panics instead of failing
    /// (malformed JSON inside a decoder, a Precompiled normalizer without its fields) load as
    /// errors, not panics: a bundle's tokenizer.json is untrusted too.
    #[test]
    fn tokenizer_json_that_panics_the_parser_is_an_error() {
        let json = |normalizer: &str, decoder: &str| {
            format!(
                r#"{{"version": "1.0", "added_tokens": [], "normalizer": {normalizer}, "pre_tokenizer": null,
                "post_processor": null, "decoder": {decoder},
                "model": {{"type": "WordLevel", "vocab": {{"<s>": 0, "</s>": 1}}, "unk_token": "<s>"}}}}"#
            )
        };
        assert!(Tokenizer::from_json_str(&json("null", "null")).is_ok());
        for (normalizer, decoder) in
            [("null", r#"{"type": "ByteLevel", "x": tru}"#), (r#"{"type": "Precompiled"}"#, "null")]
        {
            let e = Tokenizer::from_json_str(&json(normalizer, decoder)).err().expect("an error");
            assert!(e.to_string().contains("tokenizer.json"), "{e}");
        }
    }

    /// GPT-2's byte → printable char table used by byte-level BPE.
    fn bytes_to_unicode() -> Vec<char> {
        let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut table = vec!['\0'; 256];
        for (b, c) in bs.into_iter().zip(cs) {
            table[b as usize] = char::from_u32(c).unwrap();
        }
        table
    }

    /// A tiny byte-level BPE tokenizer.json in the layout of SmolLM2's: ids 0..2 are the
    /// special tokens, then the 256 bytes, then merged tokens for a few words. Multi-byte
    /// characters are not merged (é is two tokens; € is "\xE2\x82" + "\xAC"), except that
    /// "\xE2\x82" is itself one token.
    fn tiny_json() -> String {
        let table = bytes_to_unicode();
        let enc = |s: &[u8]| s.iter().map(|&b| table[b as usize]).collect::<String>();
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let mut vocab: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
        vocab.extend((0..=255u8).map(|b| table[b as usize].to_string()));
        let mut merges: Vec<String> = Vec::new();
        let words: [&[u8]; 6] = [b"hello", b" world", b"Hello", b" w", b"\xE2\x82", b"\n"];
        for w in words {
            for i in 2..=w.len() {
                let (left, right) = (enc(&w[..i - 1]), enc(&w[i - 1..i]));
                let merged = enc(&w[..i]);
                if !vocab.contains(&merged) {
                    merges.push(format!("{left} {right}"));
                    vocab.push(merged);
                }
            }
        }
        let vocab_map: serde_json::Map<String, serde_json::Value> =
            vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
        let added: Vec<serde_json::Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map, "merges": merges}
        })
        .to_string()
    }

    fn tiny() -> Tokenizer {
        Tokenizer::from_json_str(&tiny_json()).unwrap()
    }

    /// Id of a single byte in the tiny vocabulary.
    fn byte(b: u8) -> u32 {
        3 + u32::from(b)
    }

    #[test]
    fn types_are_send_and_sync() {
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<Tokenizer>();
        is_send_sync::<StreamDecoder>();
    }

    #[test]
    fn vocabulary_lookups() {
        let t = tiny();
        // 3 specials + 256 bytes + merged prefixes of the words.
        assert!(t.vocab_size() > 259);
        assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(t.id_to_token(2).as_deref(), Some("<|im_end|>"));
        assert_eq!(t.token_to_id("Ġworld").map(|id| id >= 259), Some(true));
        assert_eq!(t.id_to_token(byte(b'a')).as_deref(), Some("a"));
        assert_eq!(t.id_to_token(byte(b' ')).as_deref(), Some("Ġ"));
        assert_eq!(t.token_to_id("no-such-token"), None);
        assert_eq!(t.id_to_token(1_000_000), None);
        assert!(t.is_special(2) && !t.is_special(byte(b'a')) && !t.is_special(999_999));
    }

    #[test]
    fn encode_and_decode() {
        let t = tiny();
        let hw = t.encode("hello world", true).unwrap();
        assert_eq!(hw, vec![t.token_to_id("hello").unwrap(), t.token_to_id("Ġworld").unwrap()]);
        assert_eq!(t.decode(&hw).unwrap(), "hello world");

        // é (C3 A9) is split into two byte tokens.
        let e = t.encode("é", true).unwrap();
        assert_eq!(e, vec![byte(0xC3), byte(0xA9)]);
        // € (E2 82 AC) is "\xE2\x82" + "\xAC".
        let euro = t.encode("€", true).unwrap();
        assert_eq!(euro.len(), 2);
        assert_eq!(euro[1], byte(0xAC));

        let s = "<|im_start|>hello\n<|im_end|>";
        let parsed = t.encode(s, true).unwrap();
        assert_eq!(parsed.first(), Some(&1));
        assert_eq!(parsed.last(), Some(&2));
        // Without parse_special the markers are plain bytes.
        let literal = t.encode(s, false).unwrap();
        assert!(!literal.contains(&1) && !literal.contains(&2));
        assert!(literal.len() > parsed.len());
        assert_eq!(t.decode(&parsed).unwrap(), s);
        assert_eq!(t.decode(&literal).unwrap(), s);
        assert_eq!(t.decode_with(&parsed, true).unwrap(), "hello\n");
        // No BOS/EOS is ever added.
        assert!(t.encode("", true).unwrap().is_empty());
    }

    #[test]
    fn from_file_and_errors() {
        let path = std::env::temp_dir().join(format!("kiln-runtime-tokenizer-test-{}.json", std::process::id()));
        std::fs::write(&path, tiny_json()).unwrap();
        let t = Tokenizer::from_file(&path);
        std::fs::remove_file(&path).unwrap();
        let t = t.unwrap();
        assert_eq!(t.vocab_size(), tiny().vocab_size());

        assert!(Tokenizer::from_file("/nonexistent/tokenizer.json").is_err());
        let err = Tokenizer::from_json_str("{ not json").unwrap_err();
        assert!(err.to_string().starts_with("tokenizer:"), "{err}");
    }

    /// Streams `ids` one by one; returns the pieces and the final flush.
    fn stream(t: &Tokenizer, ids: &[u32], skip_special: bool) -> (Vec<String>, String) {
        let mut d = t.stream_decoder(skip_special);
        let pieces = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        (pieces, d.finish().unwrap())
    }

    #[test]
    fn stream_waits_for_complete_characters() {
        let t = tiny();
        let text = "hello é€ world 😀!";
        let ids = t.encode(text, true).unwrap();
        let (pieces, rest) = stream(&t, &ids, false);
        assert_eq!(pieces.concat() + &rest, text);
        assert_eq!(rest, "");
        for p in &pieces {
            assert!(!p.contains(char::REPLACEMENT_CHARACTER), "{pieces:?}");
        }
        // The first byte of é emits nothing; the second emits the whole character.
        let i = ids.iter().position(|&id| id == byte(0xC3)).unwrap();
        assert_eq!(pieces[i], "");
        assert_eq!(pieces[i + 1], "é");
        // 😀 is four byte tokens: three empty pieces, then the character.
        let j = ids.iter().position(|&id| id == byte(0xF0)).unwrap();
        assert_eq!(&pieces[j..j + 4], &["", "", "", "😀"]);
    }

    #[test]
    fn stream_matches_decode_with_specials() {
        let t = tiny();
        let text = "<|im_start|>Hello wörld€<|im_end|>\n<|im_start|>é😀<|im_end|>";
        let ids = t.encode(text, true).unwrap();
        for skip in [false, true] {
            let (pieces, rest) = stream(&t, &ids, skip);
            assert_eq!(pieces.concat() + &rest, t.decode_with(&ids, skip).unwrap());
        }
        let (pieces, _) = stream(&t, &ids, true);
        assert!(!pieces.concat().contains("<|im_"));
    }

    #[test]
    fn stream_flushes_incomplete_tail_and_resets() {
        let t = tiny();
        let ids = [byte(b'h'), byte(0xE2)];
        let mut d = t.stream_decoder(false);
        assert_eq!(d.push(ids[0]).unwrap(), "h");
        assert_eq!(d.push(ids[1]).unwrap(), "");
        assert!(d.has_pending());
        // The dangling lead byte comes out as U+FFFD, exactly as decode() renders it.
        let tail = d.finish().unwrap();
        assert_eq!(format!("h{tail}"), t.decode(&ids).unwrap());
        assert_eq!(tail, "\u{FFFD}");
        assert!(!d.has_pending());
        // After finish the decoder starts afresh.
        assert_eq!(d.push(byte(b'x')).unwrap(), "x");
    }

    #[test]
    fn stream_random_sequences_match_decode() {
        // Random byte tokens (valid or not as UTF-8), merged tokens and specials.
        let t = tiny();
        let n = t.vocab_size() as u64;
        let mut state = 0x1234_5678_9ABC_DEF0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let len = (next() % 20) as usize;
            let ids: Vec<u32> = (0..len).map(|_| (next() % n) as u32).collect();
            for skip in [false, true] {
                let (pieces, rest) = stream(&t, &ids, skip);
                assert_eq!(pieces.concat() + &rest, t.decode_with(&ids, skip).unwrap(), "ids {ids:?}");
            }
        }
    }
}
