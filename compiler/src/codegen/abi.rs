//! The C ABI between a compiled model library and the runtime, as the code generator uses it:
//! the `abi` crate (`runtime/abi`), the one definition both sides compile against, with the
//! offsets derived from its `#[repr(C)]` structs.

pub use abi::{
    ctx, desc, weights_checksum, ABI_VERSION, C_ABI, DTYPE_F32, DTYPE_I32, FINGERPRINT_BYTES, MAX_IO, MODEL_SYMBOL,
};

// The offsets are the host's; every kiln target is 64-bit, so the host must be too.
const _: () = assert!(size_of::<usize>() == 8, "the compiler writes descriptors of 64-bit targets");

/// The `cpu_features` bits of a target's features (`TargetSummary::isa_features`). Names
/// without a bit are baseline features every CPU of the target has (aarch64's `neon`).
pub fn cpu_feature_bits(features: &[String]) -> u32 {
    features.iter().filter_map(|f| abi::cpu_feature(f)).fold(0, |bits, bit| bits | bit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every feature a target names has a `KILN_CPU_*` bit under that very name (so the
    /// runtime can check it), except the baselines.
    #[test]
    fn every_target_feature_has_a_bit() {
        let mut targets: Vec<Box<dyn targets::Target>> = Vec::new();
        for triple in targets::KNOWN_TARGETS {
            targets.push(targets::lookup(triple).unwrap());
        }
        for device in ["snapdragon-865", "raspberry-pi-5", "generic-armv8.0"] {
            targets.push(targets::lookup_device("aarch64-linux-android", Some(device)).unwrap());
        }
        for target in &targets {
            for feature in target.summary().isa_features {
                let named = abi::CPU_FEATURES.iter().any(|(_, name)| *name == feature);
                assert!(named || feature == "neon", "{}: feature {feature:?} has no KILN_CPU_ bit", target.triple());
            }
        }
        let x86 = targets::lookup("x86_64-unknown-linux-gnu").unwrap().summary().isa_features;
        let bits = cpu_feature_bits(&x86);
        for bit in [abi::KILN_CPU_AVX2, abi::KILN_CPU_FMA, abi::KILN_CPU_F16C, abi::KILN_CPU_SSE41] {
            assert!(bits & bit != 0, "{bits:#x} lacks {bit:#x}");
        }
    }
}
