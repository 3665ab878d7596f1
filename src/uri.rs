//! Kong's URI tools (`kong/tools/uri.lua`), with no I/O: what the router (matching a
//! request's path) and the declarative reader (migrating 1.1/2.1 route paths) both need.

use std::borrow::Cow;

/// Reserved characters stay percent-encoded (`RESERVED_CHARS` in `kong/tools/uri.lua`).
pub fn is_reserved(b: u8) -> bool {
    b"!*'();:@&=+$,/?%#[]".contains(&b)
}

/// One hex digit's value.
pub fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(uri: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(uri.len());
    let mut i = 0;
    while i < uri.len() {
        if uri[i] == b'%'
            && i + 2 < uri.len()
            && let (Some(hi), Some(lo)) = (hex_val(uri[i + 1]), hex_val(uri[i + 2]))
        {
            let byte = hi * 16 + lo;
            if is_reserved(byte) {
                out.push(b'%');
                out.push(uri[i + 1].to_ascii_uppercase());
                out.push(uri[i + 2].to_ascii_uppercase());
            } else {
                out.push(byte);
            }
            i += 3;
            continue;
        }
        out.push(uri[i]);
        i += 1;
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `normalize(uri, true)` from `kong/tools/uri.lua`, on bytes: every triplet percent-decoded
/// except reserved characters (whose triplets are upper-cased instead), dot segments removed
/// (RFC 3986), repeated slashes merged. Borrowed when nothing changes.
pub fn normalize(uri: &str) -> Cow<'_, [u8]> {
    let bytes = uri.as_bytes();
    if bytes.is_empty() || bytes == b"/" {
        return Cow::Borrowed(bytes);
    }
    let decoded: Cow<'_, [u8]> = if bytes.contains(&b'%') {
        Cow::Owned(percent_decode(bytes))
    } else {
        Cow::Borrowed(bytes)
    };
    if !decoded.contains(&b'.') && !contains(&decoded, b"//") {
        return decoded;
    }

    let mut segments: Vec<&[u8]> = Vec::new();
    let mut input: &[u8] = &decoded;
    while !input.is_empty() {
        if input == b"/." {
            input = b"/";
        } else if input == b"/.." {
            input = b"/";
            segments.pop();
        } else if input == b"." || input == b".." {
            input = b"";
        } else if input.starts_with(b"../") {
            input = &input[3..];
        } else if input.starts_with(b"./") || input.starts_with(b"/./") {
            // `./` goes, and `/./` becomes `/`.
            input = &input[2..];
        } else if input.starts_with(b"/../") {
            input = &input[3..];
            segments.pop();
        } else if input.starts_with(b"//") {
            input = &input[1..];
        } else {
            match input.iter().skip(1).position(|&b| b == b'/') {
                Some(idx) => {
                    segments.push(&input[..idx + 1]);
                    input = &input[idx + 1..];
                }
                None => {
                    segments.push(input);
                    input = b"";
                }
            }
        }
    }
    Cow::Owned(segments.concat())
}

/// The byte of a `%XX` triplet's two hex digits (`b` starts after the `%`).
pub fn hex_pair(b: &[u8]) -> Option<u8> {
    match b {
        [hi, lo, ..] => Some(hex_val(*hi)? * 16 + hex_val(*lo)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triplets_need_two_hex_digits() {
        assert_eq!(hex_pair(b"2F"), Some(b'/'));
        assert_eq!(hex_pair(b"7e/rest"), Some(b'~'));
        // Not a number parse: a sign is not a digit.
        assert_eq!(hex_pair(b"+f"), None);
        assert_eq!(hex_pair(b"f"), None);
    }

    #[test]
    fn normalize_decodes_all_but_reserved_and_removes_dot_segments() {
        assert_eq!(&*normalize("/a/%7Eb/%2fc"), b"/a/~b/%2Fc");
        assert_eq!(&*normalize("/a//b/./c/../d"), b"/a/b/d");
        assert!(matches!(normalize("/plain/path"), Cow::Borrowed(_)));
    }
}
