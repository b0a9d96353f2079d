"""Old import paths of modules that moved into subpackages.

dbprepro's modules were flat until 0.2; they now live in subpackages named after the papers'
concepts (``purifiers``, ``attacks``, ``addt``, ``paper1``, ``paper2``, ...).  Every old path keeps
working: ``import dbprepro.purification`` returns the module object of its new home (so
``monkeypatch.setattr`` on either name patches the same module) and emits a
``DeprecationWarning`` naming the new path.  A move is one line of :data:`MOVED`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module path -> new module path (or the new modules whose public names it had)
MOVED: dict[str, str | tuple[str, ...]] = {
    "dbprepro.purification": "dbprepro.purifiers",
    "dbprepro.continuous": "dbprepro.purifiers",
    "dbprepro.gradients": "dbprepro.purifiers.gradients",
    "dbprepro.autoattack": "dbprepro.attacks.autoattack",
    # split in three: the names of all of them
    "dbprepro.robustness": ("dbprepro.attacks.runner", "dbprepro.paper1.tables", "dbprepro.paper2.fixed_randomness"),
    "dbprepro.checkpoints": "dbprepro.models.checkpoints",
    "dbprepro.compression": "dbprepro.paper2.compression",
    "dbprepro.datasets_cifar": "dbprepro.data.cifar10",
    "dbprepro.distances": "dbprepro.paper2.distances",
    "dbprepro.dominance": "dbprepro.paper2.dominance",
    "dbprepro.figures": "dbprepro.figures_compat",
    "dbprepro.landscape": "dbprepro.paper1.landscape",
    "dbprepro.training": "dbprepro.models.training",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self):
        self._specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        where = new if isinstance(new, str) else " and ".join(new)
        warnings.warn(f"{spec.name} moved to {where}; the old path will be removed in a later release",
                      DeprecationWarning, stacklevel=2)
        if isinstance(new, str):
            module = importlib.import_module(new)
            self._specs[spec.name] = module.__spec__  # the import system overwrites it with the alias's
            return module
        merged = types.ModuleType(spec.name, f"Deprecated: the names of {where}.")
        for name in new:
            module = importlib.import_module(name)
            merged.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return merged

    def exec_module(self, module):  # the new module is already executed; give it its own spec back
        saved = self._specs.pop(module.__spec__.name, None)
        if saved is not None:
            module.__spec__ = saved


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
