"""The `vllm` engine's client side without vLLM: the weights it pushes are named as the saved checkpoint names them,
mismatch reports, and server mode against a fake worker (an HTTP server in a thread answering /health, /weights,
/generate and /abort from the request): prompt-id checks, the worker's errors, stop tokens and truncation, retries
of an unreachable worker, the bearer token, `should_stop` (an /abort of the running request), `max_seconds` (sent
to the worker) and raw prompts (sent instead of the samples')."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load

from vlrl.data.loading import load_samples
from vlrl.models.inputs import encode_prompt, prompt_text, sample_images
from vlrl.models.processor import image_token_id
from vlrl.rollout import SamplingParams, make_engine
from vlrl.rollout.types import RawPrompt
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
    `hang` makes /generate never answer; `hold` makes it answer only once its request id is aborted (/abort), or
    after 10 s. Requests are recorded (path, headers), /generate and /abort bodies too (`bodies`: path, JSON);
    with `token` set, a request without `Authorization: Bearer <token>` gets HTTP 401."""

    def __init__(self, processor: Any, token: str = "") -> None:
        self.processor = processor
        self.token = token
        self.completions: list[list[int]] = [[5, 6]]
        self.prompt_offset = 0
        self.fail = ""
        self.hang = False
        self.hold = False
        self.release = threading.Event()
        self.aborted = threading.Event()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.bodies: list[tuple[str, dict[str, Any]]] = []
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
                    return
                fake.bodies.append((self.path, json.loads(body)))
                if self.path == "/abort":
                    fake.aborted.set()
                    self._send(200, {"request_id": json.loads(body)["request_id"]})
                    return
                if fake.hold:
                    fake.aborted.wait(10)
                if fake.hang:
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
    heard: list[tuple[int, list[int]]] = []
    groups = eng.generate(prompts, 2, SamplingParams(max_new_tokens=3), seeds=[3, 4],
                          on_tokens=lambda row, ids: heard.append((row, ids)))
    assert heard == [(0, [5, 6, eos]), (1, [5, 6, 7]), (2, [5, 6, eos]), (3, [5, 6, 7])]  # each completion whole
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
        refused = rf"the vLLM worker at {worker.url} refused the token: set \$VLRL_TEST_WORKER_TOKEN .*HTTP 401"
        with pytest.raises(VLLMEngineError, match=refused) as err:
            VLLMEngine(model, processor, config=VLLMConfig(url=worker.url, token_env="VLRL_TEST_WORKER_TOKEN"))
        assert "no vLLM worker answers" not in str(err.value)  # it answered: the token is what is wrong
        assert all("Authorization" not in h for _, h in worker.requests)
        monkeypatch.setenv("VLRL_TEST_WORKER_TOKEN", "wrong")
        with pytest.raises(VLLMEngineError, match=refused):
            VLLMEngine(model, processor, config=VLLMConfig(url=worker.url, token_env="VLRL_TEST_WORKER_TOKEN"))
        worker.requests.clear()
        monkeypatch.setenv("VLRL_TEST_WORKER_TOKEN", "s3cret")
        eng = VLLMEngine(model, processor, config=VLLMConfig(url=worker.url, token_env="VLRL_TEST_WORKER_TOKEN"))
        eng.generate(prompts, 1, SamplingParams(max_new_tokens=4))
        assert [p for p, _ in worker.requests] == ["/health", "/weights", "/generate"]
        assert all(h.get("Authorization") == "Bearer s3cret" for _, h in worker.requests)
    finally:
        worker.close()


def _generate_bodies(fake: FakeWorker) -> list[dict[str, Any]]:
    return [b for path, b in fake.bodies if path == "/generate"]


def test_should_stop_aborts_the_request_and_takes_the_partial_answer(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url))
    fake.hold = True  # /generate answers once its request is aborted
    fake.completions = [[5, 6], [7]]  # as far as the completions got
    asked = []

    def should_stop() -> bool:
        asked.append(time.monotonic())
        return len(asked) >= 3

    groups = eng.generate(prompts, 2, SamplingParams(max_new_tokens=64), seeds=[1, 2], should_stop=should_stop)
    assert fake.aborted.is_set()
    (gen,) = _generate_bodies(fake)
    aborts = [b for path, b in fake.bodies if path == "/abort"]
    assert aborts == [{"request_id": gen["request_id"]}] and gen["request_id"]  # that request, once
    assert len(asked) == 3  # polled until True, then no more
    assert [[c.token_ids.tolist() for c in g.completions] for g in groups] == [[[5, 6], [7]]] * 2
    assert all(c.truncated and c.finish_reason == "length" for g in groups for c in g.completions)


def test_should_stop_already_true_gives_no_time_to_later_requests(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url), max_prompts_per_call=1)
    groups = eng.generate(prompts, 1, SamplingParams(max_new_tokens=64), should_stop=lambda: True)
    assert len(groups) == 2
    bodies = _generate_bodies(fake)
    assert [b["max_seconds"] for b in bodies] == [0.0, 0.0]  # one engine step each
    assert not fake.aborted.is_set()  # nothing was running to abort


def test_max_seconds_is_sent_to_the_worker(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url), max_prompts_per_call=1)
    eng.generate(prompts, 1, SamplingParams(max_new_tokens=4))
    eng.generate(prompts, 1, SamplingParams(max_new_tokens=4), max_seconds=30.0)
    unbounded, first, second = (b["max_seconds"] for b in _generate_bodies(fake)[1:])
    assert _generate_bodies(fake)[0]["max_seconds"] is None and unbounded is None
    assert 0.0 < second <= first <= 30.0  # what is left of the call's time, for each request
    ids = [b["request_id"] for b in _generate_bodies(fake)]
    assert len(set(ids)) == len(ids)  # every request its own id (what /abort names)


def test_raw_prompts_are_sent_instead_of_the_samples(tiny, fake, prompts):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=fake.url))
    other = [{"role": "user", "content": "<image>What colour is the square?"}]
    images = [Image.new("RGB", (56 + 28 * i, 84), (40 * i, 90, 200)) for i in range(len(prompts))]
    raw = [RawPrompt(prompt_text(processor, other), [im]) for im in images]
    encoded = [encode_prompt(processor, other, [im]) for im in images]
    groups = eng.generate(prompts, 1, SamplingParams(max_new_tokens=4), encoded=encoded, raw=raw)
    (body,) = _generate_bodies(fake)
    assert [p["text"] for p in body["prompts"]] == [r.text for r in raw]
    assert all(r.text != prompt_text(processor, s.messages) for r, s in zip(raw, prompts))  # not the samples'
    sent = [[Image.open(io.BytesIO(base64.b64decode(b))) for b in p["images"]] for p in body["prompts"]]
    assert [[im.size for im in ims] for ims in sent] == [[im.size] for im in images]
    assert all(a.convert("RGB").tobytes() == b.tobytes() for (a,), b in zip(sent, images))
    assert [g.prompt for g in groups] == encoded and [g.sample for g in groups] == list(prompts)
    # vLLM's ids of the raw prompts are still checked against `encoded`: the samples' own encodings differ
    own = [encode_prompt(processor, s.messages, sample_images(s)) for s in prompts]
    with pytest.raises(PromptMismatchError, match="prompt 0"):
        eng.generate(prompts, 1, SamplingParams(max_new_tokens=4), encoded=own, raw=raw)


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_raw_prompts_need_one_encoding_each(tiny, fake, prompts, engine_name):
    model, processor = tiny
    kwargs = {"config": VLLMConfig(url=fake.url)} if engine_name == "vllm" else {}
    eng = make_engine(engine_name, model, processor, **kwargs)
    raw = [RawPrompt(prompt_text(processor, s.messages), sample_images(s)) for s in prompts]
    encoded = [encode_prompt(processor, s.messages, sample_images(s)) for s in prompts]
    sampling = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="raw prompts need their encodings"):
        eng.generate(prompts, 1, sampling, raw=raw)
    with pytest.raises(ValueError, match="1 raw prompts for 2 prompts"):
        eng.generate(prompts, 1, sampling, encoded=encoded, raw=raw[:1])


def test_hf_engine_samples_from_encoded_not_raw(tiny, prompts):
    model, processor = tiny
    eng = make_engine("hf", model, processor)
    encoded = [encode_prompt(processor, s.messages, sample_images(s)) for s in prompts]
    junk = [RawPrompt("not this prompt", []) for _ in prompts]
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)

    def ids(**kw):
        return [[c.token_ids.tolist() for c in g.completions]
                for g in eng.generate(prompts, 2, sampling, seeds=[1, 2], encoded=encoded, **kw)]

    assert ids(raw=junk) == ids()
