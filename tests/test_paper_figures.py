"""paper_figures.py: which runs each figure needs, with which command; a run that diverges is a result,
reported and not run again. (Drawing from tiny runs: tests/test_grid.py, on the grid's runs.)"""

from pathlib import Path

import paper_figures as P
from tiny_data import write_fashionmnist

TINY = ("--width 0.0625 --proj-hidden 32 --pred-hidden 32 --proj-dim 16 --batch-size 8 --epochs 2 --steps-per-epoch 2 "
        "--warmup-epochs 0 --eval-every 1 --knn-k 5")


def test_each_figure_plans_the_papers_runs_with_the_method_and_nothing_else_changed():
    out, dataset, jobs = P.plan(P.Args(figures=("3", "7", "8")))
    assert dataset == "fashionmnist" and out.name == "fashionmnist-laptop"
    by_name = {j["name"]: j for j in jobs}
    assert len(jobs) == 6 + 2 + 4  # Fig. 3's six, Fig. 7's two runs without EMA, Fig. 8's four other decays
    train = by_name["euclidean-isoloss-ema-s0"]["cmds"][0]
    assert train[:2] == ["train_byol.py", "laptop"] and train[train.index("--loss") + 1] == "euclidean"
    assert "--isoloss" in train and train[train.index("--predictor") + 1] == "directpred"
    assert by_name["cosine-isoloss-noema-s0"]["cmds"][0][0] == "train_simsiam.py"
    decayed = by_name["cosine-directpred-ema-wd0.0004-s0"]["cmds"][0]
    assert decayed[decayed.index("--weight-decay") + 1] == "0.0004"
    assert all(j["cmds"][1][0] == "linear_eval.py" for j in jobs)
    # Euclidean without EMA: both spectra; the toy theory's is the same command with --no-normalize-spectrum.
    _, _, jobs = P.plan(P.Args(figures=("euclidean",)))
    raw = {j["name"]: j["cmds"][0] for j in jobs if j["raw"]}
    assert len(jobs) == 4 and set(raw) == {"euclidean-directpred-noema-raw-s0", "euclidean-isoloss-noema-raw-s0"}
    plain = next(j["cmds"][0] for j in jobs if j["name"] == "euclidean-isoloss-noema-s0")
    assert [a for a in raw["euclidean-isoloss-noema-raw-s0"] if a != "--no-normalize-spectrum"] == \
        [a.replace("noema-s0", "noema-raw-s0") for a in plain]
    _, dataset, jobs = P.plan(P.Args(figures=("3",), scale="paper"))
    assert dataset == "cifar10" and {j["cmds"][0][1] for j in jobs} == {"byol"}


def test_a_run_that_diverges_is_reported_and_not_run_again(tmp_path):
    data = write_fashionmnist(tmp_path / "fmnist", n_train_per_class=4, n_test_per_class=2)
    args = P.Args(figures=("ablations",), data_dir=str(data), runs_dir=str(tmp_path / "runs"),
                  results_dir=str(tmp_path / "figs"), train_args=TINY + " --lr 1e30")
    runs = tmp_path / "runs" / "fashionmnist-laptop"
    results = P.main(args)
    for name in ("cosine-no-predictor-noema-s0", "cosine-no-stop-grad-noema-s0"):
        assert "NaN or Inf" in (runs / name / "failed.txt").read_text()
        # It stopped within its first epoch: no spectrum to draw, but the fault is its result.
        assert (results[name]["step"] is None and "NaN or Inf" in results[name]["failed"]
                and not results[name]["spectrum"])
        assert f"| `{name}` (stopped: " in (tmp_path / "figs" / "figures.md").read_text()
    assert "ablations.png" in [p.name for p in (tmp_path / "figs").iterdir()]
    log = (runs / "cosine-no-predictor-noema-s0" / "log.txt").read_text()
    P.main(args)  # nothing runs again: the log is as it was
    assert (runs / "cosine-no-predictor-noema-s0" / "log.txt").read_text() == log


def test_the_table_says_where_a_run_stopped():
    row = dict(name="euclidean-mlp-ema", step=200, knn=None, linear=None, std=0.09, mean_share_z=None, near_top=2,
               collapse_warning=False, wall_time_s=60.0,
               failed="error: NaN or Inf in the weights after step 300, not saved. The run stopped")
    text = P.table({"euclidean-mlp-ema": row}, None, "header")
    assert "`euclidean-mlp-ema` (stopped: NaN or Inf by step 300) | 200 | - | - |" in text


def test_drawing_never_loses_committed_results(tmp_path, capsys):
    """A results folder as committed: a draw in a clone without the runs changes nothing; a draw of one figure
    with one run present updates that run's record and that figure only, and keeps every other record."""
    import json
    import shutil
    committed = Path(__file__).resolve().parent.parent / "results" / "fashionmnist-laptop"
    results = tmp_path / "results"
    results.mkdir()
    for name in ("figures.json", "figures.md", "fig3.png", "fig8.png"):
        shutil.copy(committed / name, results / name)
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    args = dict(runs_dir=str(tmp_path / "runs"), results_dir=str(results), draw_only=True)
    P.main(P.Args(figures=("3", "7", "8", "ablations", "euclidean"), **args))
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before  # nothing is here: nothing is redrawn
    assert "fig7.png: none of its runs is here" in capsys.readouterr().out
    # One of Fig. 8's runs made here: its metrics as a run writes them, from its committed record.
    saved = json.loads(before["figures.json"])
    name = "cosine-isoloss-ema-wd1e-06-s0"
    record, run = saved["runs"][name], tmp_path / "runs" / "fashionmnist-laptop" / name
    run.mkdir(parents=True)
    knn = dict(record["knn_monitor"])
    lines = [dict(step=step, epoch=i + 1, eigenvalues=[v / 2 for v in values], std_normalized_z=record["std"],
                  collapse_warning=False, wall_time_s=1.0, mean_share_z=0.5, knn_top1=knn.get(step))
             for i, (step, values) in enumerate(record["spectrum"])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    P.main(P.Args(figures=("8",), **args))
    after = json.loads((results / "figures.json").read_text())
    assert set(after["runs"]) == set(saved["runs"]) and after["random_init"] == saved["random_init"]
    assert after["runs"][name]["mean_share_z"] == 0.5 and after["runs"][name]["knn"] is None  # not evaluated here
    assert all(after["runs"][n] == r for n, r in saved["runs"].items() if n != name)
    assert (results / "fig8.png").read_bytes() != before["fig8.png"]
    assert (results / "fig3.png").read_bytes() == before["fig3.png"]
    table = (results / "figures.md").read_text()
    assert f"`{name}`" in table and "`cosine-mlp-ema-s0`" in table


def test_fig4_is_drawn_from_two_tiny_runs_of_the_learnable_linear_predictor(tmp_path, no_onednn):
    import train_byol as B
    data = write_fashionmnist(tmp_path / "fmnist", n_train_per_class=4, n_test_per_class=2)
    args = P.Args(figures=("4",), data_dir=str(data), runs_dir=str(tmp_path / "runs"),
                  results_dir=str(tmp_path / "figs"), train_args=TINY + " --num-workers 0")
    _, _, jobs = P.plan(args)
    assert [j["name"] for j in jobs] == ["cosine-linear-ema-s0", "euclidean-linear-ema-s0"]
    for job in jobs:  # the figure's own commands, in this process
        assert job["cmds"][0][:4] == ["train_byol.py", "laptop", "--predictor", "linear"]
        B.main(job["cmds"][0][1:])
    results = P.main(P.Args(**{**vars(args), "draw_only": True}))
    for r in results.values():
        assert [s for s, _ in r["alignment"]] == [2, 4] and all(len(a) == 16 for _, a in r["alignment"])
        assert r["aligned"] == sum(c > 0.9 for c in r["alignment"][-1][1]) and len(r["aligned_by_step"]) == 2
    assert (tmp_path / "figs" / "fig4.png").stat().st_size > 10_000
    assert "`euclidean-linear-ema-s0`: " in (tmp_path / "figs" / "figures.md").read_text()
