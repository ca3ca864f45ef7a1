"""Streamed SFT (`stream=true`) over a large text-and-small-image parquet dataset: peak resident memory and rows/s.

    .venv/bin/python benchmarks/stream_memory.py --rows 1000000 --shards 20

Runs, each measurement in a fresh child process (peak RSS = `VmHWM` of /proc/self/status, the whole process:
interpreter, torch, transformers, pyarrow, data; `ru_maxrss` is not used because Linux carries it over from the
parent through fork + exec):

1. `write`: ROWS rows in SHARDS parquet shards in a temporary folder (Hugging Face `data/train-0000k-of-0000N`
   layout, row groups of 1,000), EasyR1 / HF schema: `images` = one embedded HF `Image` struct per row (a distinct
   28x28 PNG), `problem` = `<image>` + ~450 characters of text, `answer`.
2. `read`: SFT's streamed data path (`vlrl.train.sft.open_stream` + `next_batch`: batch B, shuffle buffer K) for
   one whole pass over the rows: rows/s and peak RSS. Every row is converted to a Sample (its embedded image's
   bytes checked, as SFT reads them); images are decoded only when encoded (step 3).
3. `encode`: the processor encoding of the first E streamed samples (image decoded and resized, chat template,
   tokens), the rest of SFT's per-sample data cost: samples/s.
4. `sft`: `run_sft(stream=true)` on the built-in tiny Qwen2-VL (3.85 M parameters) for S steps, checkpoint at the
   end: peak RSS, seconds per step, and the seconds `open_stream` takes to resume from that checkpoint (the K
   buffered rows re-read by their locators).
5. with `--whole`: SFT's in-memory data path for comparison (stream=false: `load_samples` reads every Sample, then
   the first 10 batches of `global_batch`): rows/s of the load and peak RSS. Not the whole pass: `global_batch`
   permutes all n indices at every step, negligible beside a model step but the whole cost of a read-only loop.

Prints one Markdown table row (the columns of benchmarks/README.md's "Streaming" table) and, with --json, writes
every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEXT = " Think step by step, write your reasoning, then give the number of sides alone in the answer tags." * 4


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_dataset(root: Path, rows: int, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (28, 28), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buf, format="PNG")
        return buf.getvalue()

    (root / "data").mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for k in range(shards):
        span = range(k * per, min(rows, (k + 1) * per))
        table = pa.table({"images": [[{"bytes": png(i), "path": f"{i}.png"}] for i in span],
                          "problem": [f"<image>How many sides does shape {i} have?{TEXT}" for i in span],
                          "answer": [str(i % 7 + 3) for i in span]})
        pq.write_table(table, root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet", row_group_size=1000)


def child_read(a: argparse.Namespace) -> dict[str, Any]:
    """One pass over the data through SFT's batch drawing, streamed (or whole with --stream false)."""
    import pyarrow.parquet  # noqa: F401  (loaded before the baseline: a fixed cost, not the data's)

    from vlrl.data.loading import load_samples
    from vlrl.train.sft import SFTConfig, next_batch, open_stream

    stream = a.stream == "true"
    cfg = SFTConfig(model="unused", data=[a.data], out="unused", stream=stream, shuffle_buffer=a.buffer,
                    batch_size=a.batch_size)
    base = hwm_mb()
    t0 = time.perf_counter()
    source = open_stream(cfg, None) if stream else None
    samples = [] if stream else load_samples(cfg.data)
    rows = len(samples)
    for step in range(-(-a.rows // cfg.batch_size)):
        if not stream and step == 10:
            break
        batch, indices = next_batch(step, cfg, samples, source)
        rows += len(indices) if stream else 0
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "base_mb": base, "peak_mb": hwm_mb()}


def child_encode(a: argparse.Namespace) -> dict[str, Any]:
    from vlrl.models.inputs import encode_for_sft
    from vlrl.models.processor import load_processor
    from vlrl.train.sft import SFTConfig, open_stream

    processor = load_processor(a.model)
    cfg = SFTConfig(model=a.model, data=[a.data], out="unused", stream=True, shuffle_buffer=a.buffer)
    samples = open_stream(cfg, None).take(a.encode)
    t0 = time.perf_counter()
    for k in range(0, len(samples), 64):
        encode_for_sft(processor, samples[k : k + 64])
    seconds = time.perf_counter() - t0
    return {"samples": len(samples), "seconds": seconds, "samples_per_s": len(samples) / seconds}


def child_sft(a: argparse.Namespace) -> dict[str, Any]:
    from vlrl.train.checkpoint import latest_checkpoint, load_state
    from vlrl.train.logging import read_metrics
    from vlrl.train.sft import SFTConfig, open_stream, run_sft

    cfg = SFTConfig(model=a.model, data=[a.data], out=a.out, stream=True, shuffle_buffer=a.buffer,
                    batch_size=a.batch_size, micro_batch_size=8, max_steps=a.steps, warmup_steps=1,
                    save_every=a.steps, log_every=1, threads=a.threads)
    t0 = time.perf_counter()
    run_sft(cfg)
    seconds = time.perf_counter() - t0
    peak = hwm_mb()
    steps = [m["step_s"] for m in read_metrics(Path(a.out) / "metrics.jsonl")]
    last = latest_checkpoint(Path(a.out))
    assert last is not None
    state = load_state(last)
    t = time.perf_counter()
    open_stream(cfg, state)
    return {"seconds": seconds, "peak_mb": peak, "step_s": sorted(steps)[len(steps) // 2],
            "resume_s": time.perf_counter() - t, "buffered": len(state["stream"]["buffer"])}


def run_child(kind: str, a: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", kind, "--rows", str(a.rows), "--buffer", str(a.buffer),
            "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    run = subprocess.run(args, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--buffer", type=int, default=10_000, help="shuffle_buffer")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--encode", type=int, default=2048, help="samples encoded to time the processor")
    p.add_argument("--steps", type=int, default=4, help="SFT steps on the tiny model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--whole", action="store_true", help="also read the data whole (stream=false) for comparison")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--stream", default="true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = {"read": child_read, "encode": child_encode, "sft": child_sft}[a.child](a)
        print(json.dumps(result))
        return

    from vlrl.models.build import init_model

    with tempfile.TemporaryDirectory(prefix="vlrl-stream-") as tmp:
        root, t = Path(tmp), time.perf_counter()
        write_dataset(root / "ds", a.rows, a.shards)
        size = sum(f.stat().st_size for f in (root / "ds" / "data").iterdir()) / 2**20
        figures: dict[str, Any] = {"rows": a.rows, "shards": a.shards, "buffer": a.buffer,
                                   "batch_size": a.batch_size, "data_mb": size, "write_s": time.perf_counter() - t}
        print(f"wrote {a.rows} rows, {size:.0f} MB, in {figures['write_s']:.0f} s", file=sys.stderr)
        model = init_model("qwen2-vl", "tiny", root / "tiny", seed=0)
        data = str(root / "ds")
        figures["read"] = run_child("read", a, data=data)
        print(f"read: {figures['read']}", file=sys.stderr)
        figures["encode"] = run_child("encode", a, data=data, model=model, encode=a.encode)
        print(f"encode: {figures['encode']}", file=sys.stderr)
        figures["sft"] = run_child("sft", a, data=data, model=model, out=root / "run", steps=a.steps)
        print(f"sft: {figures['sft']}", file=sys.stderr)
        if a.whole:
            figures["whole"] = run_child("read", a, data=data, stream="false")
            print(f"whole: {figures['whole']}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2))
    r, e, s = figures["read"], figures["encode"], figures["sft"]
    whole = f"{figures['whole']['peak_mb']:.0f}" if "whole" in figures else "-"
    print(f"| {a.rows:,} | {a.shards} | {size:.0f} | {a.buffer:,} | {r['peak_mb']:.0f} | {r['rows_per_s']:,.0f} | "
          f"{e['samples_per_s']:,.0f} | {s['peak_mb']:.0f} | {s['step_s']:.2f} | {s['resume_s']:.1f} | {whole} |")


if __name__ == "__main__":
    main()
