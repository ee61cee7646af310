//! A GGUF file as a model source: `llama.*` metadata, tensors by their own names, and the
//! tokenizer built from `tokenizer.ggml.*` ([`crate::tokenizer_json`]).

use sha2::{Digest, Sha256};

use crate::frontend::{bad, FrontendError, Hyperparameters, SUPPORTED_ARCHITECTURES};
use crate::gguf::{clip, describe_value, GgufFile};
use crate::source::{stop_ids, ModelSource, SourceTensor, TokenizerSpec};
use ir::RopeScaling;

impl GgufFile {
    /// The rotary scaling as llama.cpp applies it: `{arch}.rope.scaling.factor` (or the older
    /// `rope.scale_linear`) divides every frequency when the type (`rope.scaling.type`, linear
    /// when absent) is `linear`; the optional `rope_freqs.weight` tensor, which llama.cpp's
    /// converter writes for Llama 3.1 (`head_dim / 2` f32 values), divides frequency `i` by its
    /// value `i`. YaRN and other types are refused.
    fn rope_scaling(&self, arch: &str, head_dim: u32) -> Result<RopeScaling, FrontendError> {
        let key = |k: &str| format!("{arch}.{k}");
        let kind = match self.get(&key("rope.scaling.type")) {
            None => None,
            Some(v) => match v.as_str() {
                Some(t @ ("none" | "linear")) => Some(t),
                Some("yarn") => {
                    return Err(bad(
                        &key("rope.scaling.type"),
                        describe_value(v),
                        "YaRN rope scaling is not supported",
                    ));
                }
                _ => {
                    return Err(bad(
                        &key("rope.scaling.type"),
                        describe_value(v),
                        "kiln supports rope scaling none and linear (and Llama 3.1's rope_freqs.weight)",
                    ))
                }
            },
        };
        let mut factor = None;
        for k in ["rope.scaling.factor", "rope.scale_linear"] {
            if self.get(&key(k)).is_some() {
                let f = self.get_f32(&key(k))?;
                // llama.cpp reads 0 as "no scaling".
                if f != 0.0 && factor.is_none() {
                    if !(f.is_finite() && f > 0.0) {
                        return Err(bad(&key(k), f, "must be finite and positive"));
                    }
                    factor = Some((k, f));
                }
            }
        }
        let linear = match (kind, factor) {
            (Some("none"), Some((k, f))) if f != 1.0 => {
                return Err(bad(&key(k), f, "a scaling factor other than 1 with rope.scaling.type none"));
            }
            (Some("none"), _) | (_, None) => 1.0,
            (_, Some((_, f))) => f,
        };
        let divisors = match GgufFile::tensor(self, "rope_freqs.weight") {
            Err(_) => None,
            Ok(info) => {
                let pairs = (head_dim / 2) as u64;
                if info.dims != [pairs] || info.ggml_type != crate::gguf::GgmlType::F32 {
                    return Err(bad(
                        "rope_freqs.weight",
                        format!("{} {:?}", info.ggml_type.name(), info.dims),
                        &format!("must be f32 [{pairs}] (head_dim / 2)"),
                    ));
                }
                let bytes = self.tensor_data(info);
                Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<_>>())
            }
        };
        Ok(match divisors {
            Some(d) => RopeScaling::Divisors(d.into_iter().map(|v| v * linear).collect()),
            None if linear != 1.0 => RopeScaling::Linear { factor: linear },
            None => RopeScaling::None,
        })
    }
}

impl ModelSource for GgufFile {
    fn kind(&self) -> &'static str {
        "gguf"
    }

    fn hyperparameters(&self) -> Result<Hyperparameters, FrontendError> {
        let arch = self.get_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(FrontendError::UnsupportedArchitecture {
                architecture: clip(&arch).escape_debug().to_string(),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let get = |k: &str| self.get_u32(&key(k));
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = match self.get(&key("attention.head_count_kv")) {
            Some(_) => get("attention.head_count_kv")?,
            None => n_heads,
        };
        let (n_layers, d_model, d_ff) = (get("block_count")?, get("embedding_length")?, get("feed_forward_length")?);
        let rope_theta = match self.get(&key("rope.freq_base")) {
            Some(_) => self.get_f32(&key("rope.freq_base"))?,
            None => 10000.0,
        };
        let mut hp = Hyperparameters {
            architecture: arch.clone(),
            n_layers,
            d_model,
            d_ff,
            n_heads,
            n_kv_heads,
            head_dim: d_model.checked_div(n_heads).unwrap_or(0),
            vocab: 0, // from the embedding's shape, below
            rope_theta,
            rope_scaling: RopeScaling::None, // below, once head_dim is checked
            rms_eps: self.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            train_context: get("context_length")?,
            tied_embedding: self.tensor("output.weight").is_err(),
        };
        hp.check(key)?;
        if self.get(&key("rope.dimension_count")).is_some() {
            let rope_dims = get("rope.dimension_count")?;
            if rope_dims != hp.head_dim {
                return Err(bad(&key("rope.dimension_count"), rope_dims, "partial rotary embedding is not supported"));
            }
        }
        hp.rope_scaling = self.rope_scaling(&arch, hp.head_dim)?;
        hp.check(key)?;
        let embd = self.tensor("token_embd.weight")?;
        hp.vocab = match embd.dims[..] {
            [_, v] if v > 0 && v <= u32::MAX as u64 => v as u32,
            _ => {
                return Err(FrontendError::BadTensorShape {
                    tensor: embd.name.clone(),
                    expected: vec![d_model as u64, 0],
                    found: embd.dims.clone(),
                })
            }
        };
        let vocab = hp.vocab;
        if let Some(v) = self.get(&key("vocab_size")) {
            if v.as_integer() != Some(vocab as i128) {
                return Err(bad(&key("vocab_size"), describe_value(v), &format!("token_embd.weight has {vocab} rows")));
            }
        }
        // llama.cpp sizes the embedding from the tokenizer and refuses any other row count.
        if let Some(tokens) = self.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            let output = self.tensor("output.weight").ok();
            for t in std::iter::once(embd).chain(output) {
                let rows = t.dims.get(1).copied().unwrap_or(1);
                if rows != tokens.len() as u64 {
                    return Err(FrontendError::VocabMismatch { tensor: t.name.clone(), rows, tokens: tokens.len() });
                }
            }
        }
        Ok(hp)
    }

    fn declared_name(&self) -> Result<Option<String>, FrontendError> {
        match self.get("general.name") {
            None => Ok(None),
            Some(_) => Ok(Some(self.get_str("general.name")?.to_owned())),
        }
    }

    fn tensor(&self, name: &str, dims: &[u64]) -> Result<SourceTensor<'_>, FrontendError> {
        let info = GgufFile::tensor(self, name)?;
        if info.dims != dims {
            return Err(FrontendError::BadTensorShape {
                tensor: name.into(),
                expected: dims.to_vec(),
                found: info.dims.clone(),
            });
        }
        let format = info.ggml_type.quant_format().ok_or_else(|| FrontendError::UnsupportedTensorType {
            tensor: name.into(),
            ggml_type: info.ggml_type.name().to_string(),
        })?;
        Ok(SourceTensor { format, bytes: self.tensor_data(info).into() })
    }

    fn tokenizer(&self) -> Result<TokenizerSpec, FrontendError> {
        let json = crate::tokenizer_json::tokenizer_json(self)?;
        let tokens = self.get_str_array("tokenizer.ggml.tokens")?;
        let token_at = |key: &str| -> Result<(u32, String), FrontendError> {
            let id = self.get_u32(key)?;
            let tok = tokens
                .get(id as usize)
                .ok_or_else(|| bad(key, id, &format!("the vocabulary has {} tokens", tokens.len())))?;
            Ok((id, tok.to_string()))
        };
        let bos = token_at("tokenizer.ggml.bos_token_id")?;
        let eos = token_at("tokenizer.ggml.eos_token_id")?;
        let ends: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| self.get_u32(k).ok())
            .collect();
        Ok(TokenizerSpec {
            json,
            bos,
            eos,
            add_bos: self.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            chat_template: self.get_str("tokenizer.chat_template").ok().map(str::to_string),
            stop_ids: stop_ids(ends, |t| tokens.iter().position(|x| *x == t).map(|i| i as u32)),
        })
    }

    fn context_key(&self) -> String {
        "llama.context_length".into()
    }

    fn sha256(&self) -> String {
        let mut h = Sha256::new();
        for chunk in self.bytes().chunks(crate::source::HASH_CHUNK) {
            h.update(chunk);
            GgufFile::release(self, chunk);
        }
        format!("{:x}", h.finalize())
    }

    fn release(&self, bytes: &[u8]) {
        GgufFile::release(self, bytes);
    }
}
