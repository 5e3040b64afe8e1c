"""Running the model server: ``run()`` for the CLI, ``ServerThread`` for tests and benchmarks.

``abloop serve-model`` calls :func:`run`; ``python -m serving.server`` does the same with a few extra
knobs (``--max-batch``, ``--max-queue``) that the benchmark uses.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from typing import Any

from store.config import apply_runtime_env

# Before torch (imported by serving.app) starts its OpenMP runtime: spinning waiters collapse
# throughput on shared cores (batched decode 13 vs 38 tok/s measured on 2 cores).
apply_runtime_env()

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from serving.app import create_app  # noqa: E402
from serving.model import DEFAULT_QUANTIZE  # noqa: E402

SERVICE_NAME = "abloop-serve-model"  # as `abloop serve-model` names it; OTEL_SERVICE_NAME overrides it


def parse_adapter_args(values: list[str] | None) -> dict[str, str]:
    """``["name=path", ...]`` (the CLI's repeated ``--adapter``) -> ``{name: path}``."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapter expects NAME=PATH, got {value!r}")
        if name in out:
            raise ValueError(f"--adapter name {name!r} given twice")
        out[name.strip()] = path.strip()
    return out


def run(
    model: str = "default",
    host: str = "127.0.0.1",
    port: int = 8001,
    adapters: dict[str, str] | None = None,
    *,
    max_batch: int = 16,
    max_queue: int = 256,
    dtype: str = "auto",
    quantize: str = DEFAULT_QUANTIZE,
    compile: bool = False,
    log_level: str | None = None,
) -> None:
    """Serve ``model`` (``"default"`` or a local HF dir) with ``adapters`` ({name: path}) until stopped.

    Logs go through :mod:`store.logs` (LOG_FORMAT; ``log_level`` or else LOG_LEVEL), uvicorn's own included;
    spans are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set (:mod:`store.tracing`).
    """
    from transformers.utils import logging as transformers_logging

    from store.config import Settings
    from store.logs import configure_logging, logging_config
    from store.tracing import configure_tracing

    settings = Settings()
    level = (log_level or settings.log_level).upper()
    secrets = settings.secret_values()
    configure_logging(settings.log_format, level, secrets=secrets)
    config = logging_config(settings.log_format, level, secrets=secrets)  # uvicorn applies it to its own loggers
    # Nothing else writes to stderr: a stray line would break a JSON log stream.
    logging.captureWarnings(True)
    transformers_logging.disable_progress_bar()
    configure_tracing(SERVICE_NAME)
    app = create_app(model=model, adapters=adapters, max_batch=max_batch, max_queue=max_queue, dtype=dtype,
                     quantize=quantize, compile=compile)
    uvicorn.run(app, host=host, port=port, log_config=config, log_level=level.lower(), timeout_graceful_shutdown=5)


class ServerThread:
    """Run an app in-process on a free loopback port (a background thread with its own event loop).

    ::

        with ServerThread(create_app(engine)) as srv:
            OpenAI(base_url=srv.base_url, api_key="x")

    Without an ``app`` one is made with ``create_app(**create_app_kwargs)``.
    """

    def __init__(
        self,
        app: FastAPI | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 300.0,
        **create_app_kwargs: Any,
    ):
        self.app = app if app is not None else create_app(**create_app_kwargs)
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def start(self) -> ServerThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)

        def target() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=target, name=f"serving-http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"model server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("model server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_from_args(args: argparse.Namespace) -> None:
    try:
        adapters = parse_adapter_args(args.adapter)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    run(args.model, args.host, args.port, adapters, max_batch=args.max_batch, max_queue=args.max_queue,
        dtype=args.dtype, quantize=args.quantize, compile=args.compile, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    from serving.options import add_server_arguments

    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__)
    add_server_arguments(parser)
    serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
