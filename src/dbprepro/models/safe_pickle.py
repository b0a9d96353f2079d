"""A pickle reader for which the stream is data: bounded, and unable to act on memory it did not allocate.

:class:`SafeUnpickler` is an opcode interpreter of its own (not ``pickle.Unpickler``), used by the EDM
network pickles (:mod:`.edm_pickle`) and by the pre-scan of torch files (:mod:`.torch_guard`).  Its design:

* **Only listed opcodes.**  The binary opcodes of protocols 2-5 that plain data needs (:data:`OPCODES`); any
  other (``INST``, ``OBJ``, ``EXT*``, ``DUP``, the text opcodes, out-of-band buffers, ...) is refused by name.
* **Every global is a table entry.**  ``GLOBAL``/``STACK_GLOBAL`` look ``(module, name)`` up in the caller's
  table of :class:`Global` (nothing is imported); a name not in it is refused as ``module.name``.  ``REDUCE``
  and ``NEWOBJ`` call only such an entry's own function, which builds an inert record, a fresh container or a
  tensor from memory this reader allocated; the function receives the arguments, never the stack.
* **Mutation only of containers it created, while they are open.**  ``APPEND(S)``, ``SETITEM(S)`` and
  ``ADDITEMS`` act only on a list/dict/set this reader created, ``BUILD`` (once) only on a record whose
  :class:`Global` declares it buildable or a fresh OrderedDict (a state dict's ``_metadata``, a dict of dicts),
  and only while it is *open*: an object is sealed the moment it becomes a child of another object, an argument
  of a call, or is fetched from the memo.  So the stream cannot change a tensor, a used record, or anything it
  did not create, and it cannot build a cycle.
* **Large payloads in place.**  A ``bytes`` payload of at least :data:`LARGE_BYTES` may be handed, unread, to
  the caller's ``large_bytes`` hook (EDM's storage blobs: read from the file straight into a new tensor).
* **Atoms as keys.**  Dict keys and set members must be ``str``/``bytes``/``int``/``float``/``bool``/``None``:
  hashing is linear in the file (no tuple-DAG hashed along every path).
* **Bounds** (:class:`Limits`): nesting depth of every object (also the mark stack), number of objects, total
  allocation (every bytes, container slot and decoded storage is charged to a :class:`Budget`, itself a small
  multiple of the file size; a string by its worst in-memory size, 4 bytes a character, with the bytes it is
  decoded from), and a wall-clock deadline.  A bound that is hit raises :class:`LimitExceeded` naming it, before
  the allocation it refuses.
* **Bounded messages.**  Errors describe stream values by :func:`summary` (type and size; a string key by at
  most 60 of its characters), never by ``repr`` of stream data.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from .bounds import DEFAULT_LIMITS, Budget, LimitExceeded, Limits, UnsafePickleError, binds, summary

__all__ = ["ATOMS", "DEFAULT_LIMITS", "Budget", "Global", "LimitExceeded", "Limits", "OPCODES", "Record",
           "SafeUnpickler", "UnsafePickleError", "summary"]

ATOMS = (str, bytes, int, float, bool, type(None))
#: a bytes payload at least this long is offered to ``large_bytes`` (which reads storage blobs in place)
LARGE_BYTES = 4096
#: bytes charged per value pushed (a small object and its slot) and per container made (with its bookkeeping),
#: so that many tiny values count against the allocation bound as well as large ones
PUSH_BYTES = 48
_UNPACK = {f: struct.Struct(f).unpack for f in ("<B", "<H", "<i", "<I", "<Q", ">d")}


@dataclass(frozen=True)
class Global:
    """An allowed global: ``fn(*args)`` for REDUCE (or NEWOBJ) returns a record, a fresh container or a
    tensor.  ``buildable``: the type whose fresh instances may take ONE BUILD (``obj._build(state)``);
    ``fresh``: the result is a new open container (e.g. an empty OrderedDict that SETITEMS fills)."""

    qualname: str
    fn: Callable[..., Any] | None = None
    buildable: bool = False
    fresh: bool = False
    value: Any = None  #: what an argument-only global stands for (a dtype, a type marker)

    def __repr__(self):
        return f"<{self.qualname}>"


class Record:
    """Base of inert records made by :class:`Global` functions.  ``needs_build``: the record is a
    placeholder until its BUILD (refused at STOP if it never came)."""

    needs_build = False

    def _build(self, state: Any) -> None:  # pragma: no cover - overridden by buildable records
        raise UnsafePickleError(f"BUILD on {type(self).__name__}")


class SafeUnpickler:
    """Reads one pickle from binary file ``f`` (module docstring).  ``globals_``: ``{(module, name):
    Global}``; ``persistent``: the function of a persistent id (else BINPERSID is refused); ``budget``
    is charged for everything allocated.  ``large_bytes(f, n)``: offered a bytes payload of n >=
    :data:`LARGE_BYTES` before it is read; it returns a record read from ``f`` (exactly n bytes), or
    None, having read nothing, to get plain bytes."""

    def __init__(self, f, globals_: dict[tuple[str, str], Global], budget: Budget, limits: Limits = DEFAULT_LIMITS,
                 persistent: Callable[[Any], Any] | None = None, where: str = "the stream",
                 large_bytes: Callable[[Any, int], Any] | None = None):
        self.f, self.read, self.readline, self.large_bytes = f, f.read, f.readline, large_bytes
        self.globals, self.budget, self.limits, self.persistent, self.where = globals_, budget, limits, persistent, where
        self.stack: list = []
        self.metastack: list = []
        self.memo: dict[int, Any] = {}  # stack and memo: reset by each load
        self.info: dict[int, list] = {}  # id -> [depth, open] of every object this reader made
        self.keep: list = []  # keeps those objects alive, so their ids stay unique during the load
        self.pending: list[Record] = []
        self.count = 0

    # -- bookkeeping --------------------------------------------------------------------------
    def _fail(self, msg: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.where}: {msg}")

    def _made(self, obj, depth: int, open_: bool, nbytes: int = 160) -> Any:
        if depth > self.limits.max_depth:
            raise LimitExceeded(f"{self.where}: nesting deeper than {self.limits.max_depth} (Limits.max_depth)")
        self.budget.charge(nbytes, "an object")
        self.info[id(obj)] = [depth, open_]
        self.keep.append(obj)
        return obj

    def _push(self, obj) -> None:
        self.count += 1
        if self.count > self.limits.max_objects:
            raise LimitExceeded(f"{self.where}: more than {self.limits.max_objects} objects (Limits.max_objects)")
        b = self.budget  # Budget.charge inlined: this runs for every value
        if not self.count & 0xFFF:
            b.check_time()
        if b.bytes_left < PUSH_BYTES:
            b.charge(PUSH_BYTES, "a value")
        b.bytes_left -= PUSH_BYTES
        b.used += PUSH_BYTES
        self.stack.append(obj)

    def _pop_mark(self) -> list:
        if not self.metastack:
            raise self._fail("mark expected on the stack")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def _pop(self):
        if not self.stack:
            raise self._fail("stack underflow")
        return self.stack.pop()

    def _popn(self, n: int) -> list:
        if len(self.stack) < n:
            raise self._fail("stack underflow")
        items = self.stack[-n:]
        del self.stack[-n:]
        return items

    def _children(self, items) -> int:
        depth, info = 0, self.info
        for x in items:
            i = info.get(id(x))
            if i is not None:
                i[1] = False  # sealed: now a child or an argument
                if i[0] > depth:
                    depth = i[0]
        return depth + 1

    def _target(self, types, opname: str):
        if not self.stack:
            raise self._fail(f"{opname} with an empty stack")
        obj = self.stack[-1]
        i = self.info.get(id(obj))
        if not isinstance(obj, types) or i is None or not i[1]:
            t = type(obj)
            state = "a sealed " if i is not None and isinstance(obj, types) else ""
            raise self._fail(f"refused opcode {opname} on {state}{t.__module__}.{t.__qualname__} (only on a "
                             "container or buildable record this reader created, before it is used)")
        return obj, i

    def _key(self, k, opname: str):
        if type(k) not in ATOMS:
            raise self._fail(f"refused {opname}: key/member {summary(k)} is not a str, bytes, number, bool or None")
        return k

    # -- the loop -----------------------------------------------------------------------------
    def load(self) -> Any:
        """The next pickle of the file (each with its own stack and memo; the bounds hold across loads)."""
        self.stack, self.metastack, self.memo = [], [], {}
        dispatch, read = _DISPATCH, self.read
        while True:
            op = read(1)
            if not op:
                raise self._fail("pickle data ended before STOP")
            fn = dispatch.get(op[0])
            if fn is None:
                raise self._fail(f"refused opcode {_opname(op[0])}")
            if fn is _STOP:
                if len(self.stack) != 1 or self.metastack:
                    raise self._fail("STOP with an unbalanced stack")
                left = [r for r in self.pending if r.needs_build]
                if left:
                    raise self._fail(f"refused: {type(left[0]).__name__} without its BUILD (an unfilled record)")
                return self.stack[0]
            fn(self)

    def _readn(self, n: int, what: str) -> bytes:
        self.budget.charge(n, what)
        data = self.read(n)
        if len(data) != n:
            raise self._fail(f"{what} of {n} bytes runs past the end of the data")
        return data

    def _u(self, fmt: str, n: int) -> int:
        data = self.read(n)
        if len(data) != n:
            raise self._fail("truncated opcode argument")
        return _UNPACK[fmt](data)[0]

    # -- opcodes ------------------------------------------------------------------------------
    def op_PROTO(self):
        if self._u("<B", 1) > 5:
            raise self._fail("unsupported pickle protocol")

    def op_MARK(self):
        if len(self.metastack) >= self.limits.max_depth:
            raise LimitExceeded(f"{self.where}: MARKs nested deeper than {self.limits.max_depth} (Limits.max_depth)")
        self.metastack.append(self.stack)
        self.stack = []

    def op_POP(self):
        self.stack.pop() if self.stack else self._pop_mark()

    def _data(self, n: int, kind: str):
        if kind == "bytes" and n >= LARGE_BYTES and self.large_bytes is not None:
            value = self.large_bytes(self.f, n)  # may read the payload itself (into memory it allocates)
            if value is not None:
                return self._made(value, 0, False, 0)
        data = self._readn(n, kind)
        if kind == "a string":  # n UTF-8 bytes make at most n characters of 4 bytes: 3n beyond the n read
            self.budget.charge(3 * n, kind)
        return str(data, "utf-8", "surrogatepass") if kind == "a string" else data

    def op_LONG4(self):
        n = self._u("<i", 4)
        if not 0 <= n <= 64:
            raise self._fail(f"refused opcode LONG4 with a {n}-byte integer (at most 64)")
        self._push(int.from_bytes(self._readn(n, "LONG4"), "little", signed=True))

    def _tuple(self, items):
        t = tuple(items)
        self._push(self._made(t, self._children(t), False, 160 + 8 * len(t)) if t else t)

    def op_FROZENSET(self):
        items = [self._key(k, "FROZENSET") for k in self._pop_mark()]
        self.budget.charge(64 + 16 * len(items), "a frozenset")
        fs = frozenset(items)
        self._push(self._made(fs, 1, False, 0))

    def _grow(self, target, info, items, opname):
        self.budget.charge(16 * len(items), opname)
        d = self._children(items)
        if d > self.limits.max_depth:
            raise LimitExceeded(f"{self.where}: nesting deeper than {self.limits.max_depth} (Limits.max_depth)")
        info[0] = max(info[0], d)

    def _append(self, items, opname):
        target, info = self._target(list, opname)
        self._grow(target, info, items, opname)
        target.extend(items)

    def _setitems(self, items, opname):
        if len(items) % 2:
            raise self._fail(f"{opname} with an odd number of items")
        target, info = self._target(dict, opname)
        for k in items[::2]:
            self._key(k, opname)
        self._grow(target, info, items, opname)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def op_ADDITEMS(self):
        items = [self._key(k, "ADDITEMS") for k in self._pop_mark()]
        target, info = self._target(set, "ADDITEMS")
        self._grow(target, info, items, "ADDITEMS")
        target.update(items)

    def _put(self, idx: int):
        if not self.stack:
            raise self._fail("memo PUT with an empty stack")
        if len(self.memo) >= self.limits.max_objects:
            raise LimitExceeded(f"{self.where}: memo larger than {self.limits.max_objects} (Limits.max_objects)")
        self.memo[idx] = self.stack[-1]

    def _get(self, idx: int):
        if idx not in self.memo:
            raise self._fail(f"memo key {idx} not found")
        obj = self.memo[idx]
        self._children([obj])  # seals it: with a second reference the object can no longer be mutated
        self._push(obj)

    def _global(self, module: str, name: str):
        g = self.globals.get((module, name))
        if g is None:
            raise self._fail(f"refused global {module[:100]}.{name[:100]}: not in the allowlist "
                             "(not imported, not executed)")
        self._push(g)

    def op_GLOBAL(self):
        module = self.readline(256)
        name = self.readline(256)
        if not module.endswith(b"\n") or not name.endswith(b"\n"):
            raise self._fail("GLOBAL name longer than 255 bytes")
        self._global(module[:-1].decode("utf-8", "replace"), name[:-1].decode("utf-8", "replace"))

    def op_STACK_GLOBAL(self):
        module, name = self._popn(2)
        if type(module) is not str or type(name) is not str:
            raise self._fail("STACK_GLOBAL of non-strings")
        self._global(module, name)

    def _call(self, opname: str):
        fn, args = self._popn(2)
        if not isinstance(fn, Global) or fn.fn is None:
            what = repr(fn) if isinstance(fn, Global) else summary(fn)
            raise self._fail(f"refused opcode {opname} on {what}: not a callable of the allowlist")
        if type(args) is not tuple:
            raise self._fail(f"{opname} of {fn.qualname} with {summary(args)} arguments")
        depth = self._children(args)
        try:
            result = fn.fn(*args)
        except TypeError:  # named, not a Python traceback about our functions
            said = f"with {len(args)} arguments" if not binds(fn.fn, args) else "of arguments it does not read"
            raise self._fail(f"refused {opname} of {fn.qualname} {said} ({summary(args)})") from None
        if isinstance(result, ATOMS):
            self._push(result)
            return
        self._made(result, depth if not fn.fresh else 1, fn.fresh or fn.buildable)
        if isinstance(result, Record) and result.needs_build:
            self.pending.append(result)
        self._push(result)

    def op_BUILD(self):
        state = self._pop()
        target, info = self._target((Record, OrderedDict), "BUILD")
        info[1] = False  # one BUILD per record
        info[0] = max(info[0], self._children([state]))
        if info[0] > self.limits.max_depth:
            raise LimitExceeded(f"{self.where}: nesting deeper than {self.limits.max_depth} (Limits.max_depth)")
        if isinstance(target, Record):
            target._build(state)
            return
        # a state dict's OrderedDict: its one attribute, ``_metadata`` ({module prefix: {"version": ...}})
        meta = state.get("_metadata") if type(state) is dict and set(state) == {"_metadata"} else None
        if not isinstance(meta, dict) or not all(type(k) is str and isinstance(v, dict) for k, v in meta.items()):
            raise self._fail(f"refused BUILD of an OrderedDict with {summary(state)} (only a state dict's "
                             "_metadata: a dict of dicts)")
        target._metadata = meta

    def op_BINPERSID(self):
        if self.persistent is None:
            raise self._fail("refused opcode BINPERSID: no persistent ids in this stream")
        pid = self._pop()
        depth = self._children([pid])
        result = self.persistent(pid)
        self._push(self._made(result, depth, False))


def _const(value):
    return lambda self: self._push(value)


def _int(fmt: str, n: int):
    return lambda self: self._push(self._u(fmt, n))


def _sized(fmt: str, n: int, kind: str):
    return lambda self: self._push(self._data(self._u(fmt, n), kind))


def _empty(make):
    return lambda self: self._push(self._made(make(), 1, True))


_STOP = object()
#: the opcodes read (pickletools names); every other one is refused by name
OPCODES: dict[int, tuple[str, Any]] = {ord(c) if isinstance(c, str) else c: (n, f) for c, n, f in [
    (0x80, "PROTO", SafeUnpickler.op_PROTO), (0x95, "FRAME", lambda self: self._u("<Q", 8)), (".", "STOP", _STOP),
    ("(", "MARK", SafeUnpickler.op_MARK), ("0", "POP", SafeUnpickler.op_POP),
    ("1", "POP_MARK", SafeUnpickler._pop_mark), ("N", "NONE", _const(None)), (0x88, "NEWTRUE", _const(True)),
    (0x89, "NEWFALSE", _const(False)), ("J", "BININT", _int("<i", 4)), ("K", "BININT1", _int("<B", 1)),
    ("M", "BININT2", _int("<H", 2)), ("G", "BINFLOAT", _int(">d", 8)),
    (0x8A, "LONG1", lambda self: self._push(int.from_bytes(self._data(self._u("<B", 1), "LONG1"), "little",
                                                                    signed=True))),
    (0x8B, "LONG4", SafeUnpickler.op_LONG4),
    (0x8C, "SHORT_BINUNICODE", _sized("<B", 1, "a string")), ("X", "BINUNICODE", _sized("<I", 4, "a string")),
    (0x8D, "BINUNICODE8", _sized("<Q", 8, "a string")), ("C", "SHORT_BINBYTES", _sized("<B", 1, "bytes")),
    ("B", "BINBYTES", _sized("<I", 4, "bytes")), (0x8E, "BINBYTES8", _sized("<Q", 8, "bytes")),
    (")", "EMPTY_TUPLE", _const(())), ("t", "TUPLE", lambda self: self._tuple(self._pop_mark())),
    (0x85, "TUPLE1", lambda self: self._tuple(self._popn(1))), (0x86, "TUPLE2", lambda self: self._tuple(self._popn(2))),
    (0x87, "TUPLE3", lambda self: self._tuple(self._popn(3))), ("]", "EMPTY_LIST", _empty(list)), ("}", "EMPTY_DICT", _empty(dict)),
    (0x8F, "EMPTY_SET", _empty(set)), (0x91, "FROZENSET", SafeUnpickler.op_FROZENSET),
    ("a", "APPEND", lambda self: self._append(self._popn(1), "APPEND")), ("e", "APPENDS", lambda self: self._append(self._pop_mark(), "APPENDS")),
    ("s", "SETITEM", lambda self: self._setitems(self._popn(2), "SETITEM")), ("u", "SETITEMS", lambda self: self._setitems(self._pop_mark(), "SETITEMS")),
    (0x90, "ADDITEMS", SafeUnpickler.op_ADDITEMS), ("q", "BINPUT", lambda self: self._put(self._u("<B", 1))),
    ("r", "LONG_BINPUT", lambda self: self._put(self._u("<I", 4))), (0x94, "MEMOIZE", lambda self: self._put(len(self.memo))),
    ("h", "BINGET", lambda self: self._get(self._u("<B", 1))), ("j", "LONG_BINGET", lambda self: self._get(self._u("<I", 4))),
    ("c", "GLOBAL", SafeUnpickler.op_GLOBAL), (0x93, "STACK_GLOBAL", SafeUnpickler.op_STACK_GLOBAL),
    ("R", "REDUCE", lambda self: self._call("REDUCE")), (0x81, "NEWOBJ", lambda self: self._call("NEWOBJ")),
    ("b", "BUILD", SafeUnpickler.op_BUILD), ("Q", "BINPERSID", SafeUnpickler.op_BINPERSID)]}
_DISPATCH = {c: f for c, (_, f) in OPCODES.items()}


def _opname(code: int) -> str:
    import pickletools

    return next((op.name for op in pickletools.opcodes if op.code == chr(code)), f"0x{code:02x} (not a pickle opcode)")
