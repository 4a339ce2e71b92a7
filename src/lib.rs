//! Root package: hosts the cross-crate tests and benches.
