"""From dataset specs to templated `Sample`s: what SFT, RL, curation and eval all load through."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vlrl.data.registry import load_dataset
from vlrl.data.sample import Sample
from vlrl.data.templates import apply_template


def templated(sample: Sample, template: str, system_prompt: str | None = None) -> Sample:
    """`sample` with its messages put in the prompt `template` (and `system_prompt`); unchanged for "none"."""
    if template == "none" and system_prompt is None:
        return sample
    messages = apply_template(sample.messages, template, system_prompt=system_prompt)
    return dataclasses.replace(sample, messages=messages)


def load_samples(
    specs: Sequence[str],
    *,
    registry: str | None = None,
    template: str = "none",
    skip_invalid: bool = False,
    limit: int | None = None,
    system_prompt: str | None = None,
) -> list[Sample]:
    """Read every dataset in `specs` (registry names or paths) and apply the prompt template: the one the
    registry names for that dataset, else `template`."""
    samples: list[Sample] = []
    for spec in specs:
        ds = load_dataset(spec, registry=registry, skip_invalid=skip_invalid, limit=limit)
        if ds.n_skipped:
            print(f"{spec}: skipped {ds.n_skipped} invalid record(s)")
        samples += [templated(s, ds.template or template, system_prompt) for s in ds.samples]
    if not samples:
        raise ValueError(f"no samples in {', '.join(specs)}")
    return samples
