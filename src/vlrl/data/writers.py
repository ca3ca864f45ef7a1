"""Write `Sample`s in the shape another framework reads: VLM-R1 jsonl, EasyR1 / HF parquet, verl parquet.

  vlmr1   jsonl: `{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value"}], "answer",
          "problem_type", ...metadata}` (a final gpt turn only when the sample has a demonstration)
  easyr1  parquet: `images`, `problem` (the user text, `<image>` where each image stands), `answer`,
          `problem_type`, and `vlrl` (JSON: id, demonstration, metadata; messages when not one user turn)
  verl    parquet: `data_source` (the task), `prompt` (the chat messages), `images`, `ability` (the problem
          type), `reward_model: {"style": "rule", "ground_truth"}`, `extra_info: {"index", "vlrl"}`

Images (`images=`):
  embed   parquet only: the image file's bytes as they are (no re-encoding) in Hugging Face `Image` structs
          `{"bytes", "path": file name}`; the default for parquet
  files   every image written as a file into `OUT-images/` beside the output (embedded ones extracted, files
          copied), referred to relative to the output: plain paths (jsonl, easyr1) or `{"image": path}` (verl)
  paths   image files stay where they are (absolute paths); embedded ones are extracted as in `files`; the
          default for jsonl

Reading the output back with `vlrl.data` gives the same Samples (ids, messages, answers, problem types,
demonstrations, metadata; the images hold the same bytes), which `tests/data` checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from vlrl.data.embedded import parse_ref, read_ref
from vlrl.data.errors import DataError
from vlrl.data.frameworks import VLRL_KEY
from vlrl.data.sample import Sample

OUT_FORMATS = ("vlmr1", "easyr1", "verl")
IMAGE_MODES = ("embed", "files", "paths")
ROW_GROUP = 64  # rows per parquet row group: loading one embedded image reads its row group's column
_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


class _Images:
    """Turns a sample's image strings into what the output holds, writing extracted / copied files once."""

    def __init__(self, out: Path, mode: str) -> None:
        self.mode = mode
        self.base = out.parent
        self.folder = out.parent / f"{out.stem}-images"
        self.done: dict[str, str] = {}  # image string -> what was written for it

    def embedded(self, image: str) -> dict[str, Any]:
        """`{"bytes", "path"}` of an image file or an embedded image (the original bytes)."""
        ref = parse_ref(image)
        if ref is not None:
            data, name = read_ref(ref)
            return {"bytes": data, "path": name}
        try:
            return {"bytes": Path(image).read_bytes(), "path": os.path.basename(image)}
        except OSError as exc:
            raise DataError(image, None, None, f"cannot read the image file: {exc}") from exc

    def file(self, image: str, stem: str) -> str:
        """The path the output refers to: absolute (mode paths, image files) or relative to the output."""
        if self.mode == "paths" and parse_ref(image) is None:
            return image
        if image not in self.done:
            self.folder.mkdir(parents=True, exist_ok=True)
            cell = self.embedded(image)
            target = self.folder / f"{stem}{_suffix(cell)}"
            target.write_bytes(cell["bytes"])
            self.done[image] = os.path.relpath(target, self.base)
        return self.done[image]


def _suffix(cell: dict[str, Any]) -> str:
    """The file suffix of an image: the original name's, else the format its bytes are in."""
    suffix = Path(cell["path"] or "").suffix
    if suffix:
        return suffix.lower()
    from PIL import Image

    try:
        with Image.open(BytesIO(cell["bytes"])) as im:
            fmt = (im.format or "img").lower()
    except Exception:  # unreadable bytes are copied as they are; loading them later reports the error
        fmt = "img"
    return ".jpg" if fmt == "jpeg" else f".{fmt}"


def _saved(sample: Sample, with_messages: bool) -> str:
    """The `vlrl` JSON that lets a reader give back this exact Sample."""
    data: dict[str, Any] = {
        "id": sample.id,
        "problem_type": sample.problem_type,
        "response": sample.response,
        "metadata": {k: v for k, v in sample.metadata.items() if k != "source"},
    }
    if with_messages:
        data["messages"] = sample.messages
    return json.dumps(data, ensure_ascii=False, default=str)


def _one_user_turn(sample: Sample) -> bool:
    return len(sample.messages) == 1 and sample.messages[0]["role"] == "user"


def vlmr1_record(sample: Sample, images: list[str]) -> dict[str, Any]:
    conv = [{"from": _ROLES[m["role"]], "value": m["content"]} for m in sample.messages]
    if sample.response is not None:
        conv.append({"from": "gpt", "value": sample.response})
    record: dict[str, Any] = {"id": sample.id}
    if images:
        record["image"] = images[0] if len(images) == 1 else images
    record.update(conversations=conv, answer=sample.answer, problem_type=sample.problem_type)
    record.update({k: v for k, v in sample.metadata.items() if k not in record and k not in ("source", "image", "images")})
    return record


def easyr1_row(sample: Sample, images: list[Any]) -> dict[str, Any]:
    user = "\n".join(m["content"] for m in sample.messages if m["role"] == "user")
    return {"images": images, "problem": user, "answer": sample.answer, "problem_type": sample.problem_type,
            VLRL_KEY: _saved(sample, not _one_user_turn(sample))}


def verl_row(sample: Sample, images: list[Any], index: int) -> dict[str, Any]:
    return {
        "data_source": sample.task,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in sample.messages],
        "images": images,
        "ability": sample.problem_type,
        "reward_model": {"style": "rule", "ground_truth": sample.answer},
        "extra_info": {"index": index, VLRL_KEY: _saved(sample, False)},
    }


def _schema(fmt: str, mode: str) -> Any:
    import pyarrow as pa

    if mode == "embed":
        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    else:
        image = pa.struct([("image", pa.string())]) if fmt == "verl" else pa.string()
    if fmt == "easyr1":
        return pa.schema([("images", pa.list_(image)), ("problem", pa.string()), ("answer", pa.string()),
                          ("problem_type", pa.string()), (VLRL_KEY, pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([
        ("data_source", pa.string()), ("prompt", pa.list_(message)), ("images", pa.list_(image)),
        ("ability", pa.string()), ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), (VLRL_KEY, pa.string())])),
    ])  # fmt: skip


def _row_images(sample: Sample, index: int, fmt: str, store: _Images) -> list[Any]:
    out: list[Any] = []
    for i, image in enumerate(sample.images):
        if store.mode == "embed":
            out.append(store.embedded(image))
        else:
            path = store.file(image, f"{index:06d}-{i}")
            out.append({"image": path} if fmt == "verl" else path)
    return out


def _rows(samples: Sequence[Sample], fmt: str, store: _Images) -> Iterator[dict[str, Any]]:
    for index, sample in enumerate(samples):
        images = _row_images(sample, index, fmt, store)
        yield easyr1_row(sample, images) if fmt == "easyr1" else verl_row(sample, images, index)


def _write_parquet(samples: Sequence[Sample], out: Path, fmt: str, store: _Images) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(fmt, store.mode)
    tmp = out.with_name(out.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in _rows(samples, fmt, store):
            batch.append(row)
            if len(batch) == ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch or not samples:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    tmp.replace(out)  # a reader never meets a half-written file


def format_for(out: Path, fmt: str | None) -> str:
    """The output format: `fmt`, else by suffix (`.jsonl` -> vlmr1, `.parquet` -> easyr1)."""
    if fmt is not None:
        if fmt == "hf":
            return "easyr1"
        if fmt not in OUT_FORMATS:
            raise DataError(out, None, "format", f"unknown output format {fmt!r}; valid: {', '.join(OUT_FORMATS)}")
        return fmt
    by_suffix = {".jsonl": "vlmr1", ".parquet": "easyr1"}
    if out.suffix not in by_suffix:
        raise DataError(out, None, "format", "write .jsonl or .parquet, or name the format (vlmr1, easyr1, verl)")
    return by_suffix[out.suffix]


def write_dataset(samples: Sequence[Sample], out: str | Path, *, format: str | None = None,
                  images: str | None = None) -> Path:
    """Write `samples` to `out` as `format` (OUT_FORMATS; default by suffix) with images `embed`ded, as `files`
    or as `paths` (IMAGE_MODES; default embed for parquet, paths for jsonl). Returns `out`."""
    out = Path(out)
    fmt = format_for(out, format)
    mode = images or ("paths" if fmt == "vlmr1" else "embed")
    if mode not in IMAGE_MODES:
        raise DataError(out, None, "images", f"unknown image mode {mode!r}; valid: {', '.join(IMAGE_MODES)}")
    if fmt == "vlmr1" and mode == "embed":
        raise DataError(out, None, "images", "jsonl cannot hold image bytes: use files or paths")
    out.parent.mkdir(parents=True, exist_ok=True)
    store = _Images(out, mode)
    if fmt != "vlmr1":
        _write_parquet(samples, out, fmt, store)
        return out
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for index, sample in enumerate(samples):
            paths = [store.file(image, f"{index:06d}-{i}") for i, image in enumerate(sample.images)]
            f.write(json.dumps(vlmr1_record(sample, paths), ensure_ascii=False, default=str) + "\n")
    tmp.replace(out)
    return out
