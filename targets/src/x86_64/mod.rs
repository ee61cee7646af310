//! x86-64 servers and desktops.
//!
//! The default CPU level is x86-64-v3 (Haswell and later: AVX2, FMA, BMI2).
//! Cranelift 0.135 emits 128-bit vectors only, VEX-encoded when `has_avx` is set; the
//! `x86-64-v3` preset does not set `has_avx`, so the features are listed one by one.
//! The int16 dot product lowers to `vpmaddwd`.
//! Q4 and Q8 matmuls run on 256-bit micro-kernels that kiln assembles itself ([`micro`]), over
//! weights packed in groups of 8 rows; attention's scores and weighted values on 256-bit
//! kernels too ([`attention`]) when the head size is a multiple of 8.

pub mod attention;
pub mod micro;

use cranelift_codegen::ir::Value;
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::FunctionBuilder;

use crate::{AttentionKernel, CacheInfo, MatmulSchedule, MicroKernel, Target, TargetError, TargetSummary};

/// x86-64 with a fixed feature level.
pub struct X86_64 {
    cpu: &'static str,
    features: &'static [&'static str],
}

const V3_FEATURES: &[&str] = &[
    "has_sse3",
    "has_ssse3",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
    "has_avx",
    "has_avx2",
    "has_fma",
    "has_bmi1",
    "has_bmi2",
    "has_lzcnt",
];

impl X86_64 {
    /// x86-64-v3: AVX2 and FMA.
    pub fn v3() -> Self {
        X86_64 { cpu: "x86-64-v3", features: V3_FEATURES }
    }
}

/// Shared Cranelift settings for generated kernels: optimize for speed, position-independent
/// code (the library may be linked into PIE executables and shared objects). Cranelift's IR
/// verifier checks kiln's generated IR; it changes no code, took 0.18 s of SmolLM2's 2 s build
/// (codegen 0.61 -> 0.43 s without it), and runs in debug builds and whenever `KILN_VERIFY_IR`
/// is set (`cargo xtask test` sets it, so every test compiles with it).
pub fn shared_flags() -> settings::Flags {
    let verify = cfg!(debug_assertions) || std::env::var_os("KILN_VERIFY_IR").is_some();
    let mut b = settings::builder();
    for (k, v) in
        [("opt_level", "speed"), ("is_pic", "true"), ("enable_verifier", if verify { "true" } else { "false" })]
    {
        b.set(k, v).expect("valid cranelift setting");
    }
    settings::Flags::new(b)
}

impl Target for X86_64 {
    fn triple(&self) -> &str {
        "x86_64-unknown-linux-gnu"
    }

    fn isa(&self) -> Result<OwnedTargetIsa, TargetError> {
        let err = |e: &dyn std::fmt::Display| TargetError::Cranelift { message: e.to_string() };
        let mut b = isa::lookup_by_name(self.triple()).map_err(|e| err(&e))?;
        for f in self.features {
            b.enable(f).map_err(|e| err(&e))?;
        }
        b.finish(shared_flags()).map_err(|e| err(&e))
    }

    fn summary(&self) -> TargetSummary {
        TargetSummary {
            triple: self.triple().to_string(),
            cpu: self.cpu.to_string(),
            // The Cranelift flags, and F16C, which kiln's own kernels use (`vcvtph2ps`).
            isa_features: self
                .features
                .iter()
                .map(|f| f.trim_start_matches("has_").to_string())
                .chain(["f16c".to_string()])
                .collect(),
            vector_bits: self.vector_bits(),
            default_threads: 2,
            cache: CacheInfo { l1d: 32 << 10, l2: 512 << 10, l3: 16 << 20 },
        }
    }

    fn matmul_schedule(&self) -> MatmulSchedule {
        MatmulSchedule { row_interleave: 4, micro_rows: Some(8) }
    }

    fn micro_kernel(&self, kernel: &MicroKernel) -> Option<Vec<u8>> {
        Some(micro::kernel(kernel).expect("the micro-kernels' instructions all encode"))
    }

    fn attention_kernel(&self, kernel: &AttentionKernel) -> Option<Vec<u8>> {
        attention::supports(kernel)
            .then(|| attention::kernel(kernel).expect("the attention kernels' instructions all encode"))
    }

    fn dot_i16x8(&self, builder: &mut FunctionBuilder, a: Value, b: Value) -> Value {
        // Cranelift matches this tree to `vpmaddwd`.
        crate::widening_dot_i16x8(builder, a, b)
    }
}

/// Checks a kernel kiln assembles: the same bytes on a second assembly (bundles are
/// deterministic), ending with `vzeroupper; ret` (no AVX-SSE transition penalty for the
/// caller). `what` names the kernel in a failure.
#[cfg(test)]
fn assert_assembles_deterministically(what: &dyn std::fmt::Debug, assemble: impl Fn() -> Vec<u8>) {
    let code = assemble();
    assert_eq!(code, assemble(), "{what:?} assembles differently twice");
    assert!(code.ends_with(&[0xc5, 0xf8, 0x77, 0xc3]), "{what:?} does not end with vzeroupper; ret");
}
