//! Bounds-checked big-endian field access shared by the parsers and encoders.
//!
//! Every read returns `None` instead of panicking when the field lies outside
//! the buffer, so parsers turn a missing field into a typed error.

use crate::error::ParseError;

/// The first `N` bytes of `buf` as an array, or [`ParseError::TooShort`].
pub(crate) fn head<'a, const N: usize>(
    buf: &'a [u8],
    what: &'static str,
) -> Result<&'a [u8; N], ParseError> {
    buf.first_chunk::<N>().ok_or(ParseError::TooShort {
        what,
        need: N,
        got: buf.len(),
    })
}

/// `N` bytes at `off`, if they are all inside `buf`.
pub(crate) fn array_at<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Big-endian u16 at `off`.
pub(crate) fn be16_at(buf: &[u8], off: usize) -> Option<u16> {
    array_at(buf, off).map(u16::from_be_bytes)
}

/// Big-endian u32 at `off`.
pub(crate) fn be32_at(buf: &[u8], off: usize) -> Option<u32> {
    array_at(buf, off).map(u32::from_be_bytes)
}

/// Big-endian u64 at `off`.
pub(crate) fn be64_at(buf: &[u8], off: usize) -> Option<u64> {
    array_at(buf, off).map(u64::from_be_bytes)
}

/// Big-endian u16 from two bytes.
pub(crate) fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

/// Big-endian u32 from four bytes.
pub(crate) fn be32(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// Copies `src` into `dst` at `off`; false (and nothing written) if it does not fit.
pub(crate) fn put(dst: &mut [u8], off: usize, src: &[u8]) -> bool {
    match off
        .checked_add(src.len())
        .and_then(|end| dst.get_mut(off..end))
    {
        Some(d) => {
            d.copy_from_slice(src);
            true
        }
        None => false,
    }
}

/// Turns a fixed-width space-padded text field into a trimmed string.
///
/// Leading and trailing spaces and NULs are dropped; any byte outside
/// printable ASCII becomes `?`, so the result is always printable ASCII and
/// never longer than the field.
pub(crate) fn text(field: &[u8]) -> String {
    let pad = |b: &u8| *b == b' ' || *b == 0;
    let start = field.iter().position(|b| !pad(b)).unwrap_or(field.len());
    let end = field.iter().rposition(|b| !pad(b)).map_or(start, |e| e + 1);
    field
        .get(start..end)
        .unwrap_or(&[])
        .iter()
        .map(|&b| {
            if (0x20..=0x7e).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// Checks that `s` is printable ASCII of at most `max` bytes.
pub(crate) fn check_text(
    s: &str,
    max: usize,
    what: &'static str,
) -> Result<(), crate::error::EncodeError> {
    if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(crate::error::EncodeError::NotAscii { what });
    }
    if s.len() > max {
        return Err(crate::error::EncodeError::FieldTooLong {
            what,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// Writes `s` left-aligned into `field`, padding with spaces. The caller has
/// checked the length with [`check_text`].
pub(crate) fn put_text(field: &mut [u8], s: &str) {
    for (i, slot) in field.iter_mut().enumerate() {
        *slot = s.as_bytes().get(i).copied().unwrap_or(b' ');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(be16_at(&b, 0), Some(0x0102));
        assert_eq!(be16_at(&b, 8), None);
        assert_eq!(be32_at(&b, 5), Some(0x0607_0809));
        assert_eq!(be32_at(&b, 6), None);
        assert_eq!(be64_at(&b, 1), Some(0x0203_0405_0607_0809));
        assert_eq!(be64_at(&b, usize::MAX), None);
        assert!(head::<10>(&b, "x").is_err());
    }

    #[test]
    fn text_trims_and_sanitizes() {
        assert_eq!(text(b"  ab c \0\0"), "ab c");
        assert_eq!(text(b"\0\0"), "");
        assert_eq!(text(b""), "");
        assert_eq!(text(&[b'a', 0xff, b'b', 0x01]), "a?b?");
    }

    #[test]
    fn put_is_bounds_checked() {
        let mut b = [0u8; 4];
        assert!(put(&mut b, 2, &[1, 2]));
        assert!(!put(&mut b, 3, &[1, 2]));
        assert!(!put(&mut b, usize::MAX, &[1]));
        assert_eq!(b, [0, 0, 1, 2]);
    }
}
