//! End-to-end test helpers: the probe guest on the local KVM, real Linux on the test ground.

pub mod ground;
pub mod probe;
