"""The served adapters: name -> (path, version), held by the ingress and authoritative for every replica.

Replicas load an adapter lazily, the first time a request names it, under the key `name@version`; a
(re)load of a name gets a new version, so a request in flight keeps the exact adapter it started with and
a replica drops a key once it is no longer current and no request uses it.
"""

from __future__ import annotations

import itertools

from lora_export.serving.protocol import AdapterRef, ApiError, LiveTable, model_not_found


class AdapterTable:
    def __init__(self, base_name: str, adapters: dict[str, str] | None = None):
        self.base_name = base_name
        self._versions = itertools.count(1)
        self._table: dict[str, AdapterRef] = {}
        self.revision = 0
        for name, path in (adapters or {}).items():
            self.add(self.new_ref(name, path))

    def new_ref(self, name: str, path: str) -> AdapterRef:
        if name == self.base_name:
            raise ApiError(400, f"'{name}' is the base model's name: pick another adapter name.", param="lora_name")
        if name in self._table:
            raise ApiError(
                400,
                f"The lora adapter '{name}' has already been loaded: unload it first to load another path.",
                param="lora_name",
            )
        return AdapterRef(name, path, next(self._versions))

    def add(self, ref: AdapterRef) -> None:
        self._table = {**self._table, ref.name: ref}
        self.revision += 1

    def remove(self, name: str) -> AdapterRef:
        if name not in self._table:
            raise ApiError(
                404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="model_not_found"
            )
        ref = self._table[name]
        self._table = {k: v for k, v in self._table.items() if k != name}
        self.revision += 1
        return ref

    def resolve(self, model: str) -> AdapterRef | None:
        """The request's `model`: None for the base model, the adapter's ref, or a 404."""
        if model == self.base_name:
            return None
        ref = self._table.get(model)
        if ref is None:
            raise model_not_found(model)
        return ref

    def live(self) -> LiveTable:
        """name -> version of every current adapter (replicas drop what is not here)."""
        return LiveTable(self.revision, {n: r.version for n, r in self._table.items()})

    def refs(self) -> list[AdapterRef]:
        return list(self._table.values())
