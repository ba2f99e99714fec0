//! [`ConfigError`] and [`FieldPath`], the path of a key in the config file.

use std::fmt;

/// A config that cannot be used. `Display`: `FILE:LINE: FIELD: REASON`, for example
/// `config.toml:42: vip "wireguard".pool "primary".backends[1]: unknown backend "gw9"`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read config file")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, not the schema, or failed validation.
    #[error("{}", render(file, *line, field, reason))]
    Invalid {
        file: String,
        /// 1-based; 0 when unknown (a config built in code).
        line: usize,
        /// Where in the file: `vip "wireguard".pool "primary".backends[1]`, a bare path such as
        /// `check[0]` for items without a name, or "" for TOML syntax errors.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn render(file: &str, line: usize, field: &str, reason: &str) -> String {
    let mut s = file.to_string();
    if line > 0 {
        s.push_str(&format!(":{line}"));
    }
    s.push_str(": ");
    if !field.is_empty() {
        s.push_str(field);
        s.push_str(": ");
    }
    s.push_str(reason);
    s
}

impl ConfigError {
    pub fn file(&self) -> &str {
        match self {
            ConfigError::Read { file, .. } | ConfigError::Invalid { file, .. } => file,
        }
    }
    /// The 1-based line, when the error points into the text.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } if *line > 0 => Some(*line),
            _ => None,
        }
    }
    /// The display path of the offending key ("" for syntax and read errors).
    pub fn field(&self) -> &str {
        match self {
            ConfigError::Invalid { field, .. } => field,
            ConfigError::Read { .. } => "",
        }
    }
    pub fn reason(&self) -> String {
        match self {
            ConfigError::Invalid { reason, .. } => reason.clone(),
            ConfigError::Read { source, .. } => source.to_string(),
        }
    }
}

/// One step of a [`FieldPath`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathSeg {
    /// A TOML key (`vip`, `pool`, `backends`, `timeout_ms`, ...).
    Key(String),
    /// The position in an array (array of tables included), 0-based.
    Index(usize),
}

/// A path into the document by TOML keys and array positions: `vip[1].pool[0].backends[2]`.
/// Errors show it with item names where the file gives them (`vip "wg".pool "primary"...`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(pub Vec<PathSeg>);

impl FieldPath {
    pub fn new() -> Self {
        FieldPath(Vec::new())
    }
    pub fn key(mut self, key: &str) -> Self {
        self.0.push(PathSeg::Key(key.to_string()));
        self
    }
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(PathSeg::Index(index));
        self
    }
    pub fn segments(&self) -> &[PathSeg] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    /// The bare form, with positions: `vip[1].pool[0].backends[2]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                PathSeg::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSeg::Key(k) => write!(f, ".{k}")?,
                PathSeg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}
