"""Run the real uvicorn server in a background thread on a free loopback port (tests, benchmarks, the demo)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace

from .app import create_app
from .engines import build_engine
from .engines.base import Engine
from .settings import EngineSettings, ServerSettings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """``with ServerThread(engine) as url: ...`` serves ``engine`` (an engine, or the settings to build one from) at
    ``url`` until the block ends. The default port (or 0) becomes a free one."""

    def __init__(
        self,
        engine: Engine | EngineSettings,
        settings: ServerSettings | None = None,
        extra_routes=None,
        startup_timeout_s: float = 60.0,
    ):
        import uvicorn

        if isinstance(engine, EngineSettings):
            engine = build_engine(engine)
        self.settings = settings or ServerSettings()
        if not self.settings.port or self.settings.port == ServerSettings.port:
            self.settings = replace(self.settings, port=free_port(self.settings.host))
        self.app = create_app(engine, self.settings, extra_routes=extra_routes)
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.startup_timeout_s = startup_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def start(self) -> str:
        self.thread.start()
        t_end = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the backend server thread exited during start-up")
            if time.monotonic() > t_end:
                raise TimeoutError("the backend server did not start in time")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
