"""The paper's deep-network figures from our own runs: it runs what is missing, then draws.

    python paper_figures.py                        # Figs. 3 and 7, the laptop set on Fashion-MNIST (7 runs)
    python paper_figures.py --figures 8            # Fig. 8, the laptop set (4 more runs)
    python paper_figures.py --figures ablations    # SimSiam without predictor / stop-gradient (2 runs)
    python paper_figures.py --figures euclidean    # the Euclidean loss without the EMA target (4 runs)
    python paper_figures.py --scale paper --dataset cifar10 --gpus 0,1   # the paper's runs (1,000 epochs each: GPUs)
    python paper_figures.py --draw-only            # redraw from the run directories as they are now

  Fig. 3  rows Euclidean / cosine loss, columns DirectPred / IsoLoss / BYOL's MLP predictor, all with the
          EMA target: the eigenvalues of the predictor's running C per step (log axis), and the k-NN
          monitor per evaluation.
  Fig. 7  IsoLoss with and without the EMA target (cosine), and DirectPred without it.
  Fig. 8  weight decay 4e-4 / 1e-5 / 1e-6 for DirectPred and IsoLoss (cosine, EMA target).
  euclidean  (not in the paper) DirectPred and IsoLoss with the Euclidean loss and no EMA target, rows:
          W_P from C's eigenvalues divided by the largest (the release's) / from C's own eigenvalues
          (--no-normalize-spectrum, the toy theory's W_P, which fixes the scale of z).

Each run is a preset of a training script with the method's predictor, loss and weight decay and
nothing else changed: `python train_byol.py laptop --predictor P [--isoloss] --loss L --weight-decay W`
(with the EMA target) or `python train_simsiam.py laptop ...` (without); with --scale paper the
script's own paper preset (`byol` / `simsiam`) on --dataset instead of `laptop`. Then
`python linear_eval.py` on its backbone, and once the same backbone at random initialisation. The runs
are grid.py's (the same command, the same directory under runs/DATASET-SCALE/): a run either of them
made is not made again, and an interrupted one resumes from its last.pt.

Written to --results-dir (default results/DATASET-SCALE/): fig3.png, fig7.png, fig8.png, ablations.png
(those asked for), figures.json (per run: its command, k-NN and linear top-1 from linear_eval.py,
std(z/|z|), the share of the mean in z, and how many eigenvalues of C lie within a factor 10 of the
largest, at the end and at every epoch) and figures.md (the same as a table).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

import slurm as SL

from grid import (ROWS, eval_command, evaluate_random_init, execute, fetch_data, machine_line, run_name, slots,
                  train_command)

FIG3 = ("directpred", "isoloss", "mlp")  # its columns
DECAYS = (4e-4, 1e-5, 1e-6)  # Fig. 8; 1e-5 is every preset's
FIGURE_TITLES = {"ablations": "Collapse ablations", "euclidean": "Euclidean loss without the EMA target",
                 "long": "Five times longer (12,000 steps)"}
# Figures whose runs train for other than the preset's epochs: the long horizon, five times the laptop preset's 24.
FIGURE_EPOCHS = {"long": 120}
LONG_MARK = 2_400  # the laptop preset's length, marked in the long figure


def figure_file(figure: str) -> str:
    return f"fig{figure}.png" if figure.isdigit() else f"{figure}.png"


def figure_runs(figure: str) -> list[tuple[str, str, bool, float, bool]]:
    """(method, loss, ema, weight decay, raw spectrum) of every run a figure draws."""
    if figure == "3":
        return [(m, loss, True, 1e-5, False) for loss in ("euclidean", "cosine") for m in FIG3]
    if figure == "4":  # the learnable linear predictor, with the EMA target as in the paper's figure
        return [("linear", loss, True, 1e-5, False) for loss in ("cosine", "euclidean")]
    if figure == "7":  # and DirectPred without the EMA target: the claim is that IsoLoss copes better there
        return [("isoloss", "cosine", True, 1e-5, False), ("isoloss", "cosine", False, 1e-5, False),
                ("directpred", "cosine", False, 1e-5, False)]
    if figure == "long":  # does the laptop model reach the authors' state if it trains longer?
        return [("isoloss", "cosine", True, 1e-5, False), ("directpred", "cosine", True, 1e-5, False),
                ("isoloss", "cosine", False, 1e-5, False)]
    if figure == "ablations":  # SimSiam's collapse ablations: what a collapse looks like in the same set-up
        return [(m, "cosine", False, 1e-5, False) for m in ("no-predictor", "no-stop-grad")]
    if figure == "euclidean":
        return [(m, "euclidean", False, 1e-5, raw) for raw in (False, True) for m in ("directpred", "isoloss")]
    return [(m, "cosine", True, wd, False) for m in ("directpred", "isoloss") for wd in DECAYS]


@dataclass
class Args:
    figures: tuple[Literal["3", "4", "7", "8", "ablations", "euclidean", "long"], ...] = ("3", "7")
    """which figures to run and draw (ablations: SimSiam without predictor / stop-gradient, for comparison; euclidean:
    the Euclidean loss without the EMA target)"""
    scale: Literal["laptop", "paper"] = "laptop"
    """laptop: the `laptop` preset of each script (Fashion-MNIST, minutes a run on 2 cores); paper: the paper's
    settings"""
    dataset: str = ""
    """data set of the runs (default: fashionmnist for the laptop, cifar10 for the paper)"""
    data_dir: str = "data"
    """passed to the training scripts and linear_eval.py"""
    seed: int = 0
    """seed of every run"""
    runs_dir: str = "runs"
    """run directories go to RUNS_DIR/DATASET-SCALE/ (grid.py's)"""
    results_dir: str = ""
    """where the figures and their tables go (default results/DATASET-SCALE)"""
    jobs: int = 2
    """on the CPU: runs at a time, each with cores / jobs threads (2 on a 2-core machine)"""
    gpus: str = ""
    """GPU indices to use, e.g. "0,1" (empty: the CPU), one run per GPU"""
    train_args: str = ""
    """more options for every training run, e.g. "--epochs 4" for a quick look (figures.json records them)"""
    download: bool = False
    """the data step first: download the data set into --data-dir once, before any run starts"""
    cluster: Annotated[SL.SlurmOptions, tyro.conf.OmitArgPrefixes] = SL.SlurmOptions()
    """--slurm and its options: the runs as one SLURM job array instead of here (slurm.py); then --draw-only"""
    draw_only: bool = False
    """draw from the run directories as they are (runs not started yet are left out)"""


def plan(args: Args) -> tuple[Path, str, list[dict]]:
    """(the run directories' folder, the data set, every run the figures need, each once)."""
    dataset = args.dataset or ("fashionmnist" if args.scale == "laptop" else "cifar10")
    out = Path(args.runs_dir) / f"{dataset}-{args.scale}"
    jobs, seen = [], set()
    for fig in args.figures:
        epochs = FIGURE_EPOCHS.get(fig)
        if epochs and args.scale != "laptop":
            raise SystemExit(f"error: --figures {fig} is the laptop's; the paper's runs are 1,000 epochs already")
        for method, loss, ema, wd, raw in figure_runs(fig):
            name = run_name(method, loss, ema, wd, args.seed, raw, epochs)
            if name in seen:
                continue
            seen.add(name)
            extra = (f"--epochs {epochs} " if epochs else "") + args.train_args  # the user's options come last
            train = train_command(method, ema, args.scale, dataset, args.data_dir, out / name, args.seed, loss, wd,
                                  extra, raw)
            jobs.append(dict(name=name, method=method, loss=loss, ema=ema, wd=wd, raw=raw, dir=out / name,
                             cmds=[train, eval_command(out / name, dataset, args.data_dir)]))
    return out, dataset, jobs


def random_init(out: Path, dataset: str, job: dict, args: Args) -> dict:
    """linear_eval.py on the backbone the runs start from (once; kept in out/random-init-sSEED, as grid.py's)."""
    import data
    config = json.loads((job["dir"] / "config.json").read_text())
    return evaluate_random_init(out / f"random-init-s{args.seed}", config["seed"], config["width"],
                                config["crop"] or data.CROP_SIZE[dataset], dataset=dataset, data_dir=args.data_dir)


def near_top(eigenvalues: list[float], factor: float = 10.0) -> int:
    """How many eigenvalues of C lie within `factor` of the largest: the directions W_P lets through."""
    top = max(eigenvalues)
    return sum(1 for s in eigenvalues if s * factor >= top) if top > 0 else 0


def collect(job: dict) -> dict | None:
    """A run's numbers, or None before its first epoch; linear_eval.py's once it has run."""
    import rundir
    records = rundir.read_metrics(job["dir"] / "metrics.jsonl")
    failed = job["dir"] / "failed.txt"
    failed = failed.read_text().strip() if failed.exists() else None
    if not records and not failed:
        return None
    config = job["dir"] / "config.json"
    run = dict(name=job["name"], method=job["method"], loss=job["loss"], ema=job["ema"], weight_decay=job["wd"],
               raw_spectrum=job["raw"], command="python " + shlex.join(job["cmds"][0]),
               provenance=json.loads(config.read_text()).get("provenance") if config.exists() else None)
    if not records:  # stopped by a fault within its first epoch: the fault is the result
        return dict(run, step=None, epochs=0, knn=None, linear=None, std=None, mean_share_z=None,
                    collapse_warning=False, near_top=None, near_top_by_step=[], knn_monitor=[], spectrum=[],
                    wall_time_s=None, failed=failed)
    last = records[-1]
    lin = job["dir"] / "linear_eval.json"
    lin = json.loads(lin.read_text()) if lin.exists() else None
    return dict(run, step=last["step"], epochs=last["epoch"],
                knn=None if lin is None else 100 * lin["knn"]["results"]["k=20"]["top1"],
                linear=None if lin is None else 100 * lin["offline_linear"]["top1"],
                std=last["std_normalized_z"], healthy_std=1 / math.sqrt(len(last["eigenvalues"])),
                mean_share_z=next((r["mean_share_z"] for r in reversed(records) if r.get("mean_share_z") is not None),
                                  None),
                collapse_warning=last["collapse_warning"], near_top=near_top(last["eigenvalues"]),
                near_top_by_step=[[r["step"], near_top(r["eigenvalues"])] for r in records],
                knn_monitor=[[r["step"], r["knn_top1"]] for r in records if r.get("knn_top1") is not None],
                probe_monitor=[[r["step"], r["probe_top1"]] for r in records if r.get("probe_top1") is not None],
                spectrum=[[r["step"], r["eigenvalues"]] for r in records], wall_time_s=last["wall_time_s"],
                failed=failed, **alignment(records))


def alignment(records: list[dict]) -> dict:
    """A learnable linear predictor's eigenvector alignment (Fig. 4): per epoch, cos(u, W u) for each eigenvector u
    of C from the largest eigenvalue down, and how many of them align above 0.9, at the end and per epoch."""
    if "eigenvector_alignment" not in records[-1]:
        return {}
    by_step = [[r["step"], r["eigenvector_alignment"][::-1]] for r in records]
    count = lambda a: sum(1 for c in a if c > 0.9)  # noqa: E731
    return dict(alignment=by_step, aligned=count(by_step[-1][1]), aligned_by_step=[[s, count(a)] for s, a in by_step])


def fault(r: dict) -> str:
    """A stopped run's fault in a few words: NaN or Inf and the step, or the first sentence of its error line."""
    at = re.search(r"step (\d+)", r["failed"])
    if "NaN or Inf" in r["failed"]:  # a refusal may mention NaN too
        return "NaN or Inf" + (f" by step {at[1]}" if at else "")
    return r["failed"].removeprefix("error: ").split(". ")[0]


def table(results: dict, ref: dict | None, header: str) -> str:
    rows = ["| run | steps | k-NN top-1 | linear top-1 | std(z/\\|z\\|) | mean share of z "
            "| eigenvalues within 10x of the largest | collapse warning | train time (s) |",
            "|" + "---|" * 9]
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in results.values():
        rows.append(f"| `{r['name']}`{' (stopped: ' + fault(r) + ')' if r['failed'] else ''} "
                    f"| {fmt(r['step'], '{}')} | {fmt(r['knn'])} | {fmt(r['linear'])} | {fmt(r['std'], '{:.3f}')} | "
                    f"{fmt(r['mean_share_z'], '{:.2f}')} | {fmt(r['near_top'], '{}')} | "
                    f"{'yes' if r['collapse_warning'] else 'no'} | "
                    f"{fmt(r['wall_time_s'], '{:.0f}')} |")
    if ref is not None:
        rows.append(f"| random init (same backbone) | 0 | {100 * ref['knn']['results']['k=20']['top1']:.1f} | "
                    f"{100 * ref['offline_linear']['top1']:.1f} | - | - | - | - | - |")
    # the most that aligned, and the first step that reached it (max keeps the first of equal counts)
    aligned = [(r, max(r["aligned_by_step"], key=lambda step_count: step_count[1]))
               for r in results.values() if r.get("aligned") is not None]
    aligned = [f"- `{r['name']}`: {r['aligned']} at the end; most {most}, by step {step}"
               for r, (step, most) in aligned]
    if aligned:  # Fig. 4's number
        rows += ["", "Eigenvectors of C whose alignment cos(u, W u) with the learnable predictor W exceeds 0.9:",
                 *aligned]
    return "\n".join([header, "", *rows])


def draw(figure: str, results: dict, path: Path, title: str, seed: int = 0, ref: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    if figure == "3":
        grid = [[run_name(m, loss, seed=seed) for m in FIG3] for loss in ("euclidean", "cosine")]
        labels = [[f"{loss}: {ROWS[m][0]}" for m in FIG3] for loss in ("euclidean", "cosine")]
    elif figure == "4":
        grid = [[run_name("linear", loss, seed=seed)] for loss in ("cosine", "euclidean")]
        labels = [[f"{loss}: learnable linear predictor W"] for loss in ("cosine", "euclidean")]
    elif figure == "7":
        grid = [[run_name("isoloss", ema=True, seed=seed), run_name("isoloss", ema=False, seed=seed),
                 run_name("directpred", ema=False, seed=seed)]]
        labels = [["IsoLoss, with the EMA target", "IsoLoss, without (SimSiam-style)", "DirectPred, without"]]
    elif figure == "long":
        grid = [[run_name(m, ema=ema, seed=seed, epochs=FIGURE_EPOCHS[figure])
                 for m, _, ema, _, _ in figure_runs(figure)]]
        labels = [["IsoLoss, with the EMA target", "DirectPred, with", "IsoLoss, without"]]
    elif figure == "euclidean":
        grid = [[run_name(m, "euclidean", False, seed=seed, raw=raw) for m in ("directpred", "isoloss")]
                for raw in (False, True)]
        labels = [[f"{ROWS[m][0]}, {spectrum}" for m in ("directpred", "isoloss")]
                  for spectrum in ("W_P from s / max(s)", "W_P from s itself")]
    elif figure == "ablations":
        grid = [[run_name(m, ema=False, seed=seed) for m in ("no-predictor", "no-stop-grad")]]
        labels = [[ROWS[m][0] + " (without EMA)" for m in ("no-predictor", "no-stop-grad")]]
    else:
        grid = [[run_name(m, wd=wd, seed=seed) for wd in DECAYS] for m in ("directpred", "isoloss")]
        labels = [[f"{ROWS[m][0]}, weight decay {wd:g}" for wd in DECAYS] for m in ("directpred", "isoloss")]
    cols = len(grid[0]) + 1 + (figure == "4")  # Fig. 4: the eigenvector alignment beside the spectrum
    fig, axes = plt.subplots(len(grid), cols, figsize=(4.2 * cols, 3.4 * len(grid)), squeeze=False)
    last = max([results[n]["step"] or 0 for row in grid for n in row if n in results] + [1])
    for i, row in enumerate(grid):
        for j, name in enumerate(row):
            ax, r = axes[i, j], results.get(name)
            ax.set(yscale="log", xlabel="step", ylabel="eigenvalue of C", xlim=(0, last))
            ax.set_title(labels[i][j] + ("" if r else "\n(not run yet)"), fontsize=9)
            if r and r["failed"]:
                ax.text(0.5, 0.5, f"stopped: {fault(r)}", transform=ax.transAxes, ha="center", fontsize=9, color="C3")
            if r and r["spectrum"]:
                steps = np.array([s for s, _ in r["spectrum"]])
                values = np.clip(np.array([v for _, v in r["spectrum"]]), 1e-12, None)
                for k in range(values.shape[1]):
                    ax.plot(steps, values[:, k], color=plt.cm.viridis(k / max(1, values.shape[1] - 1)), lw=0.7)
                ax.text(0.02, 0.02, f"{r['near_top']} within 10x of the largest", transform=ax.transAxes, fontsize=8)
        if figure == "4":
            alignment_panel(axes[i, 1], results.get(row[0]), plt)
        ax = axes[i, -1]
        for j, name in enumerate(row):
            for key, style in (("knn_monitor", "o-"), ("probe_monitor", "s--")):
                if results.get(name) and results[name].get(key):
                    steps, top1 = zip(*results[name][key])
                    ax.plot(steps, top1, style, ms=3, color=f"C{j}",
                            label=labels[i][j] if key == "knn_monitor" else None)
        if ref is not None:  # linear_eval.py's numbers: all 60,000 train images, so not the monitors' bank of 10,000
            for value, style, what in ((ref["knn"]["results"]["k=20"]["top1"], ":", "k-NN"),
                                       (ref["offline_linear"]["top1"], "-.", "linear")):
                ax.axhline(100 * value, color="gray", ls=style, lw=0.8, label=f"random init, linear_eval {what}")
        ax.set(xlabel="step", ylabel="top-1 (%)")
        ax.set_title("k-NN (solid) and linear probe (dashed) monitors\n(test split; 10,000 train images as bank)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    if figure == "long":
        for ax in axes.flat:
            ax.axvline(LONG_MARK, color="gray", ls=":", lw=0.8)
            ax.text(LONG_MARK, 1.0, f" {LONG_MARK:,} steps (the laptop preset)", transform=ax.get_xaxis_transform(),
                    fontsize=7, va="top", color="gray")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def alignment_panel(ax, r: dict | None, plt) -> None:
    """The paper's Fig. 4: cos(u, W u) for the eigenvectors u of C sorted by eigenvalue, one curve per evaluation,
    coloured by step (dark early, yellow late)."""
    ax.set(xlabel="eigenvector of C (largest eigenvalue first)", ylabel="alignment cos(u, W u)", ylim=(-0.1, 1.05))
    ax.set_title("alignment of W's eigenvectors with C's", fontsize=9)
    if r and r.get("alignment"):
        last = r["alignment"][-1][0] or 1
        for step, values in r["alignment"]:
            ax.plot(range(len(values)), values, color=plt.cm.viridis(step / last), lw=0.8)
        ax.axhline(0.9, color="gray", lw=0.5, ls=":")
        ax.text(0.98, 0.02, f"{r['aligned']} above 0.9 at step {last}", transform=ax.transAxes, ha="right", fontsize=8)


def main(args: Args) -> dict:
    import common
    if args.jobs < 1:
        raise SystemExit("error: --jobs must be >= 1")
    out, dataset, jobs = plan(args)
    results_dir = Path(args.results_dir or f"results/{dataset}-{args.scale}")
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_line(args.gpus, 1, args.jobs)
    t0 = time.perf_counter()
    if args.download and not args.draw_only:
        fetch_data((dataset,), args.data_dir)
    if args.cluster.slurm and not args.draw_only:
        SL.submit(jobs, args.cluster, 1, name="paper-figures")
        return {}
    if not args.draw_only:
        # A run that stopped on a fault (a divergence, say) is a result: kept in failed.txt and not run again.
        todo = [j for j in jobs
                if not (j["dir"] / "linear_eval.json").exists() and not (j["dir"] / "failed.txt").exists()]
        print(f"paper figures {', '.join(args.figures)}: {len(jobs)} runs "
              f"({len(jobs) - len(todo)} done or stopped already), on {machine} -> {results_dir}", flush=True)
        execute(todo, slots(args.gpus, 1, args.jobs), keep_going=True)
        for job in todo:
            if job.get("failed"):
                (job["dir"] / "failed.txt").write_text(job["failed"] + "\n")
    found = {r["name"]: r for r in map(collect, jobs) if r is not None}  # the runs on this machine
    # The results folder keeps every run drawn so far: a run found here replaces its record, the others stay, so
    # that drawing a subset, or drawing in a clone without the run directories, loses nothing committed.
    saved = json.loads((results_dir / "figures.json").read_text()) if (results_dir / "figures.json").exists() else {}
    results = {**saved.get("runs", {}), **found}
    started = [j for j in jobs if j["name"] in found]
    init = out / f"random-init-s{args.seed}" / "linear_eval.json"
    ref = random_init(out, dataset, started[0], args) if started and not args.draw_only else None
    if ref is None:
        ref = json.loads(init.read_text()) if init.exists() else saved.get("random_init")
    title = f"{dataset}, {args.scale} scale{f' ({args.train_args})' if args.train_args else ''}; on {machine}"
    drawn = []
    for fig in args.figures:
        names = [run_name(m, loss, ema, wd, args.seed, raw, FIGURE_EPOCHS.get(fig))
                 for m, loss, ema, wd, raw in figure_runs(fig)]
        missing, path = [n for n in names if n not in results], results_dir / figure_file(fig)
        if not any(n in found for n in names):
            print(f"{path.name}: none of its runs is here ({', '.join(names)}); not redrawn")
        elif missing and path.exists():
            print(f"{path.name}: not redrawn, its runs {', '.join(missing)} are missing; "
                  f"`python paper_figures.py --figures {fig}` makes them")
        else:
            draw(fig, results, path, f"{'Fig. ' + fig if fig.isdigit() else FIGURE_TITLES[fig]}: {title}", args.seed,
                 ref)
            drawn.append(path.name)
    header = (f"`python paper_figures.py --figures {' '.join(args.figures)} --scale {args.scale} --dataset {dataset}"
              f"{f' --seed {args.seed}' if args.seed else ''}"
              f"{f' --results-dir {args.results_dir}' if args.results_dir else ''}"
              f"{f' --train-args {shlex.quote(args.train_args)}' if args.train_args else ''}`, on {machine}, "
              f"{time.strftime('%Y-%m-%d')}"
              + (f" (it updated {len(found)} of the {len(results)} runs below; each run's machine and commit, where "
                 "recorded, are in figures.json)" if len(found) < len(results) else "")
              + "; k-NN (cosine, k = 20) and linear top-1 from linear_eval.py on the test split.")
    if found:  # nothing new: the table and its numbers stay as they are, byte for byte
        common.atomic_write_text(results_dir / "figures.md", table(results, ref, header) + "\n")
        common.atomic_write_text(results_dir / "figures.json", json.dumps(dict(
            runs=results, random_init=ref, machine=machine, dataset=dataset, scale=args.scale,
            train_args=args.train_args, minutes=(time.perf_counter() - t0) / 60), indent=1) + "\n")
        print(table(results, ref, header))
    print(f"wrote {', '.join(drawn + (['figures.md', 'figures.json'] if found else [])) or 'nothing'} in {results_dir}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
