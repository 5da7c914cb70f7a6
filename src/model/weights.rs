//! Network weights as safetensors with dynamic_network_architectures' state-dict names in
//! PyTorch's layouts, so weights move both ways between PyTorch and unet3d. Layouts are
//! converted here, at the boundary; a [`ParamStore`] always holds unet3d's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::arch::params::{ParamLayout, ParamSpec};
use crate::arch::spec::Architecture;
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

/// The shape unet3d stores a parameter in: a 5-D PyTorch (A, B, T, R, S) weight becomes
/// (A, T, R, S, B) (conv: K, C; transposed conv: C_in, C_out), anything else is unchanged.
pub fn unet3d_shape(torch_shape: &[usize]) -> Vec<usize> {
    match *torch_shape {
        [a, b, t, r, s] => vec![a, t, r, s, b],
        _ => torch_shape.to_vec(),
    }
}

/// A parameter of `layout` in PyTorch's layout converted to unet3d's.
pub fn from_torch(layout: ParamLayout, t: &Tensor) -> Result<Tensor> {
    match layout {
        ParamLayout::TransposedConv => layout::transposed_weight_from_torch(t),
        ParamLayout::Conv => layout::conv_weight_from_torch(t),
        ParamLayout::Vector => Ok(t.clone()),
    }
}

/// A parameter of `layout` in unet3d's layout converted to PyTorch's.
pub fn to_torch(layout: ParamLayout, t: &Tensor) -> Result<Tensor> {
    match layout {
        ParamLayout::TransposedConv => layout::transposed_weight_to_torch(t),
        ParamLayout::Conv => layout::conv_weight_to_torch(t),
        ParamLayout::Vector => Ok(t.clone()),
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
            Ok((spec.name.clone(), to_torch(spec.layout, t)?))
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
                    shape_hint(spec, got).map(|k| format!(" (set by {k})")).unwrap_or_default()
                )
            })
        })
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && misshapen.is_empty()) {
        let mut msg = String::from("the weights do not fit this network:");
        let mut hints = BTreeSet::new();
        let file_has = |prefix: &str| tensors.keys().any(|n| n.starts_with(prefix));
        if !missing.is_empty() {
            msg += &format!("\n  {} missing tensors: {}", missing.len(), short_list(&missing));
            // A parameter the file lacks: the first of its levels the file has nothing of, or the
            // key of the tensor itself.
            hints.extend(specs.iter().filter(|s| !tensors.contains_key(&s.name)).filter_map(|s| {
                let p = &s.presence;
                p.levels.iter().find(|(prefix, _)| !file_has(prefix)).map(|(_, key)| *key).or(p.own)
            }));
        }
        if !unexpected.is_empty() {
            msg += &format!("\n  {} unexpected tensors: {}", unexpected.len(), short_list(&unexpected));
            // Names only the file has are not this network's, so they are read for their modules.
            let network_has = |prefix: &str| wanted.iter().any(|n| n.starts_with(prefix));
            hints.extend(unexpected.iter().filter_map(|n| structure_hint(arch, n, &network_has)));
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
    // A network with a NaN or infinite weight predicts nothing but NaN.
    if let Some(spec) = specs.iter().find(|s| tensors[&s.name].data().iter().any(|x| !x.is_finite())) {
        bail!("'{}' holds NaN or infinite values; the weights are unusable", spec.name);
    }
    let mut store = ParamStore::new();
    for spec in &specs {
        store.add(&spec.name, from_torch(spec.layout, &tensors[&spec.name])?)?;
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

/// The configuration key behind a shape difference of a parameter the network has.
fn shape_hint(spec: &ParamSpec, got: &[usize]) -> Option<String> {
    if got.len() != spec.shape.len() {
        return None;
    }
    let axis = (0..got.len()).find(|&a| got[a] != spec.shape[a])?;
    spec.axis_keys.get(axis).map(ToString::to_string)
}

/// The configuration key that decides whether a file's tensor named `name`, which this network
/// lacks, exists, given whether the network has any parameter with a given prefix.
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
