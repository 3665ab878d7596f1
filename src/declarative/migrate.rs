//! Kong's on-the-fly migration of route paths in files of format 1.1 and 2.1
//! (`kong/db/declarative/migrations/route_path.lua`, which calls `migrate_path` of
//! `kong/db/migrations/migrate_path_280_300.lua`): a path made only of
//! `[a-zA-Z0-9.\-_~/%]` is a prefix and is normalised (`kong/tools/uri.lua` `normalize(path,
//! true)`); anything else was a regex before 3.0 and gets the `~` prefix, its
//! percent-encoded triplets decoded (reserved characters kept encoded, upper-cased; regex
//! metacharacters decoded escaped).

use crate::uri::hex_pair;

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

/// `kong/tools/uri.lua` `normalize(uri, true)` as text.
fn normalize(uri: &str) -> String {
    String::from_utf8_lossy(&crate::uri::normalize(uri)).into_owned()
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
