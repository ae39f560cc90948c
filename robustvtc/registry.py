"""Name -> class registries with wildcard listing (timm's ``list_models("vit_*")`` style) and plug-ins.

Three ways a class becomes reachable by name:

* built in: ``@REGISTRY.register()`` on the class;
* installed plug-in: a distribution declares an entry point in the registry's group
  (``robustvtc.compressors``, ``robustvtc.attacks``, ``robustvtc.defenses``)::

      [project.entry-points."robustvtc.compressors"]
      my_scorer = "my_package.scorer:MyScorer"

  Entry points are read lazily: listing names reads only their names, and a plug-in's module is imported the
  first time its class is asked for (a broken plug-in fails, in one line, only where it is used);
* by import path: ``"package.module:ClassName"`` anywhere a name is accepted (a scenario, ``get_compressor``,
  ``Target``); the module is imported from ``sys.path`` and the current directory (as ``python -m`` and
  uvicorn do), and the class must subclass the registry's base class.

A plug-in class without its own ``name`` attribute gets the name it was reached by.
"""
from __future__ import annotations

import fnmatch
import importlib
import inspect
import logging
import os
import sys
from typing import Callable, Generic, TypeVar

from .errors import UserInputError

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_import_path(name: str) -> bool:
    """Whether ``name`` is a ``module.path:ClassName`` reference rather than a registered name."""
    return isinstance(name, str) and ":" in name


class Registry(Generic[T]):
    """``group``: the entry-point group plug-ins register in; ``base``: the class plug-ins must subclass
    (set by the module that defines it, after the registry exists)."""

    def __init__(self, kind: str, group: str | None = None, base: type | None = None):
        self.kind = kind
        self.group = group
        self.base = base
        self._items: dict[str, T] = {}
        self._entry_points: dict[str, object] | None = None  # name -> EntryPoint not yet loaded
        self._imported: dict[str, T] = {}  # "module:Class" references resolved so far

    # ------------------------------------------------------------------ built-in registration
    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name")
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = obj
            return obj
        return deco

    # ------------------------------------------------------------------ plug-ins
    def _plugins(self) -> dict[str, object]:
        """Entry points of ``group`` not shadowed by a built-in name (read once per process)."""
        if self._entry_points is None:
            self._entry_points = {}
            if self.group:
                from importlib.metadata import entry_points

                for ep in entry_points(group=self.group):
                    if ep.name in self._items:
                        log.warning("%s plug-in %r (%s) ignored: a built-in %s has that name",
                                    self.kind, ep.name, ep.value, self.kind)
                    else:
                        self._entry_points.setdefault(ep.name, ep)
        return self._entry_points

    def _load_entry_point(self, name: str) -> T:
        ep = self._plugins()[name]
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 -- a plug-in's own error, reported in one line
            raise UserInputError(f"{self.kind} plug-in {name!r} ({ep.value}, entry point group {self.group}) "
                                 f"failed to load: {type(exc).__name__}: {_first_line(exc)}") from None
        self._check_class(obj, f"{self.kind} plug-in {name!r} ({ep.value})")
        if "name" not in vars(obj):
            obj.name = name
        self._items[name] = obj
        del self._entry_points[name]
        return obj

    def _import(self, reference: str) -> T:
        """The class of a ``module.path:ClassName`` reference, imported once."""
        if reference in self._imported:
            return self._imported[reference]
        module_name, _, attr = reference.partition(":")
        if not module_name or not attr or ":" in attr:
            raise UserInputError(f"{self.kind} {reference!r} is not an import path; accepted: module.path:ClassName")
        try:
            module = _import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UserInputError(f"{self.kind} {reference!r}: no module named {exc.name or module_name!r} (searched "
                                 "sys.path and the current directory); accepted: an importable module.path:ClassName "
                                 f"or a registered name ({', '.join(self.names())})") from None
        except Exception as exc:  # noqa: BLE001 -- the module's own error, reported in one line
            raise UserInputError(f"{self.kind} {reference!r}: importing {module_name} failed: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from None
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                found = self._classes_in(module)
                raise UserInputError(f"{self.kind} {reference!r}: module {module_name} has no {attr!r}; accepted: "
                                     + (", ".join(f"{module_name}:{n}" for n in found) if found
                                        else f"a {self._base_name()} subclass defined there (it has none)"))
            obj = getattr(obj, part)
        self._check_class(obj, f"{self.kind} {reference!r}")
        if "name" not in vars(obj):
            obj.name = reference
        self._imported[reference] = obj
        return obj

    def _check_class(self, obj, what: str) -> None:
        if self.base is not None and not (inspect.isclass(obj) and issubclass(obj, self.base)):
            got = f"class {obj.__name__}" if inspect.isclass(obj) else type(obj).__name__
            raise UserInputError(f"{what} is a {got}, not a subclass of {self._base_name()}; accepted: a class "
                                 f"deriving from {self.base.__module__}.{self.base.__qualname__}")

    def _classes_in(self, module) -> list[str]:
        """Public subclasses of the base class in ``module``: those defined there, else any it imports."""
        found = {n: v for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_")
                 and v is not self.base and (self.base is None or issubclass(v, self.base))}
        own = [n for n, v in found.items() if v.__module__ == module.__name__]
        return sorted(own or found)

    def _base_name(self) -> str:
        return self.base.__name__ if self.base is not None else self.kind

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if isinstance(name, str) and name in self._plugins():
            return self._load_entry_point(name)
        if is_import_path(name):
            return self._import(name)
        hint = ""
        if isinstance(name, str) and "." in name and not name.startswith("."):
            hint = f" (an import path is written module.path:ClassName, e.g. {name.rpartition('.')[0]}:" \
                   f"{name.rpartition('.')[2]})"
        raise UserInputError(f"unknown {self.kind} {name!r}{hint}; accepted: {', '.join(self.names())}, "
                             "or module.path:ClassName")

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names (built-in and installed plug-ins, the latter without importing them)."""
        return sorted(n for n in {*self._items, *self._plugins()} if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        if name in self._items or name in self._plugins():
            return True
        if is_import_path(name):
            try:
                self._import(name)
            except UserInputError:
                return False
            return True
        return False

    def items(self):
        """(name, class) of every registered name; a plug-in that fails to load is left out with a warning."""
        for name in list(self._plugins()):
            try:
                self._load_entry_point(name)
            except UserInputError as exc:
                log.warning("%s", exc)
        return sorted(self._items.items())


def _import_module(name: str):
    """``importlib.import_module`` that also searches the current directory (as ``python -m`` does)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path or not (exc.name and name.startswith(exc.name.split(".")[0])):
            raise
    sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        sys.path.remove(cwd)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
