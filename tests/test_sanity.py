"""The sanity battery (dbprepro.sanity): its decision rules on synthetic outcomes, its attacks on toy
defenses with a known outcome (masked gradients flagged; a plain classifier passes), the battery
stage end to end on the tiny fixtures, the config and the DAG."""

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dbprepro.attacks import settings_randomness
from dbprepro.purifiers import DefendedClassifier
from dbprepro.sanity.checks import (FLAG, PASS, iterations_check, not_stronger_check, paired_excess, sweep_check,
                                    unbounded_check)
from dbprepro.sanity.runner import pgd_correct, square_correct

ROOT = Path(__file__).resolve().parents[1]
PGD_CFG = dict(steps=10, eot=1, random_start=False, restarts=1)
EPS, ALPHA = 0.3, 0.075

# -- the decision rules on synthetic arrays -------------------------------------------------------


def test_paired_excess_is_the_mean_difference_with_an_interval_around_it():
    a = np.r_[np.ones(30), np.zeros(10)]
    b = np.r_[np.ones(10), np.zeros(30)]
    est, lo, hi = paired_excess(a, b, resamples=500)
    assert est == pytest.approx(0.5) and lo <= est <= hi and lo > 0
    est, lo, hi = paired_excess(b, b, resamples=500)
    assert (est, lo, hi) == (0.0, 0.0, 0.0)


def test_a_falling_sweep_that_reaches_zero_passes_and_a_plateau_or_rise_flags():
    n = 40
    falling = [np.r_[np.ones(n - k), np.zeros(k)] for k in (0, 10, 25, 40, 40)]
    assert sweep_check([0.25, 0.5, 1, 2, 4], falling, max_final_accuracy=0.02, resamples=500).outcome == PASS
    plateau = falling[:3] + [falling[2], falling[2]]  # stops falling at 37.5 %: the attack is failing
    c = sweep_check([0.25, 0.5, 1, 2, 4], plateau, max_final_accuracy=0.02, resamples=500)
    assert c.outcome == FLAG and "> 0.02" in c.detail
    rising = [falling[0], falling[3], np.ones(n), falling[3], falling[3]]  # x1 leaves every image robust
    c = sweep_check([0.25, 0.5, 1, 2, 4], rising, max_final_accuracy=0.02, resamples=500)
    assert c.outcome == FLAG and "rises x0.5 -> x1" in c.detail and c.ci_low > 0


def test_one_image_of_noise_in_the_sweep_is_within_the_interval():
    n = 40
    half = np.r_[np.ones(20), np.zeros(20)]
    one_more = half.copy()
    one_more[20] = 1  # x1 leaves one image more than x0.5: within the noise of 40 images
    rows = [np.ones(n), half, one_more, np.zeros(n), np.zeros(n)]
    c = sweep_check([0.25, 0.5, 1, 2, 4], rows, max_final_accuracy=0.02, resamples=500)
    assert c.outcome == PASS and c.estimate == pytest.approx(1 / 40) and c.ci_low <= 0


def test_longer_pgd_leaving_more_accuracy_beyond_the_interval_flags():
    default = np.r_[np.zeros(30), np.ones(10)]
    assert iterations_check(default, default, factor=5, resamples=500).outcome == PASS
    assert iterations_check(default, np.zeros(40), factor=5, resamples=500).outcome == PASS  # longer is stronger
    c = iterations_check(default, np.r_[np.zeros(10), np.ones(30)], factor=5, resamples=500)
    assert c.outcome == FLAG and c.estimate == pytest.approx(0.5)


def test_a_transfer_or_gradient_free_attack_stronger_than_the_white_box_ensemble_flags():
    ensemble = np.r_[np.ones(30), np.zeros(10)]
    weaker = np.ones(40)
    assert not_stronger_check("transfer", "t", weaker, ensemble, resamples=500).outcome == PASS
    stronger = np.r_[np.zeros(35), np.ones(5)]
    c = not_stronger_check("transfer", "t", stronger, ensemble, resamples=500)
    assert c.outcome == FLAG and c.value == pytest.approx(5 / 40) and c.reference == pytest.approx(30 / 40)
    one_more = ensemble.copy()
    one_more[0] = 0  # one image more: within the noise of 40 images
    assert not_stronger_check("transfer", "t", one_more, ensemble, resamples=500).outcome == PASS


def test_unbounded_attack_must_reach_zero():
    assert unbounded_check(np.zeros(8), eps=1.0).outcome == PASS
    assert unbounded_check(np.r_[np.zeros(7), 1.0], eps=1.0).outcome == FLAG


# -- toy defenses with a known outcome ------------------------------------------------------------


class ToyPurifier(nn.Module):
    """A stand-in purifier: the identity, or a non-differentiable quantiser (round to 0, 1/2, 1:
    its gradient is 0 everywhere, the textbook gradient masking)."""

    def __init__(self, quantise: bool, randomness):
        super().__init__()
        self.quantise, self.randomness, self.num_steps = quantise, randomness, 1

    def with_randomness(self, randomness):
        return ToyPurifier(self.quantise, randomness)

    def forward(self, x, ids=None, draws=None):
        return torch.round(x * 2) / 2 if self.quantise else x


class MeanClassifier(nn.Module):
    """Two classes by the mean pixel: class 1 when it exceeds 0.2 (differentiable, linear)."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.2 - m, m - 0.2], 1) * 20


def toy(quantise: bool, setting: str = "dwbox") -> DefendedClassifier:
    return DefendedClassifier(MeanClassifier(), ToyPurifier(quantise, settings_randomness(setting, 0)))


def toy_data(n=16):
    """Class-0 images with every pixel at 0.1 (a little jitter): the toy classifies them correctly;
    an L-inf perturbation of 0.3 toward 0.4 crosses the 0.2 boundary (and, through the quantiser,
    the rounding threshold 0.25)."""
    g = torch.Generator().manual_seed(0)
    x = (0.1 + 0.02 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, torch.zeros(n, dtype=torch.long), torch.arange(n)


def test_masked_gradients_are_flagged_by_the_gradient_free_check():
    x, y, ids = toy_data()
    model = toy(quantise=True)
    pgd = pgd_correct(model, x, y, ids, setting="dwbox", norm="linf", eps=EPS, alpha=ALPHA, pgd=PGD_CFG, steps=10,
                      batch_size=8)
    assert pgd.mean() == 1.0  # zero gradient: PGD never moves
    sq = square_correct(model, x, y, ids, setting="dwbox", norm="linf", eps=EPS, queries=50, p_init=0.8, seed=0,
                        batch_size=8)
    assert sq.mean() < 0.5
    c = not_stronger_check("gradient_free", "Square", sq, pgd, setting="dwbox", resamples=500)
    assert c.outcome == FLAG
    # the unbounded PGD cannot move either: flagged too
    unb = pgd_correct(model, x, y, ids, setting="dwbox", norm="linf", eps=1.0, alpha=0.25, pgd=PGD_CFG, steps=10,
                      batch_size=8)
    assert unbounded_check(unb, eps=1.0).outcome == FLAG


def test_a_plain_differentiable_classifier_passes_every_check():
    x, y, ids = toy_data()
    model = toy(quantise=False)
    run = dict(setting="dwbox", norm="linf", alpha=ALPHA, pgd=PGD_CFG, batch_size=8)
    factors = [0.25, 0.5, 1, 2, 4]
    sweep = [pgd_correct(model, x, y, ids, eps=EPS * f, **{**run, "alpha": ALPHA * f}, steps=10) for f in factors]
    assert sweep[0].mean() == 1.0 and sweep[-1].mean() == 0.0
    assert sweep_check(factors, sweep, max_final_accuracy=0.02, resamples=500).outcome == PASS
    longer = pgd_correct(model, x, y, ids, eps=EPS, **run, steps=50)
    assert iterations_check(sweep[2], longer, factor=5, resamples=500).outcome == PASS
    for setting in ("whitebox", "dwbox"):
        sq = square_correct(toy(False, setting), x, y, ids, setting=setting, norm="linf", eps=EPS, queries=20,
                            p_init=0.8, seed=0, batch_size=8)
        assert not_stronger_check("gradient_free", "Square", sq, sweep[2], resamples=500).outcome == PASS
    assert not_stronger_check("transfer", "self", sweep[2], sweep[2], resamples=500).outcome == PASS
    unb = pgd_correct(model, x, y, ids, eps=1.0, **{**run, "alpha": 0.25}, steps=10)
    assert unbounded_check(unb, eps=1.0).outcome == PASS


def test_the_batched_sweep_is_each_radius_own_pgd(defended):
    """The sweep's runs share their network passes; each row is still exactly PGD at its radius
    (fixed and fresh randomness, random start: the draws are keyed by image id and step)."""
    from dbprepro.attacks import PGD
    from dbprepro.sanity.runner import BallsPGD

    x, y, ids = toy_data(2)
    radii = [0.05, 0.2, 1.0]
    kw = dict(steps=2, random_start=True)
    for setting in ("dwbox", "whitebox"):
        model = defended(setting)
        e = torch.tensor(radii).repeat_interleave(2)
        joint = BallsPGD(model, setting, "linf", e, e / 4, **kw)(x.repeat(3, 1, 1, 1), y.repeat(3), ids.repeat(3))
        for r, eps in enumerate(radii):
            alone = PGD(model, setting, "linf", eps, eps / 4, **kw)(x, y, ids)
            torch.testing.assert_close(joint.x_adv[2 * r:2 * r + 2], alone.x_adv, atol=1e-5, rtol=0)
            assert (joint.x_adv[2 * r:2 * r + 2] - x).abs().max() <= eps + 1e-6


# -- the battery stage, table and figure on the tiny fixtures -------------------------------------


def small_sanity(cfg):
    return {**cfg["sanity"], "n_images": 4, "eps_factors": [0.5, 1, 2], "iterations_factor": 2,
            "square": {"queries": 3, "p_init": 0.8, "settings": ["whitebox", "dwbox"]}}


def test_the_battery_stage_writes_records_that_the_table_and_figure_read(stage_inputs, tmp_path):
    from dbprepro.config import load_configs
    from dbprepro.io import savez, write_parquet
    from dbprepro.sanity.figure import write_sanity_figure
    from dbprepro.sanity.runner import run_battery
    from dbprepro.sanity.table import write_sanity_table

    cfg = load_configs([ROOT / "config.yaml", ROOT / "config" / "smoke.yaml"])
    from dbprepro.data import load_split

    split = load_split(stage_inputs["test"], stage_inputs["manifest"]).head(5)
    comp = tmp_path / "comp.parquet"  # a comparison run breaking the first image only, with one image the battery lacks
    write_parquet(pd.DataFrame({"id": split.ids.numpy(), "correct_single": [0.0, 1, 1, 1, 1]}), comp)
    adv = tmp_path / "adv.npz"
    savez(adv, ids=split.ids.numpy()[:4][::-1].copy(), x_adv=split.images.numpy()[:4][::-1].copy())  # clean images
    out = tmp_path / "records.parquet"
    run_battery(stage_inputs["classifier"], stage_inputs["diffusion"], stage_inputs["test"], stage_inputs["manifest"],
                out, defense="vanilla", threat="linf", tm=cfg["attacks"]["threat_models"][0],
                pgd={**cfg["attacks"]["pgd"], "steps": 2, "eot": 1}, fixed_draw=0, sanity=small_sanity(cfg),
                purification={**cfg["purification"], "num_inference_steps": 100}, variance_type="fixed_large",
                batch_size=4, seed=0, comparisons=[("stochastic", "vanilla/linf/whitebox_eot/pgd", str(comp))],
                transfers=[("undefended", str(adv))], device=torch.device("cpu"))
    rec = pd.read_parquet(out)
    assert set(rec["run"]) == {"pgd_eps_x0.5", "pgd_eps_x1", "pgd_eps_x2", "pgd_steps_x2", "pgd_unbounded",
                               "square_whitebox", "square_dwbox", "transfer_undefended", "best_gradient_stochastic",
                               "best_gradient_fixed"}
    assert rec.groupby("run").size().eq(4).all() and rec["correct"].isin([0, 1]).all()
    stoch = rec[rec["run"] == "best_gradient_stochastic"].set_index("id")["correct"]
    assert stoch.loc[split.ids[0].item()] == 0.0  # the comparison run's break is in the ensemble
    fixed = rec[rec["run"] == "best_gradient_fixed"].set_index("id")["correct"]
    own = rec[rec["run"].isin(["pgd_eps_x1", "pgd_steps_x2"])].groupby("id")["correct"].min()
    assert fixed.equals(own.loc[fixed.index])  # the fixed class: the battery's own DW-box PGD runs
    table = write_sanity_table([out], tmp_path / "s.csv", tmp_path / "s.md", max_final_accuracy=0.02, resamples=200)
    assert table["check"].tolist() == ["eps_sweep", "iterations", "gradient_free", "gradient_free", "transfer",
                                       "unbounded"]
    assert set(table["outcome"]) <= {PASS, FLAG}
    write_sanity_figure(tmp_path / "s.csv", [out], tmp_path / "s.png", tmp_path / "s.pdf")
    assert (tmp_path / "s.png").stat().st_size > 1000


# -- config, cost model, DAG ----------------------------------------------------------------------


def test_config_with_the_battery_validates_and_refuses_what_cannot_run():
    from dbprepro.config import ConfigError, load_configs, validate_config

    cfg = load_configs([ROOT / "config.yaml"])
    assert cfg["sanity"]["enabled"]
    raw = __import__("yaml").safe_load((ROOT / "config.yaml").read_text())
    for key, value, msg in (("defenses", ["vanila"], "not defenses"), ("threat_models", ["l3"], "threat_models"),
                            ("eps_factors", [0.5, 2], "contain 1"), ("n_images", 65, "n_images"),
                            ("transfer", {"sources": {"vanilla": ["clean_finetune"]}}, "not in the attack grid")):
        bad = copy.deepcopy(raw)
        bad["sanity"][key] = value
        with pytest.raises(ConfigError, match=msg):
            validate_config(bad)


def test_the_cost_model_prices_every_battery_job():
    from dbprepro.config import load_configs
    from dbprepro.cost import count_calls

    cfg = load_configs([ROOT / "config.yaml"])
    jobs = {j.job: j for j in count_calls(cfg)}
    assert {"sanity/vanilla/linf", "sanity/addt/linf"} <= set(jobs)
    j = jobs["sanity/vanilla/linf"]
    S, n, steps = 6, cfg["sanity"]["n_images"], cfg["attacks"]["pgd"]["steps"]
    # dwbox PGD, autograd: (steps + 1) x (S unet_grad + clf_grad) + 1 evaluation forward, per run
    pgd_runs = (5 + 1) * (steps + 1) + (5 * steps + 1)
    assert j.calls.unet_grad == n * S * pgd_runs
    q = cfg["sanity"]["square"]["queries"]
    assert j.calls.clf_fwd == n * (7 + 2 * (q + 3) + 2) and j.upper_bound
    cfg["sanity"]["enabled"] = False
    assert not any(k.startswith("sanity/") for k in (j.job for j in count_calls(cfg)))


def test_the_dag_lists_the_battery_jobs(tmp_path):
    from smoke import job_counts, snakemake

    r = snakemake(tmp_path, "-n", "results/tables/sanity.csv", configfiles=[str(ROOT / "config.yaml")])
    assert r.returncode == 0, r.stderr
    jobs = job_counts(r.stdout + r.stderr)
    assert jobs["sanity"] == 4 and jobs["table_sanity"] == 1  # vanilla, addt, adbm, gdmp on linf
    assert jobs["merge_attack"] >= 9  # the comparison and transfer source runs it reads
