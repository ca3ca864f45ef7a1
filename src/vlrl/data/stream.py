"""Reading a dataset too large for memory: Samples streamed from its shards through a shuffle buffer.

`SampleStream(spec, seed=..., buffer_size=K)` yields the Samples of every shard (of one dataset, or of several:
`spec` may be a list, their shards then shuffled together), epoch after epoch (or `epochs` passes): each epoch
visits the shards in an order drawn from (seed, epoch), reads each shard's rows in order, and passes them through
a buffer of K Samples from which the next one is drawn at a position given by (seed, number drawn so far). The
buffer drains at the end of an epoch before the next epoch's rows enter it, so every valid row is drawn exactly
once per epoch (as from memory; a buffer as large as the data gives each epoch a full shuffle). Only the buffer
and the reader's current batch of rows are in memory (images stay in their files, `vlrl.data.embedded`), so
memory does not grow with the dataset.

Exact resume: `state_dict()` is small (the epoch, the shard and row reached, the buffer's samples as
(file, row) locators, the number drawn) and JSON-serialisable; `SampleStream(..., state=that)` re-reads the K
buffered rows by their locators (one pass over each file that holds some) and continues with the very Samples
an uninterrupted stream would have given. Any world size can share one stream: every rank draws the same global
batches and keeps its part (`vlrl.data.order.shard`; SFT's `stream=true`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrl.data.common import ReadContext
from vlrl.data.errors import DataError
from vlrl.data.formats import Converter, Record, _container, _converter, _pick_format, iter_records
from vlrl.data.images import DEFAULT_MAX_IMAGE_PIXELS
from vlrl.data.loading import templated
from vlrl.data.registry import resolve_dataset
from vlrl.data.sample import Sample
from vlrl.data.screen import TextLimits
from vlrl.data.sources import resolve_source

_MASK = (1 << 64) - 1


def mix(seed: int, n: int) -> int:
    """A 64-bit hash of (seed, n) (splitmix64): the buffer position of draw n, with no generator state to save."""
    z = (seed * 0x9E3779B97F4A7C15 + n * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@dataclass(frozen=True)
class _Part:
    """One dataset of a stream: how its records are read, converted and templated."""

    kwargs: dict[str, Any]
    template: str
    convert: Converter


class SampleStream:
    """An iterator of templated Samples over the shards of `spec` (a registry name or a path, as `load_dataset`,
    or a list of them: `load_samples`'s datasets, every shard of every one in one stream).

    seed: shard order and buffer draws. buffer_size: K (1 = the files' own order, no shuffling; with one epoch,
    what curation wants). epochs: passes over the data, None = endless. template / system_prompt: as
    `load_samples` (a registry entry's own template wins). skip_invalid: invalid rows are counted in `n_skipped`
    instead of raising. state: a `state_dict()` to resume from."""

    def __init__(self, spec: str | Sequence[str], *, registry: str | None = None, seed: int = 0,
                 buffer_size: int = 1024, epochs: int | None = None, template: str = "none",
                 system_prompt: str | None = None, skip_invalid: bool = False, check_images: bool = True,
                 state: dict[str, Any] | None = None) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.files: list[Path] = []
        self._parts: list[_Part] = []
        self._part_of: list[int] = []  # file index -> its dataset in `_parts`
        self._check_images = check_images
        for one in [spec] if isinstance(spec, str) else spec:
            path, kwargs, entry = resolve_dataset(one, registry=registry)
            files = resolve_source(path, kwargs.pop("split", None)).files
            convert = self._first_converter(files, kwargs)
            self._part_of += [len(self._parts)] * len(files)
            self._parts.append(_Part(kwargs, (entry.template if entry is not None else None) or template, convert))
            self.files += files
        self.system_prompt = system_prompt
        self.seed, self.buffer_size, self.epochs, self.skip_invalid = seed, buffer_size, epochs, skip_invalid
        self.n_skipped = 0
        self._contexts = [self._context(f, self._parts[p].kwargs) for f, p in zip(self.files, self._part_of)]
        self.epoch, self.shard, self.row, self.drawn = 0, 0, 0, 0
        self.buffer: list[tuple[tuple[int, int], Sample]] = []
        self._records: Iterator[Record] | None = None  # the rows of shard `shard` after `row`, of file `_file`
        self._file = -1
        self._barren = 0  # epoch ends passed since the last valid row: 2 = a whole epoch had none
        if state is not None:
            self._restore(state)

    def _context(self, file: Path, kwargs: dict[str, Any]) -> ReadContext:
        image_root = kwargs.get("image_root")
        root = Path(os.path.abspath(image_root if image_root is not None else file.parent))
        return ReadContext(file, root, self._check_images, DEFAULT_MAX_IMAGE_PIXELS, kwargs.get("problem_type"),
                           container=_container(file),
                           limits=kwargs.get("limits") or TextLimits(),
                           allow_outside_root=bool(kwargs.get("allow_outside_image_root")))

    @staticmethod
    def _first_converter(files: list[Path], kwargs: dict[str, Any]) -> Converter:
        """The format of a dataset's first record of its first file (file order: the same whatever the seed)."""
        for file in files:
            for line, record in iter_records(file):
                if isinstance(record, dict):
                    cmap = kwargs.get("columns")
                    fmt = _pick_format(file, line, record, kwargs.get("format"), cmap, _container(file))
                    return _converter(fmt, cmap, kwargs.get("rename"))
        raise DataError(files[0] if files else None, None, None, "no records to stream")

    def order(self, epoch: int) -> list[int]:
        """The shard order of `epoch` (file indices)."""
        order = list(range(len(self.files)))
        random.Random(mix(self.seed, -1 - epoch)).shuffle(order)
        return order

    def _sample(self, file_index: int, line: int, record: Any) -> Sample | None:
        try:
            if isinstance(record, DataError):
                raise record
            part = self._parts[self._part_of[file_index]]
            sample = part.convert(record, self._contexts[file_index].at(line))
        except DataError:
            if not self.skip_invalid:
                raise
            self.n_skipped += 1
            return None
        return templated(sample, part.template, self.system_prompt)

    def _pull(self) -> bool:
        """Move the next valid row of the data into the buffer; False when the buffer must drain first (the epoch's
        rows are all read), when `epochs` passes are done, or when a whole epoch had no valid row (an endless
        stream of skipped rows would never yield)."""
        while (self.epochs is None or self.epoch < self.epochs) and self._barren < 2:
            if self.shard == len(self.files):
                if self.buffer:  # epochs do not mix: every row is drawn once per epoch, as from memory
                    return False
                self.epoch, self.shard, self._barren = self.epoch + 1, 0, self._barren + 1
                continue
            if self._records is None:  # a shard starts (or the stream resumes inside one)
                self._file = self.order(self.epoch)[self.shard]
                self._records = iter_records(self.files[self._file], self.row + 1)
            for line, record in self._records:
                self.row = line
                sample = self._sample(self._file, line, record)
                if sample is not None:
                    self.buffer.append(((self._file, line), sample))
                    self._barren = 0
                    return True
            self._records, self.row, self.shard = None, 0, self.shard + 1
        return False

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        while len(self.buffer) < self.buffer_size and self._pull():
            pass
        if not self.buffer:
            raise StopIteration
        j = mix(self.seed, self.drawn) % len(self.buffer)
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        self.drawn += 1
        return self.buffer.pop()[1]

    def take(self, n: int) -> list[Sample]:
        """The next `n` Samples (fewer only when a finite stream ends)."""
        out = []
        for sample in self:
            out.append(sample)
            if len(out) == n:
                break
        return out

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, JSON-serialisable: resume with `SampleStream(..., state=this)`."""
        return {"epoch": self.epoch, "shard": self.shard, "row": self.row, "drawn": self.drawn,
                "buffer": [list(loc) for loc, _ in self.buffer], "files": [str(f) for f in self.files],
                "seed": self.seed, "buffer_size": self.buffer_size}

    def _restore(self, state: dict[str, Any]) -> None:
        mine = {"files": [str(f) for f in self.files], "seed": self.seed, "buffer_size": self.buffer_size}
        if any(state.get(k) != v for k, v in mine.items()):
            raise DataError(None, None, "state", "the saved stream position belongs to other data files, seed or "
                            "buffer_size")
        self.epoch, self.shard, self.row, self.drawn = (int(state[k]) for k in ("epoch", "shard", "row", "drawn"))
        locators = [(int(f), int(line)) for f, line in state["buffer"]]
        found: dict[tuple[int, int], Sample] = {}
        # one pass per file over the rows the buffer holds (not one seek per row: K can be 10,000s)
        for file_index in sorted({f for f, _ in locators}):
            wanted = {line for f, line in locators if f == file_index}
            for line, record in iter_records(self.files[file_index], min(wanted)):
                if line in wanted:
                    sample = self._sample(file_index, line, record)
                    if sample is None:
                        raise DataError(self.files[file_index], line, None,
                                        "the saved stream position names an invalid row")
                    found[(file_index, line)] = sample
                    wanted.discard(line)
                    if not wanted:
                        break
            if wanted:
                raise DataError(self.files[file_index], min(wanted), None, "row of the saved stream position not found")
        self.buffer = [(loc, found[loc]) for loc in locators]
