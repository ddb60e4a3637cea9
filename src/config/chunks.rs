//! A config with many keys, parsed a batch of `[[keys]]` tables at a time.
//!
//! Parsing a TOML document costs about 45 bytes per byte of text at its
//! peak (toml's token and event vectors, then the table, then the serde
//! structs), and glibc keeps that peak resident once it is freed: freeing
//! chunks that large raises its mmap and trim thresholds, after which the
//! heap is not given back. A file of 20,000 keys (1.6 MB) peaked at 75 MiB
//! and idled at twice what its keys really hold.
//!
//! So a file with many `[[keys]]` tables is parsed in parts: one streaming
//! pass of toml's lexer (no token vector) finds the top-level `[[keys]]`
//! tables ([`Plan::new`]); the rest of the document is parsed once without
//! them ([`Plan::rest`]), then the tables [`BATCH`] at a time, each batch's
//! tables copied out together ([`Plan::batch`]). Each part comes with its
//! [`Offsets`], which take a span in the part back to the file, so every
//! diagnostic's line and column is the file's own. The peak is then one
//! batch's, not the file's (toml sizes its token vector from the length of
//! the text it is given: the parts are short, not blanked copies of the
//! file).
//!
//! Anything the pass does not recognise plainly (a header that names `keys`
//! in any other way: `[keys.x]`, `[["keys"]]`, `[[ keys . x ]]`) leaves the
//! file to the one whole parse, and so does any batch that does not parse
//! cleanly: the whole parse then reports every problem as before.

use std::ops::Range;

use toml_parser::lexer::TokenKind;

/// `[[keys]]` tables parsed together.
pub(super) const BATCH: usize = 256;

/// Smaller files are parsed whole: their peak is small.
const MIN_TEXT_BYTES: usize = 256 * 1024;

/// Where the top-level `[[keys]]` tables of a large file are.
#[derive(Debug)]
pub(super) struct Plan {
    /// Each table from its header to the next header (or the end).
    sections: Vec<Range<usize>>,
}

impl Plan {
    /// The plan for `text`, if it is large, has more `[[keys]]` tables than
    /// one batch and names `keys` in no other header.
    pub(super) fn new(text: &str) -> Option<Plan> {
        if text.len() < MIN_TEXT_BYTES {
            return None;
        }
        let sections = key_sections(text)?;
        (sections.len() > BATCH).then_some(Plan { sections })
    }

    /// How many `[[keys]]` tables the file has.
    pub(super) fn len(&self) -> usize {
        self.sections.len()
    }

    /// How many batches they are parsed in.
    pub(super) fn batches(&self) -> usize {
        self.sections.len().div_ceil(BATCH)
    }

    /// The text without its `[[keys]]` tables.
    pub(super) fn rest(&self, text: &str) -> (String, Offsets) {
        let keys: usize = self.sections.iter().map(ExactSizeIterator::len).sum();
        let mut out = String::with_capacity(text.len() - keys);
        let mut offsets = Offsets::default();
        let mut at = 0;
        for s in self.sections.iter().chain([&(text.len()..text.len())]) {
            offsets.0.push((out.len(), at));
            out.push_str(&text[at..s.start]);
            at = s.end;
        }
        (out, offsets)
    }

    /// Batch `b`'s tables, one after the other in `buf`; the index of its
    /// first table, how many it has, and where they are in the file.
    pub(super) fn batch(&self, text: &str, b: usize, buf: &mut String) -> (usize, usize, Offsets) {
        let first = b * BATCH;
        let sections = &self.sections[first..(first + BATCH).min(self.sections.len())];
        buf.clear();
        let mut offsets = Offsets::default();
        for s in sections {
            offsets.0.push((buf.len(), s.start));
            buf.push_str(&text[s.clone()]);
            // A table that ends the file may end without a line break.
            if !buf.ends_with('\n') {
                buf.push('\n');
            }
        }
        (first, sections.len(), offsets)
    }
}

/// Where the pieces of a part are in the file: (offset in the part, offset
/// in the file) of each piece's start, in order. Empty: the file itself.
#[derive(Debug, Default)]
pub(super) struct Offsets(Vec<(usize, usize)>);

impl Offsets {
    /// The file's offset of `at`, an offset in the part.
    pub(super) fn in_file(&self, at: usize) -> usize {
        let i = self.0.partition_point(|&(part, _)| part <= at);
        match i.checked_sub(1).and_then(|i| self.0.get(i)) {
            Some(&(part, file)) => file + (at - part),
            None => at,
        }
    }
}

/// What one table header is.
enum Header {
    /// `[[keys]]`, exactly.
    Keys,
    /// A header that does not mention `keys`.
    Other,
    /// Mentions `keys` some other way: not for this plan.
    Unsure,
}

/// The top-level `[[keys]]` tables of `text`, or `None` if a header names
/// `keys` some other way.
fn key_sections(text: &str) -> Option<Vec<Range<usize>>> {
    let mut sections = Vec::new();
    let mut open: Option<usize> = None;
    // Brackets and braces of values (arrays, inline tables) still open.
    let mut depth = 0usize;
    let mut line_start = true;
    let mut tokens = toml_parser::Source::new(text).lex();
    while let Some(token) = tokens.next() {
        match token.kind() {
            TokenKind::Newline => {
                line_start = true;
                continue;
            }
            TokenKind::Whitespace | TokenKind::Comment => continue,
            TokenKind::Eof => break,
            TokenKind::LeftSquareBracket if depth == 0 && line_start => {
                let start = token.span().start();
                // The rest of the header's line.
                let mut name = String::new();
                let mut brackets = 1;
                for t in tokens.by_ref() {
                    match t.kind() {
                        TokenKind::Newline | TokenKind::Eof => break,
                        TokenKind::Whitespace | TokenKind::Comment => {}
                        TokenKind::LeftSquareBracket => brackets += 1,
                        TokenKind::RightSquareBracket => {}
                        _ => name.push_str(text.get(t.span().start()..t.span().end())?),
                    }
                }
                let header = if brackets == 2 && name == "keys" {
                    Header::Keys
                } else if name.contains("keys") {
                    Header::Unsure
                } else {
                    Header::Other
                };
                if let Some(from) = open.take() {
                    sections.push(from..start);
                }
                match header {
                    Header::Keys => open = Some(start),
                    Header::Other => {}
                    Header::Unsure => return None,
                }
                line_start = true;
                continue;
            }
            TokenKind::LeftSquareBracket | TokenKind::LeftCurlyBracket => depth += 1,
            TokenKind::RightSquareBracket | TokenKind::RightCurlyBracket => {
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
        line_start = false;
    }
    if let Some(from) = open {
        sections.push(from..text.len());
    }
    Some(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_key_tables_and_nothing_else() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\
                    [[keys]]\nkey = \"a\"\nmodels = [\n  \"x\",\n  [1],\n]\n\
                    [[routes]] # a comment\nmodel = \"r\"\n\
                    \t[[ keys ]]\nkey = \"b\"\nnote = \"\"\"\n[[keys]]\n\"\"\"\n\
                    [tenants]\n";
        let sections = key_sections(text).unwrap();
        let got: Vec<&str> = sections.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(
            got,
            [
                "[[keys]]\nkey = \"a\"\nmodels = [\n  \"x\",\n  [1],\n]\n",
                "[[ keys ]]\nkey = \"b\"\nnote = \"\"\"\n[[keys]]\n\"\"\"\n",
            ]
        );
        for unsure in ["[keys.x]\n", "[[\"keys\"]]\n", "[[keys.limits]]\n"] {
            assert!(
                key_sections(&format!("[[keys]]\n{unsure}")).is_none(),
                "{unsure}"
            );
        }
    }

    #[test]
    fn every_part_knows_where_its_text_is_in_the_file() {
        let mut text = String::from("[server]\n\n");
        for i in 0..(BATCH + 5) {
            text.push_str(&format!("[[keys]]\r\nkey = \"é{i}\"\n\n"));
            if i == 7 {
                text.push_str("[[routes]]\nmodel = \"r\"\n");
            }
        }
        text.push_str(&" ".repeat(MIN_TEXT_BYTES));
        text.push_str("[[keys]]\nkey = \"last\"");
        let plan = Plan::new(&text).unwrap();
        assert_eq!((plan.len(), plan.batches()), (BATCH + 6, 2));
        let (rest, offsets) = plan.rest(&text);
        assert!(!rest.contains("keys") && rest.contains("[[routes]]"));
        let at = rest.find("[[routes]]").unwrap();
        assert_eq!(&text[offsets.in_file(at)..][..10], "[[routes]]");
        assert_eq!(offsets.in_file(3), 3);
        let mut buf = String::new();
        let (first, count, offsets) = plan.batch(&text, 1, &mut buf);
        assert_eq!((first, count), (BATCH, 6));
        assert!(!buf.contains("routes") && buf.starts_with("[[keys]]"));
        let needles = [
            format!("\"é{BATCH}\""),
            format!("\"é{}\"", BATCH + 4),
            "\"last\"".into(),
        ];
        for needle in &needles {
            let at = buf.find(needle.as_str()).unwrap();
            assert_eq!(&text[offsets.in_file(at)..][..needle.len()], needle);
        }
    }
}
