"""Which store a broker uses: the in-memory one or Redis, by the ``store`` setting (keeps store <-> redis_store
acyclic: both stores import ``store``'s base, only this module knows both)."""

from __future__ import annotations

from ..core.errors import ConfigError
from .store import MemoryStore, Store


def make_store(spec: str | None) -> Store:
    """The store named by ``spec``: None or "memory" -> MemoryStore; "redis://..."/"rediss://..." -> RedisStore.

    Raises ConfigError for an unknown scheme or when the Redis store cannot be imported.
    """
    if spec is None or spec == "memory":
        return MemoryStore()
    if spec.startswith(("redis://", "rediss://")):
        try:
            from .redis_store import RedisStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise ConfigError(f"the Redis store cannot be loaded (install the redis package): {exc}") from None
        store: Store = RedisStore(spec)
        return store
    raise ConfigError("store must be 'memory' or a redis:// or rediss:// URL")
