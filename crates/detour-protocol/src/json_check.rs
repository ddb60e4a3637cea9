//! Whether bytes are one JSON value that serde_json would read, without
//! reading it: the check a passthrough body needs for the parts the typed
//! request check skips (serde_json skips unknown fields without checking
//! their strings' UTF-8, their escapes or their depth).
//!
//! It accepts exactly what `serde_json::from_slice::<serde_json::Value>`
//! accepts (a unit test compares the two on generated and mutated bodies):
//! RFC 8259's grammar; strings that are UTF-8, with no control characters
//! and no lone surrogate escapes; at most 127 nested arrays and objects
//! (serde_json's recursion limit); no number an `f64` cannot hold (`1e400`).
//!
//! One pass, no allocation: the UTF-8 check over the whole body (non-ASCII
//! bytes are only valid inside strings, so that is the strings' check), then
//! the grammar, eight string bytes at a time.

use std::fmt;

/// serde_json's default recursion limit: a 128th nested array or object is
/// refused.
const MAX_DEPTH: u32 = 127;

/// Where and why a body is not JSON that serde_json would read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    what: &'static str,
    line: usize,
    column: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {} column {}",
            self.what, self.line, self.column
        )
    }
}

impl std::error::Error for JsonError {}

/// Checks that `body` is one JSON value (surrounded by whitespace at most).
pub fn check(body: &[u8]) -> Result<(), JsonError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(error(body, e.valid_up_to(), "invalid UTF-8"));
    }
    Scan { b: body, i: 0 }.document()
}

/// The error at byte `at`, with serde_json's one-based line and column.
fn error(body: &[u8], at: usize, what: &'static str) -> JsonError {
    let before = body.get(..at).unwrap_or(body);
    let line = 1 + memchr::memchr_iter(b'\n', before).count();
    let column = 1 + before.len() - memchr::memrchr(b'\n', before).map_or(0, |nl| nl + 1);
    JsonError { what, line, column }
}

/// A cursor that checks what it walks over. [`check`] walks a whole
/// document with it; a reader that picks fields out of a body can walk the
/// body with it instead (`openai::ChatFields::read`), so that the body is
/// checked and read in one pass.
pub(crate) struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    /// At the start of `body`; `None` if it is not UTF-8.
    pub(crate) fn new(body: &'a [u8]) -> Option<Self> {
        std::str::from_utf8(body).ok()?;
        Some(Scan { b: body, i: 0 })
    }

    /// The next byte after whitespace, not consumed.
    pub(crate) fn next_byte(&mut self) -> Option<u8> {
        self.skip_ws();
        self.peek()
    }

    /// Consumes `byte` if it comes next after whitespace.
    pub(crate) fn eat(&mut self, byte: u8) -> bool {
        let next = self.next_byte() == Some(byte);
        self.i += usize::from(next);
        next
    }

    /// An object's key and its colon, after whitespace: the key as written,
    /// between its quotes.
    pub(crate) fn member_key(&mut self) -> Result<&'a [u8], JsonError> {
        self.expect(b'"', "key must be a string")?;
        let start = self.i;
        self.string()?;
        let key = self.b.get(start..self.i - 1).unwrap_or_default();
        self.expect(b':', "expected `:`")?;
        Ok(key)
    }

    /// Only whitespace is left.
    pub(crate) fn finish(&mut self) -> Result<(), JsonError> {
        self.skip_ws();
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.fail("trailing characters")),
        }
    }

    fn fail(&self, what: &'static str) -> JsonError {
        error(self.b, self.i, what)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            self.i += 1;
        }
    }

    /// Consumes `byte` (after whitespace) or fails with `what`.
    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        self.skip_ws();
        if self.peek() != Some(byte) {
            return Err(self.fail(what));
        }
        self.i += 1;
        Ok(())
    }

    /// An object's key and its colon.
    fn key(&mut self) -> Result<(), JsonError> {
        self.member_key().map(drop)
    }

    /// The whole document.
    fn document(&mut self) -> Result<(), JsonError> {
        self.value(0)?;
        self.finish()
    }

    /// One whole value, after whitespace, inside `outer` open containers:
    /// where it is. The containers it opens are a stack of bits (1: an
    /// object), as deep as the limit allows.
    pub(crate) fn value(&mut self, outer: u32) -> Result<std::ops::Range<usize>, JsonError> {
        let mut objects: u128 = 0;
        let mut depth = outer;
        self.skip_ws();
        let start = self.i;
        loop {
            // A value is expected here.
            self.skip_ws();
            let Some(byte) = self.peek() else {
                return Err(self.fail("EOF while parsing a value"));
            };
            match byte {
                b'{' | b'[' => {
                    if depth + 1 > MAX_DEPTH {
                        return Err(self.fail("recursion limit exceeded"));
                    }
                    self.i += 1;
                    depth += 1;
                    let object = byte == b'{';
                    objects = objects << 1 | u128::from(object);
                    self.skip_ws();
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                        depth -= 1;
                        objects >>= 1;
                    } else {
                        if object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.i += 1;
                    self.string()?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return Err(self.fail("expected value")),
            }
            // A value ended: close containers until one goes on.
            loop {
                if depth == outer {
                    return Ok(start..self.i);
                }
                self.skip_ws();
                let object = objects & 1 == 1;
                match (self.peek(), object) {
                    (Some(b','), _) => {
                        self.i += 1;
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.i += 1;
                        depth -= 1;
                        objects >>= 1;
                    }
                    (None, _) => return Err(self.fail("EOF while parsing a container")),
                    (Some(_), true) => return Err(self.fail("expected `,` or `}`")),
                    (Some(_), false) => return Err(self.fail("expected `,` or `]`")),
                }
            }
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        if self.b.get(self.i..self.i + word.len()) != Some(word) {
            return Err(self.fail("expected value"));
        }
        self.i += word.len();
        Ok(())
    }

    /// A string's rest, its opening quote consumed.
    fn string(&mut self) -> Result<(), JsonError> {
        loop {
            self.i = special_from(self.b, self.i);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    self.escape()?;
                }
                Some(_) => return Err(self.fail("control character while parsing a string")),
                None => return Err(self.fail("EOF while parsing a string")),
            }
        }
    }

    /// An escape's rest, its backslash consumed; a leading surrogate must be
    /// followed by a trailing one, and a trailing one cannot stand alone.
    fn escape(&mut self) -> Result<(), JsonError> {
        let Some(byte) = self.peek() else {
            return Err(self.fail("EOF while parsing a string"));
        };
        self.i += 1;
        match byte {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Ok(()),
            b'u' => match self.hex4()? {
                0xDC00..=0xDFFF => Err(self.fail("lone leading surrogate in hex escape")),
                0xD800..=0xDBFF => {
                    if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                        return Err(self.fail("unexpected end of hex escape"));
                    }
                    self.i += 2;
                    match self.hex4()? {
                        0xDC00..=0xDFFF => Ok(()),
                        _ => Err(self.fail("lone leading surrogate in hex escape")),
                    }
                }
                _ => Ok(()),
            },
            _ => Err(self.fail("invalid escape")),
        }
    }

    fn hex4(&mut self) -> Result<u16, JsonError> {
        let mut n: u16 = 0;
        for _ in 0..4 {
            let Some(byte) = self.peek() else {
                return Err(self.fail("EOF while parsing a string"));
            };
            let Some(digit) = char::from(byte).to_digit(16) else {
                return Err(self.fail("invalid escape"));
            };
            n = n << 4 | digit as u16;
            self.i += 1;
        }
        Ok(n)
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, and a value
    /// an `f64` can hold: only a number with an exponent or a long integer
    /// part can overflow, and only those are converted.
    fn number(&mut self) -> Result<(), JsonError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        match self.peek() {
            // No leading zeros.
            Some(b'0') if self.b.get(self.i + 1).is_some_and(u8::is_ascii_digit) => {
                return Err(self.fail("invalid number"))
            }
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.fail("invalid number")),
        }
        let int_digits = self.i - int_start;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
                return Err(self.fail("invalid number"));
            }
            self.digits();
        }
        let mut exponent = false;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            exponent = true;
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
                return Err(self.fail("invalid number"));
            }
            self.digits();
        }
        if exponent || int_digits > 300 {
            let literal = self.b.get(start..self.i).unwrap_or_default();
            let text = std::str::from_utf8(literal).unwrap_or("inf");
            if !text.parse::<f64>().is_ok_and(f64::is_finite) {
                self.i = start;
                return Err(self.fail("number out of range"));
            }
        }
        Ok(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
    }
}

/// The first byte from `from` that ends a string's plain run: a quote, a
/// backslash or a control character (or the end). Eight bytes at a time: in
/// each word, the lowest byte flagged by the bit tricks below is the first
/// such byte (a borrow only ever flags bytes above a true one).
fn special_from(b: &[u8], from: usize) -> usize {
    const ONES: u64 = u64::MAX / 255;
    const HIGHS: u64 = ONES << 7;
    let mut i = from;
    let rest = b.get(from..).unwrap_or_default();
    let mut words = rest.chunks_exact(8);
    for word in words.by_ref() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let w = u64::from_le_bytes(bytes);
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        let q = w ^ (ONES * u64::from(b'"'));
        let quote = q.wrapping_sub(ONES) & !q;
        let s = w ^ (ONES * u64::from(b'\\'));
        let backslash = s.wrapping_sub(ONES) & !s;
        let found = (control | quote | backslash) & HIGHS;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    for &byte in words.remainder() {
        if byte == b'"' || byte == b'\\' || byte < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde_json's verdict, the reference this module must match.
    fn serde_accepts(body: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(body).is_ok()
    }

    fn agree(body: &[u8]) {
        assert_eq!(
            check(body).is_ok(),
            serde_accepts(body),
            "{:?}: {:?}",
            String::from_utf8_lossy(body),
            check(body)
        );
    }

    #[test]
    fn agrees_with_serde_json_on_the_edges() {
        let cases: &[&[u8]] = &[
            b"{}",
            b"[]",
            b" {} ",
            b"{",
            b"}",
            b"",
            b" ",
            b"[1,]",
            b"[,1]",
            b"{\"a\":1,}",
            b"{\"a\"}",
            b"{\"a\":}",
            b"{1:2}",
            b"{\"a\":1 \"b\":2}",
            b"[1 2]",
            b"[1]]",
            b"{\"a\":1}}",
            b"[}",
            b"{]",
            b"true",
            b"tru",
            b"truex",
            b"nul",
            b"null",
            b"false",
            b"[true,false,null]",
            b"0",
            b"-0",
            b"01",
            b"-01",
            b"-",
            b"1.",
            b"1.5",
            b".5",
            b"1e5",
            b"1e",
            b"1e+",
            b"1e-5",
            b"1E+5",
            b"-1.5e-300",
            b"1e400",
            b"-1e400",
            b"0e400",
            b"0.0e999999999999999999",
            b"1e-400",
            b"1e308",
            b"1.7e308",
            b"1.8e308",
            b"18446744073709551616",
            b"1x",
            b"\"\"",
            b"\"a\"",
            b"\"\\\"\"",
            b"\"\\/\"",
            b"\"\\x\"",
            b"\"\\u00e9\"",
            b"\"\\u00G9\"",
            b"\"\\u00e\"",
            b"\"\\ud83d\\ude00\"",
            b"\"\\ud83d\"",
            b"\"\\ud83dx\"",
            b"\"\\ud83d\\n\"",
            b"\"\\ud83d\\u0041\"",
            b"\"\\ude00\"",
            b"\"\\udc00\"",
            b"\"\\udfff\"",
            b"\"\\ud7ff\"",
            b"\"\\ue000\"",
            b"\"\\ud800\\udbff\"",
            b"\"\\ud800\\ue000\"",
            b"\"\\uDBFF\\uDFFF\"",
            b"\"a\tb\"",
            b"\"a\x00b\"",
            b"\"a\x1fb\"",
            b"\"a\x7fb\"",
            b"\"caf\xc3\xa9\"",
            b"\"\xff\"",
            b"\"\xc3\x28\"",
            b"\"\xe2\x82\"",
            b"\"unterminated",
            b"\"ends in escape\\",
            b"\"0123456789abcdef\"",
            b"\"0123456789abcde\\\"\"",
            b"{\"k\":\"v\",\"n\":[1,{\"x\":[]}]}",
            b"\t\r\n[1]\n",
            b"\x0c[1]",
            b"[1]\x00",
            b"\xef\xbb\xbf{}",
        ];
        for case in cases {
            agree(case);
        }
        // The whole number range: long integer parts, with or without an
        // exponent that brings them back.
        let long = "9".repeat(400);
        for text in [
            long.clone(),
            format!("{long}e-200"),
            format!("0.{long}"),
            format!("1{}", "0".repeat(308)),
            format!("1{}", "0".repeat(309)),
        ] {
            agree(text.as_bytes());
        }
    }

    #[test]
    fn the_depth_limit_is_serde_jsons() {
        for depth in [1, 126, 127, 128, 129, 100_000] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let mut body = open.repeat(depth);
                body.push('1');
                body.push_str(&close.repeat(depth));
                agree(body.as_bytes());
            }
            let mut body = "[".repeat(depth);
            body.push_str(&"]".repeat(depth));
            agree(body.as_bytes());
        }
    }

    #[test]
    fn errors_say_where() {
        let e = check(b"{\"a\":\n  [1,\"\xff\"]}").unwrap_err();
        assert_eq!(e.to_string(), "invalid UTF-8 at line 2 column 7");
        let e = check(b"{\"a\":1e400}").unwrap_err();
        assert_eq!(e.to_string(), "number out of range at line 1 column 6");
        let e = check(b"[1,2").unwrap_err();
        assert_eq!(
            e.to_string(),
            "EOF while parsing a container at line 1 column 5"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Bodies built from JSON's pieces (valid or not), and valid bodies
        /// with a few bytes changed: the two verdicts agree.
        #[test]
        fn agrees_with_serde_json(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "{", "}", "[", "]", ",", ":", " ", "\"k\"", "\"v\\n\"", "\"\\u00e9\"",
                    "\"\\ud83d\\ude00\"", "\"\\ud83d\"", "\"\\ude00\"", "\"\\q\"", "1", "-0",
                    "2.5", "1e3", "1e400", "01", "-", ".", "e", "true", "null", "fals",
                    "\"\u{e9}\"", "\"\t\"", "\"", "\\",
                ]),
                0..24,
            ),
        ) {
            agree(pieces.concat().as_bytes());
        }

        #[test]
        fn agrees_with_serde_json_on_mutations(
            flips in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 0..3),
            text in "\\PC{0,10}",
        ) {
            let valid = serde_json::json!({
                "model": "m",
                "messages": [{"role": "user", "content": text}],
                "x": {"n": [1, -2.5, 3e10, null, true], "s": "caf\u{e9} \u{1f600} \"q\""},
            });
            let mut body = serde_json::to_vec(&valid).unwrap_or_default();
            for (at, byte) in flips {
                let at = at % body.len().max(1);
                if let Some(b) = body.get_mut(at) {
                    *b = byte;
                }
            }
            agree(&body);
        }
    }
}
