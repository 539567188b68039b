//! Reading what `kubectl apply -f` takes: one or more YAML documents with
//! ConfigMaps and Secrets and exactly one Pod.
//!
//! Errors name the document and the field (`spec.containers[0].ports[0].containerPort`),
//! because a user fixing a manifest needs the place, not a serde dump. Unknown fields
//! are refused like `kubectl apply` (strict field validation) does, so a typo such as
//! `imagee:` is never silently ignored.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest manifest read, in bytes. The Kubernetes API server takes requests of at most
/// 3 MiB; a file may hold several objects.
pub const MAX_MANIFEST_BYTES: usize = 8 << 20;

/// How many YAML nodes (scalars, sequences, mappings) a manifest may hold once its aliases
/// are expanded, and how many bytes of scalars. A pod manifest has a few thousand nodes;
/// a "billion laughs" document of a few KiB expands to billions.
pub const MAX_YAML_NODES: usize = 200_000;
pub const MAX_YAML_SCALAR_BYTES: usize = 2 * MAX_MANIFEST_BYTES;

/// How deep flow collections (`[...]`, `{...}`) may nest: serde_yaml refuses anything deeper
/// than 128 levels anyway, but only after libyaml has parsed it, which takes time quadratic in
/// the depth (a 1 MiB line of `[` would take hours).
pub const MAX_FLOW_DEPTH: usize = 128;

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
    #[error("{file}: the manifest is larger than {} MiB", limit >> 20)]
    TooLarge { file: String, limit: usize },
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
/// At most [`MAX_MANIFEST_BYTES`] are read, so a huge file (or `/dev/zero`) is refused
/// without filling memory.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let file = path.display().to_string();
    let read_err = |source| ManifestError::Read {
        file: file.clone(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    parse(&file, &text)
}

/// Parses manifest text; `file` only labels errors.
pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            file: file.to_string(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    if let Some(line) = flow_too_deep(text) {
        return Err(ManifestError::Yaml {
            file: file.to_string(),
            message: format!(
                "flow collections ([...] or {{...}}) nested more than {MAX_FLOW_DEPTH} deep at line {line}"
            ),
        });
    }
    let budget = YamlBudget {
        nodes: Cell::new(MAX_YAML_NODES),
        bytes: Cell::new(MAX_YAML_SCALAR_BYTES),
    };
    let mut pod: Option<Pod> = None;
    let mut config_maps = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    let mut kinds_seen = Vec::new();

    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = index + 1;
        let value =
            serde::de::DeserializeSeed::deserialize(Bounded(&budget), document).map_err(|e| {
                ManifestError::Yaml {
                    file: file.to_string(),
                    message: e.to_string(),
                }
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

/// The line (from 1) where flow collections open more than [`MAX_FLOW_DEPTH`] deep, counted
/// before libyaml sees the text. Brackets in quoted scalars and comments do not count; the
/// count errs only towards more depth (brackets in plain or block scalars, or a quote taken
/// for a plain character, count), so what it passes libyaml does not nest deeper.
fn flow_too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (index, line) in text.lines().enumerate() {
        let mut quote: Option<u8> = None;
        let mut escaped = false;
        // The last byte that was not a space: quotes open a scalar only after an indicator.
        let mut previous = b' ';
        let mut previous_solid = None;
        for &b in line.as_bytes() {
            match quote {
                Some(b'"') if escaped => escaped = false,
                Some(b'"') if b == b'\\' => escaped = true,
                Some(q) if b == q => quote = None,
                Some(_) => {}
                None => match b {
                    b'#' if previous == b' ' || previous == b'\t' => break,
                    b'\'' | b'"'
                        if matches!(
                            previous_solid,
                            None | Some(b'[' | b'{' | b',' | b':' | b'-' | b'?')
                        ) =>
                    {
                        quote = Some(b)
                    }
                    b'[' | b'{' => {
                        depth += 1;
                        if depth > MAX_FLOW_DEPTH {
                            return Some(index + 1);
                        }
                    }
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    _ => {}
                },
            }
            previous = b;
            if b != b' ' && b != b'\t' {
                previous_solid = Some(b);
            }
        }
    }
    None
}

/// What is left of the file's node and scalar byte allowances (all documents share them).
struct YamlBudget {
    nodes: Cell<usize>,
    bytes: Cell<usize>,
}

/// Deserializes a `serde_yaml::Value` as serde_yaml does, but fails as soon as the expanded
/// document exceeds the budget, before the expansion is in memory.
#[derive(Clone, Copy)]
struct Bounded<'a>(&'a YamlBudget);

impl Bounded<'_> {
    fn charge<E: serde::de::Error>(self, scalar_bytes: usize) -> Result<(), E> {
        let nodes = self.0.nodes.get();
        let bytes = self.0.bytes.get();
        if nodes == 0 {
            return Err(E::custom(format_args!(
                "more than {MAX_YAML_NODES} YAML nodes once aliases are expanded (an alias bomb?)"
            )));
        }
        if bytes < scalar_bytes {
            return Err(E::custom(format_args!(
                "more than {} MiB of YAML scalars once aliases are expanded (an alias bomb?)",
                MAX_YAML_SCALAR_BYTES >> 20
            )));
        }
        self.0.nodes.set(nodes - 1);
        self.0.bytes.set(bytes - scalar_bytes);
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Bounded<'_> {
    type Value = serde_yaml::Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Bounded<'_> {
    type Value = serde_yaml::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(serde_yaml::Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(serde_yaml::Value::Number(v.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(serde_yaml::Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(serde_yaml::Value::Number(v.into()))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.charge(v.len())?;
        Ok(serde_yaml::Value::String(v.to_string()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.charge(v.len())?;
        Ok(serde_yaml::Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(serde_yaml::Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.charge(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(serde_yaml::Value::Sequence(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.charge(0)?;
        let mut mapping = serde_yaml::Mapping::new();
        while let Some(key) = map.next_key_seed(self)? {
            if mapping.contains_key(&key) {
                let shown = match &key {
                    serde_yaml::Value::String(s) => format!("{s:?}"),
                    other => serde_yaml::to_string(other)
                        .map(|s| s.trim_end().to_string())
                        .unwrap_or_default(),
                };
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate entry with key {shown}"
                )));
            }
            let value = map.next_value_seed(self)?;
            mapping.insert(key, value);
        }
        Ok(serde_yaml::Value::Mapping(mapping))
    }

    /// A tagged node (`!Tag value`), as serde_yaml hands it over.
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        use serde::de::VariantAccess as _;
        let (tag, contents): (String, _) = data.variant()?;
        if tag.trim_start_matches('!').is_empty() {
            return Err(serde::de::Error::custom("empty YAML tag"));
        }
        self.charge(tag.len())?;
        let value = contents.newtype_variant_seed(self)?;
        Ok(serde_yaml::Value::Tagged(Box::new(
            serde_yaml::value::TaggedValue {
                tag: serde_yaml::value::Tag::new(tag),
                value,
            },
        )))
    }
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
    fn huge_manifests_are_refused_before_they_are_parsed() {
        // A file of 9 MiB and /dev/zero (which never ends): refused after 8 MiB + 1 byte.
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yaml");
        let filler = format!("# {}\n", "x".repeat(1021));
        std::fs::write(&big, POD.to_string() + &filler.repeat(9 * 1024)).unwrap();
        let err = load(&big).unwrap_err();
        assert!(matches!(err, ManifestError::TooLarge { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{}: the manifest is larger than 8 MiB", big.display())
        );
        // A file that never ends: 8 MiB + 1 byte of it is read, then it is refused.
        let err = load(Path::new("/dev/zero")).unwrap_err().to_string();
        assert_eq!(err, "/dev/zero: the manifest is larger than 8 MiB");
        // Just under the limit is read.
        let fits = POD.to_string() + &filler.repeat(7 * 1024);
        std::fs::write(&big, &fits).unwrap();
        load(&big).unwrap();
    }

    #[test]
    fn yaml_alias_bombs_are_refused() {
        // Billion laughs: nine levels of ten aliases each, 10^9 strings once expanded.
        let mut bomb =
            String::from("  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for level in 1..10 {
            let refs = vec![format!("*a{}", level - 1); 10].join(", ");
            bomb.push_str(&format!("  a{level}: &a{level} [{refs}]\n"));
        }
        let start = std::time::Instant::now();
        let err = parse("bomb.yaml", &(POD.to_string() + &bomb + "  x: *a9\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bomb.yaml: YAML error: "), "{err}");
        assert!(
            err.contains("repetition limit exceeded") || err.contains("alias bomb"),
            "{err}"
        );
        // Quadratic: one anchor of 20,000 scalars, aliased 20,000 times (4 * 10^8 nodes) in a
        // file of a few hundred KiB, within serde_yaml's own repetition limit.
        let wide = format!(
            "a: &a [{}]\nb: [{}]\n",
            vec!["x"; 20_000].join(","),
            vec!["*a"; 20_000].join(",")
        );
        let err = parse("wide.yaml", &wide).unwrap_err().to_string();
        assert!(err.starts_with("wide.yaml: YAML error: "), "{err}");
        assert!(
            err.contains(&format!(
                "more than {MAX_YAML_NODES} YAML nodes once aliases are expanded (an alias bomb?)"
            )),
            "{err}"
        );
        // A long string aliased many times: bytes, not nodes.
        let long = format!(
            "a: &a {}\nb: [{}]\n",
            "y".repeat(1 << 20),
            vec!["*a"; 100].join(",")
        );
        let err = parse("long.yaml", &long).unwrap_err().to_string();
        assert!(err.contains("MiB of YAML scalars"), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // Aliases used as intended still work.
        let fine = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: &l {app: web}\n  annotations: *l\nspec:\n  containers:\n  - name: c\n    image: busybox\n";
        let m = parse("t.yaml", fine).unwrap();
        assert_eq!(m.pod.metadata.annotations.unwrap()["app"], "web");
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        let start = std::time::Instant::now();
        // Flow collections a million deep (libyaml alone would take hours): refused first.
        for (open, close) in [("[", "]"), ("{a: ", "}")] {
            let deep = format!("x: {}1{}\n", open.repeat(1 << 20), close.repeat(1 << 20));
            let err = parse("deep.yaml", &deep).unwrap_err().to_string();
            assert_eq!(
                err,
                "deep.yaml: YAML error: flow collections ([...] or {...}) nested more than 128 deep at line 1"
            );
        }
        // Block collections: serde_yaml's recursion limit.
        let deep = format!("{}1\n", "- ".repeat(100_000));
        let err = parse("deep.yaml", &deep).unwrap_err().to_string();
        assert!(
            err.starts_with("deep.yaml: YAML error: recursion limit exceeded"),
            "{err}"
        );
        let deep = POD.to_string() + "    command: " + &"[".repeat(126) + &"]".repeat(126) + "\n";
        let err = parse("deep.yaml", &deep).unwrap_err().to_string();
        assert!(err.contains("recursion limit exceeded"), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // Brackets in quoted scalars and comments are text.
        let text = format!(
            "{POD}    args: ['{}', \"{}\\\"{}\"] # {}\n",
            "[".repeat(300),
            "{".repeat(300),
            "[".repeat(300),
            "[".repeat(300)
        );
        let args = parse("t.yaml", &text).unwrap().pod.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        assert_eq!(args[0], "[".repeat(300));
        assert_eq!(args[1], format!("{}\"{}", "{".repeat(300), "[".repeat(300)));
    }

    #[test]
    fn duplicate_keys_and_tags_read_as_before() {
        let err = parse(
            "t.yaml",
            &(POD.to_string() + "  hostname: a\n  hostname: b\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("duplicate entry with key \"hostname\""),
            "{err}"
        );
        let tagged = POD.replace("image: busybox", "image: !!str busybox");
        assert_eq!(
            parse("t.yaml", &tagged)
                .unwrap()
                .pod
                .spec
                .unwrap()
                .containers[0]
                .image
                .as_deref(),
            Some("busybox")
        );
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
        for (doc, want) in [
            ("kind: Pod2\n", "kind \"Pod2\" is not supported"),
            ("kind: 7\n", "missing `kind`"),
            ("apiVersion: v1\n", "missing `kind`"),
            ("- a\n- b\n", "expected a mapping with apiVersion and kind"),
        ] {
            let err = parse("t.yaml", &format!("{POD}---\n{doc}"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.yaml: document 2: "), "{err}");
            assert!(err.contains(want), "{err}");
        }
    }
}
