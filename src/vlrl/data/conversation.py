"""VLM-R1 jsonl and LLaVA json records (`image` + `conversations` turns) -> Sample."""

from __future__ import annotations

from typing import Any

from vlrl.data.common import (
    RecordContext,
    answer_from_response,
    answer_text,
    fit_placeholders,
    infer_problem_type,
    normalize_problem_type,
    options_list,
    require,
    resolve_images,
)
from vlrl.data.sample import Sample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_USED_KEYS = ("id", "image", "images", "conversations", "problem_type", "answer")


def _turns(conversations: Any, ctx: RecordContext) -> list[dict[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise ctx.error("conversations", "must be a non-empty list of {'from', 'value'} turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ctx.error(f"conversations[{i}]", f"a turn must be an object, got {type(turn).__name__}")
        speaker = turn.get("from", turn.get("role"))
        if not isinstance(speaker, str) or speaker not in ROLES:
            raise ctx.error(
                f"conversations[{i}].from", f"unknown speaker {speaker!r}; valid: {', '.join(ROLES)}"
            )
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise ctx.error(f"conversations[{i}].value", f"turn text must be a string, got {text!r}")
        turns.append({"role": ROLES[speaker], "content": text})
    return turns


def from_conversation(record: dict[str, Any], ctx: RecordContext) -> Sample:
    """One VLM-R1 / LLaVA record as a Sample.

    - human / gpt / system turns become user / assistant / system messages.
    - When the conversation ends with a gpt turn, that turn is `response` (the SFT target) and is not part
      of `messages`; earlier gpt turns stay in `messages` (multi-turn context).
    - `<image>` placeholders stay where they are; with none, one per image is prepended to the first
      human turn; any other count mismatch is an error.
    - `answer`: the record's `answer`, else the last `<answer>...</answer>` in the response, else the
      response stripped.
    - `problem_type`: the record's (normalised), else the reader's default, else inferred from the answer.
    - Every other key goes to `metadata`, plus `source` = "file:line".
    """
    turns = _turns(require(record, "conversations", ctx), ctx)
    response = turns.pop()["content"] if turns[-1]["role"] == "assistant" else None
    user_idx = [i for i, t in enumerate(turns) if t["role"] == "user"]
    if not user_idx:
        raise ctx.error("conversations", "no human turn before the final gpt turn")

    image_key = "image" if "image" in record or "images" not in record else "images"
    images = resolve_images(record.get(image_key), ctx, image_key)
    first = user_idx[0]
    texts = fit_placeholders(
        [turns[i]["content"] for i in user_idx], len(images), ctx, f"conversations[{first}].value"
    )
    for i, text in zip(user_idx, texts):
        turns[i]["content"] = text

    if "answer" in record:
        answer = answer_text(record["answer"], ctx)
    elif response is not None:
        answer = answer_from_response(response)
        if not answer:
            raise ctx.error(
                f"conversations[{len(turns)}].value", "the gpt turn is empty, so there is no answer"
            )
    else:
        raise ctx.error(
            "answer", "missing required field (no 'answer' and no final gpt turn to take it from)"
        )

    options = options_list(record.get("options"), ctx)
    if "problem_type" in record:
        problem_type = normalize_problem_type(record["problem_type"], ctx)
    else:
        problem_type = ctx.read.problem_type or infer_problem_type(answer, options)

    metadata = {k: v for k, v in record.items() if k not in _USED_KEYS}
    metadata["source"] = ctx.source
    record_id = record.get("id")
    return Sample(
        id=ctx.default_id if record_id is None else str(record_id),
        images=images,
        messages=turns,
        answer=answer,
        problem_type=problem_type,
        response=response,
        metadata=metadata,
    )
