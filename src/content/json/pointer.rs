//! One value of an upstream's answer, read leniently outside its path.
//!
//! An answer is read for one value (a job id, a state, a settled figure) at
//! an RFC 6901 pointer. What lies outside the pointer's path is only
//! checked for well-formed JSON syntax: a string with a lone surrogate or
//! nesting of any depth elsewhere (a prompt echoed back, say) does not make
//! the answer unreadable, and nothing there is kept. On the path, an object
//! with the same key twice is ambiguous (clients disagree on which one they
//! see) and the value found is parsed strictly ([`super::parse_strict`]):
//! either is [`Malformed`]. Skipping is iterative, so no nesting depth can
//! exhaust the stack.

use serde_json::Value;

/// The answer could not be read where the pointer leads (or is not JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The value at `pointer` in the JSON document `doc`: `Ok(None)` when the
/// document is well-formed and has nothing there.
pub fn lookup(doc: &[u8], pointer: &str) -> Result<Option<Value>, Malformed> {
    let tokens: Vec<String> = if pointer.is_empty() {
        Vec::new()
    } else {
        pointer
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect()
    };
    let mut r = Reader { doc, pos: 0 };
    r.ws();
    let found = r.find(&tokens)?;
    r.ws();
    if r.pos != doc.len() {
        return Err(Malformed("not JSON: text after the document"));
    }
    match found {
        None => Ok(None),
        Some((start, end)) => super::parse_strict(&doc[start..end])
            .map(Some)
            .map_err(|_| Malformed("malformed value at the pointer")),
    }
}

const NOT_JSON: Malformed = Malformed("not JSON");

struct Reader<'a> {
    doc: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.doc.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn consume(&mut self, byte: u8) -> Result<(), Malformed> {
        self.ws();
        if self.peek() != Some(byte) {
            return Err(NOT_JSON);
        }
        self.pos += 1;
        Ok(())
    }

    /// The value at `pos` searched for `tokens`; the span of what they lead
    /// to, if anything. Recursion is bounded by the pointer's length.
    fn find(&mut self, tokens: &[String]) -> Result<Option<(usize, usize)>, Malformed> {
        self.ws();
        let Some((token, rest)) = tokens.split_first() else {
            let start = self.pos;
            self.skip_value()?;
            return Ok(Some((start, self.pos)));
        };
        match self.peek() {
            Some(b'{') => self.find_in_object(token, rest),
            Some(b'[') => self.find_in_array(token, rest),
            _ => {
                self.skip_value()?;
                Ok(None)
            }
        }
    }

    fn find_in_object(
        &mut self,
        token: &str,
        rest: &[String],
    ) -> Result<Option<(usize, usize)>, Malformed> {
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(None);
        }
        let mut found = None;
        let mut matched = false;
        loop {
            self.ws();
            let key = self.string()?;
            self.consume(b':')?;
            if key.as_deref() == Some(token) {
                if matched {
                    return Err(Malformed("the same key twice on the pointer's path"));
                }
                matched = true;
                found = self.find(rest)?;
            } else {
                self.ws();
                self.skip_value()?;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(found);
                }
                _ => return Err(NOT_JSON),
            }
        }
    }

    fn find_in_array(
        &mut self,
        token: &str,
        rest: &[String],
    ) -> Result<Option<(usize, usize)>, Malformed> {
        // "0", "1", ... without leading zeros; anything else names no element.
        let index = (token == "0" || !token.starts_with('0'))
            .then(|| token.parse::<usize>().ok())
            .flatten();
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(None);
        }
        let mut found = None;
        let mut i = 0usize;
        loop {
            if Some(i) == index {
                found = self.find(rest)?;
            } else {
                self.ws();
                self.skip_value()?;
            }
            i += 1;
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(found);
                }
                _ => return Err(NOT_JSON),
            }
        }
    }

    /// A string at `pos` (the opening quote), decoded when it decodes to
    /// valid text (`None` when it does not: a lone surrogate).
    fn string(&mut self) -> Result<Option<String>, Malformed> {
        let start = self.pos;
        self.skip_string()?;
        Ok(serde_json::from_slice::<String>(&self.doc[start..self.pos]).ok())
    }

    fn skip_string(&mut self) -> Result<(), Malformed> {
        if self.peek() != Some(b'"') {
            return Err(NOT_JSON);
        }
        self.pos += 1;
        loop {
            let Some(&b) = self.doc.get(self.pos) else {
                return Err(NOT_JSON);
            };
            self.pos += 1;
            match b {
                b'"' => return Ok(()),
                b'\\' => match self.peek() {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 1,
                    Some(b'u') => {
                        let hex = self.doc.get(self.pos + 1..self.pos + 5).ok_or(NOT_JSON)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return Err(NOT_JSON);
                        }
                        self.pos += 5;
                    }
                    _ => return Err(NOT_JSON),
                },
                0..=0x1f => return Err(NOT_JSON),
                _ => {}
            }
        }
    }

    fn skip_number(&mut self) -> Result<(), Malformed> {
        let digits = |r: &mut Self| {
            let start = r.pos;
            while r.peek().is_some_and(|b| b.is_ascii_digit()) {
                r.pos += 1;
            }
            r.pos - start
        };
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(NOT_JSON),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(NOT_JSON);
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return Err(NOT_JSON);
            }
        }
        Ok(())
    }

    fn skip_literal(&mut self, word: &[u8]) -> Result<(), Malformed> {
        if self.doc[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(NOT_JSON)
        }
    }

    /// Skips one value of any depth (iteratively), checking its syntax.
    fn skip_value(&mut self) -> Result<(), Malformed> {
        // Open containers: `true` for an object.
        let mut open: Vec<bool> = Vec::new();
        loop {
            self.ws();
            // A value.
            match self.peek() {
                Some(b'{') => {
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                    } else {
                        open.push(true);
                        self.skip_string()?;
                        self.consume(b':')?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                    } else {
                        open.push(false);
                        continue;
                    }
                }
                Some(b'"') => self.skip_string()?,
                Some(b't') => self.skip_literal(b"true")?,
                Some(b'f') => self.skip_literal(b"false")?,
                Some(b'n') => self.skip_literal(b"null")?,
                _ => self.skip_number()?,
            }
            // After a value: the next member, or close containers.
            loop {
                let Some(&object) = open.last() else {
                    return Ok(());
                };
                self.ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        if object {
                            self.ws();
                            self.skip_string()?;
                            self.consume(b':')?;
                        }
                        break;
                    }
                    Some(b'}') if object => {
                        self.pos += 1;
                        open.pop();
                    }
                    Some(b']') if !object => {
                        self.pos += 1;
                        open.pop();
                    }
                    _ => return Err(NOT_JSON),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn at(doc: &str, pointer: &str) -> Result<Option<Value>, Malformed> {
        lookup(doc.as_bytes(), pointer)
    }

    #[test]
    fn finds_values_on_the_path() {
        let doc = r#"{"data":{"id":"vid_4","n":[1,{"x":true}]},"a/b":1,"m~n":2}"#;
        assert_eq!(at(doc, "/data/id"), Ok(Some(json!("vid_4"))));
        assert_eq!(at(doc, "/data/n/1/x"), Ok(Some(json!(true))));
        assert_eq!(at(doc, "/a~1b"), Ok(Some(json!(1))));
        assert_eq!(at(doc, "/m~0n"), Ok(Some(json!(2))));
        assert_eq!(at(doc, "/data/missing"), Ok(None));
        assert_eq!(at(doc, "/data/n/01"), Ok(None));
        assert_eq!(at(doc, "/data/n/7"), Ok(None));
        assert_eq!(at(doc, "/data/id/deeper"), Ok(None));
        assert_eq!(at("[]", "/0"), Ok(None));
        assert_eq!(at(" 3 ", ""), Ok(Some(json!(3))));
    }

    #[test]
    fn lenient_outside_the_path() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let doc = format!(r#"{{"prompt":"\ud800","echo":{deep},"id":"j-1"}}"#);
        assert_eq!(at(&doc, "/id"), Ok(Some(json!("j-1"))));
    }

    #[test]
    fn strict_on_the_path() {
        assert!(at(r#"{"id":"\ud800"}"#, "/id").is_err());
        assert!(at(r#"{"id":"a","id":"b"}"#, "/id").is_err());
        assert!(at(r#"{"d":{"id":1},"d":{}}"#, "/d/id").is_err());
        // A duplicate away from the path is not read.
        assert_eq!(at(r#"{"x":1,"x":2,"id":3}"#, "/id"), Ok(Some(json!(3))));
    }

    #[test]
    fn broken_documents_are_malformed() {
        for bad in [
            "",
            "{",
            r#"{"id":"a""#,
            r#"{"id":"a"} x"#,
            r#"{"x":[1,2,}"#,
            r#"{"x":01,"id":1}"#,
            r#"{"x":"\q","id":1}"#,
            "{\"x\":\"\u{1}\",\"id\":1}",
            r#"{"x":tru,"id":1}"#,
            r#"{"x":[}],"id":1}"#,
            r#"{"x" 1}"#,
            "<html>",
        ] {
            assert!(at(bad, "/id").is_err(), "{bad:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// On documents serde_json reads, the lookup agrees with it (where
        /// the path has no duplicate key and the value parses strictly).
        #[test]
        fn agrees_with_serde_json(text in r#"[\[\]{}":,0-9a-c\\ ]{0,80}"#, p in "(/[a-c0-2]){0,3}") {
            let ours = lookup(text.as_bytes(), &p);
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => {
                    if let Ok(found) = ours {
                        prop_assert_eq!(found, v.pointer(&p).cloned());
                    }
                }
                Err(_) => prop_assert!(ours.is_err(), "{text:?} read as {ours:?}"),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = lookup(&bytes, "/a/0");
        }
    }
}
