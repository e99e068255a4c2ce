"""The Ray Serve shell: an `engine` deployment (N replicas, each a `ServeEngine` over the decoder folder)
behind an `ingress` deployment (the FastAPI app of `openai_api`, the adapter table, per-replica stats).

    HTTP -> Serve proxy -> ingress (1 replica: auth, validation, adapter table)
                              -> engine replicas (scheduler + decoder; spread over the cluster's nodes)

The ingress holds the one authoritative adapter table; each request carries its `AdapterRef` and the table's
live versions, so every engine replica loads what it is asked for and drops what was unloaded, whichever
replica the load/unload request happened to reach. The decoder folder and adapter paths must be readable at
the same path on every node that runs a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import ray.exceptions as ray_errors
from ray import serve
from ray.serve import exceptions as serve_errors

from lora_export.serving import protocol as p
from lora_export.serving.config import ServeConfig
from lora_export.serving.openai_api import build_http_app
from lora_export.serving.protocol import AdapterRef, ApiError, EngineRequest, LiveTable
from lora_export.serving.registry import AdapterTable


@serve.deployment(name="engine")
class EngineDeployment:
    def __init__(self, config: ServeConfig):
        from lora_export.serving.model import open_served_model
        from lora_export.serving.replica import ServeEngine

        model, tokenizer = open_served_model(config.folder, threads=config.threads, step_delay_ms=config.step_delay_ms)
        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # pragma: no cover - outside a replica
            replica = f"pid{os.getpid()}"
        self.engine = ServeEngine(
            model,
            tokenizer,
            max_batch_size=config.max_batch_size,
            batch_wait_ms=config.batch_wait_ms,
            replica=replica,
            max_cpu_adapters=config.max_cpu_adapters,
            max_adapters_per_batch=config.max_adapters_per_batch,
        )

    async def stream(self, request: EngineRequest, live: LiveTable) -> AsyncIterator[dict[str, Any]]:
        async for event in self.engine.stream(request, live):
            yield event

    async def complete(self, request: EngineRequest, live: LiveTable) -> dict[str, Any]:
        return await self.engine.complete(request, live)

    async def check_adapter(self, ref: AdapterRef) -> dict[str, Any] | None:
        """Load `ref` here now: None, or the rejection (status + OpenAI body)."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.ensure_adapter, ref)
        except ApiError as e:
            return {"status": e.status, "body": e.body()}
        return None

    async def sync(self, live: LiveTable) -> None:
        self.engine.sync(live)

    async def stats(self) -> dict[str, Any]:
        return {"replica": self.engine.replica, "stats": self.engine.stats()}

    def check_health(self) -> None:
        """Serve restarts a replica whose scheduler thread died."""
        if not self.engine.scheduler.running:
            raise RuntimeError("the scheduler thread is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


# a replica (its process, or its node) went away under a request: retryable, never a 500 with Ray's internals
REPLICA_LOST = (
    ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.ObjectLostError,  # OwnerDiedError
    serve_errors.DeploymentUnavailableError,
    serve_errors.BackPressureError,
)
if hasattr(serve_errors, "ReplicaUnavailableError"):
    REPLICA_LOST += (serve_errors.ReplicaUnavailableError,)


def replica_lost() -> ApiError:
    return ApiError(
        503,
        "The model replica serving this request stopped (it is being replaced): retry the request.",
        code="replica_unavailable",
    )


@contextlib.contextmanager
def _retryable():
    """Replica loss under a call -> a 503 the client may retry (the official clients retry 503s themselves)."""
    try:
        yield
    except REPLICA_LOST:
        raise replica_lost() from None


class IngressBackend:
    """`openai_api.Backend` over the engine deployment's handle."""

    def __init__(self, engine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.table = AdapterTable(config.model_name, config.served_adapters())
        self.replica_stats: dict[str, dict[str, Any]] = {}
        self._adapter_lock = asyncio.Lock()
        self._context_length = config.context_length()

    def model_cards(self) -> list[dict[str, Any]]:
        ctx = self._context_length
        base = self.config.model_name
        cards = [p.model_card(base, root=base, parent=None, max_model_len=ctx)]  # no server paths to clients
        cards += [p.model_card(r.name, root=r.name, parent=base, max_model_len=ctx) for r in self.table.refs()]
        return cards

    def resolve(self, model: str) -> AdapterRef | None:
        return self.table.resolve(model)

    def _note(self, event: dict[str, Any]) -> None:
        if "stats" in event:
            self.replica_stats[event["replica"]] = event["stats"]

    async def complete(self, request: EngineRequest) -> dict[str, Any]:
        with _retryable():
            result = await self.engine.complete.remote(request, self.table.live())
        _raise_rejected(result)
        self._note(result)
        return result

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        response = self.engine.options(stream=True).stream.remote(request, self.table.live())
        accepted = False
        try:
            with _retryable():
                async for event in response:
                    _raise_rejected(event)
                    self._note(event)
                    accepted = True
                    yield event
        except ApiError as e:
            if not accepted or e.status != 503:
                raise
            # the replica went away mid-stream: the stream ends with a retryable error event, not a cut
            yield {"finish": "error", "error": e.message, "status": 503, "prompt_tokens": 0, "completion_tokens": 0}
        finally:
            response.cancel()  # a client that went away frees its row at the next step

    async def load_adapter(self, name: str, path: str) -> None:
        async with self._adapter_lock:
            ref = self.table.new_ref(name, path)
            rejected = await self.engine.check_adapter.remote(ref)
            if rejected is not None:
                raise ApiError.from_body(rejected["status"], rejected["body"])
            self.table.add(ref)

    async def unload_adapter(self, name: str) -> None:
        async with self._adapter_lock:
            self.table.remove(name)
        await self.engine.sync.remote(self.table.live())  # one replica now; the others with their next request

    async def check_startup_adapters(self) -> list[str]:
        """Load every --adapter once (on one replica): the error lines of those that fail."""
        errors = []
        checked = self.config.checked_at_start()
        for ref in (r for r in self.table.refs() if checked.get(r.name) == r.path):
            rejected = await self.engine.check_adapter.remote(ref)
            if rejected is not None:
                errors.append(rejected["body"]["error"]["message"])
        return errors

    async def stats(self) -> dict[str, Any]:
        now = await self.engine.stats.remote()
        self.replica_stats[now["replica"]] = now["stats"]
        counters = list(self.replica_stats.values())
        numbers = [k for k, v in counters[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        total = {k: sum(c.get(k) or 0 for c in counters) for k in numbers}
        total["mean_rows_per_step"] = round(total["row_steps"] / total["steps"], 3) if total["steps"] else 0.0
        total["max_rows"] = max(c["max_rows"] for c in counters)
        return {"replicas": dict(self.replica_stats), "total": total}


def _raise_rejected(event: dict[str, Any]) -> None:
    if "rejected" in event:
        raise ApiError.from_body(event["rejected"]["status"], event["rejected"]["body"])


@serve.deployment(name="ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(self, engine, config: ServeConfig):
        self.backend = IngressBackend(engine, config)

    def __serve_build_asgi_app__(self):
        config = self.backend.config
        return build_http_app(
            self.backend,
            api_key=config.api_key,
            max_request_bytes=config.max_request_bytes,
            runtime_adapters=config.allow_runtime_adapters,
            adapter_root=config.adapter_root,
        )

    async def check_startup_adapters(self) -> list[str]:
        return await self.backend.check_startup_adapters()


def build_application(config: ServeConfig):
    """The Serve application for `config` (`serve.run(build_application(config))`)."""
    engine = EngineDeployment.options(
        num_replicas=config.replicas,
        max_replicas_per_node=config.max_replicas_per_node,
        max_ongoing_requests=max(64, 4 * config.max_batch_size),
        ray_actor_options={"num_cpus": config.cpus_per_replica},
        health_check_timeout_s=120,
    )
    ingress = IngressDeployment.options(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(config), config)
