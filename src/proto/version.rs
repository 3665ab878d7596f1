//! Versions of the change log and their wire form: Kong's `v02_` strings.

/// The version string of "no configuration": 32 zeros (Kong's `DECLARATIVE_EMPTY_CONFIG_HASH`).
pub const EMPTY_VERSION: &str = "00000000000000000000000000000000";

/// `v02_` + 28 lowercase hex digits; version 0 is [`EMPTY_VERSION`].
pub fn version_string(v: i64) -> String {
    if v <= 0 {
        EMPTY_VERSION.to_owned()
    } else {
        format!("v02_{v:028x}")
    }
}

/// Parses a version string. 32 zeros (or any 32-character v1 hash) is version 0; anything that
/// is not a valid `v02_` string, or does not fit an i64, is `None`.
pub fn parse_version(s: &str) -> Option<i64> {
    if s.len() != 32 {
        return None;
    }
    match s.strip_prefix("v02_") {
        Some(hex) => {
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let v = u128::from_str_radix(hex, 16).ok()?;
            i64::try_from(v).ok()
        }
        // A v1 md5 hash or the empty hash: the DP has no v2 version.
        None if s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(0),
        None => None,
    }
}

/// A change-log version as it crosses a boundary between the planes: 0 is "no configuration",
/// versions count up from 1 without gaps. On the wire it is a `v02_` string ([`Version::wire`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(i64);

impl Version {
    /// No configuration (Kong's empty hash on the wire).
    pub const NONE: Version = Version(0);

    /// A version number; anything below 0 is [`Version::NONE`].
    pub const fn new(v: i64) -> Version {
        Version(if v < 0 { 0 } else { v })
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    /// The `v02_` string ([`EMPTY_VERSION`] for none).
    pub fn wire(self) -> String {
        version_string(self.0)
    }

    /// Reads a wire string (see [`parse_version`]).
    pub fn parse(s: &str) -> Option<Version> {
        parse_version(s).map(Version)
    }
}

impl From<Version> for i64 {
    fn from(v: Version) -> i64 {
        v.0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_strings_round_trip() {
        assert_eq!(version_string(10), "v02_000000000000000000000000000a");
        assert_eq!(version_string(0), EMPTY_VERSION);
        assert_eq!(parse_version("v02_000000000000000000000000000a"), Some(10));
        assert_eq!(parse_version(EMPTY_VERSION), Some(0));
        assert_eq!(parse_version(&version_string(i64::MAX)), Some(i64::MAX));
        assert_eq!(parse_version("v02_ffffffffffffffffffffffffffff"), None);
        assert_eq!(parse_version("v02_00000000000000000000000000zz"), None);
        assert_eq!(parse_version("v02_0a"), None);
        // Fixed width keeps string order equal to numeric order, as Kong compares them.
        assert!(version_string(9) < version_string(10));
        assert!(EMPTY_VERSION < version_string(1).as_str());
    }

    #[test]
    fn version_type_reads_and_writes_the_wire() {
        let v = Version::parse("v02_000000000000000000000000000a").unwrap();
        assert_eq!(v.get(), 10);
        assert_eq!(v.wire(), "v02_000000000000000000000000000a");
        assert_eq!(Version::new(-5), Version::NONE);
        assert_eq!(Version::NONE.wire(), EMPTY_VERSION);
        assert!(Version::new(9) < Version::new(10));
        assert_eq!(Version::parse("nope"), None);
    }
}
