"""The light stages (merges, tables, claims, figures, the report's tables) need neither torch nor diffusers.

They run inside the Snakemake process (which has torch for its registries), so only a fresh interpreter shows what
they import: the jobs of each light rule of the smoke run are run again here, one new interpreter per rule, from their
provenance records (the rule's stage function, its inputs and params; its outputs to a scratch folder).

Not yet true for every rule: the rules in ``IMPORT_TORCH`` still import torch through the attack package (its records
schema and registry) or the metrics they read; the list may only shrink (issue 26).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RERUN = r'''
import json, os, sys
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

ran = []
for path in sorted((run / "results" / "provenance").rglob("*.json")):
    rec = json.loads(path.read_text())
    if not rec["in_snakemake_process"] or stage_name(rec["rule"]) != sys.argv[3]:
        continue
    outputs = [str(scratch / o) for o in rec["outputs"]]
    for o in outputs:
        Path(o).parent.mkdir(parents=True, exist_ok=True)
    STAGES[stage_name(rec["rule"])](named(rec["inputs"], rec["input_names"]), named(outputs, rec["output_names"]),
                                    Namedlist(fromdict=rec["params"]), Namedlist(fromdict=rec["wildcards"]))
    ran.append(rec["rule"])
heavy = [m for m in ("torch", "diffusers") if m in sys.modules]
print(json.dumps({"ran": sorted(set(ran)), "jobs": len(ran), "imported": heavy}))
'''


#: light rules that still import torch (never diffusers): the list may only shrink
IMPORT_TORCH = {"figure_waterfall", "merge_attack", "table_addt_training", "table_clean_accuracy", "table_p1_ablation",
                "table_p1_families", "table_p1_main", "table_p2_compression", "table_p2_compression_models",
                "table_sanity", "table_waterfall"}


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
    assert not [r for r, mods in imported.items() if "diffusers" in mods], imported
    torch_now = {r for r, mods in imported.items() if "torch" in mods}
    assert torch_now <= IMPORT_TORCH, f"light stages that now import torch: {sorted(torch_now - IMPORT_TORCH)}"
