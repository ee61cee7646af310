//! Requantizes the model's matrices (`--quant FORMAT`, `--quant-tensor PATTERN=FORMAT,...`):
//! every 2-D weight (the matmul weights and the embedding) a rule names is dequantized with its
//! source format and quantized with [`ir::quant::quantize_row`]; 1-D weights (norms) stay f32.
//!
//! For each 2-D weight, in order: the first `--quant-tensor` pattern that matches its name
//! (a substring, or a glob with `*` and `?` matched against the whole name); else the
//! `--quant` format, or the rule of a llama.cpp mixture ([`MIXTURES`]: `q4_k_m`, ...); else it
//! stays. Names are those after `prune_layers` (the names a GGUF written by `optimize` holds),
//! and layer-wise mixture rules count the layers left. A format whose block does not divide the row length falls back as llama.cpp's
//! `tensor_type_fallback` does ([`fallback`]). A weight already in its chosen format is not
//! touched. Formats are resolved by name ([`QuantFormat::from_name`]) when the pass runs, so
//! a format added to `ir::quant` is usable here at once.

use std::collections::BTreeMap;

use ir::QuantFormat;

use super::prune_layers::block_of;
use super::{PassContext, PassError};
use crate::gguf::GgmlType;
use crate::model::Model;

const PASS: &str = "requantize";

/// The options of the pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuantOptions {
    /// `--quant`: a format name (`q8_0`) or a mixture name (`q4_k_m`).
    pub default: Option<String>,
    /// `--quant-tensor`: per-tensor formats, the first matching pattern wins.
    pub tensors: Vec<TensorRule>,
}

impl QuantOptions {
    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.tensors.is_empty()
    }
}

/// `PATTERN=FORMAT` of `--quant-tensor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRule {
    pub pattern: String,
    pub format: String,
}

impl TensorRule {
    /// Parses `PATTERN=FORMAT[,PATTERN=FORMAT...]`.
    pub fn parse_list(text: &str) -> Result<Vec<TensorRule>, String> {
        text.split(',')
            .map(|item| {
                let item = item.trim();
                let (pattern, format) = item
                    .split_once('=')
                    .ok_or_else(|| format!("bad --quant-tensor item {item:?}: expected PATTERN=FORMAT"))?;
                let (pattern, format) = (pattern.trim(), format.trim());
                if pattern.is_empty() || format.is_empty() {
                    return Err(format!("bad --quant-tensor item {item:?}: empty pattern or format"));
                }
                if let Some(c) = pattern.chars().find(|c| "[]{}!\\".contains(*c) || c.is_whitespace()) {
                    return Err(format!(
                        "bad --quant-tensor pattern {pattern:?}: {c:?} is not supported (a pattern is a substring of \
                         tensor names, or a glob with * and ?)"
                    ));
                }
                Ok(TensorRule { pattern: pattern.to_owned(), format: format.to_ascii_lowercase() })
            })
            .collect()
    }

    /// Whether the rule names tensor `name`: a glob (with `*` or `?`) matches the whole name,
    /// any other pattern a substring of it.
    pub fn matches(&self, name: &str) -> bool {
        if self.pattern.contains(['*', '?']) {
            glob(self.pattern.as_bytes(), name.as_bytes())
        } else {
            name.contains(&self.pattern)
        }
    }
}

/// Whole-string glob match, `*` any run of bytes, `?` one byte (iterative, linear backtracking).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The role of a 2-D weight in a Llama model, as llama.cpp's `tensor_get_category` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `output.weight`, and `token_embd.weight` when the output head is tied to it.
    Output,
    TokenEmbd,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    Other,
}

impl Role {
    fn of(name: &str, tied: bool) -> Role {
        match name {
            "output.weight" => return Role::Output,
            "token_embd.weight" => return if tied { Role::Output } else { Role::TokenEmbd },
            _ => {}
        }
        for (part, role) in [
            ("attn_v.weight", Role::AttnV),
            ("attn_k.weight", Role::AttnK),
            ("attn_q.weight", Role::AttnQ),
            ("attn_output.weight", Role::AttnOutput),
            ("ffn_up", Role::FfnUp),
            ("ffn_gate", Role::FfnGate),
            ("ffn_down", Role::FfnDown),
        ] {
            if name.contains(part) {
                return role;
            }
        }
        Role::Other
    }
}

/// Which layers (`i` of `n`) a mixture rule applies to.
#[derive(Clone, Copy, Debug)]
pub enum Layers {
    All,
    /// llama.cpp's `use_more_bits`: the first and last eighth, and every third layer between.
    MoreBits,
    /// `i < n / 8`.
    FirstEighth,
    /// `i < n / 16`.
    FirstSixteenth,
    /// `i < k`.
    Below(u32),
    /// Every layer, when the model has at least this many query heads per KV head.
    GqaAtLeast(u32),
    /// The first and the last eighth: `i < n / 8` or `i >= 7 n / 8`.
    Ends,
}

impl Layers {
    fn holds(self, i: u32, n: u32, gqa: u32) -> bool {
        match self {
            Layers::All => true,
            Layers::MoreBits => i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2,
            Layers::FirstEighth => i < n / 8,
            Layers::FirstSixteenth => i < n / 16,
            Layers::Below(k) => i < k,
            Layers::GqaAtLeast(g) => gqa >= g,
            Layers::Ends => i < n / 8 || i >= 7 * n / 8,
        }
    }
}

/// One rule of a mixture: weights of `role` in `layers` get `format`.
#[derive(Clone, Copy, Debug)]
pub struct MixRule {
    pub role: Role,
    pub layers: Layers,
    pub format: &'static str,
}

/// A llama-quantize mixture for Llama-architecture models (no experts), or one of kiln's own
/// low-bit mixtures: the first rule that holds gives a weight's format, else `base`.
#[derive(Clone, Copy, Debug)]
pub struct Mixture {
    pub name: &'static str,
    /// `general.file_type` (llama.cpp's `llama_ftype`; for kiln's own mixtures, which llama.cpp
    /// has no type for, the ggml id kiln gives their base format).
    pub file_type: u32,
    pub base: &'static str,
    pub rules: &'static [MixRule],
}

const fn rule(role: Role, layers: Layers, format: &'static str) -> MixRule {
    MixRule { role, layers, format }
}

/// The mixtures, read from llama.cpp's `llama_tensor_get_type_impl` (src/llama-quant.cpp) for
/// the llama architecture without experts. The output head (and a tied embedding) gets q6_k
/// in all of them; `use_more_bits` ([`Layers::MoreBits`]) is layer-wise as llama.cpp counts
/// `attn_v` and `ffn_down` tensors one per layer.
pub const MIXTURES: &[Mixture] = &[
    Mixture {
        name: "q2_k",
        file_type: 10,
        base: "q2_k",
        rules: &[
            rule(Role::Output, Layers::All, "q6_k"),
            rule(Role::AttnV, Layers::GqaAtLeast(4), "q4_k"),
            rule(Role::AttnV, Layers::All, "q3_k"),
            rule(Role::FfnDown, Layers::All, "q3_k"),
            rule(Role::AttnOutput, Layers::All, "q3_k"),
        ],
    },
    Mixture { name: "q3_k_s", file_type: 11, base: "q3_k", rules: &[rule(Role::Output, Layers::All, "q6_k")] },
    Mixture {
        name: "q3_k_m",
        file_type: 12,
        base: "q3_k",
        rules: &[
            rule(Role::Output, Layers::All, "q6_k"),
            rule(Role::AttnV, Layers::Below(2), "q5_k"),
            rule(Role::AttnV, Layers::All, "q4_k"),
            rule(Role::FfnDown, Layers::FirstSixteenth, "q5_k"),
            rule(Role::FfnDown, Layers::All, "q4_k"),
            rule(Role::AttnOutput, Layers::All, "q4_k"),
        ],
    },
    Mixture {
        name: "q4_k_s",
        file_type: 14,
        base: "q4_k",
        rules: &[
            rule(Role::Output, Layers::All, "q6_k"),
            rule(Role::AttnV, Layers::Below(4), "q5_k"),
            rule(Role::FfnDown, Layers::FirstEighth, "q5_k"),
        ],
    },
    Mixture {
        name: "q4_k_m",
        file_type: 15,
        base: "q4_k",
        rules: &[
            rule(Role::Output, Layers::All, "q6_k"),
            rule(Role::AttnV, Layers::MoreBits, "q6_k"),
            rule(Role::FfnDown, Layers::MoreBits, "q6_k"),
        ],
    },
    Mixture {
        name: "q5_k_m",
        file_type: 17,
        base: "q5_k",
        rules: &[
            rule(Role::Output, Layers::All, "q6_k"),
            rule(Role::AttnV, Layers::MoreBits, "q6_k"),
            rule(Role::FfnDown, Layers::MoreBits, "q6_k"),
        ],
    },
    // kiln's own low-bit mixtures, for rows the K-quants do not divide: the output head as
    // llama.cpp's mixtures keep it (q6_k, or its fallback), `attn_v` one step up everywhere and
    // `ffn_down` one step up in the first and last eighth of the layers, which keeps the block
    // weights within 0.1 bit of the base (3.59 and 2.59 bits for SmolLM2 and an 8B Llama).
    Mixture {
        name: "q3_g64_m",
        file_type: ir::quant::KILN_Q3_G64,
        base: "q3_g64",
        rules: &[
            rule(Role::Output, Layers::All, "q6_k"),
            rule(Role::AttnV, Layers::All, "q4_0"),
            rule(Role::FfnDown, Layers::Ends, "q4_0"),
        ],
    },
    Mixture {
        name: "q2_g64_m",
        file_type: ir::quant::KILN_Q2_G64,
        base: "q2_g64",
        rules: &[
            rule(Role::Output, Layers::All, "q6_k"),
            rule(Role::AttnV, Layers::All, "q3_g64"),
            rule(Role::FfnDown, Layers::Ends, "q3_g64"),
        ],
    },
];

impl Mixture {
    pub fn by_name(name: &str) -> Option<&'static Mixture> {
        MIXTURES.iter().find(|m| m.name == name)
    }

    /// The format (name) of a weight of `role` in layer `layer` of `n_layers`.
    pub fn format_for(&self, role: Role, layer: Option<u32>, n_layers: u32, gqa: u32) -> &'static str {
        self.rules
            .iter()
            .find(|r| {
                r.role == role
                    && match (r.layers, layer) {
                        (Layers::All | Layers::GqaAtLeast(_), _) => r.layers.holds(0, n_layers, gqa),
                        (l, Some(i)) => l.holds(i, n_layers, gqa),
                        (_, None) => false,
                    }
            })
            .map_or(self.base, |r| r.format)
    }
}

/// `general.file_type` for a whole model in one format (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`;
/// the plain K formats are given their `_S` mixture's, the closest llama.cpp has).
pub fn file_type_of(format: &str) -> Option<u32> {
    Some(match format {
        "f32" => 0,
        "f16" => 1,
        "q4_0" => 2,
        "q4_1" => 3,
        "q8_0" => 7,
        "q5_0" => 8,
        "q5_1" => 9,
        "q2_k" => 10,
        "q3_k" => 11,
        "q4_k" => 14,
        "q5_k" => 16,
        "q6_k" => 18,
        "bf16" => 32,
        "q2_g64" => ir::quant::KILN_Q2_G64,
        "q3_g64" => ir::quant::KILN_Q3_G64,
        _ => Mixture::by_name(format)?.file_type,
    })
}

/// llama.cpp's fallback for a format whose block does not divide the row length `cols`
/// (`tensor_type_fallback`): q2_k and q3_k become q4_0, q4_k q5_0, q5_k q5_1, q6_k q8_0; when
/// that still does not divide it (rows not a multiple of 32), f16. kiln also gives f16 to
/// a 32-value format on such rows, where llama.cpp refuses; its own 64-value formats fall
/// back to q4_0.
pub fn fallback(format: QuantFormat, cols: usize) -> Option<&'static str> {
    if cols.is_multiple_of(format.block_values()) {
        return None;
    }
    let first = match format.name() {
        "q2_k" | "q3_k" => "q4_0",
        "q4_k" => "q5_0",
        "q5_k" => "q5_1",
        "q6_k" => "q8_0",
        "q2_g64" | "q3_g64" => "q4_0",
        _ => "f16",
    };
    let fits = match resolve(first) {
        Ok(f) => cols.is_multiple_of(f.block_values()),
        Err(_) => cols.is_multiple_of(32),
    };
    Some(if fits { first } else { "f16" })
}

/// The kiln format named `name`, or an error saying whether llama.cpp knows it.
pub fn resolve(name: &str) -> Result<QuantFormat, String> {
    if let Some(f) = QuantFormat::from_name(name) {
        return Ok(f);
    }
    let known: Vec<&str> = QuantFormat::ALL.iter().map(|f| f.name()).collect();
    if GgmlType::ALL.iter().any(|t| t.name().eq_ignore_ascii_case(name)) {
        return Err(format!(
            "{name} is a llama.cpp (ggml) format that kiln cannot produce yet; kiln has {}",
            known.join(", ")
        ));
    }
    let mixtures: Vec<&str> = MIXTURES.iter().map(|m| m.name).collect();
    Err(format!(
        "unknown format {name:?}; kiln has {}, and the llama.cpp mixtures {}",
        known.join(", "),
        mixtures.join(", ")
    ))
}

/// The format name chosen for each weight (`None`: not a 2-D weight or no rule names it).
fn plan(model: &Model<'_>, opts: &QuantOptions) -> Result<Vec<Option<String>>, PassError> {
    let bad = |message: String| PassError::BadOption { pass: PASS, message };
    let graph = &model.graph;
    let tied = !graph.weights.iter().any(|w| w.name == "output.weight");
    let n_layers = graph.weights.iter().filter_map(|w| block_of(&w.name)).map(|(b, _)| b + 1).max().unwrap_or(0);
    let gqa = graph
        .nodes
        .iter()
        .find_map(|n| match n.op {
            ir::Op::Attention { n_heads, n_kv_heads, .. } => Some(n_heads / n_kv_heads.max(1)),
            _ => None,
        })
        .unwrap_or(1);
    let default = match opts.default.as_deref().map(str::to_ascii_lowercase) {
        None => None,
        Some(name) => match Mixture::by_name(&name) {
            Some(m) => Some(Err(m)),
            None => {
                resolve(&name).map_err(|e| bad(format!("--quant {e}")))?;
                Some(Ok(name))
            }
        },
    };
    let mut matched = vec![false; opts.tensors.len()];
    let mut out = vec![];
    for w in &graph.weights {
        if w.shape.len() != 2 {
            out.push(None);
            continue;
        }
        let manual = opts.tensors.iter().position(|r| r.matches(&w.name));
        let choice = match (manual, &default) {
            (Some(i), _) => {
                matched[i] = true;
                Some(opts.tensors[i].format.clone())
            }
            (None, Some(Ok(name))) => Some(name.clone()),
            (None, Some(Err(mix))) => {
                let layer = block_of(&w.name).map(|(b, _)| b);
                Some(mix.format_for(Role::of(&w.name, tied), layer, n_layers, gqa).to_owned())
            }
            (None, None) => None,
        };
        out.push(choice);
    }
    if let Some(i) = matched.iter().position(|m| !m) {
        let examples: Vec<&str> =
            graph.weights.iter().filter(|w| w.shape.len() == 2).map(|w| w.name.as_str()).take(4).collect();
        return Err(bad(format!(
            "--quant-tensor pattern {:?} matches no matrix of the model (names look like {})",
            opts.tensors[i].pattern,
            examples.join(", ")
        )));
    }
    Ok(out)
}

pub fn run(model: &mut Model<'_>, cx: &PassContext) -> Result<(), PassError> {
    let opts = &cx.options.quant;
    if opts.is_empty() {
        return Ok(());
    }
    let bad = |message: String| PassError::BadOption { pass: PASS, message };
    let before = model.stats();
    let chosen = plan(model, opts)?;
    // Resolve every choice (and its fallback) before rewriting anything.
    let mut targets = vec![None; chosen.len()];
    let mut fallbacks: BTreeMap<(String, String, usize), (usize, String)> = BTreeMap::new();
    for (i, name) in chosen.iter().enumerate() {
        let Some(name) = name else { continue };
        let w = &model.graph.weights[i];
        let cols = w.shape[1] as usize;
        let mut format = resolve(name).map_err(|e| bad(format!("{}: {e}", w.name)))?;
        if let Some(to) = fallback(format, cols) {
            let entry = fallbacks.entry((name.clone(), to.to_owned(), cols)).or_insert((0, w.name.clone()));
            entry.0 += 1;
            format =
                resolve(to).map_err(|e| bad(format!("{} (fallback of {name} for rows of {cols}): {e}", w.name)))?;
        }
        targets[i] = Some(format);
    }
    let mut changes: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
    let mut lossy: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut unchanged = 0;
    for (i, target) in targets.iter().enumerate() {
        let Some(target) = *target else { continue };
        let w = &model.graph.weights[i];
        let source = w.format;
        if source == target {
            unchanged += 1;
            continue;
        }
        *changes.entry((source.name(), target.name())).or_default() += 1;
        if source.is_block_quantized() {
            *lossy.entry(source.name()).or_default() += 1;
        }
        // Converted row by row (`dequantize_row`, `quantize_row`) when read: as a build packs
        // it, or as optimize writes it.
        model.convert_weight(ir::WeightId(i as u32), target);
    }
    let mut what = vec![];
    if let Some(d) = &opts.default {
        what.push(format!("--quant {d}"));
    }
    if !opts.tensors.is_empty() {
        let rules: Vec<String> = opts.tensors.iter().map(|r| format!("{}={}", r.pattern, r.format)).collect();
        what.push(format!("--quant-tensor {}", rules.join(",")));
    }
    let changed: usize = changes.values().sum();
    cx.note(
        PASS,
        format_args!("{}: {changed} matrices rewritten, {unchanged} already in their format", what.join(" ")),
    );
    for ((from, to), n) in &changes {
        cx.note(PASS, format_args!("  {from} -> {to}: {n}"));
    }
    for ((wanted, to, cols), (n, example)) in &fallbacks {
        cx.note(
            PASS,
            format_args!(
                "  fallback: {n} matrices (e.g. {example}) have rows of {cols}, not a whole number of {wanted} blocks: \
                 {to} instead (llama.cpp's rule)"
            ),
        );
    }
    if !lossy.is_empty() {
        let from: Vec<String> = lossy.iter().map(|(f, n)| format!("{n} in {f}")).collect();
        cx.note(
            PASS,
            format_args!(
                "  warning: requantizing already quantized weights ({}) is lossy: their rounding errors add up; \
                 start from an f16/bf16/f32 GGUF when there is one",
                from.join(", ")
            ),
        );
    }
    cx.note(PASS, format_args!("  before: {before}"));
    cx.note(PASS, format_args!("  after:  {}", model.stats()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::PipelineOptions;
    use ir::parse::parse_graph;
    use ir::quant::{dequantize, quantize_row};

    const GRAPH: &str = "graph \"t\" context=8\nw0 = weight q8_0[8, 64] \"token_embd.weight\"\nw1 = weight f32[64] \"blk.0.attn_norm.weight\"\nw2 = weight q4_1[64, 64] \"blk.0.attn_v.weight\"\nw3 = weight f16[96, 64] \"blk.0.ffn_down.weight\"\nw4 = weight f32[64] \"output_norm.weight\"\nv0 = input 0 : i32[seq]\nv1 = embed v0, w0 : f32[seq, 64]\nv2 = rms_norm v1, w1 eps=0.00001 : f32[seq, 64]\nv3 = matmul v2, w2 : f32[seq, 64]\nv4 = matmul v3, w3 : f32[seq, 96]\nv5 = rms_norm v1, w4 eps=0.00001 : f32[seq, 64]\nv6 = matmul v5, w0 : f32[seq, 8]\noutput v4\noutput v6\n";

    fn model_weights(g: &ir::Graph) -> Vec<Vec<u8>> {
        let mut seed = 3u64;
        g.weights
            .iter()
            .map(|w| {
                let cols = *w.shape.last().unwrap() as usize;
                let rows = w.n_values() as usize / cols;
                (0..rows)
                    .flat_map(|_| {
                        let v: Vec<f32> = (0..cols)
                            .map(|_| {
                                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                                (seed >> 40) as f32 / (1u64 << 23) as f32 - 0.5
                            })
                            .collect();
                        quantize_row(w.format, &v)
                    })
                    .collect()
            })
            .collect()
    }

    /// Each weight's name, format and bytes after the pass, and the pass's report lines.
    type Requantized = (Vec<(String, QuantFormat, Vec<u8>)>, Vec<String>);

    fn requantize(quant: &str, tensors: &str) -> Result<Requantized, PassError> {
        let g = parse_graph(GRAPH).unwrap();
        let w = model_weights(&g);
        let mut model = Model::borrowed(g, &w);
        let options = PipelineOptions {
            quant: QuantOptions {
                default: (!quant.is_empty()).then(|| quant.to_owned()),
                tensors: if tensors.is_empty() { vec![] } else { TensorRule::parse_list(tensors).unwrap() },
            },
            ..Default::default()
        };
        let cx = PassContext::new(&options);
        run(&mut model, &cx)?;
        model.check_weights().unwrap();
        let out = model
            .graph
            .weights
            .iter()
            .zip(model.weights())
            .map(|(w, b)| (w.name.clone(), w.format, b.to_vec()))
            .collect();
        Ok((out, cx.notes()))
    }

    /// What requantizing weight `i` of the source to `to` must give.
    fn expected(i: usize, to: QuantFormat) -> Vec<u8> {
        let g = parse_graph(GRAPH).unwrap();
        let w = &model_weights(&g)[i];
        let (rows, cols) = (g.weights[i].shape[0] as usize, g.weights[i].shape[1] as usize);
        let values = dequantize(g.weights[i].format, w, rows, cols);
        values.chunks(cols).flat_map(|r| quantize_row(to, r)).collect()
    }

    #[test]
    fn every_matrix_gets_the_format_and_norms_stay() {
        for to in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let (out, notes) = requantize(to.name(), "").unwrap();
            let source = model_weights(&parse_graph(GRAPH).unwrap());
            for (i, (name, format, bytes)) in out.iter().enumerate() {
                if name.contains("norm") {
                    assert_eq!((*format, bytes), (QuantFormat::F32, &source[i]), "{name} stays");
                } else if name == "token_embd.weight" && to == QuantFormat::Q8_0 {
                    assert_eq!(bytes, &source[i], "already q8_0: not touched");
                } else {
                    assert_eq!(*format, to, "{name}");
                    assert!(*bytes == expected(i, to), "{name}: not quantize_row of the dequantized source");
                }
            }
            assert!(notes.iter().any(|n| n.contains("warning: requantizing already quantized weights")), "{notes:?}");
            assert_eq!(notes.iter().filter(|n| n.contains("warning")).count(), 1, "one warning: {notes:?}");
        }
    }

    #[test]
    fn patterns_override_the_default() {
        let (out, _) = requantize("q4_0", "token_embd=q8_0,blk.*.ffn_down.weight=q8_0").unwrap();
        let fmt = |n: &str| out.iter().find(|w| w.0 == n).unwrap().1;
        assert_eq!(fmt("token_embd.weight"), QuantFormat::Q8_0);
        assert_eq!(fmt("blk.0.ffn_down.weight"), QuantFormat::Q8_0);
        assert_eq!(fmt("blk.0.attn_v.weight"), QuantFormat::Q4_0);
        assert_eq!(out[3].2, expected(3, QuantFormat::Q8_0));
        // Without --quant only the named tensors change.
        let (out, _) = requantize("", "attn_v=q8_0").unwrap();
        assert_eq!(out.iter().map(|w| w.1).collect::<Vec<_>>(), {
            use QuantFormat::*;
            vec![Q8_0, F32, Q8_0, F16, F32]
        });
    }

    #[test]
    fn bad_options_are_clear_errors() {
        let e = requantize("q9_9", "").unwrap_err().to_string();
        assert!(e.contains("unknown format \"q9_9\"") && e.contains("q8_0") && e.contains("q4_k_m"), "{e}");
        let e = requantize("iq2_xxs", "").unwrap_err().to_string();
        assert!(e.contains("iq2_xxs is a llama.cpp (ggml) format that kiln cannot produce yet"), "{e}");
        let e = requantize("", "nothing_like_it=q8_0").unwrap_err().to_string();
        assert!(e.contains("pattern \"nothing_like_it\" matches no matrix"), "{e}");
        let e = requantize("", "attn_v=q7").unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_v.weight: unknown format \"q7\""), "{e}");
        for (text, needle) in
            [("attn_v", "expected PATTERN=FORMAT"), ("=q8_0", "empty"), ("a[0]=q8_0", "not supported")]
        {
            let e = TensorRule::parse_list(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn globs_and_substrings() {
        let r = |p: &str| TensorRule { pattern: p.into(), format: "q8_0".into() };
        assert!(r("blk.*.attn_v.weight").matches("blk.12.attn_v.weight"));
        assert!(!r("blk.*.attn_v.weight").matches("blk.12.attn_v.weight.x"));
        assert!(r("blk.?.ffn*").matches("blk.3.ffn_down.weight"));
        assert!(!r("blk.?.ffn*").matches("blk.13.ffn_down.weight"));
        assert!(r("ffn_down").matches("blk.13.ffn_down.weight"));
        assert!(!r("ffn_down").matches("blk.13.ffn_up.weight"));
    }

    #[test]
    fn mixtures_follow_llama_cpp() {
        let m = Mixture::by_name("q4_k_m").unwrap();
        // use_more_bits for 30 layers: i < 3, i >= 26, or (i - 3) % 3 == 2.
        let more: Vec<u32> = (0..30).filter(|&i| m.format_for(Role::AttnV, Some(i), 30, 3) == "q6_k").collect();
        assert_eq!(more, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert_eq!(m.format_for(Role::FfnDown, Some(5), 30, 3), "q6_k");
        assert_eq!(m.format_for(Role::FfnDown, Some(6), 30, 3), "q4_k");
        assert_eq!(m.format_for(Role::AttnQ, Some(0), 30, 3), "q4_k");
        assert_eq!(m.format_for(Role::Output, None, 30, 3), "q6_k");
        assert_eq!(m.format_for(Role::TokenEmbd, None, 30, 3), "q4_k");
        let q2 = Mixture::by_name("q2_k").unwrap();
        assert_eq!(q2.format_for(Role::AttnV, Some(3), 30, 3), "q3_k");
        assert_eq!(q2.format_for(Role::AttnV, Some(3), 30, 4), "q4_k");
        let q3m = Mixture::by_name("q3_k_m").unwrap();
        assert_eq!(q3m.format_for(Role::AttnV, Some(1), 30, 3), "q5_k");
        assert_eq!(q3m.format_for(Role::AttnV, Some(2), 30, 3), "q4_k");
        assert_eq!(q3m.format_for(Role::FfnDown, Some(0), 30, 3), "q5_k");
        assert_eq!(q3m.format_for(Role::FfnDown, Some(1), 30, 3), "q4_k");
        let q4s = Mixture::by_name("q4_k_s").unwrap();
        assert_eq!(q4s.format_for(Role::AttnV, Some(3), 30, 3), "q5_k");
        assert_eq!(q4s.format_for(Role::AttnV, Some(4), 30, 3), "q4_k");
        assert_eq!(q4s.format_for(Role::FfnDown, Some(2), 30, 3), "q5_k");
        assert_eq!(q4s.format_for(Role::FfnDown, Some(3), 30, 3), "q4_k");
        assert_eq!(Role::of("token_embd.weight", true), Role::Output);
        assert_eq!(Role::of("blk.2.ffn_down.weight", false), Role::FfnDown);
        assert_eq!(file_type_of("q4_k_m"), Some(15));
        assert_eq!(file_type_of("q8_0"), Some(7));
    }

    #[test]
    fn fallback_rule() {
        assert_eq!(fallback(QuantFormat::Q8_0, 64), None);
        assert_eq!(fallback(QuantFormat::Q8_0, 48), Some("f16"));
    }
}
