"""The majority-vote defense (issue 17, DensePure-style inference): reductions to the single-draw
defense at V = 1, the vote of V controlled draws, replayability, and its place in the grid."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dbprepro.attacks import EVAL_DRAW_OFFSET, PGD, attack_batch, evaluate_draws, settings_randomness
from dbprepro.purifiers.vote import VoteDefense, majority, vote_defense, vote_draws

EPS, ALPHA = 8 / 255, 2 / 255


def data(b=3):
    g = torch.Generator().manual_seed(5)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


# -- V = 1 is the single-draw defense ----------------------------------------------------------------

@pytest.mark.parametrize("setting", ["whitebox_eot", "dwbox"])
def test_one_vote_equals_the_single_draw_defense(defended, setting):
    single = defended(setting)
    vote = vote_defense(single, 1)
    x, y, ids = data()
    d = torch.tensor([0, 7, 2])
    with torch.no_grad():
        assert torch.equal(vote(x, ids=ids, draws=d), single(x, ids=ids, draws=d))
    assert np.array_equal(evaluate_draws(vote, x, ids, 3, setting), evaluate_draws(single, x, ids, 3, setting))
    pgd = {"steps": 2, "eot": 2, "random_start": False, "restarts": 1}
    a_cols, a = attack_batch(vote, x, y, ids, attack="pgd", setting=setting, norm="linf", eps=EPS, alpha=ALPHA,
                             pgd=pgd, eval_draws=2)
    b_cols, b = attack_batch(single, x, y, ids, attack="pgd", setting=setting, norm="linf", eps=EPS, alpha=ALPHA,
                             pgd=pgd, eval_draws=2)
    assert torch.equal(a.x_adv, b.x_adv) and (a.x_adv != x).any()
    assert np.array_equal(a.loss, b.loss)
    assert all(np.array_equal(a_cols[k], b_cols[k]) for k in a_cols)


def test_fixed_mode_votes_once_with_the_configuration(defended):
    single = defended("dwbox_c2", fixed_draw=2)
    vote = vote_defense(single, 5)
    x, _, ids = data()
    d = torch.full((3,), 2)
    assert vote.effective_votes == 1
    with torch.no_grad():
        assert torch.equal(vote(x, ids=ids, draws=d), single(x, ids=ids, draws=d))


# -- V > 1: the vote of controlled draws -------------------------------------------------------------

class DrawLabel(torch.nn.Module):
    """A purifier + classifier stand-in whose prediction is a chosen function of (id, draw): the
    purifier writes the draw into the image, the classifier reads it back as a one-hot logit."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (id, draw) -> label

    def forward(self, z):
        labels = [self.table(int(i), int(d)) for i, d in z[:, :2].round().long().tolist()]
        return torch.nn.functional.one_hot(torch.tensor(labels), 10).float() * 5 + z.sum() * 0


class DrawPurifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.randomness = settings_randomness("whitebox_eot", seed=0)
        self.seen = []

    def ids_and_draws(self, x, ids, draws):
        return torch.as_tensor(ids).reshape(-1), torch.as_tensor(draws).reshape(-1)

    def forward(self, x, ids=None, draws=None):
        self.seen.append(torch.as_tensor(draws).tolist())
        return torch.stack([torch.as_tensor(ids).double(), torch.as_tensor(draws).double()], 1) + 0 * x.flatten(1)[:, :1]


def test_majority_ties_go_to_the_lowest_label():
    labels = torch.tensor([[3, 1, 3, 1], [4, 4, 2, 9], [7, 7, 7, 0], [9, 8, 7, 6]])
    assert majority(labels, 10).tolist() == [1, 4, 7, 6]


def test_vote_draws_are_disjoint_and_one_vote_is_the_draw_itself():
    d = torch.tensor([0, 1, 5, EVAL_DRAW_OFFSET])
    assert vote_draws(d, 3).tolist() == [[0, 1, 2], [3, 4, 5], [15, 16, 17], [3 * EVAL_DRAW_OFFSET + v for v in range(3)]]
    assert vote_draws(d, 1).reshape(-1).tolist() == d.tolist()


def test_prediction_is_the_majority_of_the_single_draw_predictions():
    V = 5
    table = lambda i, d: (i * 7 + d * d) % 3  # noqa: E731 - labels 0..2, varying per purifier draw
    purifier = DrawPurifier()
    vote = VoteDefense(DrawLabel(table), purifier, votes=V)
    x, ids = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for d in (0, 3, EVAL_DRAW_OFFSET + 1):
        draws = torch.full((4,), d)
        singles = np.array([[table(int(i), d * V + v) for v in range(V)] for i in ids])
        counts = np.stack([(singles == c).sum(1) for c in range(10)], 1)
        assert vote.predict(x, ids=ids, draws=draws).tolist() == counts.argmax(1).tolist()
    # the surrogate: log of the V draws' mean softmax probability
    logits = vote(x, ids=ids, draws=torch.zeros(4, dtype=torch.long))
    probs = torch.softmax(torch.nn.functional.one_hot(torch.tensor(
        [[table(int(i), v) for v in range(V)] for i in ids]), 10).float() * 5, -1).mean(1)
    assert torch.allclose(logits.exp(), probs.to(logits.dtype), atol=1e-6)


def test_each_evaluation_draw_is_a_vote_over_its_own_purifications():
    V, n = 3, 4
    purifier = DrawPurifier()
    vote = VoteDefense(DrawLabel(lambda i, d: d % 10), purifier, votes=V)
    x, ids = torch.zeros(2, 1, 8, 8), torch.tensor([10, 11])
    evaluate_draws(vote, x, ids, n, "whitebox_eot")
    used = [d for call in purifier.seen for d in call]
    expected = [(EVAL_DRAW_OFFSET + k) * V + v for k in range(n) for v in range(V)]
    assert sorted(set(used)) == expected  # V distinct purifier draws per evaluation, none shared
    assert min(used) > (1 << 20) * V  # far above any attacker's vote draw


# -- replayable ----------------------------------------------------------------------------------------

def test_same_ids_and_draws_give_the_same_votes(defended):
    vote = vote_defense(defended("whitebox_eot"), 3)
    x, y, ids = data()
    d = torch.tensor([4, 4, 9])
    with torch.no_grad():
        a, b = vote(x, ids=ids, draws=d), vote(x, ids=ids, draws=d)
        c = vote(x, ids=ids, draws=d + 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert np.array_equal(evaluate_draws(vote, x, ids, 3, "whitebox_eot"),
                          evaluate_draws(vote, x, ids, 3, "whitebox_eot"))
    pgd = PGD(vote, "whitebox_eot", steps=1, eot=2)
    assert torch.equal(pgd(x, y, ids).x_adv, pgd(x, y, ids).x_adv)


def test_bpda_copy_keeps_the_votes(defended):
    vote = vote_defense(defended("whitebox_eot"), 4)
    bpda = vote.with_purifier(vote.purifier.with_grad_mode("bpda"))
    assert isinstance(bpda, VoteDefense) and bpda.votes == 4


# -- the grid --------------------------------------------------------------------------------------

def _cfg(vote=None):
    from dbprepro.config import validate_config
    from dbprepro.config.validate import load_yaml

    cfg = load_yaml("config.yaml")
    if vote is not None:
        cfg["vote"] = vote
    return validate_config(cfg)


def test_disabled_by_default_no_vote_defense_and_no_runs():
    from dbprepro.config import Experiment

    exp = Experiment.from_config(_cfg())
    assert exp.vote_defenses == [] and "vanilla_vote" not in exp.defenses
    assert all(r.defense != "vanilla_vote" for r in exp.attack_runs(fixed_configs=True))
    assert all("votes" not in exp.purification(d) for d in exp.defenses)


def test_enabled_adds_the_vote_runs_and_leaves_the_other_params_unchanged():
    from dbprepro.config import Experiment

    off = Experiment.from_config(_cfg())
    on = Experiment.from_config(_cfg({"enabled": True, "votes": 7, "settings": ["whitebox_eot", "whitebox"],
                                      "n_images": 4}))
    d = on.defense("vanilla_vote")
    assert (d.votes, d.sampler, d.weights, d.family, d.trains) == (7, off.defense("vanilla").sampler, "vanilla",
                                                                   False, False)
    runs_off, runs_on = off.attack_runs(fixed_configs=True), on.attack_runs(fixed_configs=True)
    vote_runs = [r for r in runs_on if r.defense == "vanilla_vote"]
    assert [(r.threat, r.setting, r.attack) for r in vote_runs] == [("linf", "whitebox_eot", "pgd"),
                                                                    ("linf", "whitebox", "pgd")]
    assert [r for r in runs_on if r.defense != "vanilla_vote"] == runs_off
    for r in runs_off:
        assert on.attacks(r.defense, r.setting, r.attack) == off.attacks(r.defense, r.setting, r.attack)
        assert on.purification(r.defense) == off.purification(r.defense)
    assert on.purification("vanilla_vote") == {**off.purification("vanilla"), "votes": 7}
    assert on.attacks("vanilla_vote", "whitebox_eot", "pgd")["n_images"] == 4


def test_vote_threat_models_must_be_named():
    from dbprepro.config import ConfigError

    with pytest.raises(ConfigError, match="vote.threat_models"):
        _cfg({"enabled": True, "threat_models": ["nope"]})
