"""Snakemake's HTML report (``snakemake --report results/report.html``).

Fast tests load the workflow (no jobs) and check that every figure and table target is flagged
with ``report(...)``, that every caption file exists, and that every caption renders (Jinja with
the run's config, then reStructuredText) without a docutils warning.  The slow test builds the
report of a finished smoke run and checks that it is self-contained and complete."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from smoke import ROOT, SMOKE, snakemake

CAPTIONS = ROOT / "workflow" / "report"

# Loaded after the real Snakefile: dumps every output flagged with report(...), the target lists
# of common.smk and the validated config, as JSON, to $DBPREPRO_REPORT_SPEC.
INSPECT = """
include: {snakefile!r}

import json as _json
import os as _os
from snakemake.io import get_flag_value as _flag_value, is_flagged as _is_flagged

_flagged = []
for _rule in workflow.rules:
    _named = {{k: str(v) for k, v in _rule.output.items()}}
    for _f in _rule.output:
        if _is_flagged(_f, "report"):
            _obj = _flag_value(_f, "report")
            _flagged.append({{
                "rule": _rule.name, "path": str(_f), "outputs": _named,
                "caption": None if _obj.caption is None else _obj.caption.get_path_or_uri(secret_free=True),
                "category": _obj.category, "subcategory": _obj.subcategory, "labels": _obj.labels,
            }})
with open(_os.environ["DBPREPRO_REPORT_SPEC"], "w") as _fh:
    _json.dump(dict(
        flagged=_flagged, figures=figure_targets(), paper2=paper2_targets(), all=all_targets(),
        report_text=str(workflow.report_text.get_path_or_uri(secret_free=True)) if workflow.report_text else None,
        config=config,
    ), _fh)
"""


def inspect_workflow(tmp_path, configfiles):
    """The report flags and targets of the workflow under ``configfiles`` (parsing only)."""
    wrapper = tmp_path / "inspect.smk"
    wrapper.write_text(INSPECT.format(snakefile=str(ROOT / "Snakefile")))
    out = tmp_path / "spec.json"
    env = dict(os.environ, DBPREPRO_REPORT_SPEC=str(out))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(wrapper), "--directory", str(tmp_path / "wd"),
           "--configfile", *configfiles, "--list-rules"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=["default", "smoke"])
def spec(request, tmp_path_factory):
    files = [str(ROOT / "config.yaml")] if request.param == "default" else SMOKE
    return inspect_workflow(tmp_path_factory.mktemp(f"spec_{request.param}"), files)


def test_every_figure_and_table_target_is_in_the_report(spec):
    flagged = {f["path"] for f in spec["flagged"]}
    pngs = [t for t in spec["figures"] + spec["paper2"] if t.endswith(".png")]
    csvs = [t for t in spec["all"] if t.endswith(".csv")]
    assert pngs and csvs
    assert "results/figures/p1_fig3_robustness_bars.png" in pngs
    missing = sorted(set(pngs + csvs) - flagged)
    assert not missing, f"targets not wrapped in report(...): {missing}"
    # tables written beside the targets (summaries) are in the report too
    for f in spec["flagged"]:
        for path in f["outputs"].values():
            if path.startswith("results/tables/") and path.endswith(".csv"):
                assert path in flagged, f"rule {f['rule']}: table {path} not wrapped in report(...)"


def test_report_flags_have_caption_category_and_label(spec):
    assert spec["flagged"]
    names = set()
    for f in spec["flagged"]:
        name = Path(f["path"]).stem
        assert f["caption"], f"{f['path']}: report(...) without caption"
        caption = Path(f["caption"])
        assert caption.is_file(), f"{f['path']}: caption {caption} does not exist"
        # <stem>.rst; <file name>.rst where a table and a figure share a stem (waterfall.csv, waterfall.png)
        assert caption.resolve().parent == CAPTIONS.resolve() and caption.name in (f"{name}.rst",
                                                                                   f"{Path(f['path']).name}.rst")
        assert f["category"] in {"Overview", "Paper 1", "Paper 2", "Setup"}, f
        assert f["subcategory"], f
        # one label key: with two, the HTML report turns a label of two values into a toggle
        assert isinstance(f["labels"], dict) and list(f["labels"]) == ["result"], f
        if name.startswith("p1_"):
            assert f["category"] == "Paper 1", f
        if name.startswith("p2_"):
            assert f["category"] == "Paper 2", f
        names.add(Path(f["path"]).name)  # the HTML report names an entry by its file name
    assert len(names) == len(spec["flagged"]), "two report entries share a name"
    assert spec["report_text"] and Path(spec["report_text"]).resolve() == (CAPTIONS / "workflow.rst").resolve()


def render_caption(path, config, outputs, tmp_path):
    """Render a caption as Snakemake does (Jinja with ``snakemake``, then docutils), in a directory
    holding a small stand-in table for every output, failing on any docutils warning."""
    from docutils.core import publish_parts
    from jinja2 import Environment, StrictUndefined

    tmp_path.mkdir(parents=True, exist_ok=True)
    for out in outputs.values():
        p = tmp_path / out
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("a,b\n1,2\n")

    class Outputs(list):  # like Snakemake's named list: iterable, and attributes by output name
        def __getattr__(self, name):
            return outputs[name]

    snake = SimpleNamespace(config=config, output=Outputs(outputs.values()), wildcards=SimpleNamespace())
    env = Environment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    text = env.from_string(Path(path).read_text()).render(snakemake=snake)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        html = publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5})["body"]
    finally:
        os.chdir(cwd)
    return text, html


def test_captions_render_without_warnings(spec, tmp_path):
    config = spec["config"]
    seen = set()
    for f in spec["flagged"]:
        text, html = render_caption(f["caption"], config, f["outputs"], tmp_path)
        first = Path(f["caption"]).read_text().splitlines()[0]
        assert first in html, f"{f['caption']}: first line not rendered verbatim"
        assert re.search(r"\bpaper [12]\b", first, re.I) or f["category"] in ("Setup", "Overview"), first
        assert "{{" not in text and "{%" not in text
        if config["data"]["dataset"] != "cifar10":
            assert "Caveat (digits)" in html or Path(f["caption"]).stem == "addt_cost", f["caption"]
        seen.add(Path(f["caption"]).name)
    # the caption of the other engineers' table and the global description render too
    extra = {"paper_vs_reproduced.rst": {"csv": "results/tables/paper_vs_reproduced.csv"}, "workflow.rst": {}}
    for name, outputs in extra.items():
        text, html = render_caption(CAPTIONS / name, config, outputs, tmp_path)
        assert "{{" not in text
    _, html = render_caption(CAPTIONS / "paper_vs_reproduced.rst", config, extra["paper_vs_reproduced.rst"], tmp_path)
    assert "<table" in html  # the table itself is inlined from the csv
    unused = {p.name for p in CAPTIONS.glob("*.rst")} - seen - set(extra)
    assert not unused, f"caption files no rule uses: {sorted(unused)}"


def test_workflow_description_names_the_config(spec, tmp_path):
    _, html = render_caption(CAPTIONS / "workflow.rst", spec["config"], {}, tmp_path)
    c = spec["config"]
    assert f"PGD-{c['attacks']['pgd']['steps']}" in html
    assert c["name"] in html
    for tm in c["attacks"]["threat_models"]:
        assert f"{tm['name']} ({tm['norm']}, eps {tm['eps']}" in html


# -- the report of a real run ---------------------------------------------------------------------
def embedded_results(html: str) -> dict:
    """The ``results`` object the HTML report embeds (path -> name, caption, mime type, data URI)."""
    anchor = html.index('<script id="results">')  # the bundled JavaScript has a "var results" of its own
    start = html.index("var results = ", anchor) + len("var results = ")
    results, _ = json.JSONDecoder().raw_decode(html[start:])
    return results


@pytest.mark.slow
def test_report_of_smoke_run(smoke_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir, symlinks=True)
    spec = inspect_workflow(tmp_path, SMOKE)
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    t0 = time.perf_counter()
    r = snakemake(workdir, "--report", str(report))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    print(f"report built in {seconds:.1f} s, {report.stat().st_size / 1e6:.1f} MB")
    html = report.read_text(encoding="utf-8")

    # complete: every flagged file, with its caption rendered
    results = embedded_results(html)
    by_name = {v["name"]: v for v in results.values()}
    expected = {Path(f["path"]).name: f for f in spec["flagged"]}
    assert set(by_name) == set(expected)
    for name, f in expected.items():
        entry = by_name[name]
        first = Path(f["caption"]).read_text().splitlines()[0]
        assert first in entry["caption"], name
        assert "system-message" not in entry["caption"], f"{name}: docutils warning in the caption"
        # self-contained: the file's bytes are inside the report, as a base64 data URI
        uri = entry["data_uri"]
        assert uri.startswith("data:"), name
        assert base64.b64decode(uri.split("base64,", 1)[1]) == (workdir / f["path"]).read_bytes(), name
        if name.endswith(".png"):
            assert entry["mime_type"] == "image/png"
    # Jinja saw the run's config (smoke: 16 attacked images) and the small tables are inlined
    assert "attacked images: 16" in by_name["p1_table_main.csv"]["caption"]
    assert "<table" in by_name["p1_table_main.csv"]["caption"]
    assert "robust_accuracy" in by_name["p1_table_main.csv"]["caption"]
    assert "Caveat (digits)" in by_name["p1_fig1_attack_trajectories.png"]["caption"]
    # the global description, with the config that ran
    assert "a reproduction of two papers on diffusion-based adversarial purification" in html
    assert "smoke" in html
    # no reference to a local file: the report works without the run directory
    assert str(workdir) not in html and str(tmp_path) not in html
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html):
        assert attr.startswith(("data:", "#", "javascript:", "https://", "http://")) or attr == "", attr
