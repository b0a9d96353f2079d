"""A registry of classes by name: the one mechanism behind the purifier families
(:mod:`dbprepro.purifiers.registry`) and the attacks (:mod:`dbprepro.attacks.registry`)."""

from __future__ import annotations

import warnings


class Registry(dict):
    """``name -> class`` in registration order; classes register with :meth:`register` (a class
    decorator) under their class attribute ``key``."""

    def __init__(self, kind: str, key: str):
        super().__init__()
        self.kind, self.key = kind, key
        #: deprecated name -> registered name; :meth:`get_class` resolves it (with a
        #: DeprecationWarning); an alias is no entry of the registry (the grid never sees it)
        self.aliases: dict[str, str] = {}

    def alias(self, old: str, name: str) -> None:
        """Accept the deprecated name ``old`` for the registered ``name`` in :meth:`get_class`."""
        if name not in self:
            raise ValueError(f"cannot alias {old!r} to {name!r}: no {self.kind} {name!r} is registered")
        if old in self:
            raise ValueError(f"{self.kind} {old!r} is registered; it cannot also be an alias")
        self.aliases[old] = name

    def register(self, cls):
        """Class decorator: register ``cls`` under its class attribute ``key``."""
        name = cls.__dict__.get(self.key)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} needs a class attribute {self.key} = '<name>' to be registered")
        if name in self and self[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name].__name__}, {cls.__name__})")
        self[name] = cls
        return cls

    def get_class(self, name: str):
        """The class registered as ``name``, or a ValueError listing the registered ones."""
        if name in self.aliases and name not in self:
            new = self.aliases[name]
            warnings.warn(f"{self.kind} {name!r} is deprecated; it is {new!r} now", DeprecationWarning, stacklevel=2)
            name = new
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self)}") from None
