"""grid.py: which runs the grid makes (a preset with only the method changed, the same command and
directory as paper_figures.py's), that each of its 12 training commands takes a step, what it says
before it spends time, and a paper-scale grid on tiny CIFAR-10 files, killed part-way and resumed,
down to the table and the figures."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import grid as G
import paper_figures as P
import train_byol as B
import train_simsiam as S
from tiny_data import write_cifar10

REPO = Path(__file__).resolve().parent.parent
TINY = ("--width 0.0625 --proj-hidden 32 --pred-hidden 32 --proj-dim 16 --batch-size 8 --steps-per-epoch 2 "
        "--warmup-epochs 0 --eval-every 1 --knn-k 5")


def test_the_grid_is_every_row_with_and_without_ema_and_the_ablations_without():
    jobs = G.plan(G.Args(seeds=(0, 1)))
    assert len(jobs) == (5 * 2 + 2) * 2
    rows = {(j["row"], j["target"]) for j in jobs}
    assert ("no-predictor", "ema") not in rows and ("no-stop-grad", "no-ema") in rows and ("isoloss", "ema") in rows
    iso = next(j for j in jobs if (j["row"], j["target"], j["seed"]) == ("isoloss", "no-ema", 1))
    assert iso["cmds"][0] == ["train_simsiam.py", "laptop", "--predictor", "directpred", "--isoloss", "--loss", "cosine",
                              "--weight-decay", "1e-05", "--dataset", "fashionmnist", "--data-dir", "data", "--out-dir",
                              "runs/fashionmnist-laptop/cosine-isoloss-noema-s1", "--log-every", "1000", "--seed", "1"]
    assert iso["cmds"][1][:3] == ["linear_eval.py", "--checkpoint", "runs/fashionmnist-laptop/cosine-isoloss-noema-s1/backbone.pt"]
    # Table 1: the paper's presets; and a run that a figure also needs is the same run, in the same place.
    table1 = {j["dir"].name: j for j in G.plan(G.Args(dataset=("cifar10",)))}
    assert {j["cmds"][0][1] for j in table1.values()} == {"byol", "simsiam"}
    _, _, fig7 = P.plan(P.Args(figures=("7",), scale="paper", dataset="cifar10"))
    for job in fig7:
        assert job["cmds"] == table1[job["name"]]["cmds"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data") / "cifar", n_train_per_class=4, n_test_per_class=2)


@pytest.mark.parametrize("name", [j["dir"].name for j in G.plan(G.Args(dataset=("cifar10",)))])
def test_each_training_command_of_the_grid_takes_a_step(tmp_path, cifar, name):
    """The grid's own command line, parsed by its script as a user's would be, made tiny, one step."""
    job = next(j for j in G.plan(G.Args(dataset=("cifar10",))) if j["dir"].name == name)
    script, *argv = job["cmds"][0]
    module = B if script == "train_byol.py" else S
    args = dataclasses.replace(module.parse(argv), data_dir=str(cifar), out_dir=str(tmp_path / "run"), width=0.0625, proj_hidden=32,
                               proj_dim=16, pred_hidden=32, batch_size=8, num_workers=0, log_every=1, warmup_epochs=0, epochs=1,
                               steps_per_epoch=1, knn_k=5)
    learner = module.train(args)
    (rec,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec["step"] == 1 and rec["loss"] == rec["loss"]
    kinds = {"mlp": "MLPPredictor", "no-stop-grad": "MLPPredictor", "no-predictor": "Identity"}
    assert type(learner.predictor).__name__ == kinds.get(job["row"], "ClosedFormPredictor")
    assert learner.args.isoloss == job["row"].startswith("isoloss")
    assert getattr(learner.args, "stop_grad", True) == (job["row"] != "no-stop-grad")  # train_byol.py has no such switch


def test_mixed_scales_and_too_few_gpus_are_one_line():
    for args, expect in ((G.Args(dataset=("cifar10", "fashionmnist")), "mixes laptop data sets"),
                         (G.Args(gpus="0,1", gpus_per_run=4), "--gpus-per-run 4 needs at least 4 GPUs")):
        try:
            G.main(args)
        except SystemExit as e:
            assert expect in str(e)
        else:
            raise AssertionError(expect)
    assert G.slots("0,1,2,3", 2, 1) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert G.launch(["train_byol.py", "byol"], 2)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert G.launch(["linear_eval.py"], 2)[1:] == ["linear_eval.py"]


def test_the_dry_run_prints_every_run_its_commands_and_the_time_it_will_take(capsys):
    G.main(G.Args(dataset=("cifar10",), dry_run=True, time_steps=1,
                  train_args="--width 0.0625 --proj-hidden 32 --pred-hidden 32 --proj-dim 16"))
    out = capsys.readouterr().out
    assert out.startswith("grid: 12 runs (0 done)")
    assert out.count("python train_byol.py byol") == 5 and out.count("python train_simsiam.py simsiam") == 7
    assert out.count("python linear_eval.py") == 12 and out.count("195000 steps") == 12  # 50,000 // 256 x 1,000 epochs
    assert "on one H200" in out and "cifar10 " in out.splitlines()[-1] and "here (not timed)" not in out


ROWS = ("mlp", "isoloss")  # with and without EMA: 4 runs, enough to kill part-way, and the published numbers' row


def test_the_paper_grid_on_tiny_data_killed_part_way_then_resumed(tmp_path):
    data = write_cifar10(tmp_path / "cifar")
    argv = ["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1", f"--train-args={TINY}", "--rows", *ROWS,
            "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    grid = subprocess.Popen([sys.executable, "grid.py", *argv], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "runs" / "cifar10-paper"
    deadline = time.time() + 120
    while not list(runs.glob("*/linear_eval.json")) and time.time() < deadline and grid.poll() is None:
        time.sleep(0.2)
    os.killpg(grid.pid, signal.SIGKILL)  # the grid and every run it started, at once
    grid.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/linear_eval.json")}
    assert finished and len(finished) < 4 and not (tmp_path / "results").exists()

    results = G.main(G.Args(dataset=("cifar10",), data_dir=str(data), epochs=1, train_args=TINY, rows=ROWS,
                            runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results")))
    assert len(results) == 4 and all(r["step"] == 2 for r in results)
    assert {n: (runs / n / "linear_eval.json").stat().st_mtime_ns for n in finished} == finished  # not run again
    text = (tmp_path / "results" / "grid.md").read_text()
    saved = json.loads((tmp_path / "results" / "grid.json").read_text())
    assert len(saved["runs"]) == 4 and saved["provenance"]["git_commit"] and saved["random_init"][0]["knn"] >= 0
    for row in ROWS:
        assert f"| {G.ROWS[row][0]} |" in text
    iso = next(r for r in saved["runs"] if (r["row"], r["target"]) == ("isoloss", "ema"))
    assert f"| IsoLoss (DirectPred spectrum) | {iso['online']:.1f} | {iso['linear']:.1f} | {iso['knn']:.1f} |" in text
    assert "| 92.6 / 90.5 |" in text and "solo-learn" in text  # the published BYOL / SimSiam numbers, with their source
    assert "| random init (same backbone) | - |" in text
    assert (tmp_path / "results" / "knn.png").stat().st_size > 10_000
    # linear_eval.py reads last.pt as it reads backbone.pt: the same backbone, the same numbers.
    import linear_eval as L
    from_last = L.main(L.Args(checkpoint=str(runs / "cosine-isoloss-ema-s0" / "last.pt"), data_dir=str(data), num_workers=0,
                              out_dir=str(tmp_path / "from_last")))
    from_backbone = json.loads((runs / "cosine-isoloss-ema-s0" / "linear_eval.json").read_text())
    assert from_last["backbone"]["sha256"] == from_backbone["backbone"]["sha256"]
    assert from_last["offline_linear"] == from_backbone["offline_linear"] and from_last["knn"] == from_backbone["knn"]
    # The figure command draws Figs. 3 and 7 from these runs (they are its runs too), training nothing; the
    # runs it needs that the grid did not make (Euclidean, DirectPred) are left out, and their panels say so.
    figs = P.main(P.Args(figures=("3", "7"), scale="paper", dataset="cifar10", runs_dir=str(tmp_path / "runs"),
                         results_dir=str(tmp_path / "results"), draw_only=True))
    assert set(figs) == {f"cosine-{m}-s0" for m in ("isoloss-ema", "isoloss-noema", "mlp-ema")}
    assert (tmp_path / "results" / "fig3.png").stat().st_size > 10_000
    assert all(r["step"] == 2 and 1 <= r["near_top"] <= 16 and len(r["spectrum"][0][1]) == 16 for r in figs.values())
    assert (tmp_path / "results" / "fig7.png").stat().st_size > 10_000 and "random init" in (tmp_path / "results" / "figures.md").read_text()
