//! Optimizers, schedules and clipping against PyTorch fixtures, closed forms and hand computations.

mod common;

use common::{assert_close, fixture, fixture_meta, fixture_path};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::HashMap;
use unet3d::optim::{
    Adam, AdamHyper, LrSchedule, Optimizer, OptimizerMeta, OptimizerState, Sgd, SgdHyper, clip_grad_norm,
    grad_norm,
};
use unet3d::tensor::io;
use unet3d::{ParamStore, Tensor};

fn t(dims: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_vec(dims.to_vec(), data.to_vec()).unwrap()
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Runs the fixture's three steps on one parameter, checking it after each.
fn check_fixture(file: &str, opt: &mut dyn Optimizer) {
    let f = fixture(file);
    let mut store = ParamStore::new();
    let id = store.add("w", f.get("p0").unwrap().clone()).unwrap();
    for i in 0..3 {
        store.zero_grad();
        store.accumulate_grad(id, f.get(&format!("grad.{i}")).unwrap().clone()).unwrap();
        opt.step(&mut store).unwrap();
        let want = f.get(&format!("p.{}", i + 1)).unwrap();
        assert_close(&format!("{file} step {}", i + 1), store.value(id), want, 1e-5);
    }
}

fn adam_hyper_of(meta: &serde_json::Value, decoupled: bool) -> AdamHyper {
    let b = meta["betas"].as_array().unwrap();
    AdamHyper {
        lr: meta["lr"].as_f64().unwrap(),
        betas: (b[0].as_f64().unwrap(), b[1].as_f64().unwrap()),
        eps: meta["eps"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
        decoupled,
    }
}

#[test]
fn sgd_nesterov_matches_pytorch() {
    let meta = fixture_meta(&fixture("optim/sgd_nesterov.safetensors"));
    let hyper = SgdHyper {
        lr: meta["lr"].as_f64().unwrap(),
        momentum: meta["momentum"].as_f64().unwrap(),
        nesterov: meta["nesterov"].as_bool().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
    };
    // The fixture is nnU-Net's recipe, which is the SGD default.
    assert_eq!(hyper, SgdHyper::default());
    check_fixture("optim/sgd_nesterov.safetensors", &mut Sgd::new(hyper).unwrap());
}

#[test]
fn adam_matches_pytorch() {
    let meta = fixture_meta(&fixture("optim/adam.safetensors"));
    assert_eq!(meta["optimizer"], "Adam");
    check_fixture("optim/adam.safetensors", &mut Adam::new(adam_hyper_of(&meta, false)).unwrap());
}

#[test]
fn adamw_matches_pytorch() {
    let meta = fixture_meta(&fixture("optim/adamw.safetensors"));
    assert_eq!(meta["optimizer"], "AdamW");
    let hyper = adam_hyper_of(&meta, true);
    assert!(hyper.weight_decay > 0.0, "the fixture exercises decoupled decay");
    check_fixture("optim/adamw.safetensors", &mut Adam::new(hyper).unwrap());
}

#[test]
fn defaults_are_the_seeds_adamw_and_nnunets_sgd() {
    let a = AdamHyper::default();
    assert_eq!((a.lr, a.betas, a.eps, a.weight_decay, a.decoupled), (1e-3, (0.9, 0.999), 1e-8, 0.0, true));
    assert_eq!(a.kind(), "AdamW");
    let s = SgdHyper::default();
    assert_eq!((s.lr, s.momentum, s.nesterov, s.weight_decay), (1e-2, 0.99, true, 3e-5));
}

#[test]
fn sgd_without_nesterov_and_without_momentum_by_hand() {
    // Two steps on one scalar p = 1 with gradients 0.5 then -0.25, lr 0.1, wd 0.1, momentum 0.9:
    // d1 = 0.5 + 0.1 = 0.6, buf = 0.6, p = 1 - 0.06 = 0.94;
    // d2 = -0.25 + 0.094 = -0.156, buf = 0.54 - 0.156 = 0.384, p = 0.94 - 0.0384 = 0.9016.
    let run = |momentum: f64| {
        let h = SgdHyper { lr: 0.1, momentum, nesterov: false, weight_decay: 0.1 };
        let mut opt = Sgd::new(h).unwrap();
        let mut store = ParamStore::new();
        let id = store.add("p", Tensor::scalar(1.0)).unwrap();
        for g in [0.5, -0.25] {
            store.zero_grad();
            store.accumulate_grad(id, Tensor::scalar(g)).unwrap();
            opt.step(&mut store).unwrap();
        }
        (store.value(id).item().unwrap(), opt.export_state().unwrap().tensors.len())
    };
    let (p, buffers) = run(0.9);
    assert!((p - 0.9016).abs() < 1e-6, "{p}");
    assert_eq!(buffers, 1);
    // Plain SGD: p = 1 - 0.1 * 0.6 = 0.94, then 0.94 - 0.1 * (-0.25 + 0.094) = 0.9556; no buffer.
    let (p, buffers) = run(0.0);
    assert!((p - 0.9556).abs() < 1e-6, "{p}");
    assert_eq!(buffers, 0);
}

#[test]
fn parameters_without_a_gradient_are_skipped() {
    let mut store = ParamStore::new();
    let a = store.add("a", t(&[2], &[1.0, 2.0])).unwrap();
    let b = store.add("b", t(&[3], &[3.0, 4.0, 5.0])).unwrap();
    store.accumulate_grad(a, t(&[2], &[0.1, -0.2])).unwrap();
    let opts: Vec<Box<dyn Optimizer>> = vec![
        Box::new(Sgd::new(SgdHyper::default()).unwrap()),
        Box::new(Adam::new(AdamHyper { weight_decay: 0.1, ..AdamHyper::default() }).unwrap()),
    ];
    for mut opt in opts {
        let mut s = store.clone();
        opt.step(&mut s).unwrap();
        assert_ne!(s.value(a).data(), store.value(a).data());
        assert_eq!(s.value(b).data(), store.value(b).data(), "no gradient, no update (not even decay)");
        let state = opt.export_state().unwrap();
        assert!(state.tensors.keys().all(|k| k.ends_with(".a")), "{:?}", state.tensors.keys());
    }
}

#[test]
fn a_bad_gradient_is_an_error_before_anything_changes() {
    let mut store = ParamStore::new();
    let a = store.add("a", t(&[2], &[1.0, 2.0])).unwrap();
    let b = store.add("b", t(&[2], &[3.0, 4.0])).unwrap();
    store.accumulate_grad(a, t(&[2], &[0.1, 0.2])).unwrap();
    store.accumulate_grad(b, t(&[2], &[0.1, 0.2])).unwrap();
    *store.grad_mut(b).unwrap() = t(&[3], &[0.0; 3]);
    let mut opt = Adam::new(AdamHyper::default()).unwrap();
    let e = opt.step(&mut store).unwrap_err().to_string();
    assert!(e.contains("gradient of 'b'") && e.contains("[2]") && e.contains("[3]"), "{e}");
    assert_eq!(store.value(a).data(), &[1.0, 2.0]);
    assert!(opt.export_state().unwrap().tensors.is_empty());
}

#[test]
fn invalid_hyperparameters_are_rejected() {
    let e = |r: anyhow::Result<()>| r.unwrap_err().to_string();
    assert!(e(SgdHyper { lr: -1.0, ..SgdHyper::default() }.validate()).contains("learning rate"));
    assert!(e(SgdHyper { momentum: 0.0, ..SgdHyper::default() }.validate()).contains("Nesterov"));
    assert!(e(AdamHyper { betas: (0.9, 1.0), ..AdamHyper::default() }.validate()).contains("beta2"));
    assert!(e(AdamHyper { eps: -1.0, ..AdamHyper::default() }.validate()).contains("eps"));
    assert!(Adam::new(AdamHyper { weight_decay: f64::NAN, ..AdamHyper::default() }).is_err());
}

#[test]
fn poly_schedule_matches_nnunet() {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_path("optim/poly_lr.json")).unwrap()).unwrap();
    let lr0 = j["initial_lr"].as_f64().unwrap();
    let s = LrSchedule::Poly {
        max_epochs: j["max_steps"].as_u64().unwrap() as usize,
        exponent: j["exponent"].as_f64().unwrap(),
    };
    assert_eq!(s, LrSchedule::poly(1000));
    let epochs = j["epochs"].as_array().unwrap();
    let lrs = j["lr"].as_array().unwrap();
    assert_eq!(epochs.len(), lrs.len());
    for (e, want) in epochs.iter().zip(lrs) {
        let (e, want) = (e.as_u64().unwrap() as usize, want.as_f64().unwrap());
        let got = s.lr(lr0, e).unwrap();
        assert!((got - want).abs() <= 1e-12 * want, "epoch {e}: {got} vs {want}");
    }
    assert_eq!(s.lr(lr0, 1000).unwrap(), 0.0);
    assert_eq!(s.lr(lr0, 1500).unwrap(), 0.0);
}

#[test]
fn cosine_schedule_follows_the_closed_form() {
    let s = LrSchedule::Cosine { max_epochs: 100 };
    let lr0 = 1e-3;
    let cases = [
        (0, lr0),
        (25, lr0 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0),
        (50, lr0 / 2.0),
        (75, lr0 * (1.0 - std::f64::consts::FRAC_1_SQRT_2) / 2.0),
        (100, 0.0),
        // PyTorch's CosineAnnealingLR continues the cosine past T_max.
        (150, lr0 / 2.0),
    ];
    for (e, want) in cases {
        let got = s.lr(lr0, e).unwrap();
        assert!((got - want).abs() < 1e-15, "epoch {e}: {got} vs {want}");
    }
    // PyTorch steps it with its recursive form; both agree at every epoch.
    let mut lr = lr0;
    let pi = std::f64::consts::PI;
    for e in 1..=100 {
        let (ef, tf) = (e as f64, 100.0);
        lr *= (1.0 + (pi * ef / tf).cos()) / (1.0 + (pi * (ef - 1.0) / tf).cos());
        let got = s.lr(lr0, e).unwrap();
        assert!((got - lr).abs() < 1e-12 * lr0, "epoch {e}: {got} vs recursive {lr}");
    }
}

#[test]
fn constant_schedule_and_schedule_errors() {
    assert_eq!(LrSchedule::Constant.lr(0.01, 500).unwrap(), 0.01);
    let e = LrSchedule::Cosine { max_epochs: 0 }.lr(0.01, 0).unwrap_err().to_string();
    assert!(e.contains("max_epochs"), "{e}");
    assert!(LrSchedule::Poly { max_epochs: 10, exponent: 0.0 }.lr(0.01, 0).is_err());
}

#[test]
fn set_lr_changes_the_next_step() {
    let mut store = ParamStore::new();
    let id = store.add("p", Tensor::scalar(1.0)).unwrap();
    store.accumulate_grad(id, Tensor::scalar(1.0)).unwrap();
    let mut opt = Sgd::new(SgdHyper { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0 }).unwrap();
    opt.set_lr(LrSchedule::Cosine { max_epochs: 10 }.lr(opt.lr(), 5).unwrap());
    assert!((opt.lr() - 0.05).abs() < 1e-15);
    opt.step(&mut store).unwrap();
    assert!((store.value(id).item().unwrap() - 0.95).abs() < 1e-7);
}

fn clip_store() -> (ParamStore, [unet3d::ParamId; 3]) {
    let mut store = ParamStore::new();
    let a = store.add("a", t(&[2], &[0.0; 2])).unwrap();
    let b = store.add("b", t(&[1], &[0.0])).unwrap();
    let c = store.add("c", t(&[2], &[0.0; 2])).unwrap();
    store.accumulate_grad(a, t(&[2], &[3.0, 4.0])).unwrap();
    store.accumulate_grad(b, t(&[1], &[-12.0])).unwrap();
    (store, [a, b, c])
}

#[test]
fn gradient_clipping_by_hand() {
    // Gradients (3, 4) and (-12): total norm sqrt(9 + 16 + 144) = 13; "c" has no gradient.
    let (mut store, [a, b, c]) = clip_store();
    assert!((grad_norm(&store).unwrap() - 13.0).abs() < 1e-12);
    let total = clip_grad_norm(&mut store, 6.5).unwrap();
    assert!((total - 13.0).abs() < 1e-12);
    let coef = 6.5 / (13.0 + 1e-6);
    let want = [3.0 * coef, 4.0 * coef, -12.0 * coef];
    let got = [store.grad(a).unwrap().data(), store.grad(b).unwrap().data()].concat();
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    assert!(store.grad(c).is_none());
    assert!((grad_norm(&store).unwrap() - 6.5).abs() < 1e-5);

    // Below the limit nothing changes, and the norm is still returned.
    let (mut store, [a, b, _]) = clip_store();
    assert!((clip_grad_norm(&mut store, 13.5).unwrap() - 13.0).abs() < 1e-12);
    assert_eq!(store.grad(a).unwrap().data(), &[3.0, 4.0]);
    assert_eq!(store.grad(b).unwrap().data(), &[-12.0]);

    assert!(clip_grad_norm(&mut store, 0.0).unwrap_err().to_string().contains("max_norm"));
    assert_eq!(grad_norm(&ParamStore::new()).unwrap(), 0.0);
}

/// A store with a conv-like weight, a bias and a parameter that never gets a gradient.
fn model(rng: &mut StdRng) -> ParamStore {
    let mut store = ParamStore::new();
    store.add("enc.conv.weight", t(&[4, 3, 3, 3, 2], &random(rng, 216))).unwrap();
    store.add("enc.conv.bias", t(&[4], &random(rng, 4))).unwrap();
    store.add("frozen", t(&[5], &random(rng, 5))).unwrap();
    store
}

/// Sets random gradients on every parameter but "frozen".
fn set_grads(store: &mut ParamStore, rng: &mut StdRng) {
    store.zero_grad();
    for id in store.ids() {
        if store.name(id) != "frozen" {
            let g = t(store.value(id).dims(), &random(rng, store.value(id).numel()));
            store.accumulate_grad(id, g).unwrap();
        }
    }
}

/// Builds a fresh optimizer (the round trip needs two of each kind).
type MakeOptimizer = fn() -> Box<dyn Optimizer>;

fn optimizers() -> Vec<(&'static str, MakeOptimizer)> {
    vec![
        ("SGD", || Box::new(Sgd::new(SgdHyper::default()).unwrap())),
        ("Adam", || Box::new(Adam::new(AdamHyper { decoupled: false, ..AdamHyper::default() }).unwrap())),
        ("AdamW", || Box::new(Adam::new(AdamHyper { weight_decay: 0.05, ..AdamHyper::default() }).unwrap())),
    ]
}

#[test]
fn exported_state_resumes_identically() {
    let dir = std::env::temp_dir().join(format!("unet3d-optim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (kind, make) in optimizers() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut store = model(&mut rng);
        let mut opt = make();
        opt.set_lr(opt.lr() * 0.5);
        for _ in 0..2 {
            set_grads(&mut store, &mut rng);
            opt.step(&mut store).unwrap();
        }
        let state = opt.export_state().unwrap();
        assert_eq!(state.meta.kind(), kind);
        let slots: &[&str] = if kind == "SGD" { &["momentum_buffer"] } else { &["exp_avg", "exp_avg_sq"] };
        let mut want: Vec<String> = slots
            .iter()
            .flat_map(|s| ["enc.conv.bias", "enc.conv.weight"].map(|p| format!("{s}.{p}")))
            .collect();
        want.sort();
        assert_eq!(state.tensors.keys().cloned().collect::<Vec<_>>(), want, "{kind}");
        let json = serde_json::to_value(&state.meta).unwrap();
        assert_eq!(json["optimizer"], kind);
        if kind != "SGD" {
            assert_eq!(json["step"]["enc.conv.weight"], 2);
        }

        // Through a checkpoint file: tensors as safetensors, metadata as one JSON string.
        let path = dir.join(format!("{kind}.safetensors"));
        let named: Vec<(&str, &Tensor)> = state.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let meta = HashMap::from([("optimizer".to_string(), json.to_string())]);
        io::save(&path, &named, Some(meta)).unwrap();
        let file = io::load(&path).unwrap();
        let loaded = OptimizerState {
            tensors: file.tensors,
            meta: serde_json::from_str(&file.metadata["optimizer"]).unwrap(),
        };

        // A fresh optimizer with different hyperparameters takes the saved ones.
        let mut resumed = make();
        resumed.set_lr(1.0);
        resumed.import_state(&store, &loaded).unwrap();
        assert_eq!(resumed.lr(), opt.lr(), "{kind}");
        let mut store2 = store.clone();
        for _ in 0..2 {
            set_grads(&mut store, &mut rng);
            store2.zero_grad();
            for id in store.ids() {
                if let Some(g) = store.grad(id) {
                    store2.accumulate_grad(id, g.clone()).unwrap();
                }
            }
            opt.step(&mut store).unwrap();
            resumed.step(&mut store2).unwrap();
        }
        for id in store.ids() {
            assert_eq!(store.value(id).data(), store2.value(id).data(), "{kind}: {}", store.name(id));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn importing_a_wrong_state_names_what_is_wrong() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut store = model(&mut rng);
    set_grads(&mut store, &mut rng);
    let mut adam = Adam::new(AdamHyper::default()).unwrap();
    adam.step(&mut store).unwrap();
    let good = adam.export_state().unwrap();
    let mut sgd = Sgd::new(SgdHyper::default()).unwrap();
    sgd.step(&mut store).unwrap();

    let err =
        |opt: &mut dyn Optimizer, s: &OptimizerState| opt.import_state(&store, s).unwrap_err().to_string();
    let edit = |f: &dyn Fn(&mut OptimizerState)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };

    let e = err(&mut sgd, &good);
    assert!(e.contains("AdamW") && e.contains("SGD"), "{e}");
    let mut adam_l2 = Adam::new(AdamHyper { decoupled: false, ..AdamHyper::default() }).unwrap();
    let e = err(&mut adam_l2, &good);
    assert!(e.contains("AdamW") && e.contains("Adam"), "{e}");

    let s = edit(&|s| {
        let t = s.tensors.remove("exp_avg.enc.conv.bias").unwrap();
        s.tensors.insert("exp_avg.dec.conv.bias".into(), t);
    });
    let e = err(&mut adam, &s);
    assert!(e.contains("exp_avg.dec.conv.bias") && e.contains("'dec.conv.bias'"), "{e}");

    let s = edit(&|s| {
        s.tensors.insert("exp_avg.enc.conv.bias".into(), Tensor::zeros([5]));
    });
    let e = err(&mut adam, &s);
    assert!(e.contains("exp_avg.enc.conv.bias") && e.contains("[4]") && e.contains("[5]"), "{e}");

    let s = edit(&|s| {
        s.tensors.remove("exp_avg_sq.enc.conv.weight");
    });
    let e = err(&mut adam, &s);
    assert!(e.contains("lacks") && e.contains("exp_avg_sq.enc.conv.weight"), "{e}");

    let s = edit(&|s| {
        s.tensors.insert("momentum_buffer.enc.conv.bias".into(), Tensor::zeros([4]));
    });
    let e = err(&mut adam, &s);
    assert!(e.contains("unknown slot 'momentum_buffer'"), "{e}");

    let s = edit(&|s| {
        if let OptimizerMeta::Adam(m) | OptimizerMeta::AdamW(m) = &mut s.meta {
            m.step.remove("enc.conv.bias");
        }
    });
    let e = err(&mut adam, &s);
    assert!(e.contains("'enc.conv.bias'") && e.contains("step"), "{e}");
    let s = edit(&|s| {
        s.meta = OptimizerMeta::Sgd(SgdHyper { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.0 })
    });
    let e = err(&mut adam, &s);
    assert!(e.contains("for SGD") && e.contains("is AdamW"), "{e}");

    // Recorded JSON that lacks a key or holds the wrong type does not parse, naming the field.
    let mut json = serde_json::to_value(&good.meta).unwrap();
    json.as_object_mut().unwrap().remove("eps");
    let e = serde_json::from_value::<OptimizerMeta>(json).unwrap_err().to_string();
    assert!(e.contains("eps"), "{e}");
    let mut json = serde_json::to_value(&good.meta).unwrap();
    json["betas"] = serde_json::json!("0.9");
    assert!(serde_json::from_value::<OptimizerMeta>(json).is_err());

    // A failed import leaves the optimizer as it was.
    let before = adam.export_state().unwrap();
    assert_eq!(before.tensors.keys().collect::<Vec<_>>(), good.tensors.keys().collect::<Vec<_>>());
    for (n, t) in &before.tensors {
        assert_eq!(t.data(), good.tensors[n].data(), "{n}");
    }
}
