//! What a device costs to run a model on: bandwidth, compute and energy per byte and per
//! operation, for the deployment report and the energy model of `eval`.
//!
//! The figures are per device class, each with its sources. Bandwidth and compute are what
//! kiln's kernels sustain (measured on the x86-64 machines kiln is developed on; derived from
//! the cores' SIMD width and clock for the AArch64 devices, which kiln cannot run here).
//! Energy is modeled, never measured here: DRAM energy per byte read plus core energy per
//! arithmetic operation, the two costs of a memory-bound decoder. The `host` profile has no
//! table entry: its bandwidth is measured on the machine (see `xtask`), its other figures are
//! those of the class of the host's CPU.

/// The costs of one device class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceCosts {
    /// The profile's name (`--device`).
    pub name: &'static str,
    pub description: &'static str,
    /// The targets the profile describes.
    pub triples: &'static [&'static str],
    /// Threads kiln runs with on the device (its big cores, or its vCPUs).
    pub threads: u32,
    /// Sustained streaming read bandwidth with `threads` threads, GB/s.
    pub memory_gbps: f64,
    /// The fraction of the read-bandwidth roofline kiln's decode reaches.
    pub decode_efficiency: f64,
    /// Sustained GOP/s (multiply and add counted apart) of kiln's quantized matmul kernels
    /// with `threads` threads, over a prefill batch.
    pub matmul_gops: f64,
    /// DRAM energy per byte read, picojoules.
    pub dram_pj_per_byte: f64,
    /// Core energy per arithmetic operation in kiln's kernels, picojoules (core power over
    /// sustained throughput).
    pub pj_per_op: f64,
    /// Where the figures come from.
    pub sources: &'static str,
}

const X86: &[&str] = &["x86_64-unknown-linux-gnu"];
const ARM: &[&str] = &["aarch64-unknown-linux-gnu", "aarch64-linux-android"];

/// DRAM energy, per the sources every profile names.
const DRAM_SOURCE: &str = "DRAM: Horowitz, ISSCC 2014 ('Computing's energy problem'): a 64-bit DRAM access \
    costs 1.3-2.6 nJ (20-40 pJ/bit) in DDR3 at 45 nm; kiln takes 15 pJ/bit (120 pJ/byte) for DDR4/DDR5 \
    servers and 5-8 pJ/bit for LPDDR5/LPDDR4X/LPDDR4 (Micron and JEDEC state LPDDR5 at about half of LPDDR4's \
    energy per bit).";

/// The device classes kiln ships figures for.
pub const PROFILES: &[DeviceCosts] = &[
    DeviceCosts {
        name: "x86-64-v3",
        description: "a 2-vCPU x86-64 cloud instance with AVX2 (AMD EPYC Zen 3 class, the default), DDR4",
        triples: X86,
        threads: 2,
        memory_gbps: 25.0,
        decode_efficiency: 0.85,
        matmul_gops: 190.0,
        dram_pj_per_byte: 120.0,
        pj_per_op: 23.0,
        sources: "Bandwidth: kiln's streaming read probe (`xtask bench`) on 2-vCPU AMD EPYC Zen 3 and Zen 4 \
            instances, 22-30 GB/s. Decode: kiln reached 82-97 % of that roofline at 2 threads (README, \
            stop 21). Matmul: SmolLM2-135M pp512 at 718 tok/s x 269 MOP/token = 193 GOP/s (Q4_1, q16 \
            activations). Core energy: AMD EPYC 7763, 280 W TDP over 64 cores = 4.4 W per core, over 190 \
            GOP/s = 23 pJ/op.",
    },
    DeviceCosts {
        name: "epyc-zen4-2vcpu",
        description: "a 2-vCPU AMD EPYC Zen 4 cloud instance (AVX-512; kiln runs its AVX2 code there), DDR5",
        triples: X86,
        threads: 2,
        memory_gbps: 30.0,
        decode_efficiency: 0.85,
        matmul_gops: 190.0,
        dram_pj_per_byte: 120.0,
        pj_per_op: 20.0,
        sources: "Bandwidth: kiln's streaming read probe on a 2-vCPU AMD EPYC Zen 4 instance, 30.1 GB/s \
            (issue 11). Decode and matmul: kiln's x86-64-v3 kernels (no AVX-512 code yet), as x86-64-v3. \
            Core energy: AMD EPYC 9654, 360 W TDP over 96 cores = 3.75 W per core, over 190 GOP/s = 20 pJ/op.",
    },
    DeviceCosts {
        name: "snapdragon-865",
        description: "Snapdragon 865 class phone: 1+3 Cortex-A77, 4 Cortex-A55, LPDDR5",
        triples: ARM,
        threads: 4,
        memory_gbps: 34.0,
        decode_efficiency: 0.7,
        matmul_gops: 50.0,
        dram_pj_per_byte: 40.0,
        pj_per_op: 60.0,
        sources: "Bandwidth: LPDDR5-2750, 4 x 16-bit channels, 44 GB/s peak, about 34 GB/s sustained \
            (Qualcomm's specification). Decode efficiency: assumed (not measured on the device). Matmul: 4 \
            A77 cores x 2.4 GHz x 2 NEON pipes x 8 int16 multiply-adds per smull/smull2/addp triple (about \
            10.7 op/cycle) = 102 GOP/s peak, kiln at half of it. Core energy: about 1.5 W per A77 core at full \
            load over 25 GOP/s = 60 pJ/op.",
    },
    DeviceCosts {
        name: "raspberry-pi-5",
        description: "Raspberry Pi 5 class board: 4 Cortex-A76, LPDDR4X",
        triples: ARM,
        threads: 4,
        memory_gbps: 17.0,
        decode_efficiency: 0.7,
        matmul_gops: 50.0,
        dram_pj_per_byte: 48.0,
        pj_per_op: 60.0,
        sources: "Bandwidth: LPDDR4X-4267, 32 bits, 17 GB/s peak. Decode efficiency: assumed. Matmul: 4 A76 \
            cores x 2.4 GHz at the A77's NEON rate, kiln at half of the peak. Core energy: a Pi 5 draws about \
            7 W under full load on 4 cores, about 1.5 W per core over 25 GOP/s = 60 pJ/op.",
    },
    DeviceCosts {
        name: "generic-armv8.0",
        description: "any ARMv8.0-A core (Cortex-A53 and up): NEON only, LPDDR4",
        triples: ARM,
        threads: 4,
        memory_gbps: 8.0,
        decode_efficiency: 0.7,
        matmul_gops: 8.0,
        dram_pj_per_byte: 64.0,
        pj_per_op: 60.0,
        sources: "Bandwidth: LPDDR4-3200, 32 bits, 12.8 GB/s peak, A53 clusters sustain about 8 GB/s. Decode \
            efficiency: assumed. Matmul: 4 A53 cores x 1.4 GHz x one 64-bit NEON pipe (about 2.7 int16 \
            op/cycle) = 15 GOP/s peak, kiln at half. Core energy: about 0.25 W per A53 core over 4 GOP/s = 60 \
            pJ/op.",
    },
];

/// The name of the profile measured on the machine itself.
pub const HOST: &str = "host";

/// The DRAM source line shared by every profile.
pub fn dram_source() -> &'static str {
    DRAM_SOURCE
}

/// The profile named `name` for `triple`, or an error listing the known ones.
pub fn costs(name: &str, triple: &str) -> Result<&'static DeviceCosts, String> {
    let known: Vec<&str> = PROFILES.iter().filter(|p| p.triples.contains(&triple)).map(|p| p.name).collect();
    PROFILES.iter().find(|p| p.name == name && p.triples.contains(&triple)).ok_or_else(|| {
        format!("no device profile '{name}' for {triple}; known: {}{}", known.join(", "), host_hint(triple))
    })
}

fn host_hint(triple: &str) -> &'static str {
    if Some(triple) == crate::host_triple() {
        ", host (this machine, measured)"
    } else {
        ""
    }
}

/// The part of `device` that decides the code for `triple`: an AArch64 device chooses ISA
/// extensions, while every x86-64 profile runs the x86-64-v3 code and only describes the
/// machine for the deployment report, so a bundle does not depend on it.
pub fn code_device(triple: &str, device: Option<&str>) -> Option<String> {
    if triple.starts_with("x86_64") {
        None
    } else {
        device.map(str::to_string)
    }
}

/// The profile a bundle for `triple` is described by when none is named: the device it was
/// built for on AArch64, the CPU level's class on x86-64.
pub fn default_costs(triple: &str, device: Option<&str>) -> Result<&'static DeviceCosts, String> {
    match (triple, device) {
        (_, Some(d)) if d != HOST => costs(d, triple),
        ("x86_64-unknown-linux-gnu", _) => costs("x86-64-v3", triple),
        (t, _) => costs(crate::aarch64::DEFAULT_DEVICE, t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_complete_and_every_arm_device_has_costs() {
        for p in PROFILES {
            assert!(p.threads > 0 && p.memory_gbps > 0.0 && p.matmul_gops > 0.0, "{p:?}");
            assert!(p.decode_efficiency > 0.0 && p.decode_efficiency <= 1.0, "{p:?}");
            assert!(p.dram_pj_per_byte > 0.0 && p.pj_per_op > 0.0 && !p.sources.is_empty(), "{p:?}");
        }
        for d in crate::aarch64::DEVICES {
            assert!(costs(d.name, "aarch64-linux-android").is_ok(), "{}", d.name);
        }
        let err = costs("pixel-99", "aarch64-linux-android").unwrap_err();
        assert!(err.contains("snapdragon-865") && !err.contains("x86-64-v3"), "{err}");
        assert_eq!(default_costs("x86_64-unknown-linux-gnu", None).unwrap().name, "x86-64-v3");
        assert_eq!(default_costs("aarch64-linux-android", Some("raspberry-pi-5")).unwrap().name, "raspberry-pi-5");
    }
}
