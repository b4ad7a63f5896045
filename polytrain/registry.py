"""Named lookups that fail loudly: every pluggable thing (tokenizer, embedder, head) lives in one.

A registry may also name an entry-point ``group``: installed packages that
declare entry points in it (``[project.entry-points."polytrain.tokenizers"]``
``video = "mypkg.video:VideoTokenizer"``) add their objects under the entry
point's name, with no edit to polytrain.  The group is read on the first
lookup or listing; a plugin's module is imported only when its name is looked
up, so a broken plugin fails only the runs that use it, with a message that
names it.

Built-in entries are declared once, by name, with a ``"module:attribute"`` target, all of them in
``polytrain.config.registries``: a config names and checks them without importing torch, and the target is
imported on the first ``get``.  The modules that define them do not register them again.

A user module can also register things itself (``TOKENIZERS.register("video")
(VideoTokenizer)``); naming it in the recipe's ``plugins`` list imports it
before the config is checked (``import_plugins``).
"""

import importlib
import logging
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Callable, Generic, TypeVar

from polytrain.errors import ConfigError, PolytrainError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """A name -> object table; ``get`` of an unknown name lists the known ones."""

    def __init__(self, kind: str, builtins: dict[str, str] | None = None, group: str | None = None):
        self.kind = kind
        self.group = group
        """Entry-point group whose plugins join this registry; None: built-ins and registered objects only."""
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(builtins or {})
        """Built-in name -> ``"module:attribute"``, imported on the first ``get``."""
        self._plugins: dict[str, EntryPoint] = {}
        self._discovered = group is None

    def register(self, name: str) -> Callable[[T], T]:
        """A plugin module's own entry: ``REGISTRY.register("video")(VideoTokenizer)``; a taken name is refused."""
        def add(item: T) -> T:
            if (name in self._items and self._items[name] is not item) or name in self._lazy:
                raise PolytrainError(f"{self.kind} {name!r} is already registered to "
                                     f"{self._items.get(name, self._lazy.get(name))!r}")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        self._discover()
        if name in self._plugins:
            self._load(name)
        elif name in self._lazy and name not in self._items:
            module, _, attribute = self._lazy[name].partition(":")
            self._items[name] = getattr(importlib.import_module(module), attribute)
        if name not in self._items:
            raise PolytrainError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        self._discover()
        return sorted({*self._items, *self._lazy, *self._plugins})

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._items or name in self._lazy or name in self._plugins

    def _discover(self) -> None:
        """Note the group's entry points (without importing them); names already taken keep their owner."""
        if self._discovered:
            return
        self._discovered = True
        for point in entry_points(group=self.group):
            if point.name in self._items or point.name in self._lazy or point.name in self._plugins:
                log.warning("ignoring %s: %s %r is already registered", describe(point), self.kind, point.name)
                continue
            self._plugins[point.name] = point

    def _load(self, name: str) -> None:
        point = self._plugins.pop(name)
        try:
            item = point.load()
        except Exception as err:  # any failure inside third-party code: report whose code it was
            self._plugins[name] = point
            raise PolytrainError(f"{self.kind} {name!r} comes from {describe(point)}, which failed to load: "
                                 f"{type(err).__name__}: {err}") from err
        self._items[name] = item


def describe(point: EntryPoint) -> str:
    """``entry point 'video = mypkg.video:VideoTokenizer' (group polytrain.tokenizers) of package mypkg 0.1``."""
    package = f" of package {point.dist.name} {point.dist.version}" if point.dist is not None else ""
    return f"entry point '{point.name} = {point.value}' (group {point.group}){package}"


def import_plugins(modules: list[str]) -> None:
    """Import the user modules a recipe's ``plugins`` list names, so their registry calls run.

    They are looked up as ``python -m`` would: installed, on PYTHONPATH, or in the working directory.
    """
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError("plugins", modules, "must be a list of module names, e.g. [my_modality]")
    if modules and "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for index, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as err:  # whatever the user's module raises: name the module and the config key
            raise ConfigError(f"plugins.{index}", name, f"failed to import: {type(err).__name__}: {err}") from err
