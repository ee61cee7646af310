//! AArch64 phones and boards (NEON), as Linux (`aarch64-unknown-linux-gnu`) or Android
//! (`aarch64-linux-android`) ELF objects.
//!
//! A [`DeviceProfile`] says what the device has: big and little cores, the optional ISA
//! extensions Cranelift can use (`dotprod`, `fp16`, `i8mm`) and cache sizes (bandwidth,
//! compute and energy are in [`crate::devices`]). Kernel choices read it; extensions a device lacks are never enabled, because
//! their instructions fault there (SDOT raises SIGILL on a Cortex-A53).
//!
//! kiln's quantized matmuls multiply int16 activations: the int16 dot product lowers to
//! `smull` + `smull2` + `addp` on every AArch64 core. `sdot` (dotprod) multiplies int8 only,
//! so it would need int8 activations, whose rounding costs the accuracy kiln keeps.

use cranelift_codegen::ir::Value;
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::Configurable;
use cranelift_frontend::FunctionBuilder;

use crate::{CacheInfo, MatmulSchedule, Target, TargetError, TargetSummary};

/// What kiln knows about one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceProfile {
    pub name: &'static str,
    pub description: &'static str,
    pub big_cores: u32,
    pub little_cores: u32,
    pub dotprod: bool,
    pub fp16: bool,
    pub i8mm: bool,
    pub cache: CacheInfo,
}

/// The device profiles kiln ships.
pub const DEVICES: &[DeviceProfile] = &[
    DeviceProfile {
        name: "snapdragon-865",
        description: "Snapdragon 865 class phone: 1+3 Cortex-A77, 4 Cortex-A55, LPDDR5",
        big_cores: 4,
        little_cores: 4,
        dotprod: true,
        fp16: true,
        i8mm: false,
        cache: CacheInfo { l1d: 64 << 10, l2: 512 << 10, l3: 4 << 20 },
    },
    DeviceProfile {
        name: "raspberry-pi-5",
        description: "Raspberry Pi 5 class board: 4 Cortex-A76, LPDDR4X",
        big_cores: 4,
        little_cores: 0,
        dotprod: true,
        fp16: true,
        i8mm: false,
        cache: CacheInfo { l1d: 64 << 10, l2: 512 << 10, l3: 2 << 20 },
    },
    DeviceProfile {
        name: "generic-armv8.0",
        description: "any ARMv8.0-A core (Cortex-A53 and up): NEON only",
        big_cores: 4,
        little_cores: 0,
        dotprod: false,
        fp16: false,
        i8mm: false,
        cache: CacheInfo { l1d: 32 << 10, l2: 256 << 10, l3: 0 },
    },
];

/// The default device when none is given.
pub const DEFAULT_DEVICE: &str = "generic-armv8.0";

/// An AArch64 target for one device.
pub struct Aarch64 {
    triple: &'static str,
    device: &'static DeviceProfile,
}

impl Aarch64 {
    pub fn new(triple: &'static str, device: Option<&str>) -> Result<Self, TargetError> {
        let name = device.unwrap_or(DEFAULT_DEVICE);
        let device = DEVICES.iter().find(|d| d.name == name).ok_or_else(|| TargetError::UnknownDevice {
            device: name.to_string(),
            triple: triple.to_string(),
            known: DEVICES.iter().map(|d| d.name.to_string()).collect(),
        })?;
        Ok(Aarch64 { triple, device })
    }

    pub fn device(&self) -> &DeviceProfile {
        self.device
    }

    fn features(&self) -> Vec<&'static str> {
        let d = self.device;
        [("has_dotprod", d.dotprod), ("has_fp16", d.fp16), ("has_i8mm", d.i8mm)]
            .into_iter()
            .filter_map(|(f, on)| on.then_some(f))
            .collect()
    }
}

impl Target for Aarch64 {
    fn triple(&self) -> &str {
        self.triple
    }

    fn isa(&self) -> Result<OwnedTargetIsa, TargetError> {
        let err = |e: &dyn std::fmt::Display| TargetError::Cranelift { message: e.to_string() };
        // Cranelift generates the same code for Linux and Android (AAPCS64, ELF).
        let mut b = isa::lookup_by_name("aarch64-unknown-linux-gnu").map_err(|e| err(&e))?;
        for f in self.features() {
            b.enable(f).map_err(|e| err(&e))?;
        }
        b.finish(crate::x86_64::shared_flags()).map_err(|e| err(&e))
    }

    fn summary(&self) -> TargetSummary {
        let mut isa_features = vec!["neon".to_string()];
        isa_features.extend(self.features().iter().map(|f| f.trim_start_matches("has_").to_string()));
        TargetSummary {
            triple: self.triple.to_string(),
            cpu: format!("{} ({})", self.device.name, self.device.description),
            isa_features,
            vector_bits: 128,
            default_threads: self.device.big_cores,
            cache: self.device.cache,
        }
    }

    fn matmul_schedule(&self) -> MatmulSchedule {
        MatmulSchedule { row_interleave: 4, micro_rows: None }
    }

    fn dot_i16x8(&self, builder: &mut FunctionBuilder, a: Value, b: Value) -> Value {
        // Cranelift matches this tree to `smull + smull2 + addp`.
        crate::widening_dot_i16x8(builder, a, b)
    }
}
