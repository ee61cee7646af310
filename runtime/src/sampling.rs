//! Token sampling: turns the logits of one decoding step into a token id.
//!
//! The pipeline, in order:
//!
//! 1. **Repetition penalty** (llama.cpp semantics): every *distinct* token among the last
//!    `repeat_last_n` tokens of the history has its logit divided by `repeat_penalty` if it is
//!    positive and multiplied by it if it is negative.
//! 2. If `temperature == 0`: **greedy** argmax (ties go to the lowest id). Otherwise:
//! 3. **top-k**: keep the `top_k` highest logits (`0` = keep all).
//! 4. **softmax with temperature**: `p_i ∝ exp(l_i / temperature)`.
//! 5. **top-p** (nucleus): keep the smallest prefix of the candidates, sorted by probability,
//!    whose cumulative probability reaches `top_p` (at least one token; `1.0` = off).
//! 6. **min-p**: drop candidates whose probability is below `min_p` times the largest one
//!    (`0.0` = off).
//! 7. **draw** from the renormalised distribution with a built-in, seeded xoshiro256**
//!    generator, so a given seed always gives the same sequence of tokens.
//!
//! Candidates are ordered by logit (descending), ties by id (ascending), so the whole process
//! is deterministic. NaN logits are treated as `-inf` (never chosen unless every logit is NaN
//! or `-inf`, in which case the lowest id wins).
//!
//! Unlike llama.cpp (which applies temperature after top-p), the temperature is applied before
//! top-p, as Hugging Face transformers does.

use std::fmt;

/// Sampling parameters. See the module documentation for the order in which they apply.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `0.0` means greedy (argmax) decoding. Must be finite and `>= 0`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables the filter.
    pub top_k: usize,
    /// Nucleus sampling threshold in `(0, 1]`; `1.0` disables the filter.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in `[0, 1]`; `0.0` disables it.
    pub min_p: f32,
    /// Repetition penalty, `> 0`; `1.0` disables it.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp-like defaults: temperature 0.8, top-k 40, top-p 0.95, no min-p, no
    /// repetition penalty (window 64), seed `0xC0FFEE`.
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0xC0FFEE,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding: temperature 0, every filter off, no repetition penalty.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..SamplerConfig::default()
        }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let bad = |field: &'static str, value: f32, expected: &'static str| {
            Err(SamplerError::InvalidParameter { field, value: value.to_string(), expected })
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", self.temperature, "a finite value >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "a value in (0, 1]");
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad("min_p", self.min_p, "a value in [0, 1]");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty", self.repeat_penalty, "a finite value > 0");
        }
        Ok(())
    }
}

/// An invalid [`SamplerConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SamplerError {
    /// A parameter is out of its range.
    InvalidParameter {
        /// Name of the field.
        field: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
}

impl fmt::Display for SamplerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SamplerError::InvalidParameter { field, value, expected } => {
                write!(f, "invalid sampler {field} = {value}: expected {expected}")
            }
        }
    }
}

impl std::error::Error for SamplerError {}

/// A stateful sampler: configuration, random generator and scratch buffers.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Xoshiro256StarStar,
    logits: Vec<f32>,
    candidates: Vec<(f32, u32)>,
    probs: Vec<f64>,
    recent: Vec<u32>,
}

impl Sampler {
    /// Creates a sampler after validating `cfg`.
    pub fn new(cfg: SamplerConfig) -> Result<Self, SamplerError> {
        cfg.validate()?;
        let rng = Xoshiro256StarStar::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng, logits: Vec::new(), candidates: Vec::new(), probs: Vec::new(), recent: Vec::new() })
    }

    /// The configuration this sampler was built with.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Restarts the random sequence from `seed` (the configuration's seed is updated too).
    pub fn reseed(&mut self, seed: u64) {
        self.cfg.seed = seed;
        self.rng = Xoshiro256StarStar::seed_from_u64(seed);
    }

    /// Picks the next token from `logits` (one value per vocabulary id). `history` holds the
    /// tokens seen so far (prompt and generated); only its last `repeat_last_n` entries matter,
    /// and ids outside the vocabulary are ignored.
    ///
    /// # Panics
    /// If `logits` is empty or has more than `u32::MAX` entries.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "Sampler::sample: empty logits");
        assert!(logits.len() <= u32::MAX as usize, "Sampler::sample: vocabulary too large");

        let logits = penalized(&self.cfg, &mut self.logits, &mut self.recent, logits, history);

        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }

        // Candidates sorted by logit descending, ties by id ascending, NaN as -inf.
        let key = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(logits.iter().enumerate().map(|(i, &l)| (key(l), i as u32)));
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = self.cfg.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, order);
            cands.truncate(k);
        }
        cands.sort_unstable_by(order);

        let max = cands[0].0;
        if max == f32::NEG_INFINITY {
            // Nothing has any probability: fall back to the lowest id among the candidates.
            return cands.iter().map(|c| c.1).min().unwrap_or(0);
        }

        // Softmax with temperature (unnormalised: the best candidate has weight 1).
        let inv_t = 1.0 / f64::from(self.cfg.temperature);
        let probs = &mut self.probs;
        probs.clear();
        probs.extend(cands.iter().map(|&(l, _)| ((f64::from(l) - f64::from(max)) * inv_t).exp()));
        // An infinite logit makes the difference NaN for itself; treat it as certain.
        for p in probs.iter_mut() {
            if p.is_nan() {
                *p = 1.0;
            }
        }
        let total: f64 = probs.iter().sum();

        // top-p: smallest prefix whose cumulative probability reaches top_p.
        let mut keep = probs.len();
        if self.cfg.top_p < 1.0 {
            let target = f64::from(self.cfg.top_p) * total;
            let mut cum = 0.0;
            for (i, &p) in probs.iter().enumerate() {
                cum += p;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
        }

        // min-p: relative to the best candidate, whose weight is 1.
        if self.cfg.min_p > 0.0 {
            let threshold = f64::from(self.cfg.min_p) * probs[0];
            keep = probs[..keep].iter().position(|&p| p < threshold).unwrap_or(keep).max(1);
        }

        let kept = &probs[..keep];
        let sum: f64 = kept.iter().sum();
        let mut u = self.rng.next_f64() * sum;
        for (i, &p) in kept.iter().enumerate() {
            if u < p {
                return cands[i].1;
            }
            u -= p;
        }
        // Rounding left u >= the last weight: take the last candidate with nonzero weight.
        let last = kept.iter().rposition(|&p| p > 0.0).unwrap_or(0);
        cands[last].1
    }
}

/// Returns the logits with the repetition penalty applied (in `scratch` if it applies).
fn penalized<'a>(
    cfg: &SamplerConfig,
    scratch: &'a mut Vec<f32>,
    recent: &mut Vec<u32>,
    logits: &'a [f32],
    history: &[u32],
) -> &'a [f32] {
    let penalty = cfg.repeat_penalty;
    let n = cfg.repeat_last_n.min(history.len());
    if penalty == 1.0 || n == 0 {
        return logits;
    }
    recent.clear();
    recent.extend_from_slice(&history[history.len() - n..]);
    recent.sort_unstable();
    recent.dedup();

    scratch.clear();
    scratch.extend_from_slice(logits);
    for &t in recent.iter() {
        if let Some(l) = scratch.get_mut(t as usize) {
            if *l > 0.0 {
                *l /= penalty;
            } else {
                *l *= penalty;
            }
        }
    }
    scratch
}

/// Index of the largest logit; ties go to the lowest id and NaN never wins (all NaN → 0).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if !found || l > best_val {
            best = i;
            best_val = l;
            found = true;
        }
    }
    best as u32
}

/// xoshiro256** 1.0 (Blackman & Vigna), seeded through SplitMix64.
#[derive(Clone, Debug)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    fn seed_from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        // SplitMix64 output is never all-zero over four consecutive values.
        Xoshiro256StarStar { s: [next(), next(), next(), next()] }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(cfg: SamplerConfig) -> Sampler {
        Sampler::new(cfg).expect("valid config")
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = logits.iter().map(|&l| ((f64::from(l) - f64::from(max)) / f64::from(t)).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    }

    fn pseudo_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256StarStar::seed_from_u64(seed);
        (0..n).map(|_| (rng.next_f64() * 20.0 - 10.0) as f32).collect()
    }

    #[test]
    fn xoshiro_reference_vector() {
        // Reference output of xoshiro256** for state [1, 2, 3, 4].
        let mut r = Xoshiro256StarStar { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, vec![11520, 0, 1509978240, 1215971899390074240]);
        let mut r = Xoshiro256StarStar::seed_from_u64(7);
        for _ in 0..1000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn types_are_send_and_sync() {
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<Sampler>();
        is_send_sync::<SamplerError>();
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = sampler(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]), 1);
        assert_eq!(s.sample(&[-5.0, -1.0, -3.0], &[]), 1);
        // Ties go to the lowest id.
        assert_eq!(s.sample(&[1.0, 7.0, 7.0, 7.0], &[]), 1);
        // NaN never wins.
        assert_eq!(s.sample(&[f32::NAN, 0.5, 0.25], &[]), 1);
        let logits = pseudo_logits(1000, 3);
        let expected = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        assert_eq!(s.sample(&logits, &[]), expected);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let mut greedy = sampler(SamplerConfig::greedy());
        let mut k1 = sampler(SamplerConfig { top_k: 1, temperature: 1.5, ..SamplerConfig::default() });
        for seed in 0..50 {
            let logits = pseudo_logits(500, seed);
            assert_eq!(k1.sample(&logits, &[]), greedy.sample(&logits, &[]));
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let logits = pseudo_logits(64, 11);
        let cfg = SamplerConfig { temperature: 5.0, top_k: 0, top_p: 1.0, seed: 1234, ..SamplerConfig::default() };
        let run = |cfg: &SamplerConfig| {
            let mut s = sampler(cfg.clone());
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg));
        let b = run(&SamplerConfig { seed: 4321, ..cfg.clone() });
        assert_ne!(a, b, "different seeds should give different sequences");
        // Reseeding restarts the sequence.
        let mut s = sampler(cfg.clone());
        let first: Vec<u32> = (0..20).map(|_| s.sample(&logits, &[])).collect();
        s.reseed(1234);
        let again: Vec<u32> = (0..20).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(first, again);
    }

    /// Pearson chi-square statistic of `counts` against `probs`.
    fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0f32, 2.0, 0.5, 0.0, -1.0];
        for &t in &[1.0f32, 0.5, 2.0] {
            let mut s =
                sampler(SamplerConfig { temperature: t, top_k: 0, top_p: 1.0, seed: 99, ..SamplerConfig::default() });
            let n = 100_000;
            let mut counts = [0u64; 5];
            for _ in 0..n {
                counts[s.sample(&logits, &[]) as usize] += 1;
            }
            let probs = softmax(&logits, t);
            let chi2 = chi_square(&counts, &probs);
            // 4 degrees of freedom: P(chi2 > 25) < 1e-4.
            assert!(chi2 < 25.0, "t={t}: chi2={chi2}, counts={counts:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0];
        // top_k = 2: only ids 0 and 1, in softmax proportion.
        let mut s = sampler(SamplerConfig { temperature: 1.0, top_k: 2, top_p: 1.0, ..SamplerConfig::default() });
        let mut counts = [0u64; 5];
        for _ in 0..50_000 {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        assert_eq!(&counts[2..], &[0, 0, 0]);
        let p = softmax(&logits[..2], 1.0);
        assert!(chi_square(&counts[..2], &p) < 20.0, "{counts:?}");

        // Probabilities: [0.636, 0.234, 0.086, 0.032, 0.012].
        // top_p = 0.8 keeps {0, 1} (cumulative 0.87 >= 0.8).
        let mut s = sampler(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.8, ..SamplerConfig::default() });
        let mut counts = [0u64; 5];
        for _ in 0..50_000 {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        assert_eq!(&counts[2..], &[0, 0, 0]);
        assert!(counts[0] > 0 && counts[1] > 0);

        // A tiny top_p keeps exactly the best token.
        let mut s = sampler(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1e-6, ..SamplerConfig::default() });
        for _ in 0..1000 {
            assert_eq!(s.sample(&logits, &[]), 0);
        }

        // min_p = 0.3: threshold 0.3 * 0.636 keeps {0, 1} only.
        let mut s =
            sampler(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.3, ..SamplerConfig::default() });
        let mut counts = [0u64; 5];
        for _ in 0..20_000 {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        assert_eq!(&counts[2..], &[0, 0, 0]);
        assert!(counts[0] > 0 && counts[1] > 0);
    }

    #[test]
    fn repetition_penalty_changes_winner() {
        let logits = [2.0f32, 1.5, -1.0, -0.5];
        let mut plain = sampler(SamplerConfig::greedy());
        assert_eq!(plain.sample(&logits, &[0, 0, 0]), 0);

        let mut pen = sampler(SamplerConfig { repeat_penalty: 2.0, ..SamplerConfig::greedy() });
        // 2.0 / 2 = 1.0 < 1.5: id 1 wins. Repeats count once.
        assert_eq!(pen.sample(&logits, &[0, 0, 0]), 1);
        // Negative logits are multiplied: -0.6 * 2 = -1.2 falls below -1.0.
        let neg = [-0.6f32, -1.0];
        assert_eq!(pen.sample(&neg, &[]), 0);
        assert_eq!(pen.sample(&neg, &[0]), 1);
        // Only the last repeat_last_n tokens count; out-of-vocabulary ids are ignored.
        let mut windowed = sampler(SamplerConfig { repeat_penalty: 2.0, repeat_last_n: 2, ..SamplerConfig::greedy() });
        assert_eq!(windowed.sample(&logits, &[0, 3, 1000]), 0);
        assert_eq!(windowed.sample(&logits, &[3, 0, 1000]), 1);
        // The penalty also applies on the sampling path: with top_k = 1 the winner is 1.
        let mut k1 = sampler(SamplerConfig { repeat_penalty: 2.0, top_k: 1, ..SamplerConfig::default() });
        assert_eq!(k1.sample(&logits, &[0]), 1);
        // The caller's logits are not modified.
        assert_eq!(logits, [2.0f32, 1.5, -1.0, -0.5]);
    }

    #[test]
    fn degenerate_logits() {
        let mut s = sampler(SamplerConfig::default());
        assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[]), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0], &[]), 1);
        assert_eq!(s.sample(&[42.0], &[0, 0]), 0);
    }

    #[test]
    fn invalid_configs_rejected() {
        let bad = [
            SamplerConfig { temperature: -0.1, ..SamplerConfig::default() },
            SamplerConfig { temperature: f32::NAN, ..SamplerConfig::default() },
            SamplerConfig { temperature: f32::INFINITY, ..SamplerConfig::default() },
            SamplerConfig { top_p: 0.0, ..SamplerConfig::default() },
            SamplerConfig { top_p: 1.01, ..SamplerConfig::default() },
            SamplerConfig { top_p: f32::NAN, ..SamplerConfig::default() },
            SamplerConfig { min_p: -0.5, ..SamplerConfig::default() },
            SamplerConfig { min_p: 1.5, ..SamplerConfig::default() },
            SamplerConfig { repeat_penalty: 0.0, ..SamplerConfig::default() },
            SamplerConfig { repeat_penalty: f32::NAN, ..SamplerConfig::default() },
        ];
        for cfg in bad {
            let err = Sampler::new(cfg.clone()).expect_err(&format!("{cfg:?} accepted"));
            assert!(err.to_string().starts_with("invalid sampler"), "{err}");
        }
        assert!(Sampler::new(SamplerConfig::default()).is_ok());
        assert!(Sampler::new(SamplerConfig::greedy()).is_ok());
        let d = SamplerConfig::default();
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.repeat_penalty, d.repeat_last_n, d.seed),
            (0.8, 40, 0.95, 1.0, 64, 0xC0FFEE)
        );
    }
}
