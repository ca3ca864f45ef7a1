"""Training log-probs against TRL 1.16's, on both model families (Qwen2-VL and InternVL): the per-token log-probs,
entropies and gradients `vlrl.train.logprobs` gives each [prompt | completion] row equal those of TRL's
`GRPOTrainer._get_per_token_logps_and_entropies`, run unmodified on the model with TRL's fused LM head
(`add_fused_lm_head`, on a copy of the model) and on the batch TRL builds: left-padded prompts, right-padded
completions, `logits_to_keep` = the longest completion, pixel_values per row (Qwen-VL: `image_grid_thw`,
`mm_token_type_ids`, `num_images`; InternVL: `num_tiles`), in chunks of `batch_size` rows that split the images.

vlrl removes the vision tokens from the distribution it samples and trains (`suppress_ids`); TRL does not, so the
parity is taken with nothing suppressed. Every vlrl layout (shared prefix, shared vision features, plain) is held
to TRL's: within 1e-5 for log-probs and gradients, 1e-4 for entropies (the tolerances of the layout tests)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from random_groups import random_groups

from vlrl.data.loading import load_samples
from vlrl.models.build import init_model
from vlrl.models.families import QWEN_VL, family_of_model
from vlrl.models.inputs import encode_for_generation, encode_prompt
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id
from vlrl.rollout import Group
from vlrl.train.logprobs import build_rows, row_logprobs

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

LENGTHS = [[5, 1, 3], [2, 6, 6], [4, 4, 1], [3, 2, 5]]  # completion lengths per group
TEMPERATURE = 1.3
CPU = torch.device("cpu")
ROWS = [(g, j) for g in range(4) for j in range(3)]
LAYOUTS = [(True, True), (False, True), (False, False)]  # (shared_prefix, share_vision)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wide_image() -> Image.Image:
    image = Image.new("RGB", (224, 112), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill="red")
    return image


@pytest.fixture(scope="module", params=["qwen2-vl", "internvl"])
def setup(request, synth_dir, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model of each family in train mode; four prompts of different lengths: two synthetic (one image),
    a wide image (InternVL: 2 tiles + a thumbnail, up to 4 tiles allowed) and a text-only one."""
    if request.param == "qwen2-vl":
        folder = request.getfixturevalue("tiny_model_dir")
    else:
        folder = init_model("internvl", "tiny", tmp_path_factory.mktemp("models") / "tiny-internvl", seed=0)
    model, processor = load_model_and_processor(folder, max_pixels=4 * 112 * 112)
    model.train()
    samples = [load_samples([str(synth_dir / task / "train.jsonl")])[0] for task in ("counting", "chart")]
    encoded = encode_for_generation(processor, samples)
    encoded.append(encode_prompt(processor, [{"role": "user", "content": "<image>How many shapes?"}], [_wide_image()]))
    encoded.append(encode_prompt(processor, [{"role": "user", "content": "Count to three."}], []))
    assert len({len(e.input_ids) for e in encoded}) == 4  # four prompt lengths: left padding matters
    return model, processor, random_groups(processor, samples, encoded, LENGTHS)


class _Accelerator:
    """Single-process stand-in for `accelerate.Accelerator` (what the method reads of it)."""

    is_main_process = True

    def autocast(self) -> Any:
        return nullcontext()


def _trl_batch(model, processor, groups: list[Group]) -> dict[str, Any]:
    """The arguments of `_get_per_token_logps_and_entropies` for ROWS, built as `GRPOTrainer` builds them in
    `_generate_and_score_completions`: [left-padded prompt | right-padded completion], the images of every row."""
    pad = processor.tokenizer.pad_token_id
    prompts = [groups[g].prompt for g, _ in ROWS]
    completions = [groups[g].completions[j].token_ids for g, j in ROWS]
    lp, lc = max(len(p.input_ids) for p in prompts), max(len(c) for c in completions)
    ids = torch.full((len(ROWS), lp + lc), pad, dtype=torch.long)  # [B, P + C]
    mask = torch.zeros_like(ids)  # [B, P + C]
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, lp - len(p.input_ids) : lp], ids[r, lp : lp + len(c)] = p.input_ids, c
        mask[r, lp - len(p.input_ids) : lp + len(c)] = 1
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    # images per row: Qwen-VL's image_grid_thw rows; each InternVL prompt here holds at most one image
    num_images = [0 if p.pixel_values is None else 1 if p.image_grid_thw is None else len(p.image_grid_thw)
                  for p in prompts]
    # chunks of 4 rows split groups and (InternVL) the tiles of different rows; each chunk holds an image, since TRL
    # hands a chunk without one an empty pixel_values, which the vision tower cannot take
    kw: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, logits_to_keep=lc, batch_size=4,
                              compute_entropy=True, pixel_values=torch.cat(pixels), num_images=num_images)
    if family_of_model(model) is QWEN_VL:
        kw["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prompts if p.image_grid_thw is not None])
        kw["mm_token_type_ids"] = (ids == image_token_id(processor)).long() * mask  # zeros on the completions
    else:  # InternVL: pixel_values are tiles, counted per row
        kw["num_tiles"] = [0 if p.pixel_values is None else int(p.pixel_values.shape[0]) for p in prompts]
    return kw


def _trl(model, processor, groups) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """TRL's (log-probs [B, C], entropies [B, C], gradients of sum(weights * log-probs), completion mask [B, C])."""
    m = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(m, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    trainer: Any = object.__new__(trl_grpo.GRPOTrainer)
    trainer.accelerator = _Accelerator()
    kw = _trl_batch(model, processor, groups)
    logp, entropy, _ = trainer._get_per_token_logps_and_entropies(m, **kw)
    mask = kw["attention_mask"][:, -kw["logits_to_keep"]:].float()  # [B, C]
    (logp * mask * _weights(mask)).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return logp.detach() * mask, entropy.detach() * mask, grads, mask


def _weights(mask: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask)


@pytest.mark.parametrize(("shared_prefix", "share_vision"), LAYOUTS)
def test_training_logprobs_entropies_and_gradients_equal_trls(setup, shared_prefix, share_vision):
    model, processor, groups = setup
    trl_logp, trl_entropy, trl_grads, mask = _trl(model, processor, groups)
    m = copy.deepcopy(model)
    batch = build_rows(groups, ROWS, processor.tokenizer.pad_token_id, image_token_id(processor),
                       share_vision=share_vision, shared_prefix=shared_prefix)
    out = row_logprobs(m, groups, batch, temperature=TEMPERATURE, suppress_ids=[], device=CPU, with_entropy=True)
    assert torch.equal(out.mask, mask)
    assert float((out.logp.detach() - trl_logp).abs().max()) < 1e-5
    assert float((out.entropy - trl_entropy).abs().max()) < 1e-4
    assert float(trl_logp.min()) < -3.0  # real log-probs of random tokens, not a degenerate all-zero match
    (out.logp * _weights(mask)).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads.keys() == trl_grads.keys() and len(grads) > 0.9 * len(list(model.parameters()))
    worst = max(float((grads[k] - trl_grads[k]).abs().max()) for k in grads)
    assert worst < 1e-5, worst

