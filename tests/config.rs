//! The YAML configuration against tasks/reference.yaml (both directions: every key in it is read
//! and every key read is in it), the seed's schema and ignored keys (reference-spec 1.4-1.6), and
//! `unet3d plan` against the derived parameter count of reference-spec 2.8.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use unet3d::Device;
use unet3d::arch::{BlockKind, PerStage, SePool};
use unet3d::config::{
    Activation, Config, Normalization, OptimizerConfig, OutputType, Parsed, Sampling, VolumePaths,
};
use unet3d::loss::Loss;
use unet3d::optim::LrSchedule;
use unet3d::train::plan::PlanReport;

fn task(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tasks").join(name)
}

fn load(name: &str, sets: &[&str]) -> anyhow::Result<Parsed> {
    Config::load(&task(name), &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

/// The smallest config: one target, everything else default.
const MINIMAL: &str = "dataset_config:\n  targets:\n    ink:\n      channels: 1\n";

fn parse(yaml: &str, sets: &[&str]) -> anyhow::Result<Parsed> {
    Config::parse(yaml, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

fn err(yaml: &str, sets: &[&str]) -> String {
    format!("{:#}", parse(yaml, sets).expect_err("expected an error"))
}

/// Names of targets, and of each list item, are data: the schema writes `*` for them, and
/// `<target>` for a target's path in a volume entry.
fn is_named_map(schema: &str) -> bool {
    schema == "dataset_config.targets" || schema == "inference_config.targets"
}

/// Every key path of a YAML tree: (concrete path, schema path, value). loss_kwargs is one value
/// (the loss checks its contents).
fn walk(v: &Value, path: &str, schema: &str, out: &mut Vec<(String, String, Value)>) {
    let join = |a: &str, b: &str| if a.is_empty() { b.to_string() } else { format!("{a}.{b}") };
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let concrete = join(path, k);
                if is_named_map(schema) {
                    out.push((concrete.clone(), String::new(), child.clone()));
                    walk(child, &concrete, &join(schema, "*"), out);
                    continue;
                }
                let in_volume = schema == "dataset_config.volume_paths.*";
                let key = if in_volume && k != "input" && k != "ref_label" { "<target>" } else { k.as_str() };
                let schema_k = join(schema, key);
                out.push((concrete.clone(), schema_k.clone(), child.clone()));
                if k != "loss_kwargs" {
                    walk(child, &concrete, &schema_k, out);
                }
            }
        }
        Value::Array(items) if schema == "dataset_config.volume_paths" => {
            for (i, item) in items.iter().enumerate() {
                let concrete = join(path, &i.to_string());
                out.push((concrete.clone(), String::new(), item.clone()));
                walk(item, &concrete, &join(schema, "*"), out);
            }
        }
        _ => {}
    }
}

fn reference_keys() -> Vec<(String, String, Value)> {
    let text = std::fs::read_to_string(task("reference.yaml")).unwrap();
    let tree: Value = serde_saphyr::from_str(&text).unwrap();
    let mut out = Vec::new();
    walk(&tree, "", "", &mut out);
    out
}

#[test]
fn reference_yaml_documents_exactly_the_keys_read() {
    // As text: its defaults compare with the built-in ones without resolving paths against tasks/.
    let parsed = parse(&std::fs::read_to_string(task("reference.yaml")).unwrap(), &[]).unwrap();
    assert!(parsed.warnings.is_empty(), "every key of reference.yaml is read: {:#?}", parsed.warnings);
    let documented: BTreeSet<String> =
        reference_keys().into_iter().map(|(_, s, _)| s).filter(|s| !s.is_empty()).collect();
    let undocumented: Vec<&String> = parsed.keys_read.difference(&documented).collect();
    assert!(undocumented.is_empty(), "keys read but missing from reference.yaml: {undocumented:?}");
    let unread: Vec<&String> = documented.difference(&parsed.keys_read).collect();
    assert!(unread.is_empty(), "keys in reference.yaml nothing reads: {unread:?}");
    assert!(documented.len() > 90, "{} keys", documented.len());

    // Its values are the defaults: the same config as the minimal one, apart from the examples.
    let minimal = parse(MINIMAL, &[]).unwrap().config;
    let reference = parsed.config;
    assert_eq!(reference.tr_setup, minimal.tr_setup);
    assert_eq!(reference.tr_config, minimal.tr_config);
    assert_eq!(reference.model_config, minimal.model_config);
}

#[test]
fn a_wrong_value_for_any_key_names_it() {
    let mut checked = 0;
    for (path, _, value) in reference_keys() {
        if !path.contains('.') {
            continue; // a section: --set needs section.key
        }
        let mut wrong = vec![if value.is_object() { "[wrong]" } else { "{wrong: type}" }];
        if !value.is_string() && !value.is_null() && !value.is_object() {
            wrong.push("wrong");
        }
        for w in wrong {
            let set = format!("{path}={w}");
            let msg = format!("{:#}", load("reference.yaml", &[&set]).expect_err(&set));
            assert!(msg.contains(&format!("{path} = ")), "--set {set}: error does not name {path}: {msg}");
            checked += 1;
        }
    }
    assert!(checked > 150, "{checked} cases");
}

#[test]
fn errors_say_what_is_allowed() {
    let e = err(MINIMAL, &["tr_config.optimizer=Adagrad"]);
    assert!(e.contains(r#"tr_config.optimizer = "Adagrad": expected one of "AdamW", "Adam", "SGD""#), "{e}");
    let e = err(MINIMAL, &["tr_config.batch_size=0"]);
    assert!(e.contains("tr_config.batch_size = 0: expected a whole number >= 1"), "{e}");
    let e = err(MINIMAL, &["dataset_config.targets.ink.loss_fn=DiceLoss"]);
    assert!(
        e.contains("dataset_config.targets.ink.loss_fn = \"DiceLoss\"") && e.contains("MaskedCosineLoss"),
        "{e}"
    );
    let e = err(MINIMAL, &["dataset_config.targets.ink.loss_kwargs={gamma: 2}"]);
    assert!(e.contains("dataset_config.targets.ink.loss_kwargs") && e.contains("gamma"), "{e}");
    let e = err(MINIMAL, &["model_config.basic_decoder_block=ResidualBlock"]);
    assert!(e.contains("ConvBlock"), "{e}");
    let e = err("dataset_config: {in_channels: 2}", &[]);
    assert!(e.contains("dataset_config.targets: no targets"), "{e}");
    let e = err("dataset_config:\n  targets:\n    ink: {activation: sigmoid}\n", &[]);
    assert!(e.contains("dataset_config.targets.ink.channels: missing"), "{e}");
    let e = err("dataset_config:\n  targets:\n    a.b: {channels: 1}\n", &[]);
    assert!(e.contains("dataset_config.targets.a.b") && e.contains("plain name"), "{e}");
    let e = err(MINIMAL, &["tr_setup=3"]);
    assert!(e.contains("section.key"), "{e}");
    let e = err(MINIMAL, &["tr_config.patch_size=[64, 64, 60]"]);
    assert!(e.contains("patch size [64, 64, 60] is not divisible") && e.contains("[64, 64, 64]"), "{e}");
    let e = err(MINIMAL, &["inference_config.patch_size=[100, 128, 128]"]);
    assert!(e.contains("inference_config.patch_size") && e.contains("not divisible"), "{e}");
    let e = err(MINIMAL, &["inference_config.targets.sheet.activation=none"]);
    assert!(e.contains("inference_config.targets.sheet: not a target"), "{e}");
    let e = err(MINIMAL, &["inference_config.targets.ink.channels=3"]);
    assert!(e.contains("inference_config.targets.ink.channels = 3: expected 1"), "{e}");
    let e = err(MINIMAL, &["tr_setup.autoconfigure=false"]);
    assert!(e.contains("model_config.num_stages is required when autoconfigure is off"), "{e}");
    let e = err(MINIMAL, &["tr_setup.autoconfigure=false", "model_config.num_stages=3"]);
    assert!(e.contains("model_config.strides is required when autoconfigure is off"), "{e}");
    let e = err("tr_setup: [1]\n", &[]);
    assert!(e.contains("tr_setup = [1]: expected a mapping"), "{e}");
    let e = err(MINIMAL, &["tr_config.optimizer=SGD", "tr_config.momentum=0"]);
    assert!(
        e.contains("tr_config.momentum = 0.0: expected a momentum > 0 while tr_config.nesterov is true"),
        "{e}"
    );
    assert!(err("a: [", &[]).contains("a: ["), "YAML syntax errors show the snippet");
}

/// Model and target names become file and folder names (checkpoints, logs, output arrays that
/// `infer --overwrite` replaces), so none may climb out of its folder, be absolute or hide.
#[test]
fn names_that_could_become_paths_are_refused() {
    for bad in ["../../x", "/tmp/x", "a/b", "..", ".hidden", "a b", "x\\y", "caf\u{e9}"] {
        let e = err(MINIMAL, &[&format!("tr_setup.model_name={bad:?}")]);
        assert!(e.contains("tr_setup.model_name") && e.contains("plain name"), "{bad}: {e}");
        let yaml = format!("dataset_config:\n  targets:\n    {bad:?}: {{channels: 1}}\n");
        let e = err(&yaml, &[]);
        assert!(e.contains("target name") && e.contains("plain name"), "{bad}: {e}");
    }
    let ok = parse(MINIMAL, &["tr_setup.model_name=Res-Enc_M2"]).unwrap();
    assert_eq!(ok.config.tr_setup.model_name, "Res-Enc_M2");
}

/// A regression target's values have no bounds, so an integer output needs a stated range;
/// by default it is written as float32, and activated or vector targets keep their ranges.
#[test]
fn integer_outputs_of_regression_targets_need_a_range() {
    let yaml =
        "dataset_config:\n  targets:\n    ink: {channels: 1}\n    dist: {channels: 1, loss_fn: MSELoss}\n";
    let c = parse(yaml, &[]).unwrap().config;
    let (ink, dist) = (&c.dataset_config.targets[0], &c.dataset_config.targets[1]);
    assert_eq!(c.inference_config.output_type_for(dist), OutputType::Float32);
    assert_eq!(c.inference_config.output_type_for(ink), OutputType::Uint8);
    let e = err(yaml, &["inference_config.output_type=uint8"]);
    assert!(
        e.contains("inference_config.output_type")
            && e.contains("'dist'")
            && e.contains("inference_config.targets.dist.range"),
        "{e}"
    );
    let c =
        parse(yaml, &["inference_config.output_type=uint16", "inference_config.targets.dist.range=[0, 40]"])
            .unwrap()
            .config;
    assert_eq!(c.inference_config.value_range(&c.dataset_config.targets[1]), Some([0.0, 40.0]));
    parse(yaml, &["inference_config.output_type=uint8", "inference_config.targets.dist.activation=sigmoid"])
        .unwrap();
    parse(yaml, &["inference_config.output_type=uint8", "inference_config.output_targets=[ink]"]).unwrap();
    let e = err(yaml, &["inference_config.targets.dist.range=[3, 1]"]);
    assert!(e.contains("inference_config.targets.dist.range") && e.contains("lo < hi"), "{e}");
}

#[test]
fn missing_sections_and_keys_take_the_defaults() {
    let p = parse(MINIMAL, &[]).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let c = p.config;
    let s = &c.tr_setup;
    assert_eq!(s.model_name, "Model");
    assert_eq!(s.vram_max, 16_000_000_000);
    assert_eq!((s.tr_val_split, s.dilate_label, s.load_weights_only), (0.95, false, false));
    assert_eq!(s.ckpt_out_base, PathBuf::from("./checkpoints/"));
    assert_eq!(s.checkpoint_path, None);
    assert_eq!(s.tensorboard_log_dir, PathBuf::from("./tensorboard_logs/"));
    assert_eq!((s.device, s.seed, s.checkpoints_kept), (Device::Cpu, 0, 10));

    let t = &c.tr_config;
    let OptimizerConfig::Adam(adam) = t.optimizer else { panic!("{:?}", t.optimizer) };
    assert!(adam.decoupled, "AdamW");
    assert_eq!((adam.lr, adam.weight_decay, adam.betas, adam.eps), (1e-3, 0.0, (0.9, 0.999), 1e-8));
    assert_eq!(t.scheduler, LrSchedule::Cosine { max_epochs: 500 });
    assert_eq!(t.grad_clip_max_norm, Some(12.0));
    assert_eq!(t.patch_size, [192; 3]);
    assert_eq!((t.batch_size, t.gradient_accumulation), (2, 1));
    assert_eq!((t.max_steps_per_epoch, t.max_val_steps_per_epoch, t.max_epoch), (500, 25, 500));
    assert_eq!(t.num_dataloader_workers, 4);
    assert!(t.augmentation.enabled);
    assert_eq!(t.augmentation.mirror_axes, [0, 1, 2]);

    let m = &c.model_config;
    assert_eq!(*m, unet3d::arch::ArchConfig::default(), "ResEncM defaults");

    let d = &c.dataset_config;
    assert_eq!((d.min_labeled_ratio, d.min_bbox_percent, d.use_cache), (0.1, 0.95, true));
    assert_eq!(d.cache_folder, PathBuf::from("patch_cache"));
    assert_eq!(d.in_channels, 1);
    assert_eq!(d.normalization, [Normalization::ScaleToUnit]);
    assert_eq!(d.sampling, Sampling::PatchSearch);
    let ink = &d.targets[0];
    assert_eq!(
        (ink.name.as_str(), ink.channels, ink.activation, ink.weight),
        ("ink", 1, Activation::None, 1.0)
    );
    assert_eq!(ink.loss_fn, "BCEDiceLoss");
    assert_eq!(ink.loss, Loss::BceDice { alpha: 0.5, beta: 0.5 });
    assert!(d.volume_paths.is_empty());

    let i = &c.inference_config;
    assert_eq!((i.checkpoint_path.as_ref(), i.input_path.as_ref()), (None, None));
    assert_eq!(i.output_path, PathBuf::from("./outputs"));
    assert_eq!((i.patch_size, i.batch_size, i.overlap), ([192; 3], 2, 0.25));
    assert_eq!(i.output_targets, ["ink"]);
    assert_eq!(i.output_type_for(ink), OutputType::Uint8);
    assert_eq!(i.activation("ink"), Some(Activation::None));
    assert!(i.mirroring, "test-time mirroring is on by default, as in nnU-Net");

    // Inference patch and batch follow training's.
    let c = parse(MINIMAL, &["tr_config.patch_size=64", "tr_config.batch_size=3"]).unwrap().config;
    assert_eq!((c.inference_config.patch_size, c.inference_config.batch_size), ([64; 3], 3));
}

/// A config file's relative paths mean the same from any working folder; a `--set` is typed in
/// the working folder and stays relative to it; a config given as text resolves nothing.
#[test]
fn relative_paths_resolve_against_the_config_file() {
    let dir = std::env::temp_dir().join(format!("unet3d-config-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = "tr_setup: {ckpt_out_base: ck, tensorboard_log_dir: /abs/tb}\n\
        dataset_config:\n  targets: {ink: {channels: 1}}\n  volume_paths:\n    - {input: v/in.zarr, ink: v/ink.zarr, ref_label: ink}\n\
        inference_config: {output_path: out}\n";
    std::fs::write(dir.join("c.yaml"), yaml).unwrap();
    let c = Config::load(&dir.join("c.yaml"), &["inference_config.input_path=x.zarr".into()]).unwrap().config;
    assert_eq!(c.tr_setup.ckpt_out_base, dir.join("ck"));
    assert_eq!(c.tr_setup.tensorboard_log_dir, PathBuf::from("/abs/tb"));
    let v = &c.dataset_config.volume_paths[0];
    assert_eq!((v.input.as_str(), v.ref_label.as_str()), (dir.join("v/in.zarr").to_str().unwrap(), "ink"));
    assert_eq!(v.targets[0].1, dir.join("v/ink.zarr").display().to_string());
    assert_eq!(c.inference_config.output_path, dir.join("out"));
    assert_eq!(c.inference_config.input_path.as_deref(), Some("x.zarr"));
    let text = parse(yaml, &[]).unwrap().config;
    assert_eq!(text.tr_setup.ckpt_out_base, PathBuf::from("ck"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_seed_example_parses_with_one_warning_per_ignored_key() {
    let p = load("seed-example.yaml", &[]).unwrap();
    let expected = [
        "tr_config.ignore_label: ignored (the seed ignores it too: not implemented there)",
        "tr_config.loss_only_on_label: ignored (the seed ignores it too: not implemented there)",
        "model_config.f_maps: ignored (the seed ignores it too: a key of its earlier pytorch-3dunet configs; see features_per_stage)",
        "model_config.basic_module: ignored (the seed ignores it too: a key of its earlier pytorch-3dunet configs)",
        "model_config.se_module: ignored (the seed ignores it too: a key of its earlier pytorch-3dunet configs; see squeeze_excitation)",
        "model_config.pool_kernel_size: ignored (the seed ignores it too: a key of its earlier pytorch-3dunet configs; see strides)",
        "dataset_config.cache_file: ignored (the seed ignores it too: the patch cache is written to cache_folder)",
        "inference_config.targets.ink.weight: ignored (the seed ignores it too: weights scale training losses only)",
        "inference_config.load_all: ignored (unet3d streams the input chunk by chunk, so memory stays bounded)",
    ];
    let got: BTreeSet<&str> = p.warnings.iter().map(String::as_str).collect();
    assert_eq!(got, BTreeSet::from(expected), "{:#?}", p.warnings);
    assert_eq!(p.warnings.len(), expected.len());

    let c = p.config;
    assert_eq!(c.tr_setup.model_name, "ink");
    assert_eq!(c.tr_setup.vram_max, 22_000_000_000, "22000 MB");
    assert_eq!(c.tr_setup.tr_val_split, 0.9);
    assert_eq!((c.tr_config.patch_size, c.tr_config.batch_size), ([14, 128, 128], 12));
    assert_eq!(c.tr_config.num_dataloader_workers, 12);
    let d = &c.dataset_config;
    assert_eq!((d.min_bbox_percent, d.min_labeled_ratio), (0.2, 0.2));
    assert_eq!(
        d.volume_paths[1],
        VolumePaths {
            input: "/data/s1_segments/0926.zarr/layers.zarr".into(),
            targets: vec![("ink".into(), "/data/s1_segments/0926.zarr/inklabels.zarr".into())],
            ref_label: "ink".into(),
        }
    );
    let i = &c.inference_config;
    assert_eq!(i.output_type, Some(OutputType::Uint8), "np.uint8");
    assert_eq!((i.overlap, i.patch_size, i.batch_size), (0.1, [128; 3], 4));
    // Relative paths resolve against the config's folder, absolute ones stay.
    assert_eq!(i.checkpoint_path, Some(task("./checkpoints/ckpt.pth")));
    assert_eq!(i.input_path, Some(task("./data/0901/layers.zarr").display().to_string()));
    assert_eq!(c.tr_setup.ckpt_out_base, task("./checkpoints"));

    // The seed's autoconfigure on 14 x 128 x 128 (reference-spec 1.6's table: z pooled once), with
    // nnU-Net's 320 cap.
    let arch = c.architecture().unwrap();
    assert_eq!(arch.strides, [[1, 1, 1], [2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2]]);
    assert_eq!(arch.features_per_stage, [32, 64, 128, 256, 320, 320]);
}

/// A YAML file's unknown keys warn (seed configs carry keys unet3d ignores); a `--set` that
/// nothing reads is an error, since a typo must not train on the defaults.
#[test]
fn a_set_that_nothing_reads_is_an_error() {
    for set in [
        "tr_config.augmentation.p_rotaton=0.5",
        "tr_config.batch_sise=4",
        "tr_confg.batch_size=4",
        "tr_config.augmentation={p_rotaton: 0.5}",
        "dataset_config.targets.ink.chanels=2",
    ] {
        let e = err(MINIMAL, &[set]);
        assert!(
            e.contains(&format!("--set {set}"))
                && e.contains("unknown key")
                && e.contains("nothing reads it"),
            "{e}"
        );
    }
    assert!(err(MINIMAL, &["tr_config.batch_sise=4"]).contains("did you mean batch_size?"));
    // Known keys, and keys another choice reads (a warning says so), are fine.
    parse(MINIMAL, &["tr_config.batch_size=4", "tr_config.momentum=0.5"]).unwrap();
}

#[test]
fn unknown_keys_warn_once_each_with_a_suggestion() {
    let yaml = format!(
        "{MINIMAL}tr_config:\n  batch_sise: 4\n  wibble: 1\nextra_section: {{}}\ntr_params: {{}}\n\
         model_config:\n  nonlin_kwargs: {{inplace: true}}\n  bottleneck_block: BasicBlockD\n  \
         dropout_op_kwargs: {{p: 0, inplace: true}}\n"
    );
    let p = parse(&yaml, &[]).unwrap();
    let expected = [
        "tr_config.batch_sise: unknown key (did you mean batch_size?)",
        "tr_config.wibble: unknown key",
        "model_config.dropout_op_kwargs.inplace: ignored (the seed ignores it too)",
        "model_config.nonlin_kwargs: ignored (the seed ignores it too: it overwrites them; negative_slope sets LeakyReLU's slope)",
        "model_config.bottleneck_block: ignored (the encoder's block type is basic_encoder_block)",
        "extra_section: unknown key",
        "tr_params: ignored (the seed's older schema; its keys now belong in tr_setup and tr_config)",
    ];
    assert_eq!(p.warnings, expected);

    // Keys that only another choice uses.
    let p = parse(
        MINIMAL,
        &[
            "tr_config.momentum=0.5",
            "tr_config.poly_exponent=2",
            "model_config.squeeze_excitation_pool=dh",
            "dataset_config.oversample_foreground=0.5",
            "model_config.bottleneck_channels=8",
        ],
    )
    .unwrap();
    assert_eq!(
        p.warnings,
        [
            "tr_config.momentum: ignored (only SGD uses it)",
            "tr_config.poly_exponent: ignored (only the poly scheduler uses it)",
            "model_config.squeeze_excitation_pool: ignored (squeeze_excitation is off)",
            "model_config.bottleneck_channels: ignored (only basic_encoder_block BottleneckBlockD uses it)",
            "dataset_config.oversample_foreground: ignored (only sampling: random uses it)",
        ]
    );
}

#[test]
fn set_overrides_any_key_in_order() {
    let p = parse(
        MINIMAL,
        &[
            "tr_config.batch_size=4",
            "tr_config.batch_size=6",
            "tr_config.patch_size=[32, 64, 64]",
            "tr_setup.device=cuda:1",
            "tr_setup.checkpoint_path=/runs/a/ink_7.safetensors",
            "dataset_config.targets.ink.weight=0.25",
            "dataset_config.targets.dist={channels: 1, loss_fn: MSELoss}",
            "dataset_config.volume_paths=[{input: a.zarr, ink: b.zarr, dist: c.zarr, ref_label: ink}]",
            "dataset_config.volume_paths.0.input=/scratch/a.zarr",
            "inference_config.output_targets=[dist]",
        ],
    )
    .unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let c = p.config;
    assert_eq!((c.tr_config.batch_size, c.tr_config.patch_size), (6, [32, 64, 64]));
    assert_eq!(c.tr_setup.device, Device::Cuda(1));
    assert_eq!(c.tr_setup.checkpoint_path, Some(PathBuf::from("/runs/a/ink_7.safetensors")));
    let names: Vec<&str> = c.dataset_config.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["ink", "dist"], "YAML order, new keys last");
    assert_eq!(c.dataset_config.targets[0].weight, 0.25);
    assert_eq!(c.dataset_config.volume_paths[0].input, "/scratch/a.zarr");
    assert_eq!(c.dataset_config.volume_paths[0].targets[1], ("dist".into(), "c.zarr".into()));
    assert_eq!(c.inference_config.output_targets, ["dist"]);
    let arch = c.architecture().unwrap();
    assert_eq!(arch.targets.len(), 2);
    assert_eq!(arch.decoder_prefix(1), "decoders.dist");
}

#[test]
fn vram_max_takes_megabytes_or_units() {
    let bytes =
        |v: &str| parse(MINIMAL, &[&format!("tr_setup.vram_max={v}")]).unwrap().config.tr_setup.vram_max;
    assert_eq!(bytes("22000"), 22_000_000_000);
    assert_eq!(bytes("\"22000MB\""), 22_000_000_000);
    assert_eq!(bytes("22000 MB"), 22_000_000_000);
    assert_eq!(bytes("24GB"), 24_000_000_000);
    assert_eq!(bytes("24gib"), 24 << 30);
    assert_eq!(bytes("0.5TiB"), 1 << 39);
    assert_eq!(bytes("1024 KiB"), 1 << 20);
    for bad in ["24XB", "-1", "0", "GB", "[24]"] {
        let e = err(MINIMAL, &[&format!("tr_setup.vram_max={bad}")]);
        assert!(e.contains("tr_setup.vram_max = ") && e.contains("\"24GiB\""), "{bad}: {e}");
    }
    let p = parse(MINIMAL, &["tr_setup.vram_max=16"]).unwrap();
    assert_eq!(p.config.tr_setup.vram_max, 16_000_000);
    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].contains("read as MB") && p.warnings[0].contains("\"16GB\""), "{:?}", p.warnings);
}

#[test]
fn the_nnunet_recipe_is_one_setting_away() {
    let c = parse(MINIMAL, &["tr_config.recipe=nnunet"]).unwrap().config.tr_config;
    let OptimizerConfig::Sgd(sgd) = c.optimizer else { panic!("{:?}", c.optimizer) };
    assert_eq!((sgd.lr, sgd.momentum, sgd.nesterov, sgd.weight_decay), (1e-2, 0.99, true, 3e-5));
    assert_eq!(c.scheduler, LrSchedule::Poly { max_epochs: 1000, exponent: 0.9 });
    assert_eq!((c.max_epoch, c.max_steps_per_epoch, c.max_val_steps_per_epoch), (1000, 250, 50));
    assert_eq!(c.optimizer.moments(), 1);

    // Explicit keys win over the recipe; the seed's SGD had momentum 0.9.
    let c =
        parse(MINIMAL, &["tr_config.recipe=nnunet", "tr_config.initial_lr=0.1", "tr_config.max_epoch=10"])
            .unwrap()
            .config
            .tr_config;
    assert_eq!(c.optimizer.initial_lr(), 0.1);
    assert_eq!(c.scheduler, LrSchedule::Poly { max_epochs: 10, exponent: 0.9 });
    let c = parse(MINIMAL, &["tr_config.optimizer=SGD"]).unwrap().config.tr_config;
    assert_eq!(
        c.optimizer,
        OptimizerConfig::Sgd(unet3d::optim::SgdHyper {
            lr: 1e-3,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0
        })
    );
    let c = parse(
        MINIMAL,
        &["tr_config.optimizer=adam", "tr_config.scheduler=constant", "tr_config.grad_clip_max_norm=false"],
    )
    .unwrap()
    .config
    .tr_config;
    let OptimizerConfig::Adam(adam) = c.optimizer else { panic!() };
    assert!(!adam.decoupled);
    assert_eq!((c.scheduler, c.grad_clip_max_norm), (LrSchedule::Constant, None));
}

#[test]
fn model_config_maps_onto_arch_config() {
    let p = parse(
        MINIMAL,
        &[
            "tr_setup.autoconfigure=false",
            "tr_config.patch_size=[16, 32, 32]",
            "model_config.strides=[1, [1, 2, 2], 2]",
            "model_config.kernel_sizes=3",
            "model_config.features_per_stage=[8, 16, 24]",
            "model_config.n_blocks_per_stage=2",
            "model_config.basic_encoder_block=BottleneckBlockD",
            "model_config.bottleneck_channels=4",
            "model_config.squeeze_excitation=true",
            "model_config.squeeze_excitation_pool=dh",
            "model_config.norm_op_kwargs={affine: false, eps: 1e-3}",
            "model_config.conv_bias=false",
            "model_config.nonlin=nn.ReLU",
            "model_config.deep_supervision=false",
        ],
    )
    .unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let m = &p.config.model_config;
    assert!(!m.autoconfigure);
    assert_eq!(m.block, BlockKind::BottleneckD);
    assert_eq!(m.features_per_stage, Some(PerStage::Each(vec![8, 16, 24])));
    assert_eq!(m.n_blocks_per_stage, Some(PerStage::All(2)));
    let arch = p.config.architecture().unwrap();
    assert_eq!(arch.strides, [[1, 1, 1], [1, 2, 2], [2, 2, 2]]);
    assert_eq!(arch.kernel_sizes, [[3; 3]; 3]);
    assert_eq!(arch.n_blocks_per_stage, [2, 2, 2]);
    assert_eq!(arch.squeeze_excitation, Some(SePool::Dh));
    assert!(!arch.norm.affine && !arch.conv_bias && !arch.deep_supervision);
    assert_eq!(arch.norm.eps, 1e-3);
    assert_eq!(arch.nonlin, unet3d::arch::Nonlin::Relu);

    // The seed's defaults for do_stem etc. are accepted; anything else is an error.
    let p = parse(
        MINIMAL,
        &["model_config.do_stem=true", "model_config.stochastic_depth_p=0", "model_config.return_skips=true"],
    )
    .unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let e = err(MINIMAL, &["model_config.stochastic_depth_p=0.1"]);
    assert!(
        e.contains("model_config.stochastic_depth_p = 0.1: expected 0.0 (unet3d has no stochastic depth)"),
        "{e}"
    );

    // Autoconfigure with a spacing: nnU-Net's anisotropic rules.
    let c = parse(MINIMAL, &["tr_config.patch_size=[20, 160, 160]", "model_config.spacing=[3, 0.5, 0.5]"])
        .unwrap()
        .config;
    let arch = c.architecture().unwrap();
    assert_eq!(arch.strides[1], [1, 2, 2], "the coarse axis is not pooled first");
    assert_eq!(arch.kernel_sizes[0], [1, 3, 3]);
}

#[test]
fn dataset_entries() {
    let yaml = "dataset_config:\n  in_channels: 2\n  normalization: [zscore, ct]\n  sampling: random\n  \
                targets:\n    sheet: {channels: 1, activation: Sigmoid, loss_fn: DC_and_CE_loss, loss_kwargs: {do_bg: true}}\n    \
                Normals: {channels: 3, loss_fn: MaskedCosineLoss}\n  \
                volume_paths:\n    - {input: 'http://host/s1.zarr', sheet: s.zarr, Normals: n.zarr}\n";
    let c = parse(yaml, &[]).unwrap().config;
    let d = &c.dataset_config;
    assert_eq!(d.normalization, [Normalization::ZScore, Normalization::Ct]);
    assert_eq!(d.sampling, Sampling::Random { oversample_foreground: 0.33 });
    assert_eq!(d.targets[0].activation, Activation::Sigmoid);
    let Loss::DiceCe(dc) = d.targets[0].loss else { panic!("{:?}", d.targets[0].loss) };
    assert!(dc.do_bg);
    assert!(d.targets[1].is_normals() && !d.targets[0].is_normals());
    assert_eq!(d.target("Normals").map(|t| t.channels), Some(3));
    assert!(d.target("normals").is_none(), "names are case-sensitive");
    assert_eq!(d.volume_paths[0].ref_label, "sheet", "the seed's default");
    assert_eq!(d.volume_paths[0].input, "http://host/s1.zarr");
    let i = &c.inference_config;
    assert_eq!(i.output_type_for(&d.targets[1]), OutputType::Uint16, "the seed writes normals as uint16");
    assert_eq!(i.output_type_for(&d.targets[0]), OutputType::Uint8);
    assert_eq!(c.architecture().unwrap().in_channels, 2);

    let e = err(yaml, &["dataset_config.normalization=[zscore]"]);
    assert!(
        e.contains("dataset_config.normalization = [\"zscore\"]") && e.contains("2 input channels"),
        "{e}"
    );
    let e = err(yaml, &["dataset_config.volume_paths.0.Normals=null"]);
    assert!(e.contains("dataset_config.volume_paths.0.Normals: missing"), "{e}");
    let e = err(yaml, &["dataset_config.volume_paths.0.ref_label=ink"]);
    assert!(
        e.contains("dataset_config.volume_paths.0.ref_label = \"ink\": expected the name of a target"),
        "{e}"
    );
    let e = err(&yaml.replace("sheet", "surface"), &[]);
    assert!(e.contains("dataset_config.volume_paths.0.ref_label: missing") && e.contains("\"sheet\""), "{e}");
    let p = parse(&yaml.replace("Normals: n.zarr}", "Normals: n.zarr, extra: x.zarr}"), &[]).unwrap();
    assert_eq!(p.warnings, ["dataset_config.volume_paths.0.extra: unknown key"]);
    let e = err(yaml, &["dataset_config.volume_paths.0.extra=x.zarr"]);
    assert!(e.contains("volume_paths.0.extra: unknown key; nothing reads it"), "{e}");
}

#[test]
fn the_demo_config_is_a_small_multi_task_network() {
    let p = load("demo.yaml", &[]).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let c = p.config;
    let names: Vec<&str> = c.dataset_config.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["sheet", "distance", "normals"]);
    assert_eq!(c.dataset_config.volume_paths.len(), 2);
    let arch = c.architecture().unwrap();
    assert_eq!(arch.features_per_stage, [8, 16, 32, 64]);
    assert_eq!(arch.strides, [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]);
    assert_eq!(arch.n_blocks_per_stage, [1, 2, 2, 2]);
    let report = PlanReport::new(&c).unwrap();
    assert!(report.fits());
    assert!(arch.param_count() < 2_000_000, "{}", arch.param_count());
}

/// The canonical ResEncM: 128^3, 1 input channel, 3 classes (reference-spec 2.8).
const RESENC_M: &str = "tr_setup: {model_name: resencm, vram_max: 40GB}\n\
                        tr_config: {patch_size: 128, batch_size: 2}\n\
                        dataset_config:\n  targets:\n    seg: {channels: 3, loss_fn: DC_and_CE_loss}\n";

#[test]
fn plan_reports_the_architecture_size_and_memory() {
    let c = parse(RESENC_M, &[]).unwrap().config;
    let r = PlanReport::new(&c).unwrap();
    assert_eq!(r.architecture.param_count(), 102_350_575, "reference-spec 2.8");
    let text = r.to_string();
    for line in [
        "unet3d plan: resencm",
        "patch (z, y, x) 128x128x128, batch 2; targets: seg (3 ch)",
        "6 stages",
        "0       128x128x128        32       1    3x3x3    1x1x1",
        "5             4x4x4       320       6    3x3x3    2x2x2",
        "parameters: 102,350,575",
        "training memory (AdamW): ",
        "batch 2 fits",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // The memory figures are the model's estimate, and the largest batch is the largest that fits.
    let arch = c.architecture().unwrap();
    assert_eq!(r.memory, arch.training_memory([128; 3], 2, 2).unwrap());
    let max = r.max_batch_size;
    assert!(arch.training_memory([128; 3], max, 2).unwrap().total() <= 40_000_000_000);
    assert!(arch.training_memory([128; 3], max + 1, 2).unwrap().total() > 40_000_000_000);
    assert!(text.contains(&format!("the largest batch that fits is {max}")), "{text}");
    r.check().unwrap();

    // One batch more than fits is refused, saying what to change.
    let c = parse(RESENC_M, &[&format!("tr_config.batch_size={}", max + 1)]).unwrap().config;
    let r = PlanReport::new(&c).unwrap();
    assert!(!r.fits());
    let e = r.check().unwrap_err().to_string();
    for part in [
        format!("tr_config.batch_size {} does not fit tr_setup.vram_max 40.00 GB", max + 1),
        format!("--set tr_config.batch_size={max}"),
        "tr_config.patch_size".to_string(),
        "--set tr_setup.vram_max=".to_string(),
    ] {
        assert!(e.contains(&part), "missing {part:?} in {e}");
    }
    // The suggested vram_max does fit.
    let need = e.split("--set tr_setup.vram_max=").nth(1).unwrap().split(')').next().unwrap();
    let c = parse(
        RESENC_M,
        &[&format!("tr_config.batch_size={}", max + 1), &format!("tr_setup.vram_max={need}")],
    )
    .unwrap()
    .config;
    PlanReport::new(&c).unwrap().check().unwrap();

    // Not even one sample fits.
    let c = parse(RESENC_M, &["tr_setup.vram_max=1GB"]).unwrap().config;
    let r = PlanReport::new(&c).unwrap();
    assert_eq!(r.max_batch_size, 0);
    let e = r.check().unwrap_err().to_string();
    assert!(e.contains("not even batch 1 fits"), "{e}");
}

#[test]
fn plan_command_prints_the_report_and_refuses_what_does_not_fit() {
    let exe = env!("CARGO_BIN_EXE_unet3d");
    let config = task("demo.yaml");
    let out = Command::new(exe).arg("plan").arg("--config").arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("unet3d plan: demo") && stdout.contains("batch 2 fits"), "{stdout}");

    let out = Command::new(exe)
        .args(["plan", "--config"])
        .arg(&config)
        .args(["--set", "tr_setup.vram_max=50MB"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not fit tr_setup.vram_max 0.05 GB"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("does NOT fit"));

    // Errors are one message with its causes, never a backtrace, whatever RUST_BACKTRACE says.
    let out = Command::new(exe)
        .args(["plan", "--config"])
        .arg(&config)
        .args(["--set", "tr_config.batch_sise=2"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.starts_with("error: config ")
            && stderr.contains("demo.yaml: --set tr_config.batch_sise=2: tr_config.batch_sise: unknown key (did you mean batch_size?)"),
        "{stderr}"
    );
    assert!(!stderr.contains("backtrace") && !stderr.contains("Caused by"), "{stderr}");

    let out = Command::new(exe).args(["plan", "--config", "/nonexistent.yaml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.yaml"));
}
