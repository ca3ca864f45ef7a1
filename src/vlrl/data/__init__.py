"""vlrl.data: records on disk -> validated `Sample`s; prompt templates; synthetic tasks.

Typical use: `ds = load_dataset("mathv", registry="data/registry.yaml")` (a registry name, or a path to a
jsonl / json / parquet file, a folder of parquet shards, a `save_to_disk` folder), then
`apply_template(ds[0].messages, ds.template or "answer")`. `write_dataset` writes Samples as VLM-R1 jsonl,
EasyR1 or verl parquet.
"""

from vlrl.data.columns import ColumnMap
from vlrl.data.errors import DataError
from vlrl.data.formats import FORMATS, Dataset, detect_format, iter_records, read_file
from vlrl.data.images import check_image, image_size, load_image
from vlrl.data.registry import RegistryEntry, load_dataset, load_registry
from vlrl.data.resize import smart_resize
from vlrl.data.sample import IMAGE_PLACEHOLDER, PROBLEM_TYPES, Sample
from vlrl.data.screen import RESERVED_TOKENS, TextLimits
from vlrl.data.stream import SampleStream
from vlrl.data.templates import R1_SYSTEM_PROMPT, TEMPLATES, apply_template
from vlrl.data.writers import write_dataset

__all__ = [
    "FORMATS",
    "IMAGE_PLACEHOLDER",
    "PROBLEM_TYPES",
    "R1_SYSTEM_PROMPT",
    "RESERVED_TOKENS",
    "TEMPLATES",
    "TextLimits",
    "ColumnMap",
    "DataError",
    "Dataset",
    "RegistryEntry",
    "Sample",
    "SampleStream",
    "apply_template",
    "check_image",
    "detect_format",
    "image_size",
    "iter_records",
    "load_dataset",
    "load_image",
    "load_registry",
    "read_file",
    "smart_resize",
    "write_dataset",
]
