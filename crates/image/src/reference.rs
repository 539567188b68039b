//! Image references as Kubernetes writes them, normalized the way Docker does.

use oci_client::Reference;

use crate::error::ReferenceError;

/// Normalizes a reference: `busybox` → `docker.io/library/busybox:latest`,
/// `registry:5000/ns/app` → `registry:5000/ns/app:latest`, digests kept as `name@sha256:…`.
pub fn normalize_reference(r: &str) -> Result<String, ReferenceError> {
    Ok(parse_reference(r)?.whole())
}

pub(crate) fn parse_reference(r: &str) -> Result<Reference, ReferenceError> {
    let invalid = |reason: String| ReferenceError::Invalid {
        reference: r.to_string(),
        reason,
    };
    let parsed = Reference::try_from(r).map_err(|e| invalid(e.to_string()))?;
    // The grammar lets an uppercase first component through as a (non-)domain, which then
    // lands in the repository path; Docker refuses those and so do we.
    if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid("repository name must be lowercase".to_string()));
    }
    Ok(parsed)
}

/// Hosts always spoken to over plain HTTP (a registry on the local machine has no certificate).
pub(crate) fn is_local_registry(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        // `[::1]:5000` → `[::1]`; `localhost:5000` → `localhost`
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => registry,
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_kubernetes() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("me/app", "docker.io/me/app:latest"),
            ("registry:5000/ns/app:tag", "registry:5000/ns/app:tag"),
            ("localhost/app", "localhost/app:latest"),
            ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
            (
                "busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_reference(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "UPPER/case", "a@sha256:abc", "has space", "x:"] {
            let err = normalize_reference(bad).unwrap_err().to_string();
            assert!(err.contains("invalid image reference"), "{bad}: {err}");
        }
    }

    #[test]
    fn local_registries() {
        assert!(is_local_registry("localhost:5000"));
        assert!(is_local_registry("127.0.0.1:41234"));
        assert!(is_local_registry("[::1]:5000"));
        assert!(is_local_registry("localhost"));
        assert!(!is_local_registry("registry.lan:5000"));
        assert!(!is_local_registry("127.0.0.2:5000"));
    }
}
