//! CRI's list filters, applied where the pods are: by each owner to its
//! own pod, and by the daemon to pods it serves from their files.

use std::collections::HashMap;

use crate::api;

pub fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a sandbox passes ListPodSandbox's filter (ids match by prefix).
pub fn sandbox_matches(s: &api::PodSandbox, f: &api::PodSandboxFilter) -> bool {
    (f.id.is_empty() || s.id.starts_with(&f.id))
        && f.state.as_ref().is_none_or(|st| st.state == s.state)
        && labels_match(&s.labels, &f.label_selector)
}
