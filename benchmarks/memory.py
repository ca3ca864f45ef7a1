"""Memory per rank of `parallel: none | ddp | fsdp` at 1, 2 and 4 ranks, with and without LoRA, in one run.

    .venv/bin/python benchmarks/memory.py --size small --out benchmarks/results/memory.json

For each setting a `torchrun` of this file (`--worker`) builds the built-in model of `--size`, wraps it as
`vlrl sft` does (`vlrl.train.parallel.wrap`; LoRA through `vlrl.models.lora`), takes two SFT steps on a batch of
synthetic chart items (one per rank and micro-batch) and reports, per rank: the bytes of the weights, gradients
and AdamW state it holds (local shards under fsdp), and its peak resident memory (`ru_maxrss`: the Python and torch
runtime included, so it falls less than the state does). Printed and written: per setting the mean over ranks, and
for fsdp the state bytes as a share of the replicated (ddp) state at the same world size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SETTINGS = [("none", 1, False), ("ddp", 1, False), ("ddp", 2, False), ("ddp", 4, False), ("fsdp", 1, False),
            ("fsdp", 2, False), ("fsdp", 4, False), ("none", 1, True), ("ddp", 2, True), ("ddp", 4, True)]


def _bytes(t: Any) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return int(local.numel() * local.element_size())


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from vlrl.data.loading import load_samples
    from vlrl.models.loading import load_model_and_processor
    from vlrl.models.lora import LoRAConfig, add_lora
    from vlrl.train.dist import init_distributed
    from vlrl.train.optim import make_optimizer, set_trainable
    from vlrl.train.parallel import clip_grads, wrap
    from vlrl.train.precision import precision_of
    from vlrl.train.sft import sft_backward

    torch.set_num_threads(1)
    info = init_distributed()
    model, processor = load_model_and_processor(a.model)
    if a.lora:
        model = add_lora(model, LoRAConfig(r=64, alpha=128), a.model).get_base_model()
    else:
        set_trainable(model, "full")
    root = wrap(model, a.mode, info, precision_of("float32"))
    params = [p for p in root.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-5, 0.0)
    samples = load_samples([a.data])
    for step in range(2):
        indices = list(range(step * info.world_size * 2, (step + 1) * info.world_size * 2))
        sft_backward(root, processor, samples, indices, "token", 1, info)
        clip_grads(params, 1.0)
        opt.step()
        if step == 0:
            grads = sum(_bytes(p.grad) for p in params if p.grad is not None)
        opt.zero_grad(set_to_none=True)
    row = {"weights": sum(_bytes(p) for p in root.parameters()), "gradients": grads,
           "optimizer": sum(_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    rows: list[Any] = [None] * info.world_size
    if dist.is_initialized():
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    if info.rank == 0:
        print("VLRL_MEMORY " + json.dumps(rows), flush=True)


def run(mode: str, ranks: int, lora: bool, model: Path, data: Path) -> list[dict[str, int]]:
    args = [__file__, "--worker", "--mode", mode, "--model", str(model), "--data", str(data)] + (["--lora"] if lora
                                                                                                else [])
    cmd = [sys.executable, *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone", *args]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("VLRL_MEMORY ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{mode} x{ranks} lora={lora} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return list(json.loads(line.split(" ", 1)[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    from vlrl.data.synth import write_split
    from vlrl.models.build import init_model

    work = Path(tempfile.mkdtemp(prefix="vlrl-bench-memory-"))
    model = init_model("qwen2-vl", a.size, work / "model", seed=0)
    write_split("chart", 16, seed=0, out_dir=work / "data", split="train")
    data = work / "data" / "chart" / "train.jsonl"
    results: list[dict[str, Any]] = []
    mib = 1024 * 1024
    for mode, ranks, lora in SETTINGS:
        rows = run(mode, ranks, lora, model, data)
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        state = mean["weights"] + mean["gradients"] + mean["optimizer"]
        results.append({"parallel": mode, "ranks": ranks, "lora": lora, "per_rank_mean": mean, "state": state})
        print(f"{mode:>4} x{ranks} lora={lora!s:<5} state {state / mib:8.1f} MiB (weights {mean['weights'] / mib:.1f}"
              f", grads {mean['gradients'] / mib:.1f}, adam {mean['optimizer'] / mib:.1f})  peak RSS "
              f"{mean['peak_rss'] / mib:.0f} MiB", flush=True)
    for r in results:
        if r["parallel"] == "fsdp":
            ddp = next(x for x in results if x["parallel"] == "ddp" and x["ranks"] == r["ranks"] and not x["lora"])
            r["state_share_of_ddp"] = round(r["state"] / ddp["state"], 3)
            print(f"fsdp x{r['ranks']}: {r['state_share_of_ddp']:.1%} of the replicated state per rank")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"size": a.size, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
