"""The low-frequency attack (issue 17, DiffBreak-style DCT-band PGD): its known answers - the full
band is PGD bit for bit, the DCT is orthonormal, the perturbation stays in the band and the ball -
plus replay, the call count, the grid and the waterfall stage."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_attacks import SpyDefense

from dbprepro.attacks import ATTACKS, PGD
from dbprepro.attacks.lowfreq import (LowFreq, band_mask, band_sides, dct2, dct_matrix, idct2, lowpass,
                                      outside_energy)
from dbprepro.config import Experiment, load_configs, validate_config
from dbprepro.paper1.waterfall import STAGES, run_steps, stage_of

ROOT = Path(__file__).resolve().parents[1]
EPS, ALPHA = 8 / 255, 2 / 255


def data(b=3, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(5)
    x = low + (high - low) * torch.rand(b, 1, 8, 8, generator=g)
    return x, torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


def size(d, norm):
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


# -- the DCT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 8, 32])
def test_dct_is_orthonormal_and_is_scipys(n):
    import scipy.fft

    d = dct_matrix(n)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.rand(2, 3, n, n + 1, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(idct2(dct2(x)), x, rtol=0, atol=1e-6)  # float32 round trip
    ref = scipy.fft.dctn(x.double().numpy(), type=2, norm="ortho", axes=(-2, -1))  # an independent implementation
    np.testing.assert_allclose(dct2(x.double()).numpy(), ref, rtol=0, atol=1e-12)


def test_band_and_its_projector():
    assert band_sides(8, 8, 0.25) == (2, 2) and band_sides(32, 32, 0.25) == (8, 8)
    assert band_sides(10, 10, 0.3) == (3, 3)  # 0.3 x 10 = 3.0000000000000004: no spurious 4th frequency
    assert band_sides(8, 8, 0.01) == (1, 1) and band_sides(8, 6, 1.0) == (8, 6)
    with pytest.raises(ValueError, match="fraction"):
        band_sides(8, 8, 0.0)
    mask = band_mask(8, 8, 0.25)
    assert int(mask.sum()) == 4 and bool(mask[:2, :2].all())
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * mask  # built in the band
    d = idct2(X)
    assert float(dct2(d)[..., ~mask].abs().max()) < 1e-12  # zero energy outside the band
    torch.testing.assert_close(lowpass(d, (2, 2)), d, rtol=0, atol=1e-12)
    assert np.abs(outside_energy(d, (2, 2))).max() < 1e-12
    y = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    p = lowpass(y, (2, 2))  # an orthogonal projector: idempotent, the residual orthogonal to the band
    torch.testing.assert_close(lowpass(p, (2, 2)), p, rtol=0, atol=1e-12)
    assert abs(float(((y - p) * d).sum())) < 1e-10
    torch.testing.assert_close(p, idct2(dct2(y) * mask), rtol=0, atol=1e-12)
    assert outside_energy(torch.zeros(2, 1, 8, 8), (2, 2)).tolist() == [0.0, 0.0]


# -- the known answer: the full band is PGD --------------------------------------------------------

@pytest.mark.parametrize("setting,norm,eps,random_start", [("dwbox", "linf", EPS, False),
                                                           ("whitebox_eot", "linf", EPS, True),
                                                           ("whitebox_eot", "l2", 0.5, False)])
def test_full_band_is_pgd(defended, setting, norm, eps, random_start):
    """fraction 1.0 keeps every frequency: the same adversarial examples and loss trace as PGD."""
    x, y, ids = data()
    model = defended(setting)
    kw = dict(steps=3, eot=2, random_start=random_start, track=2)
    ref = PGD(model, setting, norm, eps, eps / 4, **kw)(x, y, ids)
    ours = LowFreq(model, setting, norm, eps, eps / 4, fraction=1.0, **kw)(x, y, ids)
    assert torch.equal(ours.x_adv, ref.x_adv)
    np.testing.assert_array_equal(ours.loss, ref.loss)
    np.testing.assert_array_equal(ours.deltas, ref.deltas)
    assert ours.extra["band"] == (8, 8) and float(np.abs(ours.extra["outside"]).max()) < 1e-10


# -- the perturbation: in the band, in the ball ----------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_perturbation_stays_in_the_band_and_the_ball(norm, eps):
    """Away from the [0, 1] edges (no clip) the final perturbation is exactly low-frequency and inside
    the eps-ball, which binds (steps x alpha > eps); the linear stand-in's loss rises."""
    x, y, ids = data(4, 0.3, 0.7)
    res = LowFreq(SpyDefense("dwbox"), "dwbox", norm, eps, eps / 2, steps=6, fraction=0.25, track=4)(x, y, ids)
    d = res.x_adv - x
    assert bool((size(d, norm) <= eps + 1e-6).all()) and float(size(d, norm).min()) >= eps - 1e-6
    assert float(dct2(d.double())[..., ~band_mask(8, 8, 0.25)].abs().max()) < 1e-6
    assert float(np.abs(res.extra["outside"]).max()) < 1e-10 and res.extra["band"] == (2, 2)
    for delta in torch.as_tensor(res.deltas).view(4, 7, 1, 8, 8).unbind(1):  # every tracked iterate
        torch.testing.assert_close(lowpass(delta.double(), (2, 2)), delta.double(), rtol=0, atol=1e-6)
    assert bool((res.loss[:, -1] > res.loss[:, 0]).all())
    # a PGD step out of the band was needed: plain PGD's perturbation is not low-frequency
    ref = PGD(SpyDefense("dwbox"), "dwbox", norm, eps, eps / 2, steps=6)(x, y, ids)
    assert outside_energy(ref.x_adv - x, (2, 2)).min() > 0.1


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
def test_the_clip_is_accepted_and_its_share_recorded(norm, eps):
    """Saturated pixels (0 and 1): x_adv stays in [0, 1] and in the ball; the energy the clip puts
    outside the band is what ``outside`` reports (here 5 of 8 rows saturate: up to ~75 %)."""
    x, y, ids = data(4)
    x[:, :, :3] = 0.0  # a black background, as the digits'
    x[:, :, -2:] = 1.0
    res = LowFreq(SpyDefense("dwbox"), "dwbox", norm, eps, eps / 2, steps=5)(x, y, ids)
    d = res.x_adv - x
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
    assert bool((size(d, norm) <= eps + 1e-6).all()) and float(size(d, norm).max()) > 0
    out = res.extra["outside"]
    np.testing.assert_allclose(out, outside_energy(d, (2, 2)), rtol=0, atol=1e-12)
    assert out.min() > 1e-4 and out.max() < 0.9


# -- the registered attack -------------------------------------------------------------------------

def config(**lowfreq):
    return validate_config({"name": "t", "attacks": {"eval_draws": 2, "pgd": {"steps": 3, "eot": 2},
                                                     "lowfreq": {"enabled": True, **lowfreq}}})


def test_run_batch_replays_and_counts_pgds_calls(defended):
    """Two runs with the same seed give identical records; the columns are PGD's plus lowfreq_outside;
    the UNet images passed through the network equal calls_per_image, which is PGD's."""
    x, y, ids = data()
    att = config()["attacks"]
    tm = att["threat_models"][0]
    for setting in ("whitebox_eot", "dwbox"):
        runs = []
        for _ in range(2):  # a fresh defense each time: the records come from the seed, not from state
            model = defended(setting)
            seen = []
            hook = model.purifier.unet.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
            try:
                runs.append((*ATTACKS["lowfreq"].run_batch(model, x, y, ids, setting=setting, threat=tm, attacks=att,
                                                           seed=0), sum(seen)))
            finally:
                hook.remove()
        (a, ra, na), (b, rb, nb) = runs
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert torch.equal(ra.x_adv, rb.x_adv) and np.array_equal(ra.loss, rb.loss)
        ref, _ = PGD.run_batch(defended(setting), x, y, ids, setting=setting, threat=tm, attacks=att,
                               seed=0)
        assert set(a) == set(ref) | {"lowfreq_outside"}
        calls, bound = LowFreq.calls_per_image(att, setting, model.purifier.num_steps, "exact")
        assert not bound and na == nb == len(ids) * (calls.unet_fwd + calls.unet_grad)
        assert bool((a["norm_linf"] <= tm["eps"] + 1e-6).all())


def test_calls_per_image_are_pgds():
    att = config()["attacks"]  # steps/eot null: attacks.pgd's
    for setting in ("whitebox_eot", "dwbox", "whitebox"):
        for gm in ("exact", "autograd", "bpda"):
            assert LowFreq.calls_per_image(att, setting, 6, gm) == PGD.calls_per_image(att, setting, 6, gm)
    own = config(steps=5, eot=4)["attacks"]
    same = {**own, "pgd": {**own["pgd"], "steps": 5, "eot": 4}}
    assert LowFreq.calls_per_image(own, "whitebox_eot", 6, "exact") == PGD.calls_per_image(same, "whitebox_eot", 6,
                                                                                            "exact")
    assert LowFreq.calls_per_image(own, "whitebox_eot", 6, "exact") != PGD.calls_per_image(own, "whitebox_eot", 6,
                                                                                            "exact")
    assert run_steps(own, "lowfreq") == 5 and run_steps(config()["attacks"], "lowfreq") == 3


def test_grid_only_when_enabled_and_its_waterfall_stage():
    """Off by default and at paper scale; on in smoke.yaml (vanilla and ADDT); the last stage."""
    assert not [r for r in Experiment.from_config(validate_config({"name": "t"})).attack_runs()
                if r.attack == "lowfreq"]
    for overlay in ([], ["config/cifar10.yaml"]):
        cfg = load_configs([ROOT / "config.yaml", *[ROOT / p for p in overlay]])
        assert not [r for r in Experiment.from_config(cfg).attack_runs() if r.attack == "lowfreq"]
    cfg = load_configs([ROOT / "config.yaml", ROOT / "config/smoke.yaml"])
    runs = [r for r in Experiment.from_config(cfg).attack_runs() if r.attack == "lowfreq"]
    assert [(r.defense, r.setting) for r in runs] == [("vanilla", "whitebox_eot"), ("addt", "whitebox_eot")]
    runs = [r for r in Experiment.from_config(config(settings=["dwbox"])).attack_runs() if r.attack == "lowfreq"]
    assert [(r.defense, r.threat, r.setting) for r in runs] == [("vanilla", "linf", "dwbox")]
    assert LowFreq.private_section and "lowfreq" not in Experiment.from_config(config()).attacks(
        "vanilla", "whitebox_eot", "pgd")
    assert stage_of("lowfreq", "whitebox_eot") == "low-frequency" and STAGES[-1] == "low-frequency"
    with pytest.raises(Exception, match="fraction"):
        config(fraction=0.0)


def test_the_attack_stage_records_the_band_share_and_the_table_reads_them(attack_stage):
    """The DAG's attack stage on the digits (the real images: saturated pixels) writes PGD's columns
    plus lowfreq_outside, in [0, 1); paper 1's main table reads the records."""
    import pandas as pd

    from dbprepro.paper1.tables import p1_main_table

    cfg = validate_config({"name": "t", "data": {"n_test": 64}, "purification": {"num_inference_steps": 50},
                           "attacks": {"n_images": 4, "batch_size": 2, "shards": 1, "track_images": 1,
                                       "pgd": {"steps": 2, "eot": 2}, "eval_draws": 2,
                                       "lowfreq": {"enabled": True}}})
    rec = attack_stage("lowfreq", "whitebox_eot", cfg["attacks"], cfg["purification"])
    assert len(rec) == 4 and set(rec["attack"]) == {"lowfreq"}
    assert rec["lowfreq_outside"].between(0, 1, inclusive="left").all() and (rec["norm_linf"] <= 0.2 + 1e-6).all()
    clean = pd.DataFrame({"id": rec["id"], "setting": "random", "draw": 0, "correct": 1.0})
    table = p1_main_table([rec], {"vanilla": clean})
    assert set(table["attack"]) == {"lowfreq"} and table["robust_accuracy"].between(0, 1).all()
