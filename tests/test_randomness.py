import numpy as np
import pytest
import torch

from dbprepro.randomness import Randomness, Stream, derive_seeds


def test_noise_is_a_pure_function_of_seed_id_draw_and_index():
    r = Randomness(seed=3, mode="fixed")
    ids = torch.tensor([5, 9, 2])
    a = r.normal(ids, torch.tensor([0, 1, 2]), Stream.REVERSE, 40, (1, 4, 4))
    b = Randomness(seed=3, mode="fixed").normal(ids, torch.tensor([0, 1, 2]), Stream.REVERSE, 40, (1, 4, 4))
    assert torch.equal(a, b)
    # each row depends only on its own (id, draw): alone, reordered, inside other batches
    for j in range(3):
        alone = r.normal(ids[j:j + 1], torch.tensor([j]), Stream.REVERSE, 40, (1, 4, 4))
        assert torch.equal(alone[0], a[j])
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(r.normal(ids[perm], torch.tensor([0, 1, 2])[perm], Stream.REVERSE, 40, (1, 4, 4)), a[perm])


@pytest.mark.parametrize("change", ["seed", "id", "draw", "index", "stream", "mode"])
def test_every_key_component_changes_the_noise(change):
    base = dict(seed=1, mode="fixed", stream=Stream.FORWARD, ids=[7], draws=[0], index=100)
    other = dict(base)
    other.update({"seed": {"seed": 2}, "id": {"ids": [8]}, "draw": {"draws": [1]}, "index": {"index": 99},
                  "stream": {"stream": Stream.REVERSE}, "mode": {"mode": "random"}}[change])
    s1 = derive_seeds(base["seed"], base["mode"], base["stream"], base["ids"], base["draws"], base["index"])
    s2 = derive_seeds(other["seed"], other["mode"], other["stream"], other["ids"], other["draws"], other["index"])
    assert s1[0] != s2[0]


def test_noise_is_standard_normal():
    r = Randomness(seed=0, mode="fixed")
    z = r.normal(torch.arange(2000), torch.zeros(2000, dtype=torch.long), Stream.FORWARD, 1, (16,)).flatten()
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1) < 0.01
    # rows are independent: correlation between neighbouring ids is ~0
    m = z.reshape(2000, 16)
    c = np.corrcoef(m[:-1].flatten().numpy(), m[1:].flatten().numpy())[0, 1]
    assert abs(c) < 0.03


def test_fixed_mode_reuses_one_draw_random_mode_gives_fresh_draws():
    ids = torch.tensor([0, 1, 2])
    fixed = Randomness(0, "fixed", fixed_draw=4)
    assert fixed.next_draws(ids).tolist() == [4, 4, 4]
    assert fixed.next_draws(ids).tolist() == [4, 4, 4]
    rnd = Randomness(0, "random")
    assert rnd.next_draws(ids).tolist() == [0, 0, 0]
    assert rnd.next_draws(ids[1:]).tolist() == [1, 1]
    assert rnd.next_draws(ids).tolist() == [1, 2, 2]
    assert rnd.next_draws(ids[:1], k=3).tolist() == [[2, 3, 4]]
    rnd.reset()
    assert rnd.next_draws(ids).tolist() == [0, 0, 0]


def test_random_draws_never_coincide_with_fixed_configurations():
    ids, draws = torch.arange(4), torch.zeros(4, dtype=torch.long)
    f = Randomness(0, "fixed").normal(ids, draws, Stream.FORWARD, 100, (8,))
    r = Randomness(0, "random").normal(ids, draws, Stream.FORWARD, 100, (8,))
    assert not torch.equal(f, r)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        Randomness(0, "sometimes")
    with pytest.raises(ValueError, match="seed"):
        Randomness(-1)


def test_noise_is_device_and_dtype_stable():
    r = Randomness(0, "fixed")
    a = r.normal([1, 2], [0, 0], Stream.REVERSE, 5, (3,), dtype=torch.float64)
    b = r.normal([1, 2], [0, 0], Stream.REVERSE, 5, (3,), dtype=torch.float64, device="cpu")
    assert a.dtype == torch.float64 and torch.equal(a, b)
