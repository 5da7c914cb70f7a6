//! The untyped YAML tree a config is read from, and `--set section.key=value` overrides on it.
//!
//! Our own tree rather than `serde_json::Value` because mappings must keep their YAML order: the
//! order of `targets` is the order of the decoders and of their parameters, as in the seed's
//! `nn.ModuleDict`.

use std::fmt;

use anyhow::{Context, Result, bail};
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// One YAML node. Mapping keys are scalars rendered as strings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    /// The YAML type, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }

    /// The same value as JSON (for loss kwargs, which the loss constructor takes as JSON).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => match i64::try_from(*i) {
                Ok(v) => Value::from(v),
                Err(_) => Value::from(*i as f64),
            },
            Node::Float(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(v) => Value::Array(v.iter().map(Node::to_json).collect()),
            Node::Map(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
        }
    }
}

/// Flow-style YAML, so an error shows the value as the user could have written it.
impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Null => write!(f, "null"),
            Node::Bool(b) => write!(f, "{b}"),
            Node::Int(i) => write!(f, "{i}"),
            Node::Float(x) => write!(f, "{x:?}"),
            Node::Str(s) => write!(f, "{s:?}"),
            Node::Seq(v) => {
                write!(f, "[")?;
                for (i, x) in v.iter().enumerate() {
                    write!(f, "{}{x}", if i == 0 { "" } else { ", " })?;
                }
                write!(f, "]")
            }
            Node::Map(m) => {
                write!(f, "{{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    write!(f, "{}{k}: {v}", if i == 0 { "" } else { ", " })?;
                }
                write!(f, "}}")
            }
        }
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        i128::try_from(v).map(Node::Int).map_err(|_| E::custom(format!("integer {v} is too large")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut out = Vec::new();
        while let Some(x) = seq.next_element()? {
            out.push(x);
        }
        Ok(Node::Seq(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut out: Vec<(String, Node)> = Vec::new();
        while let Some((k, v)) = map.next_entry::<Node, Node>()? {
            let key = match k {
                Node::Str(s) => s,
                Node::Bool(_) | Node::Int(_) | Node::Float(_) | Node::Null => k.to_string(),
                other => return Err(de::Error::custom(format!("mapping key {other} is not a scalar"))),
            };
            if out.iter().any(|(seen, _)| *seen == key) {
                return Err(de::Error::custom(format!("duplicate key '{key}'")));
            }
            out.push((key, v));
        }
        Ok(Node::Map(out))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// Parses one YAML document; an empty document is Null.
pub(crate) fn parse_yaml(text: &str) -> Result<Node> {
    if text.trim().is_empty() {
        return Ok(Node::Null);
    }
    serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Applies one `path=value` override: `path` is dot-separated mapping keys (or list indices),
/// `value` a YAML scalar, list or mapping. Missing mappings on the way are created.
pub(crate) fn apply_set(root: &mut Node, assignment: &str) -> Result<()> {
    let Some((path, text)) = assignment.split_once('=') else {
        bail!("--set {assignment:?}: expected section.key=value");
    };
    let path = path.trim();
    let value =
        parse_yaml(text).with_context(|| format!("--set {assignment:?}: the value is not valid YAML"))?;
    let segments: Vec<&str> = path.split('.').collect();
    if segments.len() < 2 || segments.iter().any(|s| s.is_empty()) {
        bail!("--set {assignment:?}: the key must be section.key (e.g. tr_config.batch_size), got {path:?}");
    }
    let mut node = root;
    for (depth, seg) in segments.iter().enumerate() {
        if matches!(node, Node::Null) {
            *node = Node::Map(Vec::new());
        }
        let here = segments[..depth].join(".");
        node = match node {
            Node::Map(entries) => {
                let i = match entries.iter().position(|(k, _)| k == seg) {
                    Some(i) => i,
                    None => {
                        entries.push((seg.to_string(), Node::Null));
                        entries.len() - 1
                    }
                };
                &mut entries[i].1
            }
            Node::Seq(items) => {
                let len = items.len();
                match seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(item) => item,
                    None => bail!(
                        "--set {assignment:?}: {here} is a list of {len}; {seg:?} is not an index in it"
                    ),
                }
            }
            other => bail!("--set {assignment:?}: {here} is {} ({other}), not a mapping", other.kind()),
        };
    }
    *node = value;
    Ok(())
}

/// The keys whose values are file paths, as dot paths; `*` matches every key or list item. Under
/// `volume_paths` every value but `ref_label` (a target name) is a path.
const PATH_KEYS: &[&str] = &[
    "tr_setup.ckpt_out_base",
    "tr_setup.tensorboard_log_dir",
    "tr_setup.checkpoint_path",
    "dataset_config.cache_file",
    "dataset_config.volume_paths.*.*",
    "inference_config.checkpoint_path",
    "inference_config.input_path",
    "inference_config.output_path",
];

/// Makes the relative paths of a config read from a file relative to `dir`, the file's folder,
/// so a config means the same from any working folder. Absolute paths and URLs (`scheme://`)
/// stay; `--set` values are applied afterwards and so stay relative to the working folder.
pub(crate) fn rebase_paths(root: &mut Node, dir: &Path) {
    fn walk(node: &mut Node, key: &[&str], dir: &Path) {
        let Some((first, rest)) = key.split_first() else {
            if let Node::Str(s) = node
                && !s.contains("://")
                && Path::new(s.as_str()).is_relative()
            {
                *s = dir.join(s.as_str()).to_string_lossy().into_owned();
            }
            return;
        };
        match node {
            Node::Map(entries) => {
                for (k, v) in entries.iter_mut() {
                    if (*first == "*" && k != "ref_label") || k == first {
                        walk(v, rest, dir);
                    }
                }
            }
            Node::Seq(items) if *first == "*" => items.iter_mut().for_each(|v| walk(v, rest, dir)),
            _ => {}
        }
    }
    for key in PATH_KEYS {
        walk(root, &key.split('.').collect::<Vec<_>>(), dir);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn relative_paths_rebase_onto_the_config_folder() {
        let mut root = super::parse_yaml(
            "tr_setup: {ckpt_out_base: ckpt, model_name: m}\n\
             dataset_config:\n  volume_paths:\n    - {input: a/in.zarr, label: /abs/l.zarr, ref_label: label}\n    - {input: \"s3://b/in\"}\n\
             inference_config: {output_path: ./out, input_path: x.nii.gz}",
        )
        .unwrap();
        super::rebase_paths(&mut root, std::path::Path::new("/cfg"));
        let j = root.to_json();
        assert_eq!(j["tr_setup"]["ckpt_out_base"], "/cfg/ckpt");
        assert_eq!(j["tr_setup"]["model_name"], "m");
        let v = &j["dataset_config"]["volume_paths"];
        assert_eq!(
            (&v[0]["input"], &v[0]["label"], &v[0]["ref_label"]),
            (&"/cfg/a/in.zarr".into(), &"/abs/l.zarr".into(), &"label".into())
        );
        assert_eq!(v[1]["input"], "s3://b/in");
        assert_eq!(j["inference_config"]["output_path"], "/cfg/./out");
    }

    use super::*;

    #[test]
    fn keeps_mapping_order_and_types() {
        let n = parse_yaml("b: 1\na: [1.5, x, true, null]\nc: {z: 2}\n").unwrap();
        let Node::Map(m) = &n else { panic!("{n:?}") };
        let keys: Vec<&str> = m.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "c"]);
        assert_eq!(n.to_string(), r#"{b: 1, a: [1.5, "x", true, null], c: {z: 2}}"#);
        assert_eq!(parse_yaml("x: 1e-3").unwrap(), Node::Map(vec![("x".into(), Node::Float(1e-3))]));
        assert!(parse_yaml("a: 1\na: 2\n").is_err());
    }

    #[test]
    fn set_creates_replaces_and_indexes() {
        let mut n = parse_yaml("tr_config:\n  batch_size: 2\nlist: [{a: 1}]\n").unwrap();
        apply_set(&mut n, "tr_config.batch_size=4").unwrap();
        apply_set(&mut n, "tr_config.patch_size=[64, 64, 64]").unwrap();
        apply_set(&mut n, "model_config.x.y=cuda:0").unwrap();
        apply_set(&mut n, "list.0.a=2").unwrap();
        assert_eq!(
            n.to_string(),
            r#"{tr_config: {batch_size: 4, patch_size: [64, 64, 64]}, list: [{a: 2}], model_config: {x: {y: "cuda:0"}}}"#
        );
        let err = apply_set(&mut n, "tr_config.batch_size.x=1").unwrap_err().to_string();
        assert!(err.contains("tr_config.batch_size is an integer"), "{err}");
        assert!(apply_set(&mut n, "list.3.a=1").unwrap_err().to_string().contains("not an index"));
        assert!(apply_set(&mut n, "batch_size=1").is_err());
        assert!(apply_set(&mut n, "tr_config.batch_size").is_err());
    }
}
