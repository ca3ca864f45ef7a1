"""Rows shaped as the RL frameworks the seeds use publish them -> Sample.

  easyr1 (alias hf)  EasyR1 / Hugging Face datasets (geometry3k's layout): `problem` (or a string `prompt`) with
                     `<image>` where each image stands, `answer`, `images` (a list of HF `Image` structs
                     `{"bytes", "path"}`, raw bytes or paths; or one under `image`); optional `problem_type`,
                     `options`, `id`, `data_source`.
  sophiavl           SophiaVL-R1's rows (its fork of EasyR1): `problem`, `solution` as `<answer>...</answer>`,
                     `path` (an image path, relative to the registry's `image_base_path`), `problem_type`
                     (`multiple choice`, `numerical`, `OCR`, `free-form`, `text`), `options`, `data_type`
                     (`image` / `text`), `data_source`, `problem_id`. Its `dataset_info.json` `columns` map source
                     column -> role (prompt, answer, images), as SophiaVL renames them.
  verl               verl's RL parquet: `prompt` = chat messages whose content holds `<image>`, `images`,
                     `reward_model: {"style", "ground_truth"}`, `data_source`, `ability`, `extra_info`.

A row that vlrl wrote (`vlrl data convert`) also carries a `vlrl` JSON string (easyr1: a column, verl: in
`extra_info`) with the sample's id, problem type, demonstration, metadata and, when the prompt is more than one
user turn, its messages, so that converting back gives the same Sample.
"""

from __future__ import annotations

import json
import re
from typing import Any

from vlrl.data.common import (
    LETTERS,
    RecordContext,
    answer_from_response,
    answer_text,
    choices_block,
    fit_placeholders,
    infer_problem_type,
    normalize_problem_type,
    options_list,
    require,
    resolve_images,
)
from vlrl.data.embedded import cell_bytes
from vlrl.data.errors import DataError
from vlrl.data.sample import IMAGE_PLACEHOLDER, PROBLEM_TYPES, Sample
from vlrl.data.screen import NESTING_MESSAGE, record_problem

ROLES = ("prompt", "answer", "images")
SOPHIAVL_COLUMNS = {"problem": "prompt", "solution": "answer", "path": "images"}  # its dataset_info.json's demo
VLRL_KEY = "vlrl"
_MATH_HINT = re.compile(r"\\|\^|\$|\d\s*/\s*\d|[πθ√°]|sqrt|frac")
_LETTERED = re.compile(r"^\(?([A-Z])[.):]\s*")


def math_aware_type(answer: str, options: list[str] | None = None) -> str:
    """`infer_problem_type`, except that a LaTeX or fraction answer is `math` (EasyR1's and verl's datasets are
    scored by a math checker by default) rather than free-form text."""
    found = infer_problem_type(answer, options)
    return "math" if found == "free_form" and _MATH_HINT.search(answer) else found


def _named_type(value: Any) -> str | None:
    """The problem type that a free-text label (verl's `ability`, a `data_source`) names, None when none."""
    if not isinstance(value, str) or not value.strip():
        return None
    for candidate in (value, value.rsplit("/", 1)[-1]):
        try:
            return normalize_problem_type(candidate, None)
        except DataError:
            continue
    return None


def _restore(record: dict[str, Any], ctx: RecordContext, field_name: str) -> dict[str, Any] | None:
    """The `vlrl` JSON a vlrl writer left in the row, None when there is none."""
    raw = record.get(VLRL_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw) if isinstance(raw, str) else None
    except RecursionError:
        raise ctx.error(field_name, NESTING_MESSAGE.format(ctx.read.limits.max_depth)) from None
    except ValueError as exc:
        raise ctx.error(field_name, f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ctx.error(field_name, "must be a JSON object written by vlrl")
    problem = record_problem(data, ctx.read.limits)  # the JSON inside the record is screened as the record was
    if problem is not None:
        raise ctx.error(f"{field_name}.{problem[0]}" if problem[0] else field_name, problem[1])
    return data


def _plain(record: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """The row's other columns, for metadata: binary cells (images in unused columns) are left out."""
    return {k: v for k, v in record.items() if k not in used and cell_bytes(v) is None and k != VLRL_KEY}


def _strip_letters(options: list[str]) -> list[str]:
    """["A. Yes", "B. No"] -> ["Yes", "No"] when every option carries its own letter in order (Video-R1 /
    SophiaVL-R1 options do); otherwise unchanged."""
    found = [_LETTERED.match(o) for o in options]
    if options and all(m is not None and m.group(1) == LETTERS[i] for i, m in enumerate(found)):
        return [o[m.end():] for o, m in zip(options, found) if m is not None]
    return options


def from_prompt_answer(record: dict[str, Any], ctx: RecordContext, columns: dict[str, str] | None = None) -> Sample:
    """An EasyR1 / HF row (or, with SophiaVL's source -> role `columns`, a SophiaVL-R1 row) as a Sample.

    `columns` maps source column -> role (prompt, answer, images); without it the roles are read from `problem`
    (else `prompt`), `answer` and `images` (else `image`). An answer in `<answer>` tags is unwrapped. Non-empty
    `options` are listed under the prompt ("A. opt" lines) and make the row multiple choice. `problem_type`:
    the row's (normalised, SophiaVL's `text` is free-form), else the reader's default, else inferred
    (`math_aware_type`). `data_type: text` rows are text-only; `video` rows are refused."""
    source = {role: src for src, role in (columns or {}).items() if role in ROLES}
    source.setdefault("prompt", "problem" if "problem" in record or "prompt" not in record else "prompt")
    source.setdefault("answer", "answer")
    source.setdefault("images", "images")
    if source["images"] not in record:  # e.g. R1-V's problem / solution rows keep their picture under `image`
        source["images"] = next((k for k in ("images", "image") if k in record), source["images"])
    prompt = require(record, source["prompt"], ctx, what="column")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ctx.error(source["prompt"], "the prompt must be a non-empty string")
    raw_answer = require(record, source["answer"], ctx, what="column")
    answer = answer_text(raw_answer, ctx, source["answer"])
    answer = answer_from_response(answer) if "<answer>" in answer else answer
    if not answer:
        raise ctx.error(source["answer"], "answer is empty")
    data_type = str(record.get("data_type") or "image").lower()
    if data_type == "video":
        raise ctx.error("data_type", "video rows are not supported (images only)")
    images = [] if data_type == "text" else resolve_images(record.get(source["images"]) or None, ctx, source["images"])
    text = fit_placeholders([prompt], len(images), ctx, source["prompt"])[0]
    options = _strip_letters(options_list(record.get("options"), ctx))
    if options:
        text = f"{text}\n{choices_block(options)}"
    saved = _restore(record, ctx, VLRL_KEY)
    if saved is not None:
        return _restored(saved, ctx, images, [{"role": "user", "content": text}], answer, VLRL_KEY)
    if record.get("problem_type") not in (None, ""):
        problem_type = normalize_problem_type(record["problem_type"], ctx)
    else:
        problem_type = ctx.read.problem_type or math_aware_type(answer, options)
    used = set(source.values()) | {"problem_type", "options", "id", "problem_id"}
    metadata = _plain(record, used)
    if options:
        metadata["options"] = options
    if isinstance(record.get("data_source"), str) and record["data_source"]:
        metadata["task"] = record["data_source"]
    metadata["source"] = ctx.source
    record_id = record.get("id", record.get("problem_id"))
    return Sample(
        id=ctx.default_id if record_id is None else str(record_id),
        images=images,
        messages=[{"role": "user", "content": text}],
        answer=answer,
        problem_type=problem_type,
        metadata=metadata,
    )


def _restored(saved: dict[str, Any], ctx: RecordContext, images: list[str], messages: list[dict[str, str]],
              answer: str, field_name: str) -> Sample:
    """The Sample a vlrl writer saved: its own id, type, demonstration, metadata and (multi-turn) messages."""
    if "messages" in saved:
        messages = _messages(saved["messages"], ctx, f"{field_name}.messages")
        fit_placeholders([m["content"] for m in messages if m["role"] == "user"], len(images), ctx, field_name)
    problem_type = saved.get("problem_type")
    if problem_type not in PROBLEM_TYPES:
        raise ctx.error(f"{field_name}.problem_type", f"unknown problem_type {problem_type!r}")
    response = saved.get("response")
    metadata = saved.get("metadata") or {}
    if not isinstance(metadata, dict) or (response is not None and not isinstance(response, str)):
        raise ctx.error(field_name, "metadata must be an object and response a string or null")
    return Sample(
        id=str(saved.get("id", ctx.default_id)),
        images=images,
        messages=messages,
        answer=answer,
        problem_type=str(problem_type),
        response=response,
        metadata={**metadata, "source": ctx.source},
    )


def _content(value: Any, ctx: RecordContext, field_name: str) -> str:
    """A message's content as text: a string, or OpenAI-style parts where `{"type": "image"}` is `<image>`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image", "image_url"):
                parts.append(IMAGE_PLACEHOLDER)
            else:
                raise ctx.error(f"{field_name}[{i}]", f"unknown content part {part!r}")
        return "".join(parts)
    raise ctx.error(field_name, f"content must be a string or a list of parts, got {type(value).__name__}")


def _messages(value: Any, ctx: RecordContext, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ctx.error(field_name, "must be a non-empty list of {'role', 'content'} messages")
    out = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ctx.error(f"{field_name}[{i}].role", f"unknown role {role!r}; valid: system, user, assistant")
        out.append({"role": str(role), "content": _content(message.get("content"), ctx, f"{field_name}[{i}].content")})
    return out


def from_verl(record: dict[str, Any], ctx: RecordContext) -> Sample:
    """A verl RL row as a Sample.

    `prompt` (chat messages; a final assistant message becomes the SFT demonstration) -> messages, with
    `images` where `<image>` stands (none: prepended to the first user turn); `reward_model.ground_truth` ->
    answer. The problem type: `extra_info.problem_type`, else what `ability` names (verl's examples say `math`),
    else what `data_source` names, else the reader's default, else inferred from the answer. `data_source` is
    the task; `ability`, `reward_model.style` and `extra_info` go to metadata."""
    messages = _messages(require(record, "prompt", ctx, what="column"), ctx, "prompt")
    response = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    user = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user:
        raise ctx.error("prompt", "no user message")
    images = resolve_images(record.get("images") or None, ctx, "images")
    texts = fit_placeholders([messages[i]["content"] for i in user], len(images), ctx, f"prompt[{user[0]}].content")
    for i, text in zip(user, texts):
        messages[i]["content"] = text
    reward = require(record, "reward_model", ctx, what="column")
    if not isinstance(reward, dict) or "ground_truth" not in reward:
        raise ctx.error("reward_model.ground_truth", "missing (reward_model must be {'style', 'ground_truth'})")
    answer = answer_text(reward["ground_truth"], ctx, "reward_model.ground_truth")
    answer = answer_from_response(answer) if "<answer>" in answer else answer
    extra = record.get("extra_info")
    extra = extra if isinstance(extra, dict) else {}
    saved = _restore(extra, ctx, "extra_info.vlrl")
    if saved is not None:
        return _restored(saved, ctx, images, messages, answer, "extra_info.vlrl")
    if extra.get("problem_type") not in (None, ""):
        problem_type = normalize_problem_type(extra["problem_type"], ctx, "extra_info.problem_type")
    else:
        problem_type = (_named_type(record.get("ability")) or _named_type(record.get("data_source"))
                        or ctx.read.problem_type or math_aware_type(answer))
    metadata = _plain(record, {"prompt", "images", "reward_model", "data_source", "extra_info"})
    if isinstance(reward.get("style"), str):
        metadata["reward_style"] = reward["style"]
    if extra:
        metadata["extra_info"] = {k: v for k, v in extra.items() if cell_bytes(v) is None}
    if isinstance(record.get("data_source"), str) and record["data_source"]:
        metadata["task"] = record["data_source"]
    metadata["source"] = ctx.source
    record_id = extra.get("id")
    return Sample(
        id=ctx.default_id if record_id is None else str(record_id),
        images=images,
        messages=messages,
        answer=answer,
        problem_type=problem_type,
        response=response,
        metadata=metadata,
    )
