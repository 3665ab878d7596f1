//! Kong's on-the-fly migration of route paths in files of format 1.1 and 2.1
//! (`kong/db/declarative/migrations/route_path.lua`, which calls `migrate_path` of
//! `kong/db/migrations/migrate_path_280_300.lua`): a path made only of
//! `[a-zA-Z0-9.\-_~/%]` is a prefix and is normalised (`kong/tools/uri.lua` `normalize(path,
//! true)`); anything else was a regex before 3.0 and gets the `~` prefix, its
//! percent-encoded triplets decoded (reserved characters kept encoded, upper-cased; regex
//! metacharacters decoded escaped).

/// One path as Kong's `migrate_path` rewrites it.
pub fn migrate_path(path: &str) -> String {
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~' | b'/' | b'%'));
    if plain {
        return normalize(path);
    }
    format!("~{}", normalize_regex(path))
}

const RESERVED: &[u8] = b"!*'();:@&=+$,/?%#[]";

fn hex_pair(b: &[u8]) -> Option<u8> {
    if b.len() < 2 {
        return None;
    }
    let s = std::str::from_utf8(&b[..2]).ok()?;
    u8::from_str_radix(s, 16).ok()
}

/// `normalize_decode` triplets: reserved characters stay encoded (upper-cased), the rest
/// are decoded.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(n) = hex_pair(&b[i + 1..])
        {
            if RESERVED.contains(&n) {
                out.push(b'%');
                out.extend(b[i + 1..i + 3].to_ascii_uppercase());
            } else {
                out.push(n);
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `kong/tools/uri.lua` `normalize(uri, true)`: percent-decoding, dot segments removed,
/// repeated slashes merged.
fn normalize(uri: &str) -> String {
    if uri.is_empty() || uri == "/" {
        return uri.to_owned();
    }
    let decoded = if uri.contains('%') {
        percent_decode(uri)
    } else {
        uri.as_bytes().to_vec()
    };
    if !decoded.contains(&b'.') && !decoded.windows(2).any(|w| w == b"//") {
        return String::from_utf8_lossy(&decoded).into_owned();
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
                Some(p) => {
                    segments.push(&input[..p + 1]);
                    input = &input[p + 1..];
                }
                None => {
                    segments.push(input);
                    input = b"";
                }
            }
        }
    }
    String::from_utf8_lossy(&segments.concat()).into_owned()
}

/// `normalize_regex`: triplets of reserved characters upper-cased, of regex metacharacters
/// decoded escaped, of anything else decoded.
fn normalize_regex(regex: &str) -> String {
    if !regex.contains('%') {
        return regex.to_owned();
    }
    let b = regex.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(n) = hex_pair(&b[i + 1..])
        {
            // Kong's RESERVED_CHARACTERS here: ! # $ % & ' ( ) * + , / : ; = ? @ [ ]
            if b"!#$%&'()*+,/:;=?@[]".contains(&n) {
                out.push(b'%');
                out.extend(b[i + 1..i + 3].to_ascii_uppercase());
            } else {
                match n {
                    b'.' | b'^' | b'-' | b'{' | b'}' | b'\\' | b'|' => {
                        out.push(b'\\');
                        out.push(n);
                    }
                    _ => out.push(n),
                }
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
