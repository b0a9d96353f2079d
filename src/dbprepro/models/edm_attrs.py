"""The scalar hyper-parameters of an EDM pickle's module records, checked against the network they are loaded
into: each with its type, finite and in range, and equal to the value the network computes with; the first
that fails is named (a :class:`.bounds.CheckpointError`).

The weights alone do not fix the function: EDM's records also carry how the network runs them.  Checked
(``None`` in :data:`ATTRS`: required; otherwise only when present, as the records of older EDM code lack them):

* ``EDMPrecond``: ``use_fp16`` False (the network runs in float32), ``sigma_min`` >= 0 finite, ``sigma_max`` >
  ``sigma_min`` (EDM's default is infinity);
* ``PositionalEmbedding``: ``endpoint`` True, ``max_positions`` the int 10000, ``num_channels`` an int > 0;
* ``UNetBlock``: ``skip_scale`` finite and equal to the block's, ``num_heads`` the block's head count,
  ``adaptive_scale`` False, ``dropout`` in [0, 1];
* ``GroupNorm``: ``eps`` finite > 0 and equal to the norm's, ``num_groups`` the norm's.

Numbers are compared without converting an int of any size to a float (:func:`real`), so no ``OverflowError``.
"""

from __future__ import annotations

import math
from typing import Any

from .bounds import CheckpointError, summary

FLOAT_INT_BOUND = 1 << 53  # ints beyond this are refused before any float conversion


def real(v: Any) -> float | None:
    """``v`` as a float if it is a bool-free int or float whose conversion is exact and finite, else None."""
    if type(v) is float:
        return v if math.isfinite(v) else None
    if type(v) is int and -FLOAT_INT_BOUND <= v <= FLOAT_INT_BOUND:
        return float(v)
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _check(cls: str, path: str, state: dict, module: Any, where) -> None:
    for key, (required, ok, expect) in ATTRS[cls].items():
        if key not in state:
            if required:
                raise CheckpointError(f"{where}: the {cls} record {path or 'ema'} has no {key}")
            continue
        v, want = state[key], expect(module, state) if expect else None
        if not ok(v) or (want is not None and not (v == want if type(want) in (bool, int) else
                                                  _close(real(v), want))):
            raise CheckpointError(f"{where}: the {cls} record {path or 'ema'} has {key} {summary(v)}"
                                  + (f"; the network computes with {want!r}" if want is not None else
                                     ", not a valid value"))


def _sigma_max_ok(v, state) -> bool:
    lo = real(state.get("sigma_min"))
    return (v == math.inf or real(v) is not None) and lo is not None and v > lo


def _attr(name):
    return lambda module, state: getattr(module, name, None) if module is not None else None


_INT = lambda lo: lambda v: type(v) is int and lo <= v < 1 << 31  # noqa: E731 - a small table of predicates
ATTRS: dict[str, dict[str, tuple]] = {
    "EDMPrecond": {"use_fp16": (True, lambda v: v is False, None),
                   "sigma_min": (True, lambda v: real(v) is not None and v >= 0, None),
                   "sigma_max": (True, lambda v: True, None)},
    "PositionalEmbedding": {"endpoint": (True, lambda v: v is True, None),
                            "max_positions": (True, lambda v: type(v) is int and v == 10000, None),
                            "num_channels": (False, _INT(1), None)},
    "UNetBlock": {"skip_scale": (True, lambda v: real(v) is not None, _attr("skip_scale")),
                  "num_heads": (False, _INT(0), _attr("num_heads")),
                  "adaptive_scale": (False, lambda v: v is False, None),
                  "dropout": (False, lambda v: real(v) is not None and 0 <= v <= 1, None)},
    "GroupNorm": {"eps": (False, lambda v: real(v) is not None and v > 0, _attr("eps")),
                  "num_groups": (False, _INT(1), _attr("num_groups"))},
}


def check_module_attrs(ema: Any, net: Any, where) -> None:
    """Walk the ``ema`` record tree (records of :mod:`.edm_pickle`, each reached once there) beside ``net``'s
    modules (by the same dotted paths) and check every record of a class in :data:`ATTRS`."""
    modules = dict(net.named_modules())
    stack = [("", ema)]
    while stack:
        path, rec = stack.pop()
        state = getattr(rec, "state", None)
        if not isinstance(state, dict):
            continue
        cls = getattr(rec, "class_name", None)
        if cls in ATTRS:
            _check(cls, path, state, modules.get(path), where)
            if cls == "EDMPrecond" and not _sigma_max_ok(state["sigma_max"], state):
                raise CheckpointError(f"{where}: the EDMPrecond record has sigma_max {summary(state['sigma_max'])}, "
                                      f"not above sigma_min {summary(state['sigma_min'])}")
        children = state.get("_modules")
        if isinstance(children, dict):
            stack += [(f"{path}.{k}" if path else k, c) for k, c in children.items() if type(k) is str]
