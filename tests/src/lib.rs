//! End-to-end test helpers: the probe guest on the local KVM, real Linux on the test ground.
#![forbid(unsafe_code)]

pub mod ground;
pub mod probe;
pub mod qmp;
pub mod shim;
pub mod tmpfs;
