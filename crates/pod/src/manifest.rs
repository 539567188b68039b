//! Reading what `kubectl apply -f` takes: one or more YAML documents with
//! ConfigMaps and Secrets and exactly one Pod.
//!
//! Errors name the document and the field (`spec.containers[0].ports[0].containerPort`),
//! because a user fixing a manifest needs the place, not a serde dump. Unknown fields
//! are refused like `kubectl apply` (strict field validation) does, so a typo such as
//! `imagee:` is never silently ignored.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Everything one manifest file holds.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub pod: Pod,
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: YAML error: {message}")]
    Yaml { file: String, message: String },
    #[error("{file}: document {doc}: {message}")]
    Document {
        file: String,
        doc: usize,
        message: String,
    },
    #[error("{file}: {kind} {name:?}: field {path}: {message}")]
    Field {
        file: String,
        kind: String,
        name: String,
        path: String,
        message: String,
    },
    #[error("{file}: no Pod in the manifest (found: {found})")]
    NoPod { file: String, found: String },
    #[error(
        "{file}: more than one Pod ({first:?} and {second:?}); vmrun runs one pod per manifest"
    )]
    TwoPods {
        file: String,
        first: String,
        second: String,
    },
}

/// Reads and parses a manifest file.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&file, &text)
}

/// Parses manifest text; `file` only labels errors.
pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestError> {
    let mut pod: Option<Pod> = None;
    let mut config_maps = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    let mut kinds_seen = Vec::new();

    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = index + 1;
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(document).map_err(|e| ManifestError::Yaml {
                file: file.to_string(),
                message: e.to_string(),
            })?;
        if value.is_null() {
            continue; // an empty document between `---` separators
        }
        let doc_err = |message: String| ManifestError::Document {
            file: file.to_string(),
            doc,
            message,
        };
        let mapping = value
            .as_mapping()
            .ok_or_else(|| doc_err("expected a mapping with apiVersion and kind".into()))?;
        let kind = mapping
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| doc_err("missing `kind`".into()))?
            .to_string();
        let name = mapping
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        kinds_seen.push(kind.clone());
        let mut value = value;
        octal_file_modes(&mut value);
        match kind.as_str() {
            "Pod" => {
                let parsed: Pod = typed(file, &kind, &name, value)?;
                if let Some(first) = &pod {
                    return Err(ManifestError::TwoPods {
                        file: file.to_string(),
                        first: first.metadata.name.clone().unwrap_or_default(),
                        second: name,
                    });
                }
                pod = Some(parsed);
            }
            "ConfigMap" => {
                let parsed: ConfigMap = typed(file, &kind, &name, value)?;
                config_maps.insert(require_name(file, doc, &kind, &name)?, parsed);
            }
            "Secret" => {
                let parsed: Secret = typed(file, &kind, &name, value)?;
                secrets.insert(require_name(file, doc, &kind, &name)?, parsed);
            }
            other => {
                return Err(doc_err(format!(
                "kind {other:?} is not supported (vmrun takes a Pod plus ConfigMaps and Secrets)"
            )))
            }
        }
    }
    let pod = pod.ok_or_else(|| ManifestError::NoPod {
        file: file.to_string(),
        found: if kinds_seen.is_empty() {
            "nothing".into()
        } else {
            kinds_seen.join(", ")
        },
    })?;
    Ok(Manifest {
        pod,
        config_maps,
        secrets,
    })
}

/// Kubernetes reads manifests as YAML 1.1, where `defaultMode: 0400` is the
/// octal 256; serde_yaml follows YAML 1.2 and hands back the string "0400".
/// File modes are the only integer fields written in octal, so those keys
/// (`mode`, `defaultMode`) get YAML 1.1's reading back.
fn octal_file_modes(value: &mut serde_yaml::Value) {
    use serde_yaml::Value;
    match value {
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let is_mode = matches!(key.as_str(), Some("mode" | "defaultMode"));
                let octal = match item {
                    Value::String(s) if is_mode => yaml11_octal(s),
                    _ => None,
                };
                match octal {
                    Some(n) => *item = Value::Number(n.into()),
                    None => octal_file_modes(item),
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(octal_file_modes),
        _ => {}
    }
}

/// `0[0-7]+` as YAML 1.1 reads it.
fn yaml11_octal(s: &str) -> Option<u64> {
    let digits = s.strip_prefix('0').filter(|d| !d.is_empty())?;
    u64::from_str_radix(digits, 8).ok()
}

fn require_name(file: &str, doc: usize, kind: &str, name: &str) -> Result<String, ManifestError> {
    if name.is_empty() {
        return Err(ManifestError::Document {
            file: file.to_string(),
            doc,
            message: format!("{kind} without metadata.name"),
        });
    }
    Ok(name.to_string())
}

/// Deserializes into a k8s-openapi type, naming the field path on error, then
/// refuses fields the type does not know.
fn typed<T: DeserializeOwned + Serialize>(
    file: &str,
    kind: &str,
    name: &str,
    value: serde_yaml::Value,
) -> Result<T, ManifestError> {
    let field_err = |path: String, message: String| ManifestError::Field {
        file: file.to_string(),
        kind: kind.to_string(),
        name: name.to_string(),
        path,
        message,
    };
    let parsed: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        field_err(path, e.into_inner().to_string())
    })?;
    // What the type kept, serialized back: any input key missing there was unknown.
    let kept = serde_yaml::to_value(&parsed)
        .map_err(|e| field_err(".".into(), format!("cannot re-encode: {e}")))?;
    if let Some(path) = first_unknown_field(&value, &kept, String::new()) {
        return Err(field_err(path, "unknown field".into()));
    }
    Ok(parsed)
}

/// Walks the input beside its typed re-encoding and returns the path of the first
/// key the typed form dropped. Null inputs are skipped: k8s-openapi drops them too.
fn first_unknown_field(
    input: &serde_yaml::Value,
    kept: &serde_yaml::Value,
    path: String,
) -> Option<String> {
    use serde_yaml::Value;
    match (input, kept) {
        (Value::Mapping(input), Value::Mapping(kept)) => {
            for (key, value) in input {
                let key_text = key
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{key:?}"));
                let child = if path.is_empty() {
                    key_text.clone()
                } else {
                    format!("{path}.{key_text}")
                };
                match kept.get(key) {
                    Some(kept_value) => {
                        if let Some(found) = first_unknown_field(value, kept_value, child) {
                            return Some(found);
                        }
                    }
                    None if is_empty(value) => {}
                    None => return Some(child),
                }
            }
            None
        }
        (Value::Sequence(input), Value::Sequence(kept)) => input
            .iter()
            .zip(kept)
            .enumerate()
            .find_map(|(i, (a, b))| first_unknown_field(a, b, format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Values that k8s-openapi omits when re-encoding although they were given.
fn is_empty(value: &serde_yaml::Value) -> bool {
    match value {
        serde_yaml::Value::Null => true,
        serde_yaml::Value::Mapping(m) => m.values().all(is_empty),
        serde_yaml::Value::Sequence(s) => s.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: c\n    image: busybox\n";

    #[test]
    fn parses_pod_with_config_objects() {
        let text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\ndata:\n  k: v\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  pw: aHVudGVyMg==\n---\n{POD}"
        );
        let m = parse("t.yaml", &text).unwrap();
        assert_eq!(m.pod.metadata.name.as_deref(), Some("web"));
        assert_eq!(m.config_maps["cm"].data.as_ref().unwrap()["k"], "v");
        assert_eq!(m.secrets["s"].data.as_ref().unwrap()["pw"].0, b"hunter2");
    }

    #[test]
    fn file_modes_in_octal_read_as_kubernetes_does() {
        let text = POD.to_string()
            + "  volumes:\n  - name: s\n    secret:\n      secretName: s\n      defaultMode: 0400\n      items:\n      - key: a\n        path: a\n        mode: 0644\n  - name: d\n    configMap:\n      name: d\n      defaultMode: 420\n";
        let m = parse("t.yaml", &text).unwrap();
        let volumes = m.pod.spec.unwrap().volumes.unwrap();
        let secret = volumes[0].secret.as_ref().unwrap();
        assert_eq!(secret.default_mode, Some(0o400));
        assert_eq!(secret.items.as_ref().unwrap()[0].mode, Some(0o644));
        assert_eq!(
            volumes[1].config_map.as_ref().unwrap().default_mode,
            Some(420)
        );
        // Not octal: still a type error naming the field.
        let bad = POD.to_string()
            + "  volumes:\n  - name: s\n    secret:\n      secretName: s\n      defaultMode: 0999\n";
        let err = parse("t.yaml", &bad).unwrap_err().to_string();
        assert!(err.contains("spec.volumes[0].secret.defaultMode"), "{err}");
    }

    #[test]
    fn names_the_field_with_a_wrong_type() {
        let text = POD.to_string() + "    ports:\n    - containerPort: eighty\n";
        let err = parse("t.yaml", &text).unwrap_err().to_string();
        assert!(
            err.contains("spec.containers[0].ports[0].containerPort"),
            "{err}"
        );
    }

    #[test]
    fn refuses_unknown_fields() {
        let text = POD.replace("image:", "imagee:");
        let err = parse("t.yaml", &text).unwrap_err().to_string();
        assert!(err.contains("spec.containers[0].imagee"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn yaml_syntax_error_has_a_location() {
        let err = parse("t.yaml", "kind: Pod\n  metadata: [\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.yaml: YAML error"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn needs_exactly_one_pod() {
        let err = parse(
            "t.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no Pod"), "{err}");
        let err = parse("t.yaml", &format!("{POD}---\n{POD}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than one Pod"), "{err}");
        let err = parse(
            "t.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: a\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"Deployment\" is not supported"), "{err}");
    }
}
