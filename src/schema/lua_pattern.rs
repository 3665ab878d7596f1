//! Lua 5.1 patterns, as Kong's schema validators `match`, `not_match`, `match_all`,
//! `match_none` and `match_any` use them (`string.match(value, pattern)`).
//!
//! Lua patterns are not regular expressions: `%` escapes, `%a %c %d %g %l %p %s %u %w %x` are
//! character classes (ASCII, C locale; upper case negates), `[...]` sets may hold ranges and
//! classes, `*` `+` `?` are greedy, `-` is the lazy `*`, `^` anchors only at the start of the
//! pattern and `$` only at its end, `%bxy` matches a balanced pair, `%f[set]` is a frontier,
//! `()` captures (a position capture when empty) and `%1`-`%9` refer back to captures.
//! The matcher works on bytes, as Lua does. Only "does it match" is needed here.

/// A pattern checked once (at schema load) and matched many times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaPattern {
    source: String,
}

impl LuaPattern {
    /// Checks `source` for the errors Lua reports when it compiles a pattern while matching
    /// (malformed `%`, unclosed `[`, unbalanced `()`, bad back-reference).
    pub fn new(source: &str) -> Result<LuaPattern, String> {
        check_syntax(source.as_bytes())?;
        Ok(LuaPattern {
            source: source.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Lua's `string.match(subject, pattern) ~= nil`.
    pub fn is_match(&self, subject: &str) -> bool {
        find(subject.as_bytes(), self.source.as_bytes())
    }
}

/// Whether `pattern` matches somewhere in `subject` (anchored when it starts with `^`).
/// A malformed pattern matches nothing.
pub fn find(subject: &[u8], pattern: &[u8]) -> bool {
    let (anchored, pattern) = match pattern.first() {
        Some(b'^') => (true, &pattern[1..]),
        _ => (false, pattern),
    };
    let mut start = 0;
    loop {
        let mut m = Matcher {
            src: subject,
            pat: pattern,
            captures: Vec::new(),
            depth: 0,
        };
        if let Ok(Some(_)) = m.do_match(start, 0) {
            return true;
        }
        start += 1;
        if anchored || start > subject.len() {
            return false;
        }
    }
}

const MAX_CAPTURES: usize = 32;
const MAX_DEPTH: usize = 200;

#[derive(Debug, Clone, Copy)]
enum CapLen {
    /// Still open.
    Open,
    /// A position capture `()`.
    Position,
    Closed(usize),
}

struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    captures: Vec<(usize, CapLen)>,
    depth: usize,
}

type Step = Result<Option<usize>, String>;

impl Matcher<'_> {
    /// Matches the pattern from `p` against the subject from `s`; the end of the match.
    fn do_match(&mut self, s: usize, p: usize) -> Step {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("pattern too complex".into());
        }
        let res = self.match_here(s, p);
        self.depth -= 1;
        res
    }

    fn match_here(&mut self, mut s: usize, mut p: usize) -> Step {
        loop {
            if p == self.pat.len() {
                return Ok(Some(s));
            }
            match self.pat[p] {
                b'(' => {
                    return if self.pat.get(p + 1) == Some(&b')') {
                        self.start_capture(s, p + 2, CapLen::Position)
                    } else {
                        self.start_capture(s, p + 1, CapLen::Open)
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                b'$' if p + 1 == self.pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                b'%' => match self.pat.get(p + 1) {
                    Some(b'b') => match self.match_balance(s, p + 2)? {
                        Some(end) => {
                            s = end;
                            p += 4;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    Some(b'f') => {
                        p += 2;
                        if self.pat.get(p) != Some(&b'[') {
                            return Err("missing '[' after '%f' in pattern".into());
                        }
                        let end = self.class_end(p)?;
                        let prev = if s == 0 { 0 } else { self.src[s - 1] };
                        let cur = self.src.get(s).copied().unwrap_or(0);
                        if !self.match_bracket(prev, p, end - 1)
                            && self.match_bracket(cur, p, end - 1)
                        {
                            p = end;
                            continue;
                        }
                        return Ok(None);
                    }
                    Some(d) if d.is_ascii_digit() => {
                        match self.match_capture(s, *d)? {
                            Some(end) => {
                                s = end;
                                p += 2;
                                continue;
                            }
                            None => return Ok(None),
                        };
                    }
                    _ => {}
                },
                _ => {}
            }
            // A single character class, possibly followed by a quantifier.
            let ep = self.class_end(p)?;
            let matches_here = s < self.src.len() && self.single_match(self.src[s], p, ep);
            match self.pat.get(ep) {
                Some(b'?') => {
                    if matches_here && let Some(end) = self.do_match(s + 1, ep + 1)? {
                        return Ok(Some(end));
                    }
                    p = ep + 1;
                }
                Some(b'+') => {
                    return if matches_here {
                        self.max_expand(s + 1, p, ep)
                    } else {
                        Ok(None)
                    };
                }
                Some(b'*') => return self.max_expand(s, p, ep),
                Some(b'-') => return self.min_expand(s, p, ep),
                _ => {
                    if !matches_here {
                        return Ok(None);
                    }
                    s += 1;
                    p = ep;
                }
            }
        }
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Step {
        let mut n = 0;
        while s + n < self.src.len() && self.single_match(self.src[s + n], p, ep) {
            n += 1;
        }
        loop {
            if let Some(end) = self.do_match(s + n, ep + 1)? {
                return Ok(Some(end));
            }
            if n == 0 {
                return Ok(None);
            }
            n -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Step {
        loop {
            if let Some(end) = self.do_match(s, ep + 1)? {
                return Ok(Some(end));
            }
            if s < self.src.len() && self.single_match(self.src[s], p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, len: CapLen) -> Step {
        if self.captures.len() >= MAX_CAPTURES {
            return Err("too many captures".into());
        }
        self.captures.push((s, len));
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.captures.pop();
        }
        Ok(res)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Step {
        let Some(idx) = self
            .captures
            .iter()
            .rposition(|(_, len)| matches!(len, CapLen::Open))
        else {
            return Err("invalid pattern capture".into());
        };
        let start = self.captures[idx].0;
        self.captures[idx].1 = CapLen::Closed(s - start);
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.captures[idx].1 = CapLen::Open;
        }
        Ok(res)
    }

    fn match_capture(&mut self, s: usize, digit: u8) -> Step {
        let idx = usize::from(digit - b'0');
        let Some((start, CapLen::Closed(len))) = idx
            .checked_sub(1)
            .and_then(|i| self.captures.get(i))
            .copied()
        else {
            return Err(format!("invalid capture index %{}", char::from(digit)));
        };
        let captured = &self.src[start..start + len];
        if self.src.len() - s >= len && &self.src[s..s + len] == captured {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }

    fn match_balance(&mut self, s: usize, p: usize) -> Step {
        let (Some(&open), Some(&close)) = (self.pat.get(p), self.pat.get(p + 1)) else {
            return Err("missing arguments to '%b'".into());
        };
        if self.src.get(s) != Some(&open) {
            return Ok(None);
        }
        let mut depth = 1;
        let mut i = s + 1;
        while i < self.src.len() {
            let c = self.src[i];
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(i + 1));
                }
            } else if c == open {
                depth += 1;
            }
            i += 1;
        }
        Ok(None)
    }

    /// The index just after the single character class starting at `p`.
    fn class_end(&self, p: usize) -> Result<usize, String> {
        let pat = self.pat;
        let c = pat[p];
        let mut p = p + 1;
        if c == b'%' {
            if p >= pat.len() {
                return Err("malformed pattern (ends with '%')".into());
            }
            return Ok(p + 1);
        }
        if c == b'[' {
            if pat.get(p) == Some(&b'^') {
                p += 1;
            }
            // The first character of a set may be `]` itself.
            loop {
                if p >= pat.len() {
                    return Err("malformed pattern (missing ']')".into());
                }
                let cc = pat[p];
                p += 1;
                if cc == b'%' {
                    if p >= pat.len() {
                        return Err("malformed pattern (missing ']')".into());
                    }
                    p += 1;
                }
                if pat.get(p) == Some(&b']') {
                    return Ok(p + 1);
                }
            }
        }
        Ok(p)
    }

    fn single_match(&self, c: u8, p: usize, ep: usize) -> bool {
        match self.pat[p] {
            b'.' => true,
            b'%' => class_match(c, self.pat[p + 1]),
            b'[' => self.match_bracket(c, p, ep - 1),
            pc => pc == c,
        }
    }

    /// `p` is the `[`, `ec` the closing `]`.
    fn match_bracket(&self, c: u8, p: usize, ec: usize) -> bool {
        let pat = self.pat;
        let mut p = p + 1;
        let negate = pat[p] == b'^';
        if negate {
            p += 1;
        }
        while p < ec {
            if pat[p] == b'%' && p + 1 < ec {
                p += 1;
                if class_match(c, pat[p]) {
                    return !negate;
                }
                p += 1;
            } else if pat.get(p + 1) == Some(&b'-') && p + 2 < ec {
                if pat[p] <= c && c <= pat[p + 2] {
                    return !negate;
                }
                p += 3;
            } else {
                if pat[p] == c {
                    return !negate;
                }
                p += 1;
            }
        }
        negate
    }
}

/// `%x` classes in the C locale; an upper-case letter negates; anything else is literal.
fn class_match(c: u8, class: u8) -> bool {
    let res = match class.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        _ => return class == c,
    };
    if class.is_ascii_uppercase() {
        !res
    } else {
        res
    }
}

/// The structural errors Lua would raise on first use of the pattern.
fn check_syntax(pat: &[u8]) -> Result<(), String> {
    let m = Matcher {
        src: &[],
        pat,
        captures: Vec::new(),
        depth: 0,
    };
    let mut p = usize::from(pat.first() == Some(&b'^'));
    let mut open = 0usize;
    let mut closed = 0usize;
    while p < pat.len() {
        match pat[p] {
            b'(' => {
                open += 1;
                p += 1;
                continue;
            }
            b')' => {
                if open == closed {
                    return Err("invalid pattern capture".into());
                }
                closed += 1;
                p += 1;
                continue;
            }
            b'%' => match pat.get(p + 1) {
                Some(b'b') => {
                    if p + 3 >= pat.len() {
                        return Err("missing arguments to '%b'".into());
                    }
                    p += 4;
                    continue;
                }
                Some(b'f') => {
                    if pat.get(p + 2) != Some(&b'[') {
                        return Err("missing '[' after '%f' in pattern".into());
                    }
                    p = m.class_end(p + 2)?;
                    continue;
                }
                Some(d) if d.is_ascii_digit() => {
                    let idx = usize::from(d - b'0');
                    if idx == 0 || idx > closed {
                        return Err(format!("invalid capture index %{}", char::from(*d)));
                    }
                    p += 2;
                    continue;
                }
                _ => {}
            },
            _ => {}
        }
        p = m.class_end(p)?;
        if matches!(pat.get(p), Some(b'?' | b'+' | b'*' | b'-')) {
            p += 1;
        }
    }
    if open != closed {
        return Err("unfinished capture".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(pattern: &str, yes: &[&str], no: &[&str]) {
        let p = LuaPattern::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        for s in yes {
            assert!(p.is_match(s), "{pattern:?} should match {s:?}");
        }
        for s in no {
            assert!(!p.is_match(s), "{pattern:?} should not match {s:?}");
        }
    }

    /// Every pattern the shipped schema files use, as Kong's files spell them.
    #[test]
    fn kong_patterns() {
        // typedefs.http_method (kong/db/schema/typedefs.lua)
        check("^%u+$", &["GET", "PURGE"], &["get", "GET ", "", "G1"]);
        // typedefs.hosts
        check(
            "^[^*]*%*?[^*]*$",
            &["a.b", "*.a.b", "a.*"],
            &["*.a.*", "**"],
        );
        check("^%*%.", &["*.a"], &["a.*", "a*.b"]);
        check("%.%*$", &["a.*"], &["*.a"]);
        check("^[^*]*$", &["a.b"], &["*"]);
        // typedefs.path and router paths
        check("//", &["/a//b"], &["/a/b"]);
        // typedefs.semantic_version
        check("^%d+[%.%d]*$", &["1", "1.2.3"], &["v1", "1.2-rc"]);
        check("^%d+[%.%d]*%-?.*$", &["1.2-rc", "1.2rc"], &["a1"]);
        check("%.%.", &["1..2"], &["1.2"]);
        // acme account_email (kong/plugins/acme/schema.lua)
        check("%w*%p*@+%w*%.?%w*", &["a@b.c", "@", "x@"], &["ab.c", ""]);
        // datadog tags (kong/plugins/datadog/schema.lua)
        check("^.*[^:]$", &["app:kong", "a"], &["app:", ":", ""]);
        // file-log path (kong/plugins/file-log/schema.lua)
        let file = r"^[^%s*&%%\`][^*&%%\`]*[^%s*&%%\`]$";
        check(
            file,
            &["/tmp/file.log", "ab", "/a b/c"],
            &[
                "a", " /tmp/x", "/tmp/x ", "/tmp/*", "/tmp/a&b", "/t%x", "/t\\x", "/t`x",
            ],
        );
        // request-transformer / response-transformer colon values
        check("^[^:]+:.*$", &["a:b", "a:", "a::"], &[":b", "ab"]);
        // statsd allow_status_codes (kong/plugins/statsd/constants.lua)
        check("^[0-9]+-[0-9]+$", &["200-299"], &["200", "2xx-3", "200-"]);
        // http-log header keys; note Kong's `[nn]`: only a lower-case n
        check("^[Hh][Oo][Ss][Tt]$", &["Host", "hOsT"], &["Hosts", "host "]);
        let cl = "^[Cc][Oo][Nn][Tt][Ee][Nn][Tt]%-[Ll][Ee][nn][Gg][Tt][Hh]$";
        check(
            cl,
            &["Content-Length", "content-length"],
            &["Content-LENGTH"],
        );
    }

    #[test]
    fn pattern_features() {
        check("^a-b$", &["ab", "aaab"], &["aaa"]);
        check("^(a+)%1$", &["aa", "aaaa"], &["aaa"]);
        check("%b()", &["x(a(b)c)y"], &["x(a"]);
        check("%f[%w]%w+", &["hello"], &[""]);
        check("^[%a_][%w_]*$", &["_x1"], &["1x"]);
        check("^[]]$", &["]"], &["a"]);
        check("^[^]]$", &["a"], &["]"]);
        check("^[a-c]+$", &["abc"], &["abd"]);
        check("^()a$", &["a"], &["b"]);
        check("x$", &["ax"], &["xa"]);
        check("a$b", &["a$b"], &["ab"]);
        check("^%$$", &["$"], &["a"]);
        check("", &["", "a"], &[]);
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["%", "[a", "(a", "a)", "%1", "%b", "%fa", "[%"] {
            assert!(LuaPattern::new(bad).is_err(), "{bad:?}");
        }
    }
}
