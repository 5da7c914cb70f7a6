//! The residual U-Net on a kernel device (`model::gpu::GpuNetwork`) against the CPU tape
//! (`Network::forward`, the losses, `Graph::backward`): every deep-supervision output, the loss and
//! the gradient of every parameter, on small networks covering BasicBlockD and BottleneckD, both
//! squeeze-excitation pools, bias-free and non-affine layers, two targets with different losses.
//! Tiny shapes on the sim; cuda:0 too when UNET3D_GPU_TESTS=1.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::{assert_close, fixture, fixture_arch, fixture_meta, fixture_state_dict, to_cl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use unet3d::config::Activation;
use unet3d::device::kernels::GpuTensor;
use unet3d::device::launch::test_devices;
use unet3d::infer::predictor::{NetworkPredictor, TilePredictor};
use unet3d::loss::{self, DiceCe, LabelResample, Loss, Pointwise, Reduction};
use unet3d::model::gpu::{GpuNetwork, GpuNetworkPredictor};
use unet3d::model::network::Network;
use unet3d::model::{Architecture, Block, Nonlin, Norm, SePool, Target, init, weights};
use unet3d::tensor::Tensor;
use unet3d::{Graph, ParamStore};

/// float32 through a whole network, both sides: summation orders differ.
const TOL: f64 = 1e-4;

fn arch(block: Block, se: Option<SePool>, bias_and_affine: bool, nonlin: Nonlin) -> Architecture {
    let targets = vec![Target::new("seg", 3), Target::new("dist", 1)];
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

/// The CPU tape's outputs, loss and gradients for `labels` per target per scale.
struct Reference {
    outputs: Vec<Vec<Tensor>>,
    loss: f32,
    grads: BTreeMap<String, Tensor>,
}

fn cpu_reference(
    arch: &Architecture,
    mut store: ParamStore,
    x: &Tensor,
    labels: &[Vec<Tensor>],
    losses: &[Loss],
    task_weights: &[f64],
    ds: &[f64],
) -> Reference {
    let net = Network::new(arch, &store).unwrap();
    let mut g = Graph::new();
    let xv = g.constant(x.clone());
    let outs = net.forward(&mut g, &store, xv).unwrap();
    let mut terms = Vec::new();
    for (t, o) in outs.iter().enumerate() {
        let l = loss::deep_supervision(&mut g, &losses[t], o, &labels[t], ds).unwrap();
        terms.push((l, task_weights[t]));
    }
    let total = loss::weighted_sum(&mut g, &terms).unwrap();
    let outputs = outs.iter().map(|o| o.iter().map(|&v| g.value(v).clone()).collect()).collect();
    let loss = g.value(total).item().unwrap();
    g.backward(total, &mut store).unwrap();
    let grads = store
        .ids()
        .map(|id| {
            let g = store.grad(id).cloned().unwrap_or_else(|| Tensor::zeros(store.value(id).shape().clone()));
            (store.name(id).to_string(), g)
        })
        .collect();
    Reference { outputs, loss, grads }
}

/// Compares every gradient; analytically zero ones (a conv bias under an instance norm, a head
/// of deep-supervision weight 0) must be float32 noise on both sides.
fn check_grads(on: &str, got: &[(String, Tensor)], want: &BTreeMap<String, Tensor>) {
    assert_eq!(got.len(), want.len(), "{on}: parameter counts differ");
    for (name, g) in got {
        let w = &want[name];
        let norm = |t: &Tensor| t.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        if norm(w) < 1e-6 {
            assert!(norm(g) < 1e-6, "{on} grad {name}: norm {:e}, the CPU's is {:e}", norm(g), norm(w));
        } else {
            assert_close(&format!("{on} grad {name}"), g, w, TOL);
        }
    }
}

fn labels_for(arch: &Architecture, rng: &mut StdRng, n: usize, patch: [usize; 3]) -> Vec<Vec<Tensor>> {
    let [d, h, w] = patch;
    let voxels = n * d * h * w;
    arch.targets
        .iter()
        .map(|t| {
            let l = if t.channels > 1 {
                (0..voxels).map(|_| rng.random_range(0..t.channels) as f32).collect()
            } else {
                (0..voxels).map(|_| rng.random_range(-1.0f32..1.0)).collect()
            };
            let l = Tensor::from_vec([n, d, h, w, 1], l).unwrap();
            loss::deep_supervision_labels(&l, &arch.strides, LabelResample::NearestExact).unwrap()
        })
        .collect()
}

fn parity(block: Block, se: Option<SePool>, bias_and_affine: bool, nonlin: Nonlin, seed: u64) {
    let arch = arch(block, se, bias_and_affine, nonlin);
    let store = random_store(&arch, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 7);
    let (n, patch) = (2, [4, 8, 8]);
    let x = random(&mut rng, &[n, patch[0], patch[1], patch[2], arch.in_channels], 1.0);
    let labels = labels_for(&arch, &mut rng, n, patch);
    let losses = [
        Loss::DiceCe(DiceCe { batch_dice: seed.is_multiple_of(2), ..DiceCe::default() }),
        Loss::Pointwise(Pointwise::Mse, Reduction::Mean),
    ];
    let task_weights = [1.0, 0.5];
    // nnU-Net's weights for two outputs are (1, 0); others check the weighting itself.
    let ds = if !seed.is_multiple_of(2) {
        vec![0.6, 0.4]
    } else {
        loss::deep_supervision_weights(arch.n_stages() - 1)
    };
    let want = cpu_reference(&arch, store.clone(), &x, &labels, &losses, &task_weights, &ds);
    for gpu in test_devices().unwrap() {
        let on = format!("{:?} se {se:?} on {}", arch.block, gpu.describe());
        let start = Instant::now();
        let mut net = GpuNetwork::new(&gpu, &arch, &store).unwrap();
        let outputs = net.forward(GpuTensor::upload(&gpu, &x).unwrap(), true).unwrap();
        assert_eq!(outputs.len(), 2);
        for (t, (got, want)) in outputs.iter().zip(&want.outputs).enumerate() {
            assert_eq!(got.len(), want.len(), "{on}: target {t} has {} outputs", got.len());
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_close(&format!("{on} output {t}.{i}"), &g.to_host().unwrap(), w, TOL);
            }
        }
        let l = net.loss_and_backward(&labels, &losses, &task_weights, &ds).unwrap().total;
        let e = ((l as f32 - want.loss) / want.loss).abs();
        assert!(f64::from(e) <= TOL, "{on}: loss {l} vs CPU {}", want.loss);
        check_grads(&on, &net.gradients().unwrap(), &want.grads);
        eprintln!("{on}: forward, loss and backward checked in {:.1} s", start.elapsed().as_secs_f64());
    }
}

#[test]
fn basic_blocks_with_se_match_the_cpu_tape() {
    parity(Block::BasicBlockD, Some(SePool::Dhw), true, Nonlin::default(), 1);
}

#[test]
fn bottleneck_blocks_with_dh_se_match_the_cpu_tape() {
    let block = Block::BottleneckD { bottleneck_channels: vec![2, 4, 6] };
    parity(block, Some(SePool::Dh), true, Nonlin::default(), 2);
}

#[test]
fn bias_free_non_affine_relu_blocks_match_the_cpu_tape() {
    parity(Block::BasicBlockD, None, false, Nonlin::Relu, 3);
    let block = Block::BottleneckD { bottleneck_channels: vec![2, 4, 6] };
    parity(block, None, false, Nonlin::default(), 4);
}

/// The acceptance case itself: the PyTorch fixture's outputs, loss and gradients on the device.
#[test]
fn fixture_forward_loss_and_gradients_match_pytorch() {
    let f = fixture("model/resenc_unet_small.safetensors");
    let meta = fixture_meta(&f);
    let arch = fixture_arch(&meta);
    let store = weights::from_state_dict(&arch, &fixture_state_dict(&f)).unwrap();
    let x = to_cl(f.get("input").unwrap());
    let labels: Vec<Tensor> = (0..3).map(|i| to_cl(f.get(&format!("label.{i}")).unwrap())).collect();
    let ds: Vec<f64> = meta["ds_weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
    let dice_ce = Loss::DiceCe(DiceCe { batch_dice: true, ..DiceCe::default() });
    for gpu in test_devices().unwrap() {
        let on = gpu.describe();
        let start = Instant::now();
        let mut net = GpuNetwork::new(&gpu, &arch, &store).unwrap();
        let outputs = net.forward(GpuTensor::upload(&gpu, &x).unwrap(), true).unwrap();
        assert_eq!(outputs[0].len(), 3);
        for (i, o) in outputs[0].iter().enumerate() {
            let want = to_cl(f.get(&format!("output.{i}")).unwrap());
            assert_close(&format!("{on} output.{i}"), &o.to_host().unwrap(), &want, TOL);
        }
        let l = net.loss_and_backward(std::slice::from_ref(&labels), &[dice_ce], &[1.0], &ds).unwrap().total;
        let want = f64::from(f.get("loss").unwrap().data()[0]);
        assert!(((l - want) / want).abs() <= TOL, "{on}: loss {l} vs PyTorch {want}");
        let got: BTreeMap<String, Tensor> = net.gradients().unwrap().into_iter().collect();
        let mut checked = 0;
        for (name, want) in f.tensors.iter().filter_map(|(k, t)| Some((k.strip_prefix("grad.")?, t))) {
            let g = weights::to_torch(name, &got[name]).unwrap();
            let norm = |t: &Tensor| t.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            if norm(want) < 1e-12 {
                assert!(norm(&g) < 1e-7, "{on} grad.{name}: norm {:e}, PyTorch's is 0", norm(&g));
            } else {
                assert_close(&format!("{on} grad.{name}"), &g, want, TOL);
            }
            checked += 1;
        }
        assert_eq!(checked, got.len(), "every parameter has a reference gradient");
        eprintln!("fixture on {on}: checked in {:.1} s", start.elapsed().as_secs_f64());
    }
}

/// Inference on the device: the activated full-resolution heads and the tile predictor's logits
/// as the CPU's, and bad inputs named.
#[test]
fn predict_and_the_tile_predictor_match_the_cpu() {
    let arch = arch(Block::BasicBlockD, Some(SePool::Dhw), true, Nonlin::default());
    let store = random_store(&arch, 5);
    let mut rng = StdRng::seed_from_u64(11);
    let x = random(&mut rng, &[1, 4, 8, 8, 2], 1.0);
    let acts = [Activation::Softmax, Activation::Sigmoid];
    let net = Network::new(&arch, &store).unwrap();
    let want = net.predict(&store, &x, &acts).unwrap();
    let outputs = ["dist".to_string(), "seg".to_string()];
    let cpu = NetworkPredictor::new(net, store.clone(), &outputs).unwrap();
    let want_logits = cpu.predict(&x).unwrap();
    for gpu in test_devices().unwrap() {
        let on = gpu.describe();
        let gnet = GpuNetwork::new(&gpu, &arch, &store).unwrap();
        for (i, (g, w)) in gnet.predict(&x, &acts).unwrap().iter().zip(&want).enumerate() {
            assert_close(&format!("{on} prediction {i}"), g, w, TOL);
        }
        let err = gnet.predict(&random(&mut rng, &[1, 4, 8, 6, 2], 1.0), &acts).unwrap_err();
        assert!(format!("{err:#}").contains("[1, 4, 8, 6, 2]"), "{err:#}");
        let err = gnet.predict(&random(&mut rng, &[1, 4, 8, 8, 3], 1.0), &acts).unwrap_err();
        assert!(format!("{err:#}").contains("3 channels"), "{err:#}");
        let tiles = GpuNetworkPredictor::new(gnet, &outputs).unwrap();
        assert_eq!(tiles.in_channels(), 2);
        for (i, (g, w)) in tiles.predict(&x).unwrap().iter().zip(&want_logits).enumerate() {
            assert_close(&format!("{on} tile logits {i}"), g, w, TOL);
        }
    }
}

#[test]
fn missing_or_misshapen_weights_name_the_parameter() {
    let gpu = unet3d::device::launch::Gpu::sim();
    let arch = arch(Block::BasicBlockD, None, true, Nonlin::default());
    let mut store = ParamStore::new();
    let err = GpuNetwork::new(&gpu, &arch, &store).err().unwrap().to_string();
    assert!(err.contains("encoder.stem.convs.0.conv.weight"), "{err}");
    store.add("encoder.stem.convs.0.conv.weight", Tensor::zeros([4, 1, 3, 3, 3])).unwrap();
    let err = GpuNetwork::new(&gpu, &arch, &store).err().unwrap().to_string();
    assert!(err.contains("encoder.stem.convs.0.conv.weight") && err.contains("[4, 1, 3, 3, 2]"), "{err}");
}

/// Parameters download exactly as uploaded, a reload from another store gives that store's
/// outputs, and the optimizer's view lists every parameter once.
#[test]
fn parameters_download_reload_and_list_for_the_optimizer() {
    let gpu = unet3d::device::launch::Gpu::sim();
    let arch = arch(Block::BottleneckD { bottleneck_channels: vec![2, 4, 6] }, None, true, Nonlin::default());
    let (a, b) = (random_store(&arch, 6), random_store(&arch, 7));
    let mut net = GpuNetwork::new(&gpu, &arch, &a).unwrap();
    let params = net.parameters().unwrap();
    assert_eq!(params.len(), a.len());
    for (name, t) in &params {
        assert_eq!(t.data(), a.value(a.id(name).unwrap()).data(), "parameter {name}");
    }
    net.load_parameters(&b).unwrap();
    let x = random(&mut StdRng::seed_from_u64(3), &[1, 4, 8, 8, 2], 1.0);
    let acts = [Activation::None, Activation::None];
    let want = Network::new(&arch, &b).unwrap().predict(&b, &x, &acts).unwrap();
    for (g, w) in net.predict(&x, &acts).unwrap().iter().zip(&want) {
        assert_close("reloaded prediction", g, w, TOL);
    }
    let mut got = Vec::new();
    for (name, _, grad) in net.parameters_mut() {
        assert!(grad.is_none(), "{name}: a gradient before any backward");
        got.push(name.to_string());
    }
    let mut want: Vec<String> = b.ids().map(|id| b.name(id).to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}
