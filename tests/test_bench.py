"""bench.py keeps running as the code it measures changes (its numbers are not asserted: speed
is measured by running it, never by a timed test)."""

import json

import bench


def test_bench_sections_run_and_write_their_numbers(tmp_path):
    results = bench.main(bench.Args(sections=("predictor", "data"), repeats=1, out_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["predictor"]["ours_ms"] > 0 and saved["data"]["workers_for_gpu"] >= 1
    assert set(results) >= {"predictor", "data", "machine"}


def test_every_section_has_its_measurement():
    # main() looks the sections up by name: a section without its function fails only at its turn.
    sections = bench.Args.__dataclass_fields__["sections"].default
    assert set(sections) == set(bench.Section.__args__)
    assert all(callable(getattr(bench, f"bench_{name}", None)) for name in sections)
