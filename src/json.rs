//! A small strict JSON parser that keeps positions.
//!
//! serde_json forgets where a value was and silently keeps the last of two
//! duplicate keys; config validation needs both (every problem names its line
//! and column, and a duplicate flag name is an error). This parser follows
//! RFC 8259 strictly (no comments, no trailing commas, no NaN), never panics
//! on any input, limits nesting depth, and keeps numbers as their source text
//! so that range errors can quote them.

use std::fmt;

/// Maximum nesting depth of arrays and objects.
pub(crate) const MAX_DEPTH: usize = 128;

/// A position in the source: 1-based line and column (in characters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, counted in characters.
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A JSON value with the position where it starts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

/// The JSON value itself.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    /// The number's source text, already checked against the JSON grammar.
    Number(String),
    String(String),
    Array(Vec<Node>),
    /// Members in source order, duplicates kept.
    Object(Vec<Member>),
}

/// One `"key": value` member of an object.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Member {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Node {
    /// The members, if this is an object.
    pub fn kind_members(&self) -> Option<&[Member]> {
        match &self.kind {
            Kind::Object(m) => Some(m),
            _ => None,
        }
    }
}

impl Kind {
    /// The JSON type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Number(_) => "a number",
            Kind::String(_) => "a string",
            Kind::Array(_) => "an array",
            Kind::Object(_) => "an object",
        }
    }
}

/// A syntax error with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where the parser stopped.
    pub pos: Pos,
    /// What it expected or found.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)
    }
}

impl std::error::Error for SyntaxError {}

/// Parse one JSON document; only whitespace may follow it.
pub(crate) fn parse(input: &[u8]) -> Result<Node, SyntaxError> {
    let mut p = Parser {
        input,
        at: 0,
        line: 1,
        col: 1,
    };
    // Tolerate a UTF-8 byte order mark, as editors write one.
    if input.starts_with(b"\xEF\xBB\xBF") {
        p.at = 3;
    }
    // Find invalid UTF-8 up front so the error points at the offending byte.
    if let Err(e) = std::str::from_utf8(input.get(p.at..).unwrap_or_default()) {
        let bad = p.at + e.valid_up_to();
        while p.at < bad {
            p.bump();
        }
        return Err(p.error("invalid UTF-8"));
    }
    p.skip_ws();
    let node = p.value(0)?;
    p.skip_ws();
    if p.at < input.len() {
        return Err(p.error("unexpected data after the JSON value"));
    }
    Ok(node)
}

struct Parser<'a> {
    input: &'a [u8],
    at: usize,
    line: u32,
    col: u32,
}

impl Parser<'_> {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.col,
        }
    }

    fn error(&self, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos: self.pos(),
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.at).copied()
    }

    /// Advance over one byte, tracking line and (character) column.
    fn bump(&mut self) {
        if let Some(b) = self.peek() {
            self.at += 1;
            if b == b'\n' {
                self.line = self.line.saturating_add(1);
                self.col = 1;
            } else if b & 0xC0 != 0x80 {
                // Count characters, not UTF-8 continuation bytes.
                self.col = self.col.saturating_add(1);
            }
        }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.bump();
        }
    }

    fn expect_literal(&mut self, word: &str, kind: Kind) -> Result<Node, SyntaxError> {
        let pos = self.pos();
        for expected in word.bytes() {
            if self.peek() != Some(expected) {
                return Err(self.error(format!("invalid literal, expected `{word}`")));
            }
            self.bump();
        }
        Ok(Node { pos, kind })
    }

    fn value(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        match self.peek() {
            None => Err(self.error("unexpected end of input, expected a value")),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => {
                let pos = self.pos();
                let s = self.string()?;
                Ok(Node {
                    pos,
                    kind: Kind::String(s),
                })
            }
            Some(b't') => self.expect_literal("true", Kind::Bool(true)),
            Some(b'f') => self.expect_literal("false", Kind::Bool(false)),
            Some(b'n') => self.expect_literal("null", Kind::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b) => Err(self.error(format!("unexpected {}, expected a value", describe(b)))),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        let pos = self.pos();
        if depth >= MAX_DEPTH {
            return Err(self.error(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.bump(); // {
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.bump();
            return Ok(Node {
                pos,
                kind: Kind::Object(members),
            });
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(match self.peek() {
                    Some(b'}') => self.error("trailing comma before `}`"),
                    Some(b) => self.error(format!("unexpected {}, expected a string key", describe(b))),
                    None => self.error("unexpected end of input, expected a string key"),
                });
            }
            let key_pos = self.pos();
            let key = self.string()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.error(format!("expected `:` after key {key:?}")));
            }
            self.bump();
            self.skip_ws();
            let value = self.value(depth + 1)?;
            members.push(Member { key, key_pos, value });
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.bump(),
                Some(b'}') => {
                    self.bump();
                    return Ok(Node {
                        pos,
                        kind: Kind::Object(members),
                    });
                }
                Some(b) => return Err(self.error(format!("unexpected {}, expected `,` or `}}`", describe(b)))),
                None => return Err(self.error("unexpected end of input, expected `,` or `}`")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        let pos = self.pos();
        if depth >= MAX_DEPTH {
            return Err(self.error(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.bump(); // [
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.bump();
            return Ok(Node {
                pos,
                kind: Kind::Array(items),
            });
        }
        loop {
            self.skip_ws();
            if self.peek() == Some(b']') {
                return Err(self.error("trailing comma before `]`"));
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.bump(),
                Some(b']') => {
                    self.bump();
                    return Ok(Node {
                        pos,
                        kind: Kind::Array(items),
                    });
                }
                Some(b) => return Err(self.error(format!("unexpected {}, expected `,` or `]`", describe(b)))),
                None => return Err(self.error("unexpected end of input, expected `,` or `]`")),
            }
        }
    }

    fn number(&mut self) -> Result<Node, SyntaxError> {
        let pos = self.pos();
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.bump();
        }
        match self.peek() {
            Some(b'0') => {
                self.bump();
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.error("leading zeros are not allowed in numbers"));
                }
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.bump();
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected a digit after the decimal point"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.bump();
            if let Some(b'+' | b'-') = self.peek() {
                self.bump();
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected a digit in the exponent"));
            }
            self.digits();
        }
        let text = self.input.get(start..self.at).unwrap_or_default();
        // Only ASCII digits and signs were consumed.
        let text = String::from_utf8_lossy(text).into_owned();
        Ok(Node {
            pos,
            kind: Kind::Number(text),
        })
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.bump();
        }
    }

    fn hex4(&mut self) -> Result<u16, SyntaxError> {
        let mut v: u16 = 0;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.error("expected four hex digits after `\\u`")),
            };
            v = (v << 4) | u16::from(d);
            self.bump();
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        self.bump(); // opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err(self.error("unterminated string"));
            };
            match b {
                b'"' => {
                    self.bump();
                    return String::from_utf8(out).map_err(|_| self.error("string is not valid UTF-8"));
                }
                b'\\' => {
                    self.bump();
                    let Some(e) = self.peek() else {
                        return Err(self.error("unterminated escape"));
                    };
                    let simple = match e {
                        b'"' => Some(b'"'),
                        b'\\' => Some(b'\\'),
                        b'/' => Some(b'/'),
                        b'b' => Some(0x08),
                        b'f' => Some(0x0c),
                        b'n' => Some(b'\n'),
                        b'r' => Some(b'\r'),
                        b't' => Some(b'\t'),
                        b'u' => None,
                        _ => return Err(self.error(format!("invalid escape `\\{}`", char::from(e)))),
                    };
                    self.bump();
                    if let Some(c) = simple {
                        out.push(c);
                        continue;
                    }
                    let hi = self.hex4()?;
                    let code = if (0xD800..0xDC00).contains(&hi) {
                        if self.peek() != Some(b'\\') {
                            return Err(self.error("unpaired UTF-16 surrogate in `\\u` escape"));
                        }
                        self.bump();
                        if self.peek() != Some(b'u') {
                            return Err(self.error("unpaired UTF-16 surrogate in `\\u` escape"));
                        }
                        self.bump();
                        let lo = self.hex4()?;
                        if !(0xDC00..0xE000).contains(&lo) {
                            return Err(self.error("invalid low surrogate in `\\u` escape"));
                        }
                        0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
                    } else if (0xDC00..0xE000).contains(&hi) {
                        return Err(self.error("unpaired UTF-16 surrogate in `\\u` escape"));
                    } else {
                        u32::from(hi)
                    };
                    let c = char::from_u32(code).ok_or_else(|| self.error("invalid `\\u` escape"))?;
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return Err(self.error("control character in string (escape it)")),
                _ => {
                    // Copy the run of plain bytes at once (no newlines in it).
                    let rest = self.input.get(self.at..).unwrap_or_default();
                    let run = rest
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                        .unwrap_or(rest.len());
                    let chunk = rest.get(..run).unwrap_or_default();
                    out.extend_from_slice(chunk);
                    let chars = chunk.iter().filter(|&&c| c & 0xC0 != 0x80).count();
                    self.col = self.col.saturating_add(u32::try_from(chars).unwrap_or(u32::MAX));
                    self.at += run;
                }
            }
        }
    }
}

fn describe(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("`{}`", char::from(b))
    } else {
        format!("byte 0x{b:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_with_positions() {
        let n = parse(b"{\n  \"a\": [1, -2.5e3, true, null],\n  \"b\": \"x\\u00e9\\ud83d\\ude00\"\n}").unwrap();
        let Kind::Object(m) = n.kind else { panic!() };
        assert_eq!(m[0].key, "a");
        assert_eq!(m[0].key_pos, Pos { line: 2, column: 3 });
        assert_eq!(m[1].value.kind, Kind::String("xé😀".into()));
        assert_eq!(m[1].value.pos, Pos { line: 3, column: 8 });
        let Kind::Array(items) = &m[0].value.kind else { panic!() };
        assert_eq!(items[1].kind, Kind::Number("-2.5e3".into()));
    }

    #[test]
    fn keeps_duplicate_keys() {
        let n = parse(br#"{"a": 1, "a": 2}"#).unwrap();
        let Kind::Object(m) = n.kind else { panic!() };
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn rejects_what_rfc8259_rejects() {
        for (bad, line, col) in [
            (&b"{\"a\": 1,}"[..], 1, 9),
            (b"[1,]", 1, 4),
            (b"{\n\"a\" 1}", 2, 5),
            (b"01", 1, 2),
            (b"\"abc", 1, 5),
            (b"[1] x", 1, 5),
            (b"NaN", 1, 1),
            (b"\"\xff\"", 1, 2),
            (b"", 1, 1),
            (b"\"\\ud800\"", 1, 8),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(
                (e.pos.line, e.pos.column),
                (line, col),
                "{:?}: {e}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn limits_depth() {
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).unwrap_err().message.contains("nesting"));
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(ok.as_bytes()).is_ok());
    }
}
