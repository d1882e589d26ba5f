//! A pod's configuration: the settings `register` stores, and where they come from —
//! command-line options and a mesh's annotations (presets).

#[cfg(feature = "cli")]
pub(crate) mod options;
pub(crate) mod presets;
pub(crate) mod settings;
