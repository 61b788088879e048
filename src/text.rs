//! Text from untrusted sources (rows, server messages) made safe for terminals and line-based
//! logs. Shared by the library and the `outbox-relay` binary (`#[path]`-included there).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` can move the cursor, recolour, clear the screen, start a new log line or reorder
/// text on a terminal: C0 controls (including `\n`, `\r`, ESC), DEL, C1 controls (U+0080–U+009F,
/// e.g. the 8-bit CSI U+009B), and the bidirectional overrides and isolates (U+202A–U+202E,
/// U+2066–U+2069).
pub(crate) fn is_unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every [unsafe character](is_unsafe_char) written as a Rust-style escape (`\n`, `\r`,
/// `\t`, `\u{1b}`); the text is borrowed unchanged when there is none. A backslash is kept as
/// is, so the result is for reading, not for parsing back.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`printable`] line by line: keeps the line breaks of multi-line text (usage messages).
#[allow(dead_code)] // used by the binary only
pub(crate) fn printable_lines(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|line| match line.strip_suffix('\n') {
            Some(l) => format!("{}\n", printable(l)),
            None => printable(line).into_owned(),
        })
        .collect()
}

/// A JSON value as one line of JSON text in which no [unsafe character](is_unsafe_char) appears
/// raw: serde_json already escapes C0 controls; DEL, C1 controls and bidi controls (which can
/// only occur inside strings) become `\uXXXX` escapes. Parses back to the same value.
#[allow(dead_code)] // used by the binary only
pub(crate) fn json_line(v: &serde_json::Value) -> String {
    let text = v.to_string();
    if !text.chars().any(is_unsafe_char) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_unsafe_char(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_terminal_controls_only() {
        assert!(matches!(printable("orders.v1 ü 😀"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\u{1b}[2J\r\nTOTAL\u{9b}1m\u{202e}x\u{7f}"),
            "a\\u{1b}[2J\\r\\nTOTAL\\u{9b}1m\\u{202e}x\\u{7f}"
        );
    }

    #[test]
    fn json_lines_parse_back_unchanged() {
        let v = serde_json::json!({"t": "a\u{1b}[2J\u{9b}\u{7f}\u{202e}\n"});
        let line = json_line(&v);
        assert!(!line.chars().any(is_unsafe_char), "{line}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap(), v);
    }
}
