"""A registry of classes by name: the one mechanism behind the purifier families
(:mod:`dbprepro.purifiers.registry`) and the attacks (:mod:`dbprepro.attacks.registry`)."""

from __future__ import annotations


class Registry(dict):
    """``name -> class`` in registration order; classes register with :meth:`register` (a class
    decorator) under their class attribute ``key``."""

    def __init__(self, kind: str, key: str):
        super().__init__()
        self.kind, self.key = kind, key

    def register(self, cls):
        name = cls.__dict__.get(self.key)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} needs a class attribute {self.key} = '<name>' to be registered")
        if name in self and self[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name].__name__}, {cls.__name__})")
        self[name] = cls
        return cls

    def get_class(self, name: str):
        """The class registered as ``name``, or a ValueError listing the registered ones."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self)}") from None
