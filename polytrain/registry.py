"""Named lookups that fail loudly: every pluggable thing (tokenizer, embedder, head) lives in one."""

from typing import Callable, Generic, TypeVar

from polytrain.errors import PolytrainError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table; ``get`` of an unknown name lists the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise PolytrainError(f"{self.kind} {name!r} is already registered to {self._items[name]!r}")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise PolytrainError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
