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
import warnings

#: old module path -> new module path
MOVED: dict[str, str] = {
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
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path will be removed in a later release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):  # the new module is already executed
        pass


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
