//! Label and field selectors: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`.

/// One requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed selector; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

impl Selector {
    /// Parses a selector string.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        let mut pieces = Vec::new();
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    pieces.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        pieces.push(&text[start..]);
        for piece in pieces.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("bad set in {piece:?}"))?;
                Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
            };
            let term = if let Some((k, v)) = piece.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = piece.split_once("==") {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = piece.split_once('=') {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = piece.split_once(" notin ") {
                Term::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = piece.split_once(" in ") {
                Term::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = piece.strip_prefix('!') {
                Term::NotExists(k.trim().into())
            } else if piece
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                Term::Exists(piece.into())
            } else {
                return Err(format!("cannot parse {piece:?}"));
            };
            terms.push(term);
        }
        Ok(Self(terms))
    }

    /// Whether the object whose values `get` reads matches.
    pub fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|term| match term {
            Term::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
            Term::Ne(k, v) => get(k).as_deref() != Some(v.as_str()),
            Term::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Term::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
            Term::Exists(k) => get(k).is_some(),
            Term::NotExists(k) => get(k).is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let labels = |k: &str| match k {
            "app" => Some("web".to_owned()),
            "tier" => Some("front".to_owned()),
            _ => None,
        };
        let m = |s: &str| Selector::parse(s).unwrap().matches(labels);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("tier in (front, back),!missing"));
        assert!(!m("tier notin (front)"));
        assert!(!m("missing"));
    }
}
