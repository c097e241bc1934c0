"""Measured speed, side by side: our code against the straightforward way of doing the same work.

    python bench.py                                  # every section: under 5 minutes on any 2-core CPU
    python bench.py --quick                          # about a minute: fewer repetitions and configurations
    python bench.py --sections predictor overhead    # some of them

It starts with the CPU line (model, cores, AVX2 / AVX-512 / AMX, native bf16): a time measured on
one machine is not a time on another, and the ratios taken in one run are what carries over. Each
section times ours and a baseline in the same process (the toy suite and the laptop run in a
subprocess, as a user runs them), each configuration for a bounded number of steps, and prints a
Markdown table; bench.json in --out-dir holds every number.

  toy        the full default `python toy_linear.py` vs the notebook-style update (50,000 fresh
             samples per step, a general eigendecomposition of W W^T per step, autograd, one
             setting at a time), the latter timed over a sample of steps of every run and
             extrapolated to the paper's step counts.
  predictor  ClosedFormPredictor update + predict of both views (one symmetric eigh in float64)
             vs a general eigendecomposition per view (d = 256, batch 256), and its share of a
             full training step (ResNet-18, batch 256, 32 x 32, from the `step` section).
  step       training-step throughput of train_byol.py's model (BYOL preset, ResNet-18 width 1,
             32 x 32): batch 64 in fp32 and bf16 autocast, with and without channels_last; batch
             256 (tens of seconds a step on a small CPU) with channels_last only.
             bf16 runs only where the CPU has it natively (AVX-512 BF16 or AMX) or on a GPU:
             elsewhere it is emulated, many times slower than fp32, and the table says skipped.
  data       the two-view augmentation: images/s per data-loader worker (PIL path) and of the
             batched device path on this CPU, and the workers a GPU run would need.
  overhead   the README's laptop command (`train_simsiam.py cpu-demo`, fewer epochs): the share of an
             epoch spent outside its training loop (evaluation, metrics, figures, checkpoint) and
             the share that is not training steps at all (also the augmentation of the views),
             from its metrics.jsonl and the time of its training step alone, measured here.
  lineval    offline linear evaluation with cached features vs the frozen backbone re-run every
             epoch, extrapolated from the measured epochs to the default 100.
  memory     peak RSS of a process that runs training steps at batch 64 (fp32, the BYOL preset);
             on a GPU, the peak GPU memory of steps at batch 256 and 1024.

On a GPU the step, predictor, data and memory sections run there (batches 256 and 1024 in the step
section); the toy suite, the laptop run's overhead and the linear evaluation stay CPU measurements.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

REPO = Path(__file__).resolve().parent
Section = Literal["toy", "predictor", "step", "data", "overhead", "lineval", "memory"]


@dataclass
class Args:
    sections: tuple[Section, ...] = ("toy", "predictor", "step", "data", "overhead", "lineval", "memory")
    """which measurements to run"""
    out_dir: str = "runs/bench"
    """where bench.json goes"""
    repeats: int = 3
    """timed repetitions of the short measurements (the median is reported)"""
    quick: bool = False
    """about a minute: no toy suite and no memory section, one repetition, batch 64 only, shorter runs"""


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU when there is one


def sync() -> None:
    """Wait for the GPU, so that a time is the time of the work and not of queueing it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3, warmup: int = 1, budget_s: float = 30.0) -> float:
    """Median seconds of fn() over up to `repeats` calls after `warmup` untimed ones; stops early once
    `budget_s` seconds have been spent timing (at least one call is always timed)."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < max(1, repeats) and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def native_bf16() -> bool:
    """bf16 autocast runs natively: a GPU, or a CPU with AVX-512 BF16 or AMX."""
    import common
    return torch.cuda.is_available() or bool(common.cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ---------------------------------------------------------------------------------------------
# 1. The toy suite
# ---------------------------------------------------------------------------------------------

# The default run (METHOD.md section 5): (figure block, N, M, relu, setting, steps, learning rate).
def toy_runs():
    import toy_linear as T
    a = T.Args()
    runs = []
    for fig, relu in (("fig2", False), ("fig6", True)):
        for s in T.SETTINGS:
            runs.append((f"{fig}-trajectories", 6, 2, relu, s, a.steps, a.lr))
            fast = s.startswith("cosine") or s == "euclidean-no-predictor"
            steps = a.no_predictor_steps if s.endswith("no-predictor") else a.steps
            runs.append((f"{fig}-eigenvalues", 15, 10, relu, s, steps, a.lr_fast if fast else a.lr))
    runs += [("fig5", 6, 2, False, f"{loss}-standard", a.steps, a.lr)
             for loss in ("euclidean", "cosine") for _ in range(3)]
    return runs


def notebook_step(W, setting: str, relu: bool, lr: float, samples: int = 50_000, sigma: float = 0.1):
    """One update as the authors' notebook does it: fresh samples, a general eigendecomposition of
    W W^T for the predictor, the loss through autograd."""
    import common
    loss_name, variant = setting.split("-", 1)
    x1 = torch.randn(samples, W.shape[1])
    x2 = x1 + sigma * torch.randn_like(x1)
    lam, U = torch.linalg.eig(W.detach() @ W.detach().T)
    U_inv = torch.linalg.inv(U)
    WP = (U @ torch.diag(lam) @ U_inv).real  # alpha = 1
    WP_sqrt = (U @ torch.diag(lam.sqrt()) @ U_inv).real
    W = W.detach().requires_grad_(True)
    act = torch.relu if relu else (lambda v: v)
    z, t = act(x1 @ W.T), act(x2 @ W.T)
    p = z if variant == "no-predictor" else z @ WP.T
    if variant == "isoloss":
        loss = common.iso_euclidean_loss(z, p, t) / 2 if loss_name == "euclidean" else \
            common.iso_cosine_loss(z, p, z @ WP_sqrt.T, t) / 2
    else:
        fn = common.euclidean_loss if loss_name == "euclidean" else common.cosine_loss
        loss = fn(p, t, stop_grad=variant != "no-stopgrad") / 2
    loss.backward()
    return (W - lr * W.grad).detach()


def bench_toy(args: Args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "toy_linear.py", "--out-dir", tmp], cwd=REPO, capture_output=True,
                           text=True)
        ours = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"toy_linear.py failed:\n{r.stderr}")
    torch.set_num_threads(2)
    total, per_block, sample_steps = 0.0, {}, 5
    for block, N, M, relu, setting, steps, lr in toy_runs():
        W = torch.randn(M, N) / 4
        def run():
            nonlocal W
            W = notebook_step(W, setting, relu, lr)
        per_step = timed(lambda: [run() for _ in range(sample_steps)], repeats=1) / sample_steps
        total += per_step * steps
        per_block[block] = per_block.get(block, 0.0) + per_step * steps
    rows = [("default toy suite (Figs. 2, 5, 6)", f"{ours:.1f} s", f"{total:.0f} s (extrapolated)",
             f"{total / ours:.0f}x")]
    print(table(rows, ("toy", "ours (measured)", "notebook-style", "speed-up")))
    return dict(ours_s=ours, notebook_s=total, speedup=total / ours, notebook_blocks_s=per_block)


# ---------------------------------------------------------------------------------------------
# 2. The closed-form predictor
# ---------------------------------------------------------------------------------------------


def bench_predictor(args: Args, step_s: float | None) -> dict:
    import common
    torch.manual_seed(0)
    d, B = 256, 256
    z1, z2 = torch.randn(B, d, device=DEVICE), torch.randn(B, d, device=DEVICE)
    pred = common.ClosedFormPredictor(d, **common.CLOSED_FORM["directpred"], decay=0.998).to(DEVICE)

    def ours():
        for z in (z1, z2):  # the training step's order: C takes each view, then predicts it
            pred.update(z)
            pred(z)
        sync()

    def general(dtype):
        Cm = torch.zeros(d, d, dtype=dtype, device=DEVICE)

        def run():
            nonlocal Cm
            for z in (z1, z2):  # the predictor recomputed where it is applied, once per view
                z = z.to(dtype)
                Cm = 0.998 * Cm + 0.002 * z.T @ z / B
                s, U = torch.linalg.eig(Cm)
                s = s.real.clamp_min(0) / s.real.max()
                W = (U @ torch.diag(s.to(U.dtype) ** 0.5) @ torch.linalg.inv(U)).real
                z @ W
            sync()
        return run

    t_ours = timed(ours, args.repeats * 5)
    t32, t64 = timed(general(torch.float32), args.repeats * 5), timed(general(torch.float64), args.repeats * 5)
    share = f"{100 * t_ours / step_s:.2f}%" if step_s else "-"
    rows = [("ours: one eigh (float64) per view", f"{1e3 * t_ours:.2f}", "1.0x", share),
            ("general eig per view, float32", f"{1e3 * t32:.2f}", f"{t32 / t_ours:.1f}x", ""),
            ("general eig per view, float64", f"{1e3 * t64:.2f}", f"{t64 / t_ours:.1f}x", "")]
    print(table(rows, ("closed-form predictor, d 256, batch 256", "ms/step", "baseline / ours",
                       "share of a batch-256 step")))
    return dict(ours_ms=1e3 * t_ours, general_f32_ms=1e3 * t32, general_f64_ms=1e3 * t64,
                speedup_f32=t32 / t_ours, speedup_f64=t64 / t_ours, share_of_step=t_ours / step_s if step_s else None)


# ---------------------------------------------------------------------------------------------
# 3. Training step throughput, and 5. memory
# ---------------------------------------------------------------------------------------------


def make_step(batch: int, channels_last: bool, bf16: bool, n: int = 1):
    """n full train_byol.py steps (BYOL preset: EMA target, MLP predictor, LARS, readout) on random 32 x 32 views."""
    import train_byol as Tb
    args = replace(Tb.PRESETS["byol"][1], batch_size=batch)
    learner = Tb.Learner(args, 10, small_stem=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    learner = learner.to(DEVICE, memory_format=fmt)
    opt = Tb.make_optimizer(args, learner)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=False)
    x1, x2 = (torch.randn(batch, 3, 32, 32, device=DEVICE).contiguous(memory_format=fmt) for _ in range(2))
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    autocast = lambda: torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16)  # noqa: E731

    def step():
        for _ in range(n):
            Tb.train_step(learner, learner, opt, scaler, x1, x2, y, autocast, 0.99)
        sync()
    return step


def bench_step(args: Args) -> dict:
    """On a CPU: batch 64 in every configuration; batch 256 (tens of seconds a step on a small CPU)
    in the fastest layout only, fp32 channels_last, and bf16 where it is native. On a GPU: batches
    256 and 1024 in every configuration, 10 steps per timing after 3 for warm-up."""
    results, rows = {}, []
    cuda = DEVICE.type == "cuda"
    sizes = (256, 1024) if cuda else (64,)
    configs = [(b, bf16, cl) for b in sizes for bf16 in (False, True) for cl in (False, True)]
    configs += [] if args.quick or cuda else [(256, False, True), (256, True, True)]
    n = 10 if cuda else 1
    for batch, bf16, cl in configs:
        key = f"b{batch}-{'bf16' if bf16 else 'fp32'}-{'cl' if cl else 'nchw'}"
        if bf16 and not native_bf16():
            results[key] = dict(skipped="no native bf16 on this CPU: emulated, many times slower than fp32")
            rows.append((batch, "bf16", "yes" if cl else "no", "skipped", "no native bf16 (emulated)"))
            continue
        repeats = args.repeats if cuda else 1 if batch == 256 or args.quick else 2
        t = timed(make_step(batch, cl, bf16, n), repeats=repeats, warmup=3 if cuda else 1, budget_s=20) / n
        results[key] = dict(step_s=t, images_per_s=batch / t)
        rows.append((batch, "bf16" if bf16 else "fp32", "yes" if cl else "no", f"{t:.3f}", f"{batch / t:.1f}"))
    print(table(rows, ("batch", "autocast", "channels_last", "s/step", "images/s (pairs)")))
    return results


def bench_memory(args: Args) -> dict:
    """On a CPU, the peak resident set of a fresh process that runs training steps at batch 64 (fp32);
    on a GPU, torch.cuda.max_memory_allocated over steps at batch 256 and 1024 (channels_last)."""
    if DEVICE.type == "cuda":
        results, rows = {}, []
        for batch in (256, 1024):
            for bf16 in (False, True):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                make_step(batch, True, bf16, 3)()
                peak = torch.cuda.max_memory_allocated() / 2**20
                results[f"b{batch}-{'bf16' if bf16 else 'fp32'}-cl"] = dict(peak_gpu_mib=peak)
                rows.append((f"training step, batch {batch}, {'bf16' if bf16 else 'fp32'}, channels_last",
                             f"{peak:.0f} MiB"))
        print(table(rows, ("BYOL preset, width 1, 32 x 32", "peak GPU memory (max_memory_allocated)")))
        return results
    # VmHWM (peak resident set) of a fresh process; ru_maxrss would count the parent's pages too.
    code = ("import bench, torch\n"
            "kb = lambda key: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))\n"
            "base = kb('VmRSS:'); s = bench.make_step(64, False, False); [s() for _ in range(3)]\n"
            "print(base, kb('VmHWM:'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    base_kb, peak_kb = map(int, out.split()[-2:])
    rows = [("training step, batch 64, fp32 (BYOL preset, width 1)", f"{peak_kb / 1024:.0f} MiB",
             f"{(peak_kb - base_kb) / 1024:.0f} MiB")]
    print(table(rows, ("peak RSS", "process", "above `import torch`")))
    return dict(peak_rss_mib=peak_kb / 1024, above_import_mib=(peak_kb - base_kb) / 1024)


def bench_overhead(args: Args) -> dict:
    """The README's laptop command with fewer epochs: the wall time of an epoch (between consecutive
    metrics lines, so it holds the evaluation, metrics, figures and checkpoint of each), its loop
    (the steps and the augmentation of their views), and the training steps alone (the same model,
    batch and threads, timed here on random views)."""
    import train_simsiam as S
    preset = S.PRESETS["cpu-demo"][1]
    epochs = 3 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "train_simsiam.py", "cpu-demo", "--epochs", str(epochs), "--out-dir", tmp],
                           cwd=REPO, capture_output=True, text=True)
        process_s = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"train_simsiam.py cpu-demo failed:\n{r.stderr}")
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    args_run = replace(preset, epochs=epochs)
    learner = S.Learner(args_run, 10, small_stem=True)
    opt = S.make_optimizer(args_run, learner)
    x1, x2 = (torch.randn(preset.batch_size, 3, preset.crop, preset.crop) for _ in range(2))
    y = torch.randint(0, 10, (preset.batch_size,))
    scaler, autocast = torch.amp.GradScaler("cpu", enabled=False), (lambda: torch.autocast("cpu", enabled=False))
    step_s = timed(lambda: S.train_step(learner, learner, opt, scaler, x1, x2, y, autocast), repeats=20, budget_s=10)
    steps = records[0]["step"]
    later = records[1:]  # the first epoch also warms the kernels up and draws the first figures
    epoch_s = (later[-1]["wall_time_s"] - records[0]["wall_time_s"]) / len(later)
    loop_s = sum(r["train_s"] for r in later) / len(later)
    outside, not_steps = 1 - loop_s / epoch_s, 1 - steps * step_s / epoch_s
    rows = [(f"`train_simsiam.py cpu-demo --epochs {epochs}`", f"{epoch_s:.2f} s", f"{loop_s:.2f} s",
             f"{steps} x {1e3 * step_s:.0f} ms", f"{100 * outside:.1f}%", f"{100 * not_steps:.1f}%",
             f"{process_s:.0f} s")]
    print(table(rows, ("laptop run (epochs after the first)", "epoch", "its loop", "training steps alone",
                       "outside the loop (evaluation, figures, checkpoint)", "not training steps (also augmentation)",
                       "whole process")))
    return dict(epochs=epochs, epoch_s=epoch_s, loop_s=loop_s, step_s=step_s, steps_per_epoch=steps,
                outside_loop_share=outside, non_step_share=not_steps, process_s=process_s)


# ---------------------------------------------------------------------------------------------
# 3. (continued) The data pipeline
# ---------------------------------------------------------------------------------------------


def bench_data(args: Args, step: dict | None) -> dict:
    import numpy as np
    from PIL import Image
    import data
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    base = [(Image.fromarray(a), 0) for a in arrays]
    specs = data.view_specs(32, (0.0, 0.0))
    views = data.TwoViews(base, tuple(map(data.pil_view, specs)), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader worker is one process on one core
    pil = len(base) / timed(lambda: [views[(0, i)] for i in range(len(base))], repeats=1)
    torch.set_num_threads(threads)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().to(DEVICE)
    batches = [[(0, i) for i in range(256)], [(0, i) for i in range(256, 512)]]

    def device_path():
        list(data.device_views(images, torch.zeros(512, device=DEVICE), specs, batches, 0, torch.contiguous_format))
        sync()
    device = len(base) / timed(device_path, repeats=args.repeats, warmup=2)
    where = "on the GPU" if DEVICE.type == "cuda" else f"on this CPU ({torch.get_num_threads()} threads)"
    best = max((v["images_per_s"] for v in (step or {}).values() if "images_per_s" in v), default=None)
    # What a fast GPU eats: the best measured step there, else a round figure for an A100-class GPU.
    gpu_rate = round(best) if best and DEVICE.type == "cuda" else 20_000
    rows = [("PIL path, one loader worker (one core)", f"{pil:.0f}", f"{math.ceil(gpu_rate / pil)} workers"),
            (f"batched device path, {where}", f"{device:.0f}", "runs on the GPU itself")]
    if best:
        rows.append((f"model step {where.split(' (')[0]} (best configuration)", f"{best:.0f}", "the model limits here"))
    print(table(rows, ("two-view augmentation, 32 x 32", "images/s", f"to feed {gpu_rate} images/s")))
    return dict(pil_per_worker=pil, device_path_cpu=device, workers_for_gpu=math.ceil(gpu_rate / pil))


# ---------------------------------------------------------------------------------------------
# 4. Offline linear evaluation
# ---------------------------------------------------------------------------------------------


def bench_lineval(args: Args) -> dict:
    import common
    import data
    import linear_eval as L
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_data import write_cifar10
    torch.manual_seed(0)
    backbone = L.freeze(common.resnet18(1.0, small_stem=True))
    lin = L.Args(checkpoint="", classifier="sgd", num_workers=0)
    E, k, lr, wd = lin.epochs, 1 if args.quick else 2, lin.lrs[0], lin.wds[0]
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(tmp, n_train_per_class=50, n_test_per_class=1)
        train = data.load_dataset("cifar10", tmp, "train", data.eval_transform("cifar10", 32))
        t0 = time.perf_counter()
        x, y = L.extract_features(backbone, train, torch.device("cpu"), lin.batch_size, 0, label="bench")
        t_extract = time.perf_counter() - t0
        t0 = time.perf_counter()
        L.fit_readout(x, y, 10, "sgd", lr, wd, lin)
        cached = t_extract + time.perf_counter() - t0  # all E epochs, measured
        # The baseline re-runs the backbone for every batch: k epochs measured, the rest at that rate.
        short = replace(lin, epochs=k)
        t0 = time.perf_counter()
        batches = L.backbone_batches(backbone, train, torch.device("cpu"), k, lin.batch_size, 0, "float32", 0)
        slow = L.fit_readout(x, y, 10, "sgd", lr, wd, short, batches, k * math.ceil(len(y) / lin.batch_size))
        uncached = (time.perf_counter() - t0) * E / k
        fast = L.fit_readout(x, y, 10, "sgd", lr, wd, short)
    # Same features, so the same accuracy up to the minibatch order: compare after k epochs.
    acc = [common.topk_accuracy(r(x), y, ks=(1,))[0] for r in (fast, slow)]
    rows = [(f"{E} epochs, {len(y)} images, ResNet-18 width 1", f"{cached:.1f} s", f"{uncached:.0f} s (extrapolated)",
             f"{uncached / cached:.0f}x", f"{100 * acc[0]:.1f}% / {100 * acc[1]:.1f}%")]
    print(table(rows, ("offline linear eval (SGD)", "cached features", "backbone every epoch", "speed-up",
                       f"train top-1 after {k} epochs")))
    return dict(epochs=E, images=len(y), cached_s=cached, uncached_s=uncached, speedup=uncached / cached,
                extract_s=t_extract, top1_after_k_epochs=dict(k=k, cached=acc[0], uncached=acc[1]))


def main(args: Args) -> dict:
    import common
    sys.path.insert(0, str(REPO))
    sections = [s for s in args.sections if not (args.quick and s in ("toy", "memory"))]
    args = replace(args, repeats=1 if args.quick else args.repeats)
    cpu = common.cpu_info()[0]
    print(f"bench.py on {cpu} (torch kernels: {torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
          f"{', quick' if args.quick else ''}\n", flush=True)
    results, t0 = {}, time.perf_counter()
    # step first: predictor, data use it
    for name in ("toy", "step", "predictor", "data", "overhead", "lineval", "memory"):
        if name not in sections:
            continue
        print(f"## {name}", flush=True)
        t_section = time.perf_counter()
        if name == "predictor":
            step = results.get("step", {}).get("b256-fp32-cl", {}).get("step_s")
            results[name] = bench_predictor(args, step)
        elif name == "data":
            results[name] = bench_data(args, results.get("step"))
        else:
            results[name] = globals()[f"bench_{name}"](args)
        print(f"({name}: {time.perf_counter() - t_section:.0f} s)\n", flush=True)
    results["seconds"] = time.perf_counter() - t0
    results["machine"] = dict(cpu=cpu, kernels=torch.backends.cpu.get_cpu_capability(), native_bf16=native_bf16(),
                              torch=torch.__version__, threads=torch.get_num_threads(), python=sys.version.split()[0],
                              gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, quick=args.quick)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"bench.py took {results['seconds']:.0f} s on {cpu}; numbers in {Path(args.out_dir) / 'bench.json'}")
    return results


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
