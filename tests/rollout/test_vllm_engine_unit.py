"""The `vllm` engine's client side without vLLM: the weights it pushes are named as the saved checkpoint names them,
mismatch reports, and server mode against a fake worker (an HTTP server in a thread answering /health, /weights
and /generate from the request): prompt-id checks, the worker's errors, stop tokens and truncation, retries of
an unreachable worker, the bearer token."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load

from vlrl.data.loading import load_samples
from vlrl.models.processor import image_token_id
from vlrl.rollout import SamplingParams
from vlrl.rollout.vllm_engine import (
    PromptMismatchError,
    VLLMConfig,
    VLLMEngine,
    VLLMEngineError,
    checkpoint_state_dict,
    describe_mismatch,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_checkpoint_state_dict_has_the_saved_files_names(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    ours = checkpoint_state_dict(model)
    assert set(ours) == set(saved)
    assert len({t.untyped_storage().data_ptr() for t in ours.values()}) == len(ours)  # tied tensors once
    for k, t in ours.items():
        assert t.is_contiguous() and torch.equal(t, saved[k]), k


def test_describe_mismatch_names_the_first_difference_and_image_counts():
    msg = describe_mismatch([1, 2, 9, 9, 9, 3], [1, 2, 9, 9, 3], image_id=9)
    assert "differ from position 4" in msg
    assert "vlrl: 6 tokens, 3 image tokens" in msg and "vLLM: 5 tokens, 2 image tokens" in msg
    assert "vlrl: [1, 2, 9, 9, 9, 3]" in msg and "vLLM: [1, 2, 9, 9, 3]" in msg
    assert "differ from position 2" in describe_mismatch([1, 2], [1, 2, 3], image_id=9)  # one is a prefix


class FakeWorker:
    """The worker's HTTP API on a loopback port, answering from the request: /generate gives every prompt the
    token ids `processor` makes of its text and images (plus `prompt_offset` on the last id) and the completions
    in `completions` (token ids; log-probs -0.5 each); `fail` makes /generate answer HTTP 500 with that message;
    `hang` makes /generate never answer. Requests are recorded (path, headers); with `token` set, a request
    without `Authorization: Bearer <token>` gets HTTP 401."""

    def __init__(self, processor: Any, token: str = "") -> None:
        self.processor = processor
        self.token = token
        self.completions: list[list[int]] = [[5, 6]]
        self.prompt_offset = 0
        self.fail = ""
        self.hang = False
        self.release = threading.Event()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.weights: list[tuple[dict[str, torch.Tensor], str]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _prompt_ids(self, prompt: dict[str, Any]) -> list[int]:
        images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in prompt["images"]]
        ids = self.processor(text=[prompt["text"]], images=images or None)["input_ids"][0]
        ids = [int(i) for i in ids]
        ids[-1] += self.prompt_offset
        return ids

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _start(self) -> bool:
                fake.requests.append((self.path, dict(self.headers)))
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._send(401, {"error": "missing or wrong bearer token"})
                    return False
                return True

            def do_GET(self) -> None:  # noqa: N802
                if self._start():
                    self._send(200, {"status": "ok"})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self._start():
                    return
                if self.path == "/weights":
                    fake.weights.append((load(body), self.headers.get("X-Weights-Version", "")))
                    self._send(200, {"tensors": len(fake.weights[-1][0])})
                elif fake.hang:
                    fake.release.wait(30)
                elif fake.fail:
                    self._send(500, {"error": fake.fail})
                else:
                    req = json.loads(body)
                    results = [{"prompt_token_ids": fake._prompt_ids(p),
                                "completions": [{"token_ids": c, "logprobs": [-0.5] * len(c)}
                                                for c in fake.completions[: req["n"]]]}
                               for p in req["prompts"]]
                    self._send(200, {"results": results})

        return Handler


@pytest.fixture
def fake(tiny):
    worker = FakeWorker(tiny[1])
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def prompts(synth_dir):
    return load_samples([str(synth_dir / "counting" / "train.jsonl")])[:2]


def _free_port() -> int:
    with socket.socket() as s:  # nothing listens on it once closed
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_mode_pushes_the_weights_at_start(tiny, fake):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url))
    eng.sync_weights(model)
    assert [v for _, v in fake.weights] == ["1", "2"]
    want = checkpoint_state_dict(model)
    assert set(fake.weights[0][0]) == set(want)
    assert all(torch.equal(fake.weights[0][0][k], t) for k, t in want.items())


def test_prompt_id_mismatch_raises(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url))
    assert len(eng.generate(prompts, 1, SamplingParams(max_new_tokens=4))) == 2  # equal ids pass
    fake.prompt_offset = 1
    with pytest.raises(PromptMismatchError, match=r"prompt 0 .*\n.*differ from position") as err:
        eng.generate(prompts, 1, SamplingParams(max_new_tokens=4))
    image_id = image_token_id(processor)
    assert "image tokens" in str(err.value) and str(image_id) in str(err.value)


def test_worker_error_message_surfaces(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url))
    fake.fail = "RuntimeError: the KV cache is full"
    with pytest.raises(VLLMEngineError, match="HTTP 500.*the KV cache is full"):
        eng.generate(prompts, 1, SamplingParams(max_new_tokens=4))
    assert sum(path == "/generate" for path, _ in fake.requests) == 1  # an answer is not retried


def test_stop_token_ends_a_completion_else_truncated(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url))
    eos = processor.tokenizer.eos_token_id
    assert eos in eng.stop_ids
    fake.completions = [[5, 6, eos], [5, 6, 7]]
    groups = eng.generate(prompts, 2, SamplingParams(max_new_tokens=3), seeds=[3, 4])
    assert [g.seed for g in groups] == [3, 4]
    for g in groups:
        stopped, cut = g.completions
        assert stopped.token_ids.tolist() == [5, 6, eos] and not stopped.truncated
        assert cut.token_ids.tolist() == [5, 6, 7] and cut.truncated
        assert stopped.text == processor.tokenizer.decode([5, 6], skip_special_tokens=True)
        assert torch.equal(cut.logprobs, torch.full((3,), -0.5))


def test_unreachable_url_is_an_error(tiny):
    model, processor = tiny
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(VLLMEngineError, match=f"no vLLM worker answers at {url}"):
        VLLMEngine(model, processor, config=VLLMConfig(url=url, startup_timeout=0.5, request_timeout=0.5, retries=0))


def test_requests_without_answer_are_retried_then_an_error(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url, request_timeout=0.5, retries=1))
    fake.hang = True
    with pytest.raises(VLLMEngineError, match="no answer after 2 tries"):
        eng.generate(prompts, 1, SamplingParams(max_new_tokens=4))
    assert sum(path == "/generate" for path, _ in fake.requests) == 2


def test_bearer_token_from_the_named_variable(tiny, prompts, monkeypatch):
    model, processor = tiny
    worker = FakeWorker(processor, token="s3cret")
    try:
        monkeypatch.delenv("VLRL_TEST_WORKER_TOKEN", raising=False)
        with pytest.raises(VLLMEngineError, match="HTTP 401"):
            VLLMEngine(model, processor, config=VLLMConfig(url=worker.url, token_env="VLRL_TEST_WORKER_TOKEN"))
        assert all("Authorization" not in h for _, h in worker.requests)
        worker.requests.clear()
        monkeypatch.setenv("VLRL_TEST_WORKER_TOKEN", "s3cret")
        eng = VLLMEngine(model, processor, config=VLLMConfig(url=worker.url, token_env="VLRL_TEST_WORKER_TOKEN"))
        eng.generate(prompts, 1, SamplingParams(max_new_tokens=4))
        assert [p for p, _ in worker.requests] == ["/health", "/weights", "/generate"]
        assert all(h.get("Authorization") == "Bearer s3cret" for _, h in worker.requests)
    finally:
        worker.close()
