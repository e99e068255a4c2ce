"""Start (or join) Ray, deploy the Serve application, wait, and stop everything that was started.

Without `address` (and no `RAY_ADDRESS`), a local Ray instance is started (its session files in a temporary
directory of its own, removed on exit: nothing is left under /tmp/ray; with an API key, its Serve proxy asks
for the key on Ray's own `/-/routes` and `/-/healthz` too: `proxy_auth`) and, on Ctrl-C or SIGTERM, the
Serve application, Serve and that Ray instance are shut down. With `address`, the application is deployed
on that cluster and on exit only the application is deleted (the cluster and its Serve instance stay up).
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lora_export.errors import MissingDependencyError, UserError
from lora_export.quiet import environ
from lora_export.serving.config import ServeConfig

STARTUP_TIMEOUT_S = 600.0
SHUTDOWN_TIMEOUT_S = 60.0


def serve(
    config: ServeConfig,
    *,
    on_ready: Callable[[str, list[str]], None] | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """Serve until Ctrl-C / SIGTERM (or until `stop` is set); nothing started here is left running.
    `on_ready(url, model names)` is called once the application answers. True when a signal ended it."""
    config.check()
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError as e:
        raise MissingDependencyError(
            f"serving needs Ray Serve ({e.name or 'ray'} is not installed): pip install 'lora-export[serve]'"
        ) from None

    from lora_export.serving import proxy_auth
    from lora_export.serving.app import build_application

    stop = stop or threading.Event()
    started_ray = False
    deployed = False
    session_dir = None
    with _Signals() as signals:
        try:
            if config.address:
                ray.init(address=config.address, log_to_driver=False, logging_level=logging.WARNING)
            else:  # "local": a new instance even when `ray start` left one running on this machine
                session_dir = tempfile.mkdtemp(prefix="lora_ray_")  # short: Ray's socket paths must fit 107 bytes
                with environ(proxy_auth.environment(config.api_key)):  # Ray's processes inherit it
                    ray.init(
                        address="local",
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                        _temp_dir=session_dir,
                    )
                started_ray = True
            signals.install()  # ray.init sets its own SIGTERM handler (exit at once): ours stops cleanly
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
            http = {"host": config.host, "port": config.port}
            ray_serve.start(http_options=http, proxy_location=config.proxy_location)
            deployed = True
            handle = ray_serve.run(build_application(config), name=config.app_name, route_prefix="/")
            errors = handle.check_startup_adapters.remote().result(timeout_s=STARTUP_TIMEOUT_S)
            if errors:
                raise UserError("; ".join(errors))
            if on_ready is not None and not signals.received:
                on_ready(f"http://{config.host}:{config.port}/v1", [config.model_name, *config.served_adapters()])
            while not (signals.received or stop.is_set()):
                time.sleep(0.2)
        finally:
            signals.ignore()  # one Ctrl-C is enough: the shutdown below is bounded
            try:
                _shutdown(ray, ray_serve, config, started_ray, deployed)
            finally:
                if session_dir is not None:
                    _remove(Path(session_dir))
    return signals.received


def _remove(folder: Path, attempts: int = 10) -> None:
    """Remove the local instance's session directory (its processes may still be closing their log files)."""
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.2)


def _shutdown(ray, ray_serve, config: ServeConfig, started_ray: bool, deployed: bool) -> None:
    """Delete the app (or stop Serve, when Ray was started here), then leave or stop Ray. Serve's own shutdown
    is given SHUTDOWN_TIMEOUT_S; the Ray instance started here is stopped whatever happened before."""
    if not ray.is_initialized():
        return
    if deployed:
        stop_serve = ray_serve.shutdown if started_ray else (lambda: ray_serve.delete(config.app_name))
        worker = threading.Thread(target=_quietly, args=(stop_serve,), daemon=True)
        worker.start()
        worker.join(SHUTDOWN_TIMEOUT_S)
    ray.shutdown()


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # the cluster is going away anyway; say so and go on
        logging.getLogger("lora_export.serving").warning("stopping the Serve app: %s", e)


class _Signals:
    """While serving, SIGINT and SIGTERM only set `received` (the main loop polls it; a handler must not take
    locks the interrupted code may hold); a second one before the loop ends interrupts startup at once. On exit
    the previous handlers come back. Outside the main thread nothing is installed: use `stop`."""

    def __init__(self):
        self.received = False
        self._main = threading.current_thread() is threading.main_thread()
        self._previous = {}

    def _handler(self, signum, _frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = True

    def install(self) -> None:
        if self._main:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self._handler)

    def ignore(self) -> None:
        if self._main:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)

    def __enter__(self) -> _Signals:
        if self._main:
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
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
