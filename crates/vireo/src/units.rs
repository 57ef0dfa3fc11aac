//! Parsers of command-line values the subcommands share. A leaf.

/// A size in bytes with an optional suffix k, m or g (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1024),
        Some('m' | 'M') => (&s[..s.len() - 1], 1024 * 1024),
        Some('g' | 'G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .map_err(|e| format!("invalid size {s:?}: {e}"))
}

/// A limit that may be absent: a number, or `unlimited` (`u32::MAX`, which the VPD
/// Block Limits page reads as "no limit").
pub fn parse_limit(s: &str) -> std::result::Result<u32, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(u32::MAX);
    }
    s.parse::<u32>()
        .map_err(|e| format!("invalid limit {s:?} (a number or `unlimited`): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit("unlimited").unwrap(), u32::MAX);
        assert_eq!(parse_limit("4294967295").unwrap(), u32::MAX);
        assert_eq!(parse_limit("8").unwrap(), 8);
        assert!(parse_limit("-1").is_err());
        assert!(parse_limit("lots").is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert!(parse_size("abc").is_err());
    }
}
