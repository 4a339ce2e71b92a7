//! On-disk layout of an install root.
