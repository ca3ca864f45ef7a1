"""`vlrl serve` on InternVL (the second model family), and the reserved tokens of both families: request text
may not carry the served model's vision tokens (its processor would read them as image slots), which come from
the model's tokenizer and processor, so each family refuses its own and takes another family's as plain text."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from serve_helpers import Served, data_url, png_bytes, start_server

from vlrl.models.build import init_model
from vlrl.models.inputs import encode_prompt
from vlrl.models.processor import load_processor, reserved_tokens
from vlrl.serve.schemas import ApiError, ServeLimits, parse_request, to_sample

QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
INTERNVL_IMAGE = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
QUESTION = "How many shapes are there?"


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model("internvl", "tiny", tmp_path_factory.mktemp("models") / "tiny-internvl", seed=0)


@pytest.fixture(scope="module")
def served_internvl(internvl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = start_server(internvl_dir, tmp_path_factory.mktemp("serve-internvl") / "server.log")
    yield server
    server.stop()


def _request(text: str, image_url: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"messages": [{"role": "user", "content": content}]}


def test_reserved_tokens_come_from_the_models_tokenizer(tiny_model_dir: Path, internvl_dir: Path) -> None:
    qwen, internvl = reserved_tokens(load_processor(tiny_model_dir)), reserved_tokens(load_processor(internvl_dir))
    assert qwen == QWEN_VISION
    assert internvl == QWEN_VISION + INTERNVL_IMAGE  # InternVL's tokenizer extends Qwen2.5's
    for token in internvl:
        with pytest.raises(ApiError, match="reserved token") as err:
            to_sample(parse_request(_request(f"look {token} here")), ServeLimits(), internvl)
        assert err.value.status == 400 and err.value.param == "messages.0.content.0"
    for token in INTERNVL_IMAGE:  # not tokens of Qwen's tokenizer: text to a Qwen-VL model
        sample, _ = to_sample(parse_request(_request(f"look {token} here")), ServeLimits(), qwen)
        assert sample.messages == [{"role": "user", "content": f"look {token} here"}]


@pytest.mark.slow
def test_chat_completion_with_an_image(served_internvl: Served, internvl_dir: Path) -> None:
    raw = png_bytes((224, 112))
    body = {**_request(QUESTION, data_url(raw)), "model": "tiny", "max_tokens": 8, "n": 2, "temperature": 0.9,
            "seed": 5}
    resp = httpx.post(served_internvl.url + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "chat.completion" and out["model"] == "tiny" and len(out["choices"]) == 2
    for choice in out["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    prompt = encode_prompt(load_processor(internvl_dir), [{"role": "user", "content": "<image>" + QUESTION}], [image])
    assert usage["prompt_tokens"] == len(prompt.input_ids)  # <img> + 16 <IMG_CONTEXT> + </img> + the text
    assert 2 <= usage["completion_tokens"] <= 2 * 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("token", ["<IMG_CONTEXT>", "<img>", "</img>", "<|image_pad|>"])
def test_smuggled_image_tokens_are_refused(served_internvl: Served, token: str) -> None:
    body = {**_request(f"What is {token}?", data_url(png_bytes())), "max_tokens": 2}
    resp = httpx.post(served_internvl.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert "reserved token" in err["message"] and token in err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == "messages.0.content.1"
