"""Prompt templates: same wording everywhere, input untouched, unknown names listed."""

from __future__ import annotations

import pytest

from vlrl.data import R1_SYSTEM_PROMPT, TEMPLATES, apply_template

MESSAGES = [
    {"role": "user", "content": "<image>How many?"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "And now?"},
]


def test_none_is_identity_copy() -> None:
    out = apply_template(MESSAGES, "none")
    assert out == MESSAGES and out is not MESSAGES


@pytest.mark.parametrize("name", ["answer", "thinking", "fast"])
def test_instruction_goes_on_last_user_turn(name: str) -> None:
    out = apply_template(MESSAGES, name)
    assert out[0] == MESSAGES[0] and out[1] == MESSAGES[1]
    assert out[2]["content"] == "And now?\n" + TEMPLATES[name]
    assert MESSAGES[2]["content"] == "And now?"  # input not modified
    assert "<answer></answer>" in TEMPLATES[name]


def test_wording() -> None:
    assert TEMPLATES["answer"] == "Answer with the final answer in <answer></answer> tags."
    assert "step by step" in TEMPLATES["thinking"] and "<think></think>" in TEMPLATES["thinking"]


def test_system_prompt_inserted_or_replaced() -> None:
    out = apply_template(MESSAGES, "thinking", system_prompt=R1_SYSTEM_PROMPT)
    assert out[0] == {"role": "system", "content": R1_SYSTEM_PROMPT} and len(out) == 4
    again = apply_template(out, "none", system_prompt="Be brief.")
    assert again[0]["content"] == "Be brief." and len(again) == 4


def test_unknown_template_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown template 'cot'; valid: none, answer, thinking, fast"):
        apply_template(MESSAGES, "cot")


def test_needs_a_user_turn() -> None:
    with pytest.raises(ValueError, match="needs a user turn"):
        apply_template([{"role": "system", "content": "x"}], "answer")
