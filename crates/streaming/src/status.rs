//! The outcome of an exec/attach as reported on the error stream: a
//! metav1.Status JSON document for protocol v4 and later, the bare error
//! message (nothing on success) before that.

use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    ExitCode { cmd: Vec<String>, code: i32 },
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusFormat {
    /// v4.channel.k8s.io and later.
    Json,
    /// channel.k8s.io, v2 and v3: the error text, empty on success.
    Text,
}

impl Outcome {
    fn message(&self) -> String {
        match self {
            Outcome::Success => String::new(),
            // Same wording as kubelet, which wraps the runtime's exit error.
            Outcome::ExitCode { cmd, code } => format!(
                "command terminated with non-zero exit code: command '{}' exited with {code}",
                cmd.join(" ")
            ),
            Outcome::Error(e) => e.clone(),
        }
    }

    /// The bytes to write on the error stream; empty means write nothing.
    pub(crate) fn encode(&self, format: StatusFormat) -> Vec<u8> {
        if format == StatusFormat::Text {
            return self.message().into_bytes();
        }
        let doc = match self {
            Outcome::Success => json!({"metadata": {}, "status": "Success"}),
            Outcome::ExitCode { code, .. } => json!({
                "metadata": {},
                "status": "Failure",
                "message": self.message(),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Error(_) => json!({
                "metadata": {},
                "status": "Failure",
                "message": self.message(),
                "reason": "InternalError",
                "code": 500,
            }),
        };
        doc.to_string().into_bytes()
    }
}
