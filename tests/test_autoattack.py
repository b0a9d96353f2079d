import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import dbprepro.attacks.autoattack as aa
from dbprepro.attacks import SELECT_DRAW_OFFSET, evaluate_draws, settings_randomness
from dbprepro.attacks.autoattack import IdTracker, autoattack_batch, monotone_assignment, run_multi_evaluation
from dbprepro.models.classifiers import SmallCNN
from dbprepro.purifiers import DefendedClassifier, Purifier

EPS = 0.1
CFG = dict(n_eval=3, apgd_steps=2, eot_iter=2, n_restarts=1, fab_steps=2, square_queries=10, n_target_classes=2)
COLUMNS = {"id", "label", "correct_single", "correct_mean", "correct_worst", "correct_vote", "norm_l2", "norm_linf",
           "loss_start", "loss_end", "selection_score"}


def defended(tiny_diffusion, setting):
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval()
    with torch.no_grad():
        clf.head[-1].bias.zero_()  # a random CNN with its bias is near-constant; without it, input-dependent
    # t* = 0.1 on a 10-step grid: 2 reverse steps, enough to exercise the chain, fast
    p = Purifier(*tiny_diffusion, t_star=0.1, num_inference_steps=10, randomness=settings_randomness(setting, seed=0))
    return DefendedClassifier(clf, p)


def data(model, b=4):
    g = torch.Generator().manual_seed(5)
    x, ids = torch.rand(b, 1, 8, 8, generator=g), torch.arange(100, 100 + b)
    with torch.no_grad():  # labels = the prediction under the fixed draw 0: clean scores are high
        y = model(x, ids=ids, draws=torch.zeros(b, dtype=torch.long)).argmax(1)
    return x, y, ids


def run(model, x, y, ids, version, setting, norm="linf", eps=EPS):
    return autoattack_batch(model, x, y, ids, version=version, setting=setting, norm=norm, eps=eps, config=CFG,
                            eval_draws=3, seed=0)


# -- id resolution inside torchattacks ---------------------------------------------------------
def test_monotone_assignment_keeps_order_and_handles_duplicates():
    ref = np.array([0.0, 5.0, 5.0, 9.0])  # two identical images (ids 1 and 2)
    queries = np.array([5.1, 5.05, 8.9])  # a subset of rows 1, 2, 3 in order
    dist = np.abs(queries[:, None] - ref[None, :])
    assert dist.argmin(1).tolist() == [1, 1, 3]  # plain nearest neighbour collides
    assert monotone_assignment(dist).tolist() == [1, 2, 3]
    assert monotone_assignment(dist[[0, 2]]).tolist() == [1, 3]
    with pytest.raises(ValueError):
        monotone_assignment(np.zeros((3, 2)))


def test_id_tracker_gives_a_subset_the_ids_of_its_own_images(tiny_diffusion):
    model = defended(tiny_diffusion, "dwbox")
    x, _, ids = data(model)
    tracker = IdTracker(model, x, ids, "linf")
    rows = torch.tensor([1, 3])
    xs = (x[rows] + 0.9 * EPS * torch.sign(torch.randn_like(x[rows]))).clamp(0, 1)
    assert tracker.resolve(xs).tolist() == [101, 103]
    with torch.no_grad():
        out = tracker(xs)
        assert torch.equal(out, model(xs, ids=ids[rows]))
        assert not torch.equal(out, model(xs, ids=ids[:2]))  # the ids matter: fixed noise is per sample
    assert tracker.resolve(x).tolist() == ids.tolist() and tracker.subset_calls == 1


def test_queries_of_a_real_attack_are_resolved_to_their_own_images(tiny_diffusion, monkeypatch):
    model = defended(tiny_diffusion, "whitebox_eot")
    x, y, ids = data(model)
    seen = []
    original = IdTracker.resolve

    def resolve(self, xq):
        out = original(self, xq)
        seen.append((xq.detach().clone(), out.clone(), self.ids.clone(), self.x_ref.clone()))
        return out

    monkeypatch.setattr(IdTracker, "resolve", resolve)
    run(model, x, y, ids, "rand", "whitebox_eot")
    subsets = [s for s in seen if len(s[0]) < len(s[2])]
    assert subsets, "torchattacks should have queried subsets of the batch"
    for xq, got, ref_ids, x_ref in seen:  # every APGD query lies in the eps-ball of the image it was given
        rows = [ref_ids.tolist().index(i) for i in got.tolist()]
        assert (xq.flatten(1) - x_ref[rows]).abs().amax(1).max() <= EPS + 1e-6


# -- multi-evaluation bookkeeping --------------------------------------------------------------
def test_multi_evaluation_keeps_the_lowest_score_and_skips_broken_samples():
    """Scores are encoded in pixel 0 of each image, so the test controls every evaluation."""
    ids = torch.arange(10, 14)
    x = torch.full((4, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = torch.tensor([1.0, 0.5, 0.0, 1.0])  # clean scores; sample 12 is broken from the start
    y = torch.zeros(4, dtype=torch.long)
    proposals = [{10: 0.5, 11: 0.8, 13: 1.0},  # lower / higher / equal
                 {10: 0.0, 11: 0.5, 13: 0.0},  # lower / equal / lower
                 {11: 0.2}]  # only 11 is left with a score > 0
    calls = []

    def fake(k):
        def attack(xs, ys, ids_s):
            calls.append((k, ids_s.tolist()))
            out = xs.clone()
            out[:, 0, 0, 0] = torch.tensor([proposals[k][i] for i in ids_s.tolist()])
            out[:, 0, 1, 1] = k  # a tag: which sub-attack produced the stored example
            return out
        return attack

    def score_fn(xc, yc, idc):
        return xc[:, 0, 0, 0].numpy().astype(np.float64)

    x_best, score, records = run_multi_evaluation(x, y, ids, [(f"a{k}", fake(k)) for k in range(3)], score_fn)
    # the clean input is the initial candidate: sample 12 (score 0) is never attacked, and a later
    # sub-attack only sees the samples still above 0
    assert calls == [(0, [10, 11, 13]), (1, [10, 11, 13]), (2, [11])]
    np.testing.assert_allclose(score, [0.0, 0.2, 0.0, 0.0])
    assert torch.equal(x_best[2], x[2])  # never replaced
    # a candidate replaces the stored example only if strictly lower: 10 <- a1 (after a0), 11 <- a2, 13 <- a1
    assert x_best[:, 0, 1, 1].tolist() == [1.0, 2.0, 0.5, 1.0]
    assert [r["name"] for r in records] == ["clean", "a0", "a1", "a2"]
    assert [r["n_attacked"] for r in records] == [0, 3, 3, 1]
    assert [r["n_replaced"] for r in records] == [0, 1, 2, 1]
    np.testing.assert_allclose([r["mean_score"] for r in records], [0.625, 0.5, 0.25 / 2, 0.05])


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_candidates_are_brought_back_into_the_threat_model(tiny_diffusion, monkeypatch, norm, eps):
    model = defended(tiny_diffusion, "dwbox")
    x, y, ids = data(model)
    # a sub-attack returning far-away images (1 - x) must not escape the eps-ball or [0, 1]
    monkeypatch.setattr(aa, "build_subattacks", lambda *a, **k: [("far", lambda xs, ys, i: (1 - xs) * 1.5 - 0.2)])
    cols, res = run(model, x, y, ids, "standard", "dwbox", norm, eps)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert cols[f"norm_{norm}"].max() <= eps + 1e-5
    assert res.extra["per_subattack"][1]["n_replaced"] > 0  # projected candidates were stored


# -- real runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version,setting", [("standard", "dwbox"), ("standard", "whitebox_eot"),
                                             ("rand", "dwbox"), ("rand", "whitebox_eot")])
def test_autoattack_runs_and_reports_the_attack_batch_columns(tiny_diffusion, version, setting, caplog):
    model = defended(tiny_diffusion, setting)
    x, y, ids = data(model)
    modes = []  # training flags of the networks at every call during the attack
    hooks = [m.register_forward_pre_hook(lambda mod, inp: modes.append(mod.training))
             for m in (model.classifier, model.purifier.unet)]
    with caplog.at_level(logging.INFO, logger="dbprepro.autoattack"):
        cols, res = run(model, x, y, ids, version, setting)
    for h in hooks:
        h.remove()
    assert modes and not any(modes)  # torchattacks' model.train() never reached the networks
    assert all(p.grad is None for p in model.parameters())  # FAB's backward() filled no .grad
    names = ["apgd-ce", "apgd-t", "fab-t", "square"] if version == "standard" else ["apgd-ce", "apgd-dlr"]
    recs = res.extra["per_subattack"]
    assert [r["name"] for r in recs] == ["clean", *names]
    assert all(any(r.getMessage().startswith(f"{n}:") for r in caplog.records) for n in names)
    assert set(cols) == COLUMNS and all(len(v) == 4 for v in cols.values())
    assert cols["id"].tolist() == ids.tolist() and np.isnan(cols["loss_end"]).all()
    assert res.loss is None and res.x_adv.shape == x.shape
    # within the threat model
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1 and cols["norm_linf"].max() <= EPS + 1e-6
    # the running score never goes up, the attack breaks something; the selection score is
    # kept as its own column, while the reported accuracies come from fresh evaluation draws
    means = [r["mean_score"] for r in recs]
    assert all(b <= a for a, b in zip(means, means[1:])) and means[-1] < means[0]
    np.testing.assert_allclose(cols["selection_score"], res.extra["score"])
    sel = evaluate_draws(model, res.x_adv, ids, 3, setting, offset=SELECT_DRAW_OFFSET)
    np.testing.assert_allclose(cols["selection_score"], (sel == y.numpy()[:, None]).mean(1))
    np.testing.assert_allclose(cols["correct_mean"], (evaluate_draws(model, res.x_adv, ids, 3, setting)
                                                      == y.numpy()[:, None]).mean(1))


def test_autoattack_is_replayable_and_leaves_the_process_as_it_found_it(tiny_diffusion):
    model = defended(tiny_diffusion, "whitebox_eot")
    x, y, ids = data(model)
    model.train()  # a user's model may come in training mode: torchattacks would call model.train() after attacking
    modes = {m: m.training for m in model.modules()}
    rng = torch.get_rng_state()
    cols1, res1 = run(model, x, y, ids, "rand", "whitebox_eot")
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks' manual_seed did not leak
    assert {m: m.training for m in model.modules()} == modes  # every module's flag restored
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad(), model.bind(ids=ids):  # advance the random-mode counters in between
        model(x), model(x)
    cols2, res2 = run(model, x, y, ids, "rand", "whitebox_eot")
    assert torch.equal(res1.x_adv, res2.x_adv)
    for k in cols1:
        np.testing.assert_array_equal(cols1[k], cols2[k])


def test_inputs_are_checked(tiny_diffusion):
    model = defended(tiny_diffusion, "whitebox_eot")
    x, y, ids = data(model)
    with pytest.raises(ValueError, match="version"):
        run(model, x, y, ids, "plus", "whitebox_eot")
    with pytest.raises(ValueError, match="fixed"):
        run(model, x, y, ids, "standard", "dwbox")


# -- the three protocols (issue 16) ------------------------------------------------------------
def spy_draws(model):
    """Record the (ids, draws) every purification of ``model`` resolves to."""
    seen, original = [], model.purifier.ids_and_draws

    def ids_and_draws(x, ids, draws):
        out = original(x, ids, draws)
        seen.append((out[0].tolist(), out[1].tolist()))
        return out

    model.purifier.ids_and_draws = ids_and_draws
    return seen


def attacks_section(**autoattack):
    return {"autoattack": {**CFG, **autoattack}, "eval_draws": 3}


def test_the_default_grid_runs_the_three_protocols_separately():
    from dbprepro.attacks import attack_names
    from dbprepro.config import Experiment, load_configs

    runs = Experiment.from_config(load_configs([Path(__file__).parents[1] / "config.yaml"])).attack_runs()
    aa_runs = [(r.defense, r.setting, r.attack) for r in runs if r.attack.startswith("aa_")]
    protocols = [("dwbox", "aa_standard_dwbox"), ("whitebox", "aa_standard_multieval"), ("whitebox_eot", "aa_rand")]
    # autoattack.defenses: vanilla's first, then ADDT's and the competitors' (ADBM, GDMP) grouped by setting
    assert aa_runs[:3] == [("vanilla", s, a) for s, a in protocols]
    assert sorted(aa_runs[3:]) == sorted((d, s, a) for d in ("addt", "adbm", "gdmp") for s, a in protocols)
    assert attack_names()[2:5] == ("aa_standard_dwbox", "aa_standard_multieval", "aa_rand")


def _config(**autoattack):
    from dbprepro.config import deep_merge, load_yaml, validate_config

    raw = load_yaml(Path(__file__).parents[1] / "config.yaml")
    raw["attacks"]["autoattack"].pop("defenses")
    return validate_config(deep_merge(raw, {"attacks": {"autoattack": autoattack}}))


def test_defenses_put_every_protocol_on_the_listed_defenses_and_default_to_vanilla():
    from dbprepro.config import Experiment

    for defenses, expected in ((None, {"vanilla"}), (["vanilla", "addt"], {"vanilla", "addt"}),
                               (["vanilla", "addt", "ddim"], {"vanilla", "addt", "ddim"})):
        cfg = _config() if defenses is None else _config(defenses=defenses)
        runs = Experiment.from_config(cfg).attack_runs()
        by = {a: {r.defense for r in runs if r.attack == a} for a in ("aa_standard_dwbox", "aa_standard_multieval",
                                                                        "aa_rand")}
        assert by == dict.fromkeys(by, expected)  # the three protocols share the section
        assert len(runs) == len(set(runs))


def test_an_unknown_defense_is_refused_and_where_it_runs_stays_out_of_the_runs_params():
    from dbprepro.config import ConfigError, Experiment

    with pytest.raises(ConfigError, match=r"attacks\.autoattack\.defenses: \['vote'\]"):
        _config(defenses=["vanilla", "vote"])
    a, b = Experiment.from_config(_config()), Experiment.from_config(_config(defenses=["vanilla", "addt"]))
    for setting, attack in (("dwbox", "aa_standard_dwbox"), ("whitebox_eot", "pgd"), ("dwbox", "pgd")):
        pa, pb = a.attacks("vanilla", setting, attack), b.attacks("vanilla", setting, attack)
        assert pa == pb and "defenses" not in pa["autoattack"]  # listing ADDT reruns none of vanilla's runs


def test_the_old_name_is_a_deprecated_alias_outside_the_grid():
    from dbprepro.attacks import AutoAttackStandardDWBox, attack_class, attack_names

    with pytest.warns(DeprecationWarning, match="aa_standard_dwbox"):
        assert attack_class("aa_standard") is AutoAttackStandardDWBox
    assert "aa_standard" not in attack_names()
    with pytest.raises(ValueError, match="aa_standard_multieval"):  # an unknown name lists the registered ones
        attack_class("aa_standard_fixed")


def test_multieval_reevaluates_each_candidate_n_eval_times_with_fresh_draws(tiny_diffusion, monkeypatch, caplog):
    from dbprepro.attacks import AutoAttackStandardMultiEval

    cls = AutoAttackStandardMultiEval
    assert (cls.version, cls.setting) == ("standard", "whitebox")
    model = defended(tiny_diffusion, cls.setting)
    x, y, ids = data(model)
    g = torch.Generator().manual_seed(1)
    cands = [(x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1) for _ in range(2)]
    # two stand-in sub-attacks proposing fixed candidates (projected into the eps-ball by the protocol)
    monkeypatch.setattr(aa, "build_subattacks", lambda *a, **k: [
        (f"c{j}", lambda xs, ys, i, j=j: cands[j][torch.as_tensor([ids.tolist().index(v) for v in i.tolist()])])
        for j in range(2)])
    seen = spy_draws(model)
    n_eval = 4
    with caplog.at_level(logging.WARNING, logger="dbprepro.autoattack"):
        cols, res = cls.run_batch(model, x, y, ids, setting=cls.setting, threat={"norm": "linf", "eps": 0.3},
                                  attacks=attacks_section(n_eval=n_eval), seed=0)
    assert not [r for r in caplog.records if "use 'rand'" in r.getMessage()]  # the intended protocol
    recs = res.extra["per_subattack"]
    select = [(i, d) for i, d in seen if min(d) >= SELECT_DRAW_OFFSET]
    stages = 1 + sum(r["n_attacked"] > 0 for r in recs[1:])
    assert len(select) == n_eval * stages  # every scored candidate re-evaluated n_eval times
    for s in range(stages):  # ... each time with a different selection draw of the stochastic purifier
        block = select[s * n_eval:(s + 1) * n_eval]
        assert [d[0] - SELECT_DRAW_OFFSET for _, d in block] == list(range(n_eval))
    with torch.no_grad():  # distinct draws are distinct purifications
        p = [model.purifier(x, ids=ids, draws=torch.full_like(ids, SELECT_DRAW_OFFSET + k)) for k in range(2)]
    assert not torch.equal(p[0], p[1])
    # the selection keeps, per image, the first candidate with the strictly lowest n_eval-draw score
    proj = [(x + (c - x).clamp(-0.3, 0.3)).clamp(0, 1) for c in cands]
    scores = [(evaluate_draws(model, c, ids, n_eval, "whitebox", offset=SELECT_DRAW_OFFSET)
               == y.numpy()[:, None]).mean(1) for c in (x, *proj)]
    want = np.stack(scores).argmin(0)  # argmin keeps the first of equal scores: a tie does not replace
    for b in range(len(ids)):
        assert torch.allclose(res.x_adv[b], (x, *proj)[want[b]][b]), b
    np.testing.assert_allclose(cols["selection_score"], np.stack(scores).min(0))
    assert len(set(want.tolist())) > 1  # the check is not vacuous: several candidates win


def test_dwbox_protocol_keeps_single_evaluation_behaviour(tiny_diffusion, caplog):
    from dbprepro.attacks import AutoAttackStandardDWBox

    cls = AutoAttackStandardDWBox
    assert (cls.version, cls.setting) == ("standard", "dwbox")
    out = {}
    for n_eval in (1, 3):
        model = defended(tiny_diffusion, cls.setting)
        x, y, ids = data(model)
        seen = spy_draws(model)
        with caplog.at_level(logging.WARNING, logger="dbprepro.autoattack"):
            out[n_eval] = cls.run_batch(model, x, y, ids, setting="dwbox", threat={"norm": "linf", "eps": EPS},
                                        attacks=attacks_section(n_eval=n_eval), seed=0)
        assert {d for _, ds in seen for d in ds} == {0}  # only the fixed configuration, also for the selection
        assert sum(r["n_attacked"] > 0 for r in out[n_eval][1].extra["per_subattack"]) >= 1  # something attacked
    assert not caplog.records  # no warning: standard on the deterministic purifier is as intended
    (c1, r1), (c3, r3) = out[1], out[3]
    assert torch.equal(r1.x_adv, r3.x_adv)  # n_eval = 3 on a fixed purifier is n_eval = 1
    for k in c1:
        np.testing.assert_array_equal(c1[k], c3[k])


def test_standard_outside_the_multieval_protocol_on_a_stochastic_purifier_warns(tiny_diffusion, monkeypatch, caplog):
    from dbprepro.attacks import AutoAttackStandardDWBox

    model = defended(tiny_diffusion, "whitebox")
    x, y, ids = data(model)
    monkeypatch.setattr(aa, "build_subattacks", lambda *a, **k: [])
    with caplog.at_level(logging.WARNING, logger="dbprepro.autoattack"):
        AutoAttackStandardDWBox.run_batch(model, x, y, ids, setting="whitebox", threat={"norm": "linf", "eps": EPS},
                                          attacks=attacks_section(), seed=0)
    assert any("aa_standard_multieval" in r.getMessage() for r in caplog.records)
