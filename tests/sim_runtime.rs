//! The execution model of the sim device, through the kernels of kernels/selftest.cu: barriers,
//! static and dynamic shared memory, warp shuffles and votes, atomics, and the errors it reports
//! for kernels that would hang or be undefined on a GPU. Expected values come from the CUDA/PTX
//! definitions, computed here independently of the shim. With UNET3D_GPU_TESTS=1 the same checks
//! run on cuda:0 too, which shows that the sim and the GPU agree.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::device::launch::{Arg, Gpu, Kernel, LaunchConfig, test_devices};
use unet3d::device::sim;

fn small_ints(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-8..=8) as f32).collect()
}

fn block_tree_sum(gpu: &Gpu) {
    let threads = 256;
    let blocks = 37;
    let n = blocks * threads - 100;
    let x = small_ints(n, 1);
    let xb = gpu.upload(&x).unwrap();
    let mut out = gpu.alloc::<f32>(blocks).unwrap();
    let cfg = LaunchConfig::linear(blocks as u32, threads as u32);
    gpu.launch(
        Kernel::SELFTEST_BLOCK_TREE_SUM,
        cfg,
        &[Arg::read(&xb), Arg::write(&mut out), Arg::val(n as i32)],
    )
    .unwrap();
    let got = gpu.download(&out).unwrap();
    let want: Vec<f32> = x.chunks(threads).map(|c| c.iter().sum()).collect();
    assert_eq!(got, want, "{}", gpu.describe());
}

/// The proof that block threads do not run one after another: every ticket drawn before the
/// barrier is smaller than every ticket drawn after it. Run sequentially, thread 0 would draw 0 and
/// 1, thread 1 would draw 2 and 3, and so on.
fn barrier_tickets(gpu: &Gpu) {
    let threads = 192;
    let blocks = 8;
    let mut before = gpu.alloc::<i32>(blocks * threads).unwrap();
    let mut after = gpu.alloc::<i32>(blocks * threads).unwrap();
    let cfg = LaunchConfig::linear(blocks as u32, threads as u32);
    gpu.launch(Kernel::SELFTEST_BARRIER_TICKETS, cfg, &[Arg::write(&mut before), Arg::write(&mut after)])
        .unwrap();
    let (before, after) = (gpu.download(&before).unwrap(), gpu.download(&after).unwrap());
    let t = threads as i32;
    for b in 0..blocks {
        let mut pre = before[b * threads..(b + 1) * threads].to_vec();
        let mut post = after[b * threads..(b + 1) * threads].to_vec();
        pre.sort_unstable();
        post.sort_unstable();
        assert_eq!(pre, (0..t).collect::<Vec<_>>(), "block {b}: tickets before the barrier");
        assert_eq!(post, (t..2 * t).collect::<Vec<_>>(), "block {b}: tickets after the barrier");
    }
}

/// shfl.sync as PTX defines it for a segment of `width` lanes: the lane read, or None for "own
/// value". `mode` is 'i' (idx), 'u' (up), 'd' (down), 'x' (bfly).
fn ptx_shfl_src(lane: i32, b: i32, width: i32, mode: char) -> Option<i32> {
    let segmask = 32 - width;
    let base = lane & segmask;
    let max_lane = base + width - 1;
    let (j, ok) = match mode {
        'i' => (base | (b & !segmask), true),
        'u' => (lane - b, lane - b >= base),
        'd' => (lane + b, lane + b <= max_lane),
        _ => (lane ^ b, (lane ^ b) <= max_lane),
    };
    ok.then_some(j)
}

fn shuffles(gpu: &Gpu) {
    let threads = 64;
    let blocks = 3;
    let n = threads * blocks;
    let x = small_ints(n, 2);
    let xb = gpu.upload(&x).unwrap();
    for width in [32, 16, 8, 4, 2, 1] {
        let mut out = gpu.alloc::<f32>(5 * n).unwrap();
        let mut out64 = gpu.alloc::<f64>(n).unwrap();
        let cfg = LaunchConfig::linear(blocks as u32, threads as u32);
        let args = [Arg::read(&xb), Arg::write(&mut out), Arg::write(&mut out64), Arg::val(width)];
        gpu.launch(Kernel::SELFTEST_SHUFFLES, cfg, &args).unwrap();
        let (out, out64) = (gpu.download(&out).unwrap(), gpu.download(&out64).unwrap());
        let read = |warp0: usize, lane: i32, b: i32, mode: char, v: &[f32]| -> f32 {
            let src = ptx_shfl_src(lane, b, width, mode).unwrap_or(lane);
            v[warp0 + src as usize]
        };
        for w0 in (0..n).step_by(32) {
            // Replays each loop of the kernel over the 32 lanes of this warp.
            let mut xs: Vec<f32> = x[w0..w0 + 32].to_vec();
            let mut ds = xs.clone();
            let mut o = width / 2;
            while o > 0 {
                let (px, pd) = (xs.clone(), ds.clone());
                for l in 0..32 {
                    xs[l as usize] += read(0, l, o, 'x', &px);
                    ds[l as usize] += read(0, l, o, 'd', &pd);
                }
                o /= 2;
            }
            let mut scan: Vec<f32> = x[w0..w0 + 32].to_vec();
            let mut o = 1;
            while o < width {
                let prev = scan.clone();
                for l in 0..32 {
                    if (l & (width - 1)) >= o {
                        scan[l as usize] += read(0, l, o, 'u', &prev);
                    }
                }
                o *= 2;
            }
            for l in 0..32i32 {
                let i = w0 + l as usize;
                let seg: f32 = {
                    let base = (l & !(width - 1)) as usize;
                    x[w0 + base..w0 + base + width as usize].iter().sum()
                };
                let ctx = format!("{}: width {width}, thread {i}", gpu.describe());
                assert_eq!(out[5 * i], xs[l as usize], "{ctx}: xor sum");
                assert_eq!(out[5 * i], seg, "{ctx}: xor sum is the segment sum");
                if l % width == 0 {
                    assert_eq!(out[5 * i + 1], seg, "{ctx}: down sum at the segment's first lane");
                }
                assert_eq!(out[5 * i + 1], ds[l as usize], "{ctx}: down sum");
                assert_eq!(out[5 * i + 2], read(w0, l, 3, 'i', &x), "{ctx}: broadcast of lane 3");
                assert_eq!(out[5 * i + 3], scan[l as usize], "{ctx}: inclusive scan");
                assert_eq!(out[5 * i + 4], read(w0, l, 1, 'x', &x), "{ctx}: xor 1");
                assert_eq!(out64[i], read(w0, l, 1, 'i', &x) as f64 * 0.5, "{ctx}: 64-bit broadcast");
            }
        }
    }
}

fn votes(gpu: &Gpu) {
    let threads = 96;
    let mut rng = StdRng::seed_from_u64(3);
    // Warp 0 random, warp 1 all true, warp 2 all false.
    let pred: Vec<i32> =
        (0..threads).map(|i| if i < 32 { rng.random_range(0..3) } else { (i < 64) as i32 }).collect();
    let pb = gpu.upload(&pred).unwrap();
    let mut ballot = gpu.alloc::<u32>(threads).unwrap();
    let mut any = gpu.alloc::<i32>(threads).unwrap();
    let mut all = gpu.alloc::<i32>(threads).unwrap();
    let mut even = gpu.alloc::<u32>(threads).unwrap();
    let args = [
        Arg::read(&pb),
        Arg::write(&mut ballot),
        Arg::write(&mut any),
        Arg::write(&mut all),
        Arg::write(&mut even),
    ];
    gpu.launch(Kernel::SELFTEST_VOTES, LaunchConfig::linear(1, threads as u32), &args).unwrap();
    let (ballot, any, all, even) = (
        gpu.download(&ballot).unwrap(),
        gpu.download(&any).unwrap(),
        gpu.download(&all).unwrap(),
        gpu.download(&even).unwrap(),
    );
    for w in 0..3 {
        let bits: u32 = (0..32).filter(|&l| pred[w * 32 + l] != 0).map(|l| 1u32 << l).sum();
        for l in 0..32 {
            let i = w * 32 + l;
            assert_eq!(ballot[i], bits, "{}: ballot, thread {i}", gpu.describe());
            assert_eq!(any[i], (bits != 0) as i32, "any, thread {i}");
            assert_eq!(all[i], (bits == u32::MAX) as i32, "all, thread {i}");
            assert_eq!(
                even[i],
                if l % 2 == 0 { bits & 0x5555_5555 } else { 0 },
                "even-lane ballot, thread {i}"
            );
        }
    }
}

fn dynamic_shared(gpu: &Gpu) {
    let threads = 128;
    let blocks = 5;
    let x = small_ints(threads * blocks, 4);
    let xb = gpu.upload(&x).unwrap();
    let mut out = gpu.alloc::<f32>(x.len()).unwrap();
    let cfg = LaunchConfig::linear(blocks as u32, threads as u32).with_shared(threads as u32 * 4);
    gpu.launch(Kernel::SELFTEST_DYNAMIC_SHARED, cfg, &[Arg::read(&xb), Arg::write(&mut out)]).unwrap();
    let want: Vec<f32> = x.chunks(threads).flat_map(|c| c.iter().rev().copied()).collect();
    assert_eq!(gpu.download(&out).unwrap(), want, "{}", gpu.describe());
}

fn shared_per_block(gpu: &Gpu) {
    let (threads, blocks) = (64, 200);
    let mut out = gpu.alloc::<i32>(threads * blocks).unwrap();
    let cfg = LaunchConfig::linear(blocks as u32, threads as u32);
    gpu.launch(Kernel::SELFTEST_SHARED_PER_BLOCK, cfg, &[Arg::write(&mut out)]).unwrap();
    let want: Vec<i32> = (0..threads * blocks).map(|i| (i / threads) as i32).collect();
    assert_eq!(gpu.download(&out).unwrap(), want, "{}", gpu.describe());
}

fn atomics(gpu: &Gpu) {
    let (threads, blocks) = (128u32, 50u32);
    let total = (threads * blocks) as usize;
    let mut count = gpu.zeros::<i32>(1).unwrap();
    let mut fsum = gpu.zeros::<f32>(1).unwrap();
    let mut wide = gpu.zeros::<u64>(1).unwrap();
    let mut maxv = gpu.upload(&[i32::MIN]).unwrap();
    let args = [Arg::write(&mut count), Arg::write(&mut fsum), Arg::write(&mut wide), Arg::write(&mut maxv)];
    gpu.launch(Kernel::SELFTEST_ATOMICS, LaunchConfig::linear(blocks, threads), &args).unwrap();
    assert_eq!(gpu.download(&count).unwrap(), [total as i32]);
    assert_eq!(gpu.download(&fsum).unwrap(), [total as f32 * 0.5]);
    assert_eq!(gpu.download(&wide).unwrap(), [(total as u64) << 33]);
    assert_eq!(gpu.download(&maxv).unwrap(), [total as i32 - 1]);
}

fn each_device(check: fn(&Gpu)) {
    for gpu in test_devices().unwrap() {
        check(&gpu);
    }
}

#[test]
fn block_reduction_through_shared_memory() {
    each_device(block_tree_sum);
}

#[test]
fn barrier_orders_every_thread_of_the_block() {
    each_device(barrier_tickets);
}

#[test]
fn warp_shuffles_follow_ptx_semantics() {
    each_device(shuffles);
}

#[test]
fn warp_votes() {
    each_device(votes);
}

#[test]
fn dynamic_shared_memory() {
    each_device(dynamic_shared);
}

#[test]
fn static_shared_memory_is_per_block() {
    each_device(shared_per_block);
}

#[test]
fn atomics_are_atomic_across_parallel_blocks() {
    each_device(atomics);
}

#[test]
fn ucontext_fibers_give_the_same_results() {
    // The portable switch (the only one off x86-64) must agree with the hand-written one.
    if sim::use_ucontext(true).is_err() {
        return;
    }
    let gpu = Gpu::sim();
    block_tree_sum(&gpu);
    barrier_tickets(&gpu);
    votes(&gpu);
    let back = sim::use_ucontext(false);
    back.unwrap();
}

fn misuse_error(mode: i32) -> String {
    let gpu = Gpu::sim();
    let mut out = gpu.zeros::<f32>(64).unwrap();
    let args = [Arg::val(mode), Arg::write(&mut out), Arg::val(64i32)];
    let err = gpu.launch(Kernel::SELFTEST_MISUSE, LaunchConfig::linear(2, 32), &args).unwrap_err();
    format!("{err:#}")
}

#[test]
fn misused_barriers_and_warp_collectives_fail_with_a_message() {
    let e = misuse_error(1);
    assert!(e.contains("selftest_misuse") && e.contains("__syncthreads()"), "{e}");
    let e = misuse_error(2);
    assert!(e.contains("shuffles from lane 20") && e.contains("0x0000ffff"), "{e}");
    let e = misuse_error(3);
    assert!(e.contains("__syncwarp()") && e.contains("returned"), "{e}");
    let e = misuse_error(4);
    assert!(e.contains("wrote outside buffer argument 1") && e.contains("64 elements"), "{e}");
}

#[test]
fn launches_are_checked_against_the_kernel_signature_and_limits() {
    let gpu = Gpu::sim();
    let x = gpu.upload(&[1.0f32; 32]).unwrap();
    let mut out = gpu.alloc::<f32>(1).unwrap();
    let cfg = LaunchConfig::linear(1, 32);
    let k = Kernel::SELFTEST_BLOCK_TREE_SUM;
    assert_eq!(k.name(), "selftest_block_tree_sum");
    assert_eq!(Kernel::by_name("selftest_block_tree_sum"), Some(k));
    assert_eq!(k.file(), "selftest.cu");
    assert_eq!(
        k.params().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["const float*", "float*", "int"]
    );

    let e = gpu.launch(k, cfg, &[Arg::read(&x), Arg::write(&mut out)]).unwrap_err().to_string();
    assert!(e.contains("takes 3 arguments (const float*, float*, int), got 2"), "{e}");
    let e =
        gpu.launch(k, cfg, &[Arg::read(&x), Arg::write(&mut out), Arg::val(32u32)]).unwrap_err().to_string();
    assert!(e.contains("argument 2 is a unsigned, the kernel takes a int"), "{e}");
    let mut wrong = gpu.alloc::<i32>(1).unwrap();
    let e =
        gpu.launch(k, cfg, &[Arg::read(&x), Arg::write(&mut wrong), Arg::val(32)]).unwrap_err().to_string();
    assert!(e.contains("argument 1 is a int*, the kernel takes a float*"), "{e}");
    let big = LaunchConfig::linear(1, 2048);
    let e = gpu.launch(k, big, &[Arg::read(&x), Arg::write(&mut out), Arg::val(32)]).unwrap_err().to_string();
    assert!(e.contains("2048"), "{e}");
    let other = Gpu::sim();
    let foreign = other.upload(&[1.0f32; 32]).unwrap();
    let e = gpu
        .launch(k, cfg, &[Arg::read(&foreign), Arg::write(&mut out), Arg::val(32)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("another device"), "{e}");
}
