//! kiln's tokenizer against an independent implementation: llama.cpp's own tokenizer.
//!
//! kiln turns the GGUF's vocabulary into a Hugging Face `tokenizer.json`
//! (`compiler::tokenizer_json`) and the runtime encodes with the `tokenizers` crate.
//! `tests/peer/llama_tokenize.py` tokenizes the same strings with llama.cpp (through the
//! `llama-cpp-python` package, which reads the GGUF itself), and every encoding must match
//! exactly. `KILN_MODEL` names the GGUF model; `KILN_PYTHON` may name the Python interpreter
//! (default `python3`), which must have `llama_cpp` installed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use compiler::gguf::GgufFile;
use compiler::tokenizer_json::tokenizer_json;
use runtime::tokenizer::Tokenizer;
use tests::harness::Rng;

fn model_path() -> PathBuf {
    PathBuf::from(std::env::var_os("KILN_MODEL").expect(
        "KILN_MODEL is not set: point it at the test model's GGUF file \
         (SmolLM2-135M-Instruct.Q4_1.gguf); CI always sets it",
    ))
}

/// Hand-written strings that exercise the pre-tokenizer's corners.
pub(crate) const TRICKY: &[&str] = &[
    "",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\n\n\n",
    "\t",
    "\r\n",
    "hello",
    " hello",
    "  hello",
    "hello ",
    "hello  ",
    "hello   world",
    "  leading and trailing  ",
    "Hello, world!",
    "HELLO World hElLo",
    "0",
    "7",
    "42",
    "123456789",
    "12345678901234567890",
    "3.14159",
    "-2.5e-10",
    "1,000,000",
    "$1,234.56",
    "v1.2.3",
    "2024-01-15T10:30:00Z",
    "abc123def",
    "x1 y22 z333",
    " 1",
    "  12",
    "\t3",
    "\n42",
    " \t 7",
    "a  1",
    "a \n 2",
    "1 2 3",
    "½ ² ³ ٣ ४ Ⅻ ①",
    "café résumé naïve façade",
    "Ünïcödé àccénts",
    "e\u{301}",
    "Straße",
    "中文测试",
    "日本語のテキスト",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "नमस्ते दुनिया",
    "😀",
    "😀😃😄",
    "I love 🍕 and 🍣!",
    "👨‍👩‍👧‍👦",
    "👩🏽‍💻",
    "🏳️‍🌈",
    "🇫🇷🇯🇵🇺🇸",
    "👍🏻👍🏿",
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2\n\treturn -x\n",
    "if (a && b) { return c[i] + d->e; }",
    "    indented\n        more\n    back",
    "x = {'a': 1, \"b\": [2, 3]}",
    "<div class=\"x\">text</div>",
    "SELECT * FROM t WHERE id = 1;",
    "a\r\nb\r\nc",
    "line1\nline2\n\nline4",
    "tab\tseparated\tvalues",
    " \t \n \r\n ",
    "end with newline\n",
    "   \n  9",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "text<|endoftext|>more",
    " <|im_end|> ",
    "<|im_start",
    "<|im_start|",
    "im_start|>",
    "<|im_end",
    "<|endoftext",
    "<|",
    "|>",
    "<<|im_start|>>",
    "don't",
    "I'll",
    "we've",
    "you're",
    "she's",
    "I'm",
    "he'd",
    "DON'T I'LL WE'VE",
    "don't I'll we've",
    "'s 't 're 've 'm 'll 'd",
    "rock 'n' roll",
    "it’s curly",
    "https://example.com/path?query=1&b=two#frag",
    "http://localhost:8080/api/v1/users/42",
    "user@example.com",
    "# Heading\n\n- item 1\n- item 2\n\n**bold** and _italic_ `code`",
    "```rust\nlet x = 1;\n```",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "[link](https://example.com)",
    "....!!!???",
    "a...b",
    "--- *** ___",
    "\u{a0}nbsp\u{a0}",
    "ideographic\u{3000}space",
    "zero\u{200b}width",
    "\u{feff}bom",
    "\u{0}nul",
    "\u{7f}del",
    "mixed 中文 and English 123 😀!",
];

/// Characters the random strings are built from, by class.
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const DIGITS: &[u8] = b"0123456789";
const PUNCT: &[u8] = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
const MULTIBYTE: &[char] = &[
    'é', 'ü', 'ß', 'ñ', 'Ω', 'ж', 'ش', 'क', '中', '文', 'の', '한', '😀', '🍕', '👍', '\u{200d}', '\u{301}', '\u{a0}',
    '\u{3000}', '٣', '²', '½', 'Ⅻ', '’', '€', '𝕏', '🇫', '🇷',
];
const FRAGMENTS: &[&str] = &["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "\r\n", "    ", "the", " the", "ing"];
/// Special-token fragments, used rarely: strings holding one are not checked for round trips.
const SPECIAL_FRAGMENTS: &[&str] = &["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start"];

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

/// A random string of up to 64 pieces drawn from the classes above.
pub(crate) fn random_string(rng: &mut Rng) -> String {
    let n = rng.below(65);
    let mut s = String::new();
    for _ in 0..n {
        match rng.below(100) {
            0..=39 => s.push(pick(rng, LETTERS) as char),
            40..=51 => s.push(pick(rng, DIGITS) as char),
            52..=66 => s.push(' '),
            67..=71 => s.push('\n'),
            72..=74 => s.push('\t'),
            75..=86 => s.push(pick(rng, PUNCT) as char),
            87..=93 => s.push(pick(rng, MULTIBYTE)),
            94..=98 => s.push_str(pick(rng, FRAGMENTS)),
            _ => s.push_str(pick(rng, SPECIAL_FRAGMENTS)),
        }
    }
    s
}

/// Runs llama.cpp's tokenizer on all `strings` at once.
fn llama_cpp_tokenize(model: &Path, strings: &[String]) -> Vec<Vec<u32>> {
    peer_tokenize("llama_tokenize.py", model, strings, "llama-cpp-python")
}

/// Runs the peer tokenizer `tests/peer/SCRIPT ARG` on all `strings` at once (a JSON list on
/// stdin, a JSON list of id lists on stdout); `package` is what it needs installed.
pub(crate) fn peer_tokenize(script: &str, arg: &Path, strings: &[String], package: &str) -> Vec<Vec<u32>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peer").join(script);
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {python} {}: {e}", script.display()));
    let input = serde_json::to_vec(strings).unwrap();
    // Write from another thread so a child that fills its stdout pipe cannot deadlock us.
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("waiting for the peer tokenizer");
    writer.join().unwrap().expect("writing the strings to the peer tokenizer");
    let name = script.file_name().unwrap().to_string_lossy();
    assert!(
        out.status.success(),
        "{name} failed ({}); is {package} installed (`cargo xtask test` installs it)? stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<Vec<u32>> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{name} printed no JSON list of id lists ({e}): {}", String::from_utf8_lossy(&out.stdout))
    });
    assert_eq!(ids.len(), strings.len(), "{name} answered {} of {} strings", ids.len(), strings.len());
    ids
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let path = model_path();
    let start = Instant::now();
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let json = tokenizer_json(&gguf).expect("building tokenizer.json");
    let tok = Tokenizer::from_json_str(&json).expect("loading kiln's tokenizer.json");

    let mut strings: Vec<String> = TRICKY.iter().map(|s| (*s).to_owned()).collect();
    let mut rng = Rng::new(0x70c3_2024);
    strings.extend((0..2000).map(|_| random_string(&mut rng)));

    let kiln: Vec<Vec<u32>> =
        strings.iter().map(|s| tok.encode(s, true).unwrap_or_else(|e| panic!("kiln encoding {s:?}: {e}"))).collect();
    let kiln_time = start.elapsed();
    let peer_start = Instant::now();
    let llama = llama_cpp_tokenize(&path, &strings);
    let peer_time = peer_start.elapsed();

    let mismatches: Vec<usize> = (0..strings.len()).filter(|&i| kiln[i] != llama[i]).collect();
    for &i in mismatches.iter().take(8) {
        eprintln!("MISMATCH {:?}\n  kiln:      {:?}\n  llama.cpp: {:?}", strings[i], kiln[i], llama[i]);
    }

    // Round trip: decoding reproduces the text exactly (strings with special tokens aside).
    let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];
    let mut round_trips = 0;
    let mut bad_round_trips = vec![];
    for (s, ids) in strings.iter().zip(&kiln) {
        if specials.iter().any(|sp| s.contains(sp)) {
            continue;
        }
        round_trips += 1;
        let back = tok.decode(ids).unwrap_or_else(|e| panic!("decoding {ids:?}: {e}"));
        if &back != s {
            bad_round_trips.push((s.clone(), back));
        }
    }
    for (s, back) in bad_round_trips.iter().take(8) {
        eprintln!("ROUND TRIP {s:?} decoded as {back:?}");
    }

    let tokens: usize = kiln.iter().map(Vec::len).sum();
    eprintln!(
        "compared {} strings ({} hand-written, {} random; {tokens} tokens) with llama.cpp: \
         {} mismatches; {round_trips} round trips, {} wrong; kiln {kiln_time:.2?}, \
         llama.cpp {peer_time:.2?}",
        strings.len(),
        TRICKY.len(),
        strings.len() - TRICKY.len(),
        mismatches.len(),
        bad_round_trips.len(),
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} strings tokenize differently in kiln and llama.cpp (first ones above)",
        mismatches.len(),
        strings.len()
    );
    assert!(
        bad_round_trips.is_empty(),
        "{} of {round_trips} strings do not survive encode + decode (first ones above)",
        bad_round_trips.len()
    );
}
