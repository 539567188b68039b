//! Image references as Kubernetes writes them, normalized the way Docker does.

use oci_client::Reference;

use crate::error::ReferenceError;

/// Normalizes a reference: `busybox` → `docker.io/library/busybox:latest`,
/// `registry:5000/ns/app` → `registry:5000/ns/app:latest`, digests kept as `name@sha256:…`.
pub fn normalize_reference(r: &str) -> Result<String, ReferenceError> {
    Ok(parse_reference(r)?.whole())
}

pub(crate) fn parse_reference(r: &str) -> Result<Reference, ReferenceError> {
    let invalid = |reason: &str| ReferenceError::Invalid {
        reference: r.to_string(),
        reason: reason.to_string(),
    };
    // Checked by hand rather than with `Reference::try_from`: its regex takes
    // ~80 ms to compile, paid by every `vmrun run`, more than a container start.
    let Parts { name, tag, digest } = split_reference(r).map_err(invalid)?;
    let (registry, repository) = split_domain(name);
    // Docker refuses an uppercase repository even where the grammar lets an
    // uppercase first component through as a (non-)domain; so do we.
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid("repository name must be lowercase"));
    }
    if repository.len() > NAME_MAX {
        return Err(invalid("repository name is longer than 255 characters"));
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

const NAME_MAX: usize = 255;

struct Parts<'a> {
    name: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

/// Splits and checks `name[:tag][@digest]` by the distribution reference grammar.
fn split_reference(r: &str) -> Result<Parts<'_>, &'static str> {
    if r.is_empty() {
        return Err("empty reference");
    }
    let (rest, digest) = match r.split_once('@') {
        Some((rest, digest)) => (rest, Some(check_digest(digest)?)),
        None => (r, None),
    };
    // A tag's colon comes after the last slash; a colon before it is a port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => {
            let (name, tag) = (&rest[..last_slash + i], &rest[last_slash + i + 1..]);
            (name, Some(check_tag(tag)?))
        }
        None => (rest, None),
    };
    let mut components = name.split('/');
    let first = components.next().unwrap_or_default();
    let has_more = name.contains('/');
    if !(is_path_component(first) || has_more && is_domain(first)) {
        return Err("invalid repository name");
    }
    if !components.all(is_path_component) {
        return Err("invalid repository name");
    }
    Ok(Parts { name, tag, digest })
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn is_path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Dot-separated labels of letters, digits and inner hyphens, then an optional `:port`.
fn is_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (d, None),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    host.split('.').all(label_ok)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn check_tag(tag: &str) -> Result<&str, &'static str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    match tag.as_bytes() {
        [first, rest @ ..]
            if word(*first)
                && rest.len() <= 127
                && rest.iter().all(|&b| word(b) || b == b'.' || b == b'-') =>
        {
            Ok(tag)
        }
        _ => Err("invalid tag"),
    }
}

/// `algorithm:hex`, with the hex length the algorithm demands.
fn check_digest(digest: &str) -> Result<&str, &'static str> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or("invalid checksum digest format")?;
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("invalid checksum digest length");
    }
    Ok(digest)
}

/// Docker's rule: the first component is a registry only if it looks like a
/// host (has a dot or a port, or is `localhost`); Docker Hub names get `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (domain, rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let rest = if domain == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest.to_string()
    };
    (domain.to_string(), rest)
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
            ("test.com:5000", "docker.io/library/test.com:5000"),
            ("foo/foo_bar.com:8080", "docker.io/foo/foo_bar.com:8080"),
            ("a/b__c---d.e/f", "docker.io/a/b__c---d.e/f:latest"),
            ("My-Registry.lan:5000/ns/app:v1.2_3", "My-Registry.lan:5000/ns/app:v1.2_3"),
            ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest"),
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
        for bad in [
            "",
            "UPPER/case",
            "a@sha256:abc",
            "has space",
            "x:",
            "a//b",
            "-a/b",
            "a/b-",
            "a/b:-tag",
            "host:port/x",
            "a@md5:0000",
            "a/.b",
            "x@sha256:zz00000000000000000000000000000000000000000000000000000000000000",
        ] {
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
