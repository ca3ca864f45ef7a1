"""InternVL, the second family: the tiny model builds offline, loads with transformers' own classes, and its
image-only processor (no torchvision) feeds it the tokens and tiles transformers' InternVLProcessor would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, InternVLForConditionalGeneration

from vlrl.cli import cmd_init_model
from vlrl.models import collate, encode_prompt, encode_sft, load_model_and_processor, vision_token_ids
from vlrl.models.build import count_parameters, init_model
from vlrl.models.families import INTERNVL, QWEN_VL, family_of
from vlrl.models.families.internvl import (
    InternVLImageOnlyProcessor,
    internvl_config,
    tile_size,
    tokens_per_tile,
)
from vlrl.models.inputs import IGNORE_INDEX
from vlrl.models.loading import merger_module, vision_module
from vlrl.models.processor import family_of_processor, image_token_id, load_processor, reserved_tokens
from vlrl.models.sizes import SIZE_TABLE

CORPUS = ["How many shapes are in the image? <answer>3</answer>"] * 20
QUESTION = [{"role": "user", "content": "<image>How many shapes are in the image?"}]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model("internvl", "tiny", tmp_path_factory.mktemp("models") / "tiny-internvl", corpus=CORPUS)


def _image(w: int = 112, h: int = 112) -> Image.Image:
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).ellipse((10, 10, 40, 40), fill="red")
    return im


def _ids(proc, *tokens: str) -> list[int]:
    return [proc.tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_builds_offline_in_hf_format_and_loads_with_transformers(internvl_dir):
    names = {p.name for p in internvl_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json", "chat_template.jinja"} <= names
    cfg = json.loads((internvl_dir / "config.json").read_text())
    assert cfg["model_type"] == "internvl" and cfg["text_config"]["model_type"] == "qwen2"
    assert cfg["vision_config"]["image_size"] == [112, 112] and cfg["downsample_ratio"] == 0.5
    assert json.loads((internvl_dir / "processor_config.json").read_text()) == {
        "processor_class": "InternVLProcessor", "image_seq_length": 16}
    hf = AutoModelForImageTextToText.from_pretrained(internvl_dir)
    assert type(hf) is InternVLForConditionalGeneration
    model, proc = load_model_and_processor(internvl_dir)
    assert isinstance(proc, InternVLImageOnlyProcessor)  # transformers' InternVLProcessor needs torchvision
    assert count_parameters(model) == count_parameters(hf)
    assert 3.0e6 < count_parameters(model) < 4.5e6
    assert model.config.image_token_id == image_token_id(proc) == proc.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert len(proc.tokenizer) <= model.config.text_config.vocab_size
    tok = proc.tokenizer  # InternVLProcessor reads these attributes
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token, tok.video_token) == (
        "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert family_of(model.config.model_type) is INTERNVL


def test_processor_expands_one_image_into_context_tokens_and_one_tile(internvl_dir):
    _, proc = load_model_and_processor(internvl_dir)
    enc = encode_prompt(proc, QUESTION, [_image()])
    ids = enc.input_ids.tolist()
    start, end, ctx = _ids(proc, "<img>", "</img>", "<IMG_CONTEXT>")
    assert ids.count(ctx) == 16 and ids.count(start) == 1 and ids.count(end) == 1
    assert ids[ids.index(start) + 1: ids.index(end)] == [ctx] * 16  # <img> <IMG_CONTEXT> x 16 </img>
    text = proc.tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT>")
    assert text.endswith("</img>\nHow many shapes are in the image?<|im_end|>\n<|im_start|>assistant\n")
    assert enc.image_grid_thw is None
    assert enc.pixel_values.shape == (1, 3, 112, 112)
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(enc.pixel_values[0, :, 100, 100], white, atol=1e-4)  # ImageNet-normalised white


def test_max_pixels_allows_tiles_and_the_model_takes_them(internvl_dir):
    model, proc = load_model_and_processor(internvl_dir, max_pixels=4 * 112 * 112)
    assert proc.image_processor.max_patches == 4
    enc = encode_prompt(proc, QUESTION, [_image(224, 112)])  # 2 x 1 tiles + a thumbnail
    assert enc.pixel_values.shape == (3, 3, 112, 112)
    assert int((enc.input_ids == image_token_id(proc)).sum()) == 3 * 16
    batch = collate([enc], proc.tokenizer.pad_token_id, image_token_id(proc))
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, len(enc.input_ids), 1536)
    _, small = load_model_and_processor(internvl_dir, min_pixels=2 * 112 * 112, max_pixels=112 * 112)
    assert (small.image_processor.min_patches, small.image_processor.max_patches) == (1, 1)


def test_sft_batch_forward_and_loss_reach_the_projector_and_the_tower(internvl_dir):
    model, proc = load_model_and_processor(internvl_dir)
    a = encode_sft(proc, QUESTION, [_image()], "<answer>3</answer>")
    b = encode_sft(proc, [{"role": "user", "content": "Count: <image> shapes, please?"}], [_image()], "<answer>12</answer>")
    assert proc.tokenizer.decode(a.labels[a.labels != IGNORE_INDEX]) == "<answer>3</answer><|im_end|>"
    batch = collate([a, b], proc.tokenizer.pad_token_id, image_token_id(proc))
    assert "image_grid_thw" not in batch and batch["pixel_values"].shape == (2, 3, 112, 112)
    assert batch["mm_token_type_ids"].sum(1).tolist() == [16, 16]  # the forward tolerates them
    labels = batch.pop("labels")
    logits = model(**batch).logits
    assert logits.shape == (2, max(len(a.input_ids), len(b.input_ids)), 1536)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.isfinite(loss) and 5.0 < loss.item() < 10.0  # random init: about ln(1536) = 7.3
    loss.backward()
    merger = merger_module(model)
    assert merger is model.model.multi_modal_projector
    tower = {id(p) for p in vision_module(model).parameters()} - {id(p) for p in merger.parameters()}
    assert tower == {id(p) for p in model.model.vision_tower.parameters()}
    assert merger.linear_1.weight.grad.abs().sum() > 0
    assert model.model.vision_tower.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_generate_never_samples_vision_tokens(internvl_dir):
    model, proc = load_model_and_processor(internvl_dir)
    banned = vision_token_ids(proc.tokenizer)
    assert set(_ids(proc, "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|image_pad|>", "<|vision_start|>")) <= set(banned)
    assert not set(_ids(proc, "<answer>", "<ref>", "<box>", "<|im_end|>")) & set(banned)
    enc = encode_prompt(proc, QUESTION, [_image()])
    family = family_of_processor(proc)
    assert family is INTERNVL and not family.mm_token_type_ids  # InternVL's generate rejects them
    batch = collate([enc, enc], proc.tokenizer.pad_token_id, image_token_id(proc), padding_side="left",
                    mm_token_type_ids=family.mm_token_type_ids)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    boost = torch.zeros(model.config.text_config.vocab_size)
    boost[banned] = 100.0  # a model that prefers vision tokens over any text
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: out + boost)
    try:
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
        free = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        kept = model.generate(**batch, **kw, suppress_tokens=banned)[:, batch["input_ids"].shape[1]:]
    finally:
        hook.remove()
    assert int(free[0, 0]) in banned
    assert kept.shape == (2, 6) and not set(kept.flatten().tolist()) & set(banned)


def test_qwen_tokenizer_keeps_its_own_vision_tokens(tiny_model_dir):
    _, proc = load_model_and_processor(tiny_model_dir)
    assert vision_token_ids(proc.tokenizer) == sorted(_ids(proc, *QWEN_VL.vision_tokens))
    assert image_token_id(proc) == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert family_of_processor(proc) is QWEN_VL and QWEN_VL.mm_token_type_ids


@pytest.mark.parametrize("size", [(112, 112), (224, 112), (112, 300), (500, 90), (300, 300), (40, 30)])
def test_image_slot_is_what_the_processor_writes(internvl_dir, tiny_model_dir, size):
    """Each family's `image_slot`, from the image size alone: the tokens the processor writes for the image (Qwen:
    <|image_pad|> x n inside the template's vision_start/end; InternVL: <img>, <IMG_CONTEXT> x 16 per tile,
    </img>), its tiles and the size it resizes the image to."""
    w, h = size
    for folder in (internvl_dir, tiny_model_dir):
        proc = load_processor(folder, max_pixels=6 * 112 * 112)
        family = family_of_processor(proc)
        slot = family.image_slot(proc, w, h)
        enc = encode_prompt(proc, [{"role": "user", "content": "<image>hi"}], [_image(w, h)])
        ids = enc.input_ids.tolist()
        start = ids.index(image_token_id(proc)) - (1 if family is INTERNVL else 0)  # InternVL: from <img>
        want = proc.tokenizer(slot.text, add_special_tokens=False)["input_ids"]
        assert ids[start : start + len(want)] == want
        assert ids.count(image_token_id(proc)) == slot.image_tokens
        if family is INTERNVL:  # tiles on the resized canvas, + a thumbnail when more than one
            assert slot.image_tokens == 16 * slot.tiles == 16 * enc.pixel_values.shape[0]
            cols, rows = slot.resized[0] // 112, slot.resized[1] // 112
            assert slot.tiles == (1 if cols * rows == 1 else cols * rows + 1)
            if size == (224, 112):
                assert (slot.resized, slot.tiles) == ((224, 112), 3)
        else:  # one image of (t, h / patch, w / patch) patches
            gw, gh = slot.resized[0] // 14, slot.resized[1] // 14
            assert slot.tiles == 1 and enc.image_grid_thw.tolist() == [[1, gh, gw]]


def test_reserved_tokens_are_the_tokenizers_vision_tokens(internvl_dir, tiny_model_dir):
    internvl, qwen = load_processor(internvl_dir), load_processor(tiny_model_dir)
    assert reserved_tokens(internvl) == ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                         "<|video_pad|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    assert reserved_tokens(qwen) == QWEN_VL.vision_tokens
    assert vision_token_ids(internvl.tokenizer) == sorted(_ids(internvl, *reserved_tokens(internvl)))


def test_tile_geometry():
    assert tile_size(None) == 112 and tile_size(224 * 224) == 224 and tile_size(150 * 150) == 140
    assert tokens_per_tile(112, 14, 0.5) == 16 and tokens_per_tile(448, 14, 0.5) == 256  # InternVL3's 448 tiles
    cfg = internvl_config(SIZE_TABLE["tiny"], {"image": 5, "eos": 2, "pad": 0}, tile=224)
    assert cfg.image_seq_length == 64 and list(cfg.vision_config.image_size) == [224, 224]
    with pytest.raises(ValueError, match="multiple of 28"):
        internvl_config(SIZE_TABLE["tiny"], {"image": 5, "eos": 2, "pad": 0}, tile=100)


def test_qwen3_text_model_as_internvl35(internvl_dir):
    _, proc = load_model_and_processor(internvl_dir)
    ids = {"image": image_token_id(proc), "eos": proc.tokenizer.eos_token_id, "pad": proc.tokenizer.pad_token_id}
    cfg = internvl_config(SIZE_TABLE["tiny"], ids, text_model_type="qwen3")
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg)
    assert type(model.model.language_model).__name__ == "Qwen3Model"
    enc = encode_prompt(proc, QUESTION, [_image()])
    with torch.no_grad():
        logits = model(**collate([enc], proc.tokenizer.pad_token_id, image_token_id(proc))).logits
    assert logits.shape == (1, len(enc.input_ids), 1536) and torch.isfinite(logits).all()


def test_fallback_reads_the_hf_checkpoint_layout(internvl_dir, tmp_path):
    """The HF-format checkpoints name the InternVL tokens in an `extra_special_tokens` dict and save the fast
    (torchvision) image processor's config with crop_to_patches false, which InternVLProcessor overrides (tiling on);
    a folder without processor_config.json takes the tokens per tile from config.json."""
    folder = tmp_path / "ckpt"
    shutil.copytree(internvl_dir, folder, ignore=shutil.ignore_patterns("model.safetensors", "processor_config.json"))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    named = {k: tok_cfg.pop(k) for k in ("start_image_token", "end_image_token", "context_image_token", "video_token")}
    tok_cfg["extra_special_tokens"] = named
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(image_processor_type="GotOcr2ImageProcessorFast", crop_to_patches=False, max_patches=12,
               data_format="channels_first", default_to_square=True, crop_size=None, processor_class="InternVLProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    proc = load_processor(folder)
    assert isinstance(proc, InternVLImageOnlyProcessor) and proc.image_seq_length == 16
    assert proc.image_processor.max_patches == 12
    enc = encode_prompt(proc, QUESTION, [_image()])  # square, one tile's size: one tile
    assert int((enc.input_ids == image_token_id(proc)).sum()) == 16
    wide = encode_prompt(proc, QUESTION, [_image(300, 150)])  # 2 x 1 tiles + a thumbnail
    assert wide.pixel_values.shape == (3, 3, 112, 112)
    assert int((wide.input_ids == image_token_id(proc)).sum()) == 48


def test_cli_init_model_internvl(tmp_path, capsys):
    cmd_init_model(["--arch", "internvl", "--size", "tiny", "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert out.startswith("internvl/tiny: 3.") and "M parameters" in out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "internvl"
