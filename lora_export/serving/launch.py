"""Start (or join) Ray, deploy the Serve application, wait, and stop everything that was started.

Without `address` (and no `RAY_ADDRESS`), a local Ray instance is started and, on Ctrl-C or SIGTERM, the
Serve application, Serve and that Ray instance are shut down. With `address`, the application is deployed
on that cluster and on exit only the application is deleted (the cluster and its Serve instance stay up).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from lora_export.errors import UserError
from lora_export.serving.config import ServeConfig

STARTUP_TIMEOUT_S = 600.0


def serve(
    config: ServeConfig,
    *,
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until Ctrl-C / SIGTERM (or until `stop` is set); nothing started here is left running."""
    config.check()
    import ray
    from ray import serve as ray_serve

    from lora_export.serving.app import build_application

    stop = stop or threading.Event()
    started_ray = False
    deployed = False
    with _stop_on_signals(stop) as reinstall:
        try:
            if config.address:
                ray.init(address=config.address, log_to_driver=False, logging_level=logging.WARNING)
            else:  # "local": a new instance even when `ray start` left one running on this machine
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
                started_ray = True
            reinstall()  # ray.init sets its own SIGTERM handler (exit at once): ours stops cleanly
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
            ray_serve.start(http_options={"host": config.host, "port": config.port})
            deployed = True
            handle = ray_serve.run(build_application(config), name=config.app_name, route_prefix="/")
            errors = handle.check_startup_adapters.remote().result(timeout_s=STARTUP_TIMEOUT_S)
            if errors:
                raise UserError("; ".join(errors))
            if on_ready is not None:
                on_ready(f"http://{config.host}:{config.port}/v1")
            while not stop.wait(0.5):
                pass
        finally:
            _shutdown(ray, ray_serve, config, started_ray, deployed)


def _shutdown(ray, ray_serve, config: ServeConfig, started_ray: bool, deployed: bool) -> None:
    if not ray.is_initialized():
        return
    try:
        if started_ray:
            ray_serve.shutdown()
        elif deployed:
            ray_serve.delete(config.app_name)
    finally:
        ray.shutdown()


@contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGINT and SIGTERM set `stop` while serving (a second one interrupts at once); the previous handlers
    come back on exit. Yields a function that installs the handlers again (after a library replaced them).
    Outside the main thread signals cannot be caught: `stop` is the only way out."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    def install():
        for s in previous:
            signal.signal(s, handler)

    install()
    try:
        yield install
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def wait_ready(url: str, timeout: float = 120.0, api_key: str | None = None) -> None:
    """Poll `GET {url}/models` until it answers 200 (for scripts and tests that start a server)."""
    import httpx2

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"{url}/models", headers=headers, timeout=5).status_code == 200:
                return
        except httpx2.HTTPError as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last})")
