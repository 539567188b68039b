//! The error a failing plugin prints on stdout: `{code, msg, details}`.

use serde::Deserialize;

/// A plugin's own account of why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PluginError {
    /// 1-99 are defined by the spec (e.g. 7 invalid network config, 11 try
    /// again later); 100 and up are plugin specific.
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl PluginError {
    /// Reads the error JSON; `None` when the output is not one, so that the
    /// caller can fall back to stderr.
    pub fn parse(stdout: &[u8]) -> Option<Self> {
        let error: PluginError = serde_json::from_slice(stdout).ok()?;
        (error.code != 0 || !error.msg.is_empty()).then_some(error)
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}
