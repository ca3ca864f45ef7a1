"""`vlrl serve`: load a local model folder and serve it with uvicorn (loopback by default)."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
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
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    device: str = "cpu"
    max_generation_seconds: float | None = 300.0
    limits: ServeLimits = field(default_factory=ServeLimits)
    log_level: str = "info"

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


def run_server(cfg: ServeConfig) -> None:
    """Load the model, build the app and serve until interrupted."""
    import uvicorn

    from vlrl.models.loading import load_model_and_processor
    from vlrl.serve.app import create_app
    from vlrl.serve.generate import ServedModel

    if not is_loopback(cfg.host):
        log.warning("listening on %s, which is not a loopback address: anyone who can reach it can use the model "
                    "(there is no authentication)", cfg.host)
    model, processor = load_model_and_processor(cfg.model)
    engine = ServedModel(model, processor, cfg.model_id, device=cfg.device, max_time=cfg.max_generation_seconds)
    app = create_app(engine, cfg.limits)
    print(f"serving {cfg.model_id} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                timeout_keep_alive=30, limit_concurrency=4 * cfg.limits.max_waiting + 8)


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
                       log_level=a.log_level)


def main(argv: list[str]) -> None:
    run_server(parse_args(argv))
