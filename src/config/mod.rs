//! The TOML contract: `load(path)` is the one way in.
//!
//! Loading runs in four steps, each reporting errors with the key path and, where
//! the file has it, the line and column:
//! 1. parse the text (syntax errors come from the TOML parser with their position);
//! 2. substitute `${NAME}` / `${NAME:-default}` in every string value (`env.rs`);
//! 3. deserialize into the raw structs of `raw.rs`, unknown keys being errors;
//! 4. validate into the typed `Config` (`validate.rs`).
//!
//! Positions come from one place, [`locate`], which walks the span-keeping
//! `toml_edit` document along the error's key path, so a cross-field error such
//! as an unknown upstream points at its line just like a syntax error does.

mod env;
pub mod raw;
pub mod reload;
pub mod units;
mod upstream_tls;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use upstream_tls::UpstreamTls;
pub use validate::*;

/// An error found by validation: the key it concerns and what is wrong.
pub struct Invalid {
    pub path: KeyPath,
    pub message: String,
}

/// A validated configuration, ready to build a gateway from.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub tls: Option<Tls>,
    pub admin: Admin,
    pub store: StoreConfig,
    /// Sorted by name; routes refer to them by index.
    pub upstreams: Vec<UpstreamConfig>,
    /// In declaration order (ties in prefix length go to the first declared).
    pub routes: Vec<RouteConfig>,
    /// A short hash of the file's text: the config version shown by the admin API.
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Syntax(String),
    #[error("{path}: {message}{at}")]
    Invalid { path: KeyPath, message: String, at: Location },
    #[error("{path}: environment variable {name} is not set (use ${{{name}:-default}} for an explicit default){at}")]
    MissingEnv { path: KeyPath, name: String, at: Location },
}

/// Reads, substitutes, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { file: path.to_path_buf(), source })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base, &|name| std::env::var(name).ok())
}

/// Parses config text. Relative file paths in it (certificates) resolve against `base_dir`
/// when they do not exist relative to the working directory.
pub fn parse(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let doc =
        toml_edit::ImDocument::parse(text).map_err(|e| ConfigError::Syntax(syntax_message(text, &e)))?;
    let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;

    let mut path = KeyPath::root();
    substitute(&mut value, &mut path, env).map_err(|name| ConfigError::MissingEnv {
        at: locate(text, &doc, &path),
        path,
        name,
    })?;

    let raw: raw::RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = KeyPath::from_serde(e.path());
        let message = e.into_inner().message().to_string();
        ConfigError::Invalid { at: locate(text, &doc, &path), path, message }
    })?;

    let hash = {
        let digest = Sha256::digest(text.as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    };
    // Paths in the file are relative to the working directory, as operators expect
    // from `levee run --config ...`; fall back to the config's folder.
    let base = if Path::new("config").exists() { Path::new(".") } else { base_dir };
    validate::validate(raw, base, hash).map_err(|e| ConfigError::Invalid {
        at: locate(text, &doc, &e.path),
        path: e.path,
        message: e.message,
    })
}

fn syntax_message(text: &str, e: &toml_edit::TomlError) -> String {
    let at = e.span().map(|s| Location::at(text, s.start)).unwrap_or_default();
    format!("invalid TOML: {}{at}", e.message().trim_end())
}

/// Substitutes environment variables in every string of `v`, tracking the key path.
fn substitute(
    v: &mut toml::Value,
    path: &mut KeyPath,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), String> {
    match v {
        toml::Value::String(s) => *s = env::substitute(s, env)?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.0.push(Seg::Index(i));
                substitute(item, path, env)?;
                path.0.pop();
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                path.0.push(Seg::Key(k.clone()));
                substitute(item, path, env)?;
                path.0.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

// === KeyPath ===

/// A key path such as `routes[1].limits[0].rate`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }
    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
    fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment;
        KeyPath(
            path.iter()
                .filter_map(|s| match s {
                    Segment::Seq { index } => Some(Seg::Index(*index)),
                    Segment::Map { key } => Some(Seg::Key(key.clone())),
                    Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                    Segment::Unknown => None,
                })
                .collect(),
        )
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

// === Location ===

/// A line and column in the config file (1-based), or unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Location(Option<(usize, usize)>);

impl Location {
    fn at(text: &str, offset: usize) -> Self {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
        Location(Some((line, col)))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, col)) => write!(f, " (line {line}, column {col})"),
            None => Ok(()),
        }
    }
}

/// Finds where the deepest existing part of `path` is written in the file: the
/// value where there is one (the SPEC's "line 31, column 8" points at the value),
/// else the key or table header.
fn locate(text: &str, doc: &toml_edit::ImDocument<&str>, path: &KeyPath) -> Location {
    use toml_edit::{Item, Table, Value};
    #[derive(Clone, Copy)]
    enum Node<'a> {
        Table(&'a Table),
        Tables(&'a toml_edit::ArrayOfTables),
        Value(&'a Value),
    }
    fn of(item: &Item) -> Option<Node<'_>> {
        match item {
            Item::Table(t) => Some(Node::Table(t)),
            Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            Item::Value(v) => Some(Node::Value(v)),
            Item::None => None,
        }
    }
    let mut best = None;
    let mut node = Node::Table(doc.as_table());
    for seg in &path.0 {
        let (next, key_span) = match (node, seg) {
            (Node::Table(t), Seg::Key(k)) => (t.get(k).and_then(of), t.key(k).and_then(|k| k.span())),
            (Node::Tables(a), Seg::Index(i)) => (a.get(*i).map(Node::Table), None),
            (Node::Value(Value::InlineTable(t)), Seg::Key(k)) => {
                (t.get(k).map(Node::Value), t.key(k).and_then(|k| k.span()))
            }
            (Node::Value(Value::Array(a)), Seg::Index(i)) => (a.get(*i).map(Node::Value), None),
            _ => (None, None),
        };
        let span = match next {
            Some(Node::Value(v)) => v.span(),
            Some(Node::Table(t)) => t.span(),
            _ => None,
        };
        best = span.or(key_span).or(best);
        match next {
            Some(n) => node = n,
            None => break,
        }
    }
    best.map(|s| Location::at(text, s.start)).unwrap_or_default()
}

#[cfg(test)]
mod tests;
