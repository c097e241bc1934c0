"""bench.py keeps running as the code it measures changes (its numbers are not asserted: speed
is measured by running it, never by a timed test)."""

import json

import bench


def test_bench_sections_run_and_write_their_numbers(tmp_path):
    results = bench.main(bench.Args(sections=("predictor", "data"), repeats=1, out_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["predictor"]["ours_ms"] > 0 and saved["data"]["workers_for_gpu"] >= 1
    assert set(results) >= {"predictor", "data", "machine"}
