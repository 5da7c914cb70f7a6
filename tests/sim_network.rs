//! One network on every device: `Network`, the losses and `Graph::backward` on a kernel device
//! (the sim; cuda:0 too when UNET3D_GPU_TESTS=1) against the same code on the CPU. Every
//! deep-supervision output, the loss and the gradient of every parameter, on small networks
//! covering BasicBlockD and BottleneckD, both squeeze-excitation pools, bias-free and non-affine
//! layers and ReLU, with several targets over every loss kind; three optimizer steps with
//! accumulation and clipping for each optimizer; inference; the PyTorch fixture.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::{assert_close, fixture, fixture_arch, fixture_meta, fixture_state_dict, to_cl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use unet3d::arch::params::ParamLayout;
use unet3d::arch::{Architecture, Block, Nonlin, Norm, SePool, Target};
use unet3d::config::Activation;
use unet3d::device::Device;
use unet3d::device::launch::test_devices;
use unet3d::device::op::LabelSmoothing;
use unet3d::infer::predictor::{NetworkPredictor, TilePredictor};
use unet3d::loss::{self, DiceCe, LabelResample, Loss, Pointwise, Reduction};
use unet3d::model::network::Network;
use unet3d::model::{init, weights};
use unet3d::ops::activation as act;
use unet3d::optim::{Adam, AdamHyper, GradNorm, Optimizer, Sgd, SgdHyper};
use unet3d::tensor::Tensor;
use unet3d::{Graph, ParamStore};

/// float32 through a whole network, both sides: summation orders differ.
const TOL: f64 = 1e-4;

/// The kernel devices under test, as tensor devices.
fn devices() -> Vec<Device> {
    test_devices().unwrap().iter().map(|g| g.device()).collect()
}

fn host(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).unwrap()
}

/// A target of the test networks: its loss, channels, whether the loss reads probabilities (a
/// sigmoid between the head and the loss, as training puts before BCELoss) and its task weight.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    loss: Loss,
    channels: usize,
    probabilities: bool,
    weight: f64,
}

impl Case {
    fn new(name: &'static str, loss: Loss, channels: usize) -> Self {
        let probabilities = matches!(loss, Loss::Pointwise(Pointwise::Bce, _));
        Case { name, loss, channels, probabilities, weight: 1.0 }
    }

    /// A random target for a (n, d, h, w) patch, at every deep-supervision scale of `arch`.
    fn labels(&self, arch: &Architecture, rng: &mut StdRng, n: usize, patch: [usize; 3]) -> Vec<Tensor> {
        let [d, h, w] = patch;
        let voxels = n * d * h * w;
        let c = self.channels;
        let (dims, v): (Vec<usize>, Vec<f32>) = match self.loss {
            Loss::DiceCe(_) | Loss::CrossEntropy(_) => {
                (vec![n, d, h, w, 1], (0..voxels).map(|_| rng.random_range(0..c) as f32).collect())
            }
            Loss::BceDice { .. } => {
                (vec![n, d, h, w, c], (0..voxels * c).map(|_| f32::from(rng.random_bool(0.4))).collect())
            }
            Loss::Pointwise(Pointwise::Bce | Pointwise::BceWithLogits(_), _) => {
                (vec![n, d, h, w, c], (0..voxels * c).map(|_| rng.random_range(0.0..1.0)).collect())
            }
            Loss::Pointwise(..) => {
                (vec![n, d, h, w, c], (0..voxels * c).map(|_| rng.sample(StandardNormal)).collect())
            }
            Loss::MaskedCosine => {
                // A third of the voxels without a direction: the mask.
                let v = (0..voxels)
                    .flat_map(|_| {
                        let keep = rng.random_range(0..3) > 0;
                        (0..c)
                            .map(|_| if keep { rng.sample(StandardNormal) } else { 0.0 })
                            .collect::<Vec<f32>>()
                    })
                    .collect();
                (vec![n, d, h, w, c], v)
            }
        };
        let l = Tensor::from_vec(dims, v).unwrap();
        loss::deep_supervision_labels(&l, &arch.strides, LabelResample::NearestExact).unwrap()
    }
}

fn arch(
    block: Block,
    se: Option<SePool>,
    bias_and_affine: bool,
    nonlin: Nonlin,
    cases: &[Case],
) -> Architecture {
    let targets = cases.iter().map(|c| Target::new(c.name, c.channels)).collect();
    Architecture {
        conv_bias: bias_and_affine,
        norm: Norm { eps: 1e-5, affine: bias_and_affine },
        nonlin,
        ..common::small_arch([4, 8, 12], block, se, targets)
    }
}

fn random(rng: &mut StdRng, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product();
    let v = (0..n).map(|_| scale * rng.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(dims.to_vec(), v).unwrap()
}

/// nnU-Net's initialisation with every parameter perturbed, so that no residual branch starts
/// at zero and every gradient path carries signal.
fn random_store(arch: &Architecture, seed: u64) -> ParamStore {
    let mut store = init::initialize(arch, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for id in store.ids().collect::<Vec<_>>() {
        let v = store.value(id).clone();
        let noise = random(&mut rng, v.dims(), 0.3);
        let data = v.data().iter().zip(noise.data()).map(|(a, b)| a + b).collect();
        store.set_value(id, Tensor::from_vec(v.shape().clone(), data).unwrap()).unwrap();
    }
    store
}

/// One forward, loss and backward: the outputs, loss and gradients, downloaded.
struct Step {
    outputs: Vec<Vec<Tensor>>,
    loss: f32,
    grads: BTreeMap<String, Tensor>,
}

/// Records the network on the store's device, every target's deep-supervised loss and their sum
/// weighted by the task weights times `scale` on `g`; returns the heads and the total loss.
fn record_loss(
    g: &mut Graph,
    net: &Network,
    store: &ParamStore,
    (x, labels): (&Tensor, &[Vec<Tensor>]),
    cases: &[Case],
    ds: &[f64],
    scale: f64,
) -> (Vec<Vec<unet3d::Var>>, unet3d::Var) {
    let device = store.device();
    let xv = g.constant(x.to_device(device).unwrap());
    let outs = net.forward(g, store, xv).unwrap();
    let mut terms = Vec::new();
    for ((case, heads), ls) in cases.iter().zip(&outs).zip(labels) {
        let inputs: Vec<_> = match case.probabilities {
            true => heads.iter().map(|&h| act::sigmoid(g, h).unwrap()).collect(),
            false => heads.clone(),
        };
        let ls: Vec<Tensor> = ls.iter().map(|l| l.to_device(device).unwrap()).collect();
        let l = loss::deep_supervision(g, &case.loss, &inputs, &ls, ds).unwrap();
        terms.push((l, case.weight * scale));
    }
    let total = loss::weighted_sum(g, &terms).unwrap();
    (outs, total)
}

fn step(
    device: Device,
    arch: &Architecture,
    store: &ParamStore,
    x: &Tensor,
    cases: &[Case],
    labels: &[Vec<Tensor>],
    ds: &[f64],
) -> Step {
    let mut store = store.clone();
    store.to_device(device).unwrap();
    let net = Network::new(arch, &store).unwrap();
    let mut g = Graph::new();
    let (outs, total) = record_loss(&mut g, &net, &store, (x, labels), cases, ds, 1.0);
    let outputs = outs.iter().map(|o| o.iter().map(|&v| host(g.value(v))).collect()).collect();
    let loss = g.value(total).item().unwrap();
    g.backward(total, &mut store).unwrap();
    let grads = store
        .ids()
        .map(|id| {
            let g =
                store.grad(id).map(host).unwrap_or_else(|| Tensor::zeros(store.value(id).shape().clone()));
            (store.name(id).to_string(), g)
        })
        .collect();
    Step { outputs, loss, grads }
}

/// Compares tensors by name; analytically zero ones (a conv bias under an instance norm, a head
/// of deep-supervision weight 0) must be float32 noise on both sides.
fn check_named(on: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    assert_eq!(got.len(), want.len(), "{on}: counts differ");
    let norm = |t: &Tensor| t.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    for (name, w) in want {
        let g = &got[name];
        if norm(w) < 1e-6 {
            assert!(norm(g) < 1e-6, "{on} {name}: norm {:e}, the CPU's is {:e}", norm(g), norm(w));
        } else {
            assert_close(&format!("{on} {name}"), g, w, TOL);
        }
    }
}

fn parity(
    block: Block,
    se: Option<SePool>,
    bias_and_affine: bool,
    nonlin: Nonlin,
    cases: &[Case],
    seed: u64,
) {
    let arch = arch(block, se, bias_and_affine, nonlin, cases);
    let store = random_store(&arch, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 7);
    let (n, patch) = (2, [4, 8, 8]);
    let x = random(&mut rng, &[n, patch[0], patch[1], patch[2], arch.in_channels], 1.0);
    let labels: Vec<Vec<Tensor>> = cases.iter().map(|c| c.labels(&arch, &mut rng, n, patch)).collect();
    // nnU-Net's weights for two outputs are (1, 0); others check the weighting itself.
    let ds = if !seed.is_multiple_of(2) {
        vec![0.6, 0.4]
    } else {
        loss::deep_supervision_weights(arch.n_stages() - 1)
    };
    let want = step(Device::Cpu, &arch, &store, &x, cases, &labels, &ds);
    for device in devices() {
        let on = format!("{:?} se {se:?} on {device}", arch.block);
        let start = Instant::now();
        let got = step(device, &arch, &store, &x, cases, &labels, &ds);
        for (t, (got, want)) in got.outputs.iter().zip(&want.outputs).enumerate() {
            assert_eq!(got.len(), want.len(), "{on}: target {t} has {} outputs", got.len());
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_close(&format!("{on} output {t}.{i}"), g, w, TOL);
            }
        }
        let e = f64::from(((got.loss - want.loss) / want.loss).abs());
        assert!(e <= TOL, "{on}: loss {} vs CPU {}", got.loss, want.loss);
        check_named(&format!("{on} grad"), &got.grads, &want.grads);
        eprintln!("{on}: forward, loss and backward checked in {:.1} s", start.elapsed().as_secs_f64());
    }
}

fn mean(p: Pointwise) -> Loss {
    Loss::Pointwise(p, Reduction::Mean)
}

#[test]
fn basic_blocks_with_se_match_the_cpu() {
    let cases = [
        Case::new("seg", Loss::DiceCe(DiceCe { batch_dice: false, ..DiceCe::default() }), 3),
        Case { weight: 0.5, ..Case::new("dist", mean(Pointwise::Mse), 1) },
        Case::new("vec", Loss::MaskedCosine, 3),
    ];
    parity(Block::BasicBlockD, Some(SePool::Dhw), true, Nonlin::default(), &cases, 1);
}

#[test]
fn bottleneck_blocks_with_dh_se_match_the_cpu() {
    let block = Block::BottleneckD { bottleneck_channels: vec![2, 4, 6] };
    let cases = [
        Case::new("ce", Loss::CrossEntropy(Reduction::Mean), 3),
        Case::new("logits", mean(Pointwise::BceWithLogits(LabelSmoothing::None)), 2),
        Case::new("bd", Loss::BceDice { alpha: 0.5, beta: 0.5 }, 2),
    ];
    parity(block, Some(SePool::Dh), true, Nonlin::default(), &cases, 2);
}

#[test]
fn bias_free_non_affine_relu_blocks_match_the_cpu() {
    let cases = [
        Case::new("seg", Loss::DiceCe(DiceCe { batch_dice: true, ..DiceCe::default() }), 2),
        Case::new("prob", mean(Pointwise::Bce), 1),
        Case::new("reg", Loss::Pointwise(Pointwise::SmoothL1 { beta: 0.5 }, Reduction::Sum), 2),
    ];
    parity(Block::BasicBlockD, None, false, Nonlin::Relu, &cases, 3);
    let block = Block::BottleneckD { bottleneck_channels: vec![2, 4, 6] };
    let cases = [Case::new("reg", mean(Pointwise::L1), 1)];
    parity(block, None, false, Nonlin::default(), &cases, 4);
}

/// Three optimizer steps on `device` from `store`: batches of accumulation groups of 2 (the last
/// group short, its mean gradient rescaled as training does), the gradient clipped to `max_norm`,
/// then the optimizer. The parameters and the exported optimizer state, downloaded.
fn train(
    device: Device,
    arch: &Architecture,
    store: &ParamStore,
    optimizer: &mut dyn Optimizer,
    batches: &[(Tensor, Vec<Vec<Tensor>>)],
    cases: &[Case],
) -> BTreeMap<String, Tensor> {
    let mut store = store.clone();
    store.to_device(device).unwrap();
    let net = Network::new(arch, &store).unwrap();
    let ds = loss::deep_supervision_weights(arch.n_stages() - 1);
    let mut clip = GradNorm::default();
    for (i, group) in batches.chunks(2).enumerate() {
        for (x, labels) in group {
            let mut g = Graph::new();
            let (_, total) = record_loss(&mut g, &net, &store, (x, labels), cases, &ds, 0.5);
            g.backward(total, &mut store).unwrap();
        }
        if group.len() < 2 {
            store.scale_grads(2.0).unwrap();
        }
        let norm = clip.clip(&mut store, 0.5).unwrap();
        assert!(norm > 0.5, "step {i}: the gradient norm {norm} is clipped");
        optimizer.step(&mut store).unwrap();
        store.zero_grad();
    }
    let mut out: BTreeMap<String, Tensor> =
        store.ids().map(|id| (store.name(id).to_string(), host(store.value(id)))).collect();
    out.extend(optimizer.export_state().unwrap().tensors);
    out
}

type MakeOptimizer = fn() -> Box<dyn Optimizer>;

#[test]
fn three_steps_with_accumulation_clipping_and_each_optimizer_match_the_cpu() {
    let cases =
        [Case::new("seg", Loss::DiceCe(DiceCe::default()), 3), Case::new("dist", mean(Pointwise::Mse), 1)];
    // No conv biases: under an instance norm their gradient is analytically zero, float32 noise
    // that Adam would normalise into full steps of either sign.
    let affine = arch(Block::BasicBlockD, Some(SePool::Dhw), true, Nonlin::default(), &cases);
    let arch = Architecture { conv_bias: false, ..affine };
    let store = random_store(&arch, 8);
    let mut rng = StdRng::seed_from_u64(9);
    let (n, patch) = (1, [4, 8, 8]);
    let batches: Vec<_> = (0..5)
        .map(|_| {
            let x = random(&mut rng, &[n, patch[0], patch[1], patch[2], 2], 1.0);
            (x, cases.iter().map(|c| c.labels(&arch, &mut rng, n, patch)).collect())
        })
        .collect();
    let optimizers: [(&str, MakeOptimizer); 3] = [
        ("SGD", || {
            Box::new(
                Sgd::new(SgdHyper { lr: 0.01, momentum: 0.9, nesterov: true, weight_decay: 1e-3 }).unwrap(),
            )
        }),
        ("Adam", || {
            let h = AdamHyper { lr: 1e-3, weight_decay: 1e-2, decoupled: false, ..AdamHyper::default() };
            Box::new(Adam::new(h).unwrap())
        }),
        ("AdamW", || Box::new(Adam::new(AdamHyper { weight_decay: 1e-2, ..AdamHyper::default() }).unwrap())),
    ];
    for (name, make) in optimizers {
        let want = train(Device::Cpu, &arch, &store, make().as_mut(), &batches, &cases);
        assert!(want.len() > store.len(), "{name} exported its moments");
        for device in devices() {
            let got = train(device, &arch, &store, make().as_mut(), &batches, &cases);
            check_named(&format!("{name} on {device}"), &got, &want);
        }
    }
}

/// The acceptance case itself: the PyTorch fixture's outputs, loss and gradients on the CPU and on
/// each kernel device.
#[test]
fn fixture_forward_loss_and_gradients_match_pytorch() {
    let f = fixture("model/resenc_unet_small.safetensors");
    let meta = fixture_meta(&f);
    let arch = fixture_arch(&meta);
    let layouts: BTreeMap<String, ParamLayout> =
        arch.param_specs().into_iter().map(|s| (s.name, s.layout)).collect();
    let store = weights::from_state_dict(&arch, &fixture_state_dict(&f)).unwrap();
    let x = to_cl(f.get("input").unwrap());
    let labels: Vec<Tensor> = (0..3).map(|i| to_cl(f.get(&format!("label.{i}")).unwrap())).collect();
    let ds: Vec<f64> = meta["ds_weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
    let cases = [Case::new(
        "fixture",
        Loss::DiceCe(DiceCe { batch_dice: true, ..DiceCe::default() }),
        arch.targets[0].channels,
    )];
    for device in [Device::Cpu].into_iter().chain(devices()) {
        let start = Instant::now();
        let got = step(device, &arch, &store, &x, &cases, std::slice::from_ref(&labels), &ds);
        assert_eq!(got.outputs[0].len(), 3);
        for (i, o) in got.outputs[0].iter().enumerate() {
            let want = to_cl(f.get(&format!("output.{i}")).unwrap());
            assert_close(&format!("{device} output.{i}"), o, &want, TOL);
        }
        let want = f64::from(f.get("loss").unwrap().data()[0]);
        let l = f64::from(got.loss);
        assert!(((l - want) / want).abs() <= TOL, "{device}: loss {l} vs PyTorch {want}");
        let mut checked = 0;
        for (name, want) in f.tensors.iter().filter_map(|(k, t)| Some((k.strip_prefix("grad.")?, t))) {
            let g = weights::to_torch(layouts[name], &got.grads[name]).unwrap();
            let norm = |t: &Tensor| t.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            if norm(want) < 1e-12 {
                assert!(norm(&g) < 1e-7, "{device} grad.{name}: norm {:e}, PyTorch's is 0", norm(&g));
            } else {
                assert_close(&format!("{device} grad.{name}"), &g, want, TOL);
            }
            checked += 1;
        }
        assert_eq!(checked, got.grads.len(), "every parameter has a reference gradient");
        eprintln!("fixture on {device}: checked in {:.1} s", start.elapsed().as_secs_f64());
    }
}

/// Inference on the device: the activated full-resolution heads and the tile predictor's logits
/// as the CPU's within 1e-5, and bad inputs named.
#[test]
fn predict_and_the_tile_predictor_match_the_cpu() {
    let cases =
        [Case::new("seg", Loss::DiceCe(DiceCe::default()), 3), Case::new("dist", mean(Pointwise::Mse), 1)];
    let arch = arch(Block::BasicBlockD, Some(SePool::Dhw), true, Nonlin::default(), &cases);
    let store = random_store(&arch, 5);
    let mut rng = StdRng::seed_from_u64(11);
    let x = random(&mut rng, &[2, 4, 8, 8, 2], 1.0);
    let acts = [Activation::Softmax, Activation::Sigmoid];
    let net = Network::new(&arch, &store).unwrap();
    let want = net.predict(&store, &x, &acts).unwrap();
    let outputs = ["dist".to_string(), "seg".to_string()];
    let cpu = NetworkPredictor::new(net.clone(), store.clone(), &outputs).unwrap();
    let want_logits = cpu.predict(&x).unwrap();
    for device in devices() {
        let mut on_device = store.clone();
        on_device.to_device(device).unwrap();
        let xd = x.to_device(device).unwrap();
        for (i, (g, w)) in net.predict(&on_device, &xd, &acts).unwrap().iter().zip(&want).enumerate() {
            assert_eq!(g.device(), device, "prediction {i} stays on the device");
            assert_close(&format!("{device} prediction {i}"), &host(g), w, 1e-5);
        }
        let bad = random(&mut rng, &[1, 4, 8, 6, 2], 1.0).to_device(device).unwrap();
        let err = net.predict(&on_device, &bad, &acts).unwrap_err();
        assert!(format!("{err:#}").contains("[1, 4, 8, 6, 2]"), "{err:#}");
        let bad = random(&mut rng, &[1, 4, 8, 8, 3], 1.0).to_device(device).unwrap();
        let err = net.predict(&on_device, &bad, &acts).unwrap_err();
        assert!(format!("{err:#}").contains("3 channels"), "{err:#}");
        let tiles = NetworkPredictor::new(net.clone(), on_device, &outputs).unwrap();
        assert_eq!(tiles.in_channels(), 2);
        for (i, (g, w)) in tiles.predict(&x).unwrap().iter().zip(&want_logits).enumerate() {
            assert_eq!(g.device(), device, "tile logits stay on the device for blending");
            assert_close(&format!("{device} tile logits {i}"), &host(g), w, 1e-5);
        }
    }
}

/// An op whose operands live on two devices is an error naming both, not a silent copy.
#[test]
fn mixing_devices_in_one_op_is_an_error_naming_both() {
    let cases = [Case::new("seg", Loss::DiceCe(DiceCe::default()), 2)];
    let arch = arch(Block::BasicBlockD, None, true, Nonlin::default(), &cases);
    let store = random_store(&arch, 6);
    let net = Network::new(&arch, &store).unwrap();
    let x = random(&mut StdRng::seed_from_u64(3), &[1, 4, 8, 8, 2], 1.0).to_device(Device::Sim).unwrap();
    let err = format!("{:#}", net.predict(&store, &x, &[Activation::None]).unwrap_err());
    assert!(err.contains("sim") && err.contains("cpu"), "{err}");
}
