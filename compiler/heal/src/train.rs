//! The training loop of `heal` and `finetune`: a loss on the student with LoRA (the KL
//! divergence to the teacher's next-token distribution, optionally plus matching the final
//! hidden state; or the cross-entropy of the examples' answer tokens), burn's autodiff for the
//! factors' gradients, clipping to a global norm of 1, and Adam with a warmup and cosine decay
//! to a tenth of the learning rate.
//!
//! Everything a step depends on is a function of the step number and what a checkpoint holds
//! (factors, Adam's moments, the step): examples are taken in a permutation per epoch drawn from
//! the seed and the epoch, so a run resumed from a checkpoint takes the same steps, bit for bit,
//! as one that was never stopped.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};

use super::llama::{matrix, scalar, values, Llama};
use super::lora::{f32_bytes, write_safetensors, Lora};
use super::Rng;

/// One training or evaluation sequence: `tokens`, and for each position `i < n - 1` whether
/// predicting `tokens[i + 1]` counts (cross-entropy; distillation counts every position).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

impl Example {
    pub fn text(tokens: Vec<u32>) -> Self {
        let mask = vec![true; tokens.len().saturating_sub(1)];
        Example { tokens, mask }
    }
}

pub enum Objective {
    /// KL(teacher || student) per position, plus `hidden_weight` times the mean squared
    /// difference of the final hidden states.
    Distill { teacher: Box<Llama>, hidden_weight: f32 },
    /// Cross-entropy of the masked next tokens.
    CrossEntropy,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hyper {
    pub steps: usize,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
}

/// Adam's state of one factor.
struct Moments {
    m: Tensor<2>,
    v: Tensor<2>,
}

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepStats {
    pub step: usize,
    /// The objective (KL or cross-entropy, nats per token) before the update.
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
}

/// Evaluation of the student on held-out sequences.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EvalStats {
    /// Mean KL(teacher || student) per position (distillation only).
    pub kl: Option<f64>,
    /// Student perplexity of the next tokens (those the mask counts).
    pub perplexity: f64,
    /// Teacher perplexity (distillation only).
    pub teacher_perplexity: Option<f64>,
    pub tokens: usize,
}

/// The teacher's view of one example, computed once.
struct TeacherOut {
    probs: Tensor<2>,
    log_probs: Tensor<2>,
    hidden: Tensor<2>,
}

pub struct Trainer<'a> {
    pub student: &'a Llama,
    pub objective: &'a Objective,
    pub lora: Lora,
    pub hyper: Hyper,
    pub step: usize,
    examples: Vec<Example>,
    moments: Vec<Moments>,
    cache: HashMap<usize, TeacherOut>,
    cache_budget: usize,
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
const CLIP: f32 = 1.0;

impl<'a> Trainer<'a> {
    pub fn new(
        student: &'a Llama,
        objective: &'a Objective,
        lora: Lora,
        hyper: Hyper,
        examples: Vec<Example>,
    ) -> Result<Self> {
        ensure!(!examples.is_empty(), "no training examples");
        ensure!(hyper.steps > 0, "--steps must be at least 1");
        ensure!(hyper.batch > 0, "--batch must be at least 1");
        ensure!(hyper.lr.is_finite() && hyper.lr > 0.0, "--lr {} must be a positive number", hyper.lr);
        let moments = lora
            .params()
            .iter()
            .map(|p| {
                let [r, c] = p.dims();
                let z = || matrix(vec![0.0; r * c], r, c, student.device());
                Moments { m: z(), v: z() }
            })
            .collect();
        // Teacher outputs are kept while they fit in 2 GiB (probabilities and log-probabilities
        // of every position), else recomputed each time.
        let per_token = 8 * student.shape.vocab + 4 * student.shape.d_model;
        let cache_budget = (2usize << 30) / per_token.max(1);
        Ok(Trainer { student, objective, lora, hyper, step: 0, examples, moments, cache: HashMap::new(), cache_budget })
    }

    pub fn n_examples(&self) -> usize {
        self.examples.len()
    }

    pub fn mean_example_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.tokens.len()).sum::<usize>() / self.examples.len()
    }

    /// The learning rate of step `s`: linear warmup over the first tenth, then cosine decay
    /// to a tenth.
    pub fn lr_at(&self, s: usize) -> f32 {
        let steps = self.hyper.steps as f32;
        let warmup = (steps / 10.0).max(1.0);
        let s = s as f32;
        let warm = ((s + 1.0) / warmup).min(1.0);
        let progress = ((s - warmup) / (steps - warmup).max(1.0)).clamp(0.0, 1.0);
        self.hyper.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()))
    }

    /// The example index of item `j` of step `s`'s batch.
    fn example_of(&self, s: usize, j: usize) -> usize {
        let n = self.examples.len();
        let g = s * self.hyper.batch + j;
        let (epoch, pos) = (g / n, g % n);
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(self.hyper.seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1));
        for i in (1..n).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        order[pos]
    }

    fn teacher(&mut self, teacher: &Llama, idx: usize, tokens: &[u32]) -> Result<TeacherOut> {
        if let Some(t) = self.cache.get(&idx) {
            return Ok(TeacherOut { probs: t.probs.clone(), log_probs: t.log_probs.clone(), hidden: t.hidden.clone() });
        }
        let f = teacher.forward(tokens, None)?;
        let log_probs = Llama::log_probs(f.logits);
        let out = TeacherOut { probs: log_probs.clone().exp(), log_probs, hidden: f.hidden };
        let cached: usize = self.cache.keys().map(|&i| self.examples[i].tokens.len()).sum();
        if cached + tokens.len() <= self.cache_budget {
            self.cache.insert(
                idx,
                TeacherOut { probs: out.probs.clone(), log_probs: out.log_probs.clone(), hidden: out.hidden.clone() },
            );
        }
        Ok(out)
    }

    /// The loss of example `idx` under `lora` (tracked or not), and what it counts.
    fn example_loss(&mut self, idx: usize, lora: &Lora) -> Result<(Tensor<1>, usize)> {
        let example = self.examples[idx].clone();
        let n = example.tokens.len();
        let f = self.student.forward(&example.tokens, Some(lora))?;
        let log_probs = Llama::log_probs(f.logits);
        match self.objective {
            Objective::Distill { teacher, hidden_weight } => {
                let t = self.teacher(teacher, idx, &example.tokens)?;
                let kl = t.probs.mul(t.log_probs.sub(log_probs)).sum().div_scalar(n as f32);
                let loss = if *hidden_weight > 0.0 {
                    let d = f.hidden.sub(t.hidden).square().mean();
                    kl.add(d.mul_scalar(*hidden_weight))
                } else {
                    kl
                };
                Ok((loss, n))
            }
            Objective::CrossEntropy => {
                let (lp, count) = masked_log_likelihood(self.student, log_probs, &example)?;
                Ok((lp.neg().div_scalar(count.max(1) as f32), count))
            }
        }
    }

    /// One optimizer step.
    pub fn step(&mut self) -> Result<StepStats> {
        let s = self.step;
        let params = self.lora.tracked();
        let mut lora = Lora::from_modules(self.lora.rank, self.lora.alpha, self.lora.targets.clone(), vec![]);
        std::mem::swap(&mut lora, &mut self.lora);
        lora.set_params(params.clone());
        let result = (|| -> Result<(f32, Vec<Tensor<2>>, usize)> {
            let mut total: Option<Tensor<1>> = None;
            let mut tokens = 0;
            for j in 0..self.hyper.batch {
                let idx = self.example_of(s, j);
                let (loss, n) = self.example_loss(idx, &lora)?;
                tokens += n;
                total = Some(match total {
                    None => loss,
                    Some(t) => t.add(loss),
                });
            }
            let loss = total.expect("batch >= 1").div_scalar(self.hyper.batch as f32);
            let value = scalar(&loss.clone().inner())?;
            if !value.is_finite() {
                bail!("the loss became {value} at step {s}; lower --lr");
            }
            let grads = loss.backward();
            let mut g: Vec<Tensor<2>> = Vec::with_capacity(params.len());
            for p in &params {
                let [r, c] = p.dims();
                g.push(p.grad(&grads).unwrap_or_else(|| matrix(vec![0.0; r * c], r, c, self.student.device())));
            }
            Ok((value, g, tokens))
        })();
        let (value, grads, tokens) = match result {
            Ok(r) => r,
            Err(e) => {
                std::mem::swap(&mut lora, &mut self.lora);
                return Err(e);
            }
        };
        let mut norm2 = 0f64;
        for g in &grads {
            norm2 += values(g)?.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
        let grad_norm = norm2.sqrt() as f32;
        let clip = if grad_norm > CLIP { CLIP / grad_norm } else { 1.0 };
        let lr = self.lr_at(s);
        let t = (s + 1) as i32;
        let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        let mut updated = Vec::with_capacity(params.len());
        for ((p, g), mo) in params.into_iter().zip(grads).zip(&mut self.moments) {
            let g = g.mul_scalar(clip);
            mo.m = mo.m.clone().mul_scalar(BETA1).add(g.clone().mul_scalar(1.0 - BETA1));
            mo.v = mo.v.clone().mul_scalar(BETA2).add(g.square().mul_scalar(1.0 - BETA2));
            let step =
                mo.m.clone().div_scalar(c1).div(mo.v.clone().div_scalar(c2).sqrt().add_scalar(EPS)).mul_scalar(lr);
            updated.push(p.inner().sub(step));
        }
        lora.set_params(updated);
        std::mem::swap(&mut lora, &mut self.lora);
        self.step += 1;
        Ok(StepStats { step: s, loss: value, lr, grad_norm, tokens })
    }

    /// The objective's value and gradients at the current factors, without a step (for the
    /// finite-difference test): `(loss, gradients in Lora::params order)`.
    pub fn loss_and_grads(&mut self, idx: usize) -> Result<(f32, Vec<Vec<f32>>)> {
        let params = self.lora.tracked();
        let mut lora = Lora::from_modules(self.lora.rank, self.lora.alpha, self.lora.targets.clone(), vec![]);
        std::mem::swap(&mut lora, &mut self.lora);
        lora.set_params(params.clone());
        let r = (|| -> Result<(f32, Vec<Result<Vec<f32>>>)> {
            let (loss, _) = self.example_loss(idx, &lora)?;
            let value = scalar(&loss.clone().inner())?;
            let grads = loss.backward();
            let g: Vec<Result<Vec<f32>>> =
                params.iter().map(|p| p.grad(&grads).map(|g| values(&g)).unwrap_or_else(|| Ok(vec![]))).collect();
            Ok((value, g))
        })();
        lora.set_params(params.into_iter().map(|p| p.inner()).collect());
        std::mem::swap(&mut lora, &mut self.lora);
        let (value, g) = r?;
        Ok((value, g.into_iter().collect::<Result<Vec<_>>>()?))
    }

    /// The objective at the current factors (no autodiff).
    pub fn loss_at(&mut self, idx: usize) -> Result<f32> {
        let lora = Lora::from_modules(
            self.lora.rank,
            self.lora.alpha,
            self.lora.targets.clone(),
            std::mem::take(&mut self.lora.modules),
        );
        let r = self.example_loss(idx, &lora).and_then(|(l, _)| scalar(&l));
        self.lora = lora;
        r
    }

    /// Evaluates the student (with the current factors, or without any when `with_lora` is
    /// false) on `examples`.
    pub fn evaluate(&self, examples: &[Example], with_lora: bool) -> Result<EvalStats> {
        let (mut kl, mut nll, mut t_nll, mut count, mut positions) = (0f64, 0f64, 0f64, 0usize, 0usize);
        for e in examples {
            let f = self.student.forward(&e.tokens, with_lora.then_some(&self.lora))?;
            let lp = Llama::log_probs(f.logits);
            if let Objective::Distill { teacher, .. } = self.objective {
                let t = Llama::log_probs(teacher.forward(&e.tokens, None)?.logits);
                kl += scalar(&t.clone().exp().mul(t.clone().sub(lp.clone())).sum())? as f64;
                let (tl, _) = masked_log_likelihood(self.student, t, e)?;
                t_nll -= scalar(&tl)? as f64;
            }
            positions += e.tokens.len();
            let (l, n) = masked_log_likelihood(self.student, lp, e)?;
            nll -= scalar(&l)? as f64;
            count += n;
        }
        let distill = matches!(self.objective, Objective::Distill { .. });
        Ok(EvalStats {
            kl: distill.then(|| kl / positions.max(1) as f64),
            perplexity: (nll / count.max(1) as f64).exp(),
            teacher_perplexity: distill.then(|| (t_nll / count.max(1) as f64).exp()),
            tokens: count,
        })
    }

    /// Writes the factors, Adam's moments and the step to `dir/state.safetensors` and
    /// `dir/state.json` (with `meta` in it).
    pub fn save(&self, dir: &Path, meta: &serde_json::Value) -> Result<()> {
        let mut tensors = vec![];
        for (i, (p, mo)) in self.lora.params().iter().zip(&self.moments).enumerate() {
            let dims = p.dims().to_vec();
            tensors.push((format!("{i}.value"), f32_bytes(&values(p)?), dims.clone()));
            tensors.push((format!("{i}.m"), f32_bytes(&values(&mo.m)?), dims.clone()));
            tensors.push((format!("{i}.v"), f32_bytes(&values(&mo.v)?), dims));
        }
        write_safetensors(&dir.join("state.safetensors"), &tensors)?;
        let state = serde_json::json!({ "step": self.step, "meta": meta });
        std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("cannot write {}", dir.join("state.json").display()))
    }

    /// Restores what [`Trainer::save`] wrote, after checking that `meta` equals the saved one.
    pub fn load(&mut self, dir: &Path, meta: &serde_json::Value) -> Result<()> {
        let state_path = dir.join("state.json");
        let text = std::fs::read(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
        let state: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", state_path.display()))?;
        if state.get("meta") != Some(meta) {
            bail!(
                "the checkpoint in {} was made with other options or data ({}); rerun with the same ones, or --force to start over",
                dir.display(),
                state.get("meta").map(|m| m.to_string()).unwrap_or_default().chars().take(300).collect::<String>()
            );
        }
        let step = state.get("step").and_then(|s| s.as_u64()).context("checkpoint without a step")? as usize;
        ensure!(step <= self.hyper.steps, "the checkpoint is at step {step}, beyond --steps {}", self.hyper.steps);
        let path = dir.join("state.safetensors");
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is damaged", path.display()))?;
        let device = self.student.device().clone();
        let read = |name: String, dims: [usize; 2]| -> Result<Tensor<2>> {
            let view = st.tensor(&name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
            ensure!(
                view.shape() == dims,
                "{}: tensor {name} has shape {:?}, expected {dims:?}",
                path.display(),
                view.shape()
            );
            ensure!(view.dtype() == safetensors::Dtype::F32, "{}: tensor {name} is not F32", path.display());
            let v: Vec<f32> =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Ok(matrix(v, dims[0], dims[1], &device))
        };
        let mut params = vec![];
        for (i, p) in self.lora.params().iter().enumerate() {
            let dims = p.dims();
            params.push(read(format!("{i}.value"), dims)?);
            self.moments[i] = Moments { m: read(format!("{i}.m"), dims)?, v: read(format!("{i}.v"), dims)? };
        }
        self.lora.set_params(params);
        self.step = step;
        Ok(())
    }
}

/// The sum of `log_probs[i, tokens[i + 1]]` over the positions the mask counts, and their count.
fn masked_log_likelihood(model: &Llama, log_probs: Tensor<2>, e: &Example) -> Result<(Tensor<1>, usize)> {
    let n = e.tokens.len();
    ensure!(n >= 2, "a sequence of {n} token(s) has nothing to predict");
    let device = model.device();
    let targets: Vec<i64> = e.tokens[1..].iter().map(|&t| t as i64).collect();
    let targets: Tensor<2, Int> = Tensor::from_data(TensorData::new(targets, [n - 1, 1]), device);
    let mask: Vec<f32> = e.mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    let count = e.mask.iter().filter(|&&m| m).count();
    let mask = matrix(mask, n - 1, 1, device);
    let picked = log_probs.narrow(0, 0, n - 1).gather(1, targets);
    Ok((picked.mul(mask).sum(), count))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::llama::{Shape, Target};

    pub(crate) fn tiny_shape() -> Shape {
        Shape {
            d_model: 32,
            d_ff: 48,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            vocab: 24,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
        }
    }

    /// A random model of `layers` blocks; `delta(name, rows, cols, values)` may change a weight.
    pub(crate) fn tiny_model(
        seed: u64,
        layers: usize,
        mut delta: impl FnMut(&str, usize, usize, &mut Vec<f32>),
    ) -> Llama {
        let mut rng = Rng::new(seed);
        Llama::build(tiny_shape(), (0..layers as u32).collect(), |name, rows, cols| {
            if name == "output.weight" {
                return Ok(None);
            }
            let mut v: Vec<f32> = if name.contains("norm") {
                (0..rows * cols).map(|_| 0.8 + 0.4 * rng.unit()).collect()
            } else {
                let s = 1.6 / (cols as f32).sqrt();
                (0..rows * cols).map(|_| (rng.uniform()) * s).collect()
            };
            delta(name, rows, cols, &mut v);
            Ok(Some(v))
        })
        .unwrap()
    }

    fn sequences(n: usize, len: usize, seed: u64) -> Vec<Example> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| Example::text((0..len).map(|_| rng.below(24) as u32).collect())).collect()
    }

    fn hyper(steps: usize, lr: f32) -> Hyper {
        Hyper { steps, batch: 2, lr, seed: 5 }
    }

    /// LoRA factors with nonzero B (a fresh adapter's zero B would leave A's gradient zero).
    fn random_lora(model: &Llama, targets: &[Target], seed: u64) -> Lora {
        let mut rng = Rng::new(seed);
        let mut lora = Lora::new(model, targets, 2, 4.0, &mut rng).unwrap();
        let params = lora
            .params()
            .into_iter()
            .map(|p| {
                let [r, c] = p.dims();
                matrix((0..r * c).map(|_| (rng.uniform()) * 0.3).collect(), r, c, model.device())
            })
            .collect();
        lora.set_params(params);
        lora
    }

    fn check_gradients(objective: &Objective, student: &Llama, examples: Vec<Example>) {
        let targets = [Target::Q, Target::K, Target::O, Target::Down];
        let lora = random_lora(student, &targets, 9);
        let mut t = Trainer::new(student, objective, lora, hyper(1, 1e-3), examples).unwrap();
        let (loss, grads) = t.loss_and_grads(0).unwrap();
        assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
        let mut rng = Rng::new(77);
        let mut checked = 0;
        let mut largest = 0f32;
        for (pi, g) in grads.iter().enumerate() {
            assert!(!g.is_empty(), "factor {pi} has no gradient");
            for _ in 0..3 {
                let k = rng.below(g.len() as u64) as usize;
                let h = 2e-3f32;
                let mut at = |delta: f32| {
                    let mut params = t.lora.params();
                    let [r, c] = params[pi].dims();
                    let mut v = values(&params[pi]).unwrap();
                    v[k] += delta;
                    params[pi] = matrix(v, r, c, student.device());
                    t.lora.set_params(params);
                    let l = t.loss_at(0).unwrap();
                    let mut params = t.lora.params();
                    let mut v = values(&params[pi]).unwrap();
                    v[k] -= delta;
                    params[pi] = matrix(v, r, c, student.device());
                    t.lora.set_params(params);
                    l as f64
                };
                let fd = ((at(h) - at(-h)) / (2.0 * h as f64)) as f32;
                let got = g[k];
                largest = largest.max(got.abs());
                assert!(
                    (fd - got).abs() <= 0.03 * got.abs().max(fd.abs()) + 2e-3,
                    "factor {pi} value {k}: autodiff {got}, finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * 2 * targets.len() * student.layers.len());
        assert!(largest > 0.01, "every gradient is tiny ({largest}): the check would pass on zeros");
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let teacher = tiny_model(1, 2, |_, _, _, _| {});
        let student = tiny_model(1, 2, |name, _, _, v| {
            if name.contains("ffn_up") {
                v.iter_mut().for_each(|x| *x = (*x * 4.0).round() / 4.0);
            }
        });
        let distill = Objective::Distill { teacher: Box::new(teacher), hidden_weight: 0.5 };
        check_gradients(&distill, &student, sequences(2, 7, 3));
        let mut examples = sequences(2, 9, 4);
        examples[0].mask[..4].iter_mut().for_each(|m| *m = false);
        check_gradients(&Objective::CrossEntropy, &student, examples);
    }

    /// A teacher that is the student plus a planted rank-2 change of two layers: an adapter of
    /// rank 2 on those layers can match it exactly, and training must find it (held-out KL down 20-fold; 400-fold when written).
    #[test]
    fn distillation_recovers_a_planted_low_rank_change() {
        let student = tiny_model(2, 2, |_, _, _, _| {});
        let mut rng = Rng::new(3);
        let teacher = tiny_model(2, 2, |name, rows, cols, v| {
            if name.contains("attn_q") || name.contains("ffn_down") {
                let u: Vec<f32> = (0..rows * 2).map(|_| rng.uniform()).collect();
                let w: Vec<f32> = (0..2 * cols).map(|_| rng.uniform()).collect();
                for r in 0..rows {
                    for c in 0..cols {
                        v[r * cols + c] += 0.35 * (u[r * 2] * w[c] + u[r * 2 + 1] * w[cols + c]);
                    }
                }
            }
        });
        let objective = Objective::Distill { teacher: Box::new(teacher), hidden_weight: 0.0 };
        let mut rng = Rng::new(4);
        let lora = Lora::new(&student, &[Target::Q, Target::Down], 2, 4.0, &mut rng).unwrap();
        let held_out = sequences(4, 16, 99);
        let mut t = Trainer::new(&student, &objective, lora, hyper(500, 3e-2), sequences(500, 16, 6)).unwrap();
        let before = t.evaluate(&held_out, false).unwrap().kl.unwrap();
        let mut losses = vec![];
        while t.step < 500 {
            losses.push(t.step().unwrap().loss);
        }
        let after = t.evaluate(&held_out, true).unwrap().kl.unwrap();
        assert!(before > 0.05, "the planted change moved the teacher by only KL {before}");
        assert!(after < 0.05 * before, "held-out KL {before} -> {after}: training did not recover the planted change");
        let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
        let last: f32 = losses[490..].iter().sum::<f32>() / 10.0;
        assert!(last < 0.1 * first, "training loss {first} -> {last}");
    }

    /// Saving after 3 steps, loading into a fresh trainer and taking 3 more gives the factors
    /// of 6 steps in one go, bit for bit.
    #[test]
    fn a_resumed_run_equals_an_uninterrupted_one() {
        let teacher = tiny_model(7, 2, |_, _, _, _| {});
        let student = tiny_model(8, 2, |_, _, _, _| {});
        let objective = Objective::Distill { teacher: Box::new(teacher), hidden_weight: 0.1 };
        let fresh = || {
            let mut rng = Rng::new(11);
            let lora = Lora::new(&student, &Target::ALL, 2, 4.0, &mut rng).unwrap();
            Trainer::new(&student, &objective, lora, hyper(6, 1e-2), sequences(5, 10, 12)).unwrap()
        };
        let mut whole = fresh();
        for _ in 0..6 {
            whole.step().unwrap();
        }
        let dir = std::env::temp_dir().join(format!("kiln-heal-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let meta = serde_json::json!({ "run": 1 });
        let mut first = fresh();
        for _ in 0..3 {
            first.step().unwrap();
        }
        first.save(&dir, &meta).unwrap();
        first.step().unwrap(); // lost: the run stopped before the next checkpoint
        let mut second = fresh();
        assert!(second.load(&dir, &serde_json::json!({ "run": 2 })).unwrap_err().to_string().contains("other options"));
        second.load(&dir, &meta).unwrap();
        assert_eq!(second.step, 3);
        for _ in 0..3 {
            second.step().unwrap();
        }
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
            whole.lora.params().iter().map(|p| values(p).unwrap()).collect(),
            second.lora.params().iter().map(|p| values(p).unwrap()).collect(),
        );
        assert!(a.iter().flatten().any(|&x| x != 0.0));
        assert_eq!(a, b, "the resumed run's factors differ from the uninterrupted run's");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
