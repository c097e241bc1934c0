"""laptop_grid.py: which runs the grid makes (the preset with only the method changed), and the table
and figure it writes from their numbers (the grid itself runs for most of an hour: its numbers are in
the README, with the command)."""

import json

import laptop_grid as G


def test_the_grid_is_every_method_with_and_without_ema_and_the_ablations_without():
    jobs = G.runs(G.Args(out_dir="out"))
    assert len(jobs) == (5 * 2 + 2) * 3
    rows = {(j["method"], j["target"]) for j in jobs}
    assert ("no-predictor", "ema") not in rows and ("no-stop-grad", "no-ema") in rows and ("isoloss", "ema") in rows
    iso = next(j for j in jobs if (j["method"], j["target"], j["seed"]) == ("isoloss", "no-ema", 1))
    assert iso["cmd"][1:3] == ["train_simsiam.py", "cpu-demo"]  # the laptop preset, nothing else changed
    assert iso["cmd"][3:] == ["--predictor", "directpred", "--isoloss", "--seed", "1", "--out-dir", "out/no-ema-isoloss-s1",
                              "--log-every", "1000"]
    assert next(j for j in jobs if j["target"] == "ema")["cmd"][1] == "train_byol.py"


def test_table_and_figure_from_the_numbers_of_the_runs(tmp_path):
    args = G.Args(out_dir=str(tmp_path), seeds=(0, 1), methods=("isoloss", "no-predictor"))
    results = [dict(method=m, target=t, seed=s, knn=80.0 + s, linear=90.0, erank_z=20.0, erank_f=60.0, std=0.02,
                    healthy_std=0.125, seconds=100.0, knn_by_epoch=[[2, 70.0 + s], [4, 75.0 + s]], mean_share_z=0.9,
                    collapse_warning=True)
               for m, t in (("isoloss", "ema"), ("isoloss", "no-ema"), ("no-predictor", "no-ema")) for s in (0, 1)]
    refs = {s: dict(knn=dict(results={"k=20": dict(top1=0.9)}), offline_linear=dict(top1=0.95)) for s in (0, 1)}
    refs["pixels"] = dict(knn=dict(results={"k=20": dict(top1=0.97)}), offline_linear=dict(top1=0.96))
    text = G.table(results, refs, args, minutes=12.0)
    lines = text.splitlines()
    assert "2 seed(s) per row" in lines[0] and "12 min" in lines[0] and "cores" in lines[0]
    assert "| IsoLoss (DirectPred spectrum) | with | 80.5 ± 0.71 | 90 ± 0 |" in text
    assert "| ablation: no predictor | without |" in text and "| ablation: no predictor | with |" not in text
    assert "| random init (same backbone) | - | 90 ± 0 | 95 ± 0 |" in text and "| raw pixels | - | 97 | 96 |" in text
    G.figure(results, refs, args, tmp_path / "knn.png")
    assert (tmp_path / "knn.png").stat().st_size > 10_000
    json.dumps(results)  # grid.json holds them as they are
