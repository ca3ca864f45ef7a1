"""Small datasets shaped exactly as SophiaVL-R1, EasyR1 / Hugging Face and verl publish theirs, built in the test.

Each builder returns the rows it wrote as `Expected` records (id, answer, problem type, the colour of each image),
so that tests check what the readers give back against what was written. Every image is a flat colour, so a
loaded image tells which one it is.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SIZE = (56, 56)  # 4 vision tokens on the tiny Qwen2-VL: keeps SFT / GRPO / eval steps short


@dataclass
class Expected:
    id: str
    answer: str
    problem_type: str
    colours: list[tuple[int, int, int]]


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = SIZE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG whose header declares width x height pixels with a tiny data chunk: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def colour(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 40) % 256, (151 * i + 80) % 256)


def hf_image(c: tuple[int, int, int], name: str) -> dict[str, Any]:
    """A Hugging Face `Image` feature cell: the PNG bytes and the original file name."""
    return {"bytes": png_bytes(c), "path": name}


# --- EasyR1 / Hugging Face (geometry3k's layout: data/{split}-0000i-of-0000N.parquet) -----------------------------

_EASYR1_ANSWERS = [("3", "numerical"), ("2\\sqrt{3}", "math"), ("red", "free_form"), ("12.5", "numerical"),
                   ("\\frac{1}{2}", "math"), ("7", "numerical"), ("blue", "free_form")]


def easyr1_rows(start: int, n: int) -> tuple[list[dict[str, Any]], list[Expected]]:
    """Rows with 1, 2 or 0 images (in turn), `<image>` where each stands."""
    rows, expected = [], []
    for i in range(start, start + n):
        answer, ptype = _EASYR1_ANSWERS[i % len(_EASYR1_ANSWERS)]
        n_images = (1, 2, 0)[i % 3]
        colours = [colour(10 * i + k) for k in range(n_images)]
        problem = "".join("<image>" for _ in colours) + f"Problem {i}: find x."
        rows.append({"images": [hf_image(c, f"{i}-{k}.png") for k, c in enumerate(colours)],
                     "problem": problem, "answer": answer})
        expected.append(Expected("", answer, ptype, colours))
    return rows, expected


def write_easyr1(root: Path, train_shards: tuple[int, ...] = (4, 3), n_test: int = 3) -> dict[str, list[Expected]]:
    """root/data/train-0000i-of-0000N.parquet (images embedded) and root/data/test-00000-of-00001.parquet. The
    expected ids are the reader's defaults: "{shard stem}-{row}"."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Expected]] = {"train": [], "test": []}
    start = 0
    splits = [("train", n) for n in train_shards] + [("test", n_test)]
    counts = {"train": len(train_shards), "test": 1}
    index = {"train": 0, "test": 0}
    for split, n in splits:
        rows, expected = easyr1_rows(start, n)
        start += n
        name = f"{split}-{index[split]:05d}-of-{counts[split]:05d}"
        index[split] += 1
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, data / f"{name}.parquet", row_group_size=2)  # several row groups per shard
        for row, e in enumerate(expected, start=1):
            e.id = f"{name}-{row}"
        out[split] += expected
    return out


# --- verl (its multimodal examples; the InternVL3.5 RL code is a verl fork) ---------------------------------------

def verl_rows(start: int, n: int) -> tuple[list[dict[str, Any]], list[Expected]]:
    rows, expected = [], []
    abilities = [("math", "math"), ("multiple choice", "multiple_choice"), ("geometry", "numerical")]
    for i in range(start, start + n):
        ability, ptype = abilities[i % 3]
        answer = "B" if ptype == "multiple_choice" else str(i + 2)
        n_images = (1, 2)[i % 2]
        colours = [colour(7 * i + k + 3) for k in range(n_images)]
        user = "".join("<image>" for _ in colours) + f"Question {i}?"
        rows.append({
            "data_source": "hiyouga/geometry3k",
            "prompt": [{"role": "system", "content": "Think first."}, {"role": "user", "content": user}],
            "images": [hf_image(c, f"v{i}-{k}.png") for k, c in enumerate(colours)],
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": "train", "index": i, "answer": answer, "question": f"Question {i}?"},
        })
        expected.append(Expected("", answer, ptype, colours))
    return rows, expected


def write_verl(path: Path, start: int, n: int) -> list[Expected]:
    rows, expected = verl_rows(start, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    for row, e in enumerate(expected, start=1):
        e.id = f"{path.stem}-{row}"
    return expected


# --- SophiaVL-R1 (its verl/data/dataset_info.json and demo.json, verbatim in shape) -------------------------------

SOPHIAVL_INFO = {
    "demo": {"file_path": "demo.json", "image_base_path": "datasets",
             "columns": {"problem": "prompt", "solution": "answer", "path": "images"}},
    "demo_test": {"file_path": "demo_test.json", "image_base_path": "datasets",
                  "columns": {"problem": "prompt", "solution": "answer", "path": "images"}},
}
_SOPHIAVL_TYPES = [("text", "free_form", "Lee Harvey Oswald"), ("multiple choice", "multiple_choice", "B"),
                   ("numerical", "numerical", "42"), ("OCR", "ocr", "STOP"), ("free-form", "free_form", "a bridge")]


def sophiavl_rows(start: int, n: int, images: Path) -> tuple[list[dict[str, Any]], list[Expected]]:
    rows, expected = [], []
    for i in range(start, start + n):
        raw_type, ptype, answer = _SOPHIAVL_TYPES[i % len(_SOPHIAVL_TYPES)]
        text_only = i % 4 == 3
        c = colour(i + 100)
        rel = f"./Knowledge/viquae/images/img-{i}.jpg"
        if not text_only:
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", SIZE, c).save(images / rel, quality=100, subsampling=0)
        rows.append({
            "problem_id": 37216 + i,
            "problem": f"Question {i} about the picture?",
            "data_type": "text" if text_only else "image",
            "problem_type": raw_type,
            "options": ["A. Yes", "B. No", "C. Maybe"] if ptype == "multiple_choice" else [],
            "solution": f"<answer>{answer}</answer>",
            "path": "" if text_only else rel,
            "data_source": "viquae",
        })
        expected.append(Expected(str(37216 + i), answer, ptype, [] if text_only else [c]))
    return rows, expected


def write_sophiavl(root: Path, n_train: int = 8, n_test: int = 4) -> dict[str, list[Expected]]:
    """root/dataset_info.json (SophiaVL's keys), root/demo.json and root/demo_test.json (JSON lists), images under
    root/datasets/ (JPEG, as its datasets ship them)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_info.json").write_text(json.dumps(SOPHIAVL_INFO, indent=4))
    train, e_train = sophiavl_rows(0, n_train, root / "datasets")
    test, e_test = sophiavl_rows(n_train, n_test, root / "datasets")
    (root / "demo.json").write_text(json.dumps(train, indent=4))
    (root / "demo_test.json").write_text(json.dumps(test, indent=4))
    return {"train": e_train, "test": e_test}
