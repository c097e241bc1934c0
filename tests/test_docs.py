"""METHOD.md is what the code claims to implement: every reference to one of its sections exists, and
every function or class it names as the place of an equation exists in the code."""

import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHOD = (REPO / "METHOD.md").read_text()
SOURCES = {p: (REPO / p).read_text() for p in subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=REPO,
                                                             capture_output=True, text=True).stdout.split()}
SOURCES.update({p.name: p.read_text() for p in REPO.glob("*.py")})  # files not committed yet count too


def test_every_reference_to_a_section_of_METHOD_md_exists():
    sections = set(re.findall(r"^## (\d+)\.", METHOD, re.M))
    assert sections == {str(n) for n in range(1, 8)}
    cited = {(path, n) for path, text in SOURCES.items()
             for m in re.finditer(r"METHOD\.md (?:sections? )?(\d+(?:(?:-| and |, )\d+)*)", text)
             for n in re.findall(r"\d+", m.group(1))}
    assert cited, "nothing cites METHOD.md"
    assert not [(path, n) for path, n in cited if n not in sections]


def test_every_function_METHOD_md_names_exists():
    names = {n for n in re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", METHOD)
             if re.search(r"[A-Z_.]", n) and not re.search(r"\.(py|yaml|md|sh)$", n)}  # file names are not code names
    release_or_torch = {"validation_step", "torch.linalg.eigh", "torch.manual_seed", "run_ids", "dp_normalize"}
    code = "\n".join(text for path, text in SOURCES.items() if path.endswith(".py"))
    missing = [n for n in sorted(names - release_or_torch)
               if not re.search(rf"^\s*(def|class) {re.escape(n.split('.')[-1])}\b|^{re.escape(n.split('.')[-1])} = ",
                                code, re.M)]
    assert len(names) > 15 and not missing, missing


LAPTOP = REPO / "results" / "fashionmnist-laptop"


def block(name: str, page: Path = REPO / "README.md") -> str:
    """A page's text between <!-- NAME --> and <!-- /NAME --> (the README, or a result set's README.md)."""
    return page.read_text().split(f"<!-- {name} -->\n", 1)[1].split(f"<!-- /{name} -->", 1)[0]


def numbers(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text))


def formatted(value, places=(1, 2, 3)) -> set[str]:
    """Every way the README may print the numbers in a JSON value."""
    if isinstance(value, dict):
        return set().union(*map(formatted, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(formatted, value)) if value else set()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {f"{value:.{k}f}" for k in places}
    return set()


def laptop_numbers() -> set[str]:
    """Every way a page may print a number of the laptop set's grid.json, seeds/grid.json or figures.json (each
    run's numbers, and C's largest eigenvalue at its end), or of the second seed's random init."""
    results = LAPTOP
    grid, seeds, figures = (json.loads((results / name).read_text())
                            for name in ("grid.json", "seeds/grid.json", "figures.json"))
    known = set()
    for g in (grid, seeds):
        known |= (formatted([{k: v for k, v in r.items() if k != "provenance"} for r in g["runs"]])
                  | formatted(g["random_init"]))
    second = json.loads((results / "euclidean-s1" / "figures.json").read_text())
    init = second["random_init"]
    known |= formatted(100 * init["knn"]["results"]["k=20"]["top1"]) | formatted(100 * init["offline_linear"]["top1"])
    # each run's numbers, and C's largest eigenvalue at its end
    for r in [*figures["runs"].values(), *second["runs"].values()]:
        known |= formatted({k: v for k, v in r.items() if k not in ("spectrum", "near_top_by_step", "provenance")})
        known |= formatted(max(r["spectrum"][-1][1])) if r["spectrum"] else set()
    return known


def test_the_laptop_results_page_is_the_committed_files():
    """results/fashionmnist-laptop/README.md: its tables are grid.md and figures.md as the commands wrote them,
    every number its claims quote is in the set's JSON, and it shows every figure of the set."""
    page = LAPTOP / "README.md"
    for name, table in (("laptop-grid-table", "grid.md"), ("fashionmnist-table", "figures.md"),
                        ("seeds-table", "seeds/grid.md")):
        written = (LAPTOP / table).read_text()
        assert len([line for line in written.splitlines() if line.startswith("|")]) > 10
        assert block(name, page).strip() == written.strip(), f"{page}'s {name} is not {LAPTOP / table}"
    quoted = numbers(block("laptop-claims", page))
    assert len(quoted) > 20 and not sorted(quoted - laptop_numbers())
    for figure in ("knn.png", "fig3.png", "fig4.png", "fig7.png", "fig8.png", "ablations.png", "euclidean.png"):
        assert (LAPTOP / figure).is_file() and f"]({figure})" in page.read_text(), figure


def test_the_readme_quotes_only_committed_numbers_once_each():
    """The README's laptop table is the head of grid.md; its findings quote only numbers of the set's JSON; and
    no number stands twice in the README's results (a number belongs to one place)."""
    table = block("readme-grid-table")
    assert table.count("\n|") >= 8 and table.strip() in (LAPTOP / "grid.md").read_text()
    findings = block("readme-findings")
    assert numbers(findings) and not sorted(numbers(findings) - laptop_numbers())
    assert not numbers(findings) & numbers(table)
    runs = json.loads((LAPTOP / "figures.json").read_text())["runs"]  # the counts of eigenvalues it quotes
    top = {name: runs[name]["near_top"] for name in ("cosine-isoloss-ema-s0", "cosine-directpred-ema-s0",
                                                      "euclidean-isoloss-noema-raw-s0")}
    assert (f"{top['cosine-isoloss-ema-s0']} of C's 64 eigenvalues" in findings
            and f"against {top['cosine-directpred-ema-s0']} for DirectPred" in findings
            and f"holds {top['euclidean-isoloss-noema-raw-s0']} eigenvalues" in " ".join(findings.split()))
    for page in ("results/fashionmnist-laptop/README.md", "results/toy_linear/README.md", "results/bench/README.md",
                 "results/gpu/README.md"):
        assert f"]({page})" in (REPO / "README.md").read_text() and (REPO / page).is_file(), page
    assert len((REPO / "README.md").read_text()) <= 14_000


def test_the_readmes_toy_numbers_are_in_the_committed_summary():
    summary = json.loads((REPO / "results" / "toy_linear" / "summary.json").read_text())
    quoted = numbers(block("toy-table", REPO / "results" / "toy_linear" / "README.md"))
    assert len(quoted) > 5 and not sorted(quoted - formatted(summary) - {"1e-9"})


def test_no_python_line_is_over_120_characters():
    """Every Python file git tracks (and a script at the root not committed yet) keeps its lines to 120 characters:
    the two training scripts are read side by side, and their diff with them."""
    limit = 120
    long = [f"{path}:{n} ({len(line)} characters)" for path, text in sorted(SOURCES.items()) if path.endswith(".py")
            for n, line in enumerate(text.splitlines(), 1) if len(line) > limit]
    assert not long, f"lines over {limit} characters (wrap them): " + ", ".join(long)


def test_the_readmes_isoloss_snippet_is_the_training_scripts_loss():
    """The README's IsoLoss code block, executed: its loss and its gradient are those of common.pair_loss, the
    training scripts' loss, on the same views (each order folded into C before it is predicted)."""
    import torch
    import common
    block = (REPO / "README.md").read_text().split("## IsoLoss in your own code", 1)[1]
    scope = {}
    exec(block.split("```python\n", 1)[1].split("```", 1)[0], scope)
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 256)
    x1, x2 = torch.randn(32, 8), torch.randn(32, 8)
    z1, z2 = net(x1), net(x2)
    loss = scope["isoloss"](z1, z2, z1.detach(), z2.detach())  # no EMA target: t = z, detached
    grad = torch.autograd.grad(loss, net.weight)[0]
    reference = common.ClosedFormPredictor(dim=256, alpha=0.5, eps=0.0, decay=0.998)
    z1, z2 = net(x1), net(x2)
    expected = 0.0
    for z, t in ((z1, z2.detach()), (z2, z1.detach())):
        reference.update(z)
        expected = expected + common.pair_loss("cosine", True, reference, z, t)[0]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, net.weight)[0])
    assert torch.equal(scope["predictor"].C, reference.C) and grad.abs().sum() > 0


def test_the_readmes_gpu_times_are_the_committed_dry_run():
    """The README's GPU times are those of `grid.py --dry-run` over the four data sets, as committed."""
    dry = (REPO / "results" / "gpu" / "dry-run-h200.txt").read_text()
    quoted = numbers(block("gpu-time")) - {"2026-11-26"}
    assert len(quoted) >= 6 and not sorted(quoted - numbers(dry))
    assert dry.count("steps   here") == 48 and "on one H200 81.4 h" in dry
