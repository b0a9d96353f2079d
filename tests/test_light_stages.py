"""The light stages (merges, tables, claims, figures, the report's tables) need neither torch nor diffusers.

They run inside the Snakemake process (which has torch for its registries), so only a fresh interpreter shows what
they import.  Two tests:

- fast: every module a light rule's stage function imports (its module-level imports and the ``from ... import``
  statements in its body) is imported in one fresh interpreter in which torch and diffusers cannot be imported; an
  attempt is recorded with the module that made it;
- slow: the jobs of each light rule of the smoke run are run again here, one new interpreter per rule, from their
  provenance records (the rule's stage function, its inputs and params; its outputs to a scratch folder), which also
  covers what the stage imports while it runs; every file it writes must have the bytes the DAG's job wrote.
"""

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RERUN = r'''
import hashlib, json, os, sys
from pathlib import Path
from snakemake.iocontainers import Namedlist

run, scratch = Path(sys.argv[1]), Path(sys.argv[2])
os.chdir(run)
from dbprepro.pipeline import STAGES, stage_name

def named(items, names):
    out = Namedlist(toclone=list(items))
    for name, (start, end) in names.items():
        out._set_name(name, start, end)
    return out

ran, differ = [], []
for path in sorted((run / "results" / "provenance").rglob("*.json")):
    rec = json.loads(path.read_text())
    if not rec["in_snakemake_process"] or stage_name(rec["rule"]) != sys.argv[3]:
        continue
    outputs = [str(scratch / o) for o in rec["output_order"]]
    for o in outputs:
        Path(o).parent.mkdir(parents=True, exist_ok=True)
    STAGES[stage_name(rec["rule"])](named(rec["inputs"], rec["input_names"]), named(outputs, rec["output_names"]),
                                    Namedlist(fromdict=rec["params"]), Namedlist(fromdict=rec["wildcards"]))
    ran.append(rec["rule"])
    for o, digest in rec["outputs"].items():  # the same bytes as the DAG's job wrote (files; folders aside)
        if isinstance(digest, str) and hashlib.sha256((scratch / o).read_bytes()).hexdigest() != digest:
            differ.append(o)
heavy = [m for m in ("torch", "diffusers") if m in sys.modules]
print(json.dumps({"ran": sorted(set(ran)), "jobs": len(ran), "imported": heavy, "differ": differ}))
'''


HEAVY = ("torch", "diffusers")

#: import each module given on the command line with torch and diffusers blocked; print, per module, the
#: heavy imports it attempted and the dbprepro module that attempted each
IMPORT = r'''
import importlib, json, sys, traceback

HEAVY = set(sys.argv[1].split(","))
attempts = []

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            by = [f.filename for f in traceback.extract_stack() if "/dbprepro/" in f.filename]
            attempts.append((name, by[-1].rsplit("/dbprepro/", 1)[-1] if by else "?"))
            raise ImportError(f"{name} is blocked: a light stage imports it")
        return None

sys.meta_path.insert(0, Block())
out = {}
for mod in sys.argv[2:]:
    del attempts[:]
    try:
        importlib.import_module(mod)
    except ImportError:
        pass
    out[mod] = sorted(set(attempts))
print(json.dumps(out))
'''


def light_rules() -> set[str]:
    """The rules of workflow/rules/*.smk that run their stage in Snakemake's process (``run_light_stage``)."""
    rules = set()
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        blocks = re.split(r"^\s*rule (\w+):", smk.read_text(), flags=re.M)
        rules |= {name for name, body in zip(blocks[1::2], blocks[2::2]) if "run_light_stage(" in body}
    return rules


def stage_modules(fn) -> set[str]:
    """The module of a stage function and every module its body imports (``from ..x import y``: ``x``, and
    ``x.y`` when that is a module)."""
    import importlib.util

    out = {fn.__module__}
    package = fn.__module__.rpartition(".")[0]
    for node in ast.walk(ast.parse(inspect.getsource(fn))):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            out.add(base)
            for alias in node.names:
                if importlib.util.find_spec(base) and importlib.util.find_spec(base).submodule_search_locations:
                    if importlib.util.find_spec(f"{base}.{alias.name}") is not None:
                        out.add(f"{base}.{alias.name}")
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return out


def heavy_imports(modules) -> dict[str, list]:
    """Module -> the (heavy module, importing dbprepro file) pairs importing it attempted (fresh interpreter)."""
    r = subprocess.run([sys.executable, "-c", IMPORT, ",".join(HEAVY), *sorted(modules)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_import_check_sees_torch():
    """The fast test's detector catches a module that imports torch, and through whom."""
    found = heavy_imports(["dbprepro.attacks.protocols", "dbprepro.metrics"])
    assert [h for h, _ in found["dbprepro.attacks.protocols"]] == ["torch"], found
    assert found["dbprepro.metrics"] == []


def test_the_modules_of_the_light_stages_import_neither_torch_nor_diffusers():
    from dbprepro.pipeline import STAGES

    rules = light_rules()
    assert {"merge_attack", "table_p1_main", "table_claims", "table_waterfall", "figure_waterfall", "table_sanity",
            "table_clean_accuracy", "table_p2_compression", "compare_runs"} <= rules, sorted(rules)
    assert not rules & {"attack", "train_addt", "evaluate_clean", "sanity"}  # heavy rules are not light
    modules = {rule: stage_modules(STAGES[rule]) for rule in sorted(rules)}
    assert "dbprepro.paper1.waterfall" in modules["table_waterfall"] and "dbprepro.shards" in modules["merge_attack"]
    found = heavy_imports(set().union(*modules.values()))
    heavy = {rule: {m: found[m] for m in sorted(mods) if found[m]} for rule, mods in modules.items()}
    assert not {r: h for r, h in heavy.items() if h}, heavy


@pytest.mark.slow
def test_light_stages_import_neither_torch_nor_diffusers(smoke_run, tmp_path):
    rules = set()
    for path in (smoke_run / "results" / "provenance").rglob("*.json"):
        rec = json.loads(path.read_text())
        if rec["in_snakemake_process"] and not rec["rule"].startswith("replicate_seed"):
            rules.add(rec["rule"])
    assert {"merge_attack", "table_p1_main", "table_claims", "figure_p1_fig3_robustness_bars", "table_sanity",
            "figure_waterfall"} <= rules, sorted(rules)
    imported = {}
    for rule in sorted(rules):
        r = subprocess.run([sys.executable, "-c", RERUN, str(smoke_run), str(tmp_path / rule), rule],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, (rule, r.stderr[-4000:])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["jobs"] > 0, rule
        imported[rule] = out["imported"]
        assert not out["differ"], (rule, "a fresh interpreter wrote other bytes", out["differ"])
    assert rules <= light_rules(), sorted(rules - light_rules())
    assert not {r: mods for r, mods in imported.items() if mods}, imported
