"""cuDNN (through PyTorch) on the conv layers of `bench::run_conv` (src/device/kernels/bench.rs):
the same ops, shapes and row names, channels_last_3d, cudnn.benchmark on, TF32 off and on; each
backward pass alone through aten.convolution_backward. Prints a Markdown table; with --ours FILE
(the table of `sim_conv --ignored conv_throughput`) prints both joined, with ours / cuDNN.

    python3 scripts/gpu-bench-torch.py [--ours ours.md]

With --fused: PyTorch's eager ops for the rows of `bench::run_fused` instead (instance norm +
leaky ReLU (+ residual), squeeze-excitation, nnU-Net's Dice + CE, forward and autograd backward),
GB/s with the same byte counts; --ours joins the table of `sim_fused --ignored fused_throughput`.

With --elementwise: the rows of `bench::run` (elementwise, activations, reductions, pooling,
concat, the optimizer step and gradient norm), GB/s.
"""
import argparse
import re

import torch
import torch.nn.functional as F

# (kind, input size, input channels, output channels), as RESENC_M_CONVS; batch 2.
LAYERS = [("k3s1", 128, 32, 32), ("k3s1", 64, 64, 64), ("k3s1", 32, 128, 128), ("k3s1", 16, 256, 256),
          ("k3s1", 8, 320, 320), ("k3s1", 4, 320, 320), ("k3s2", 128, 32, 64), ("k3s2", 64, 64, 128),
          ("k3s2", 32, 128, 256), ("k3s2", 16, 256, 320), ("k3s2", 8, 320, 320), ("k1s1", 64, 32, 64),
          ("k1s1", 32, 64, 128), ("k1s1", 16, 128, 256), ("k1s1", 8, 256, 320), ("t2s2", 64, 64, 32),
          ("t2s2", 32, 128, 64), ("t2s2", 16, 256, 128), ("t2s2", 8, 320, 256), ("t2s2", 4, 320, 320)]
KS = {"k3s1": (3, 1), "k3s2": (3, 2), "k1s1": (1, 1), "t2s2": (2, 2)}
N = 2


def time_ms(fn, reps=5):
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def cl(dev, *dims):
    """Uniform in [-0.5, 0.5), channels_last_3d (PyTorch's view of unet3d's NDHWC layout)."""
    return torch.rand(*dims, device=dev).sub_(0.5).contiguous(memory_format=torch.channels_last_3d)


def bench():
    dev = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = True
    rows = []
    for kind, size, cin, cout in LAYERS:
        k, s = KS[kind]
        tr = kind == "t2s2"
        out = size * s if tr else (size + 2 * ((k - 1) // 2) - k) // s + 1
        x, gy = cl(dev, N, cin, size, size, size), cl(dev, N, cout, out, out, out)
        w = cl(dev, *((cin, cout) if tr else (cout, cin)), k, k, k)
        pad = 0 if tr else (k - 1) // 2
        macs = N * min(size, out) ** 3 * k ** 3 * cin * cout
        shape = f"{kind} {N}x{cin}@{size}^3 -> {cout}"
        fwd = (lambda: torch.nn.functional.conv_transpose3d(x, w, stride=s)) if tr else (
            lambda: torch.nn.functional.conv3d(x, w, stride=s, padding=pad))
        bwd = lambda mask: torch.ops.aten.convolution_backward(
            gy, x, w, None, [s] * 3, [pad] * 3, [1] * 3, tr, [0] * 3, 1, mask)
        for prec, tf32 in (("fp32", False), ("tf32", True)):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            name = "conv_transpose3d" if tr else "conv3d"
            for op, fn in (("fwd", fwd), ("bwd-data", lambda: bwd([True, False, False])),
                           ("bwd-weight", lambda: bwd([False, True, False]))):
                ms = time_ms(fn)
                rows.append((f"{name} {op} {prec}", shape, ms, 2 * macs / (ms * 1e9)))
        del x, gy, w
    return rows


# Stage activation sizes (N, D, H, W, C) as RESENC_M_STAGES, and the Dice + CE logits.
FUSED_STAGES = [(2, 128, 128, 128, 32), (2, 64, 64, 64, 64), (2, 32, 32, 32, 128), (2, 16, 16, 16, 256),
                (2, 8, 8, 8, 320), (2, 4, 4, 4, 320)]
FUSED_LOGITS = (2, 128, 128, 128, 3)


def bench_fused():
    """(op, shape, ms, GB/s) rows named and sized as unet3d's fused rows; bytes count each tensor once."""
    F = torch.nn.functional
    dev = torch.device("cuda:0")
    rows = []
    grad = lambda y, xs, gy: (lambda: torch.autograd.grad(y, xs, gy, retain_graph=True))
    for dims in FUSED_STAGES:
        n, d, h, w, c = dims
        f = 4 * n * d * h * w * c
        shape = "[" + ", ".join(map(str, dims)) + "]"
        x, r, gy = (cl(dev, n, c, d, h, w).requires_grad_() for _ in range(3))
        g, b = torch.rand(c, device=dev, requires_grad=True), torch.rand(c, device=dev, requires_grad=True)
        norm = lambda res: F.leaky_relu(F.instance_norm(x, weight=g, bias=b, eps=1e-5) + (r if res else 0), 0.01)
        y, yr = norm(False), norm(True)
        rd = max((c + 64) // 16 // 8 * 8, 8)
        w1, w2 = (torch.rand(o, i, 1, 1, 1, device=dev, requires_grad=True) for o, i in ((rd, c), (c, rd)))
        b1, b2 = torch.rand(rd, device=dev, requires_grad=True), torch.rand(c, device=dev, requires_grad=True)
        se = lambda: x * torch.sigmoid(F.conv3d(F.relu(F.conv3d(x.mean((2, 3, 4), keepdim=True), w1, b1)), w2, b2))
        ys = se()
        for op, nbytes, fn in (
            ("instance norm + lrelu", 2 * f, lambda: norm(False)),
            ("instance norm + residual + lrelu", 3 * f, lambda: norm(True)),
            ("instance norm + lrelu backward", 3 * f, grad(y, (x, g, b), gy)),
            ("instance norm + residual + lrelu backward", 5 * f, grad(yr, (x, g, b, r), gy)),
            ("squeeze-excitation", 2 * f, se),
            ("squeeze-excitation backward", 3 * f, grad(ys, (x, w1, b1, w2, b2), gy)),
        ):
            ms = time_ms(fn)
            rows.append((op, shape, ms, nbytes / (ms * 1e6)))
        del x, r, gy, y, yr, ys
    n, d, h, w, c = FUSED_LOGITS
    vox = n * d * h * w
    logits = cl(dev, n, c, d, h, w).requires_grad_()
    labels = torch.randint(0, c, (n, d, h, w), device=dev)
    onehot = F.one_hot(labels, c).permute(0, 4, 1, 2, 3).float()

    def dice_ce():
        p = torch.softmax(logits, 1)
        axes = (0, 2, 3, 4)
        i, ps, gs = (p * onehot).sum(axes), p.sum(axes), onehot.sum(axes)
        dc = (2 * i + 1e-5) / torch.clip(gs + ps + 1e-5, 1e-8)
        return F.cross_entropy(logits, labels) - dc[1:].mean()

    loss = dice_ce()
    shape = "[" + ", ".join(map(str, FUSED_LOGITS)) + "]"
    for op, nbytes, fn in (("softmax dice + CE loss", 4 * vox * (c + 1), dice_ce),
                           ("softmax dice + CE loss backward", 4 * vox * (2 * c + 1),
                            grad(loss, (logits,), torch.ones((), device=dev)))):
        ms = time_ms(fn)
        rows.append((op, shape, ms, nbytes / (ms * 1e6)))
    return rows


def parse(path, prefix="conv"):
    """(op, shape) -> ms from the Markdown rows `| op | shape | ms | TFLOP/s |` of a file."""
    got = {}
    for line in open(path):
        m = re.match(r"\|\s*(" + prefix + r"[^|]*?)\s*\|\s*([^|]*?)\s*\|\s*([0-9.]+)\s*\|", line)
        if m:
            got[(m.group(1), m.group(2))] = float(m.group(3))
    return got


def bench_elementwise():
    dev = torch.device("cuda:0")
    n, d, h, w, c = 2, 128, 128, 128, 32
    f = 4 * n * d * h * w * c
    a, b, g = (cl(dev, n, c, d, h, w) for _ in range(3))
    gate = cl(dev, n, c, 1, 1, 1)
    p1, p2 = cl(dev, n, c // 2, d, h, w), cl(dev, n, c // 2, d, h, w)
    shape = f"[{n}, {d}, {h}, {w}, {c}]"
    rows = [
        ("add", shape, 3 * f, lambda: a + b),
        ("mul", shape, 3 * f, lambda: a * b),
        ("gate multiply (N,1,1,1,C)", shape, 2 * f, lambda: a * gate),
        ("gate multiply backward", shape, 5 * f, lambda: (g * gate, (g * a).sum((2, 3, 4), keepdim=True))),
        ("leaky relu", shape, 2 * f, lambda: F.leaky_relu(a, 0.01)),
        ("leaky relu backward", shape, 3 * f, lambda: torch.ops.aten.leaky_relu_backward(g, a, 0.01, False)),
        ("sigmoid", shape, 2 * f, lambda: torch.sigmoid(a)),
        ("softmax over channels", shape, 2 * f, lambda: torch.softmax(a, dim=1)),
        ("spatial mean", shape, f, lambda: a.mean((2, 3, 4), keepdim=True)),
        ("avg pool 2x2x2", shape, f + f // 8, lambda: F.avg_pool3d(a, 2)),
        ("concat channels", f"2 x [{n}, {d}, {h}, {w}, {c // 2}]", 2 * f, lambda: torch.cat([p1, p2], dim=1)),
    ]
    params = [torch.nn.Parameter(torch.rand(320 * 320 * 27, device=dev)) for _ in range(80)]
    for p in params:
        p.grad = torch.rand_like(p)
    total = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    grads = [p.grad for p in params]
    norm = lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()  # noqa: E731
    pshape = f"{len(params)} tensors, {total} parameters"
    rows += [("adamw step (fused)", pshape, 28 * total, opt.step), ("gradient norm (foreach)", pshape, 4 * total, norm)]
    out = []
    for op, shp, nbytes, fn in rows:
        ms = time_ms(fn, reps=20)
        out.append((op, shp, ms, nbytes / (ms * 1e6)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="Markdown table of unet3d's conv rows to join")
    ap.add_argument("--fused", action="store_true", help="the norm, SE and loss rows instead of conv")
    ap.add_argument("--elementwise", action="store_true", help="the elementwise and optimizer rows instead of conv")
    args = ap.parse_args()
    rows = bench_fused() if args.fused else bench_elementwise() if args.elementwise else bench()
    unit, ref = ("GB/s", "PyTorch") if args.fused or args.elementwise else ("TFLOP/s", "cuDNN")
    print(f"PyTorch {torch.__version__}, cuDNN {torch.backends.cudnn.version()} on {torch.cuda.get_device_name(0)}\n")
    if not args.ours:
        print(f"| op | shape | ms | {unit} |\n|---|---|---:|---:|")
        for op, shape, ms, tf in rows:
            print(f"| {op} | {shape} | {ms:.4f} | {tf:.2f} |")
        return
    ours = parse(args.ours, prefix="" if args.fused else "conv")
    print(f"| op | shape | ours ms | {ref} ms | ours {unit} | {ref} {unit} | ours / {ref} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for op, shape, ms, tf in rows:
        o = ours.get((op, shape))
        cells = (f"{o:.4f}", f"{ms:.4f}", f"{tf * ms / o:.2f}", f"{tf:.2f}", f"{ms / o:.2f}") if o else (
            "missing", f"{ms:.4f}", "", f"{tf:.2f}", "")
        print(f"| {op} | {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
