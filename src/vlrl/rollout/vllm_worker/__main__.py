"""The vLLM rollout worker: `vllm.LLM` behind a small HTTP API, run with the vLLM environment's Python.

    .venv-vllm/bin/python src/vlrl/rollout/vllm_worker --model DIR [--host 127.0.0.1] [--port 0]

vLLM's CPU build pins a transformers release older than the one vlrl needs, so vLLM lives in an environment of its
own (`scripts/vllm-env.sh`) and this file imports nothing from vlrl: its folder runs by path in that environment
(a folder of its own, so that no module beside it shadows the standard library).
`vlrl.rollout.vllm_engine.VLLMEngine` (in vlrl's environment) is its only client: colocated, it starts this worker
itself on a free loopback port; in server mode it talks to one started by hand on any host.

Endpoints (JSON unless said otherwise):
  GET  /health    -> {"status": "ok", "model", "vllm", "weights_version"}
  POST /generate  {"prompts": [{"text", "images": [base64 PNG], "seed"}], "n", "max_tokens", "temperature",
                   "top_p", "top_k", "stop_token_ids", "suppress_token_ids", optional "max_seconds", "request_id"}
                  -> {"results": [{"prompt_token_ids", "completions": [{"token_ids", "logprobs",
                      "finish_reason"}]}], "weights_version", "interrupted"}
                  `max_seconds` (from the request's arrival) and a `/abort` of its `request_id` end the request at
                  the next engine step: the completions still running come back as far as they got, with
                  finish_reason "length", and "interrupted" is true.
  POST /abort     {"request_id"} -> {"request_id"}: ends that request as above (also one that has not started
                  yet: it then runs a single engine step).
  POST /weights   body: a safetensors file of the policy's state dict (names as the model's own checkpoint has
                  them); header X-Weights-Version -> {"tensors", "weights_version"}. Loaded in place through the
                  worker's `reload_weights` (vLLM's documented reload path), then the prefix and multimodal
                  caches are reset: nothing computed with the old weights is reused.
  POST /shutdown  -> the process exits.

Sampling matches vlrl's `hf` engine: the vision tokens are excluded (`allowed_token_ids`), and the returned
log-probs are vLLM's *processed* log-probs (after temperature, top-k, top-p), the distribution each token was drawn
from. Every request carries each prompt's seed, so equal (prompt, seed, weights) give equal completions.
Requests are served one at a time, each by stepping vLLM's engine loop itself (as `LLM.generate` does), so that
between steps it can see a deadline or an abort.
A first line `VLRL_WORKER_READY <port>` on stdout tells a parent process that the worker is serving. With
`--exit-with-stdin` (how `VLLMEngine` starts a colocated worker, stdin a pipe it never writes) the worker exits
when its stdin reaches end of file: the parent closed it or died, even by SIGKILL, so no worker outlives its
trainer. A worker started by hand has no such tie.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_JSON_BYTES = 512 * 1024 * 1024  # a batch of prompts with their images
READY = "VLRL_WORKER_READY"
ABORT_MEMORY = 600.0  # seconds an abort of a request not (yet) seen is kept


def refresh_tied_heads(worker: Any) -> None:
    """Re-prepare output heads whose weight is the input embedding's (tied). On CPU vLLM computes each linear
    layer from a packed copy of its weight made after loading; `reload_weights` repacks the modules whose
    weights it received, and a tied head receives none (the checkpoint has no `lm_head.weight`), so its packed
    copy would keep the old embedding: greedy completions then differ from the trainer's."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in worker.model_runner.get_model().modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)


class Worker:
    """One `vllm.LLM`; requests are served one at a time (vLLM batches the prompts within one)."""

    def __init__(self, args: argparse.Namespace) -> None:
        # the engine core in this process: collective_rpc then hands tensors over without serialising them
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=args.model, dtype=args.dtype, seed=args.seed, enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.gpu_memory_utilization, limit_mm_per_prompt={"image": args.max_images},
            logprobs_mode="processed_logprobs", max_logprobs=0,
        )
        if args.max_model_len > 0:
            kwargs["max_model_len"] = args.max_model_len
        self.llm = LLM(**kwargs)
        self.model = args.model
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.lock = threading.Lock()
        self.weights_version = 0
        self.aborts: dict[str, float] = {}  # request id -> when its abort came
        self.abort_lock = threading.Lock()

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        arrived = time.monotonic()
        deadline = None if req.get("max_seconds") is None else arrived + float(req["max_seconds"])
        request_id = str(req.get("request_id") or uuid.uuid4().hex)
        suppress = {int(i) for i in req.get("suppress_token_ids", [])}
        allowed = [i for i in range(self.vocab_size) if i not in suppress] if suppress else None
        temperature = float(req["temperature"])
        n = int(req["n"])
        inputs, params = [], []
        for p in req["prompts"]:
            images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in p.get("images", [])]
            item: dict[str, Any] = {"prompt": p["text"]}
            if images:
                item["multi_modal_data"] = {"image": images}
            inputs.append(item)
            params.append(SamplingParams(
                n=n, max_tokens=int(req["max_tokens"]), temperature=temperature,
                top_p=float(req.get("top_p", 1.0)), top_k=int(req.get("top_k", 0)) or -1, seed=p.get("seed"),
                logprobs=0, stop_token_ids=[int(i) for i in req.get("stop_token_ids", [])],
                allowed_token_ids=allowed, skip_special_tokens=False, detokenize=False,
                # every step's output holds each completion's tokens so far: what an interrupted request returns
                output_kind=RequestOutputKind.CUMULATIVE,
            ))
        with self.lock:
            results, interrupted = self._run(request_id, inputs, params, deadline)
            version = self.weights_version
        return {"results": results, "weights_version": version, "interrupted": interrupted}

    def _run(self, request_id: str, inputs: list[dict[str, Any]], params: list[Any],
             deadline: float | None) -> tuple[list[dict[str, Any]], bool]:
        """vLLM's engine loop over the prompts (`LLM.generate`'s, stepped here), ended early by `deadline` or an
        abort of `request_id`; each prompt's ids and completions (as far as they got)."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        engine = self.llm.llm_engine
        ids = [f"{request_id}-{i}" for i in range(len(inputs))]
        prompt_ids: list[list[int]] = []
        latest: dict[str, dict[int, Any]] = {rid: {} for rid in ids}  # request -> completion index -> output
        interrupted = False
        try:
            for rid, item, sp in zip(ids, inputs, params):  # rendered one at a time, as LLM.generate does
                (rendered,) = self.llm.renderer.render_cmpl([parse_model_prompt(self.llm.model_config, item)])
                prompt_ids.append([int(t) for t in rendered["prompt_token_ids"]])
                engine.add_request(rid, rendered, sp)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    for c in out.outputs:
                        latest[out.request_id][c.index] = c
                if engine.has_unfinished_requests() and (
                        (deadline is not None and time.monotonic() >= deadline) or self._take_abort(request_id)):
                    interrupted = True
                    break
        finally:
            engine.abort_request(ids)  # whatever still runs (none when every completion ended)
            self._take_abort(request_id)
        results = []
        for rid, sp, prompt in zip(ids, params, prompt_ids):
            completions = []
            for index in range(sp.n):
                c = latest[rid].get(index)
                tokens = [int(t) for t in c.token_ids] if c is not None else []
                logps = [float(step[t].logprob) for t, step in zip(tokens, (c.logprobs or []) if c else [])]
                reason = c.finish_reason if c is not None and c.finish_reason is not None else "length"
                completions.append({"token_ids": tokens, "logprobs": logps, "finish_reason": reason})
            results.append({"prompt_token_ids": prompt, "completions": completions})
        return results, interrupted

    def abort(self, request_id: str) -> None:
        """End request `request_id` at its next engine step (remembered for a while if it has not started)."""
        now = time.monotonic()
        with self.abort_lock:
            for rid in [r for r, t in self.aborts.items() if now - t > ABORT_MEMORY]:
                del self.aborts[rid]  # aborts of requests that never came
            self.aborts[request_id] = now

    def _take_abort(self, request_id: str) -> bool:
        with self.abort_lock:
            return self.aborts.pop(request_id, None) is not None

    def load_weights(self, body: bytes, version: int) -> dict[str, Any]:
        from safetensors.torch import load

        weights = load(body)
        with self.lock:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items()),
                                                              "is_checkpoint_format": True})
            self.llm.collective_rpc(refresh_tied_heads)
            self.llm.reset_prefix_cache()  # KV blocks and vision features of the old weights
            self.llm.llm_engine.reset_encoder_cache()
            self.llm.reset_mm_cache()
            self.weights_version = version
        return {"tensors": len(weights), "weights_version": version}

    def health(self) -> dict[str, Any]:
        import vllm

        return {"status": "ok", "model": self.model, "vllm": vllm.__version__, "weights_version": self.weights_version}


def make_handler(worker: Worker, token: str, server: list[ThreadingHTTPServer]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class names it so)
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if token and self.headers.get("Authorization", "") != f"Bearer {token}":
                self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
                return False
            return True

        def _body(self, limit: int) -> bytes | None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > limit:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {limit} bytes"})
                return None
            return self.rfile.read(length)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._authorised():
                return
            if self.path == "/health":
                self._send(HTTPStatus.OK, worker.health())
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            try:
                if self.path == "/generate":
                    body = self._body(MAX_JSON_BYTES)
                    if body is not None:
                        self._send(HTTPStatus.OK, worker.generate(json.loads(body)))
                elif self.path == "/abort":
                    body = self._body(1 << 16)
                    if body is not None:
                        request_id = str(json.loads(body)["request_id"])
                        worker.abort(request_id)
                        self._send(HTTPStatus.OK, {"request_id": request_id})
                elif self.path == "/weights":
                    body = self._body(1 << 40)
                    if body is not None:
                        version = int(self.headers.get("X-Weights-Version") or 0)
                        self._send(HTTPStatus.OK, worker.load_weights(body, version))
                elif self.path == "/shutdown":
                    self._send(HTTPStatus.OK, {"status": "stopping"})
                    threading.Thread(target=server[0].shutdown, daemon=True).start()
                else:
                    self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            except (ValueError, KeyError, TypeError) as err:  # a malformed request: the worker goes on
                self._send(HTTPStatus.BAD_REQUEST, {"error": f"{type(err).__name__}: {err}"})
            except Exception as err:  # vLLM failed on a well-formed request: said, and the worker goes on
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})

    return Handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face model folder (config, weights, processor)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port, printed on the ready line")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.15,
                   help="on GPU the share of its memory vLLM takes; on CPU the share of RAM for the KV cache")
    p.add_argument("--max-model-len", type=int, default=0, help="0: the model's own")
    p.add_argument("--max-images", type=int, default=4, help="images per prompt at most")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--token", default=os.environ.get("VLRL_WORKER_TOKEN", ""),
                   help="a bearer token every request must carry (default: $VLRL_WORKER_TOKEN; empty: none)")
    p.add_argument("--exit-with-stdin", action="store_true",
                   help="exit when stdin reaches end of file (a parent holding it open died or closed it)")
    p.add_argument("--remove-on-exit", default="",
                   help="with --exit-with-stdin: a folder to delete then (the parent's copy of the model, which a "
                        "parent killed outright cannot delete itself)")
    return p.parse_args(argv)


def exit_with_stdin(remove: str = "") -> None:
    """Exit the process once stdin reaches end of file, from a daemon thread. The parent keeps the pipe's write end
    open and never writes; the kernel closes it when the parent dies, however it dies."""

    def watch() -> None:
        try:
            sys.stdin.buffer.read()
        except (OSError, ValueError):  # stdin closed under us: the same signal
            pass
        try:  # a dead parent took the read end of stdout with it: this may fail
            print("stdin closed: the worker's parent is gone or done, exiting", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        if remove:
            shutil.rmtree(remove, ignore_errors=True)
        # at once, whatever the request threads are doing: the engine core runs in this process, so nothing of
        # vLLM's is left behind, and an orderly shutdown could wait for a generation to end
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-stdin", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.exit_with_stdin:
        exit_with_stdin(args.remove_on_exit)  # before loading the model: a parent may die during the start too
    worker = Worker(args)
    holder: list[ThreadingHTTPServer] = []
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(worker, args.token, holder))
    holder.append(httpd)
    print(f"{READY} {httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
