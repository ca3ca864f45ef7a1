"""The `vllm` rollout engine: vLLM samples the completions, in a worker process of its own environment.

vLLM's CPU build pins a transformers release older than vlrl's, so vLLM never runs in vlrl's process: a worker
(`vlrl/rollout/vllm_worker`, run with the vLLM environment's Python, built by `scripts/vllm-env.sh`) holds
`vllm.LLM` behind a small HTTP API, and this engine is its client. Two ways to have one:

- colocated (`url` empty, the default): the engine writes the policy's current weights and processor to a
  temporary folder once, starts the worker on a free loopback port of this machine and stops it with the run;
- server (`url: http://host:port`): a worker started by hand, on this machine or another
  (`<vllm env>/bin/python src/vlrl/rollout/vllm_worker --model DIR --host 0.0.0.0 --port 8100`); the engine pushes
  the trainer's weights to it when it starts, so it samples from the run's weights even on resume.

Either way `sync_weights` (after every optimizer step) sends the policy's state dict as one safetensors body,
loaded in place by vLLM's `reload_weights`: nothing is written to disk per step.

What the trainer gets matches the `hf` engine: the prompt is vlrl's chat template and images (sent as PNG), and
every prompt's token ids as vLLM built them (image placeholders expanded by its processor) are compared with
vlrl's own encoding -- a mismatch (another chat template, other min/max pixels) stops the run with both sequences,
on the first call, before any step trains on it. Vision tokens are excluded from sampling, the stop tokens are
the tokenizer's and the model's EOS, completions end with their stop token, their log-probs are vLLM's processed
log-probs (after temperature, top-k, top-p: the distribution each token was drawn from), and each prompt's seed
makes its G completions reproducible (vLLM's own random stream, so not the `hf` engine's completions).
A worker that dies, or does not answer within `request_timeout` after `retries` tries, is an error that says so
(with the end of a colocated worker's log), never a silent hang. A colocated worker exits when its trainer does,
even one killed by SIGKILL (its stdin is a pipe from the trainer: `--exit-with-stdin`).

`max_seconds` goes to the worker, which ends the request at the first engine step past it; `should_stop` is polled
every 0.1 s while the worker generates, and once it returns True the engine asks the worker to abort the request
(`/abort`), which then ends it the same way. Either way the completions come back as far as they got
(`truncated`, finish "length"). `raw` prompts (text and images in memory, with their `encoded` ids) are sent
instead of the samples' rendered messages and image files; vLLM's prompt ids are still checked against `encoded`.

Not (yet): CUDA IPC / NCCL weight transfer for large models on GPUs (the HTTP body is a copy through host memory);
putting the worker to sleep between rollouts to free GPU memory (sleep / wake up).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded, encode_for_generation, prompt_text, sample_images
from vlrl.models.processor import vision_token_ids
from vlrl.rollout.hf_engine import stop_token_ids
from vlrl.rollout.types import (
    Completion,
    Group,
    RawPrompt,
    SamplingParams,
    TokenCallback,
    check_generate_args,
)

log = logging.getLogger(__name__)

WORKER = Path(__file__).parent / "vllm_worker"  # run by path with the vLLM environment's Python
READY = "VLRL_WORKER_READY"
POLL_SECONDS = 0.1  # how often `should_stop` is asked while the worker generates


@dataclass
class VLLMConfig:
    """Where the vLLM worker is and how it runs (`rollout.vllm` in RL, `vllm` in eval and curate)."""

    url: str = ""  # server mode: a running worker, http://host:port; empty: colocated (the engine starts one)
    python: str = ".venv-vllm/bin/python"  # colocated: the vLLM environment's Python (scripts/vllm-env.sh)
    dtype: str = "float32"  # the worker's compute dtype
    gpu_memory_utilization: float = 0.15  # colocated: on GPU the share of its memory; on CPU the RAM share of the KV cache
    max_model_len: int = 0  # colocated: prompt + completion tokens at most (0: the model's)
    max_images: int = 4  # colocated: images per prompt at most
    startup_timeout: float = 600.0  # seconds for a colocated worker to load, or for a server to answer /health
    request_timeout: float = 600.0  # seconds one generate or weight push may take
    retries: int = 2  # further tries of a request that got no answer (connection refused, timeout)
    token_env: str = "VLRL_WORKER_TOKEN"  # the environment variable holding the worker's bearer token (unset: none)


class VLLMEngineError(RuntimeError):
    """The worker is missing, died, refused a request or did not answer in time. `status`: the HTTP status of a
    refusal (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PromptMismatchError(VLLMEngineError):
    """vLLM and vlrl turned the same sample into different token ids."""


def _png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def checkpoint_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights as its saved checkpoint names them (`save_pretrained`'s own renaming: transformers 5
    names some modules differently in memory, e.g. `model.language_model.layers` for the file's `model.layers`,
    and vLLM loads the file's names), tied tensors once (the first name wins), on CPU and contiguous."""
    from transformers.core_model_loading import revert_weight_conversion

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return dict(revert_weight_conversion(model, out))


def describe_mismatch(ours: list[int], theirs: list[int], image_id: int) -> str:
    """Both sequences and where they part, for a `PromptMismatchError`."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"vlrl: {len(ours)} tokens, {ours.count(image_id)} image tokens; vLLM: {len(theirs)} tokens, "
            f"{theirs.count(image_id)} image tokens; they differ from position {at}\n"
            f"vlrl: {ours}\nvLLM: {theirs}")


class _Worker:
    """A colocated worker process and its temporary model folder; `stop` ends both (also at garbage collection)."""

    def __init__(self, cfg: VLLMConfig, model: Any, processor: Any) -> None:
        python = Path(cfg.python)
        if not python.exists():
            raise VLLMEngineError(
                f"rollout engine 'vllm': no vLLM environment at {cfg.python} (rollout.vllm.python); build it with "
                "`make vllm-env` (scripts/vllm-env.sh), or give the url of a running worker (rollout.vllm.url)")
        self.dir = Path(tempfile.mkdtemp(prefix="vlrl-vllm-"))
        model.save_pretrained(self.dir / "model")
        processor.save_pretrained(self.dir / "model")
        self.log_path = self.dir / "worker.log"
        cmd = [str(python), str(WORKER), "--model", str(self.dir / "model"), "--port", "0", "--dtype", cfg.dtype,
               "--gpu-memory-utilization", str(cfg.gpu_memory_utilization), "--max-images", str(cfg.max_images),
               "--max-model-len", str(cfg.max_model_len), "--exit-with-stdin", "--remove-on-exit", str(self.dir)]
        # stdin: a pipe this process holds open and never writes; it closes when this process ends, however it
        # ends, and the worker then exits (--exit-with-stdin)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                     text=True, bufsize=1)
        self._finalizer = weakref.finalize(self, _stop, self.proc, self.dir)
        self.port = self._wait_ready(cfg.startup_timeout)

    def _wait_ready(self, timeout: float) -> int:
        found: list[int] = []
        ready = threading.Event()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def drain() -> None:  # the worker's output goes to its log; the pipe never fills
            with open(self.log_path, "a") as f:
                for line in stdout:
                    f.write(line)
                    f.flush()
                    if line.startswith(READY) and not found:
                        found.append(int(line.split()[1]))
                        ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise VLLMEngineError(f"the vLLM worker did not start within {timeout:.0f}s "
                                  f"(rollout.vllm.startup_timeout):\n{self.tail()}")
        if not found:
            code = self.proc.wait()
            raise VLLMEngineError(f"the vLLM worker exited with code {code} while starting:\n{self.tail()}")
        return found[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no worker log)"

    def stop(self) -> None:
        self._finalizer()


def _stop(proc: subprocess.Popen[str], folder: Path) -> None:
    """Close the worker's stdin (it exits by itself), then terminate it, then kill it, each after a wait."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    for end in (None, proc.terminate, proc.kill):
        if end is not None:
            end()
        try:
            proc.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    shutil.rmtree(folder, ignore_errors=True)


class VLLMEngine:
    """`RolloutEngine` over a vLLM worker (see the module docstring).

    max_prompts_per_call: prompts per request to the worker (0 = all at once).
    """

    name = "vllm"

    def __init__(self, model: Any, processor: Any, *, config: VLLMConfig | None = None,
                 device: torch.device | str | None = None, max_prompts_per_call: int = 0) -> None:
        self.cfg = config if config is not None else VLLMConfig()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_prompts_per_call = max_prompts_per_call
        self.suppress_ids = vision_token_ids(self.tokenizer)
        self.stop_ids = stop_token_ids(model, self.tokenizer)
        from vlrl.models.processor import image_token_id

        self.image_id = image_token_id(processor)
        self.version = 0
        self._token = os.environ.get(self.cfg.token_env, "") if self.cfg.token_env else ""
        self.worker: _Worker | None = None
        if self.cfg.url:
            self.url = self.cfg.url.rstrip("/")
            self._wait_health(self.cfg.startup_timeout)
            self.sync_weights(model)  # the server samples from the trainer's weights from the first call on
        else:
            self.worker = _Worker(self.cfg, model, processor)
            self.url = f"http://127.0.0.1:{self.worker.port}"
        log.info("rollout engine vllm: worker at %s (%s)", self.url, "server" if self.cfg.url else "colocated")

    # -- transport -------------------------------------------------------------------------------------------
    def _request(self, path: str, body: bytes | None = None, *, content_type: str = "application/json",
                 headers: dict[str, str] | None = None, timeout: float | None = None,
                 retries: int | None = None) -> dict[str, Any]:
        timeout = self.cfg.request_timeout if timeout is None else timeout
        tries = 1 + (self.cfg.retries if retries is None else retries)
        hdrs = {"Content-Type": content_type, **(headers or {})}
        if self._token:
            hdrs["Authorization"] = f"Bearer {self._token}"
        last: Exception | None = None
        for attempt in range(tries):
            if self.worker is not None and not self.worker.alive():
                raise VLLMEngineError(f"the vLLM worker died (exit code {self.worker.proc.returncode}):\n"
                                      f"{self.worker.tail()}")
            req = urllib.request.Request(self.url + path, data=body, headers=hdrs,
                                         method="POST" if body is not None else "GET")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return dict(json.loads(resp.read()))
            except urllib.error.HTTPError as err:  # the worker answered: its message is the error
                detail = err.read().decode(errors="replace")[:2000]
                raise VLLMEngineError(f"vLLM worker {self.url}{path}: HTTP {err.code}: {detail}",
                                      status=err.code) from err
            except (urllib.error.URLError, OSError) as err:  # no answer: refused, reset or timed out
                last = err
                if attempt + 1 < tries:
                    time.sleep(min(2.0**attempt, 10.0))
        where = f"\n{self.worker.tail()}" if self.worker is not None else ""
        raise VLLMEngineError(f"vLLM worker {self.url}{path}: no answer after {tries} tries within "
                              f"{timeout:.0f}s each (rollout.vllm.request_timeout, retries): {last}{where}")

    def _wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._request("/health", timeout=min(30.0, timeout), retries=0)
                return
            except VLLMEngineError as err:
                if err.status in (401, 403):
                    where = (f"${self.cfg.token_env} (rollout.vllm.token_env)" if self.cfg.token_env else
                             "rollout.vllm.token_env to the variable that holds it")
                    raise VLLMEngineError(f"the vLLM worker at {self.url} refused the token: set {where} ({err})",
                                          err.status) from err
                if time.monotonic() >= deadline or err.status is not None:
                    raise VLLMEngineError(f"no vLLM worker answers at {self.url} (rollout.vllm.url): {err}",
                                          err.status) from err
                time.sleep(1.0)

    # -- RolloutEngine ---------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Send `model`'s weights to the worker, which loads them in place (one safetensors body)."""
        self.version += 1
        body = save(checkpoint_state_dict(model))
        self._request("/weights", body, content_type="application/octet-stream",
                      headers={"X-Weights-Version": str(self.version)})

    def generate(
        self, prompts: Sequence[Sample], n: int, sampling: SamplingParams, *, seeds: Sequence[int] | None = None,
        encoded: Sequence[Encoded] | None = None, raw: Sequence[RawPrompt] | None = None,
        max_seconds: float | None = None, should_stop: Callable[[], bool] | None = None,
        on_tokens: TokenCallback | None = None,
    ) -> list[Group]:
        """`RolloutEngine.generate` (`max_seconds`, `should_stop` and `raw`: see the module docstring). A request
        to the worker after the call's time is out or `should_stop` said so still goes, with no time left: its
        completions end after one engine step (and its prompt ids are checked). `on_tokens` hears each completion
        whole once the worker has answered for its chunk of prompts (the worker does not stream)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        check_generate_args(len(prompts), n, seeds, encoded, raw)
        if not prompts:
            return []
        if encoded is None:
            encoded = encode_for_generation(self.processor, prompts)
        chunk = self.max_prompts_per_call if self.max_prompts_per_call > 0 else len(prompts)
        groups: list[Group] = []
        stopped = False
        for lo in range(0, len(prompts), chunk):
            hi = min(lo + chunk, len(prompts))
            part_seeds = None if seeds is None else list(seeds[lo:hi])
            stopped = stopped or (should_stop is not None and should_stop())
            seconds = 0.0 if stopped else None if deadline is None else max(0.0, deadline - time.monotonic())
            part, aborted = self._generate(prompts[lo:hi], encoded[lo:hi], None if raw is None else raw[lo:hi], n,
                                           sampling, part_seeds, seconds, None if stopped else should_stop)
            if on_tokens is not None:
                for i, group in enumerate(part, start=lo):
                    for j, completion in enumerate(group.completions):
                        on_tokens(i * n + j, completion.token_ids.tolist())
            groups += part
            stopped = stopped or aborted
        return groups

    def _post_generate(self, req: dict[str, Any],
                       should_stop: Callable[[], bool] | None) -> tuple[dict[str, Any], bool]:
        """POST /generate; meanwhile, every `POLL_SECONDS`, ask `should_stop` and once it says True post /abort of
        the request. The worker's answer, and whether the request was aborted."""
        body = json.dumps(req).encode()
        if should_stop is None:
            return self._request("/generate", body), False
        answer: list[dict[str, Any]] = []
        failed: list[BaseException] = []

        def call() -> None:
            try:
                answer.append(self._request("/generate", body))
            except BaseException as err:  # re-raised in the caller's thread
                failed.append(err)

        thread = threading.Thread(target=call, name="vllm-generate", daemon=True)
        thread.start()
        aborted = False
        while thread.is_alive():
            thread.join(POLL_SECONDS)
            if thread.is_alive() and not aborted and should_stop():
                aborted = True
                try:
                    self._request("/abort", json.dumps({"request_id": req["request_id"]}).encode(),
                                  timeout=min(30.0, self.cfg.request_timeout), retries=0)
                except VLLMEngineError as err:  # the request then runs to its end: slower, not wrong
                    log.warning("could not abort vLLM request %s: %s", req["request_id"], err)
        if failed:
            raise failed[0]
        return answer[0], aborted

    def _generate(self, prompts: Sequence[Sample], encoded: Sequence[Encoded], raw: Sequence[RawPrompt] | None,
                  n: int, sampling: SamplingParams, seeds: list[int] | None, max_seconds: float | None,
                  should_stop: Callable[[], bool] | None) -> tuple[list[Group], bool]:
        if raw is None:
            raw = [RawPrompt(prompt_text(self.processor, s.messages), sample_images(s)) for s in prompts]
        req = {
            "prompts": [{"text": r.text, "images": [_png(im) for im in r.images],
                         "seed": None if seeds is None else int(seeds[i])} for i, r in enumerate(raw)],
            "n": n, "max_tokens": sampling.max_new_tokens, "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": sampling.top_p, "top_k": sampling.top_k, "stop_token_ids": self.stop_ids,
            "suppress_token_ids": self.suppress_ids, "max_seconds": max_seconds, "request_id": uuid.uuid4().hex,
        }  # fmt: skip
        answer, aborted = self._post_generate(req, should_stop)
        results = answer["results"]
        if len(results) != len(prompts):
            raise VLLMEngineError(f"the vLLM worker answered {len(results)} prompts for {len(prompts)}")
        groups = []
        for i, (sample, enc, res) in enumerate(zip(prompts, encoded, results)):
            ours = enc.input_ids.tolist()
            if res["prompt_token_ids"] != ours:
                raise PromptMismatchError(f"vLLM and vlrl encode prompt {i} (id {sample.id!r}) differently "
                                          f"(chat template, min/max pixels?):\n"
                                          f"{describe_mismatch(ours, res['prompt_token_ids'], self.image_id)}")
            completions = []
            for c in res["completions"]:
                ids = torch.tensor(c["token_ids"], dtype=torch.long)  # [T]
                stopped = bool(ids.numel()) and int(ids[-1]) in self.stop_ids
                completions.append(Completion(
                    token_ids=ids, text=self.tokenizer.decode(c["token_ids"], skip_special_tokens=True),
                    logprobs=torch.tensor(c["logprobs"], dtype=torch.float32), truncated=not stopped))
            groups.append(Group(sample=sample, prompt=enc, completions=completions,
                                seed=None if seeds is None else seeds[i]))
        return groups, aborted

    def close(self) -> None:
        """Stop a colocated worker (a server is left running)."""
        if self.worker is not None:
            self.worker.stop()
