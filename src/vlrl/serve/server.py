"""`vlrl serve`: load a local model folder and serve it with uvicorn (loopback by default).

The listening socket is bound before the model loads, so a port in use is an `error: ...` (exit 2) at once, and
"serving on" is printed only once the socket is bound and listening. `--engine vllm` generates with a vLLM worker
(colocated: started by the server on its own copy of the model, and stopped when the server exits, SIGTERM
included; or `--vllm-url` of one started by hand); a worker that cannot start is `error: ...` before serving.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from vlrl.serve.schemas import ServeLimits

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """What `vlrl serve` needs: the model folder, where to listen and the request limits.

    model: a local HF model folder (`vlrl init-model` output, a checkpoint, or a downloaded Qwen-VL or InternVL).
    served_model_name: the id reported by /v1/models and required in requests (default: the folder name).
    max_generation_seconds: wall-time bound of one request's generation (finish_reason "length" when hit).
    allowed_hosts: names besides the loopback ones and `host` that requests may carry in their `Host` header
    (e.g. the machine's name when listening on 0.0.0.0); any other is refused (DNS-rebinding protection).
    engine: the rollout engine that generates: "hf" (in this process) or "vllm" (a vLLM worker).
    vllm_python / vllm_url: engine vllm: the vLLM environment's Python for a colocated worker (None: the
    `VLLMConfig` default), or the url of a running worker (empty: colocated).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    device: str = "cpu"
    max_generation_seconds: float | None = 300.0
    limits: ServeLimits = field(default_factory=ServeLimits)
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()
    engine: str = "hf"
    vllm_python: str | None = None
    vllm_url: str = ""

    @property
    def model_id(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BindError(OSError):
    """The server's address cannot be bound; the message names it and says why."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not yet listening) to host:port, else `BindError` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        why = ("the address is already in use (another server on that port?); choose another --port"
               if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        raise BindError(f"cannot listen on {where}: {why}") from None
    return sock


def run_server(cfg: ServeConfig, sock: socket.socket | None = None) -> None:
    """Bind (unless `sock` is already bound to cfg's address), load the model, build the app and serve until
    interrupted."""
    sock = sock or bind_socket(cfg.host, cfg.port)
    try:
        _serve(cfg, sock)
    finally:
        sock.close()


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit (exit code 128 + 15), so `finally` blocks run: uvicorn shuts
    down gracefully on SIGTERM and then raises the signal again, which by default would end the process at once and
    leave a colocated vLLM worker running."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def exit_(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(cfg: ServeConfig, sock: socket.socket) -> None:
    import uvicorn

    from vlrl.models.loading import load_model_and_processor
    from vlrl.rollout.vllm_engine import VLLMConfig
    from vlrl.serve.app import LOOPBACK_NAMES, create_app
    from vlrl.serve.generate import ServedModel

    if not is_loopback(cfg.host):
        log.warning("listening on %s, which is not a loopback address: anyone who can reach it can use the model "
                    "(there is no authentication); requests must name %s in their Host header",
                    cfg.host, ", ".join((*LOOPBACK_NAMES, cfg.host, *cfg.allowed_hosts)))
    vllm = VLLMConfig(url=cfg.vllm_url)
    vllm.python = cfg.vllm_python or vllm.python
    with _sigterm_exits():
        model, processor = load_model_and_processor(cfg.model)
        engine = ServedModel(model, processor, cfg.model_id, device=cfg.device, max_time=cfg.max_generation_seconds,
                             engine=cfg.engine, vllm=vllm)
        try:
            app = create_app(engine, cfg.limits, hosts=(*LOOPBACK_NAMES, cfg.host, *cfg.allowed_hosts), port=cfg.port)
            config = uvicorn.Config(app, log_level=cfg.log_level, access_log=False, timeout_keep_alive=30,
                                    limit_concurrency=4 * cfg.limits.max_waiting + 8)
            sock.listen(2048)  # connections from here on queue until uvicorn accepts them
            print(f"serving {cfg.model_id} on http://{cfg.host}:{cfg.port}/v1", flush=True)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            engine.close()


def parse_args(argv: list[str]) -> ServeConfig:
    defaults = ServeLimits()
    p = argparse.ArgumentParser(prog="vlrl serve",
                                description="OpenAI-compatible chat-completions server for a local model.")
    p.add_argument("--model", required=True, help="local model folder")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-generation-seconds", type=float, default=300.0)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts", metavar="NAME",
                   help="a host name requests may address besides localhost, 127.0.0.1, ::1 and --host (repeat)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="what generates: hf (in this process, default) or vllm (a vLLM worker; make vllm-env)")
    p.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="--engine vllm: the vLLM environment's Python for the worker the server starts "
                        "(default .venv-vllm/bin/python)")
    p.add_argument("--vllm-url", default="", metavar="URL",
                   help="--engine vllm: http://host:port of a worker started by hand (the server then starts none)")
    for f in dataclasses.fields(ServeLimits):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(defaults, f.name),
                       dest=f.name, help=f"limit (default {getattr(defaults, f.name)})")
    a = p.parse_args(argv)
    limits = ServeLimits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ServeLimits)})
    for f in dataclasses.fields(ServeLimits):
        if getattr(limits, f.name) < 1:
            p.error(f"--{f.name.replace('_', '-')} must be at least 1")
    _check_engine(p, a)
    return ServeConfig(model=a.model, host=a.host, port=a.port, served_model_name=a.served_model_name,
                       device=a.device, max_generation_seconds=a.max_generation_seconds, limits=limits,
                       log_level=a.log_level, allowed_hosts=tuple(a.allowed_hosts), engine=a.engine,
                       vllm_python=a.vllm_python, vllm_url=a.vllm_url)


def _check_engine(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """argparse's error (exit 2) for vLLM settings that cannot work, before the model loads: a --vllm-* option
    without --engine vllm, a url that is not http(s), no vLLM environment at --vllm-python."""
    if a.engine != "vllm":
        if a.vllm_python is not None or a.vllm_url:
            p.error("--vllm-python and --vllm-url need --engine vllm")
        return
    if a.vllm_url and not a.vllm_url.startswith(("http://", "https://")):
        p.error(f"--vllm-url must be http://host:port or https://host:port, got {a.vllm_url!r}")
    if not a.vllm_url:
        from vlrl.rollout.vllm_engine import VLLMConfig

        python = a.vllm_python or VLLMConfig().python
        if not Path(python).is_file():
            p.error(f"--engine vllm: no vLLM environment at {python} (--vllm-python); build it with `make vllm-env` "
                    "(scripts/vllm-env.sh), or give --vllm-url of a running worker")


def main(argv: list[str]) -> None:
    """`vlrl serve`: a port that cannot be bound is `error: ...` with exit code 2, before the model loads (a vLLM
    worker that cannot start is `error: ...` with exit code 2 too, from `vlrl.cli.main`)."""
    cfg = parse_args(argv)
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except BindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    run_server(cfg, sock)
