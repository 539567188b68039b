//! Kubernetes resource quantities (`64Mi`, `1G`, `500m`, `0.5`, `1e3`).

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid quantity {0:?} (expected e.g. 128Mi, 1G, 500m, 0.5)")]
pub struct QuantityError(pub String);

/// Parses a quantity into thousandths of a unit, so `500m` CPU and `1.5Gi` bytes
/// both stay exact integers.
pub fn parse_milli(text: &str) -> Result<u128, QuantityError> {
    let bad = || QuantityError(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if frac_part.len() > 9 || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(bad());
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| bad())?
    };
    let frac_digits = frac_part.len() as u32;
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        frac_part.parse().map_err(|_| bad())?
    };
    // value = (int * 10^d + frac) / 10^d ; kept as nano-units to stay exact.
    let scale = 10u128.pow(frac_digits);
    let nanos = (int * scale + frac) * 10u128.pow(9 - frac_digits);
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().map_err(|_| bad())?;
            if exp > 18 {
                return Err(bad());
            }
            (10u128.pow(exp), 1)
        }
        _ => return Err(bad()),
    };
    let milli = nanos.checked_mul(mul).ok_or_else(bad)? / div / 1_000_000;
    Ok(milli)
}

/// Bytes from a memory quantity; fractions of a byte round up, as the API server does.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let milli = parse_milli(text)?;
    u64::try_from(milli.div_ceil(1000)).map_err(|_| QuantityError(text.to_string()))
}

/// Millicores from a CPU quantity.
pub fn parse_millicpu(text: &str) -> Result<u64, QuantityError> {
    u64::try_from(parse_milli(text)?).map_err(|_| QuantityError(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_bytes("64Mi"), Ok(64 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("128974848"), Ok(128_974_848));
        assert_eq!(parse_bytes("129e6"), Ok(129_000_000));
        assert_eq!(parse_bytes("1k"), Ok(1000));
    }

    #[test]
    fn cpu_units() {
        assert_eq!(parse_millicpu("500m"), Ok(500));
        assert_eq!(parse_millicpu("0.25"), Ok(250));
        assert_eq!(parse_millicpu("2"), Ok(2000));
        assert_eq!(parse_millicpu(".1"), Ok(100));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "Mi", "12Q", "1.2.3", "-1", "1e99", "abc"] {
            assert!(parse_milli(bad).is_err(), "{bad:?} accepted");
        }
    }
}
