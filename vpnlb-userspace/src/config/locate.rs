//! Lines and display paths from the spanned TOML tree: a [`FieldPath`] to the line it is on (or the
//! line of the table that would hold it, when the key is absent), and an error's byte span back to
//! the path of the key it is on.
//!
//! toml gives a table of an array of tables (`[[vip]]`) the span of its header, and the document
//! root the span 0..0, so "the table that would hold it" is the header line (or line 1).

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, FieldPath, PathSeg};

/// A parsed document with spans, kept next to the typed config to point at lines.
pub(crate) struct Doc<'i> {
    text: &'i str,
    root: Spanned<DeTable<'i>>,
}

/// A TOML syntax error (from [`Doc::parse`]).
pub(crate) fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    ConfigError::Invalid {
        file: origin.to_string(),
        line: e.span().map_or(1, |s| line_at(text, s.start)),
        field: String::new(),
        reason: one_line(e.message()),
    }
}

fn one_line(s: &str) -> String {
    s.trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// 1-based line of byte `offset`.
pub(crate) fn line_at(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

impl<'i> Doc<'i> {
    pub(crate) fn parse(text: &'i str) -> Result<Self, toml::de::Error> {
        Ok(Doc {
            text,
            root: DeTable::parse(text)?,
        })
    }

    /// The node at `path`, if the file has it (`None` for the empty path).
    fn node(&self, path: &FieldPath) -> Option<(&DeValue<'i>, Range<usize>)> {
        let (first, rest) = path.segments().split_first()?;
        let PathSeg::Key(k) = first else {
            return None;
        };
        let mut cur = self.root.get_ref().get(k.as_str())?;
        for seg in rest {
            cur = match seg {
                PathSeg::Key(k) => cur.get_ref().as_table()?.get(k.as_str())?,
                PathSeg::Index(i) => cur.get_ref().as_array()?.get(*i)?,
            };
        }
        Some((cur.get_ref(), cur.span()))
    }

    /// Whether the file sets the key at `path` (as opposed to leaving it to its default).
    pub(crate) fn has(&self, path: &FieldPath) -> bool {
        self.node(path).is_some()
    }

    /// The span of the deepest part of `path` present in the file (0..0 = the document).
    fn span_of(&self, path: &FieldPath) -> Range<usize> {
        let segs = path.segments();
        (0..=segs.len())
            .rev()
            .find_map(|n| self.node(&FieldPath(segs[..n].to_vec())).map(|(_, s)| s))
            .unwrap_or(0..0)
    }

    pub(crate) fn line_of(&self, path: &FieldPath) -> usize {
        line_at(self.text, self.span_of(path).start)
    }

    /// `path` for people: an array element that is a table with a string `name` shows as
    /// `vip "wireguard"`, others as `check[0]`.
    pub(crate) fn display(&self, path: &FieldPath) -> String {
        let segs = path.segments();
        let mut out = String::new();
        for (i, seg) in segs.iter().enumerate() {
            match seg {
                PathSeg::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                PathSeg::Index(n) => {
                    let name = self
                        .node(&FieldPath(segs[..=i].to_vec()))
                        .and_then(|(v, _)| v.as_table()?.get("name")?.get_ref().as_str());
                    match name {
                        Some(name) => out.push_str(&format!(" {name:?}")),
                        None => out.push_str(&format!("[{n}]")),
                    }
                }
            }
        }
        out
    }

    /// An error at `path` with its line and display path.
    pub(crate) fn error_at(&self, origin: &str, path: &FieldPath, reason: String) -> ConfigError {
        ConfigError::Invalid {
            file: origin.to_string(),
            line: self.line_of(path),
            field: self.display(path),
            reason,
        }
    }

    /// The path of the smallest key or value whose span holds `span` (deepest on ties).
    pub(crate) fn path_at(&self, span: &Range<usize>) -> FieldPath {
        let mut best: (usize, FieldPath) = (usize::MAX, FieldPath::new());
        let root = self.root.span();
        if contains(&root, span) {
            best = (root.len(), FieldPath::new());
        }
        walk_table(self.root.get_ref(), &FieldPath::new(), span, &mut best);
        best.1
    }

    /// An error from deserializing into the schema (wrong type, unknown key, missing key, bad
    /// value): located by its span, and for unknown keys inside a table placed on the key itself.
    pub(crate) fn schema_error(&self, origin: &str, e: &toml::de::Error) -> ConfigError {
        let reason = one_line(e.message());
        let mut path = e.span().map(|s| self.path_at(&s)).unwrap_or_default();
        // Errors raised after a table was read whole (a check's kind-specific keys) carry the
        // table's span; point at the key they name when it is in that table.
        if let Some(key) = named_key(&reason)
            && let Some((DeValue::Table(t), _)) = self.node(&path)
            && t.get(key).is_some()
        {
            path = path.key(key);
        }
        self.error_at(origin, &path, reason)
    }
}

/// `k` in a message like "unknown field `k`, expected ..." or "missing field `k`".
fn named_key(reason: &str) -> Option<&str> {
    let rest = reason.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn consider(
    span: Range<usize>,
    path: FieldPath,
    target: &Range<usize>,
    best: &mut (usize, FieldPath),
) {
    if contains(&span, target) && span.len() <= best.0 {
        *best = (span.len(), path);
    }
}

fn walk_table(
    t: &DeTable<'_>,
    path: &FieldPath,
    target: &Range<usize>,
    best: &mut (usize, FieldPath),
) {
    for (k, v) in t.iter() {
        let p = path.clone().key(k.get_ref());
        consider(k.span(), p.clone(), target, best);
        walk_value(v, &p, target, best);
    }
}

fn walk_value(
    v: &Spanned<DeValue<'_>>,
    path: &FieldPath,
    target: &Range<usize>,
    best: &mut (usize, FieldPath),
) {
    consider(v.span(), path.clone(), target, best);
    match v.get_ref() {
        DeValue::Table(t) => walk_table(t, path, target, best),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                walk_value(item, &path.clone().index(i), target, best);
            }
        }
        _ => {}
    }
}
