"""Streamed SFT (`stream=true`): batches drawn from `SampleStream`, exact resume after SIGKILL from the stream state
in the checkpoint, the same update on 2 processes as on 1, and resident memory that does not grow with the data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from killrun import kill_when_exists
from PIL import Image
from safetensors.torch import load_file

from vlrl.data.order import shard
from vlrl.data.stream import SampleStream
from vlrl.train.checkpoint import load_state
from vlrl.train.logging import read_metrics
from vlrl.train.sft import SFTConfig, next_batch, open_stream, run_sft


def png(i: int, size: int = 28) -> bytes:
    """A small flat-colour PNG, a different colour for each i (so every row's image bytes differ)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path, n: int, shards: int, row_group_size: int = 1000, text: str = "") -> Path:
    """root/data/train-0000k-of-0000N.parquet in the Hugging Face / EasyR1 layout: `images` (one embedded HF Image
    struct per row), `problem` (with `<image>`, then `text`), `answer`. Ids are the reader's "{shard stem}-{row}"."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    for k in range(shards):
        rows = range(k * per, min(n, (k + 1) * per))
        table = pa.table({"images": [[{"bytes": png(i), "path": f"{i}.png"}] for i in rows],
                          "problem": [f"<image>How many sides does shape {i} have?{text}" for i in rows],
                          "answer": [str(i % 7 + 3) for i in rows]})
        pq.write_table(table, root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet", row_group_size=row_group_size)
    return root


def _cfg(data: Path, out: Path, **kw) -> SFTConfig:
    return SFTConfig(model="unused", data=[str(data)], out=str(out), stream=True, **kw)  # type: ignore[arg-type]


def ids(samples: list) -> list[str]:
    return [s.id for s in samples]


# --- batch drawing (no model) --------------------------------------------------------------------------------------


def test_streamed_batches_are_the_stream_and_each_epoch_a_permutation(tmp_path):
    """One shard of 24 rows, a buffer of 100: each epoch (3 batches of 8) is a permutation of the 24 rows, the
    batches are the stream's draws in order, every world size's rank shares put each batch back together, and a
    stream opened from a saved state continues with the same batches."""
    data = write_dataset(tmp_path / "ds", 24, 1, row_group_size=5)
    cfg = _cfg(data, tmp_path / "run", shuffle_buffer=100, batch_size=8, seed=3)
    stream = open_stream(cfg, None)
    batches, state_after_2 = [], None
    for step in range(6):
        batch, indices = next_batch(step, cfg, [], stream)
        assert len(batch) == 8 and indices == list(range(8))
        for world in (1, 2, 3):  # sft_backward trains shard(indices, rank, world) on each rank
            assert sum((shard(indices, r, world) for r in range(world)), []) == indices
        batches.append(ids(batch))
        if step == 1:
            state_after_2 = json.loads(json.dumps(stream.state_dict()))  # as the checkpoint holds it
    drawn = sum(batches, [])
    every = [f"train-00000-of-00001-{r}" for r in range(1, 25)]
    assert sorted(drawn[:24]) == sorted(every) and sorted(drawn[24:]) == sorted(every)
    assert drawn[:24] != every and drawn[:24] != drawn[24:]  # shuffled, differently in each epoch
    assert drawn == ids(SampleStream(str(data), seed=3, buffer_size=100).take(48))
    resumed = open_stream(cfg, {"position": 16, "stream": state_after_2})
    assert [ids(next_batch(s, cfg, [], resumed)[0]) for s in range(2, 6)] == batches[2:]


def test_stream_refuses_what_it_cannot_resume_or_hold(tmp_path):
    data = write_dataset(tmp_path / "ds", 10, 1)
    with pytest.raises(ValueError, match="written with stream=false"):
        open_stream(_cfg(data, tmp_path / "run"), {"position": 32})
    with pytest.raises(ValueError, match="cache_encoded=false"):
        run_sft(_cfg(data, tmp_path / "run", cache_encoded=True))


# --- training on the tiny model --------------------------------------------------------------------------------------


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlrl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _sft_args(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    # 60 rows in 3 shards through a buffer of 20: checkpoints fall mid-shard with rows of two shards buffered
    return ["sft", f"model={model}", f"data=[{data}]", f"out={out}", "stream=true", "shuffle_buffer=20",
            f"max_steps={steps}", "batch_size=8", "micro_batch_size=4", "save_every=2", "log_every=1",
            "warmup_steps=2", "threads=1", "keep_checkpoints=10"]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_exactly_and_two_ranks_match_one(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "ds", 60, 3, row_group_size=7)
    # the reference, the run to kill and the 2-rank run are independent: side by side, each mostly paying its imports
    ref = _cli(_sft_args(tiny_model_dir, data, tmp_path / "ref", 8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                            "-m", "vlrl.cli", *_sft_args(tiny_model_dir, data, tmp_path / "two", 4)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    args = _sft_args(tiny_model_dir, data, tmp_path / "run", 8)
    proc = _cli(args)
    kill_when_exists(proc, tmp_path / "run" / "checkpoints" / "step-4")
    ref_out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_out
    assert not (tmp_path / "run" / "checkpoints" / "step-8").exists()  # it really died mid-run
    state = load_state(tmp_path / "run" / "checkpoints" / "step-4")
    assert state["position"] == 32 and state["stream"]["drawn"] == 32 and len(state["stream"]["buffer"]) == 19
    again = _cli(args)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert "resumed from" in out
    a, b = _weights(tmp_path / "ref" / "checkpoints" / "step-8"), _weights(tmp_path / "run" / "checkpoints" / "step-8")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], w) for k, w in _weights(tiny_model_dir).items())  # it trained
    m_ref, m_run = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in m_run] == list(range(1, 9))  # no step logged twice after the resume
    assert [m["loss"] for m in m_run] == [m["loss"] for m in m_ref]  # the same batches

    # torchrun: both ranks read the stream, each trains its half of every batch: the same losses as 1 process
    two_out = two.communicate(timeout=600)[0]
    assert two.returncode == 0, two_out
    l2 = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert l2 == pytest.approx([m["loss"] for m in m_ref[:4]], rel=1e-4, abs=1e-5)


# --- resident memory -------------------------------------------------------------------------------------------------

# SFT's data path in a fresh process: the batches of one pass over the data (8 samples of every 100th batch
# encoded for the model, images decoded), streamed or read whole as SFT does. Prints the high-water RSS (MB) before
# the data is opened (interpreter, torch, transformers, processor, pyarrow: the same for any data size) and at the
# end. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (this pytest process, torch loaded)
# through fork + exec.
_DATA_PATH = r"""
import json, sys
import pyarrow.parquet
from vlrl.data.loading import load_samples
from vlrl.models.inputs import encode_for_sft
from vlrl.models.processor import load_processor
from vlrl.train.sft import SFTConfig, next_batch, open_stream

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

model, data, stream, n = sys.argv[1], sys.argv[2], sys.argv[3] == "true", int(sys.argv[4])
cfg = SFTConfig(model=model, data=[data], out="unused", stream=stream, shuffle_buffer=1000, batch_size=64)
processor = load_processor(model)
encode_for_sft(processor, [])
base = hwm_mb()
source = open_stream(cfg, None) if stream else None
samples = [] if stream else load_samples(cfg.data)
seen = set()
for step in range(-(-n // cfg.batch_size)):
    batch, indices = next_batch(step, cfg, samples, source)
    seen.update(batch[i].id for i in indices)
    if step % 100 == 0:
        assert encode_for_sft(processor, [batch[i] for i in indices[:8]])
print(json.dumps({"base": base, "peak": hwm_mb(), "distinct": len(seen)}))
"""


def _data_path_rss(model: Path, data: Path, streams: tuple[bool, ...], n: int) -> list[dict[str, float]]:
    """`_DATA_PATH` once per entry of `streams`, the processes side by side (each measures only itself)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _DATA_PATH, str(model), str(data), str(stream).lower(), str(n)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for stream in streams]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, out + err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.slow
def test_streamed_data_path_memory_does_not_grow_with_the_data(tiny_model_dir, tmp_path):
    """50,000 text rows with small embedded images (5 shards): reading them whole grows the process by the Samples
    of all of them; streaming them through a buffer of 1,000 grows it by far less, after a whole pass."""
    n = 50_000
    text = " Think step by step, write your reasoning, then give the number of sides alone in the answer tags." * 4
    data = write_dataset(tmp_path / "ds", n, 5, text=text)  # ~450 characters of text a row, as instruction data
    streamed, whole = _data_path_rss(tiny_model_dir, data, (True, False), n)
    grew_streamed, grew_whole = streamed["peak"] - streamed["base"], whole["peak"] - whole["base"]
    assert grew_whole > 100, whole  # the Samples of 50,000 rows (a few KB each)
    assert grew_streamed < 0.5 * grew_whole, (streamed, whole)
    assert streamed["distinct"] == whole["distinct"] == n  # one whole pass: every row once
