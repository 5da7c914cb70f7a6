//! The architecture planner against nnU-Net's planner fixtures, dynamic_network_architectures'
//! state dict, and the derived test vectors of reference-spec 3.5 and 7.

mod common;

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use unet3d::arch::plan::{self, MAX_NUMPOOL, MIN_FEATURE_MAP_SIZE};
use unet3d::arch::{
    ArchConfig, Architecture, Axes, BlockKind, PerStage, SePool, Target, get_pool_and_conv_props,
    se_reduced_channels,
};

fn triple(v: &Value) -> [usize; 3] {
    let a: Vec<usize> = serde_json::from_value(v.clone()).unwrap();
    a.try_into().unwrap()
}

fn triples(v: &Value) -> Vec<[usize; 3]> {
    v.as_array().unwrap().iter().map(triple).collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    serde_json::from_value(v.clone()).unwrap()
}

fn one_target(channels: usize) -> Vec<Target> {
    vec![Target::new("seg", channels)]
}

fn resenc_m(patch: [usize; 3], classes: usize) -> Architecture {
    ArchConfig::default().build(1, one_target(classes), patch).unwrap()
}

#[test]
fn planner_fixtures_match_exactly() {
    let text = std::fs::read_to_string(common::fixture_path("planner/plans.json")).unwrap();
    let plans: Value = serde_json::from_str(&text).unwrap();
    let cases = plans["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let spacing: Vec<f64> = serde_json::from_value(case["spacing"].clone()).unwrap();
        let spacing: [f64; 3] = spacing.try_into().unwrap();
        let patch = triple(&case["patch_size"]);
        let what = format!("spacing {spacing:?} patch {patch:?}");
        let t = get_pool_and_conv_props(spacing, patch, MIN_FEATURE_MAP_SIZE, MAX_NUMPOOL).unwrap();
        assert_eq!(t.num_pool_per_axis, triple(&case["num_pool_per_axis"]), "{what}: pools");
        assert_eq!(t.strides, triples(&case["strides"]), "{what}: strides");
        assert_eq!(t.kernel_sizes, triples(&case["kernel_sizes"]), "{what}: kernels");
        assert_eq!(t.patch_size, triple(&case["patch_size_after"]), "{what}: padded patch");
        assert_eq!(t.must_divide, triple(&case["shape_must_be_divisible_by"]), "{what}: must divide");
        assert_eq!(t.n_stages(), case["n_stages"].as_u64().unwrap() as usize, "{what}: stages");

        let cfg = ArchConfig { spacing, ..ArchConfig::default() };
        let arch = cfg.build(1, one_target(2), t.patch_size).unwrap();
        assert_eq!(arch.strides, t.strides, "{what}");
        assert_eq!(arch.kernel_sizes, t.kernel_sizes, "{what}");
        let keys = [
            ("features_per_stage", &arch.features_per_stage),
            ("n_blocks_per_stage", &arch.n_blocks_per_stage),
            ("n_conv_per_stage_decoder", &arch.n_conv_per_stage_decoder),
        ];
        for (key, got) in keys {
            if let Some(want) = case.get(key) {
                assert_eq!(got, &usizes(want), "{what}: {key}");
            }
        }
    }
}

#[test]
fn single_remaining_axis_needs_three_min_feature_maps() {
    // Only W is long enough to pool; 40 -> 20 -> 10, and 10 < 3 * 4 stops it (the seed would pool
    // once more, to 5).
    let t = get_pool_and_conv_props([1.0; 3], [4, 4, 40], 4, MAX_NUMPOOL).unwrap();
    assert_eq!(t.strides, vec![[1, 1, 1], [1, 1, 2], [1, 1, 2]]);
    assert_eq!(t.kernel_sizes, vec![[3, 3, 3]; 3]);
    assert_eq!(t.must_divide, [1, 1, 4]);
    assert_eq!(t.patch_size, [4, 4, 40]);
    // max_numpool caps every axis.
    let t = get_pool_and_conv_props([1.0; 3], [128; 3], 4, 2).unwrap();
    assert_eq!(t.num_pool_per_axis, [2, 2, 2]);
    assert_eq!(t.n_stages(), 3);
}

#[test]
fn pad_shape_rounds_up_only_where_needed() {
    assert_eq!(plan::pad_shape([50, 190, 192], [8, 32, 32]), [56, 192, 192]);
    let t = get_pool_and_conv_props([1.0; 3], [100, 100, 100], 4, MAX_NUMPOOL).unwrap();
    assert_eq!(t.must_divide, [16; 3]); // 100 -> 50 -> 25 -> 13 -> 7
    assert_eq!(t.patch_size, [112; 3]);
    assert!(get_pool_and_conv_props([1.0, 0.0, 1.0], [8; 3], 4, 9).is_err());
    assert!(get_pool_and_conv_props([1.0; 3], [8, 0, 8], 4, 9).is_err());
}

#[test]
fn resenc_m_128_cubed_test_vectors() {
    let arch = resenc_m([128; 3], 3);
    assert_eq!(arch.features_per_stage, vec![32, 64, 128, 256, 320, 320]);
    assert_eq!(arch.n_blocks_per_stage, vec![1, 3, 4, 6, 6, 6]);
    assert_eq!(arch.n_conv_per_stage_decoder, vec![1; 5]);
    assert!(arch.deep_supervision && arch.conv_bias && arch.norm.affine);
    assert_eq!(arch.feature_map_size([128; 3]), 558_319_104);
    assert_eq!(arch.param_count(), 102_350_575);
    // reference-spec 3.5, large isotropic volumes: 2 classes, the planner's network has no deep
    // supervision, batch round(2.45) = 2.
    let two = resenc_m([128; 3], 2);
    let planner = Architecture { deep_supervision: false, ..two.clone() };
    assert_eq!(planner.feature_map_size([128; 3]), 555_323_392);
    assert_eq!(two.nnunet_batch_size([128; 3], 8.0, None).unwrap(), 2);
}

#[test]
fn hippocampus_estimate_and_batch() {
    let arch = resenc_m([40, 56, 40], 3);
    assert_eq!(arch.features_per_stage, vec![32, 64, 128, 256]);
    assert_eq!(arch.n_blocks_per_stage, vec![1, 3, 4, 6]);
    assert_eq!(arch.param_count(), 25_895_593);
    let planner = Architecture { deep_supervision: false, ..arch.clone() };
    assert_eq!(planner.feature_map_size([40, 56, 40]), 23_609_600);
    let median = 36 * 50 * 35;
    assert_eq!(arch.nnunet_batch_size([40, 56, 40], 8.0, Some(median * 260)).unwrap(), 58);
    assert_eq!(arch.nnunet_batch_size([40, 56, 40], 8.0, None).unwrap(), 58);
    // The dataset cap binds for a small dataset (round(630000 / 89600) = 7), and 2 is the floor.
    assert_eq!(arch.nnunet_batch_size([40, 56, 40], 8.0, Some(median * 10)).unwrap(), 7);
    assert_eq!(arch.nnunet_batch_size([40, 56, 40], 8.0, Some(median)).unwrap(), 2);
    // Twice the VRAM doubles the reference: round(115.2) = 115.
    assert_eq!(arch.nnunet_batch_size([40, 56, 40], 16.0, None).unwrap(), 115);
    assert!(arch.nnunet_batch_size([40, 56, 40], 0.0, None).is_err());
}

#[test]
fn seed_autoconfigure_parameter_counts() {
    let arch = ArchConfig::seed().build(1, one_target(1), [128; 3]).unwrap();
    assert_eq!(arch.features_per_stage, vec![32, 64, 128, 256, 512, 512]);
    assert!(!arch.conv_bias && !arch.norm.affine && !arch.deep_supervision);
    assert_eq!(arch.param_count(), 213_182_277);
    let se = ArchConfig { squeeze_excitation: Some(SePool::Dh), ..ArchConfig::seed() };
    let arch = se.build(1, one_target(1), [128; 3]).unwrap();
    assert_eq!(arch.param_count(), 213_645_381);
    // Where SE pools changes no parameter.
    let dhw = Architecture { squeeze_excitation: Some(SePool::Dhw), ..arch.clone() };
    assert_eq!(dhw.param_count(), 213_645_381);
}

#[test]
fn squeeze_excitation_reduced_channels() {
    for (c, rd) in [(32, 8), (64, 8), (128, 8), (256, 16), (320, 24), (512, 32), (12, 8)] {
        assert_eq!(se_reduced_channels(c), rd, "C = {c}");
    }
    for name in ["ops/squeeze_excite_c32.safetensors", "ops/squeeze_excite_c12.safetensors"] {
        let f = common::fixture(name);
        let c = f.get("x").unwrap().dims()[1];
        let rd = common::fixture_meta(&f)["reduced_channels"].as_u64().unwrap() as usize;
        assert_eq!(se_reduced_channels(c), rd, "{name}");
        assert_eq!(f.get("fc1.weight").unwrap().dims(), &[rd, c, 1, 1, 1], "{name}");
    }
    let cfg = ArchConfig { squeeze_excitation: Some(SePool::Dhw), ..ArchConfig::default() };
    let arch = cfg.build(1, one_target(3), [128; 3]).unwrap();
    let specs: BTreeMap<String, Vec<usize>> =
        arch.param_specs().into_iter().map(|p| (p.name, p.shape)).collect();
    assert_eq!(specs["encoder.stages.4.blocks.2.squeeze_excitation.fc1.weight"], vec![24, 320, 1, 1, 1]);
    assert_eq!(specs["encoder.stages.4.blocks.2.squeeze_excitation.fc2.bias"], vec![320]);
    assert!(!specs.keys().any(|k| k.starts_with("decoder.") && k.contains("squeeze")));
}

fn from<T: serde::de::DeserializeOwned>(config: &Value, key: &str) -> T {
    serde_json::from_value(config[key].clone()).unwrap_or_else(|e| panic!("config.{key}: {e}"))
}

/// The small ResidualEncoderUNet fixture's description, read from its meta.
fn fixture_model() -> (Architecture, unet3d::tensor::io::TensorFile) {
    let f = common::fixture("model/resenc_unet_small.safetensors");
    let meta = common::fixture_meta(&f);
    let c = &meta["config"];
    let cfg = ArchConfig {
        autoconfigure: false,
        num_stages: Some(c["n_stages"].as_u64().unwrap() as usize),
        features_per_stage: Some(from(c, "features_per_stage")),
        strides: Some(from(c, "strides")),
        kernel_sizes: Some(from(c, "kernel_sizes")),
        n_blocks_per_stage: Some(from(c, "n_blocks_per_stage")),
        n_conv_per_stage_decoder: Some(from(c, "n_conv_per_stage_decoder")),
        conv_bias: c["conv_bias"].as_bool().unwrap(),
        deep_supervision: meta["deep_supervision"].as_bool().unwrap(),
        ..ArchConfig::default()
    };
    let input = usizes(&meta["input_shape"]);
    let classes = meta["num_classes"].as_u64().unwrap() as usize;
    let arch = cfg.build(input[1], one_target(classes), [input[2], input[3], input[4]]).unwrap();
    (arch, f)
}

#[test]
fn parameter_names_match_the_pytorch_state_dict() {
    let (arch, f) = fixture_model();
    let mine: BTreeMap<String, Vec<usize>> =
        arch.param_specs().into_iter().map(|p| (p.name, p.shape)).collect();
    assert_eq!(mine.len(), arch.param_specs().len(), "duplicate names");
    let mut canonical = BTreeMap::new();
    let mut grads = BTreeMap::new();
    for (name, t) in &f.tensors {
        if let Some(p) = name.strip_prefix("param.") {
            if p.contains(".all_modules.") {
                // ConvDropoutNormReLU registers conv and norm twice: as .conv/.norm and as
                // .all_modules.0/.1 (no dropout here); the alias must point at one of ours.
                let alias = p.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.");
                assert_eq!(mine.get(&alias).map(Vec::as_slice), Some(t.dims()), "alias {p}");
            } else {
                canonical.insert(p.to_string(), t.dims().to_vec());
            }
        } else if let Some(p) = name.strip_prefix("grad.") {
            grads.insert(p.to_string(), t.dims().to_vec());
        }
    }
    let missing: Vec<_> = canonical.keys().filter(|k| !mine.contains_key(*k)).collect();
    let extra: Vec<_> = mine.keys().filter(|k| !canonical.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    assert_eq!(mine, canonical);
    assert_eq!(mine, grads);
    let fixture_sum: u64 = canonical.values().map(|s| s.iter().product::<usize>() as u64).sum();
    assert_eq!(arch.param_count(), fixture_sum);
    let meta = common::fixture_meta(&f);
    assert_eq!(arch.param_count(), meta["n_parameters"].as_u64().unwrap());
    // State-dict order: encoder stem first, then stages, then decoder stages, transpconvs, heads.
    let order: Vec<String> = arch.param_specs().into_iter().map(|p| p.name).collect();
    assert_eq!(order[0], "encoder.stem.convs.0.conv.weight");
    assert_eq!(order.last().unwrap(), "decoder.seg_layers.2.bias");
    let first = |prefix: &str| order.iter().position(|n| n.starts_with(prefix)).unwrap();
    assert!(first("encoder.stages.") < first("decoder.stages."));
    assert!(first("decoder.stages.") < first("decoder.transpconvs."));
    assert!(first("decoder.transpconvs.") < first("decoder.seg_layers."));
}

#[test]
fn several_targets_get_one_decoder_each() {
    let targets = vec![Target::new("ink", 1), Target::new("normals", 3)];
    let both = ArchConfig::default().build(1, targets, [64; 3]).unwrap();
    let ink = ArchConfig::default().build(1, vec![Target::new("ink", 1)], [64; 3]).unwrap();
    let normals = ArchConfig::default().build(1, vec![Target::new("normals", 3)], [64; 3]).unwrap();
    let names: Vec<String> = both.param_specs().into_iter().map(|p| p.name).collect();
    assert!(names.iter().all(|n| n.starts_with("encoder.") || n.starts_with("decoders.")));
    assert!(names.contains(&"decoders.ink.seg_layers.3.weight".to_string()));
    assert!(names.contains(&"decoders.normals.transpconvs.0.weight".to_string()));
    assert_eq!(both.decoder_prefix(1), "decoders.normals");
    assert_eq!(ink.decoder_prefix(0), "decoder");
    let encoder: u64 =
        ink.param_specs().iter().filter(|p| p.name.starts_with("encoder.")).map(|p| p.numel() as u64).sum();
    assert_eq!(both.param_count(), ink.param_count() + normals.param_count() - encoder);
    // The encoder is counted once in the feature-map size too.
    let enc_fm = ink.feature_map_size([64; 3]) - decoder_fm(&ink);
    assert_eq!(both.feature_map_size([64; 3]), enc_fm + decoder_fm(&ink) + decoder_fm(&normals));
}

/// Decoder part of a 64^3 network's feature-map size, from its definition: at each decoder stage
/// the convs and transposed conv give C x voxels each, every head (deep supervision) classes x voxels.
fn decoder_fm(a: &Architecture) -> u64 {
    let n = a.n_stages();
    (0..n - 1)
        .map(|s| {
            let c = a.features_per_stage[s] as u64;
            let v = (64u64 >> s).pow(3); // isotropic stride 2 per stage from stage 1 on
            (a.n_conv_per_stage_decoder[n - 2 - s] as u64 + 1) * c * v + a.targets[0].channels as u64 * v
        })
        .sum()
}

#[test]
fn bottleneck_block_counted_by_hand() {
    let cfg = ArchConfig {
        autoconfigure: false,
        strides: Some(PerStage::Each(vec![Axes::Iso(1), Axes::Iso(2)])),
        kernel_sizes: Some(PerStage::All(Axes::Iso(3))),
        features_per_stage: Some(PerStage::Each(vec![4, 8])),
        n_blocks_per_stage: Some(PerStage::All(1)),
        block: BlockKind::BottleneckD,
        bottleneck_channels: Some(PerStage::All(2)),
        conv_bias: false,
        norm: unet3d::arch::Norm { eps: 1e-5, affine: false },
        ..ArchConfig::default()
    };
    let arch = cfg.build(1, one_target(1), [8; 3]).unwrap();
    // stem 4*1*27 = 108; stage 0: 1x1 4->2 (8) + 3^3 2->2 (108) + 1x1 2->4 (8) = 124; stage 1:
    // 8 + 108 + 1x1 2->8 (16) + skip 1x1 4->8 (32) = 164; decoder: transposed 8*4*8 = 256,
    // conv 8->4 3^3 = 864, head 4 + 1 = 5.
    assert_eq!(arch.param_count(), 108 + 124 + 164 + 256 + 864 + 5);
    let names: Vec<String> = arch.param_specs().into_iter().map(|p| p.name).collect();
    assert!(names.contains(&"encoder.stages.1.blocks.0.conv3.conv.weight".to_string()));
    assert!(names.contains(&"encoder.stages.1.blocks.0.skip.1.conv.weight".to_string()));
    assert!(!names.iter().any(|n| n.contains("norm") || n.ends_with("conv.bias")));
    // Feature maps at 8^3 (bottleneck conv1 runs at the block's input size): stem 4*512; stage 0
    // 2*512 + 2*512 + 4*512; stage 1 2*512 (conv1 at input size) + 2*64 + 8*64 + skip 8*64;
    // decoder conv 4*512 + transposed 4*512 + head 1*512.
    let want = 4 * 512 + 8 * 512 + (2 * 512 + 2 * 64 + 8 * 64 + 8 * 64) + (4 + 4 + 1) * 512;
    assert_eq!(arch.feature_map_size([8; 3]), want);
}

#[test]
fn basic_block_skip_without_projection_has_no_parameters() {
    // 320 -> 320 with stride 2: the skip is only an average pool, yet counted as a feature map.
    let arch = resenc_m([128; 3], 3);
    let names: Vec<String> = arch.param_specs().into_iter().map(|p| p.name).collect();
    assert!(names.contains(&"encoder.stages.4.blocks.0.skip.1.conv.weight".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("encoder.stages.5.blocks.0.skip")));
    assert!(!names.iter().any(|n| n.contains("skip") && n.ends_with("conv.bias")));
    let stride_only = Architecture {
        features_per_stage: vec![8, 8],
        n_blocks_per_stage: vec![1, 1],
        strides: vec![[1; 3], [2; 3]],
        kernel_sizes: vec![[3; 3]; 2],
        n_conv_per_stage_decoder: vec![1],
        ..arch
    };
    // stem 8*512; stage 0: 2*8*512; stage 1: 2*8*64 + skip 8*64; decoder 8*512 + 8*512 + 3*512.
    let want = 8 * 512 + 16 * 512 + 24 * 64 + 19 * 512;
    assert_eq!(stride_only.feature_map_size([8; 3]), want);
    // A width change without a stride: the skip is Sequential(projection), so index 0.
    let widen =
        Architecture { features_per_stage: vec![8, 16], strides: vec![[1; 3], [1, 2, 2]], ..stride_only };
    let specs: BTreeMap<String, Vec<usize>> =
        widen.param_specs().into_iter().map(|p| (p.name, p.shape)).collect();
    assert_eq!(specs["encoder.stages.1.blocks.0.skip.1.conv.weight"], vec![16, 8, 1, 1, 1]);
    let flat = Architecture { strides: vec![[1; 3], [1; 3]], ..widen };
    let specs: BTreeMap<String, Vec<usize>> =
        flat.param_specs().into_iter().map(|p| (p.name, p.shape)).collect();
    assert_eq!(specs["encoder.stages.1.blocks.0.skip.0.conv.weight"], vec![16, 8, 1, 1, 1]);
    assert_eq!(specs["encoder.stages.1.blocks.0.skip.0.norm.bias"], vec![16]);
    assert!(!specs.keys().any(|k| k.contains("skip.1")));
}

#[test]
fn per_stage_values_accept_one_number_or_a_list() {
    let s: PerStage<Axes> = serde_json::from_str("[1, 2, 2]").unwrap();
    assert_eq!(s, PerStage::Each(vec![Axes::Iso(1), Axes::Iso(2), Axes::Iso(2)]));
    let s: PerStage<Axes> = serde_json::from_str("3").unwrap();
    assert_eq!(s, PerStage::All(Axes::Iso(3)));
    let s: PerStage<Axes> = serde_json::from_str("[[1, 3, 3], 3]").unwrap();
    assert_eq!(s, PerStage::Each(vec![Axes::PerAxis([1, 3, 3]), Axes::Iso(3)]));
    assert_eq!(PerStage::All(7).resolve("k", 3, "why").unwrap(), vec![7, 7, 7]);
    let e = PerStage::Each(vec![1, 2]).resolve("n_blocks_per_stage", 3, "one per stage").unwrap_err();
    assert!(format!("{e:#}").contains("model_config.n_blocks_per_stage has 2 entries but needs 3"), "{e:#}");
}

#[test]
fn explicit_values_are_validated_by_key() {
    let base = ArchConfig {
        autoconfigure: false,
        strides: Some(serde_json::from_str("[1, 2, 2, 2]").unwrap()),
        kernel_sizes: Some(PerStage::All(Axes::Iso(3))),
        ..ArchConfig::default()
    };
    let arch = base.build(2, one_target(4), [32; 3]).unwrap();
    assert_eq!(arch.features_per_stage, vec![32, 64, 128, 256]);
    assert_eq!(arch.n_conv_per_stage_decoder, vec![1; 3]);
    let err = |cfg: ArchConfig| format!("{:#}", cfg.build(2, one_target(4), [32; 3]).unwrap_err());
    let e = err(ArchConfig { features_per_stage: Some(PerStage::Each(vec![8, 16, 32])), ..base.clone() });
    assert!(e.contains("model_config.features_per_stage has 3 entries but needs 4"), "{e}");
    assert!(e.contains("model_config.strides"), "names where the stage count came from: {e}");
    let e = err(ArchConfig { n_conv_per_stage_decoder: Some(PerStage::Each(vec![1; 4])), ..base.clone() });
    assert!(e.contains("model_config.n_conv_per_stage_decoder has 4 entries but needs 3"), "{e}");
    let e = err(ArchConfig { kernel_sizes: Some(PerStage::Each(vec![Axes::Iso(3); 5])), ..base.clone() });
    assert!(e.contains("model_config.kernel_sizes has 5 entries but needs 4"), "{e}");
    let e = err(ArchConfig { kernel_sizes: Some(PerStage::All(Axes::PerAxis([1, 2, 3]))), ..base.clone() });
    assert!(e.contains("kernel_sizes[0]") && e.contains("odd"), "{e}");
    let e = err(ArchConfig { num_stages: Some(5), ..base.clone() });
    assert!(e.contains("model_config.strides has 4 entries but needs 5"), "{e}");
    let e = err(ArchConfig { strides: None, num_stages: Some(4), ..base.clone() });
    assert!(e.contains("model_config.strides is required"), "{e}");
    let e = err(ArchConfig { strides: Some(PerStage::All(Axes::Iso(1))), ..base.clone() });
    assert!(e.contains("model_config.num_stages is required"), "{e}");
    let e = err(ArchConfig { n_blocks_per_stage: Some(PerStage::All(0)), ..base.clone() });
    assert!(e.contains("n_blocks_per_stage[0] is 0"), "{e}");
    let dup = vec![Target::new("a", 1), Target::new("a", 2)];
    assert!(format!("{:#}", base.build(2, dup, [32; 3]).unwrap_err()).contains("twice"));
    let dotted = vec![Target::new("a.b", 1)];
    assert!(base.build(2, dotted, [32; 3]).is_err());
    // Autoconfigure with an override of a different length names the key.
    let auto = ArchConfig { n_blocks_per_stage: Some(PerStage::Each(vec![1, 2])), ..ArchConfig::default() };
    let e = format!("{:#}", auto.build(1, one_target(2), [64; 3]).unwrap_err());
    assert!(e.contains("model_config.strides: autoconfigure plans 5 stages"), "{e}");
    assert!(e.contains("model_config.n_blocks_per_stage"), "{e}");
    // A patch too small to pool gives a single stage: not a U-Net.
    let e = format!("{:#}", ArchConfig::default().build(1, one_target(2), [6; 3]).unwrap_err());
    assert!(e.contains("at least 2 stages"), "{e}");
}

#[test]
fn indivisible_patches_propose_the_nearest_valid_sizes() {
    // Explicit strides: multiples of 2^5 = 32 per axis, and 1 * 2^4 = 16 along D.
    let explicit = ArchConfig {
        autoconfigure: false,
        strides: Some(PerStage::Each(vec![
            Axes::Iso(1),
            Axes::PerAxis([1, 2, 2]),
            Axes::Iso(2),
            Axes::Iso(2),
            Axes::Iso(2),
            Axes::Iso(2),
        ])),
        kernel_sizes: Some(PerStage::All(Axes::Iso(3))),
        ..ArchConfig::default()
    };
    let e = format!("{:#}", explicit.build(1, one_target(2), [40, 100, 128]).unwrap_err());
    assert!(e.contains("[40, 100, 128]") && e.contains("[16, 32, 32]"), "{e}");
    assert!(e.contains("[32, 96, 128] or [48, 128, 128]"), "{e}");
    let e = format!("{:#}", explicit.build(1, one_target(2), [8, 64, 64]).unwrap_err());
    assert!(e.contains("nearest valid patch sizes: [16, 64, 64]"), "only rounding up is valid: {e}");
    // Autoconfigure: 100 pools 4 times (must 16), so 96 or 112.
    let e = format!("{:#}", ArchConfig::default().build(1, one_target(2), [100; 3]).unwrap_err());
    assert!(e.contains("[96, 96, 96] or [112, 112, 112]"), "{e}");

    // Every proposal is accepted by autoconfigure, on isotropic and anisotropic spacings.
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..200 {
        let patch: [usize; 3] = std::array::from_fn(|_| rng.random_range(5..300));
        let spacing: [f64; 3] = std::array::from_fn(|_| [0.7, 1.0, 2.5, 5.0][rng.random_range(0..4)]);
        let cfg = ArchConfig { spacing, ..ArchConfig::default() };
        let must =
            |p| get_pool_and_conv_props(spacing, p, MIN_FEATURE_MAP_SIZE, MAX_NUMPOOL).unwrap().must_divide;
        let (down, up) = plan::nearest_valid_patches(patch, must);
        let up = up.expect("rounding up always settles");
        assert!((0..3).all(|d| up[d] >= patch[d]));
        let ok = |p: [usize; 3]| {
            let t = get_pool_and_conv_props(spacing, p, MIN_FEATURE_MAP_SIZE, MAX_NUMPOOL).unwrap();
            t.n_stages() < 2 || cfg.build(1, one_target(2), p).is_ok()
        };
        assert!(ok(up), "{patch:?} {spacing:?} -> {up:?}");
        if let Some(down) = down {
            assert!((0..3).all(|d| down[d] <= patch[d]));
            assert!(ok(down), "{patch:?} {spacing:?} -> {down:?}");
        }
        if cfg.build(1, one_target(2), patch).is_ok() {
            assert_eq!((down, Some(up)), (Some(patch), Some(patch)));
        }
    }
}

#[test]
fn architecture_round_trips_through_json() {
    let cfg = ArchConfig {
        squeeze_excitation: Some(SePool::Dh),
        block: BlockKind::BottleneckD,
        ..ArchConfig::default()
    };
    let arch = cfg.build(2, vec![Target::new("ink", 1), Target::new("normals", 3)], [32, 128, 128]).unwrap();
    let json = serde_json::to_string(&arch).unwrap();
    assert!(json.contains(r#""squeeze_excitation":"dh""#), "{json}");
    let back: Architecture = serde_json::from_str(&json).unwrap();
    assert_eq!(back, arch);
    back.validate().unwrap();
}

#[test]
fn training_memory_adds_up_and_bounds_the_batch() {
    let arch = resenc_m([128; 3], 3);
    let m = arch.training_memory([128; 3], 2, 2).unwrap();
    let p = 102_350_575u64;
    assert_eq!((m.weights, m.gradients, m.optimizer_state), (4 * p, 4 * p, 8 * p));
    let acts = (558_319_104f64 * unet3d::arch::size::ACTIVATION_FACTOR).ceil() as u64 * 4;
    assert_eq!(m.activations, 2 * acts);
    assert_eq!(m.batch_data, 2 * (1 + 3) * 128u64.pow(3) * 4);
    assert_eq!(m.total(), 16 * p + 2 * acts + m.batch_data);
    println!("{m}");
    for budget_gib in [16u64, 24, 80, 139] {
        let budget = budget_gib << 30;
        let b = arch.max_batch_size([128; 3], budget, 2).unwrap();
        assert!(arch.training_memory([128; 3], b, 2).unwrap().total() <= budget);
        assert!(arch.training_memory([128; 3], b + 1, 2).unwrap().total() > budget);
        println!("{budget_gib} GiB -> batch {b}");
    }
    let e = format!("{:#}", arch.max_batch_size([128; 3], 6 << 30, 2).unwrap_err());
    assert!(e.contains("even at batch 1") && e.contains("GiB"), "{e}");
    assert!(arch.training_memory([100; 3], 1, 2).is_err(), "an invalid patch is refused");
    assert!(arch.training_memory([128; 3], 0, 2).is_err());
}

/// nnU-Net ResEnc's patch search and batch rule (reference-spec 3.4) on reference-spec 3.5's
/// worked plans: Hippocampus (spacing 1, median 36 x 50 x 35, 260 cases, 3 labels) plans
/// 40 x 56 x 40, 4 stages, batch 58; volumes of 256^3 and more shrink from 256^3 to 128^3, batch 2.
#[test]
fn resenc_patch_search_reproduces_the_worked_plans() {
    use unet3d::arch::autoplan;
    let hippo =
        autoplan::plan(&ArchConfig::default(), 1, &one_target(3), [1.0; 3], [36.0, 50.0, 35.0], 260, 8.0)
            .unwrap();
    assert_eq!((hippo.patch_size, hippo.batch_size, hippo.feature_map_size), ([40, 56, 40], 58, 23_609_600));
    assert_eq!(hippo.topology.strides, vec![[1; 3], [2; 3], [2; 3], [2; 3]]);
    let large =
        autoplan::plan(&ArchConfig::default(), 1, &one_target(2), [1.0; 3], [300.0; 3], 100, 8.0).unwrap();
    assert_eq!((large.patch_size, large.batch_size, large.feature_map_size), ([128; 3], 2, 555_323_392));
    // Twice the VRAM: a larger patch, never above the reference.
    let more =
        autoplan::plan(&ArchConfig::default(), 1, &one_target(2), [1.0; 3], [300.0; 3], 100, 16.0).unwrap();
    assert!(more.patch_size.iter().product::<usize>() > 128usize.pow(3), "{:?}", more.patch_size);
    assert!(more.feature_map_size as f64 <= more.reference);
}

/// The target spacing: the median per axis, except nnU-Net's anisotropy rule.
#[test]
fn target_spacing_takes_the_median_or_the_tenth_percentile_of_an_anisotropic_axis() {
    use unet3d::arch::autoplan::target_spacing;
    let shapes = [[100, 200, 200]; 5];
    let iso = [[1.0, 0.8, 0.8], [1.2, 0.7, 0.7], [1.0, 0.9, 0.9], [1.4, 0.8, 0.8], [1.0, 0.8, 0.8]];
    assert_eq!(target_spacing(&iso, &shapes).unwrap(), [1.0, 0.8, 0.8]);
    // z 5 mm against 0.8 (over 3 x) with 40 slices against 400 voxels (under a third): the 10th
    // percentile of z, here between 2.5 and 4 (numpy: 2.5 + 0.4 * 1.5 = 3.1).
    let aniso = [[2.5, 0.8, 0.8], [4.0, 0.8, 0.8], [5.0, 0.8, 0.8], [5.0, 0.8, 0.8], [6.0, 0.8, 0.8]];
    let thin = [[40, 400, 400]; 5];
    let t = target_spacing(&aniso, &thin).unwrap();
    assert!((t[0] - 3.1).abs() < 1e-12 && t[1..] == [0.8, 0.8], "{t:?}");
    // As many slices as in-plane voxels: not anisotropic in voxels, the median stays.
    assert_eq!(target_spacing(&aniso, &[[400, 400, 400]; 5]).unwrap(), [5.0, 0.8, 0.8]);
}
