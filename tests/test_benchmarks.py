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


def _bench_modules():
    """benchmarks/run.py and benchmarks/adaptive_memory.py as modules (the folder is no package)."""
    import importlib.util

    mods = {}
    for name in ("run", "adaptive_memory"):
        spec = importlib.util.spec_from_file_location(f"dbprepro_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods["run"], mods["adaptive_memory"]


def test_adaptive_benchmark_iteration_on_a_tiny_unet():
    """The P9 benchmark's measured code path (one DiffAttack / DiffHammer iteration, in process) on the digits
    UNet at K = 3 and 6: autograd holds every step's activations, the budget mode at most its kept steps' and
    the recomputed step's, and the table extrapolates them to K = 11."""
    run, am = _bench_modules()
    g = dict(am.grid(True), batches=(2,))
    raw = []
    for attack in am.ATTACKS:
        for mode in am.MODES:
            for k in g["fit_ks"]:
                res = am.child_adaptive(run, attack, mode, g["model"], 2, k, g["budget_mib_per_image"], threads=1)
                raw.append(dict(attack=attack, grad_mode=mode, batch=2, K=k, **res))
    by = {(r["attack"], r["grad_mode"], r["K"]): r for r in raw}
    for attack in am.ATTACKS:
        for k in g["fit_ks"]:
            auto = by[attack, "autograd", k]
            assert auto["status"] == "measured" and auto["kept_steps"] == k and auto["seconds"] > 0
            assert auto["saved_bytes"] >= k * auto["step_saved_bytes"]  # every step's activations at once
            bud = by[attack, "budget", k]
            assert bud["status"] == "measured", bud  # DiffAttack's chain states too (purify_states in budget mode)
            assert 0 < bud["kept_steps"] < k
            # the recomputed steps' activations are never held at once: budget saves (k - kept - 1) steps' less
            assert auto["saved_bytes"] - bud["saved_bytes"] >= (k - bud["kept_steps"] - 1) * auto["step_saved_bytes"]
    df = am.table(raw, g)
    full = df[df.K == g["full_k"]]
    assert set(full.status) == {"extrapolated"} and set(full.fit_ks) == {"3/6"}
    assert (full.kept_steps[full.grad_mode == "autograd"] == g["full_k"]).all()
    assert "| diffhammer | budget | 2 |" in am.markdown(df, g["full_k"])


def test_adaptive_table_extrapolates_in_k_and_batch():
    """Lines in K (to the full chain) and per image (to batch 32), and the budget-mode target, on made-up numbers."""
    _, am = _bench_modules()
    g = dict(model="cifar", batches=(2, 4), fit_ks=(6, 11), full_k=101, direct_batches=(2, 4), budget_mib_per_image=128.0)
    mib = 2**20
    raw = []
    for mode, per_image_step in (("budget", 0.0), ("autograd", 50.0)):
        for b in (2, 4):
            for k in (6, 11) + ((101,) if mode == "budget" else ()):
                peak = (100 + b * (120 + per_image_step * k)) * mib  # 100 MiB fixed, 120 MiB per image
                raw.append(dict(attack="diffhammer", grad_mode=mode, batch=b, K=k, status="measured",
                                seconds=0.5 * b * k + 2, cpu_seconds=b * k + 4, load1=1.0, peak_bytes=peak,
                                saved_bytes=peak / 2, step_saved_bytes=1,
                                kept_steps=2 if mode == "budget" else k, threads=2))
    raw.append(dict(attack="diffattack", grad_mode="budget", batch=2, K=6, status=am.UNSUPPORTED, error="no budget"))
    df = am.table(raw, g).set_index(["attack", "grad_mode", "batch", "K"], drop=False)
    auto = df.loc["diffhammer", "autograd", 4, 101]
    assert auto.status == "extrapolated" and auto.kept_steps == 101
    assert auto.seconds == pytest.approx(0.5 * 4 * 101 + 2) and auto.peak_mib == pytest.approx(100 + 4 * (120 + 5050))
    assert auto.gib_at_batch32 == pytest.approx(32 * auto.peak_mib / 4 / 1024)  # per image, the fixed part included
    assert auto.gib_at_batch32_fit == pytest.approx((100 + 32 * (120 + 5050)) / 1024)  # the line through batch 2, 4
    assert auto.meets_target == ""  # the target is budget mode's
    bud = df.loc["diffhammer", "budget", 2, 101]
    assert bud.status == "measured" and bud.budget_mib == 256 and bud.gib_at_batch32 == pytest.approx(
        32 * (100 + 2 * 120) / 2 / 1024)
    assert bud.meets_target == "yes" and bud.diffbreak_stated_gb == 32
    refused = df[df.attack == "diffattack"]
    assert list(refused.status) == [am.UNSUPPORTED] and list(refused.meets_target) == ["no"]
    t = {r["target"].split(":")[0]: r for r in am.targets(df.reset_index(drop=True), g)}
    assert t["diffhammer"]["met"] and not t["diffattack"]["met"] and t["diffattack"]["why"] == "no budget"


@pytest.mark.slow
def test_quick_adaptive_benchmark(tmp_path):
    """run.py --quick --only adaptive: one child process per (attack, mode, batch, K), the CSV and the table."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "adaptive",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    d = pd.read_csv(tmp_path / "adaptive_memory.csv")
    full = d[d.K == 11]
    assert set(full[full.grad_mode == "autograd"].status) == {"extrapolated"}
    hammer = full[(full.attack == "diffhammer") & (full.grad_mode == "budget")]
    assert list(hammer.status) == ["measured", "extrapolated"] and (hammer.peak_mib > 0).all()  # direct at batch 2
    assert "| diffhammer | budget | 4 |" in (tmp_path / "adaptive_memory.md").read_text()
    assert "adaptive" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_quick_checkpoint_benchmark(tmp_path):
    """The EDM reader against torch.load (issue 25): both loaders timed on the same tensors (checked equal inside)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "checkpoint",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    c = pd.read_csv(tmp_path / "checkpoint.csv")
    assert list(c["loader"]) == ["dbprepro ema_state_dict (safe reader)", "torch.load(weights_only=True)"]
    assert (c["seconds"] > 0).all() and "checkpoint" in (tmp_path / "summary.md").read_text()
