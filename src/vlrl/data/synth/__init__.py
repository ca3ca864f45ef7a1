"""Synthetic visual tasks written as VLM-R1 jsonl + PNG, deterministic and split-disjoint.

    write_split("counting", 4000, seed=0, out_dir="data/synth")              # data/synth/counting/train.jsonl
    write_split("counting", 1000, seed=0, out_dir="data/synth", split="test")

Determinism: item i of a split comes from its own `random.Random` seeded with the string
"vlrl.synth/{task}/{seed}/{split}/{i}/{attempt}" (string seeds hash with SHA-512, independent of
PYTHONHASHSEED), and PNGs are written by PIL with fixed settings: same arguments -> byte-identical files.

Disjoint splits: an item's identity is the SHA-256 of its image pixels (the scene; the question is not part
of it, so one picture never serves two splits). The hash space is partitioned: a split keeps an item only
when `int(hash[:8], 16) % 10` is one of its residues (train 0-7, val 8, test 9), otherwise it draws again
(attempt + 1). So train, val and test never share an image, whatever their seeds and sizes, with no need to
read the other split. Labels stay balanced: they come from the item's slot, not from the redraw.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

from PIL import Image

from vlrl.data.synth.base import Item, Task
from vlrl.data.synth.chart import Chart, ChartGrey, ChartMin, ChartValue
from vlrl.data.synth.compare import Compare
from vlrl.data.synth.counting import Counting
from vlrl.data.synth.grounding import Grounding

TASKS: dict[str, Task] = {t.name: t for t in (Counting(), Chart(), ChartMin(), ChartGrey(), ChartValue(), Compare(), Grounding())}
SPLITS: dict[str, tuple[int, ...]] = {"train": tuple(range(8)), "val": (8,), "test": (9,)}
HASH_BUCKETS = 10
MAX_ATTEMPTS = 1000

__all__ = [
    "SPLITS",
    "TASKS",
    "Task",
    "generate_item",
    "get_task",
    "scene_hash",
    "split_of_hash",
    "synth_main",
    "write_split",
]


def get_task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")
    return TASKS[task]


def scene_hash(image: Image.Image) -> str:
    """The item's identity: SHA-256 (hex) of mode, size and pixels."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def split_of_hash(digest: str) -> str:
    """The split whose residues hold this hash."""
    residue = int(digest[:8], 16) % HASH_BUCKETS
    return next(name for name, residues in SPLITS.items() if residue in residues)


def generate_item(
    task: str | Task, seed: int, split: str, index: int, slot: int, **params: Any
) -> tuple[Item, str]:
    """Item `index` of `split` (label from `slot`) and its scene hash, redrawn until the hash is in split."""
    t = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    for attempt in range(MAX_ATTEMPTS):
        rng = random.Random(f"vlrl.synth/{t.name}/{seed}/{split}/{index}/{attempt}")
        item = t.generate(rng, slot, **params)
        digest = scene_hash(item[0])
        if split_of_hash(digest) == split:
            return item, digest
    raise RuntimeError(
        f"task {t.name!r}: no {split} item after {MAX_ATTEMPTS} draws (scene space too small?)"
    )


def _slots(name: str, n: int, seed: int, split: str) -> list[int]:
    """Balancing slots 0..n-1 in a seeded order, so labels are balanced but not in a visible cycle."""
    slots = list(range(n))
    random.Random(f"vlrl.synth.slots/{name}/{seed}/{split}").shuffle(slots)
    return slots


def write_split(
    task: str | Task, n: int, seed: int, out_dir: str | Path, split: str = "train", **params: Any
) -> Path:
    """Write `out_dir/{task}/{split}.jsonl` and `out_dir/{task}/images/{split}-{i}.png` (i < n); return the
    jsonl path. Each line is a VLM-R1 record: id, image, conversations (human "<image>QUESTION", gpt
    "<answer>ANSWER</answer>"), answer, problem_type, task, scene_hash, plus the task's extra fields."""
    t = get_task(task)
    t.params(params)  # fail on bad parameters before writing anything
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    folder = Path(out_dir) / t.name
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, slot in enumerate(_slots(t.name, n, seed, split)):
        (image, question, answer, extra), digest = generate_item(t, seed, split, i, slot, **params)
        rel = f"images/{split}-{i}.png"
        image.save(folder / rel, format="PNG", compress_level=1)
        record = {
            "id": f"{t.name}-{split}-{i}",
            "image": rel,
            "conversations": [
                {"from": "human", "value": f"<image>{question}"},
                {"from": "gpt", "value": f"<answer>{answer}</answer>"},
            ],
            "answer": answer,
            "problem_type": t.problem_type,
            "task": t.name,
            "scene_hash": digest[:16],
            **extra,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    out = folder / f"{split}.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


def synth_main(task: str, n: int, seed: int, out: str, split: str = "train", **params: Any) -> Path:
    """`vlrl data synth --task NAME --n N --seed S --out DIR [--split S]`: write the split, print its path."""
    path = write_split(task, n, seed, out, split, **params)
    print(path)
    return path
