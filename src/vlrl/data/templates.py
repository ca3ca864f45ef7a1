"""Prompt templates: the same instruction wording in SFT, RL and eval.

    apply_template(messages, "thinking", system_prompt=R1_SYSTEM_PROMPT)

Every template except "none" appends its instruction to the last user turn (after the question and its
choices), on a new line. The wording of "thinking" is LLaVA-OneVision-1.5-RL's thinking-mode prompt (its
README, MathVision eval); "answer" and "fast" ask for the bare answer in the same <answer></answer> tags,
so one answer extractor serves all templates.
"""

from __future__ import annotations

import copy

TEMPLATES: dict[str, str] = {
    "none": "",
    "answer": "Answer with the final answer in <answer></answer> tags.",
    # LLaVA-OneVision-1.5-RL, thinking mode (README: "Modify the utils.py in the mathvision task ...").
    "thinking": (
        "Think and solve the following question step by step. Please put your thinking and analysis "
        "procedure within <think></think>. Put ONLY your final answer within <answer></answer>."
    ),
    "fast": "Answer directly without explanation. Put ONLY your final answer within <answer></answer>.",
}

# DeepSeek-R1's system prompt as VLM-R1 / open-r1 use it; pass it as `system_prompt=` if a recipe wants it.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>"
)


def template_instruction(name: str) -> str:
    """The instruction text of template `name` ("" for "none"); unknown names list the valid ones."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def apply_template(
    messages: list[dict[str, str]], name: str = "none", *, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """A new message list (the input is not modified) with template `name` applied.

    The instruction is appended to the last user turn, separated by a newline. `system_prompt`, when given,
    replaces the system turn (or is inserted first when there is none)."""
    instruction = template_instruction(name)
    out = copy.deepcopy(messages)
    if instruction:
        users = [i for i, m in enumerate(out) if m.get("role") == "user"]
        if not users:
            raise ValueError(f"template {name!r} needs a user turn; messages have none")
        last = out[users[-1]]
        content = last.get("content", "")
        last["content"] = f"{content}\n{instruction}" if content else instruction
    if system_prompt is not None:
        if out and out[0].get("role") == "system":
            out[0]["content"] = system_prompt
        else:
            out.insert(0, {"role": "system", "content": system_prompt})
    return out
