"""`vlrl serve`: load a local model folder and serve it with uvicorn (loopback by default).

The listening socket is bound before the model loads, so a port in use is an `error: ...` (exit 2) at once, and
"serving on" is printed only once the socket is bound and listening.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

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


def _serve(cfg: ServeConfig, sock: socket.socket) -> None:
    import uvicorn

    from vlrl.models.loading import load_model_and_processor
    from vlrl.serve.app import LOOPBACK_NAMES, create_app
    from vlrl.serve.generate import ServedModel

    if not is_loopback(cfg.host):
        log.warning("listening on %s, which is not a loopback address: anyone who can reach it can use the model "
                    "(there is no authentication); requests must name %s in their Host header",
                    cfg.host, ", ".join((*LOOPBACK_NAMES, cfg.host, *cfg.allowed_hosts)))
    model, processor = load_model_and_processor(cfg.model)
    engine = ServedModel(model, processor, cfg.model_id, device=cfg.device, max_time=cfg.max_generation_seconds)
    app = create_app(engine, cfg.limits, hosts=(*LOOPBACK_NAMES, cfg.host, *cfg.allowed_hosts), port=cfg.port)
    config = uvicorn.Config(app, log_level=cfg.log_level, access_log=False, timeout_keep_alive=30,
                            limit_concurrency=4 * cfg.limits.max_waiting + 8)
    sock.listen(2048)  # connections from here on queue until uvicorn accepts them
    print(f"serving {cfg.model_id} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


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
    for f in dataclasses.fields(ServeLimits):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(defaults, f.name),
                       dest=f.name, help=f"limit (default {getattr(defaults, f.name)})")
    a = p.parse_args(argv)
    limits = ServeLimits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ServeLimits)})
    for f in dataclasses.fields(ServeLimits):
        if getattr(limits, f.name) < 1:
            p.error(f"--{f.name.replace('_', '-')} must be at least 1")
    return ServeConfig(model=a.model, host=a.host, port=a.port, served_model_name=a.served_model_name,
                       device=a.device, max_generation_seconds=a.max_generation_seconds, limits=limits,
                       log_level=a.log_level, allowed_hosts=tuple(a.allowed_hosts))


def main(argv: list[str]) -> None:
    """`vlrl serve`: a port that cannot be bound is `error: ...` with exit code 2, before the model loads."""
    cfg = parse_args(argv)
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except BindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    run_server(cfg, sock)
