"""The built-in models: every family builds offline, loads with transformers, runs, and encodes samples."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText

from vlrl.models import collate, encode_prompt, encode_sft, load_model_and_processor, vision_token_ids
from vlrl.models.build import count_parameters, init_model
from vlrl.models.inputs import IGNORE_INDEX, to_chat
from vlrl.models.processor import ImageOnlyProcessor, image_token_id

CORPUS = ["How many shapes are in the image? <answer>3</answer>"] * 20


def _image() -> Image.Image:
    im = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(im).ellipse((10, 10, 40, 40), fill="red")
    return im


@pytest.mark.parametrize("arch,expected_tokens", [("qwen2-vl", 16), ("qwen2.5-vl", 16), ("qwen3-vl", 16)])
def test_each_family_builds_loads_and_trains(tmp_path, arch, expected_tokens):
    out = init_model(arch, "tiny", tmp_path / arch, corpus=CORPUS)
    hf = AutoModelForImageTextToText.from_pretrained(out)  # plain transformers loads it
    model, proc = load_model_and_processor(out)
    assert count_parameters(hf) == count_parameters(model)
    assert isinstance(proc, ImageOnlyProcessor)  # no torchvision here
    msgs = [{"role": "user", "content": "<image>How many shapes are in the image?"}]
    enc = encode_sft(proc, msgs, [_image()], "<answer>3</answer>")
    assert int((enc.input_ids == image_token_id(proc)).sum()) == expected_tokens
    batch = collate([enc, enc], proc.tokenizer.pad_token_id, image_token_id(proc))
    labels = batch.pop("labels")
    logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.visual.merger.parameters().__next__().grad is not None  # gradient reaches the vision side


def test_tiny_size_matches_calibration(tmp_path):
    model, _ = load_model_and_processor(init_model("qwen2-vl", "tiny", tmp_path / "m", corpus=CORPUS))
    assert 3.0e6 < count_parameters(model) < 4.5e6  # calibration.md: 3.85 M


def test_labels_mask_everything_but_the_answer(tiny_model_dir):
    _, proc = load_model_and_processor(tiny_model_dir)
    msgs = [{"role": "user", "content": "Count: <image> shapes?"}]
    enc = encode_sft(proc, msgs, [_image()], "<answer>3</answer>")
    target = enc.labels[enc.labels != IGNORE_INDEX]
    assert proc.tokenizer.decode(target) == "<answer>3</answer><|im_end|>"
    prompt = encode_prompt(proc, msgs, [_image()])
    assert torch.equal(enc.input_ids[: len(prompt.input_ids)], prompt.input_ids)
    text = proc.tokenizer.decode(prompt.input_ids)
    # the image stands where its placeholder stood, and the prompt ends with the assistant header
    assert text.index("Count: ") < text.index("<|vision_start|>") < text.index(" shapes?")
    assert text.endswith("<|im_start|>assistant\n")


def test_reasoning_tags_survive_decoding(tiny_model_dir):
    _, proc = load_model_and_processor(tiny_model_dir)
    ids = proc.tokenizer("<think>a</think><answer>7</answer>", add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think><answer>7</answer>"
    assert proc.tokenizer.convert_tokens_to_ids("<answer>") not in vision_token_ids(proc.tokenizer)


def test_collate_padding_sides_and_mm_token_type_ids(tiny_model_dir):
    _, proc = load_model_and_processor(tiny_model_dir)
    short = encode_prompt(proc, [{"role": "user", "content": "<image>Hi"}], [_image()])
    long = encode_prompt(proc, [{"role": "user", "content": "<image>Hello there, how many?"}], [_image()])
    pad, img = proc.tokenizer.pad_token_id, image_token_id(proc)
    left = collate([short, long], pad, img, padding_side="left")
    right = collate([short, long], pad, img, padding_side="right")
    k = len(long.input_ids) - len(short.input_ids)
    assert k > 0
    assert left["attention_mask"][0, :k].sum() == 0 and left["attention_mask"][0, k:].all()
    assert right["attention_mask"][0, -k:].sum() == 0
    assert torch.equal(left["mm_token_type_ids"].sum(1), torch.tensor([16, 16]))
    assert left["pixel_values"].shape[0] == 2 * 64 and left["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]


def test_two_images_keep_their_positions(tiny_model_dir):
    _, proc = load_model_and_processor(tiny_model_dir)
    chat = to_chat([{"role": "user", "content": "A <image> and B <image> ?"}])
    assert [c["type"] for c in chat[0]["content"]] == ["text", "image", "text", "image", "text"]
    enc = encode_prompt(proc, [{"role": "user", "content": "A <image> and B <image> ?"}], [_image(), _image()])
    assert int((enc.input_ids == image_token_id(proc)).sum()) == 32
    assert enc.image_grid_thw.shape == (2, 3)


def test_min_max_pixels_override(tiny_model_dir):
    _, proc = load_model_and_processor(tiny_model_dir, max_pixels=56 * 56)
    enc = encode_prompt(proc, [{"role": "user", "content": "<image>?"}], [_image()])
    assert int((enc.input_ids == image_token_id(proc)).sum()) == 4  # 56x56 -> 4x4 patches -> 2x2 merged


def test_saved_folder_is_hf_format(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "chat_template.jinja"} <= names
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "qwen2_vl"
