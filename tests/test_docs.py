"""README is the front door: short, its quick start is exactly what the scripts and CI run, every command it
shows is valid, and every link in README and docs/ resolves (the details live in docs/)."""

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dbprepro.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICK_START = ["bash scripts/run.sh", "bash scripts/test.sh"]
FIGURE = "results/figures/p1_fig3_robustness_bars.png"


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    nxt = re.search(r"^## ", text[start + len(heading):], re.M)
    return text[start: start + len(heading) + nxt.start()] if nxt else text[start:]


def _commands(block: str) -> list[str]:
    """The command lines of a ```bash block: comments and blank lines dropped."""
    lines = (line.split("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_readme_is_at_most_150_lines():
    n = len(README.splitlines())
    assert n <= 150, f"README.md has {n} lines: move details into docs/"


def test_quick_start_is_exactly_the_two_scripts_ci_and_the_scripts_provide():
    blocks = _bash_blocks(_section(README, "## Quick start"))
    assert len(blocks) == 1 and _commands(blocks[0]) == QUICK_START
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash scripts/test.sh" in ci, ".ci/run must run README's test command verbatim"
    # SLURM (root, apt-get, no .venv needed) before the tests that need it; no second set-up or pytest in CI
    assert ci.index("bash scripts/test.sh") > next(i for i, l in enumerate(ci) if l.startswith("bash scripts/slurm_local.sh"))
    assert not any(l.startswith(("bash scripts/setup.sh", ".venv/bin/python -m pytest")) for l in ci)
    for script, runs in (("run.sh", '"$VENV/bin/snakemake" --cores all "$@"'),
                         ("test.sh", '"$VENV/bin/python" -m pytest "$@"')):
        text = (ROOT / "scripts" / script).read_text()
        assert "set -euo pipefail" in text and 'cd "$(dirname "$0")/.."' in text
        assert f"exec {runs}" in text and "source scripts/ensure_venv.sh" in text
    assert "bash scripts/setup.sh" in (ROOT / "scripts" / "ensure_venv.sh").read_text()


def _stub_venv(folder: Path, log: Path, importable: bool = True) -> Path:
    """A fake environment whose python and snakemake record their arguments (one per line) in ``log``;
    ``python -c ...`` (the set-up check) succeeds only if ``importable``."""
    (folder / "bin").mkdir(parents=True)
    check = "exit 0" if importable else "exit 1"
    for name in ("python", "snakemake"):
        exe = folder / "bin" / name
        exe.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then {check}; fi\n'
                       f'printf "%s\\n" "{name}" "$@" > "{log}"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return folder


@pytest.mark.parametrize("script, args, expected", [
    ("run.sh", [FIGURE], ["snakemake", "--cores", "all", FIGURE]),
    ("run.sh", [], ["snakemake", "--cores", "all"]),
    ("test.sh", ["tests/test_api.py", "-m", "not slow"], ["python", "-m", "pytest", "tests/test_api.py", "-m", "not slow"]),
])
def test_scripts_pass_their_arguments_on_and_skip_set_up_when_ready(tmp_path, script, args, expected):
    log = tmp_path / "log"
    venv = _stub_venv(tmp_path / "venv", log)
    env = dict(os.environ, VENV=str(venv), PYTHON="false")  # a set-up attempt would fail at once
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "set-up took" not in r.stdout
    assert log.read_text().splitlines() == expected


@pytest.mark.parametrize("script", ["run.sh", "test.sh"])
@pytest.mark.parametrize("case", ["no environment", "package not importable"])
def test_scripts_set_up_when_the_environment_is_missing_or_broken(tmp_path, script, case):
    log = tmp_path / "log"
    venv = tmp_path / "venv" if case == "no environment" else _stub_venv(tmp_path / "venv", log, importable=False)
    # PYTHON=false: scripts/setup.sh's first command ("$PYTHON" -m venv) fails, proving that set-up was started
    env = dict(os.environ, VENV=str(venv), PYTHON="false")
    r = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert not log.exists(), "snakemake/pytest ran although the set-up failed"


def test_run_script_builds_one_figure_dag(tmp_path):
    """README's single-figure command through the real Snakemake (dry run, in a scratch directory)."""
    env = dict(os.environ, VENV=str(Path(sys.executable).parents[1]), HF_HUB_OFFLINE="1")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "-n", "--directory", str(tmp_path), FIGURE,
                        "--configfile", str(ROOT / "config.yaml")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "figure_p1_fig3_robustness_bars" in r.stdout + r.stderr


def _shown_commands(program: str) -> list[tuple[str, str]]:
    shown = []
    for doc in DOCS:
        for block in _bash_blocks(doc.read_text()):
            shown += [(doc.name, c) for c in _commands(block) if c.startswith(program + " ")]
        # inline code in the text, e.g. `snakemake --workflow-profile profiles/slurm ...`
        shown += [(doc.name, c) for c in re.findall(rf"`({program} [^`\n]+)`", doc.read_text())]
    return shown


@pytest.mark.parametrize("doc, command", _shown_commands("dbprepro"))
def test_every_dbprepro_command_shown_parses(doc, command):
    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"{doc}: `{command}` is not a valid dbprepro command (exit {e.code})")


@pytest.mark.parametrize("doc, command", _shown_commands("snakemake"))
def test_every_snakemake_command_shown_names_existing_files_and_targets(doc, command):
    argv = shlex.split(command)
    rules = "\n".join(p.read_text() for p in (ROOT / "workflow").rglob("*.smk"))
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--configfile", "--workflow-profile", "--profile"):
            assert (ROOT / value).exists(), f"{doc}: `{command}`: no {value}"
    for target in (a for a in argv[1:] if a.startswith("results/") and a.endswith(".png")):
        assert Path(target).stem in rules, f"{doc}: `{command}`: no rule makes {target}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name}: broken link {target}"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc.name}: no heading #{anchor} in {path or doc.name}"


def test_results_doc_says_it_is_generated():
    head = (ROOT / "docs" / "results.md").read_text()[:600]
    assert "dvc.lock" in head and "do not edit by hand" in head
