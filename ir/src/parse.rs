//! Parser for the textual form printed by [`crate::write`].
//!
//! Lines are `graph`, `wN = weight ...`, `vN = <op> ... : <type>` and `output vN`;
//! blank lines and `;` comments are ignored. Values and weights must be numbered in order,
//! so that the text names exactly the ids the graph will have.

use std::fmt;

use crate::{
    ActDType, DType, Dim, Epilogue, Graph, KvDType, Node, Op, QuantFormat, RopeScaling, TensorType, ValueId, Weight,
    WeightId,
};

/// A syntax error, with the 1-based line it was found on.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Punct(char),
}

fn lex(line: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ';' {
            break;
        } else if c.is_whitespace() {
            chars.next();
        } else if "=,:[]+".contains(c) {
            toks.push(Tok::Punct(c));
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => s.push('\n'),
                        Some(e @ ('"' | '\\')) => s.push(e),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some(c) => s.push(c),
                }
            }
            toks.push(Tok::Str(s));
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || "=,:[]+;\"".contains(c) {
                    break;
                }
                w.push(c);
                chars.next();
            }
            toks.push(Tok::Word(w));
        }
    }
    Ok(toks)
}

struct Cursor {
    toks: Vec<Tok>,
    at: usize,
}

impl Cursor {
    fn next(&mut self) -> Result<Tok, String> {
        let t = self.toks.get(self.at).cloned().ok_or_else(|| "unexpected end of line".to_string())?;
        self.at += 1;
        Ok(t)
    }
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }
    fn word(&mut self) -> Result<String, String> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => Err(format!("expected a word, found {t:?}")),
        }
    }
    fn punct(&mut self, c: char) -> Result<(), String> {
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            t => Err(format!("expected '{c}', found {t:?}")),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        match self.next()? {
            Tok::Str(s) => Ok(s),
            t => Err(format!("expected a string, found {t:?}")),
        }
    }
    fn end(&self) -> Result<(), String> {
        match self.peek() {
            None => Ok(()),
            Some(t) => Err(format!("unexpected {t:?} at end of line")),
        }
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn number<T: std::str::FromStr>(&mut self) -> Result<T, String> {
        let w = self.word()?;
        w.parse().map_err(|_| format!("expected a number, found '{w}'"))
    }
    fn id(&mut self, prefix: char) -> Result<u32, String> {
        let w = self.word()?;
        w.strip_prefix(prefix).and_then(|n| n.parse().ok()).ok_or_else(|| format!("expected {prefix}N, found '{w}'"))
    }
    fn value(&mut self) -> Result<ValueId, String> {
        self.id('v').map(ValueId)
    }
    fn weight(&mut self) -> Result<WeightId, String> {
        self.id('w').map(WeightId)
    }
    /// `key=value` attribute with the given key.
    fn attr<T: std::str::FromStr>(&mut self, key: &str) -> Result<T, String> {
        let k = self.word()?;
        if k != key {
            return Err(format!("expected attribute '{key}', found '{k}'"));
        }
        self.punct('=')?;
        self.number()
    }
    fn comma(&mut self) -> Result<(), String> {
        self.punct(',')
    }
}

fn parse_type(c: &mut Cursor) -> Result<TensorType, String> {
    let dtype = match c.word()?.as_str() {
        "f32" => DType::F32,
        "i32" => DType::I32,
        "q16" => DType::Q16,
        other => return Err(format!("unknown dtype '{other}'")),
    };
    c.punct('[')?;
    let mut shape = Vec::new();
    while !c.is_punct(']') {
        if !shape.is_empty() {
            c.comma()?;
        }
        let w = c.word()?;
        shape.push(if w == "seq" {
            Dim::Seq
        } else {
            Dim::Fixed(w.parse().map_err(|_| format!("bad dimension '{w}'"))?)
        });
    }
    c.punct(']')?;
    Ok(TensorType { dtype, shape })
}

fn parse_op(c: &mut Cursor) -> Result<Op, String> {
    let mnemonic = c.word()?;
    Ok(match mnemonic.as_str() {
        "input" => Op::Input { index: c.number()? },
        "embed" => {
            let ids = c.value()?;
            c.comma()?;
            Op::Embed { ids, table: c.weight()? }
        }
        "rms_norm" => {
            let x = c.value()?;
            c.comma()?;
            let weight = c.weight()?;
            let eps = c.attr("eps")?;
            let quantize = matches!(c.peek(), Some(Tok::Word(w)) if w == "quantize");
            if quantize {
                c.word()?;
            }
            Op::RmsNorm { x, weight, eps, quantize }
        }
        "quantize" => Op::Quantize { x: c.value()? },
        "silu" => Op::Silu { x: c.value()? },
        "matmul" => {
            let x = c.value()?;
            c.comma()?;
            let weight = c.weight()?;
            let epilogue = if c.is_punct('+') {
                c.punct('+')?;
                match c.word()?.as_str() {
                    "silu" => Epilogue::Silu,
                    "add" => Epilogue::Add(c.value()?),
                    "mul" => Epilogue::Mul(c.value()?),
                    other => return Err(format!("unknown epilogue '{other}'")),
                }
            } else {
                Epilogue::None
            };
            Op::MatMul { x, weight, epilogue }
        }
        "rope" => {
            let x = c.value()?;
            let (head_dim, theta) = (c.attr("head_dim")?, c.attr("theta")?);
            let scaling = if c.peek() == Some(&Tok::Word("scaling".into())) {
                c.word()?;
                c.punct('=')?;
                match c.word()?.as_str() {
                    "linear" => RopeScaling::Linear { factor: c.attr("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: c.attr("factor")?,
                        low_freq_factor: c.attr("low_freq_factor")?,
                        high_freq_factor: c.attr("high_freq_factor")?,
                        original_context: c.attr("original_context")?,
                    },
                    "divisors" => {
                        c.punct('[')?;
                        let mut d = vec![c.number()?];
                        while c.is_punct(',') {
                            c.comma()?;
                            d.push(c.number()?);
                        }
                        c.punct(']')?;
                        RopeScaling::Divisors(d)
                    }
                    other => return Err(format!("unknown rope scaling '{other}'")),
                }
            } else {
                RopeScaling::None
            };
            Op::Rope { x, head_dim, theta, scaling }
        }
        "attention" => {
            let q = c.value()?;
            c.comma()?;
            let k = c.value()?;
            c.comma()?;
            let v = c.value()?;
            Op::Attention {
                q,
                k,
                v,
                layer: c.attr("layer")?,
                n_heads: c.attr("heads")?,
                n_kv_heads: c.attr("kv_heads")?,
                head_dim: c.attr("head_dim")?,
            }
        }
        "mul" | "add" => {
            let a = c.value()?;
            c.comma()?;
            let b = c.value()?;
            if mnemonic == "mul" {
                Op::Mul { a, b }
            } else {
                Op::Add { a, b }
            }
        }
        other => return Err(format!("unknown op '{other}'")),
    })
}

fn parse_line(graph: &mut Option<Graph>, c: &mut Cursor) -> Result<(), String> {
    let first = c.word()?;
    if first == "graph" {
        if graph.is_some() {
            return Err("second 'graph' line".into());
        }
        let name = c.string()?;
        let context = c.attr("context")?;
        let mut g = Graph::new(name, context);
        // Optional attributes, in this order: kv=, act=.
        let mut seen = 0;
        while c.peek().is_some() {
            let k = c.word()?;
            c.punct('=')?;
            let v = c.word()?;
            match k.as_str() {
                "kv" if seen < 1 => {
                    seen = 1;
                    g.kv_dtype =
                        KvDType::from_name(&v).ok_or_else(|| format!("unknown KV cache type '{v}' (f32, f16)"))?;
                }
                "act" if seen < 2 => {
                    seen = 2;
                    g.act_dtype =
                        ActDType::from_name(&v).ok_or_else(|| format!("unknown activation grid '{v}' (q16, q8)"))?;
                }
                _ => return Err(format!("expected attribute 'kv' or 'act' (in that order), found '{k}'")),
            }
        }
        *graph = Some(g);
        return c.end();
    }
    let g = graph.as_mut().ok_or("the text must start with a 'graph' line")?;
    if first == "output" {
        c.at = 0;
        c.word()?;
        g.outputs.push(c.value()?);
        return c.end();
    }
    c.at = 0;
    if first.starts_with('w') {
        let id = c.weight()?;
        if id.index() != g.weights.len() {
            return Err(format!("expected w{} next, found {id}", g.weights.len()));
        }
        c.punct('=')?;
        if c.word()? != "weight" {
            return Err("expected 'weight'".into());
        }
        let fmt_name = c.word()?;
        let format = QuantFormat::from_name(&fmt_name).ok_or_else(|| format!("unknown weight format '{fmt_name}'"))?;
        c.punct('[')?;
        let mut shape = Vec::new();
        while !c.is_punct(']') {
            if !shape.is_empty() {
                c.comma()?;
            }
            shape.push(c.number()?);
        }
        c.punct(']')?;
        let name = c.string()?;
        g.weights.push(Weight { name, format, shape });
        return c.end();
    }
    let id = c.value()?;
    if id.index() != g.nodes.len() {
        return Err(format!("expected v{} next, found {id}", g.nodes.len()));
    }
    c.punct('=')?;
    let op = parse_op(c)?;
    c.punct(':')?;
    let ty = parse_type(c)?;
    c.end()?;
    g.nodes.push(Node { op, ty });
    Ok(())
}

/// Parses a graph. The result is not verified; run [`crate::verify::verify`] on it.
pub fn parse_graph(text: &str) -> Result<Graph, ParseError> {
    let mut graph = None;
    for (i, line) in text.lines().enumerate() {
        let err = |message| ParseError { line: i + 1, message };
        let toks = lex(line).map_err(err)?;
        if toks.is_empty() {
            continue;
        }
        parse_line(&mut graph, &mut Cursor { toks, at: 0 }).map_err(err)?;
    }
    graph.ok_or(ParseError { line: 1, message: "empty text: expected a 'graph' line".into() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::write_graph;

    const TEXT: &str = r#"graph "tiny \"llama\"" context=64
w0 = weight q8_0[100, 64] "token_embd.weight"
w1 = weight f32[64] "blk.0.attn_norm.weight"
w2 = weight q4_1[64, 64] "blk.0.attn_q.weight"
w3 = weight q4_0[32, 64] "blk.0.attn_k.weight"
w4 = weight f16[32, 64] "blk.0.attn_v.weight"
w5 = weight q4_1[64, 64] "blk.0.attn_output.weight"
v0 = input 0 : i32[seq]
v1 = embed v0, w0 : f32[seq, 64]
v2 = rms_norm v1, w1 eps=0.00001 quantize : q16[seq, 64]
v3 = matmul v2, w2 : f32[seq, 64]
v4 = matmul v2, w3 : f32[seq, 32]
v5 = rms_norm v1, w1 eps=0.00001 : f32[seq, 64]
v6 = matmul v5, w4 : f32[seq, 32]
v7 = rope v3 head_dim=16 theta=10000 : f32[seq, 64]
v8 = rope v4 head_dim=16 theta=10000 : f32[seq, 32]
v9 = attention v7, v8, v6 layer=0 heads=4 kv_heads=2 head_dim=16 : f32[seq, 64]
v10 = quantize v9 : q16[seq, 64]
v11 = matmul v10, w5 +add v1 : f32[seq, 64]
v12 = silu v11 : f32[seq, 64]
v13 = mul v12, v11 : f32[seq, 64]
v14 = add v13, v1 : f32[seq, 64]
v15 = matmul v10, w5 +silu : f32[seq, 64]
v16 = matmul v10, w5 +mul v15 : f32[seq, 64]
output v14
output v16
"#;

    #[test]
    fn parse_then_print_gives_the_same_text() {
        let graph = parse_graph(TEXT).unwrap();
        assert_eq!(write_graph(&graph), TEXT);
        assert_eq!(parse_graph(&write_graph(&graph)).unwrap(), graph);
        crate::verify::verify(&graph).unwrap();
    }

    #[test]
    fn rope_scaling_round_trips_and_is_verified() {
        let with = |scaling: &str| {
            TEXT.replace(
                "v8 = rope v4 head_dim=16 theta=10000 :",
                &format!("v8 = rope v4 head_dim=16 theta=10000{scaling} :"),
            )
        };
        for scaling in [
            " scaling=linear factor=2.5",
            " scaling=llama3 factor=8 low_freq_factor=1 high_freq_factor=4 original_context=8192",
            " scaling=divisors [1, 1, 1.25, 8, 8, 8, 8, 8]",
        ] {
            let text = with(scaling);
            let graph = parse_graph(&text).unwrap_or_else(|e| panic!("{scaling}: {e}"));
            assert_ne!(graph, parse_graph(TEXT).unwrap());
            assert_eq!(write_graph(&graph), text);
            crate::verify::verify(&graph).unwrap();
        }
        for (scaling, needle) in [
            (" scaling=llama3 factor=8 low_freq_factor=4 high_freq_factor=1 original_context=8192", "below"),
            (" scaling=linear factor=0", "factor"),
            (" scaling=linear factor=NaN", "factor"),
            (" scaling=divisors [1, 1]", "divisors"),
        ] {
            let err = crate::verify::verify(&parse_graph(&with(scaling)).unwrap()).unwrap_err();
            assert!(err.to_string().contains(needle), "{scaling}: {err}");
        }
        let err = parse_graph(&with(" scaling=yarn factor=2")).unwrap_err();
        assert!(err.message.contains("'yarn'"), "{err}");
    }

    #[test]
    fn errors_name_the_line() {
        let bad = TEXT.replace("v5 = rms_norm", "v5 = rms_nrom");
        let err = parse_graph(&bad).unwrap_err();
        assert_eq!(err.line, 13);
        assert!(err.message.contains("rms_nrom"), "{err}");
        let f16 = parse_graph("graph \"x\" context=4 kv=f16\nv0 = input 0 : f32[seq, 4]\noutput v0\n").unwrap();
        assert_eq!(f16.kv_dtype, crate::KvDType::F16);
        assert_eq!(parse_graph(&f16.to_string()).unwrap(), f16, "kv=f16 survives a round trip");
        assert!(parse_graph("graph \"x\" context=4 kv=f8\n").unwrap_err().to_string().contains("'f8'"));
        let q8 = parse_graph("graph \"x\" context=4 kv=f16 act=q8\nv0 = input 0 : f32[seq, 4]\noutput v0\n").unwrap();
        assert_eq!((q8.kv_dtype, q8.act_dtype), (crate::KvDType::F16, crate::ActDType::Q8));
        assert_eq!(parse_graph(&q8.to_string()).unwrap(), q8, "act=q8 survives a round trip");
        let act_only = parse_graph("graph \"x\" context=4 act=q8\n").unwrap();
        assert_eq!(parse_graph(&act_only.to_string()).unwrap(), act_only);
        assert!(parse_graph("graph \"x\" context=4 act=q4\n").unwrap_err().to_string().contains("'q4'"));
        assert!(parse_graph("graph \"x\" context=4 act=q8 kv=f16\n").unwrap_err().to_string().contains("order"));
        let err = parse_graph("graph \"x\" context=4\nv1 = input 0 : i32[seq]\n").unwrap_err();
        assert!(err.message.contains("expected v0"), "{err}");
        assert!(parse_graph("").is_err());
        assert!(parse_graph("graph \"x\" context=4\nw0 = weight q9_9[1] \"a\"\n").is_err());
    }
}
