//! Reading one mapping of the config tree into typed values: every key asked for is recorded,
//! every key left over becomes one warning, and a wrong value is an error that names
//! `section.key`, the value, and what is allowed.

use std::cell::RefCell;
use std::collections::BTreeSet;

use anyhow::{Result, bail};

use super::tree::Node;

/// What reading the whole config collects besides the values.
#[derive(Default)]
pub(crate) struct Ctx {
    warnings: RefCell<Vec<String>>,
    keys_read: RefCell<BTreeSet<String>>,
    /// The paths of the keys nothing knows, with their warning.
    unknown: RefCell<Vec<(String, String)>>,
}

impl Ctx {
    pub(crate) fn warn(&self, msg: String) {
        self.warnings.borrow_mut().push(msg);
    }

    pub(crate) fn into_parts(self) -> (Vec<String>, BTreeSet<String>, Vec<(String, String)>) {
        (self.warnings.into_inner(), self.keys_read.into_inner(), self.unknown.into_inner())
    }
}

/// A value check: `Ok(value)` or `Err(what is allowed)`.
pub(crate) type Check<'n, T> = &'n dyn Fn(&Node) -> Result<T, String>;

/// One mapping being read. `path` names it in messages (`dataset_config.targets.ink`); `schema`
/// names it in the key registry, with `*` for a target name or a list index.
pub(crate) struct Section<'a> {
    ctx: &'a Ctx,
    path: String,
    schema: String,
    entries: &'a [(String, Node)],
    used: Vec<bool>,
    known: Vec<String>,
}

impl<'a> Section<'a> {
    /// The mapping at `path`; null (an empty section) reads as an empty mapping.
    pub(crate) fn new(ctx: &'a Ctx, path: String, schema: String, node: &'a Node) -> Result<Self> {
        let entries: &[(String, Node)] = match node {
            Node::Map(m) => m,
            Node::Null => &[],
            other => bail!("{path} = {other}: expected a mapping of keys, got {}", other.kind()),
        };
        Ok(Section { ctx, path, schema, used: vec![false; entries.len()], entries, known: Vec::new() })
    }

    pub(crate) fn ctx(&self) -> &'a Ctx {
        self.ctx
    }

    /// This mapping's own path.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// `section.key` as messages write it.
    pub(crate) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) }
    }

    fn schema_path(&self, key: &str) -> String {
        if self.schema.is_empty() { key.to_string() } else { format!("{}.{key}", self.schema) }
    }

    /// The node under `key` (None when absent or null), recorded as read under `schema_key`.
    fn lookup(&mut self, key: &str, schema_key: &str) -> Option<&'a Node> {
        self.ctx.keys_read.borrow_mut().insert(self.schema_path(schema_key));
        self.known.push(key.to_string());
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        self.used[i] = true;
        match &self.entries[i].1 {
            Node::Null => None,
            n => Some(n),
        }
    }

    /// The raw node under `key`, or None when absent or null.
    pub(crate) fn node(&mut self, key: &str) -> Option<&'a Node> {
        self.lookup(key, key)
    }

    /// As [`node`](Self::node), for a key whose name is data (a target's path in a volume entry),
    /// registered as `schema_key`.
    pub(crate) fn node_as(&mut self, key: &str, schema_key: &str) -> Option<&'a Node> {
        self.lookup(key, schema_key)
    }

    /// The error for `value` under `key`.
    pub(crate) fn invalid<T>(&self, key: &str, value: &Node, allowed: &str) -> Result<T> {
        bail!("{} = {value}: expected {allowed}", self.key_path(key))
    }

    /// `key` checked by `check`, or None when absent or null.
    pub(crate) fn optional<T>(&mut self, key: &str, check: Check<'_, T>) -> Result<Option<T>> {
        match self.node(key) {
            None => Ok(None),
            Some(n) => match check(n) {
                Ok(v) => Ok(Some(v)),
                Err(allowed) => self.invalid(key, n, &allowed),
            },
        }
    }

    /// `key` checked by `check`, or `default` when absent or null.
    pub(crate) fn get<T>(&mut self, key: &str, default: T, check: Check<'_, T>) -> Result<T> {
        Ok(self.optional(key, check)?.unwrap_or(default))
    }

    /// The mapping under `key` as a section of its own (empty when absent).
    pub(crate) fn section(&mut self, key: &str) -> Result<Section<'a>> {
        let node = self.node(key).unwrap_or(&Node::Null);
        Section::new(self.ctx, self.key_path(key), self.schema_path(key), node)
    }

    /// The mapping under `key` whose keys are names (the targets): one section per name,
    /// registered with `*` for the name.
    pub(crate) fn named_sections(&mut self, key: &str) -> Result<Vec<(String, Section<'a>)>> {
        let (path, schema) = (self.key_path(key), self.schema_path(key));
        match self.node(key) {
            None => Ok(Vec::new()),
            Some(Node::Map(m)) => m
                .iter()
                .map(|(name, n)| {
                    let s = Section::new(self.ctx, format!("{path}.{name}"), format!("{schema}.*"), n)?;
                    Ok((name.clone(), s))
                })
                .collect(),
            Some(other) => self.invalid(key, other, "a mapping from names to entries"),
        }
    }

    /// The list of mappings under `key`: one section per item, registered with `*` for the index.
    pub(crate) fn list_sections(&mut self, key: &str) -> Result<Vec<Section<'a>>> {
        let (path, schema) = (self.key_path(key), self.schema_path(key));
        match self.node(key) {
            None => Ok(Vec::new()),
            Some(Node::Seq(items)) => items
                .iter()
                .enumerate()
                .map(|(i, n)| Section::new(self.ctx, format!("{path}.{i}"), format!("{schema}.*"), n))
                .collect(),
            Some(other) => self.invalid(key, other, "a list of mappings"),
        }
    }

    /// Warns once per key nobody read: the keys in `ignored` with their reason, every other key
    /// as unknown, with the nearest known key when one is close.
    pub(crate) fn finish(self, ignored: &[(&str, &str)]) {
        for (i, (key, _)) in self.entries.iter().enumerate() {
            if self.used[i] {
                continue;
            }
            let path = self.key_path(key);
            let msg = match ignored.iter().find(|(k, _)| k == key) {
                Some((_, why)) => format!("{path}: ignored ({why})"),
                None => {
                    let msg = match nearest(key, &self.known) {
                        Some(k) => format!("{path}: unknown key (did you mean {k}?)"),
                        None => format!("{path}: unknown key"),
                    };
                    self.ctx.unknown.borrow_mut().push((path, msg.clone()));
                    msg
                }
            };
            self.ctx.warn(msg);
        }
    }
}

/// The known key closest to `key` by edit distance, if it is plausibly a typo.
fn nearest<'k>(key: &str, known: &'k [String]) -> Option<&'k str> {
    let best = known.iter().map(|k| (edit_distance(key, k), k)).min_by_key(|(d, _)| *d)?;
    (best.0 <= (key.len() / 3).max(1)).then_some(best.1.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

// Value checks. Each returns what is allowed when the value does not fit.

pub(crate) fn boolean(n: &Node) -> Result<bool, String> {
    match n {
        Node::Bool(b) => Ok(*b),
        _ => Err("true or false".into()),
    }
}

/// A number; numeric strings are accepted because the seed converted with float(), which YAML 1.1
/// readers need for spellings like 1e-3.
pub(crate) fn number(n: &Node) -> Result<f64, String> {
    let x = match n {
        Node::Int(i) => *i as f64,
        Node::Float(x) => *x,
        Node::Str(s) => s.trim().parse::<f64>().map_err(|_| "a number".to_string())?,
        _ => return Err("a number".into()),
    };
    if x.is_finite() { Ok(x) } else { Err("a finite number".into()) }
}

/// A number in `lo..=hi`.
pub(crate) fn number_in(lo: f64, hi: f64) -> impl Fn(&Node) -> Result<f64, String> {
    move |n| match number(n) {
        Ok(x) if (lo..=hi).contains(&x) => Ok(x),
        _ => Err(format!("a number from {lo} to {hi}")),
    }
}

pub(crate) fn non_negative(n: &Node) -> Result<f64, String> {
    number_in(0.0, f64::MAX)(n).map_err(|_| "a number >= 0".into())
}

pub(crate) fn positive(n: &Node) -> Result<f64, String> {
    match number(n) {
        Ok(x) if x > 0.0 => Ok(x),
        _ => Err("a number > 0".into()),
    }
}

/// A probability.
pub(crate) fn probability(n: &Node) -> Result<f64, String> {
    number_in(0.0, 1.0)(n).map_err(|_| "a probability from 0 to 1".into())
}

/// A whole number >= `min` (integral floats such as 4.0 count).
pub(crate) fn integer_from(min: u64) -> impl Fn(&Node) -> Result<u64, String> {
    move |n| {
        let v = match n {
            Node::Int(i) => u64::try_from(*i).ok(),
            Node::Float(x) if x.fract() == 0.0 && *x >= 0.0 && *x < u64::MAX as f64 => Some(*x as u64),
            _ => None,
        };
        match v {
            Some(v) if v >= min => Ok(v),
            _ => Err(format!("a whole number >= {min}")),
        }
    }
}

/// A whole number >= `min` as usize.
pub(crate) fn count_from(min: usize) -> impl Fn(&Node) -> Result<usize, String> {
    move |n| {
        let v = integer_from(min as u64)(n)?;
        usize::try_from(v).map_err(|_| format!("a whole number >= {min}"))
    }
}

pub(crate) fn string(n: &Node) -> Result<String, String> {
    match n {
        Node::Str(s) if !s.is_empty() => Ok(s.clone()),
        _ => Err("a non-empty string".into()),
    }
}

/// A name that becomes part of file and folder names (a model, a target): letters, digits, `-`
/// and `_`, so it can never climb out of the folder it is joined to or hide as a dot file.
pub(crate) fn plain_name(n: &Node) -> Result<String, String> {
    match n {
        Node::Str(s) if is_plain_name(s) => Ok(s.clone()),
        _ => Err("a plain name (ASCII letters, digits, '-' and '_')".into()),
    }
}

pub(crate) fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One of `names` (case-insensitive), as its index.
pub(crate) fn choice<T: Copy>(options: &'static [(&'static str, T)]) -> impl Fn(&Node) -> Result<T, String> {
    move |n| {
        let allowed = || {
            format!("one of {}", options.iter().map(|(s, _)| format!("{s:?}")).collect::<Vec<_>>().join(", "))
        };
        match n {
            Node::Str(s) => options
                .iter()
                .find(|(c, _)| c.eq_ignore_ascii_case(s.trim()))
                .map(|(_, v)| *v)
                .ok_or_else(allowed),
            _ => Err(allowed()),
        }
    }
}

/// A list of exactly `len` items (or one item for all when `broadcast`), each checked by `item`.
pub(crate) fn list_of<T: Clone>(
    len: usize,
    broadcast: bool,
    item: impl Fn(&Node) -> Result<T, String>,
) -> impl Fn(&Node) -> Result<Vec<T>, String> {
    move |n| {
        let one = if broadcast { " (or one value for all)" } else { "" };
        let each = |what: String| format!("a list of {len} values{one}, each {what}");
        match n {
            Node::Seq(items) if items.len() == len => {
                items.iter().map(&item).collect::<Result<_, _>>().map_err(each)
            }
            Node::Seq(items) => Err(format!("a list of {len} values{one}, not {}", items.len())),
            Node::Map(_) => Err(format!("a list of {len} values{one}")),
            scalar if broadcast => item(scalar).map(|v| vec![v; len]).map_err(each),
            _ => Err(format!("a list of {len} values")),
        }
    }
}

/// A (z, y, x) size: three whole numbers >= 1, or one for all three axes.
pub(crate) fn size3(n: &Node) -> Result<[usize; 3], String> {
    let v = list_of(3, true, count_from(1))(n).map_err(|_| {
        "a (z, y, x) size: [z, y, x] of whole numbers >= 1, or one number for all axes".to_string()
    })?;
    Ok([v[0], v[1], v[2]])
}

/// A range [low, high] with `min <= low <= high <= max`; `min` itself is excluded when
/// `open_min` (a zoom factor of 0 means nothing), and an infinite `max` is no bound.
pub(crate) fn range_in(min: f64, open_min: bool, max: f64) -> impl Fn(&Node) -> Result<(f64, f64), String> {
    move |n| {
        let allowed = || {
            let lower = if open_min { "<" } else { "<=" };
            let upper = if max.is_finite() { format!(" <= {max}") } else { String::new() };
            format!("a range [low, high] with {min} {lower} low <= high{upper}")
        };
        let v = list_of(2, false, number)(n).map_err(|_| allowed())?;
        let low_ok = if open_min { min < v[0] } else { min <= v[0] };
        if low_ok && v[0] <= v[1] && v[1] <= max { Ok((v[0], v[1])) } else { Err(allowed()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tree::parse_yaml;

    #[test]
    fn reads_records_and_warns() {
        let node = parse_yaml("a: 3\nb: null\nbatch_sise: 2\nold: 1\n").unwrap();
        let ctx = Ctx::default();
        let mut s = Section::new(&ctx, "tr".into(), "tr".into(), &node).unwrap();
        assert_eq!(s.get("a", 1, &count_from(1)).unwrap(), 3);
        assert_eq!(s.get("b", 7, &count_from(1)).unwrap(), 7);
        assert_eq!(s.get("batch_size", 2, &count_from(1)).unwrap(), 2);
        let err = s.get("a", 0.0, &number_in(5.0, 6.0)).unwrap_err().to_string();
        assert_eq!(err, "tr.a = 3: expected a number from 5 to 6");
        s.finish(&[("old", "the seed ignores it too")]);
        let (warnings, keys, _) = ctx.into_parts();
        assert_eq!(
            warnings,
            [
                "tr.batch_sise: unknown key (did you mean batch_size?)",
                "tr.old: ignored (the seed ignores it too)"
            ]
        );
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["tr.a", "tr.b", "tr.batch_size"]);
    }

    #[test]
    fn value_checks() {
        let p = |s: &str| parse_yaml(s).unwrap();
        assert_eq!(number(&p("\"1e-3\"")), Ok(1e-3));
        assert!(number(&p("[1]")).is_err());
        assert_eq!(count_from(1)(&p("4.0")), Ok(4));
        assert!(count_from(1)(&p("4.5")).is_err());
        assert!(count_from(1)(&p("0")).is_err());
        assert_eq!(size3(&p("64")), Ok([64; 3]));
        assert_eq!(size3(&p("[14, 128, 256]")), Ok([14, 128, 256]));
        assert!(size3(&p("[1, 2]")).is_err());
        const OPTIONS: &[(&str, char)] = &[("AdamW", 'w'), ("SGD", 's')];
        assert_eq!(choice(OPTIONS)(&p("sgd")), Ok('s'));
        assert!(choice(OPTIONS)(&p("Adam")).unwrap_err().contains("\"AdamW\", \"SGD\""));
        assert_eq!(range_in(0.0, false, 2.0)(&p("[0.5, 1.5]")), Ok((0.5, 1.5)));
        assert_eq!(range_in(0.0, false, 2.0)(&p("[0, 0]")), Ok((0.0, 0.0)));
        assert!(range_in(0.0, false, 2.0)(&p("[1.5, 0.5]")).is_err());
        let open = range_in(0.0, true, f64::INFINITY);
        assert_eq!(open(&p("[0, 1]")), Err("a range [low, high] with 0 < low <= high".to_string()));
        assert_eq!(open(&p("[0.5, 1e9]")), Ok((0.5, 1e9)));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
