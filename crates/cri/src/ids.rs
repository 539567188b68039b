//! Sandbox and container ids: 64 lowercase hex digits, as containerd makes
//! them, so tools that shorten ids to 12 or 13 characters show them well.

use std::io::Read;

/// A fresh random id.
pub fn new_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Whether `id` has the shape of an id this server made; anything else
/// (paths, empty strings) never reaches the filesystem.
pub fn is_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The one id among `ids` that `given` names in full or as a unique
/// prefix (containerd accepts prefixes, and users type them into crictl).
pub fn resolve<'a>(given: &str, ids: impl Iterator<Item = &'a String>) -> Resolved<'a> {
    if given.is_empty() {
        return Resolved::None;
    }
    let mut found = None;
    for id in ids {
        if id == given {
            return Resolved::One(id);
        }
        if id.starts_with(given) {
            if found.is_some() {
                return Resolved::Ambiguous;
            }
            found = Some(id);
        }
    }
    found.map_or(Resolved::None, Resolved::One)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Resolved<'a> {
    One(&'a String),
    None,
    Ambiguous,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex_and_prefixes_resolve_when_unique() {
        let a = new_id().unwrap();
        assert!(is_id(&a), "{a}");
        assert!(!is_id("../etc"));
        let ids = ["abc1".to_string(), "abc2".to_string(), "def".to_string()];
        assert_eq!(resolve("def", ids.iter()), Resolved::One(&ids[2]));
        assert_eq!(resolve("abc1", ids.iter()), Resolved::One(&ids[0]));
        assert_eq!(resolve("ab", ids.iter()), Resolved::Ambiguous);
        assert_eq!(resolve("x", ids.iter()), Resolved::None);
        assert_eq!(resolve("", ids.iter()), Resolved::None);
    }
}
