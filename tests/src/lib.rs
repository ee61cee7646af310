//! Test support for kiln: the burn reference executor and helpers shared by the integration tests.

#![forbid(unsafe_code)]

pub mod harness;
pub mod reference;
