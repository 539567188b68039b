//! CNI version comparisons: which spec features a network's version has.

/// `major.minor.patch` as numbers; missing or unreadable parts count as 0.
fn parse(version: &str) -> (u32, u32, u32) {
    let mut parts = version
        .split('.')
        .map(|part| part.trim().parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Whether `version` is `minimum` or newer.
pub fn at_least(version: &str, minimum: &str) -> bool {
    parse(version) >= parse(minimum)
}

/// DEL gets `prevResult` and CHECK exists from 0.4.0 on.
pub fn has_prev_result_on_del(version: &str) -> bool {
    at_least(version, "0.4.0")
}

/// Chained plugins (conflists, `prevResult` on ADD) exist from 0.3.0 on.
pub fn has_chaining(version: &str) -> bool {
    at_least(version, "0.3.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number_not_text() {
        assert!(at_least("1.0.0", "0.4.0"));
        assert!(at_least("0.10.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(has_prev_result_on_del("0.4.0"));
        assert!(!has_prev_result_on_del("0.3.1"));
        assert!(has_chaining("0.3.0"));
        assert!(!has_chaining("0.2.0"));
        assert!(!has_chaining(""));
    }
}
