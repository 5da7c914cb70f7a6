//! Network weights as safetensors with dynamic_network_architectures' state-dict names in
//! PyTorch's layouts, so weights move both ways between PyTorch and unet3d. Layouts are
//! converted here, at the boundary; a [`ParamStore`] always holds unet3d's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::arch::params::ParamSpec;
use crate::arch::spec::{Architecture, Block};
use crate::autograd::ParamStore;
use crate::tensor::{Shape, Tensor, io, layout};

/// Names listed per kind of problem before the list is cut short.
const LIST_MAX: usize = 12;

/// Whether a state-dict entry is an alias PyTorch stores twice: ConvDropoutNormReLU's
/// `all_modules.<i>` (the conv and norm again) and the decoder's reference to the encoder
/// (`decoder.encoder.*`, `decoders.<t>.encoder.*`).
pub fn is_alias(name: &str) -> bool {
    let segs: Vec<&str> = name.split('.').collect();
    segs.contains(&"all_modules")
        || matches!(segs.as_slice(), ["decoder", "encoder", ..] | ["decoders", _, "encoder", ..])
}

fn is_transposed(name: &str) -> bool {
    name.split('.').any(|s| s == "transpconvs")
}

/// The shape unet3d stores a parameter in: a 5-D PyTorch (A, B, T, R, S) weight becomes
/// (A, T, R, S, B) (conv: K, C; transposed conv: C_in, C_out), anything else is unchanged.
pub fn unet3d_shape(torch_shape: &[usize]) -> Vec<usize> {
    match *torch_shape {
        [a, b, t, r, s] => vec![a, t, r, s, b],
        _ => torch_shape.to_vec(),
    }
}

/// Parameter `name` in PyTorch's layout converted to unet3d's.
pub fn from_torch(name: &str, t: &Tensor) -> Result<Tensor> {
    match t.shape().rank() {
        5 if is_transposed(name) => layout::transposed_weight_from_torch(t),
        5 => layout::conv_weight_from_torch(t),
        _ => Ok(t.clone()),
    }
}

/// Parameter `name` in unet3d's layout converted to PyTorch's.
pub fn to_torch(name: &str, t: &Tensor) -> Result<Tensor> {
    match t.shape().rank() {
        5 if is_transposed(name) => layout::transposed_weight_to_torch(t),
        5 => layout::conv_weight_to_torch(t),
        _ => Ok(t.clone()),
    }
}

/// Every parameter of `arch` from `store`, in state-dict order and PyTorch's layouts.
pub fn to_state_dict(arch: &Architecture, store: &ParamStore) -> Result<Vec<(String, Tensor)>> {
    arch.param_specs()
        .into_iter()
        .map(|spec| {
            let id = store.id(&spec.name).with_context(|| {
                format!("the parameter store has no '{}' for this architecture", spec.name)
            })?;
            let t = store.value(id);
            t.expect_shape(&format!("parameter '{}'", spec.name), &unet3d_shape(&spec.shape))?;
            Ok((spec.name.clone(), to_torch(&spec.name, t)?))
        })
        .collect()
}

/// Writes the weights of `arch` to `path` (atomically) as PyTorch's `save_file` would, so
/// `load_state_dict(safetensors.torch.load_file(path), strict=False)` loads them (strict
/// loading also wants the aliases, which PyTorch fills in itself).
pub fn save(path: &Path, arch: &Architecture, store: &ParamStore) -> Result<()> {
    let dict = to_state_dict(arch, store)?;
    let refs: Vec<(&str, &Tensor)> = dict.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    io::save(path, &refs, Some(meta)).with_context(|| format!("saving weights to {}", path.display()))
}

/// Reads the weights of `arch` from a safetensors state dict.
pub fn load(path: &Path, arch: &Architecture) -> Result<ParamStore> {
    let file = io::load(path)?;
    from_state_dict(arch, &file.tensors).with_context(|| format!("loading weights from {}", path.display()))
}

/// A [`ParamStore`] for `arch` from a state dict in PyTorch's layouts. Aliases are ignored; every
/// missing, unexpected or misshapen tensor is reported at once, with the configuration key that
/// decides it.
pub fn from_state_dict(arch: &Architecture, tensors: &BTreeMap<String, Tensor>) -> Result<ParamStore> {
    let specs = arch.param_specs();
    let wanted: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<&str> = wanted.iter().copied().filter(|n| !tensors.contains_key(*n)).collect();
    let unexpected: Vec<&str> =
        tensors.keys().map(String::as_str).filter(|n| !is_alias(n) && !wanted.contains(n)).collect();
    let misshapen: Vec<String> = specs
        .iter()
        .filter_map(|spec| {
            let got = tensors.get(&spec.name)?.dims();
            (got != spec.shape.as_slice()).then(|| {
                format!(
                    "'{}': the file has shape {}, this network needs {}{}",
                    spec.name,
                    Shape::new(got),
                    Shape::new(&spec.shape),
                    shape_hint(arch, spec, got).map(|k| format!(" (set by {k})")).unwrap_or_default()
                )
            })
        })
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && misshapen.is_empty()) {
        let mut msg = String::from("the weights do not fit this network:");
        let mut hints = BTreeSet::new();
        for (what, names) in [("missing", &missing), ("unexpected", &unexpected)] {
            if !names.is_empty() {
                msg += &format!("\n  {} {what} tensors: {}", names.len(), short_list(names));
                // Why a name is on one side only shows in what the other side has.
                let other: Vec<&str> = if what == "missing" {
                    tensors.keys().map(String::as_str).collect()
                } else {
                    wanted.iter().copied().collect()
                };
                let other_has = |prefix: &str| other.iter().any(|n| n.starts_with(prefix));
                hints.extend(names.iter().filter_map(|n| structure_hint(arch, n, &other_has)));
            }
        }
        for m in &misshapen {
            msg += &format!("\n  {m}");
        }
        if !hints.is_empty() {
            let keys: Vec<&str> = hints.into_iter().collect();
            msg += &format!("\n  the tensors present are decided by: {}", keys.join(", "));
        }
        bail!(msg);
    }
    let mut store = ParamStore::new();
    for spec in &specs {
        store.add(&spec.name, from_torch(&spec.name, &tensors[&spec.name])?)?;
    }
    Ok(store)
}

fn short_list(names: &[&str]) -> String {
    let mut s = names.iter().take(LIST_MAX).copied().collect::<Vec<_>>().join(", ");
    if names.len() > LIST_MAX {
        s += &format!(", ... and {} more", names.len() - LIST_MAX);
    }
    s
}

/// What one channel count of a parameter comes from.
enum Width {
    Features(usize),
    Bottleneck(usize),
    InChannels,
    Target(String),
}

impl Width {
    fn key(&self) -> String {
        match self {
            Width::Features(s) => format!("model_config.features_per_stage[{s}]"),
            Width::Bottleneck(s) => format!("model_config.bottleneck_channels[{s}]"),
            Width::InChannels => "dataset_config.in_channels".to_string(),
            Width::Target(t) => format!("dataset_config.targets.{t}.channels"),
        }
    }
}

/// The decoder's target name and the rest of the name, for `decoder.*` / `decoders.<t>.*`.
fn decoder_part<'a>(arch: &'a Architecture, segs: &'a [&'a str]) -> Option<(&'a str, &'a [&'a str])> {
    match segs {
        ["decoder", rest @ ..] if arch.targets.len() == 1 => Some((&arch.targets[0].name, rest)),
        ["decoders", t, rest @ ..] => Some((t, rest)),
        _ => None,
    }
}

/// The configuration key behind a shape difference of a parameter `arch` has.
fn shape_hint(arch: &Architecture, spec: &ParamSpec, got: &[usize]) -> Option<String> {
    let want = &spec.shape;
    if got.len() != want.len() {
        return None;
    }
    let axis = (0..want.len()).find(|&a| got[a] != want[a])?;
    let segs: Vec<&str> = spec.name.split('.').collect();
    if axis >= 2 {
        let (key, stage) = match (segs.as_slice(), decoder_part(arch, &segs)) {
            (_, Some((_, ["transpconvs", i, ..]))) => {
                ("strides", arch.n_stages() - 1 - i.parse::<usize>().ok()?)
            }
            (_, Some((_, ["stages", i, ..]))) => {
                ("kernel_sizes", arch.n_stages() - 2 - i.parse::<usize>().ok()?)
            }
            (["encoder", "stages", s, ..], _) => ("kernel_sizes", s.parse().ok()?),
            _ => ("kernel_sizes", 0),
        };
        return Some(format!("model_config.{key}[{stage}]"));
    }
    // Biases and norms count output channels; a weight's are axis 0, a transposed conv's axis 1.
    let out = want.len() == 1 || axis == usize::from(is_transposed(&spec.name));
    channel_width(arch, &segs, out).map(|w| w.key())
}

/// What the output (`out`) or input channel count of parameter `segs` is set by.
fn channel_width(arch: &Architecture, segs: &[&str], out: bool) -> Option<Width> {
    if let Some((target, rest)) = decoder_part(arch, segs) {
        let i: usize = rest.get(1)?.parse().ok()?;
        let k = arch.n_stages().checked_sub(2 + i)?;
        return Some(match (rest[0], out) {
            ("seg_layers", true) => Width::Target(target.to_string()),
            ("transpconvs", false) => Width::Features(k + 1),
            _ => Width::Features(k),
        });
    }
    match segs {
        ["encoder", "stem", ..] => Some(if out { Width::Features(0) } else { Width::InChannels }),
        ["encoder", "stages", s, "blocks", b, part, ..] => {
            let (s, b): (usize, usize) = (s.parse().ok()?, b.parse().ok()?);
            let input = if b == 0 && s > 0 { Width::Features(s - 1) } else { Width::Features(s) };
            let bottleneck = matches!(arch.block, Block::BottleneckD { .. });
            Some(match (*part, out, bottleneck) {
                ("conv1", false, _) | ("skip", false, _) => input,
                ("conv1", true, true) | ("conv2", _, true) | ("conv3", false, true) => Width::Bottleneck(s),
                _ => Width::Features(s),
            })
        }
        _ => None,
    }
}

/// The configuration key that decides whether a tensor named `name` exists, given whether the
/// other side of the comparison (the file, or the network) has any name with a given prefix.
fn structure_hint(arch: &Architecture, name: &str, other_has: &dyn Fn(&str) -> bool) -> Option<&'static str> {
    let segs: Vec<&str> = name.split('.').collect();
    let lacks = |n: usize| !other_has(&format!("{}.", segs[..n].join(".")));
    match segs.as_slice() {
        ["encoder", "stages", _, "blocks", _, ..] if lacks(3) => return Some("model_config.num_stages"),
        ["encoder", "stages", _, "blocks", _, ..] if lacks(5) => {
            return Some("model_config.n_blocks_per_stage");
        }
        ["decoder" | "decoders", ..] => {
            let p = if segs[0] == "decoder" { 1 } else { 2 };
            if segs.len() <= p + 2 || lacks(p) || (p == 2 && !arch.targets.iter().any(|t| t.name == segs[1]))
            {
                return Some("dataset_config.targets");
            }
            if lacks(p + 2) {
                return Some("model_config.num_stages");
            }
            if segs[p] == "stages" && segs.len() > p + 4 && lacks(p + 4) {
                return Some("model_config.n_conv_per_stage_decoder");
            }
        }
        _ => {}
    }
    let has = |s: &str| segs.contains(&s);
    if has("skip") {
        Some(
            "model_config.features_per_stage and model_config.strides (a block projects its skip when its width changes)",
        )
    } else if has("squeeze_excitation") {
        Some("model_config.squeeze_excitation")
    } else if has("conv3") {
        Some("model_config.basic_encoder_block")
    } else if has("norm") {
        Some("model_config.norm_op_kwargs.affine")
    } else if segs.last() == Some(&"bias") {
        Some("model_config.conv_bias")
    } else {
        None
    }
}
