//! A strict reader for the one JSON shape a secret value has: a flat object whose fields of
//! interest are strings.
//!
//! Why not serde_json: its deserializer copies every string that contains an escape (and a
//! PEM key in JSON always has `\n`) into an internal scratch buffer that is freed without
//! being wiped, and its error messages may quote the offending value. This reader decodes
//! each wanted string straight into a [`Zeroizing`] buffer allocated once at its final
//! capacity (no reallocation leaves copies behind), and its errors carry only a byte offset.
//! Fields it is not asked for are checked for JSON syntax and skipped.
#![forbid(unsafe_code)]

use zeroize::Zeroizing;

/// How deeply an ignored field may nest arrays and objects.
const MAX_DEPTH: usize = 32;

/// Why a secret value is not the JSON object we expect. Never carries any part of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JsonError {
    /// Not JSON (bad syntax at this byte offset, or trailing data).
    Syntax { offset: usize },
    /// Valid start, but the top level is not an object.
    NotObject,
    /// A wanted field appears twice.
    Duplicate(&'static str),
    /// A wanted field is not a JSON string.
    NotString(&'static str),
    /// An ignored field nests deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// Reads `text` as one JSON object and returns the string value of each name in `wanted`
/// (same order; `None` when absent).
pub(crate) fn object_fields(
    text: &str,
    wanted: &[&'static str],
) -> Result<Vec<Option<Zeroizing<String>>>, JsonError> {
    let mut reader = Reader {
        bytes: text.as_bytes(),
        pos: 0,
    };
    let mut found: Vec<Option<Zeroizing<String>>> = wanted.iter().map(|_| None).collect();
    reader.skip_ws();
    if reader.peek() != Some(b'{') {
        // Valid JSON of another kind is "not an object"; anything else is a syntax error.
        reader.skip_value(0)?;
        reader.skip_ws();
        return Err(if reader.pos == reader.bytes.len() {
            JsonError::NotObject
        } else {
            reader.syntax()
        });
    }
    reader.pos += 1;
    reader.skip_ws();
    if reader.peek() == Some(b'}') {
        reader.pos += 1;
    } else {
        loop {
            reader.skip_ws();
            let key = reader.string()?;
            reader.skip_ws();
            reader.expect(b':')?;
            reader.skip_ws();
            match wanted.iter().position(|w| *w == key.as_str()) {
                Some(index) => {
                    let name = wanted.get(index).copied().unwrap_or("field");
                    if reader.peek() != Some(b'"') {
                        // Check the syntax first so that garbage reads as garbage.
                        reader.skip_value(0)?;
                        return Err(JsonError::NotString(name));
                    }
                    let value = reader.string()?;
                    match found.get_mut(index) {
                        Some(slot @ None) => *slot = Some(value),
                        _ => return Err(JsonError::Duplicate(name)),
                    }
                }
                None => reader.skip_value(0)?,
            }
            reader.skip_ws();
            match reader.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(reader.syntax_before()),
            }
        }
    }
    reader.skip_ws();
    if reader.pos != reader.bytes.len() {
        return Err(reader.syntax());
    }
    Ok(found)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn syntax(&self) -> JsonError {
        JsonError::Syntax { offset: self.pos }
    }

    /// Syntax error at the byte just consumed.
    fn syntax_before(&self) -> JsonError {
        JsonError::Syntax {
            offset: self.pos.saturating_sub(1),
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, want: u8) -> Result<(), JsonError> {
        if self.peek() == Some(want) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.syntax())
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), JsonError> {
        if self.bytes.get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.syntax())
        }
    }

    /// Length in bytes of the raw string body starting at `self.pos` (just after the opening
    /// quote), up to the closing quote. The decoded string is never longer.
    fn raw_string_len(&self) -> Result<usize, JsonError> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let mut i = 0;
        while let Some(&b) = rest.get(i) {
            match b {
                b'"' => return Ok(i),
                b'\\' => i += 2,
                _ => i += 1,
            }
        }
        Err(JsonError::Syntax {
            offset: self.bytes.len(),
        })
    }

    /// A JSON string, decoded into a buffer that is wiped when dropped.
    fn string(&mut self) -> Result<Zeroizing<String>, JsonError> {
        self.expect(b'"')?;
        let capacity = self.raw_string_len()?;
        let mut out = Zeroizing::new(String::with_capacity(capacity));
        loop {
            let start = self.pos;
            // Copy the longest run of plain bytes at once; the input is valid UTF-8 and the
            // run ends at an ASCII byte, so it is a whole number of characters.
            while matches!(self.peek(), Some(b) if b != b'"' && b != b'\\' && b >= 0x20) {
                self.pos += 1;
            }
            if self.pos > start {
                let run = self.bytes.get(start..self.pos).unwrap_or_default();
                let run =
                    std::str::from_utf8(run).map_err(|_| JsonError::Syntax { offset: start })?;
                out.push_str(run);
            }
            match self.next() {
                Some(b'"') => return Ok(out),
                Some(b'\\') => {
                    let escape_at = self.pos.saturating_sub(1);
                    let c = match self.next() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => self.unicode_escape(escape_at)?,
                        _ => return Err(JsonError::Syntax { offset: escape_at }),
                    };
                    out.push(c);
                }
                // A raw control character or the end of input.
                _ => return Err(self.syntax_before()),
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.bytes.get(self.pos..self.pos + 4)?;
        let mut value = 0u32;
        for &d in digits {
            value = value * 16 + char::from(d).to_digit(16)?;
        }
        self.pos += 4;
        Some(value)
    }

    /// The character of a `\uXXXX` escape (the `\u` already read), joining surrogate pairs.
    fn unicode_escape(&mut self, escape_at: usize) -> Result<char, JsonError> {
        let bad = JsonError::Syntax { offset: escape_at };
        let first = self.hex4().ok_or_else(|| bad.clone())?;
        let code = match first {
            0xD800..=0xDBFF => {
                if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(bad);
                }
                self.pos += 2;
                let second = self.hex4().ok_or_else(|| bad.clone())?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(bad);
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(bad),
            other => other,
        };
        char::from_u32(code).ok_or(bad)
    }

    /// Checks and skips one JSON value of a field nobody asked for.
    fn skip_value(&mut self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => {
                self.pos += 1;
                self.skip_ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    self.skip_ws();
                    self.string()?;
                    self.skip_ws();
                    self.expect(b':')?;
                    self.skip_ws();
                    self.skip_value(depth + 1)?;
                    self.skip_ws();
                    match self.next() {
                        Some(b',') => continue,
                        Some(b'}') => return Ok(()),
                        _ => return Err(self.syntax_before()),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                self.skip_ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    self.skip_ws();
                    self.skip_value(depth + 1)?;
                    self.skip_ws();
                    match self.next() {
                        Some(b',') => continue,
                        Some(b']') => return Ok(()),
                        _ => return Err(self.syntax_before()),
                    }
                }
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.syntax()),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.syntax()),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.syntax());
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.syntax());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WANTED: &[&str] = &["UserName", "Password"];

    fn fields(text: &str) -> Result<Vec<Option<String>>, JsonError> {
        object_fields(text, WANTED).map(|v| {
            v.into_iter()
                .map(|f| f.map(|s| s.as_str().to_owned()))
                .collect()
        })
    }

    #[test]
    fn reads_wanted_string_fields() {
        let got = fields(r#" {"UserName":"root","Password":"p\"w\\d\n\u00e9\ud83d\ude00/"} "#);
        assert_eq!(
            got,
            Ok(vec![
                Some("root".into()),
                Some("p\"w\\d\n\u{e9}\u{1F600}/".into())
            ])
        );
    }

    #[test]
    fn absent_fields_are_none_and_others_are_skipped() {
        let got = fields(
            r#"{"Other":[1,-2.5e+3,{"a":null,"b":[true,false]},"x"],"UserName":"u","Z":{}}"#,
        );
        assert_eq!(got, Ok(vec![Some("u".into()), None]));
        assert_eq!(fields("{}"), Ok(vec![None, None]));
    }

    #[test]
    fn escaped_key_names_match() {
        assert_eq!(
            fields(r#"{"User\u004eame":"u"}"#),
            Ok(vec![Some("u".into()), None])
        );
    }

    #[test]
    fn rejects_duplicates_and_non_strings() {
        assert_eq!(
            fields(r#"{"UserName":"a","UserName":"b"}"#),
            Err(JsonError::Duplicate("UserName"))
        );
        assert_eq!(
            fields(r#"{"Password":12}"#),
            Err(JsonError::NotString("Password"))
        );
        assert_eq!(
            fields(r#"{"Password":null}"#),
            Err(JsonError::NotString("Password"))
        );
        assert_eq!(
            fields(r#"{"Password":{"a":1}}"#),
            Err(JsonError::NotString("Password"))
        );
    }

    #[test]
    fn rejects_non_objects_and_bad_syntax() {
        assert_eq!(fields(r#"["a"]"#), Err(JsonError::NotObject));
        assert_eq!(fields(r#""a""#), Err(JsonError::NotObject));
        for bad in [
            "",
            "   ",
            "{",
            "{\"UserName\"}",
            "{\"UserName\":\"a\"",
            "{\"UserName\":\"a\",}",
            "{\"UserName\":\"a\"} x",
            "{\"UserName\":\"a\nb\"}",
            "{\"UserName\":\"\\x\"}",
            "{\"UserName\":\"\\ud800\"}",
            "{\"UserName\":\"\\udc00\"}",
            "{\"UserName\":\"\\u12\"}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":[1,]}",
            "{'a':1}",
            "\u{feff}{}",
        ] {
            assert!(
                matches!(fields(bad), Err(JsonError::Syntax { .. })),
                "accepted {bad:?}: {:?}",
                fields(bad)
            );
        }
    }

    #[test]
    fn rejects_deep_nesting() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(fields(&deep), Err(JsonError::TooDeep));
    }

    #[test]
    fn errors_carry_no_input() {
        let err = fields(r#"{"Password":"hunter2"#).unwrap_err();
        assert!(!format!("{err:?}").contains("hunter2"));
    }

    /// Escape every character as `\uXXXX` (pairs beyond the BMP), the most roundabout form.
    fn escape_all(s: &str) -> String {
        let mut out = String::from("\"");
        for unit in s.encode_utf16() {
            out.push_str(&format!("\\u{unit:04x}"));
        }
        out.push('"');
        out
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json(
            user in any::<String>(),
            password in proptest::option::of(any::<String>()),
            extra in proptest::collection::btree_map("[a-zA-Z]{1,8}", any::<i64>(), 0..4),
            roundabout in any::<bool>(),
        ) {
            let mut object = serde_json::Map::new();
            for (k, v) in &extra {
                object.insert(k.clone(), serde_json::Value::from(*v));
            }
            let text = if roundabout {
                let mut t = format!("{{\"UserName\":{}", escape_all(&user));
                if let Some(p) = &password {
                    t.push_str(&format!(",\"Password\":{}", escape_all(p)));
                }
                for (k, v) in &extra {
                    t.push_str(&format!(",\"{k}\":{v}"));
                }
                t.push('}');
                t
            } else {
                object.insert("UserName".into(), serde_json::Value::from(user.clone()));
                if let Some(p) = &password {
                    object.insert("Password".into(), serde_json::Value::from(p.clone()));
                }
                serde_json::to_string(&object).unwrap()
            };
            prop_assert_eq!(fields(&text), Ok(vec![Some(user), password]));
        }

        #[test]
        fn never_panics_on_arbitrary_text(text in any::<String>()) {
            let _ = fields(&text);
        }

        #[test]
        fn never_panics_on_json_like_text(text in "[{}\\[\\]\":,\\\\u0-9a-fA-Ftrnl .eE+-]{0,64}") {
            let ours = fields(&text);
            // Wherever serde_json rejects the text as JSON, so do we.
            if serde_json::from_str::<serde_json::Value>(&text).is_err() {
                prop_assert!(ours.is_err());
            }
        }
    }
}
