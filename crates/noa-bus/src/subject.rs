//! Subjects and subject patterns: dot-separated tokens, with `*` (one token) and `>` (the rest) in patterns.

use crate::{Error, Result};
use std::fmt;
use std::sync::Arc;

/// The longest subject accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 1024;

fn check(s: &str, wildcards: bool) -> Result<()> {
    let bad = |reason: String| Error::InvalidSubject {
        subject: s.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Err(bad("a subject must not be empty".into()));
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(bad(format!(
            "{} bytes long; the limit is {MAX_SUBJECT_LEN}",
            s.len()
        )));
    }
    let mut tokens = s.split('.').enumerate().peekable();
    while let Some((i, tok)) = tokens.next() {
        if tok.is_empty() {
            return Err(bad(format!(
                "token {} is empty (two dots in a row, or a leading or trailing dot)",
                i + 1
            )));
        }
        if let Some(c) = tok.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(format!(
                "token {} contains {c:?}; whitespace and control characters are not allowed",
                i + 1
            )));
        }
        let is_wild = tok == "*" || tok == ">";
        if !wildcards && (tok.contains('*') || tok.contains('>')) {
            return Err(bad(format!(
                "token {} is a wildcard; only subscriptions may use '*' and '>'",
                i + 1
            )));
        }
        if wildcards && !is_wild && (tok.contains('*') || tok.contains('>')) {
            return Err(bad(format!(
                "token {} mixes a wildcard with other characters; '*' and '>' must stand alone",
                i + 1
            )));
        }
        if tok == ">" && tokens.peek().is_some() {
            return Err(bad("'>' may only be the last token".into()));
        }
    }
    Ok(())
}

/// A concrete subject messages are published to (no wildcards).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(Arc<str>);

impl Subject {
    pub fn new(s: &str) -> Result<Self> {
        check(s, false)?;
        Ok(Subject(Arc::from(s)))
    }

    /// For subjects the bus made itself and knows to be valid.
    pub(crate) fn from_trusted(s: String) -> Self {
        debug_assert!(check(&s, false).is_ok(), "{s}");
        Subject(Arc::from(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A subscription pattern: a subject whose tokens may be `*` (exactly one token) or, last, `>` (one or more tokens).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern(Arc<str>);

impl Pattern {
    pub fn new(s: &str) -> Result<Self> {
        check(s, true)?;
        Ok(Pattern(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }

    /// Whether `subject` matches this pattern.
    pub fn matches(&self, subject: &str) -> bool {
        matches(&self.0, subject)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Whether the concrete `subject` matches `pattern` (both assumed valid).
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for p in pattern.split('.') {
        match p {
            ">" => return subject_tokens.next().is_some(),
            "*" => {
                if subject_tokens.next().is_none() {
                    return false;
                }
            }
            lit => {
                if subject_tokens.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    subject_tokens.next().is_none()
}

/// Whether every subject `requested` can match is also matched by `grant` (both valid patterns).
/// Used to check that a subscription stays inside what was granted: `a.>` covers `a.*.c`, `a.*` does not cover `a.>`.
pub fn covers(grant: &str, requested: &str) -> bool {
    let mut req = requested.split('.');
    for g in grant.split('.') {
        match (g, req.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(r)) if r != ">" => {}
            (lit, Some(r)) if lit == r && r != "*" && r != ">" => {}
            _ => return false,
        }
    }
    req.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage() {
        assert!(covers("a.>", "a.*.c"));
        assert!(covers("a.>", "a.>"));
        assert!(!covers("a.*", "a.>"));
        assert!(covers("a.*", "a.*"));
        assert!(covers("a.*", "a.b"));
        assert!(!covers("a.b", "a.*"));
        assert!(!covers("a.>", "a"));
        assert!(covers(">", ">"));
        assert!(!covers("a.b", "a.b.c"));
    }

    #[test]
    fn validation_names_the_problem() {
        let err = Subject::new("a..b").unwrap_err().to_string();
        assert!(err.contains("token 2 is empty"), "{err}");
        assert!(
            Subject::new("a.*")
                .unwrap_err()
                .to_string()
                .contains("only subscriptions")
        );
        assert!(
            Pattern::new("a.>.b")
                .unwrap_err()
                .to_string()
                .contains("last token")
        );
        assert!(
            Pattern::new("a.b*")
                .unwrap_err()
                .to_string()
                .contains("must stand alone")
        );
        assert!(
            Subject::new("a b")
                .unwrap_err()
                .to_string()
                .contains("whitespace")
        );
        assert!(Subject::new("").is_err());
        assert!(Subject::new(".a").is_err());
        assert!(Subject::new("a.").is_err());
        assert!(Pattern::new(">").is_ok());
    }

    #[test]
    fn matching() {
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*", "a.b"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(!matches("a.*", "a"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches("*.b.>", "x.b.y"));
        assert!(matches(">", "x"));
    }

    proptest::proptest! {
        #[test]
        fn checks_never_panic(s in ".*") {
            let _ = Subject::new(&s);
            let _ = Pattern::new(&s);
        }

        #[test]
        fn a_subject_matches_itself_and_full_wildcard(toks in proptest::collection::vec("[a-z0-9]{1,5}", 1..6)) {
            let s = toks.join(".");
            proptest::prop_assert!(Subject::new(&s).is_ok());
            proptest::prop_assert!(matches(&s, &s));
            proptest::prop_assert!(matches(">", &s));
            let stars = vec!["*"; toks.len()].join(".");
            proptest::prop_assert!(matches(&stars, &s));
            proptest::prop_assert!(covers(&stars, &s) && covers(">", &s) && covers(&s, &s));
        }
    }
}
