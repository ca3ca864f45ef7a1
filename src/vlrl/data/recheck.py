"""Images checked again when a run is about to use them: a file that was a good image when the data was read can
be truncated, overwritten or removed before a later step loads it (a shared disk, a dataset being rewritten).

`recheck_images(batch, pool, skip_invalid)` opens each image of the batch's samples (header + verify, as the
readers' check; no pixels decoded). A sample whose image fails stops the run with a `DataError` naming the image
and the record it came from (`file:line`), or, under `skip_invalid`, is replaced by the next sample of `pool` (in
data order, wrapping) whose images pass, and counted. The batch keeps its size, so every rank still takes its step.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlrl.data.errors import DataError
from vlrl.data.images import check_image
from vlrl.data.sample import Sample


def image_problem(sample: Sample) -> DataError | None:
    """Why one of the sample's images cannot be loaded now (the error names the image and the record), or None."""
    for path in sample.images:
        try:
            check_image(path)
        except DataError as exc:
            source = sample.metadata.get("source") or sample.id
            return DataError(exc.path, exc.line, exc.field, f"{exc.message} (image of record {source})")
    return None


def recheck_images(batch: Sequence[Sample], pool: Sequence[Sample], skip_invalid: bool) -> tuple[list[Sample], int]:
    """(the batch, with each sample whose images no longer load replaced when `skip_invalid`, the number replaced).
    Without `skip_invalid` the first such sample's `DataError` is raised."""
    out, n_bad = [], 0
    position = {id(s): i for i, s in enumerate(pool)}
    for sample in batch:
        problem = image_problem(sample)
        if problem is None:
            out.append(sample)
            continue
        if not skip_invalid:
            raise problem
        n_bad += 1
        out.append(_replacement(sample, pool, position.get(id(sample), -1)))
    return out, n_bad


def _replacement(bad: Sample, pool: Sequence[Sample], at: int) -> Sample:
    """The first sample after `at` in `pool` (wrapping) whose images load; a DataError when none does."""
    for step in range(1, len(pool) + 1):
        candidate = pool[(at + step) % len(pool)]
        if image_problem(candidate) is None:
            return candidate
    raise DataError(None, None, "image", f"no sample left whose images load (the last tried: {bad.id})")
