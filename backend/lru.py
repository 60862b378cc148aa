"""A bounded least-recently-used store (entries and bytes), with a memory of what it evicted.

Used for the engines' per-image work (MiniGPT-Med's EVA + projector embeddings, the hf engines' processed pixel
values) and for the service's uploaded images. Thread-safe: the HTTP side and the engine worker both use it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Literal, TypeVar

V = TypeVar("V")

KeyState = Literal["present", "evicted", "unknown"]


class LRUStore(Generic[V]):
    def __init__(self, max_entries: int, max_bytes: int, remember_evicted: int = 4096):
        self.max_entries = max(0, int(max_entries))
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_evicted
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: V, nbytes: int) -> bool:
        """Store ``value`` (``nbytes`` large) as the newest entry, evicting the oldest past either bound. False when
        it is not kept (larger than ``max_bytes`` or a store of size 0)."""
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if self.max_entries == 0 or nbytes > self.max_bytes:
                return False
            self._items[key] = (value, int(nbytes))
            self.bytes += int(nbytes)
            self._evicted.pop(key, None)
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                old, (_, n) = self._items.popitem(last=False)
                self.bytes -= n
                self._evicted[old] = None
                while len(self._evicted) > self._remember:
                    self._evicted.popitem(last=False)
            return True

    def state(self, key: str) -> KeyState:
        with self._lock:
            if key in self._items:
                return "present"
            return "evicted" if key in self._evicted else "unknown"

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
