"""The benchmark suite's quick mode runs and its measurements say what the package claims.

Not a performance test (seconds on a shared CI machine mean little): it keeps the suite from
rotting and checks the machine-independent parts of its output, i.e. equal gradients across
the three gradient modes and the memory *shape* (saved activations flat in the chain length for
the exact mode, growing for plain autograd; replayable noise far below a stored tensor).
"""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_suite(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only",
                        "gradients,randomness,overhead,scaling", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for comparison in ("gradients", "randomness", "overhead", "scaling"):
        assert comparison in summary
    assert (tmp_path / "scaling.png").stat().st_size > 10_000

    g = pd.read_csv(tmp_path / "gradients.csv")
    assert set(g["mode"]) == {"exact", "autograd", "checkpoint"}
    assert (g.max_abs_grad_diff_vs_autograd <= 1e-5 * g.grad_scale).all()
    saved = g.set_index("mode").saved_bytes
    assert saved["exact"] < saved["autograd"] / 2  # one step's activations vs all of them

    s = pd.read_csv(tmp_path / "scaling.csv")
    by = s.pivot_table(index="steps", columns="mode", values="saved_bytes")
    # flat in the number of steps: one step's activations at any K; the chain's input states (one image-sized
    # tensor per step, kept with save_for_backward since issue 16 so a second backward works) are the only growth
    assert by["exact"].iloc[0] <= by["exact"].iloc[-1] <= 1.02 * by["exact"].iloc[0]
    assert by["autograd"].iloc[-1] > 1.5 * by["autograd"].iloc[0]  # grows with it

    n = pd.read_csv(tmp_path / "randomness.csv").set_index("approach")
    assert n.loc["replayable", "peak_bytes"] < 0.2 * n.loc["stored", "peak_bytes"]


@pytest.mark.slow
def test_quick_budget_benchmark(tmp_path):
    """grad_mode budget at three budgets beside exact and autograd (digits UNet, K = 11 in quick mode)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "budget",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    check_budget_table(pd.read_csv(tmp_path / "budget.csv"))


def check_budget_table(b):
    """The machine-independent parts of budget.csv: kept steps, saved bytes and gradients."""
    assert list(b["mode"]) == ["exact", "budget", "budget", "budget", "autograd"]
    kept = list(b["kept_steps"])
    assert kept[0] == 0 < kept[1] < kept[2] < kept[3] < kept[4] == b["steps"].iloc[0]
    assert list(b["saved_bytes"]) == sorted(b["saved_bytes"]) and b["saved_bytes"].is_unique
    bud = b[b["mode"] == "budget"]
    assert (bud["saved_bytes"] <= b["saved_bytes"].iloc[0] + bud["budget_mb"] * 2**20).all()
    assert (b["max_abs_grad_diff_vs_exact"] <= 1e-5 * b["grad_scale"]).all()
