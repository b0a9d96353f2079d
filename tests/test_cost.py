"""dbprepro.cost: call counts against hand counts on the smoke configuration, the estimate's
arithmetic, and a (tiny) real measurement through the CLI."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from dbprepro.config import deep_merge, load_yaml, validate_config
from dbprepro.cost import KINDS, Calls, chain_length, count_calls, estimate, measure_unit_costs

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smoke():
    return validate_config(deep_merge(load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "config/smoke.yaml")))


@pytest.fixture(scope="module")
def jobs(smoke):
    return {j.job: j.calls.as_dict() for j in count_calls(smoke)}


def calls(**kw):
    return Calls(**kw).as_dict()


def test_chain_length_matches_the_purifier():
    from dbprepro.models.diffusion import build_scheduler, build_unet
    from dbprepro.purifiers import Purifier

    assert chain_length(0.1, 1000) == 101 and chain_length(0.1, 100) == 11 and chain_length(0.1, 50) == 6
    unet = build_unet(8, 1, [8], attention=[False], norm_num_groups=4)
    for t_star, n in ((0.1, 50), (0.1, 100), (0.2, 50), (0.1, 1000)):
        p = Purifier(unet, build_scheduler(), t_star=t_star, num_inference_steps=n)
        assert p.num_steps == chain_length(t_star, n), (t_star, n)


def test_the_jobs_of_the_smoke_dag(jobs):
    # 12 attack runs: undefended; vanilla x 3 settings; BPDA; AutoAttack x 3 protocols; addt x 2 settings and the
    # ablation variant clean_finetune in dwbox only (addt.ablation_settings); paper 2's fixed
    # configuration 1 (configuration 0 is the dwbox run)
    # + paper 1's families (config.yaml: ddim, vpsde, edm): f and f_addt x whitebox_eot, dwbox
    # + issue 17's adaptive attacks on vanilla and addt (smoke.yaml): DiffAttack x 2 settings, surrogate, DiffHammer,
    # the low-frequency attack; + the vote defense's EOT-PGD (smoke.yaml's vote section); + AutoAttack's 3 protocols on
    # addt (attacks.autoattack.defenses: every waterfall defense); + BPDA and white-box PGD on addt (bpda.defenses,
    # addt.attack_settings: the waterfall stages every waterfall defense has)
    # + the competing defenses adbm and gdmp (competitors.names): PGD in 3 settings, BPDA, AutoAttack's 3 protocols,
    # DiffAttack x 2 settings, the surrogate and DiffHammer each (lowfreq stays on vanilla and addt in smoke.yaml)
    attacks = sorted(j for j in jobs if j.startswith("attack/"))
    assert len(attacks) == 12 + 12 + 2 * 5 + 1 + 3 + 2 + 2 * 11 and "attack/vanilla/linf/dwbox_c1/pgd" in attacks
    assert {a.format(d=d) for a in adaptive_runs() for d in ("adbm", "gdmp") if "lowfreq" not in a} <= set(attacks)
    assert {a.format(d=d) for a in adaptive_runs() for d in ("vanilla", "addt")} <= set(attacks)
    assert "attack/vanilla_vote/linf/whitebox_eot/pgd" in attacks
    assert "attack/clean_finetune/linf/whitebox_eot/pgd" not in attacks
    assert "attack/addt/linf/whitebox_eot/pgd" in attacks and "attack/clean_finetune/linf/dwbox/pgd" in attacks
    assert {j.split("/")[1] for j in attacks} >= {"ddim", "ddim_addt", "vpsde", "vpsde_addt", "edm", "edm_addt"}
    assert "attack/vanilla/linf/dwbox_c0/pgd" not in attacks
    assert {j.split("/")[0] for j in jobs} == {"train_classifier", "train_diffusion", "train_addt", "evaluate_clean",
                                               "attack", "loss_landscape", "p2_lp_distances", "p2_randomness",
                                               "p2_compression", "sanity"}  # sanity: smoke.yaml's battery


def adaptive_runs():
    return {"attack/{d}/linf/whitebox_eot/diffattack", "attack/{d}/linf/dwbox/diffattack",
            "attack/{d}/linf/whitebox_eot/surrogate", "attack/{d}/linf/whitebox_eot/diffhammer",
            "attack/{d}/linf/whitebox_eot/lowfreq", "attack/{d}/linf/dwbox/aa_standard_dwbox",
            "attack/{d}/linf/whitebox/aa_standard_multieval", "attack/{d}/linf/whitebox_eot/aa_rand"}


# Hand counts for the smoke config: S = 6 reverse steps (t* = 0.1 of a 50-step schedule),
# 16 attacked images, PGD 3 steps (+1 final pass), EOT 2, 3 evaluation draws.
# exact gradient = S unet_fwd + S unet_grad + 1 clf_grad; defended forward = S unet_fwd + 1 clf_fwd.
HAND = {
    # 4 passes x 2 draws = 8 gradients; evaluation 3 defended forwards
    "attack/vanilla/linf/whitebox_eot/pgd": calls(unet_fwd=16 * (8 * 6 + 3 * 6), unet_grad=16 * 8 * 6,
                                                  clf_grad=16 * 8, clf_fwd=16 * 3),
    # 4 gradients; evaluation under the fixed configuration: one forward. The main sampler's DW-box
    # PGD runs attack attacks.dwbox_n_images = 24 images; paper 2's dwbox_c1 the 16 of every other run
    "attack/vanilla/linf/dwbox/pgd": calls(unet_fwd=24 * (4 * 6 + 6), unet_grad=24 * 4 * 6, clf_grad=24 * 4,
                                           clf_fwd=24),
    "attack/clean_finetune/linf/dwbox/pgd": calls(unet_fwd=24 * 30, unet_grad=24 * 24, clf_grad=24 * 4, clf_fwd=24),
    "attack/vanilla/linf/dwbox_c1/pgd": calls(unet_fwd=16 * 30, unet_grad=16 * 24, clf_grad=16 * 4, clf_fwd=16),
    # BPDA: forward chain only, classifier gradient
    "attack/vanilla/linf/whitebox_eot/bpda": calls(unet_fwd=16 * (8 * 6 + 3 * 6), clf_grad=16 * 8, clf_fwd=16 * 3),
    # the low-frequency attack (smoke.yaml: steps 2, eot 2): PGD's count, 3 passes x 2 draws = 6 gradients
    # (the DCT low-pass calls no network); evaluation 3 defended forwards
    "attack/vanilla/linf/whitebox_eot/lowfreq": calls(unet_fwd=16 * (6 * 6 + 3 * 6), unet_grad=16 * 6 * 6,
                                                      clf_grad=16 * 6, clf_fwd=16 * 3),
    "attack/addt/linf/whitebox_eot/lowfreq": calls(unet_fwd=16 * (6 * 6 + 3 * 6), unet_grad=16 * 6 * 6,
                                                   clf_grad=16 * 6, clf_fwd=16 * 3),
    "attack/undefended/linf/none/pgd": calls(clf_grad=16 * 3, clf_fwd=16 * 3),
    # AutoAttack standard (dwbox): APGD-CE 4 grads, APGD-T 2 targets x 4, FAB-T 2 x 3 x (grad + fwd),
    # Square 20 forwards, selection 4 x 1 forward, evaluation 1 forward
    "attack/vanilla/linf/dwbox/aa_standard_dwbox": calls(unet_fwd=16 * (18 * 6 + (6 + 20 + 4 + 1) * 6),
                                                   unet_grad=16 * 18 * 6, clf_grad=16 * 18,
                                                   clf_fwd=16 * (6 + 20 + 4 + 1)),
    # AutoAttack standard on the stochastic purifier (whitebox, Fixed-AutoAttack): the same sub-attacks,
    # selection 4 stages x n_eval 3 forwards, evaluation 3 forwards
    "attack/vanilla/linf/whitebox/aa_standard_multieval": calls(unet_fwd=16 * (18 * 6 + (6 + 20 + 12 + 3) * 6),
                                                                unet_grad=16 * 18 * 6, clf_grad=16 * 18,
                                                                clf_fwd=16 * (6 + 20 + 12 + 3)),
    # AutoAttack rand: APGD-CE and APGD-DLR, 4 passes x EOT 2 each; selection 2 x 3; evaluation 3
    "attack/vanilla/linf/whitebox_eot/aa_rand": calls(unet_fwd=16 * (16 * 6 + 9 * 6), unet_grad=16 * 16 * 6,
                                                      clf_grad=16 * 16, clf_fwd=16 * 9),
    # ADDT: 4 steps x batch 16; 2 CGPO iterations (UNet + classifier gradient) + 1 training pass
    "train_addt/addt": calls(unet_grad=64 * 2, clf_grad=64 * 2, unet_train=64),
    "train_addt/clean_finetune": calls(unet_train=64),
    # ADBM (smoke.yaml: addt.adbm.attack_steps 1): one FGSM step (UNet + classifier gradient) + 1 training pass
    "train_addt/adbm": calls(unet_grad=64, clf_grad=64, unet_train=64),
    # the competing defenses on their competitors.n_images (adbm 16, gdmp 9), DW-box PGD included (not dwbox_n_images):
    # ADBM's chain 5 DDIM calls; GDMP's 2 rounds (config.yaml) of the 6-step chain = 12 calls (guidance: no call)
    "attack/adbm/linf/dwbox/pgd": calls(unet_fwd=16 * (4 * 5 + 5), unet_grad=16 * 4 * 5, clf_grad=16 * 4, clf_fwd=16),
    "attack/gdmp/linf/whitebox_eot/pgd": calls(unet_fwd=9 * (8 * 12 + 3 * 12), unet_grad=9 * 8 * 12, clf_grad=9 * 8,
                                               clf_fwd=9 * 3),
    "attack/gdmp/linf/whitebox_eot/bpda": calls(unet_fwd=9 * (8 * 12 + 3 * 12), clf_grad=9 * 8, clf_fwd=9 * 3),
    "evaluate_clean/gdmp": calls(unet_fwd=48 * 4 * 12, clf_fwd=48 * 5),
    "evaluate_clean/adbm": calls(unet_fwd=48 * 4 * 5, clf_fwd=48 * 5),
    "train_addt/edm_addt": calls(unet_grad=64 * 2, clf_grad=64 * 2, unet_train=64),  # EDM's own ADDT loss
    # the families (families.n_images 16): VP-SDE 5 Euler-Maruyama steps = 5 calls, EDM 3 Heun steps = 5
    "attack/vpsde/linf/dwbox/pgd": calls(unet_fwd=16 * (4 * 5 + 5), unet_grad=16 * 4 * 5, clf_grad=16 * 4,
                                         clf_fwd=16),
    "attack/edm_addt/linf/whitebox_eot/pgd": calls(unet_fwd=16 * (8 * 5 + 3 * 5), unet_grad=16 * 8 * 5,
                                                   clf_grad=16 * 8, clf_fwd=16 * 3),
    "evaluate_clean/edm": calls(unet_fwd=48 * 4 * 5, clf_fwd=48 * 5),
    "train_classifier": calls(clf_train=5 * 1438),  # 5 epochs x (1797 - 359) images
    "train_diffusion": calls(unet_train=300 * 64),
    # 48 images x (classifier alone + 2 random + 2 fixed defended forwards)
    "evaluate_clean/vanilla": calls(unet_fwd=48 * 4 * 6, clf_fwd=48 * 5),
    # min(4 landscape images, 2 tracked) x 25^2 grid
    "loss_landscape/vanilla": calls(unet_fwd=2 * 625 * 6, clf_fwd=2 * 625),
    "loss_landscape/addt": calls(unet_fwd=2 * 625 * 6, clf_fwd=2 * 625),
    # 16 images x (x, x_adv) x (1 draw + 1 recorded chain)
    "p2_lp_distances": calls(unet_fwd=16 * 2 * 2 * 6),
    # 16 images x 2 settings x 8 samples
    "p2_randomness": calls(unet_fwd=16 * 2 * 8 * 6),
    # 2 configs x 16 images x (anchor + 4 probes purified, 1 defended forward);
    # Jacobian 2 images x 64 rows x exact vector-Jacobian product
    "p2_compression/vanilla": calls(unet_fwd=2 * 16 * (5 * 6 + 6) + 2 * 64 * 6, unet_grad=2 * 64 * 6, clf_fwd=32),
    "p2_compression/addt": calls(unet_fwd=16 * 36 + 2 * 64 * 6, unet_grad=2 * 64 * 6, clf_fwd=16),
}


@pytest.mark.parametrize("job", sorted(HAND))
def test_call_counts_match_hand_counts(jobs, job):
    assert jobs[job] == pytest.approx(HAND[job])


def test_autograd_mode_skips_the_forward_chain(smoke):
    cfg = deep_merge(smoke, {"purification": {"grad_mode": "autograd"}})
    got = {j.job: j.calls.as_dict() for j in count_calls(cfg)}["attack/vanilla/linf/dwbox/pgd"]
    # attacks.dwbox_n_images = 24 images
    assert got == pytest.approx(calls(unet_fwd=24 * 6, unet_grad=24 * 24, clf_grad=24 * 4, clf_fwd=24))


def test_disabled_parts_have_no_jobs(smoke):
    vanilla_only = {a: {"defenses": ["vanilla"]} for a in ("diffattack", "surrogate", "diffhammer", "lowfreq")}
    cfg = deep_merge(smoke, {"addt": {"enabled": False}, "analysis": {"enabled": False},
                             "attacks": {"autoattack": {"enabled": False}, "bpda": {"enabled": False},
                                         **vanilla_only}})  # without ADDT the attacks' defenses cannot name addt
    names = [j.job for j in count_calls(cfg)]
    assert not [n for n in names if n.startswith(("train_addt", "p2_")) or "aa_" in n or "bpda" in n]
    assert "attack/vanilla/linf/dwbox_c1/pgd" not in names


def test_estimate_multiplies_calls_by_unit_costs(smoke):
    jobs = count_calls(smoke)
    unit = {k: 0.0 for k in KINDS}
    unit["unet_grad"] = 3600.0  # one hour per image: device-hours = unet_grad calls
    df = estimate(jobs, unit)
    assert list(df["job"])[-1] == "TOTAL"
    body = df[df["job"] != "TOTAL"].set_index("job")
    assert body.loc["attack/vanilla/linf/dwbox/pgd", "device_hours"] == pytest.approx(24 * 24)  # dwbox_n_images 24
    assert body.loc["train_classifier", "device_hours"] == 0
    assert df["device_hours"].iloc[-1] == pytest.approx(body["device_hours"].sum())
    assert df["device_hours"].iloc[-1] == pytest.approx(sum(j.calls.unet_grad for j in jobs))
    assert bool(body.loc["attack/vanilla/linf/dwbox/aa_standard_dwbox", "upper_bound"])
    assert bool(body.loc["attack/vanilla/linf/whitebox/aa_standard_multieval", "upper_bound"])


def test_paper_scale_counts(smoke):
    cfg = validate_config(load_yaml(ROOT / "config/cifar10.yaml"))
    jobs = {j.job: j for j in count_calls(cfg)}
    assert jobs["attack/vanilla/linf/whitebox_eot/pgd"].extra["chain_steps"] == 101
    # PGD-20 x EOT-10 on 1024 images: 21 x 10 exact gradients through 101 steps per image
    assert jobs["attack/vanilla/linf/whitebox_eot/pgd"].calls.unet_grad == 1024 * 21 * 10 * 101
    assert jobs["train_addt/addt"].calls.unet_train == 19600 * 256
    # ADBM: 3 FGSM steps (UNet + classifier gradients) + 1 training pass per image; its chain 5 DDIM calls.
    # GDMP: 4 rounds of its own t* = 0.035 (36 steps, t = 35..0, of the 1000-step grid) = 144 calls per purification
    assert jobs["train_addt/adbm"].calls.unet_grad == 3 * 19600 * 256 == jobs["train_addt/adbm"].calls.clf_grad
    assert jobs["attack/adbm/linf/dwbox/pgd"].calls.unet_grad == 1024 * 21 * 5
    assert jobs["attack/gdmp/linf/dwbox/pgd"].calls.unet_grad == 1024 * 21 * 144
    assert {"evaluate_clean/adbm", "evaluate_clean/gdmp", "sanity/adbm/linf", "sanity/gdmp/linf"} <= set(jobs)
    assert "train_diffusion" not in jobs and "train_classifier" not in jobs  # downloaded
    # the Jacobian of a 3 x 32 x 32 image has 3072 rows
    jac = jobs["p2_compression/clean_finetune"].calls.unet_grad
    assert jac == 4 * 3072 * 101


def test_measurement_and_cli(tmp_path, smoke):
    unit = measure_unit_costs(smoke, device="cpu", batch_size=2, repeats=1)
    assert all(unit[k] > 0 for k in KINDS)
    assert unit["meta"]["device"].startswith("cpu") and unit["meta"]["batch_size"] == 2
    assert torch.get_num_threads() == 1  # restored

    from dbprepro.cli import main

    out = tmp_path / "cost.csv"
    assert main(["estimate-cost", "--config", str(ROOT / "config.yaml"), str(ROOT / "config/smoke.yaml"),
                 "--device", "cpu", "--batch-size", "2", "--repeats", "1", "--csv", str(out)]) == 0
    df = pd.read_csv(out)
    assert df["job"].iloc[-1] == "TOTAL" and df["device_hours"].iloc[-1] > 0
    assert df["measured_on"].str.startswith("cpu").all()
    assert len(df) == len(count_calls(smoke)) + 1


@pytest.mark.parametrize("sampler, extra", [
    ("ddpm", {}), ("ddim", {}),
    ("vpsde", {"vpsde": {"steps": 7, "corrector": False}}),
    ("vpsde", {"vpsde": {"steps": 5, "corrector": True}}),
    ("edm", {"edm": {"steps": 6}}),
])
def test_network_calls_counts_what_each_family_really_calls(sampler, extra, tmp_path):
    """The cost model's per-purification count equals the UNet calls the purifier makes."""
    import torch

    from dbprepro.config import validate_config
    from dbprepro.cost import network_calls
    from dbprepro.purifiers import load_purifier as build_purifier
    from dbprepro.models.diffusion import build_scheduler, build_unet, save_diffusion
    from dbprepro.randomness import Randomness

    cfg = validate_config({"name": "t", "purification": {"sampler": sampler, "num_inference_steps": 100, **extra}})
    pur = cfg["purification"]
    d = tmp_path
    save_diffusion(build_unet(8, 1, [8], attention=[False], norm_num_groups=4), build_scheduler(), d)
    p = build_purifier(d, pur, "fixed_large", Randomness(0, "fixed"), torch.device("cpu"))
    calls = []
    p.unet.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        p(torch.rand(2, 1, 8, 8))
    assert len(calls) == network_calls(pur) > 0


def test_a_cpu_estimate_picks_the_batch_that_answers_in_about_the_target(smoke, capsys):
    from dbprepro.cost.measure import cpu_batch_size

    # 24 timed calls at 0.5 s per image of the costliest call: 60 s -> 5 images; never above the jobs' batch
    assert cpu_batch_size(0.5, 24, 320, target=60) == 5
    assert cpu_batch_size(1e-6, 24, 320, target=60) == 320
    assert cpu_batch_size(100.0, 24, 320, target=60) == 1
    unit = measure_unit_costs(smoke, device="cpu", repeats=1, target_seconds=0.001)
    assert unit["meta"]["batch_choice"].startswith("CPU") and unit["meta"]["batch_size"] == 1
    err = capsys.readouterr().err
    assert "timing each kind of network call" in err and "unet_grad" in err  # says what it measures
