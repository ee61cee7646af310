//! The deployment report: what a compiled model costs on a device, predicted from the bundle's
//! manifest and the device's profile (`targets::devices`), and checked against a budget.
//!
//! The model is a roofline. A decoded token reads every weight byte once plus the KV cache up
//! to its position, and does two operations per multiply-add of the matmuls and of attention;
//! decode runs at the slower of the device's read bandwidth (times the fraction of it kiln
//! reaches) and its matmul throughput. A prefill batch reads the weights once for the whole
//! batch and is bound by the matmul throughput. Energy is modeled the same way: bytes read from
//! DRAM times the profile's energy per byte, plus operations times its energy per operation;
//! it is labelled modeled wherever it is shown.

use std::fmt;

use serde_json::Value;
use targets::devices::DeviceCosts;

/// What one compiled model reads, computes and holds, from its manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Footprint {
    pub context: u64,
    pub batch: u64,
    pub layers: u64,
    /// Parameters of the model (embedding, matmuls, norms; a tied head counted once).
    pub parameters: u64,
    /// Multiply-adds of the matmuls per token (the LM head included).
    pub matmul_macs: u64,
    /// Multiply-adds of attention per token per cached position (scores and weighted values).
    pub attention_macs_per_position: u64,
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    pub arena_bytes: u64,
}

impl Footprint {
    /// Reads the figures of a bundle's `manifest.json`.
    pub fn from_manifest(manifest: &Value) -> Result<Self, String> {
        let hp = &manifest["model"]["hyperparameters"];
        let get = |v: &Value, path: &str| -> Result<u64, String> {
            v.pointer(path).and_then(Value::as_u64).ok_or_else(|| format!("manifest.json has no {path}"))
        };
        let (layers, d, ff) = (get(hp, "/n_layers")?, get(hp, "/d_model")?, get(hp, "/d_ff")?);
        let (heads, kv_heads, hd, vocab) =
            (get(hp, "/n_heads")?, get(hp, "/n_kv_heads")?, get(hp, "/head_dim")?, get(hp, "/vocab")?);
        let tied = hp["tied_embedding"].as_bool().unwrap_or(false);
        let per_layer = d * heads * hd * 2 + d * kv_heads * hd * 2 + 3 * d * ff;
        let matmul_macs = layers * per_layer + vocab * d;
        let norms = layers * 2 * d + d;
        let embedding = if tied { 0 } else { vocab * d };
        Ok(Footprint {
            context: get(manifest, "/model/context")?,
            batch: get(manifest, "/compile_options/batch")?.max(1),
            layers,
            parameters: matmul_macs + embedding + norms,
            matmul_macs,
            attention_macs_per_position: layers * heads * hd * 2,
            weights_bytes: get(manifest, "/memory/weights_bytes")?,
            kv_bytes: get(manifest, "/memory/kv_bytes")?,
            arena_bytes: get(manifest, "/memory/arena_bytes")?,
        })
    }

    /// Stored weight bits per parameter.
    pub fn bits_per_weight(&self) -> f64 {
        self.weights_bytes as f64 * 8.0 / self.parameters.max(1) as f64
    }

    /// KV cache bytes per cached position (all layers, keys and values).
    pub fn kv_bytes_per_position(&self) -> f64 {
        self.kv_bytes as f64 / self.context.max(1) as f64
    }

    /// Bytes read to decode one token with `position` tokens cached.
    pub fn decode_bytes(&self, position: f64) -> f64 {
        self.weights_bytes as f64 + self.kv_bytes_per_position() * position
    }

    /// Operations (multiply and add counted apart) of one token with `position` tokens cached.
    pub fn ops_per_token(&self, position: f64) -> f64 {
        2.0 * (self.matmul_macs as f64 + self.attention_macs_per_position as f64 * position)
    }

    /// Memory the model holds at its full context: weights, KV cache and activation arena.
    pub fn memory_bytes(&self) -> u64 {
        self.weights_bytes + self.kv_bytes + self.arena_bytes
    }
}

/// A query: prompt tokens in, tokens generated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Query {
    pub prompt_tokens: f64,
    pub generated_tokens: f64,
}

impl Query {
    /// The study's query when no question set was run: a short question, 256 tokens generated.
    pub const NOMINAL: Query = Query { prompt_tokens: 48.0, generated_tokens: 256.0 };
}

/// The device figures a prediction uses: a profile, with its bandwidth measured when it is the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Device {
    pub costs: &'static DeviceCosts,
    /// `host`: the profile's figures, with this bandwidth measured on the machine.
    pub measured_gbps: Option<f64>,
    pub threads: u32,
}

impl Device {
    pub fn profile(costs: &'static DeviceCosts) -> Self {
        Device { costs, measured_gbps: None, threads: costs.threads }
    }

    pub fn name(&self) -> String {
        match self.measured_gbps {
            Some(_) => format!("host ({} threads; other figures of {})", self.threads, self.costs.name),
            None => self.costs.name.to_string(),
        }
    }

    pub fn memory_gbps(&self) -> f64 {
        self.measured_gbps.unwrap_or(self.costs.memory_gbps)
    }
}

/// What a model is predicted to do on a device.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Prefill of a 512-token prompt (or the context, when smaller), tokens/s.
    pub prefill_tok_s: f64,
    /// Decode at the middle of a query's generated tokens, tokens/s.
    pub decode_tok_s: f64,
    /// Bytes read and operations of a decoded token at that position.
    pub decode_bytes: f64,
    pub decode_ops: f64,
    pub query: Query,
    /// Modeled energy of one query, joules: prefill and decode.
    pub prefill_joules: f64,
    pub decode_joules: f64,
}

impl Prediction {
    pub fn query_joules(&self) -> f64 {
        self.prefill_joules + self.decode_joules
    }
}

/// Decode tokens/s with `position` tokens cached: the slower of bandwidth and compute.
fn decode_rate(f: &Footprint, d: &Device, position: f64) -> f64 {
    let by_bandwidth = d.memory_gbps() * 1e9 * d.costs.decode_efficiency / f.decode_bytes(position);
    let by_compute = d.costs.matmul_gops * 1e9 / f.ops_per_token(position);
    by_bandwidth.min(by_compute)
}

/// Prefill tokens/s for a prompt of `n` tokens: the slower of the matmul throughput and the
/// weights read once per batch.
fn prefill_rate(f: &Footprint, d: &Device, n: f64) -> f64 {
    let compute = n * f.ops_per_token(n / 2.0) / (d.costs.matmul_gops * 1e9);
    let batches = (n / f.batch as f64).ceil();
    let reads = batches * f.weights_bytes as f64 / (d.memory_gbps() * 1e9 * d.costs.decode_efficiency);
    n / compute.max(reads)
}

/// Predicts speed and energy of `f` on `d` for `query`.
pub fn predict(f: &Footprint, d: &Device, query: Query) -> Prediction {
    let c = d.costs;
    let middle = query.prompt_tokens + query.generated_tokens / 2.0;
    let n = query.prompt_tokens;
    let prefill_bytes = (n / f.batch as f64).ceil() * f.weights_bytes as f64 + f.kv_bytes_per_position() * n;
    let prefill_ops = n * f.ops_per_token(n / 2.0);
    let decode_bytes = f.decode_bytes(middle);
    let decode_ops = f.ops_per_token(middle);
    let pj = |bytes: f64, ops: f64| (bytes * c.dram_pj_per_byte + ops * c.pj_per_op) * 1e-12;
    Prediction {
        prefill_tok_s: prefill_rate(f, d, 512f64.min(f.context as f64)),
        decode_tok_s: decode_rate(f, d, middle),
        decode_bytes,
        decode_ops,
        query,
        prefill_joules: pj(prefill_bytes, prefill_ops),
        decode_joules: query.generated_tokens * pj(decode_bytes, decode_ops),
    }
}

/// Limits a build must meet (`--budget memory=512MiB,decode=20tok/s,prefill=100tok/s,energy=5J`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Budget {
    pub memory_bytes: Option<u64>,
    pub decode_tok_s: Option<f64>,
    pub prefill_tok_s: Option<f64>,
    pub energy_joules: Option<f64>,
}

/// A budget the command line got wrong.
#[derive(Debug, PartialEq)]
pub struct BudgetError(pub String);

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--budget: {}", self.0)
    }
}

impl std::error::Error for BudgetError {}

/// `value` with one of `units` (suffix, factor) as a positive finite number.
fn with_unit(key: &str, value: &str, units: &[(&str, f64)]) -> Result<f64, BudgetError> {
    let v = value.trim();
    // The longest matching suffix first ("MiB" before "B").
    let mut sorted: Vec<&(&str, f64)> = units.iter().collect();
    sorted.sort_by_key(|(u, _)| std::cmp::Reverse(u.len()));
    let (number, factor) =
        sorted.iter().find_map(|(u, f)| v.strip_suffix(u).map(|n| (n.trim(), *f))).ok_or_else(|| {
            let names: Vec<&str> = units.iter().map(|(u, _)| *u).filter(|u| !u.is_empty()).collect();
            BudgetError(format!("{key}={value}: give a number with a unit ({})", names.join(", ")))
        })?;
    let x: f64 = number.parse().map_err(|_| BudgetError(format!("{key}={value}: '{number}' is not a number")))?;
    if !(x.is_finite() && x > 0.0) {
        return Err(BudgetError(format!("{key}={value}: must be a positive number")));
    }
    Ok(x * factor)
}

impl std::str::FromStr for Budget {
    type Err = BudgetError;

    fn from_str(s: &str) -> Result<Self, BudgetError> {
        let mut b = Budget::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| BudgetError(format!("'{item}' is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let rate = [("tok/s", 1.0), ("", 1.0)];
            let bytes = [
                ("B", 1.0),
                ("KiB", 1024.0),
                ("MiB", 1048576.0),
                ("GiB", 1073741824.0),
                ("KB", 1e3),
                ("MB", 1e6),
                ("GB", 1e9),
            ];
            let twice = || BudgetError(format!("{key} is given twice"));
            match key {
                "memory" => {
                    let v = with_unit(key, value, &bytes)?;
                    if b.memory_bytes.replace(v.round() as u64).is_some() {
                        return Err(twice());
                    }
                }
                "decode" => {
                    if b.decode_tok_s.replace(with_unit(key, value, &rate)?).is_some() {
                        return Err(twice());
                    }
                }
                "prefill" => {
                    if b.prefill_tok_s.replace(with_unit(key, value, &rate)?).is_some() {
                        return Err(twice());
                    }
                }
                "energy" => {
                    let v = with_unit(key, value, &[("J", 1.0), ("mJ", 1e-3), ("kJ", 1e3)])?;
                    if b.energy_joules.replace(v).is_some() {
                        return Err(twice());
                    }
                }
                other => {
                    return Err(BudgetError(format!(
                        "unknown limit '{other}' (known: memory, decode, prefill, energy)"
                    )))
                }
            }
        }
        if b == Budget::default() {
            return Err(BudgetError("no limit given (e.g. memory=512MiB,decode=20tok/s,energy=5J)".into()));
        }
        Ok(b)
    }
}

/// One limit a prediction missed.
#[derive(Clone, Debug, PartialEq)]
pub struct Miss {
    pub what: &'static str,
    pub predicted: String,
    pub limit: String,
    /// How far off, as a share of the limit.
    pub by: f64,
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} predicted, the budget is {} ({:.0} % off)",
            self.what,
            self.predicted,
            self.limit,
            100.0 * self.by
        )
    }
}

/// Every limit of `b` that `f` and `p` miss.
pub fn check(b: &Budget, f: &Footprint, p: &Prediction) -> Vec<Miss> {
    let mib = |x: f64| format!("{:.1} MiB", x / 1048576.0);
    let mut misses = vec![];
    if let Some(limit) = b.memory_bytes {
        let m = f.memory_bytes();
        if m > limit {
            misses.push(Miss {
                what: "memory",
                predicted: mib(m as f64),
                limit: mib(limit as f64),
                by: m as f64 / limit as f64 - 1.0,
            });
        }
    }
    for (what, got, limit) in
        [("decode", p.decode_tok_s, b.decode_tok_s), ("prefill", p.prefill_tok_s, b.prefill_tok_s)]
    {
        if let Some(limit) = limit {
            if got < limit {
                misses.push(Miss {
                    what,
                    predicted: format!("{got:.1} tok/s"),
                    limit: format!("{limit} tok/s"),
                    by: 1.0 - got / limit,
                });
            }
        }
    }
    if let Some(limit) = b.energy_joules {
        let e = p.query_joules();
        if e > limit {
            misses.push(Miss {
                what: "energy per query",
                predicted: format!("{e:.2} J"),
                limit: format!("{limit} J"),
                by: e / limit - 1.0,
            });
        }
    }
    misses
}

/// The deployment report as text.
pub fn report(f: &Footprint, d: &Device, p: &Prediction) -> String {
    let mib = |x: f64| x / 1048576.0;
    let mut s = format!("deployment report for {}: {}\n", d.name(), d.costs.description);
    s += &format!(
        "  parameters {:.1} M, {:.2} bits per weight ({:.1} MiB of weights), {} layers\n",
        f.parameters as f64 / 1e6,
        f.bits_per_weight(),
        mib(f.weights_bytes as f64),
        f.layers
    );
    s += &format!(
        "  per decoded token (at position {:.0}): {:.1} MB read, {:.2} GOP\n",
        p.query.prompt_tokens + p.query.generated_tokens / 2.0,
        p.decode_bytes / 1e6,
        p.decode_ops / 1e9
    );
    s += &format!(
        "  predicted on {} threads at {:.1} GB/s: prefill {:.0} tok/s (512-token prompt), decode {:.1} tok/s\n",
        d.threads,
        d.memory_gbps(),
        p.prefill_tok_s,
        p.decode_tok_s
    );
    s += &format!(
        "  memory at context {}: {:.1} MiB (weights {:.1}, KV cache {:.1}, arena {:.1})\n",
        f.context,
        mib(f.memory_bytes() as f64),
        mib(f.weights_bytes as f64),
        mib(f.kv_bytes as f64),
        mib(f.arena_bytes as f64)
    );
    s += &format!(
        "  energy per query (modeled; {:.0} prompt + {:.0} generated tokens): {:.2} J ({:.2} prefill, {:.2} decode)\n",
        p.query.prompt_tokens,
        p.query.generated_tokens,
        p.query_joules(),
        p.prefill_joules,
        p.decode_joules
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footprint() -> Footprint {
        Footprint {
            context: 1000,
            batch: 100,
            layers: 2,
            parameters: 1_000_000,
            matmul_macs: 1_000_000,
            attention_macs_per_position: 1000,
            weights_bytes: 1_000_000,
            kv_bytes: 1_000_000,
            arena_bytes: 48_576,
        }
    }

    const COSTS: DeviceCosts = DeviceCosts {
        name: "test",
        description: "test device",
        triples: &[],
        threads: 1,
        memory_gbps: 1.0,
        decode_efficiency: 0.5,
        matmul_gops: 100.0,
        dram_pj_per_byte: 10.0,
        pj_per_op: 1.0,
        sources: "made up",
    };

    #[test]
    fn predictions_follow_the_roofline_by_hand() {
        let f = footprint();
        let d = Device::profile(&COSTS);
        let q = Query { prompt_tokens: 100.0, generated_tokens: 200.0 };
        let p = predict(&f, &d, q);
        // At position 200: 1e6 + 1000 * 200 bytes read, at 0.5 GB/s.
        assert_eq!(p.decode_bytes, 1.2e6);
        assert!((p.decode_tok_s - 0.5e9 / 1.2e6).abs() < 1e-9);
        assert_eq!(p.decode_ops, 2.0 * (1e6 + 1000.0 * 200.0));
        // Energy: prefill reads the weights once (one batch) and the KV of 100 positions.
        let prefill = (1e6 + 1000.0 * 100.0) * 10.0 + 100.0 * 2.0 * (1e6 + 1000.0 * 50.0);
        assert!((p.prefill_joules - prefill * 1e-12).abs() < 1e-15);
        assert!((p.decode_joules - 200.0 * (1.2e6 * 10.0 + 2.4e6) * 1e-12).abs() < 1e-15);
        // Prefill of 512 tokens: compute 512 * 2 * (1e6 + 1000 * 256) ops at 100 GOP/s against
        // 6 batches of weights at 0.5 GB/s (0.012 s): compute (0.0129 s) bounds it.
        let compute = 512.0 * 2.0 * (1e6 + 1000.0 * 256.0) / 100e9;
        assert!(compute > 6.0 * 1e6 / 0.5e9);
        assert!((p.prefill_tok_s - 512.0 / compute).abs() < 1e-6);
        // With a slower memory the reads bound it.
        static SLOW: DeviceCosts = DeviceCosts { memory_gbps: 0.1, ..COSTS };
        let p = predict(&f, &Device::profile(&SLOW), q);
        assert!((p.prefill_tok_s - 512.0 / (6.0 * 1e6 / 0.05e9)).abs() < 1e-6);
    }

    #[test]
    fn budgets_parse_and_misses_say_by_how_much() {
        let b: Budget = "memory=1MiB, decode=1000tok/s,energy=1mJ".parse().unwrap();
        assert_eq!(b.memory_bytes, Some(1 << 20));
        assert_eq!(b.decode_tok_s, Some(1000.0));
        assert_eq!(b.energy_joules, Some(0.001));
        let f = footprint();
        let p = predict(&f, &Device::profile(&COSTS), Query::NOMINAL);
        let misses = check(&b, &f, &p);
        let whats: Vec<&str> = misses.iter().map(|m| m.what).collect();
        assert_eq!(whats, ["memory", "decode", "energy per query"], "{misses:?}");
        assert!((misses[0].by - (2_048_576.0 / 1_048_576.0 - 1.0)).abs() < 1e-12);
        assert!(misses[1].to_string().contains("the budget is 1000 tok/s"), "{}", misses[1]);
        assert!(check(&"memory=1GiB,decode=1tok/s".parse().unwrap(), &f, &p).is_empty());
        for (bad, says) in [
            ("memory=lots", "give a number with a unit"),
            ("memory=-5MiB", "positive"),
            ("memory=5 parsecs", "with a unit"),
            ("memory=5xMiB", "not a number"),
            ("speed=5", "unknown limit 'speed'"),
            ("decode=0tok/s", "positive"),
            ("decode=5,decode=6", "given twice"),
            ("", "no limit given"),
            ("memory", "not key=value"),
        ] {
            let e = bad.parse::<Budget>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_manifest_gives_smollm2s_parameter_count() {
        let manifest = serde_json::json!({
            "model": {"context": 2048, "hyperparameters": {
                "n_layers": 30, "d_model": 576, "d_ff": 1536, "n_heads": 9, "n_kv_heads": 3,
                "head_dim": 64, "vocab": 49152, "tied_embedding": true}},
            "compile_options": {"batch": 512},
            "memory": {"weights_bytes": 1, "kv_bytes": 2048, "arena_bytes": 3},
        });
        let f = Footprint::from_manifest(&manifest).unwrap();
        // SmolLM2-135M: 134,515,008 parameters (Hugging Face's count).
        assert_eq!(f.parameters, 134_515_008);
        assert_eq!(f.kv_bytes_per_position(), 1.0);
        let e = Footprint::from_manifest(&serde_json::json!({})).unwrap_err();
        assert!(e.contains("n_layers"), "{e}");
    }
}
