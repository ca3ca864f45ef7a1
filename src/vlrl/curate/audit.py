"""`vlrl data validate | stats | convert`: what a dataset holds, what it costs in tokens, other formats.

validate: per record, the image sizes before/after the processor's resize (Qwen-VL: min/max pixels; InternVL: the
tile canvas), vision tokens, text tokens and their sum against a prompt budget, from the image sizes and the model
family's adapter (`vlrl.models.families`, `image_slot`) without processing any pixels; flags records that would be
truncated and records whose image placeholders do not match their images.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrl.data.images import image_size
from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample


@dataclass
class RecordReport:
    id: str
    source: str
    image_sizes: list[tuple[int, int]]  # (w, h) on disk
    resized_sizes: list[tuple[int, int]]  # (w, h) after the processor's min/max pixels
    vision_tokens: int
    text_tokens: int
    total_tokens: int
    over_budget: bool
    token_mismatch: bool


def answer_type(answer: str) -> str:
    a = answer.strip()
    if re.fullmatch(r"[A-Z]", a):
        return "letter"
    if a.lower() in ("yes", "no", "true", "false"):
        return "yes_no"
    if re.fullmatch(r"-?\d+", a):
        return "integer"
    if re.fullmatch(r"-?\d*\.\d+|-?\d+/\d+", a):
        return "decimal_or_fraction"
    if re.fullmatch(r"\[\s*-?[\d.]+\s*(,\s*-?[\d.]+\s*){3}\]", a):
        return "box"
    return "text"


def dataset_stats(samples: Sequence[Sample]) -> dict[str, Any]:
    """Counts by task, problem type and answer type, plus images per sample."""
    return {
        "n": len(samples),
        "by_task": dict(Counter(s.task for s in samples).most_common()),
        "by_problem_type": dict(Counter(s.problem_type for s in samples).most_common()),
        "by_answer_type": dict(Counter(answer_type(s.answer) for s in samples).most_common()),
        "images_per_sample": dict(sorted(Counter(len(s.images) for s in samples).items())),
    }


def validate_record(sample: Sample, processor: Any, budget: int) -> RecordReport:
    """One record's token budget as the processor would encode it, from the image sizes alone: per image, the
    model family's `image_slot` (resized size, image tokens, the text around them, e.g. InternVL's `<img>`),
    the chat-templated text's own tokens beside."""
    from vlrl.models.inputs import prompt_text
    from vlrl.models.processor import family_of_processor

    family = family_of_processor(processor)
    tok = processor.tokenizer
    sizes = [image_size(p) for p in sample.images]
    slots = [family.image_slot(processor, w, h) for (w, h) in sizes]
    vision = sum(s.image_tokens for s in slots)
    text = prompt_text(processor, sample.messages)
    pads = text.count(family.image_token)  # one per image before expansion
    # the text's own tokens, and each slot's beside its image tokens (InternVL's <img>, </img>): special tokens
    # tokenize alone, so these counts add up to the expanded prompt's
    n_text = sum(len(tok(t.replace(family.image_token, ""), add_special_tokens=False)["input_ids"])
                 for t in [text, *(s.text for s in slots)])
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in sample.messages)
    total = n_text + vision
    return RecordReport(
        id=sample.id, source=str(sample.metadata.get("source", "")), image_sizes=sizes,
        resized_sizes=[s.resized for s in slots], vision_tokens=vision, text_tokens=n_text, total_tokens=total,
        over_budget=total > budget, token_mismatch=pads != len(sample.images) or placeholders != len(sample.images),
    )


def validate_samples(samples: Sequence[Sample], processor: Any, budget: int) -> tuple[list[RecordReport], dict[str, Any]]:
    reports = [validate_record(s, processor, budget) for s in samples]
    totals = [r.total_tokens for r in reports]
    summary = {
        "n": len(reports), "prompt_budget": budget,
        "over_budget": sum(r.over_budget for r in reports),
        "token_mismatch": sum(r.token_mismatch for r in reports),
        "vision_tokens": sum(r.vision_tokens for r in reports), "text_tokens": sum(r.text_tokens for r in reports),
        "max_total_tokens": max(totals, default=0), "mean_total_tokens": sum(totals) / max(1, len(totals)),
    }
    return reports, summary


def to_vlmr1(sample: Sample) -> dict[str, Any]:
    """A Sample as a VLM-R1 jsonl record (absolute image paths), readable back by `vlrl.data`."""
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    conv = [{"from": roles[m["role"]], "value": m["content"]} for m in sample.messages]
    conv.append({"from": "gpt", "value": sample.response if sample.response is not None else f"<answer>{sample.answer}</answer>"})
    record: dict[str, Any] = {"id": sample.id, "image": sample.images[0] if len(sample.images) == 1 else sample.images,
                              "conversations": conv, "answer": sample.answer, "problem_type": sample.problem_type}
    record.update({k: v for k, v in sample.metadata.items() if k not in record and k != "source"})
    return record


PARQUET_COLUMNS = {"id": "id", "question": "question", "answer": "answer", "image": "image",
                   "problem_type": "problem_type", "response": "response"}


def to_row(sample: Sample) -> dict[str, Any]:
    """A flat row for parquet: read back with `columns=PARQUET_COLUMNS` (single-turn prompts)."""
    user = [m["content"] for m in sample.messages if m["role"] == "user"]
    row: dict[str, Any] = {"id": sample.id, "question": "\n".join(user), "answer": sample.answer,
                           "image": list(sample.images), "problem_type": sample.problem_type,
                           "response": sample.response}
    row.update({k: v for k, v in sample.metadata.items() if k not in row and isinstance(v, (str, int, float, bool))})
    return row


def convert(samples: Sequence[Sample], out: str | Path) -> Path:
    """Write samples as VLM-R1 jsonl (`.jsonl`) or as a parquet table (`.parquet`, see `to_row`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(to_vlmr1(s)) + "\n" for s in samples))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([to_row(s) for s in samples]), out)
    else:
        raise ValueError(f"{out}: write .jsonl or .parquet")
    return out
