//! Test support for kiln: the burn reference executor and helpers shared by the integration tests.

pub mod harness;
pub mod reference;
