"""The ``checkpoint`` comparison of the benchmark suite (``benchmarks/run.py --only checkpoint``, issue 25): the time
to load the largest benign file the package reads with its own pickle reader -- a paper-size EDM-structured pickle
(``EDMSongUNet`` at EDM's CIFAR-10 configuration, 55.7M float32 parameters, ~223 MB), written as NVlabs'
``pickle.dump`` writes it by the tests' writer (``tests/test_edm_pickle.py``: persistence records, ModuleDict,
numpy scalars, one legacy ``torch.save`` blob per storage) -- against ``torch.load(weights_only=True)`` of the same
tensors saved by ``torch.save`` (zip format).  Target: the package's reader (``ema_state_dict``: the safe read and
the walk to a state dict) takes at most 2x torch's time.  ``--quick``: the small test network.

Both files are written once, read once unmeasured (so both are in the page cache), then read ``REPS`` times
each, interleaved, in this process on one torch thread; the medians are compared.  The loaded tensors are checked
equal to the network's.  Rows: ``checkpoint.csv`` (file, bytes, loader, every time and the median).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPS = 5
TARGET_RATIO = 2.0


def bench_checkpoint(h, q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    """Rows (``checkpoint.csv``) and the target of the comparison; ``h`` is the ``run`` module."""
    import pandas as pd
    import torch

    sys.path.insert(0, str(h.ROOT / "tests"))
    from test_edm_pickle import SMALL, edm_pickle_bytes  # the tests' EDM-style writer

    from dbprepro.models.edm_net import EDMSongUNet
    from dbprepro.models.edm_pickle import ema_state_dict

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = EDMSongUNet.from_config(SMALL if q else {})
    name = "small test network" if q else "paper-size EDMSongUNet"
    edm, ref = out / "_bench_edm.pkl", out / "_bench_state.pt"
    edm.write_bytes(edm_pickle_bytes(net, "pass\n"))
    torch.save(net.state_dict(), ref)
    loaders = {"dbprepro ema_state_dict (safe reader)": lambda: ema_state_dict(edm)[0],
               "torch.load(weights_only=True)": lambda: torch.load(ref, map_location="cpu", weights_only=True)}
    files = {"dbprepro ema_state_dict (safe reader)": edm, "torch.load(weights_only=True)": ref}
    own = net.state_dict()
    times: dict[str, list[float]] = {k: [] for k in loaders}
    for label, load in loaders.items():  # warm the page cache; check the values once
        sd = load()
        assert list(sd) == list(own) and all(torch.equal(sd[k], v) for k, v in own.items()), label
        del sd
    for _ in range(1 if q else REPS):
        for label, load in loaders.items():
            t0 = time.perf_counter()
            sd = load()
            times[label].append(time.perf_counter() - t0)
            del sd
    rows = [dict(network=name, parameters=sum(p.numel() for p in net.parameters()), loader=label,
                 file_bytes=files[label].stat().st_size, seconds=statistics.median(ts),
                 all_seconds=" ".join(f"{t:.3f}" for t in ts)) for label, ts in times.items()]
    edm.unlink()
    ref.unlink()
    pd.DataFrame(rows).to_csv(out / "checkpoint.csv", index=False)
    ours, theirs = rows[0]["seconds"], rows[1]["seconds"]
    print(f"  checkpoint {name}: safe reader {ours:.2f} s ({rows[0]['file_bytes'] / 1e6:.0f} MB), torch.load "
          f"{theirs:.2f} s ({rows[1]['file_bytes'] / 1e6:.0f} MB): {ours / theirs:.2f}x", flush=True)
    return rows, [dict(comparison="checkpoint",
                       target=f"{name}: EDM pickle through the safe reader <= {TARGET_RATIO:g}x torch.load(weights_only)",
                       measured=f"{ours:.2f} s vs {theirs:.2f} s ({ours / theirs:.2f}x; medians of "
                                f"{len(times[rows[0]['loader']])})", met=bool(ours <= TARGET_RATIO * theirs))]
