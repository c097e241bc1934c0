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
    run = "runs/fashionmnist-laptop/cosine-isoloss-noema-wd0.0001-s1"
    assert iso["cmds"][0] == ["train_simsiam.py", "laptop", "--predictor", "directpred", "--isoloss",
                              "--loss", "cosine", "--weight-decay", "0.0001", "--dataset", "fashionmnist",
                              "--data-dir", "data", "--out-dir", run, "--log-every", "1000", "--seed", "1"]
    assert iso["cmds"][1][:3] == ["linear_eval.py", "--checkpoint", f"{run}/backbone.pt"]
    assert {j["cmds"][0][1] for j in G.plan(G.Args(dataset=("cifar10",)))} == {"byol", "simsiam"}  # the paper's presets


# The release's weight decay, written out here from its files (METHOD.md section 6), not from grid.py:
# run_experiments.sh (Table 1) passes optimizer.weight_decay=1e-4 to every closed-form row, with and without EMA,
# and nothing to byol.yaml / byol-noema.yaml (1e-5); the figures keep the yamls' 1e-5, Fig. 8 at 4e-4 / 1e-5 / 1e-6.
RELEASE_TABLE1_WD = {("mlp", "ema"): 1e-5, ("mlp", "no-ema"): 1e-5, ("no-predictor", "no-ema"): 1e-5,
                     ("no-stop-grad", "no-ema"): 1e-5,
                     **{(row, t): 1e-4 for row in ("directpred", "directcopy", "isoloss", "isoloss-directcopy")
                        for t in ("ema", "no-ema")}}


@pytest.mark.parametrize("dataset", ["cifar10", "fashionmnist"])
def test_every_run_has_the_release_weight_decay_and_shares_a_directory_only_when_it_is_the_same_run(dataset):
    scale = "paper" if dataset == "cifar10" else "laptop"
    table1 = {j["dir"].name: j for j in G.plan(G.Args(dataset=(dataset,)))}
    assert {(j["row"], j["target"]): float(j["cmds"][0][j["cmds"][0].index("--weight-decay") + 1])
            for j in table1.values()} == RELEASE_TABLE1_WD
    figures = []
    for fig in ("3", "7", "8", "ablations", "euclidean"):
        _, _, jobs = P.plan(P.Args(figures=(fig,), scale=scale, dataset=dataset))
        decays = [float(j["cmds"][0][j["cmds"][0].index("--weight-decay") + 1]) for j in jobs]
        assert decays == ([4e-4, 1e-5, 1e-6] * 2 if fig == "8" else [1e-5] * len(jobs))
        for job, wd in zip(jobs, decays):
            assert (f"-wd{wd:g}-" in job["name"]) == (wd != 1e-5)
            if job["name"] in table1:  # the same directory: the same command, so the same run
                assert job["cmds"] == table1[job["name"]]["cmds"]
        figures += jobs
    shared = {j["name"] for j in figures} & set(table1)
    assert shared == {"cosine-mlp-ema-s0", "cosine-no-predictor-noema-s0", "cosine-no-stop-grad-noema-s0"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data") / "cifar", n_train_per_class=4, n_test_per_class=2)


@pytest.mark.parametrize("name", [j["dir"].name for j in G.plan(G.Args(dataset=("cifar10",)))])
def test_each_training_command_of_the_grid_takes_a_step(tmp_path, cifar, name):
    """The grid's own command line, parsed by its script as a user's would be, made tiny, one step."""
    job = next(j for j in G.plan(G.Args(dataset=("cifar10",))) if j["dir"].name == name)
    script, *argv = job["cmds"][0]
    module = B if script == "train_byol.py" else S
    args = dataclasses.replace(module.parse(argv), data_dir=str(cifar), out_dir=str(tmp_path / "run"), width=0.0625,
                               proj_hidden=32, proj_dim=16, pred_hidden=32, batch_size=8, num_workers=0, log_every=1,
                               warmup_epochs=0, epochs=1, steps_per_epoch=1, knn_k=5)
    learner = module.train(args)
    (rec,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec["step"] == 1 and rec["loss"] == rec["loss"]
    kinds = {"mlp": "MLPPredictor", "no-stop-grad": "MLPPredictor", "no-predictor": "Identity"}
    assert type(learner.predictor).__name__ == kinds.get(job["row"], "ClosedFormPredictor")
    assert learner.args.isoloss == job["row"].startswith("isoloss")
    # train_byol.py has no such switch
    assert getattr(learner.args, "stop_grad", True) == (job["row"] != "no-stop-grad")


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
    assert G.launch(["train_byol.py", "byol"], 2)[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                                            "--nproc_per_node=2"]
    assert G.launch(["linear_eval.py"], 2)[1:] == ["linear_eval.py"]


def test_the_dry_run_prints_every_run_its_commands_and_the_time_it_will_take(capsys):
    G.main(G.Args(dataset=("cifar10",), dry_run=True, time_steps=1,
                  train_args="--width 0.0625 --proj-hidden 32 --pred-hidden 32 --proj-dim 16"))
    out = capsys.readouterr().out
    assert out.startswith("grid: 12 runs (0 done)")
    assert out.count("python train_byol.py byol") == 5 and out.count("python train_simsiam.py simsiam") == 7
    assert out.count("python linear_eval.py") == 12 and out.count("195000 steps") == 12  # 50,000 // 256 x 1,000 epochs
    assert "on one H200" in out and "cifar10 " in out.splitlines()[-1] and "here (not timed)" not in out
    # Table 1's weight decay in the commands; on a GPU every run draws its views there, and each line says what
    # bounds it.
    assert out.count("--weight-decay 0.0001") == 8 and out.count("--weight-decay 1e-05") == 4
    assert out.count("(device views; bound by steps)") == 12 and out.count("(loader views; bound by ") == 12  # CPU here


def test_the_view_path_and_the_loader_follow_the_device_and_the_cores_a_run_is_given(monkeypatch, tmp_path):
    import common
    import data as D
    for dataset in ("cifar10", "cifar100", "stl10", "tinyimagenet", "fashionmnist", "digits"):
        assert (D.views_on("auto", dataset, True), D.views_on("auto", dataset, False)) == ("device", "loader")
    assert D.views_on("auto", "imagefolder", True) == "loader" and D.views_on("loader", "cifar10", True) == "loader"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert common.loader_workers() == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks share the eight cores
    assert common.loader_workers() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert G.slot_cores(4) == [list(range(i, i + 8)) for i in range(0, 32, 8)] and G.slot_cores(64) == [[]] * 64
    # A child of the pool runs on its share of the cores only.
    monkeypatch.undo()
    cores = sorted(os.sched_getaffinity(0))[:1]
    job = dict(dir=tmp_path / "run", cmds=[["-c", "import os; print(sorted(os.sched_getaffinity(0)))"]])
    monkeypatch.setattr(G, "slot_cores", lambda n: [cores] * n)
    G.execute([job], [{}])
    assert (tmp_path / "run" / "log.txt").read_text().strip() == str(cores)


def test_download_is_the_data_step_before_any_run(monkeypatch, tmp_path, capsys):
    import data as D
    fetched = []
    monkeypatch.setattr(D, "fetch", lambda name, root: fetched.append((name, root)))
    monkeypatch.setattr(G, "execute", lambda *a, **k: fetched.append("runs"))
    with pytest.raises(SystemExit, match="no run of the grid has finished"):  # the data step came first
        G.main(G.Args(dataset=("cifar10", "cifar100"), download=True, data_dir=str(tmp_path), runs_dir=str(tmp_path)))
    assert fetched == [("cifar10", str(tmp_path)), ("cifar100", str(tmp_path)), "runs"]
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"tinyimagenet not found.*curl -LO"):
        G.fetch_data(("tinyimagenet",), str(tmp_path))


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
    # linear_eval.py reads last.pt as it reads backbone.pt: the same backbone, the same numbers, when computed
    # like with like: at the thread count of the grid's run (floating-point sums change with the thread count).
    import torch
    import linear_eval as L
    iso_ema = runs / G.run_name("isoloss", wd=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(G.slots("", 1, G.Args().jobs)[0]["OMP_NUM_THREADS"]))
    try:
        from_last = L.main(L.Args(checkpoint=str(iso_ema / "last.pt"), data_dir=str(data), num_workers=0,
                                  out_dir=str(tmp_path / "from_last")))
    finally:
        torch.set_num_threads(threads)
    from_backbone = json.loads((iso_ema / "linear_eval.json").read_text())
    assert from_last["backbone"]["sha256"] == from_backbone["backbone"]["sha256"]
    assert from_last["offline_linear"] == from_backbone["offline_linear"] and from_last["knn"] == from_backbone["knn"]
    # --collect trains nothing: a run without a finished directory here (made on another machine, say) keeps its
    # record from the results folder's grid.json; without such a record it is listed and left out.
    (runs / G.run_name("mlp", ema=False)).rename(tmp_path / "elsewhere")
    unfinished = G.run_name("isoloss", ema=False, wd=1e-4)
    (runs / unfinished / "linear_eval.json").unlink()
    for results_dir, expect in ((tmp_path / "results", 4), (tmp_path / "fresh", 2)):
        collected = G.main(G.Args(dataset=("cifar10",), data_dir=str(data), epochs=1, train_args=TINY, rows=ROWS,
                                  runs_dir=str(tmp_path / "runs"), results_dir=str(results_dir), collect=True))
        assert len(collected) == expect and not (runs / unfinished / "linear_eval.json").exists()  # nothing ran
    kept = [r for r in G.main(G.Args(dataset=("cifar10",), data_dir=str(data), epochs=1, train_args=TINY, rows=ROWS,
                                     runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
                                     collect=True)) if r.get("kept_from")]
    assert sorted(r["run"] for r in kept) == sorted([G.run_name("mlp", ema=False), unfinished])
    assert all(r["knn"] == next(x["knn"] for x in results if x["run"] == r["run"]) for r in kept)
    assert f"`{kept[0]['run']}` (kept from the table of" in (tmp_path / "results" / "grid.md").read_text()
    # The figure command draws Fig. 3 from these runs, training nothing: BYOL's run is Table 1's and Fig. 3's alike
    # (weight decay 1e-5 in both); the closed-form runs are not (Table 1's are at 1e-4), and their panels say so.
    figs = P.main(P.Args(figures=("3",), scale="paper", dataset="cifar10", runs_dir=str(tmp_path / "runs"),
                         results_dir=str(tmp_path / "results"), draw_only=True))
    assert set(figs) == {"cosine-mlp-ema-s0"}
    assert (tmp_path / "results" / "fig3.png").stat().st_size > 10_000
    assert all(r["step"] == 2 and 1 <= r["near_top"] <= 16 and len(r["spectrum"][0][1]) == 16 for r in figs.values())
    assert "random init" in (tmp_path / "results" / "figures.md").read_text()
