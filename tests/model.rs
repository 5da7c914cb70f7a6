//! The residual U-Net against dynamic_network_architectures (the model fixture), its weights
//! format, nnU-Net's initialisation, multi-task gradients and the layers the fixture lacks.

mod common;

use std::collections::BTreeMap;

use common::{assert_close, fixture, fixture_arch, fixture_meta, fixture_state_dict, rel_err, to_cl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use unet3d::arch::params::ParamLayout;
use unet3d::arch::{ArchConfig, Architecture, Block, Nonlin, SePool, Target};
use unet3d::bench::step::training_step_benchmark;
use unet3d::config::Activation;
use unet3d::device::Device;
use unet3d::loss::{self, DiceCe, LabelResample, Loss, Pointwise, Reduction};
use unet3d::model::init::{self, he_std, torch_fan_in};
use unet3d::model::network::Network;
use unet3d::model::weights;
use unet3d::nn::{LayerSettings, ResidualBlock, SqueezeExcite};
use unet3d::tensor::Tensor;
use unet3d::{Graph, ParamStore};

const FIXTURE: &str = "model/resenc_unet_small.safetensors";
/// A whole network in float32 against float64 PyTorch (tests/fixtures/README.md).
const NET_TOL: f64 = 1e-4;

/// [`common::small_arch`] at the widths these tests use.
fn small_arch(block: Block, se: Option<SePool>, targets: Vec<Target>) -> Architecture {
    common::small_arch([8, 16, 24], block, se, targets)
}

fn random(rng: &mut StdRng, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(dims.to_vec(), (0..n).map(|_| rng.sample(StandardNormal)).collect()).unwrap()
}

/// The gradient of every parameter after backward, zeros where none arrived.
fn grads(store: &ParamStore) -> BTreeMap<String, Tensor> {
    store
        .ids()
        .map(|id| {
            let g = store.grad(id).cloned().unwrap_or_else(|| Tensor::zeros(store.value(id).shape().clone()));
            (store.name(id).to_string(), g)
        })
        .collect()
}

#[test]
fn fixture_forward_loss_and_gradients_match_pytorch() {
    let f = fixture(FIXTURE);
    let meta = fixture_meta(&f);
    let arch = fixture_arch(&meta);
    assert_eq!(arch.param_count(), meta["n_parameters"].as_u64().unwrap());
    let layouts: BTreeMap<String, ParamLayout> =
        arch.param_specs().into_iter().map(|s| (s.name, s.layout)).collect();
    let mut store = weights::from_state_dict(&arch, &fixture_state_dict(&f)).unwrap();
    let net = Network::new(&arch, &store).unwrap();

    let mut g = Graph::new();
    let x = g.constant(to_cl(f.get("input").unwrap()));
    let outputs = net.forward(&mut g, &store, x).unwrap();
    assert_eq!(outputs.len(), 1);
    let outs = &outputs[0];
    assert_eq!(outs.len(), 3);
    let mut labels = Vec::new();
    for (i, &o) in outs.iter().enumerate() {
        assert_close(
            &format!("output.{i}"),
            g.value(o),
            &to_cl(f.get(&format!("output.{i}")).unwrap()),
            NET_TOL,
        );
        labels.push(to_cl(f.get(&format!("label.{i}")).unwrap()));
    }

    let ds: Vec<f64> = meta["ds_weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
    assert_eq!(ds, loss::deep_supervision_weights(3));
    let dice_ce = Loss::DiceCe(DiceCe { batch_dice: true, ..DiceCe::default() });
    let l = loss::deep_supervision(&mut g, &dice_ce, outs, &labels, &ds).unwrap();
    let want = f.get("loss").unwrap().data()[0];
    let got = g.value(l).item().unwrap();
    assert!(((got - want) / want).abs() <= NET_TOL as f32, "loss {got} vs PyTorch {want}");

    g.backward(l, &mut store).unwrap();
    let got = grads(&store);
    let mut checked = 0;
    for (name, want) in f.tensors.iter().filter_map(|(k, t)| Some((k.strip_prefix("grad.")?, t))) {
        let g = weights::to_torch(layouts[name], &got[name]).unwrap();
        let want_norm = want.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        if want_norm < 1e-12 {
            // Analytically zero (a conv bias under an instance norm, or the head with
            // deep-supervision weight 0): relative error means nothing, float32 noise must be tiny.
            let norm = g.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            assert!(norm < 1e-7, "grad.{name}: norm {norm:e}, PyTorch's is 0");
        } else {
            assert_close(&format!("grad.{name}"), &g, want, NET_TOL);
        }
        checked += 1;
    }
    assert_eq!(checked, store.len(), "every parameter has a reference gradient");
}

#[test]
fn saved_names_and_shapes_are_the_pytorch_state_dict() {
    let f = fixture(FIXTURE);
    let arch = fixture_arch(&fixture_meta(&f));
    let torch: BTreeMap<String, Vec<usize>> = fixture_state_dict(&f)
        .into_iter()
        .filter(|(k, _)| !weights::is_alias(k))
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    let store = init::initialize(&arch, 7).unwrap();
    let ours: BTreeMap<String, Vec<usize>> = weights::to_state_dict(&arch, &store)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    assert_eq!(ours, torch);
    assert!(weights::is_alias("decoder.encoder.stem.convs.0.conv.weight"));
    assert!(weights::is_alias("encoder.stem.convs.0.all_modules.1.weight"));
    assert!(!weights::is_alias("decoder.stages.0.convs.0.conv.weight"));
}

#[test]
fn save_then_load_gives_identical_outputs() {
    let arch = small_arch(Block::BasicBlockD, None, vec![Target::new("seg", 3), Target::new("reg", 1)]);
    let mut store = init::initialize(&arch, 3).unwrap();
    // Random norms too, so that every parameter shapes the output.
    let mut rng = StdRng::seed_from_u64(11);
    for id in store.ids().collect::<Vec<_>>() {
        let dims = store.value(id).dims().to_vec();
        store.set_value(id, random(&mut rng, &dims)).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("unet3d-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    weights::save(&path, &arch, &store).unwrap();
    let loaded = weights::load(&path, &arch).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let x = random(&mut rng, &[1, 4, 8, 8, 2]);
    let acts = [Activation::Softmax, Activation::None];
    let a = Network::new(&arch, &store).unwrap().predict(&store, &x, &acts).unwrap();
    let b = Network::new(&arch, &loaded).unwrap().predict(&loaded, &x, &acts).unwrap();
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.data(), b.data());
    }
    for id in store.ids() {
        assert_eq!(store.name(id), loaded.name(id));
        assert_eq!(store.value(id).data(), loaded.value(id).data());
    }
}

fn load_error(arch: &Architecture, dict: &BTreeMap<String, Tensor>) -> String {
    match weights::from_state_dict(arch, dict) {
        Ok(_) => panic!("the weights loaded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn mismatched_weights_name_the_tensor_the_shapes_and_the_config_key() {
    let f = fixture(FIXTURE);
    let arch = fixture_arch(&fixture_meta(&f));
    let dict = fixture_state_dict(&f);

    let wider = Architecture { features_per_stage: vec![8, 16, 32, 48], ..arch.clone() };
    let e = load_error(&wider, &dict);
    assert!(
        e.contains("'encoder.stages.3.blocks.0.conv1.conv.weight': the file has shape [64, 32, 3, 3, 3], this network needs [48, 32, 3, 3, 3] (set by model_config.features_per_stage[3])"),
        "{e}"
    );
    assert!(e.contains("'decoder.transpconvs.0.weight': the file has shape [64, 32, 2, 2, 2], this network needs [48, 32, 2, 2, 2] (set by model_config.features_per_stage[3])"), "{e}");

    let kernels = Architecture { kernel_sizes: vec![[3; 3]; 4], ..arch.clone() };
    let e = load_error(&kernels, &dict);
    assert!(e.contains("'encoder.stem.convs.0.conv.weight': the file has shape [8, 2, 1, 3, 3], this network needs [8, 2, 3, 3, 3] (set by model_config.kernel_sizes[0])"), "{e}");
    assert!(
        e.contains("'decoder.stages.2.convs.0.conv.weight'") && e.contains("model_config.kernel_sizes[0]"),
        "{e}"
    );

    let classes = Architecture { targets: vec![Target::new("seg", 2)], in_channels: 1, ..arch.clone() };
    let e = load_error(&classes, &dict);
    assert!(
        e.contains("'decoder.seg_layers.0.weight'") && e.contains("dataset_config.targets.seg.channels"),
        "{e}"
    );
    assert!(e.contains("[8, 1, 1, 3, 3] (set by dataset_config.in_channels)"), "{e}");

    let deeper = Architecture { n_blocks_per_stage: vec![1, 2, 2, 3], ..arch.clone() };
    let e = load_error(&deeper, &dict);
    assert!(e.contains("8 missing tensors: encoder.stages.3.blocks.2.conv1.conv.bias, "), "{e}");
    assert!(e.contains("decided by: model_config.n_blocks_per_stage"), "{e}");

    let no_bias = Architecture { conv_bias: false, ..arch.clone() };
    let e = load_error(&no_bias, &dict);
    assert!(e.contains("unexpected tensors: decoder.stages.0.convs.0.conv.bias"), "{e}");
    assert!(e.contains("decided by: model_config.conv_bias"), "{e}");

    let two = Architecture { targets: vec![Target::new("a", 3), Target::new("b", 3)], ..arch.clone() };
    let e = load_error(&two, &dict);
    assert!(e.contains("missing tensors: decoders.a.") && e.contains("dataset_config.targets"), "{e}");
    assert!(e.contains("... and"), "long lists are cut short: {e}");

    // A store without a parameter cannot be bound.
    let store = init::initialize(&Architecture { conv_bias: false, ..arch.clone() }, 0).unwrap();
    let e = format!("{:#}", Network::new(&arch, &store).unwrap_err());
    assert!(e.contains("'encoder.stem.convs.0.conv.bias'"), "{e}");
}

#[test]
fn initialisation_is_nnunet_he_normal_with_zeroed_last_norms() {
    let f = fixture(FIXTURE);
    let arch = fixture_arch(&fixture_meta(&f));
    let store = init::initialize(&arch, 42).unwrap();
    let dict = weights::to_state_dict(&arch, &store).unwrap();
    let mut big_convs = 0;
    for (name, t) in &dict {
        let v = t.data();
        if t.dims().len() == 5 {
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            let want = he_std(torch_fan_in(t.dims()));
            // Five standard errors of a sample std (std / sqrt(2n)), within [2%, 30%].
            let tol = (5.0 / (2.0 * v.len() as f64).sqrt()).clamp(0.02, 0.3);
            assert!((std / want - 1.0).abs() < tol, "{name}: std {std:.5} vs He {want:.5}");
            assert!(mean.abs() < 5.0 * want / (v.len() as f64).sqrt() + 1e-3, "{name}: mean {mean}");
            big_convs += usize::from(v.len() >= 10_000);
        } else if name.ends_with("conv2.norm.weight") && name.starts_with("encoder.stages.") {
            assert!(v.iter().all(|&x| x == 0.0), "{name} is the last norm of its block");
        } else if name.ends_with("norm.weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}");
        } else {
            assert!(v.iter().all(|&x| x == 0.0), "{name} is a bias");
        }
    }
    assert!(big_convs >= 10);
    // Transposed convs use PyTorch's fan_in: C_out * k^3 of the (C_in, C_out, k...) weight.
    assert_eq!(torch_fan_in(&[64, 32, 2, 2, 2]), 256);
    let same = init::initialize(&arch, 42).unwrap();
    let other = init::initialize(&arch, 43).unwrap();
    let id = store.id("encoder.stages.1.blocks.0.conv1.conv.weight").unwrap();
    assert_eq!(store.value(id).data(), same.value(id).data());
    assert_ne!(store.value(id).data(), other.value(id).data());

    let bottleneck = small_arch(
        Block::BottleneckD { bottleneck_channels: vec![4, 4, 8] },
        None,
        vec![Target::new("s", 2)],
    );
    let store = init::initialize(&bottleneck, 1).unwrap();
    for id in store.ids() {
        let name = store.name(id);
        if name.starts_with("encoder.stages.") && name.ends_with("norm.weight") {
            let zero = name.ends_with("conv3.norm.weight");
            assert!(store.value(id).data().iter().all(|&x| x == if zero { 0.0 } else { 1.0 }), "{name}");
        }
    }
}

/// Losses of a segmentation target (Dice + CE, deep supervision) and a regression target (MSE on
/// the full-resolution output) weighted `w`; returns the gradients of one backward pass.
fn multitask_grads(
    arch: &Architecture,
    store: &mut ParamStore,
    x: &Tensor,
    w: [f64; 2],
) -> (BTreeMap<String, Tensor>, f32) {
    let mut rng = StdRng::seed_from_u64(5);
    let [n, d, h, wd, _] = x.shape().ndhwc().unwrap();
    let label: Vec<f32> = (0..n * d * h * wd).map(|_| rng.random_range(0..3) as f32).collect();
    let label = Tensor::from_vec([n, d, h, wd, 1], label).unwrap();
    let labels = loss::deep_supervision_labels(&label, &arch.strides, LabelResample::NearestExact).unwrap();
    let target = random(&mut rng, &[n, d, h, wd, 1]);

    store.zero_grad();
    let net = Network::new(arch, store).unwrap();
    let mut g = Graph::new();
    let xv = g.constant(x.clone());
    let outs = net.forward(&mut g, store, xv).unwrap();
    let seg_loss = Loss::DiceCe(DiceCe::default());
    let ds = loss::deep_supervision_weights(outs[0].len());
    let seg = loss::deep_supervision(&mut g, &seg_loss, &outs[0], &labels, &ds).unwrap();
    let reg = Loss::Pointwise(Pointwise::Mse, Reduction::Mean).apply(&mut g, outs[1][0], &target).unwrap();
    let total = loss::weighted_sum(&mut g, &[(seg, w[0]), (reg, w[1])]).unwrap();
    let value = g.value(total).item().unwrap();
    g.backward(total, store).unwrap();
    (grads(store), value)
}

#[test]
fn multitask_decoders_get_only_their_own_gradient() {
    let arch = small_arch(Block::BasicBlockD, None, vec![Target::new("seg", 3), Target::new("reg", 1)]);
    let mut store = init::initialize(&arch, 9).unwrap();
    // Non-zero last norms, so the residual branches carry gradient to every encoder weight.
    let mut rng = StdRng::seed_from_u64(2);
    for id in store.ids().collect::<Vec<_>>() {
        if store.name(id).ends_with("norm.weight") {
            let c = store.value(id).numel();
            store
                .set_value(
                    id,
                    Tensor::from_vec([c], (0..c).map(|_| rng.random_range(0.5..1.5)).collect()).unwrap(),
                )
                .unwrap();
        }
    }
    let x = random(&mut rng, &[2, 4, 8, 8, 2]);
    let (both, _) = multitask_grads(&arch, &mut store, &x, [1.0, 1.0]);
    let (seg_only, _) = multitask_grads(&arch, &mut store, &x, [1.0, 0.0]);
    let (reg_only, _) = multitask_grads(&arch, &mut store, &x, [0.0, 1.0]);
    let norm = |t: &Tensor| t.data().iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    for (name, g) in &both {
        if name.starts_with("decoders.seg.") {
            assert!(reg_only[name].data().iter().all(|&v| v == 0.0), "{name} gets gradient from the MSE");
            assert_eq!(g.data(), seg_only[name].data(), "{name}");
        } else if name.starts_with("decoders.reg.") {
            assert!(
                seg_only[name].data().iter().all(|&v| v == 0.0),
                "{name} gets gradient from the Dice + CE"
            );
            assert_eq!(g.data(), reg_only[name].data(), "{name}");
        } else {
            assert!(name.starts_with("encoder."), "{name}");
            if name.ends_with(".conv.bias") {
                continue; // under an instance norm: analytically zero, float32 noise
            }
            // Shared: the sum of both losses' gradients, each of them non-zero.
            let sum: Vec<f32> =
                seg_only[name].data().iter().zip(reg_only[name].data()).map(|(a, b)| a + b).collect();
            assert!(rel_err(g.data(), &sum) < 1e-5, "{name}: {}", rel_err(g.data(), &sum));
            assert!(norm(&seg_only[name]) > 0.0 && norm(&reg_only[name]) > 0.0, "{name}");
            assert!(rel_err(g.data(), seg_only[name].data()) > 1e-4, "{name} ignores the regression loss");
        }
    }
    // The lowest-resolution heads (seg_layers.0; deep-supervision weight 0 for the segmentation,
    // unused by the regression loss) get nothing; the full-resolution ones do.
    for t in ["seg", "reg"] {
        assert!(both[&format!("decoders.{t}.seg_layers.0.weight")].data().iter().all(|&v| v == 0.0));
        assert!(norm(&both[&format!("decoders.{t}.seg_layers.1.weight")]) > 0.0);
    }

    // Training both targets from one backward pass per step lowers the joint loss.
    use unet3d::optim::{Adam, AdamHyper, Optimizer};
    let mut opt = Adam::new(AdamHyper { lr: 1e-2, ..AdamHyper::default() }).unwrap();
    let (_, first) = multitask_grads(&arch, &mut store, &x, [1.0, 1.0]);
    let mut last = first;
    for _ in 0..8 {
        opt.step(&mut store).unwrap();
        last = multitask_grads(&arch, &mut store, &x, [1.0, 1.0]).1;
    }
    assert!(last < first - 0.05, "loss {first} -> {last}");
}

#[test]
fn squeeze_excite_layer_matches_pytorch() {
    for file in ["squeeze_excite_c12", "squeeze_excite_c32"] {
        let f = fixture(&format!("ops/{file}.safetensors"));
        let mut store = ParamStore::new();
        for p in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
            let layout = if p.ends_with("weight") { ParamLayout::Conv } else { ParamLayout::Vector };
            store.add(&format!("se.{p}"), weights::from_torch(layout, f.get(p).unwrap()).unwrap()).unwrap();
        }
        let c = f.get("x").unwrap().dims()[1];
        let se = SqueezeExcite::bind(&store, "se", c, SePool::Dhw).unwrap();
        let mut g = Graph::new();
        let x = g.leaf(to_cl(f.get("x").unwrap()));
        let y = se.forward(&mut g, &store, x).unwrap();
        assert_close(&format!("{file} y"), g.value(y), &to_cl(f.get("y").unwrap()), 1e-5);
        g.backward_from(y, to_cl(f.get("gy").unwrap()), &mut store).unwrap();
        assert_close(&format!("{file} gx"), g.grad(x).unwrap(), &to_cl(f.get("gx").unwrap()), 1e-5);
        for p in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
            let layout = if p.ends_with("weight") { ParamLayout::Conv } else { ParamLayout::Vector };
            let grad = store.grad(store.id(&format!("se.{p}")).unwrap()).unwrap();
            let got = weights::to_torch(layout, grad).unwrap();
            assert_close(&format!("{file} grad.{p}"), &got, f.get(&format!("grad.{p}")).unwrap(), 1e-5);
        }
    }
}

/// `sum(block(x) * r)`, accumulated in float64.
fn probe_value(block: &ResidualBlock, store: &ParamStore, x: &Tensor, r: &Tensor) -> f64 {
    let mut g = Graph::no_grad();
    let xv = g.constant(x.clone());
    let y = block.forward(&mut g, store, xv).unwrap();
    g.value(y).data().iter().zip(r.data()).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
}

/// BottleneckD and squeeze-excitation (both poolings) are not in the model fixture: the gradient
/// of a probe loss of one strided, widening block (pooled and projected skip) along a random
/// direction of its parameters and input is checked against a central difference.
#[test]
fn bottleneck_and_se_blocks_match_finite_differences() {
    let cases = [
        (Block::BottleneckD { bottleneck_channels: vec![4, 8, 8] }, Some(SePool::Dh)),
        (Block::BottleneckD { bottleneck_channels: vec![4, 8, 8] }, None),
        (Block::BasicBlockD, Some(SePool::Dhw)),
        (Block::BasicBlockD, Some(SePool::Dh)),
    ];
    for (block, se) in cases {
        // Slope 1 makes the block smooth, so that a float32 central difference is accurate; where
        // the activations sit is checked by the fixture (the branch code is BasicBlockD's).
        let arch = Architecture {
            nonlin: Nonlin::LeakyRelu { negative_slope: 1.0 },
            ..small_arch(block.clone(), se, vec![Target::new("t", 2)])
        };
        let mut rng = StdRng::seed_from_u64(17);
        let mut store = init::initialize(&arch, 4).unwrap();
        // Random parameters (norm gammas around 1), so that no path is switched off.
        for id in store.ids().collect::<Vec<_>>() {
            let dims = store.value(id).dims().to_vec();
            let offset = if store.name(id).ends_with("norm.weight") { 1.0 } else { 0.0 };
            let v = random(&mut rng, &dims).data().iter().map(|v| 0.5 * v + offset).collect();
            store.set_value(id, Tensor::from_vec(dims, v).unwrap()).unwrap();
        }
        let b = arch.encoder_blocks().find(|b| b.stage == 1 && b.index == 0).unwrap();
        assert!(b.skip_pools() && b.skip_projects());
        let layer =
            ResidualBlock::bind(&store, "encoder.stages.1.blocks.0", &b, &LayerSettings::of(&arch)).unwrap();
        let x = random(&mut rng, &[2, 4, 8, 8, b.in_channels]);
        let r = random(&mut rng, &[2, 4, 4, 4, b.out_channels]);

        let mut g = Graph::new();
        let xv = g.leaf(x.clone());
        let y = layer.forward(&mut g, &store, xv).unwrap();
        g.backward_from(y, r.clone(), &mut store).unwrap();
        let dot = |a: &Tensor, b: &Tensor| -> f64 {
            a.data().iter().zip(b.data()).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
        };
        let ids: Vec<_> = store.ids().filter(|&id| store.grad(id).is_some()).collect();
        let convs = if b.bottleneck_channels.is_some() { 3 } else { 2 };
        // conv weight, bias, norm gamma, beta per conv; skip conv and norm; SE fc1 and fc2.
        let expected = 4 * convs + 3 + if se.is_some() { 4 } else { 0 };
        assert_eq!(ids.len(), expected, "{block:?} {se:?}: every parameter of the block gets a gradient");
        let dirs: Vec<Tensor> = ids.iter().map(|&id| random(&mut rng, store.value(id).dims())).collect();
        let dx = random(&mut rng, x.dims());
        let analytic = ids.iter().zip(&dirs).map(|(&id, v)| dot(store.grad(id).unwrap(), v)).sum::<f64>()
            + dot(g.grad(xv).unwrap(), &dx);
        let h = 3e-4f32;
        let shifted = |sign: f32| {
            let mut s = store.clone();
            let step = |p: &Tensor, v: &Tensor| {
                let d: Vec<f32> = p.data().iter().zip(v.data()).map(|(p, v)| p + sign * h * v).collect();
                Tensor::from_vec(p.shape().clone(), d).unwrap()
            };
            for (&id, v) in ids.iter().zip(&dirs) {
                let p = step(s.value(id), v);
                s.set_value(id, p).unwrap();
            }
            probe_value(&layer, &s, &step(&x, &dx), &r)
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * f64::from(h));
        let err = ((analytic - numeric) / numeric).abs();
        assert!(err < 1e-3, "{block:?} SE {se:?}: analytic {analytic} vs numeric {numeric} ({err:.2e})");
    }
}

#[test]
fn predict_applies_the_target_activation_to_the_full_resolution_head() {
    let arch = small_arch(Block::BasicBlockD, None, vec![Target::new("seg", 3), Target::new("ink", 1)]);
    let store = init::initialize(&arch, 8).unwrap();
    let net = Network::new(&arch, &store).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let x = random(&mut rng, &[1, 4, 8, 8, 2]);
    let mut g = Graph::no_grad();
    let xv = g.constant(x.clone());
    let logits = net.forward(&mut g, &store, xv).unwrap();
    assert_eq!(logits.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
    assert_eq!(g.shape(logits[0][1]).dims(), &[1, 4, 4, 4, 3]);
    let full = net.forward_heads(&mut g, &store, xv, false).unwrap();
    assert_eq!(full.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);

    let p = net.predict(&store, &x, &[Activation::Softmax, Activation::Sigmoid]).unwrap();
    assert_eq!(p[0].dims(), &[1, 4, 8, 8, 3]);
    for (vox, l) in p[0].data().chunks(3).zip(g.value(logits[0][0]).data().chunks(3)) {
        let z: f32 = l.iter().map(|v| v.exp()).sum();
        for (q, v) in vox.iter().zip(l) {
            assert!((q - v.exp() / z).abs() < 1e-6);
        }
    }
    for (q, v) in p[1].data().iter().zip(g.value(logits[1][0]).data()) {
        assert!((q - 1.0 / (1.0 + (-v).exp())).abs() < 1e-6);
    }
    let raw = net.predict(&store, &x, &[Activation::None, Activation::None]).unwrap();
    assert_eq!(raw[1].data(), g.value(full[1][0]).data());
    assert!(net.predict(&store, &x, &[Activation::None]).is_err());
}

#[test]
fn bad_inputs_are_errors_that_name_the_shapes() {
    let arch = small_arch(Block::BasicBlockD, None, vec![Target::new("seg", 2)]);
    let store = init::initialize(&arch, 0).unwrap();
    let net = Network::new(&arch, &store).unwrap();
    let mut g = Graph::no_grad();
    let x = g.constant(Tensor::zeros([1, 4, 8, 8, 3]));
    let e = format!("{:#}", net.forward(&mut g, &store, x).unwrap_err());
    assert!(e.contains("[1, 4, 8, 8, 3]") && e.contains("3 channels") && e.contains("takes 2"), "{e}");
    let x = g.constant(Tensor::zeros([1, 4, 8, 6, 2]));
    let e = format!("{:#}", net.forward(&mut g, &store, x).unwrap_err());
    assert!(e.contains("[1, 4, 8, 6, 2]") && e.contains("not divisible"), "{e}");
}

#[test]
fn training_step_benchmark_reports_time_and_memory() {
    let arch = small_arch(Block::BasicBlockD, None, vec![Target::new("seg", 2)]);
    let b = training_step_benchmark(&arch, Device::Cpu, 1, [4, 8, 8], 1, 0).unwrap();
    assert!(b.median_secs > 0.0);
    // Weights, the batch and at least one activation per feature-map element were alive at once.
    let floor = b.estimate.weights + b.estimate.batch_data + 4 * b.estimate.feature_map_size;
    assert!(b.peak_bytes > floor, "{b:?}");
    assert!(b.measured_activation_factor > 0.0, "{b:?}");
    assert!(b.counters.is_none(), "no device counters on the CPU");
    // On the sim: the device's own peak, and per step the batch and labels up, nothing down.
    let s = training_step_benchmark(&arch, Device::Sim, 1, [4, 8, 8], 1, 0).unwrap();
    let c = s.counters.expect("counters on a kernel device");
    let scales = loss::deep_supervision_labels(
        &Tensor::zeros([1, 4, 8, 8, 1]),
        &arch.strides,
        LabelResample::NearestExact,
    );
    let labels: usize = scales.unwrap().iter().map(Tensor::numel).sum();
    assert_eq!(c.host_to_device_bytes, 4 * (4 * 8 * 8 * 2 + labels) as u64, "{c}");
    assert_eq!(c.device_to_host_bytes, 0, "{c}");
    assert!(c.launches > 50 && s.peak_bytes > floor, "{c}, peak {}", s.peak_bytes);
    let one_channel = small_arch(Block::BasicBlockD, None, vec![Target::new("ink", 1)]);
    assert!(training_step_benchmark(&one_channel, Device::Cpu, 1, [4, 8, 8], 1, 0).is_err());
}

/// The measurement reported in src/model/size.rs: run with
/// `cargo test --release --test model -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_training_step() {
    let f = fixture(FIXTURE);
    let meta = fixture_meta(&f);
    let arch = fixture_arch(&meta);
    let resenc_m = |patch| ArchConfig::default().build(1, vec![Target::new("seg", 3)], patch).unwrap();
    let cases = [
        ("fixture", arch.clone(), [8, 32, 32], 5),
        ("fixture", arch, [16, 64, 64], 3),
        ("ResEncM", resenc_m([32, 32, 32]), [32, 32, 32], 3),
        ("ResEncM", resenc_m([64, 64, 64]), [64, 64, 64], 1),
    ];
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    for (what, arch, patch, reps) in cases {
        let one = training_step_benchmark(&arch, Device::Cpu, 1, patch, reps, 0).unwrap();
        let b = training_step_benchmark(&arch, Device::Cpu, 2, patch, reps, 0).unwrap();
        // Weights and gradients cancel in the difference: what one more sample costs.
        let per_sample = (b.peak_bytes - one.peak_bytes) as f64 / (4.0 * b.estimate.feature_map_size as f64);
        println!(
            "{what} ({} stages, {} parameters) batch 2 patch {patch:?}: median {:.3} s (batch 1: {:.3} s), \
             peak {:.1} MiB, estimate {:.1} MiB, factor with all gradients subtracted {:.3}, \
             factor from the batch 1 -> 2 difference {per_sample:.3}",
            arch.n_stages(),
            arch.param_count(),
            b.median_secs,
            one.median_secs,
            mib(b.peak_bytes),
            mib(b.estimate.total()),
            b.measured_activation_factor
        );
    }
}
