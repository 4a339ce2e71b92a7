//! The installer (in progress).
pub struct Installer;
pub struct InstallerOptions;
