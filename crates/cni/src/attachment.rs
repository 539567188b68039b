//! Which container, namespace and interface one ADD/DEL/CHECK is about.

use std::path::PathBuf;

use crate::runtime_config::RuntimeConfig;

/// One network attachment of a pod sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    /// The sandbox id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// The pinned network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The interface name inside it (`CNI_IFNAME`), usually `eth0`.
    pub ifname: String,
    /// `CNI_ARGS` pairs, e.g. `K8S_POD_NAMESPACE`, `K8S_POD_NAME`.
    pub args: Vec<(String, String)>,
    pub runtime_config: RuntimeConfig,
}

impl Attachment {
    /// An attachment with no CNI_ARGS and no runtime configuration.
    pub fn new(
        container_id: impl Into<String>,
        netns: impl Into<PathBuf>,
        ifname: impl Into<String>,
    ) -> Self {
        Attachment {
            container_id: container_id.into(),
            netns: netns.into(),
            ifname: ifname.into(),
            args: Vec::new(),
            runtime_config: RuntimeConfig::default(),
        }
    }

    /// The CNI_ARGS containerd passes for a Kubernetes pod. `IgnoreUnknown`
    /// keeps plugins that don't know the K8S_ keys from failing.
    pub fn with_kubernetes_args(mut self, namespace: &str, name: &str, uid: &str) -> Self {
        let id = self.container_id.clone();
        self.args = vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), namespace.into()),
            ("K8S_POD_NAME".into(), name.into()),
            ("K8S_POD_INFRA_CONTAINER_ID".into(), id),
            ("K8S_POD_UID".into(), uid.into()),
        ];
        self
    }
}

/// A value CNI_ARGS cannot carry.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("CNI_ARGS key {0:?} is empty or contains '=' or ';'")]
    BadKey(String),
    #[error("CNI_ARGS value {value:?} of {key} contains ';'")]
    BadValue { key: String, value: String },
}

/// `K=V;K=V`, refusing what would be read back as other pairs.
pub fn format_cni_args(args: &[(String, String)]) -> Result<String, ArgsError> {
    let mut parts = Vec::with_capacity(args.len());
    for (key, value) in args {
        if key.is_empty() || key.contains(['=', ';']) {
            return Err(ArgsError::BadKey(key.clone()));
        }
        if value.contains(';') {
            return Err(ArgsError::BadValue {
                key: key.clone(),
                value: value.clone(),
            });
        }
        parts.push(format!("{key}={value}"));
    }
    Ok(parts.join(";"))
}

/// Whether `value` can be used as one component of a cache file name.
pub(crate) fn is_path_component(value: &str) -> bool {
    !value.is_empty()
        && !value.contains('/')
        && value != "."
        && value != ".."
        && !value.contains('\0')
}
