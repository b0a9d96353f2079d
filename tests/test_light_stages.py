"""The light stages (merges, tables, claims, figures, the report's tables) need neither torch nor diffusers.

They run inside the Snakemake process (which has torch for its registries), so only a fresh interpreter shows what
they import: every job that the smoke run ran in the Snakemake process is run again here, in one new interpreter,
from its provenance record (its rule's stage function, its inputs and params; its outputs to a scratch folder).
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
    if not rec["in_snakemake_process"]:
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


@pytest.mark.slow
def test_light_stages_import_neither_torch_nor_diffusers(smoke_run, tmp_path):
    r = subprocess.run([sys.executable, "-c", RERUN, str(smoke_run), str(tmp_path)], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for rule in ("merge_attack", "table_p1_main", "table_claims", "figure_p1_fig3_robustness_bars", "table_sanity",
                 "figure_waterfall"):
        assert rule in out["ran"], (rule, out["ran"])
    assert out["imported"] == [], f"a light stage imported {out['imported']} (stages run: {out['ran']})"
