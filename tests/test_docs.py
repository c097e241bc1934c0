"""METHOD.md is what the code claims to implement: every reference to one of its sections exists, and
every function or class it names as the place of an equation exists in the code."""

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
             if re.search(r"[A-Z_.]", n) and not re.search(r"\.(py|yaml|md)$", n)}  # file names are not code names
    release_or_torch = {"validation_step", "torch.linalg.eigh", "torch.manual_seed"}
    code = "\n".join(text for path, text in SOURCES.items() if path.endswith(".py"))
    missing = [n for n in sorted(names - release_or_torch)
               if not re.search(rf"^\s*(def|class) {re.escape(n.split('.')[-1])}\b|^{re.escape(n.split('.')[-1])} = ", code, re.M)]
    assert len(names) > 15 and not missing, missing


def test_the_readmes_fashion_mnist_table_is_the_committed_results_table():
    """The README quotes results/paper_figures/fashionmnist-laptop/figures.md, as written by paper_figures.py."""
    readme = (REPO / "README.md").read_text()
    quoted = readme.split("<!-- fashionmnist-table -->\n", 1)[1].split("<!-- /fashionmnist-table -->", 1)[0]
    written = (REPO / "results" / "paper_figures" / "fashionmnist-laptop" / "figures.md").read_text()
    table = [line for line in written.splitlines() if line.startswith("|")]
    assert len(table) > 10 and quoted.strip() == written.strip()
    for figure in ("fig3.png", "fig7.png", "fig8.png", "ablations.png"):
        assert (REPO / "results" / "paper_figures" / "fashionmnist-laptop" / figure).is_file()
