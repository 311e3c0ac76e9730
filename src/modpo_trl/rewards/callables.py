"""What a reward function's scores depend on, as one digest: `callable_fingerprint(fn)`.

A function is keyed by everything its behaviour can depend on, never by its name alone:

- its code: the code object that runs, and the source files of the package it lives in (every `.py` file of
  its top-level package, or its module file alone), so that an edited helper in another module of the package
  changes the key too. Code of installed packages (site-packages, the standard library, built-ins) is keyed by
  the distribution's name and version (or the Python version), not read;
- the values it reads when called: defaults, closure cells, the module globals its code names, a bound
  method's object, a callable instance's attributes, a `functools.partial`'s arguments; recursively through the
  functions, classes and objects reached (objects by their pickle state, `__reduce_ex__`).

Anything whose state cannot be read (a lock, an open file, a network client, a generator) makes the behaviour
unknowable: `Unfingerprintable` says what it was. Data files a function reads at run time are not covered.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import marshal
import os
import site
import sys
import sysconfig
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import file_digest

__all__ = ["Unfingerprintable", "callable_fingerprint"]

_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes)
_MAX_NODES = 200_000  # objects visited; beyond this the state is not worth reading (say so instead)
# Class attributes that describe the class rather than hold state or behaviour.
_CLASS_METADATA = {"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__abstractmethods__"}


class Unfingerprintable(TypeError):
    """The behaviour of a callable cannot be read from its code and state."""


def callable_fingerprint(fn: Any) -> str:
    """A digest that changes whenever `fn`'s behaviour can (see the module docstring); raises
    `Unfingerprintable` when that cannot be known."""
    walker = _Walker()
    walker.add(fn)
    return walker.hexdigest()


# ----------------------------------------------------------------------------------------------- source files
@functools.cache
def _install_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    roots += site.getsitepackages() + [site.getusersitepackages()]
    return tuple(sorted({os.path.realpath(r) + os.sep for r in roots}))


def _is_installed(file: str) -> bool:
    return bool(file) and os.path.realpath(file).startswith(_install_roots())


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _installed_key(top: str, file: str) -> tuple | None:
    """(distribution, version) of an installed top-level package; the Python version for the standard library."""
    names = _distributions().get(top)
    if names:
        return ("dist", names[0], importlib.metadata.version(names[0]))
    if "site-packages" not in file and "dist-packages" not in file:
        return ("python", sys.version)
    return None  # installed files of no known distribution: read them


def _module_key(module: types.ModuleType) -> tuple:
    """The version of a module's code: its distribution for installed packages, else the content of every
    `.py` file of its top-level package (or of the module alone when it is not in a package)."""
    name = module.__name__
    file = getattr(module, "__file__", None)
    if file is None:  # built in, or code typed at a prompt (whose code objects are read)
        return ("no file", name, sys.version)
    top = sys.modules.get(name.split(".")[0], module)
    if _is_installed(file):
        key = _installed_key(top.__name__, file)
        if key is not None:
            return key
    roots = list(getattr(top, "__path__", None) or [])
    if not roots:
        return ("file", name, file_digest(file))
    files = sorted((os.path.relpath(p, root), str(p)) for root in roots for p in Path(root).rglob("*.py"))
    return ("package", top.__name__, [(relative, file_digest(path)) for relative, path in files])


# ------------------------------------------------------------------------------------------------------ walker
def _names(code: types.CodeType) -> set[str]:
    """Global and attribute names the code (and its nested functions) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


class _Walker:
    """Feeds a digest with a canonical description of an object graph; functions and classes by code, objects by
    state. Shared and cyclic references are written as back-references."""

    def __init__(self):
        self.digest = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self.alive: list[Any] = []  # keeps visited objects alive so that their ids are not reused
        self.modules: set[str] = set()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def emit(self, *parts: Any) -> None:
        self.digest.update(repr(parts).encode())

    def add(self, obj: Any) -> None:
        if type(obj) in _PRIMITIVES:
            self.emit(type(obj).__name__, obj)
            return
        if id(obj) in self.seen:
            self.emit("ref", self.seen[id(obj)])
            return
        if len(self.seen) >= _MAX_NODES:
            raise Unfingerprintable(f"its state reaches more than {_MAX_NODES} objects")
        self.seen[id(obj)] = len(self.seen)
        self.alive.append(obj)
        self._add(obj)

    def _add(self, obj: Any) -> None:  # noqa: C901 - one branch per kind of object
        if type(obj) in (list, tuple):
            self.emit(type(obj).__name__, len(obj))
            for item in obj:
                self.add(item)
        elif type(obj) is dict:
            self.emit("dict", len(obj))
            for key, value in obj.items():
                self.add(key)
                self.add(value)
        elif type(obj) in (
            set,
            frozenset,
        ):  # iteration order follows string hashing, which varies per process
            self.emit(type(obj).__name__, sorted(callable_fingerprint(item) for item in obj))
        elif isinstance(obj, np.ndarray):
            self._array(obj)
        elif isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu().contiguous()
            self.emit("tensor", str(tensor.dtype), tuple(tensor.shape))
            self.digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, types.FunctionType):
            self._function(obj)
        elif isinstance(obj, types.MethodType):
            self.emit("method")
            self.add(obj.__func__)
            self.add(obj.__self__)
        elif isinstance(obj, functools.partial):
            self.emit("partial")
            self.add(obj.func)
            self.add(obj.args)
            self.add(obj.keywords)
        elif hasattr(obj, "__wrapped__") and hasattr(
            obj, "cache_info"
        ):  # functools.cache: its memo is no input
            self.emit("cached")
            self.add(obj.__wrapped__)
        elif isinstance(obj, types.BuiltinFunctionType | types.BuiltinMethodType):
            owner = obj.__self__
            self.emit("builtin", getattr(obj, "__module__", None), obj.__qualname__)
            self.add(owner if not isinstance(owner, types.ModuleType) else sys.modules.get("builtins"))
        elif isinstance(obj, types.ModuleType):
            self.emit("module", obj.__name__)
            self._module(obj)
        elif isinstance(obj, type):
            self._class(obj)
        elif isinstance(obj, types.CodeType):
            self._code(obj)
        elif isinstance(obj, staticmethod | classmethod):
            self.emit(type(obj).__name__)
            self.add(obj.__func__)
        elif isinstance(obj, property):
            self.emit("property")
            for accessor in (obj.fget, obj.fset, obj.fdel):
                self.add(accessor)
        elif isinstance(obj, types.CellType):
            try:
                self.add(obj.cell_contents)
            except ValueError:  # an empty cell (a name assigned later)
                self.emit("empty cell")
        else:
            self._object(obj)

    def _array(self, array: np.ndarray) -> None:
        self.emit("ndarray", str(array.dtype), array.shape)
        if array.dtype == object:
            self.add(array.tolist())
        else:
            self.digest.update(np.ascontiguousarray(array).tobytes())

    def _module(self, module: types.ModuleType) -> None:
        if module.__name__ not in self.modules:  # a package's files are read once per fingerprint
            self.modules.add(module.__name__)
            self.emit(_module_key(module))

    def _code(self, code: types.CodeType) -> None:
        # What runs, without file names and line numbers: moving a function does not change its behaviour.
        consts = [c if isinstance(c, types.CodeType) else marshal.dumps(c) for c in code.co_consts]
        self.emit("code", code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)
        self.emit(code.co_argcount, code.co_kwonlyargcount, code.co_posonlyargcount, code.co_flags)
        for const in consts:
            self.add(const)

    def _function(self, fn: types.FunctionType) -> None:
        self.emit("function", fn.__module__, fn.__qualname__)
        module = sys.modules.get(fn.__module__)
        if module is not None:
            self._module(module)
        # The values a function was made with count, also for a library's function (a factory's closure).
        self.add(fn.__defaults__)
        self.add(fn.__kwdefaults__)
        self.add(fn.__closure__)
        if module is not None and _is_installed(getattr(module, "__file__", None) or ""):
            return  # an installed library's code and globals: its version is the key
        self._code(fn.__code__)
        namespace = fn.__globals__
        for name in sorted(_names(fn.__code__)):
            if name in namespace:
                self.emit("global", name)
                self.add(namespace[name])

    def _class(self, cls: type) -> None:
        self.emit("class", cls.__module__, cls.__qualname__)
        module = sys.modules.get(cls.__module__)
        if module is None or module.__name__ == "builtins":
            self.emit("python", sys.version)
            return
        self._module(module)
        if getattr(module, "__file__", None) and _is_installed(module.__file__):
            return
        for base in cls.__mro__[1:]:
            self.add(base)
        for name, value in sorted(vars(cls).items()):
            dunder = name.startswith("__") and name.endswith("__")
            if name in _CLASS_METADATA or name.startswith("_abc_"):
                continue
            if dunder and not isinstance(value, types.FunctionType | staticmethod | classmethod | property):
                continue
            self.emit("attribute", name)
            self.add(value)

    def _object(self, obj: Any) -> None:
        self.emit("object")
        self.add(type(obj))
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception as e:
            raise Unfingerprintable(
                f"it reaches a {type(obj).__qualname__} whose state cannot be read ({e})"
            ) from None
        if isinstance(reduced, str):  # a module-level singleton, named
            self.emit("global", reduced)
            return
        constructor, args, *rest = reduced
        self.add(constructor)
        self.add(args)
        for part in rest:  # state, then list and dict items (iterators), then a state setter
            self.add(list(part) if isinstance(part, Iterator) else part)
