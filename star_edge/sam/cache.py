"""A bounded, thread-safe LRU cache of image embeddings keyed by the image's content.

Both SAM backends keep one per decoder, so a robot asking several queries about the same frame
encodes it once. The key is a BLAKE2b digest of the pixel bytes and the array shape (dtype is
always uint8 here); hashing a 1920 x 1080 RGB frame takes a few milliseconds, encoding it seconds.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from star_edge.errors import InvalidInputError

Entry = TypeVar("Entry")


def image_key(image: np.ndarray) -> bytes:
    """Content key of a C-contiguous (H, W, 3) uint8 image: 32-byte BLAKE2b of shape and bytes."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(np.asarray(image.shape, dtype=np.int64).tobytes())
    digest.update(memoryview(image).cast("B"))
    return digest.digest()


class EmbeddingCache(Generic[Entry]):
    """Least-recently-used map from image content to its embedding, at most `capacity` entries.

    `capacity=0` disables caching (every call computes). Safe to share between threads; two
    threads missing on the same image at once may both compute it, and both get the entry that
    was stored first.
    """

    def __init__(self, capacity: int) -> None:
        """Raises InvalidInputError unless capacity is an int >= 0."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidInputError(f"cache_size must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(self, image: np.ndarray, compute: Callable[[], Entry]) -> Entry:
        """The cached entry for `image` (same content, same shape), else `compute()` stored.

        image: C-contiguous (H, W, 3) uint8.
        """
        if self.capacity == 0:
            return compute()
        key = image_key(image)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
        entry = compute()
        with self._lock:
            entry = self._entries.setdefault(key, entry)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
