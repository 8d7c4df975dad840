//! The fuzz targets, by what they take in.

pub mod acpi;
pub mod pci;
pub mod qmp;
pub mod text;
pub mod virtq;
