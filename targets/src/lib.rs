//! Target descriptions: everything kiln knows about an instruction set and a device.
//!
//! Passes and codegen never test the host CPU or name an ISA: they ask a [`Target`] for its
//! Cranelift ISA, vector width, caches, thread count and kernel choices.
//! [`lookup`] maps a target triple to its implementation; adding a target means adding a
//! folder here and a line to [`KNOWN_TARGETS`].

#![forbid(unsafe_code)]

use std::fmt;

use cranelift_codegen::ir::Value;
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_frontend::FunctionBuilder;
use serde::Serialize;

pub mod x86_64;

/// Cache sizes of one core, in bytes, used for blocking decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CacheInfo {
    pub l1d: u32,
    pub l2: u32,
    pub l3: u32,
}

/// A serializable summary of a target, recorded in the bundle manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetSummary {
    pub triple: String,
    pub cpu: String,
    pub isa_features: Vec<String>,
    pub vector_bits: u32,
    pub default_threads: u32,
    pub cache: CacheInfo,
}

/// How the rows of a quantized weight matrix are laid out for the matmul kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MatmulSchedule {
    /// Rows stored interleaved block by block, so that one pass over the activations serves
    /// `row_interleave` outputs and the weight stream is read once, in order.
    pub row_interleave: u32,
}

/// Errors in choosing or configuring a target: always the user's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    UnknownTriple { triple: String },
    Cranelift { message: String },
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetError::UnknownTriple { triple } => {
                write!(
                    f,
                    "unknown target '{triple}'; known targets: {}",
                    KNOWN_TARGETS.join(", ")
                )
            }
            TargetError::Cranelift { message } => {
                write!(f, "cranelift rejected the target settings: {message}")
            }
        }
    }
}

impl std::error::Error for TargetError {}

/// A compilation target.
pub trait Target: Send + Sync {
    /// The target triple, e.g. `x86_64-unknown-linux-gnu`.
    fn triple(&self) -> &str;
    /// A Cranelift ISA configured with exactly the features this target promises.
    fn isa(&self) -> Result<OwnedTargetIsa, TargetError>;
    fn summary(&self) -> TargetSummary;
    /// Width of the SIMD registers kernels use, in bits.
    fn vector_bits(&self) -> u32 {
        128
    }
    fn matmul_schedule(&self) -> MatmulSchedule;
    /// Emits `i32x4` lanes `a[2i] * b[2i] + a[2i+1] * b[2i+1]` for two `i16x8` values: the
    /// widening integer dot product the quantized matmuls are built on.
    fn dot_i16x8(&self, builder: &mut FunctionBuilder, a: Value, b: Value) -> Value;
}

/// Triples [`lookup`] knows.
pub const KNOWN_TARGETS: &[&str] = &["x86_64-unknown-linux-gnu"];

/// The target for `triple`.
pub fn lookup(triple: &str) -> Result<Box<dyn Target>, TargetError> {
    match triple {
        "x86_64-unknown-linux-gnu" | "x86_64" => Ok(Box::new(x86_64::X86_64::v3())),
        _ => Err(TargetError::UnknownTriple {
            triple: triple.to_string(),
        }),
    }
}

/// The triple of the machine running the compiler, when kiln has a target for it.
pub fn host_triple() -> Option<&'static str> {
    if cfg!(target_arch = "x86_64") && cfg!(target_os = "linux") {
        Some("x86_64-unknown-linux-gnu")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_triples_list_the_known_ones() {
        let err = lookup("riscv64gc-unknown-linux-gnu")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("riscv64gc") && err.contains("x86_64-unknown-linux-gnu"),
            "{err}"
        );
    }

    #[test]
    fn known_targets_build_their_isa() {
        for triple in KNOWN_TARGETS {
            let target = lookup(triple).unwrap();
            let isa = target.isa().unwrap();
            assert_eq!(isa.triple().to_string(), *triple);
        }
    }
}
