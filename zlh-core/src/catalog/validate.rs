//! Full validation of a parsed catalog (filled in by the catalog work).
