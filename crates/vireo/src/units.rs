//! Parsers of command-line values the subcommands share. A leaf.

/// A size in bytes with an optional suffix k, m or g (powers of 1024). A size that does
/// not fit in 64 bits (or this machine's address space) is an error, never a wrapped
/// value.
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let (num, mult, unit): (&str, u64, &str) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10, "KiB"),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20, "MiB"),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30, "GiB"),
        _ => (s, 1, "bytes"),
    };
    let too_large = || {
        format!(
            "size {s:?} is too large: at most {} {unit} ({} bytes)",
            usize::MAX as u64 / mult,
            usize::MAX
        )
    };
    let n = num.parse::<u64>().map_err(|e| {
        if *e.kind() == std::num::IntErrorKind::PosOverflow {
            too_large()
        } else {
            format!("invalid size {s:?} (a number of bytes, or with k, m or g): {e}")
        }
    })?;
    n.checked_mul(mult)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(too_large)
}

/// [`parse_size`], for a value that must fit in 32 bits (a virtio `u32` field).
pub fn parse_size_u32(s: &str) -> std::result::Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| {
        format!(
            "size {:?} is too large: at most {} bytes (4g - 1)",
            s.trim(),
            u32::MAX
        )
    })
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
        assert_eq!(parse_size("16g").unwrap(), 16 << 30);
    }

    #[test]
    fn sizes_that_do_not_fit_are_errors_not_wrapped() {
        // 2^34 + 1 GiB is 2^64 + 2^30 bytes: it used to wrap to 1 GiB; 2^34 GiB to 0.
        for s in [
            "17179869185g",
            "17179869184g",
            "18014398509481984k",
            "18446744073709551616",
        ] {
            let e = parse_size(s).map(|n| n.to_string()).unwrap_err();
            assert!(e.contains("is too large: at most"), "{s}: {e}");
            assert!(e.contains(s), "{s}: {e}");
        }
        assert_eq!(
            parse_size("17179869183g").unwrap() as u64,
            17179869183u64 << 30
        );
        assert!(parse_size("-1").is_err());
        assert_eq!(parse_size_u32("4095m").unwrap(), 4095 << 20);
        let e = parse_size_u32("4g").unwrap_err();
        assert!(e.contains("at most 4294967295 bytes"), "{e}");
    }
}
