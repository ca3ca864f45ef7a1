"""A reward of your own for vlrl: a correct answer earns 1.0 when it is short, less when it rambles.

Use it from any config that takes rewards (rl, eval, curate), named by its file and function:

    rewards:
      - {name: accuracy, weight: 1.0}
      - {name: examples/rewards/concise_correct.py:concise_correct, weight: 0.5, kwargs: {target_length: 16}}

or offline, on a jsonl of completions: ``vlrl score --data in.jsonl --out out.jsonl
--reward examples/rewards/concise_correct.py:concise_correct``. A relative path is resolved against the current
directory (run from the repository root here). The metric key is the function's name (``reward/concise_correct``
in metrics.jsonl); give the spec a ``label`` to choose another, which two functions of the same name need.

The reward protocol, which any function named this way must follow:

- called as ``fn(completions, samples, **kwargs)``: ``completions[i]`` (str) is the model's answer to
  ``samples[i]`` (`vlrl.data.sample.Sample`: ``answer``, ``problem_type``, ``metadata``, ``images``, ``messages``);
  the lists may be a chunk of the step's batch, so a value must depend on its own item only;
- the spec's ``kwargs`` arrive as keyword arguments (config-time checked against this signature); the trainer
  also passes ``completion_lengths`` (token counts, aligned with ``completions``) to a function that declares it;
- returns one value per completion: a finite number, or None for "could not score". A None is counted, left out
  of the reward's mean and adds 0 to the weighted total; a row that no reward can score gets no advantage.
- an exception, a result of the wrong length or a value that is not a number turns into None for the items
  concerned (the chunk is retried one completion at a time) and is counted as an error; with reward workers
  (``rollout.reward_workers: 2``) a call running past the time limit is killed and its items become None too.
  The run goes on either way.

This file runs with the trainer's rights, in the trainer and in each reward worker: keep its top-level code to
imports and definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlrl.rewards import score_answer


def concise_correct(
    completions: list[str],
    samples: list[Any],
    *,
    target_length: int = 32,
    min_value: float = 0.5,
    completion_lengths: Sequence[int] | None = None,
) -> list[float | None]:
    """1.0 for a correct answer of at most `target_length` tokens, falling linearly to `min_value` at twice that
    length and staying there; 0.0 for a wrong answer; None where vlrl's accuracy check cannot score the item.

    Length: the trainer's token counts when given, else whitespace-separated words (`vlrl score`, eval).
    Correct means vlrl's `accuracy` (the same check per problem type) gives at least 0.5.
    """
    if target_length < 1 or not 0.0 <= min_value <= 1.0:
        raise ValueError(f"need target_length >= 1 and 0 <= min_value <= 1, got {target_length}, {min_value}")
    out: list[float | None] = []
    for i, (completion, sample) in enumerate(zip(completions, samples, strict=True)):
        correct = score_answer(completion, sample.answer, sample.problem_type, metadata=sample.metadata)
        if correct is None:
            out.append(None)
            continue
        if correct < 0.5:
            out.append(0.0)
            continue
        length = completion_lengths[i] if completion_lengths is not None else len(completion.split())
        over = min(1.0, max(0, length - target_length) / target_length)  # 0 at target, 1 at twice the target
        out.append(1.0 - (1.0 - min_value) * over)
    return out
