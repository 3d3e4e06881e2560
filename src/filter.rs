//! containerd's filter language: parse once, then evaluate against snapshots.
//!
//! This is a port of containerd's `filters` package (scanner, parser and
//! quoting), so that a filter string means exactly what it means to
//! containerd, quirks included: whitespace is only skipped where containerd's
//! scanner skips it, `/.../` and `|...|` quote only regex values, and `!=` is
//! true for an absent field.
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath (operator value)
//! fieldpath := field ('.' field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! ```

use regex::Regex;

/// Parsed `List` filters: the strings are ORed, the selectors in one string
/// ANDed. No strings, or an empty one, matches everything.
#[derive(Debug, Clone)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

#[derive(Debug, Clone)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// What a filter can ask of an object: a field's value, if present.
pub trait Fields {
    fn field(&self, path: &[String]) -> Option<&str>;
}

impl Filter {
    /// Parses containerd `List` filter strings. The error says which string
    /// failed, where, and why.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter, String> {
        let mut any = Vec::with_capacity(filters.len());
        for f in filters {
            let f = f.as_ref();
            if f.is_empty() {
                // An empty string matches everything, which makes the whole OR true.
                return Ok(Filter { any: Vec::new() });
            }
            any.push(Parser::new(f).selectors()?);
        }
        Ok(Filter { any })
    }

    pub fn matches(&self, obj: &impl Fields) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(obj)))
    }
}

impl Selector {
    fn matches(&self, obj: &impl Fields) -> bool {
        let value = obj.field(&self.fieldpath);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value == Some(v.as_str()),
            Op::NotEqual(v) => value.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Eof,
    Quoted,
    Value,
    Field,
    Separator,
    Operator,
    Illegal,
    Other(char),
}

/// Where `next` returns this, the input is exhausted.
const EOF: Option<char> = None;

struct Scanner<'a> {
    input: &'a str,
    /// Start of the current rune.
    pos: usize,
    /// End of the current rune.
    ppos: usize,
    /// The previous token was an operator, so the next bare word is a value.
    value: bool,
    err: Option<&'static str>,
}

impl<'a> Scanner<'a> {
    fn next(&mut self) -> Option<char> {
        if self.ppos >= self.input.len() {
            self.pos = self.input.len();
            return EOF;
        }
        self.pos = self.ppos;
        let c = self.input[self.ppos..].chars().next()?;
        self.ppos += c.len_utf8();
        if c == '\0' {
            self.error("unexpected null");
        }
        Some(c)
    }

    fn peek(&mut self) -> Option<char> {
        self.input[self.ppos..].chars().next()
    }

    fn error(&mut self, msg: &'static str) {
        self.err.get_or_insert(msg);
    }

    fn scan(&mut self) -> (usize, Token, &'a str) {
        let mut ch = self.next();
        let mut pos = self.pos;
        loop {
            let Some(c) = ch else {
                return (self.input.len(), Token::Eof, "");
            };
            if c == '\0' {
                return (pos, Token::Illegal, "");
            }
            if is_quote(c) {
                if !self.scan_quoted(c) {
                    return (pos, Token::Illegal, &self.input[pos..self.ppos]);
                }
                return (pos, Token::Quoted, &self.input[pos..self.ppos]);
            }
            if c == ',' || c == '.' {
                self.value = false;
                return (pos, Token::Separator, &self.input[pos..self.ppos]);
            }
            if is_operator(c) {
                while matches!(self.peek(), Some('=' | '!' | '~')) {
                    self.next();
                }
                self.value = true;
                return (pos, Token::Operator, &self.input[pos..self.ppos]);
            }
            if c.is_whitespace() {
                ch = self.next();
                pos = self.pos;
                continue;
            }
            if self.value {
                while self.peek().is_some_and(is_value) {
                    self.next();
                }
                self.value = false;
                return (pos, Token::Value, &self.input[pos..self.ppos]);
            }
            if is_field(c) {
                while self.peek().is_some_and(is_field) {
                    self.next();
                }
                return (pos, Token::Field, &self.input[pos..self.ppos]);
            }
            return (pos, Token::Other(c), "");
        }
    }

    fn scan_quoted(&mut self, quote: char) -> bool {
        let mut legal = true;
        let mut ch = self.next();
        while ch != Some(quote) {
            match ch {
                None | Some('\n') => {
                    self.error("quoted literal not terminated");
                    return false;
                }
                Some('\\') => {
                    let (next, ok) = self.scan_escape(quote);
                    legal &= ok;
                    ch = next;
                }
                Some(_) => ch = self.next(),
            }
        }
        legal
    }

    fn scan_escape(&mut self, quote: char) -> (Option<char>, bool) {
        let ch = self.next();
        match ch {
            Some(c) if "abfnrtv\\".contains(c) || c == quote => (self.next(), true),
            Some('0'..='7') => self.scan_digits(ch, 8, 3),
            Some('x') => {
                let c = self.next();
                self.scan_digits(c, 16, 2)
            }
            Some('u') => {
                let c = self.next();
                self.scan_digits(c, 16, 4)
            }
            Some('U') => {
                let c = self.next();
                self.scan_digits(c, 16, 8)
            }
            _ => {
                self.error("illegal escape sequence");
                (ch, false)
            }
        }
    }

    fn scan_digits(
        &mut self,
        mut ch: Option<char>,
        base: u32,
        mut n: usize,
    ) -> (Option<char>, bool) {
        while n > 0 && ch.and_then(|c| c.to_digit(16)).is_some_and(|d| d < base) {
            ch = self.next();
            n -= 1;
        }
        if n > 0 {
            self.error("illegal numeric escape sequence");
            return (ch, false);
        }
        (ch, true)
    }
}

fn is_field(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_operator(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

fn is_value(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

struct Parser<'a> {
    input: &'a str,
    scanner: Scanner<'a>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            scanner: Scanner {
                input,
                pos: 0,
                ppos: 0,
                value: false,
                err: None,
            },
        }
    }

    fn err(&self, pos: usize, msg: impl std::fmt::Display) -> String {
        let s = self.input;
        if pos < s.len() {
            let end = pos + s[pos..].chars().next().map_or(1, char::len_utf8);
            format!(
                "filter {s:?} is invalid at [{} >|{}|< {}]: {msg}",
                &s[..pos],
                &s[pos..end],
                &s[end..]
            )
        } else {
            format!("filter {s:?} is invalid at its end: {msg}")
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, String> {
        let mut all = vec![self.selector()?];
        loop {
            match self.scanner.peek() {
                Some(',') => {
                    self.scanner.scan();
                    all.push(self.selector()?);
                }
                EOF => return Ok(all),
                Some(c) => {
                    let pos = self.scanner.ppos;
                    return Err(self.err(pos, format!("unexpected input {c:?}")));
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let fieldpath = self.fieldpath()?;
        if matches!(self.scanner.peek(), Some(',') | EOF) {
            return Ok(Selector {
                fieldpath,
                op: Op::Present,
            });
        }
        let (pos, tok, text) = self.scanner.scan();
        let op = match tok {
            Token::Operator if matches!(text, "==" | "!=" | "~=") => text,
            Token::Operator => return Err(self.err(pos, format!("unsupported operator {text:?}"))),
            Token::Illegal => return Err(self.illegal(pos)),
            _ => return Err(self.err(pos, "expected an operator (\"==\", \"!=\" or \"~=\")")),
        };
        let regex = op == "~=";
        let value = self.value(regex)?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(
                Regex::new(&value)
                    .map_err(|e| self.err(pos, format!("invalid regular expression: {e}")))?,
            ),
        };
        Ok(Selector { fieldpath, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, String> {
        let mut path = vec![self.field()?];
        while self.scanner.peek() == Some('.') {
            self.scanner.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, String> {
        let (pos, tok, text) = self.scanner.scan();
        match tok {
            Token::Field => Ok(text.to_string()),
            Token::Quoted => self.unquote(pos, text, false),
            Token::Illegal => Err(self.illegal(pos)),
            _ => Err(self.err(pos, "expected a field name or a quoted string")),
        }
    }

    fn value(&mut self, allow_alt_quotes: bool) -> Result<String, String> {
        let (pos, tok, text) = self.scanner.scan();
        match tok {
            Token::Value | Token::Field => Ok(text.to_string()),
            Token::Quoted => self.unquote(pos, text, allow_alt_quotes),
            Token::Illegal => Err(self.illegal(pos)),
            _ => Err(self.err(pos, "expected a value or a quoted string")),
        }
    }

    fn illegal(&self, pos: usize) -> String {
        self.err(pos, self.scanner.err.unwrap_or("illegal input"))
    }

    fn unquote(&self, pos: usize, s: &str, allow_alts: bool) -> Result<String, String> {
        if !allow_alts && !s.starts_with('"') {
            return Err(self.err(
                pos,
                "only regular expressions (~=) may be quoted with / or |",
            ));
        }
        unquote(s).ok_or_else(|| self.err(pos, "bad quoted string"))
    }
}

/// Go-style unquoting of `"..."`, `/.../` or `|...|`.
fn unquote(s: &str) -> Option<String> {
    let quote = s.chars().next()?;
    if s.len() < 2 || !s.ends_with(quote) || !matches!(quote, '"' | '/' | '|') {
        return None;
    }
    let body = &s[1..s.len() - 1];
    if body.contains('\n') {
        return None;
    }
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(c) = rest.chars().next() {
        if c == quote {
            return None;
        }
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let b = rest.as_bytes();
        let esc = *b.get(1)? as char;
        rest = &rest[2..];
        let simple = match esc {
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            '\\' => Some(b'\\'),
            '"' | '|' | '/' if esc == quote => Some(esc as u8),
            _ => None,
        };
        if let Some(byte) = simple {
            out.push(byte);
            continue;
        }
        match esc {
            'x' | 'u' | 'U' => {
                let n = match esc {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let digits = rest.get(..n)?;
                let v = u32::from_str_radix(digits, 16).ok()?;
                if !digits.bytes().all(|d| d.is_ascii_hexdigit()) {
                    return None;
                }
                rest = &rest[n..];
                if esc == 'x' {
                    out.push(v as u8);
                } else {
                    let c = char::from_u32(v)?;
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            '0'..='7' => {
                let digits = rest.get(..2)?;
                let mut v = esc as u32 - '0' as u32;
                for d in digits.bytes() {
                    if !(b'0'..=b'7').contains(&d) {
                        return None;
                    }
                    v = v << 3 | (d - b'0') as u32;
                }
                if v > 255 {
                    return None;
                }
                rest = &rest[2..];
                out.push(v as u8);
            }
            _ => return None,
        }
    }
    // Filter values are compared with UTF-8 protobuf strings, so a byte
    // escape that breaks UTF-8 can never match: refuse it instead.
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Obj {
        kind: &'static str,
        name: &'static str,
        parent: &'static str,
        labels: BTreeMap<String, String>,
    }

    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<&str> {
            match path.first()?.as_str() {
                "kind" => Some(self.kind),
                "name" => Some(self.name),
                "parent" => Some(self.parent),
                "labels" => self.labels.get(&path[1..].join(".")).map(String::as_str),
                _ => None,
            }
        }
    }

    fn obj(
        kind: &'static str,
        name: &'static str,
        parent: &'static str,
        l: &[(&str, &str)],
    ) -> Obj {
        Obj {
            kind,
            name,
            parent,
            labels: l
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The objects containerd's testsuite `checkWalk` builds.
    fn walk_objects() -> Vec<Obj> {
        let root = ("containerd.io/gc.root", "check-walk");
        vec![
            obj("committed", "p", "", &[root]),
            obj("active", "a-wl", "p", &[root, ("l", "1")]),
            obj("active", "a-np-wl", "", &[root]),
            obj("view", "v-wl", "p", &[root, ("l", "2")]),
            obj("committed", "c-np", "", &[]),
        ]
    }

    fn names(filters: &[&str]) -> Vec<&'static str> {
        let f = Filter::parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
        walk_objects()
            .into_iter()
            .filter(|o| f.matches(o))
            .map(|o| o.name)
            .collect()
    }

    #[test]
    fn the_testsuite_walk_cases_select_what_containerd_selects() {
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &["p", "a-wl", "a-np-wl", "v-wl", "c-np"]),
            (&[""], &["p", "a-wl", "a-np-wl", "v-wl", "c-np"]),
            (
                &[r#"labels."containerd.io/gc.root"==check-walk"#],
                &["p", "a-wl", "a-np-wl", "v-wl"],
            ),
            (
                &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
                &["a-wl", "a-np-wl"],
            ),
            (&["name==a-wl,labels.l"], &["a-wl"]),
            (&["parent==p"], &["a-wl", "v-wl"]),
            (
                &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
                &["a-wl", "v-wl"],
            ),
            (&["labels.l"], &["a-wl", "v-wl"]),
            (&["labels.l==2"], &["v-wl"]),
            (&["name==p", "name==a-np-wl"], &["p", "a-np-wl"]),
        ];
        for (filters, want) in cases {
            assert_eq!(&names(filters), want, "filters {filters:?}");
        }
    }

    #[test]
    fn operators_follow_containerd_semantics() {
        let cases: &[(&str, &[&str])] = &[
            // != is true when the field is absent.
            ("labels.l!=1", &["p", "a-np-wl", "v-wl", "c-np"]),
            ("name~=^a-", &["a-wl", "a-np-wl"]),
            ("name~=np", &["a-np-wl", "c-np"]),
            ("name~=/^(p|c-np)$/", &["p", "c-np"]),
            ("name~=|^.-w.$|", &["a-wl", "v-wl"]),
            ("kind==committed", &["p", "c-np"]),
            ("unknown", &[]),
            ("unknown!=x", &["p", "a-wl", "a-np-wl", "v-wl", "c-np"]),
            ("name==a-wl,kind==view", &[]),
            ("parent", &["p", "a-wl", "a-np-wl", "v-wl", "c-np"]),
            ("name==\"v-wl\"", &["v-wl"]),
            ("labels.\"l\"==\"\\x32\"", &["v-wl"]),
        ];
        for (filter, want) in cases {
            assert_eq!(&names(&[filter]), want, "filter {filter:?}");
        }
    }

    #[test]
    fn bare_values_may_hold_dots_colons_slashes_and_equals() {
        let o = obj("active", "x", "", &[("ref", "docker.io/lib/a:1=2")]);
        let f = Filter::parse_all(&["labels.ref==docker.io/lib/a:1=2"]).unwrap();
        assert!(f.matches(&o));
        let f = Filter::parse_all(&["labels.ref==docker.io"]).unwrap();
        assert!(!f.matches(&o));
    }

    #[test]
    fn malformed_filters_are_rejected_with_a_position() {
        let cases = [
            "name==",
            "name=",
            "name===x",
            "name==x,",
            ",name==x",
            "name==x y",
            "labels.",
            "labels.\"unterminated",
            "name~=/(/",
            "name==/notaregex/",
            "labels.\"bad\\q\"",
            "name==a\0",
            "label$",
        ];
        for c in cases {
            let err = Filter::parse_all(&[c]).err();
            assert!(err.is_some(), "{c:?} must not parse");
            let err = err.unwrap();
            assert!(err.starts_with("filter "), "{c:?}: {err}");
        }
    }

    #[test]
    fn whitespace_is_skipped_where_containerd_skips_it() {
        let f = Filter::parse_all(&["name==p, kind==committed"]).unwrap();
        assert!(f.matches(&obj("committed", "p", "", &[])));
        let f = Filter::parse_all(&["name ==p"]).unwrap();
        assert!(f.matches(&obj("committed", "p", "", &[])));
    }
}
