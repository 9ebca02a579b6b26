//! containerd filter expressions (`pkg/filters`), used by List/Walk.
//!
//! Grammar (containerd's): a filter string is `selector ("," selector)*`, all of which
//! must match (AND); a List request carries a list of such strings and matches if any
//! of them does (OR; `filters.ParseAll`). `selector := fieldpath [op value]` with
//! `fieldpath := field ("." field)*`, `field := [A-Za-z][A-Za-z0-9_]* | quoted`,
//! `op := "==" | "!=" | "~="`, `value := quoted | [^\s,]+`. A selector without an
//! operator tests presence. Quoted strings use `"` or `'` with Go escapes; regex
//! values (`~=`) may also be quoted with `/…/` or `|…|`.
//!
//! Hand-written because no crate implements this grammar; it is small and must
//! accept exactly what containerd sends (e.g. `labels."containerd.io/snapshot.ref"==…`).

use regex::Regex;

/// A parse failure, with the position and the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {input:?}: at byte {pos}: {msg}")]
pub struct FilterError {
    /// The filter string.
    pub input: String,
    /// Byte offset of the problem.
    pub pos: usize,
    /// What went wrong.
    pub msg: String,
}

/// Supplies field values for matching: `None` means the field is absent.
pub trait Adaptor {
    /// Value of `path` (e.g. `["labels", "a.b"]` after joining is the caller's choice).
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// One `fieldpath op value` test.
#[derive(Debug, Clone)]
pub struct Selector {
    path: Vec<String>,
    op: Op,
}

impl Selector {
    fn matches(&self, a: &dyn Adaptor) -> bool {
        let v = a.field(&self.path);
        match &self.op {
            Op::Present => v.is_some(),
            Op::Equal(want) => v.as_deref() == Some(want.as_str()),
            // containerd compares the (possibly empty) value, so absent != "x" is true.
            Op::NotEqual(want) => v.as_deref().unwrap_or("") != want,
            Op::Matches(re) => re.is_match(v.as_deref().unwrap_or("")),
        }
    }
}

/// A parsed list of filter strings: OR of ANDs. Empty matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses one filter string (comma-separated selectors, all must match).
    pub fn parse(s: &str) -> Result<Filter, FilterError> {
        if s.is_empty() {
            return Ok(Filter::default());
        }
        Ok(Filter {
            any: vec![Parser::new(s).selectors()?],
        })
    }

    /// Parses a list of filter strings, any of which may match (containerd `ParseAll`).
    pub fn parse_all<S: AsRef<str>>(ss: &[S]) -> Result<Filter, FilterError> {
        let mut any = Vec::new();
        for s in ss {
            let s = s.as_ref();
            if s.is_empty() {
                // An empty string matches everything, so the whole OR does.
                return Ok(Filter::default());
            }
            any.push(Parser::new(s).selectors()?);
        }
        Ok(Filter { any })
    }

    /// For each OR branch, one exact value that a label or the parent must equal, if
    /// every branch has such a selector. A stored record can only match if its JSON
    /// contains one of these strings verbatim, which lets List skip decoding the rest.
    /// Values JSON would escape are not offered (`None`), keeping the check exact.
    pub fn required_values(&self) -> Option<Vec<String>> {
        if self.any.is_empty() {
            return None;
        }
        self.any
            .iter()
            .map(|all| {
                all.iter().find_map(|s| match &s.op {
                    Op::Equal(v)
                        if !v.is_empty()
                            && !v.chars().any(|c| c == '"' || c == '\\' || c.is_control())
                            && matches!(
                                s.path.first().map(String::as_str),
                                Some("labels" | "parent")
                            ) =>
                    {
                        Some(v.clone())
                    }
                    _ => None,
                })
            })
            .collect()
    }

    /// Whether the object behind `a` matches.
    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        self.any.is_empty() || self.any.iter().any(|all| all.iter().all(|s| s.matches(a)))
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, pos: 0 }
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError {
            input: self.input.to_string(),
            pos: self.pos,
            msg: msg.into(),
        })
    }

    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut out = vec![self.selector()?];
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Ok(out),
                Some(',') => {
                    self.pos += 1;
                    out.push(self.selector()?);
                }
                Some(c) => return self.err(format!("unexpected input {c:?}")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        loop {
            self.skip_ws();
            if self.peek() == Some('.') {
                self.pos += 1;
                path.push(self.field()?);
            } else {
                break;
            }
        }
        self.skip_ws();
        let rest = &self.input[self.pos..];
        if rest.is_empty() || rest.starts_with(',') {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        }
        let op = if rest.starts_with("==") {
            "=="
        } else if rest.starts_with("!=") {
            "!="
        } else if rest.starts_with("~=") {
            "~="
        } else {
            return self.err(r#"expected an operator ("=="|"!="|"~=")"#);
        };
        self.pos += 2;
        let value = self.value(op == "~=")?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => match Regex::new(&value) {
                Ok(re) => Op::Matches(re),
                Err(e) => return self.err(format!("bad regular expression: {e}")),
            },
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_ws();
        match self.peek() {
            Some('"') | Some('\'') => self.quoted(),
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                Ok(self.input[start..self.pos].to_string())
            }
            _ => self.err("expected field or quoted"),
        }
    }

    fn value(&mut self, regex: bool) -> Result<String, FilterError> {
        self.skip_ws();
        match self.peek() {
            Some('"') | Some('\'') => self.quoted(),
            Some('/') | Some('|') if regex => self.quoted(),
            None => self.err("expected value or quoted"),
            _ => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if c.is_whitespace() || c == ',' {
                        break;
                    }
                    self.pos += c.len_utf8();
                }
                if start == self.pos {
                    return self.err("expected value or quoted");
                }
                Ok(self.input[start..self.pos].to_string())
            }
        }
    }

    /// Reads a quoted string. `"`/`'` use Go escapes; `/` and `|` (regex quotes) only
    /// unescape the delimiter and keep every other backslash for the regex engine.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let q = self.peek().unwrap_or('"');
        let go = q == '"' || q == '\'';
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return self.err("unterminated quoted string");
            };
            self.pos += c.len_utf8();
            if c == q {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = self.peek() else {
                return self.err("unterminated escape");
            };
            self.pos += e.len_utf8();
            if e == q {
                out.push(e);
                continue;
            }
            if !go {
                out.push('\\');
                out.push(e);
                continue;
            }
            match e {
                'a' => out.push('\x07'),
                'b' => out.push('\x08'),
                'f' => out.push('\x0c'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'v' => out.push('\x0b'),
                '\\' => out.push('\\'),
                '"' | '\'' => out.push(e),
                'x' | 'u' | 'U' => {
                    let n = match e {
                        'x' => 2,
                        'u' => 4,
                        _ => 8,
                    };
                    let hex = self.input.get(self.pos..self.pos + n).unwrap_or("");
                    let ch = u32::from_str_radix(hex, 16)
                        .ok()
                        .filter(|_| hex.len() == n)
                        .and_then(char::from_u32);
                    match ch {
                        Some(ch) => {
                            out.push(ch);
                            self.pos += n;
                        }
                        None => return self.err("invalid escape"),
                    }
                }
                _ => return self.err(format!("invalid escape \\{e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Obj {
        name: &'static str,
        parent: &'static str,
        kind: &'static str,
        labels: BTreeMap<String, String>,
    }

    impl Adaptor for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
            match path.first().map(String::as_str) {
                Some("name") if path.len() == 1 => nonempty(self.name),
                Some("parent") if path.len() == 1 => nonempty(self.parent),
                Some("kind") if path.len() == 1 => nonempty(self.kind),
                Some("labels") if path.len() > 1 => self.labels.get(&path[1..].join(".")).cloned(),
                _ => None,
            }
        }
    }

    fn obj() -> Obj {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/snapshot.ref".into(), "sha256:abc".into());
        labels.insert("a.b".into(), "x y".into());
        labels.insert("simple".into(), "v1".into());
        Obj {
            name: "sha256:abc",
            parent: "sha256:par",
            kind: "committed",
            labels,
        }
    }

    fn m(s: &str) -> bool {
        Filter::parse(s).unwrap().matches(&obj())
    }

    #[test]
    fn containerd_unpacker_filter() {
        assert!(m(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="sha256:par""#
        ));
        assert!(!m(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="other""#
        ));
    }

    #[test]
    fn operators_and_presence() {
        assert!(m("name==sha256:abc"));
        assert!(m("name!=foo"));
        assert!(!m("name!=sha256:abc"));
        assert!(m("kind==committed"));
        assert!(m("labels.simple"));
        assert!(!m("labels.missing"));
        assert!(
            m("labels.missing!=x"),
            "absent != x is true, like containerd"
        );
        assert!(
            m("labels.a.b==\"x y\""),
            "dotted path joins into a label key"
        );
        assert!(m(r"name~=^sha256:[a-f]+$"));
        assert!(m(r"name~=/sha256:\w+/"));
        assert!(m(r"name~=|ab|"));
        assert!(!m("name~=^zzz"));
        assert!(m("  name == sha256:abc , kind==committed "));
    }

    #[test]
    fn or_between_strings() {
        let f = Filter::parse_all(&["name==nope", "kind==committed"]).unwrap();
        assert!(f.matches(&obj()));
        let f = Filter::parse_all(&["name==nope", "kind==active"]).unwrap();
        assert!(!f.matches(&obj()));
        assert!(Filter::parse_all::<&str>(&[]).unwrap().matches(&obj()));
    }

    #[test]
    fn required_values_for_prefiltering() {
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="p""#)
            .unwrap();
        assert_eq!(f.required_values(), Some(vec!["sha256:abc".to_string()]));
        let f = Filter::parse_all(&["parent==x", "labels.a==y"]).unwrap();
        assert_eq!(
            f.required_values(),
            Some(vec!["x".to_string(), "y".to_string()])
        );
        assert_eq!(
            Filter::parse_all(&["parent==x", "kind==active"])
                .unwrap()
                .required_values(),
            None
        );
        assert_eq!(
            Filter::parse("labels.a==\"q\\\"x\"")
                .unwrap()
                .required_values(),
            None
        );
        assert_eq!(Filter::parse("").unwrap().required_values(), None);
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "name=x",
            "name==",
            ",",
            "name==a,",
            "1abc==x",
            "name==\"unterminated",
            "name~=(",
            "labels.\"a\\q\"",
            "name==a b",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(m(r#"labels."\x73imple"==v1"#));
    }
}
