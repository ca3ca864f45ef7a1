"""One RL step of vlrl against one of TRL's `GRPOTrainer`, side by side on this machine (not a test).

    .venv/bin/python benchmarks/rl_vs_trl.py --threads 2 --ablation --out benchmarks/results/rl_vs_trl.json

(defaults: sizes tiny small, beta 0 and 0.04, B = 4, G = 8, 32 new tokens, 1 warm-up + 5 timed steps per side,
2 memory steps per child; `--threads 2 1` repeats everything at 2 and at 1 torch thread.)

Both trainers get the same random Qwen2-VL (`tiny` and/or `small`, built by `vlrl.models.build.init_model`
with seed 0), the same synthetic counting prompts (one 112x112 image = 16 vision tokens, 49 prompt tokens),
B prompts x G completions, `max_new_tokens` new tokens with EOS suppressed on both sides (every completion
has exactly that length), temperature 1, mu = 1, fp32, the same weighted reward (vlrl's `accuracy` + 0.1 x
`repetition`, called through the same code), fused AdamW at lr 1e-6 (TRL's default `adamw_torch_fused`;
vlrl's `make_optimizer`), grad-norm clip 1.0, beta = 0 and 0.04.

TRL is configured as fast as its documentation allows on a CPU: `use_cpu=True`, `bf16=False`,
`gradient_checkpointing=False`, the whole generation batch in one forward (`per_device_train_batch_size =
B*G`), no logging / saving / completion logging, `cache_implementation` from `--trl-cache` (HF's dynamic
cache by default; "static" measured no faster here), no `torch_compile` (on neither side), vision and EOS
tokens suppressed through `generation_kwargs["suppress_tokens"]`. TRL has no
torchvision-free processor, so it gets transformers' own `Qwen2VLProcessor` class built without a video
processor (`ImageQwen2VLProcessor` below), over the same PIL image processor vlrl uses.

Timing (in one process, alternating): TRL's `trainer.train()` runs warm-up + N steps; a callback at the end
of every TRL step runs one vlrl step (`vlrl.train.rl.rl_step`). A TRL step is the wall time from the end of
the previous vlrl step to the end of the TRL step (data loading, generation, scoring, log-probs, loss,
backward, optimizer step: all of it); a vlrl step is `rl_step`'s wall time. The first `--warmup` steps of
each are dropped; the medians of the rest are reported, and their ratio.

Peak memory (one child process per trainer and config, `--child`): the child builds one trainer, runs
`--mem-steps` steps and reports its peak resident set (`VmHWM`: interpreter, imports, policy, reference model,
optimizer state, activations, allocator slack) and its resident set just before the first step.

Ablation (`--ablation`): vlrl alone in the `VARIANTS` configurations (vlrl before this work, then each change
added), stepped round-robin in one process, so the effect of each change is measured under the same noise.

FLOP floor: the FLOPs a step cannot avoid, counted with `torch.utils.flop_counter.FlopCounterMode` on the
model itself -- each prompt (and its image) once per group, each completion token once, in generation, the
training forward (backward = 2x forward) and, with beta > 0, the reference forward -- divided by the fp32
matmul rate this process measures (a 1024^3 `torch.mm` at the same thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlrl.data.loading import load_samples
from vlrl.data.sample import Sample
from vlrl.data.synth import write_split
from vlrl.models.build import init_model
from vlrl.models.inputs import collate
from vlrl.models.loading import load_model
from vlrl.models.processor import ImageOnlyProcessor, vision_token_ids
from vlrl.rewards.registry import RewardSpec, combine
from vlrl.rollout.hf_engine import HFEngine
from vlrl.rollout.sampler import SeededSampler
from vlrl.train.dist import DistInfo
from vlrl.train.optim import make_scheduler
from vlrl.train.rl import RLRun, build_run, rl_step
from vlrl.train.rl_config import AlgorithmConfig, OptimConfig, RLConfig, RolloutConfig

REWARDS = [RewardSpec("accuracy"), RewardSpec("repetition", weight=0.1)]
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STAGES = ("rollout", "reward", "ref_logp", "old_logp", "advantage", "update")


@dataclass
class Settings:
    batch: int = 4  # B prompts per step
    group: int = 8  # G completions per prompt
    new_tokens: int = 32
    threads: int = 2
    lr: float = 1e-6
    seed: int = 0
    micro_batch: int = 32  # vlrl rows per training forward
    trl_cache: str | None = None  # TRL's `cache_implementation` (None: transformers' dynamic cache)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set (MB)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set of this process (MB): VmHWM, not `ru_maxrss`, which Linux carries over from the parent
    through fork + exec (a child would report the benchmark's own peak)."""
    return _status_mb("VmHWM")


def prepare(work: Path, sizes: list[str]) -> tuple[dict[str, Path], Path]:
    """Build the random models (seed 0) and 16 synthetic counting prompts, once per work folder."""
    models = {}
    for size in sizes:
        out = work / "models" / size
        if not (out / "config.json").exists():
            init_model("qwen2-vl", size, out, seed=0)
        models[size] = out
    data = work / "data" / "counting" / "train.jsonl"
    if not data.exists():
        write_split("counting", 16, seed=1, out_dir=work / "data", split="train")
    return models, data


# ----------------------------------------------------------------------------------------------- vlrl


class GenerateEngine(HFEngine):
    """vlrl's `hf` engine as it was before the speed work (for the ablation): transformers' `generate` with
    `num_return_sequences=G` (the prompt prefilled at B*G rows, images encoded once), the same `SeededSampler` as
    its last logits processor, `generate`'s own warpers neutral."""

    def _decode(self, encoded: Any, n: int, max_new: int, sampler: SeededSampler, step: Any = None, *,
                deadline: float | None = None) -> torch.Tensor:
        from transformers import LogitsProcessorList

        batch = {k: v.to(self.device) for k, v in collate(encoded, self.pad_id, self.image_id, "left").items()}
        out = self.model.generate(**batch, max_new_tokens=max_new, num_return_sequences=n, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
                                  repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=self.stop_ids,
                                  pad_token_id=self.pad_id, use_cache=True,
                                  logits_processor=LogitsProcessorList([sampler]))  # [N, L + T]
        return out[:, batch["input_ids"].shape[1] :].cpu()


@dataclass(frozen=True)
class Variant:
    """A vlrl configuration for the ablation: the decode loop and the training-forward layout."""

    name: str
    engine: str = "lean"  # lean: vlrl's decode loop; generate: transformers' generate (the earlier engine)
    shared_prefix: bool = True  # prompt once per group in training / reference forwards
    decode_threads: int | None = 1  # the hf engine's decode shards (None: one per torch thread)
    fused_adam: bool = True  # the fused AdamW kernel (False: torch's per-tensor loop, vlrl's earlier optimizer)
    lean_step: bool = True  # the decode step on re-laid-out weights (`LeanStep`; False: the model's own forward)


VARIANTS = [
    Variant("before (generate, [prompt|completion] rows)", "generate", False, 1, False, False),
    Variant("+ lean decode loop", "lean", False, 1, False, False),
    Variant("+ shared prefix", "lean", True, 1, False, False),
    Variant("+ fused AdamW", "lean", True, 1, True, False),
    Variant("+ lean decode step (= vlrl now)", "lean", True, 1, True, True),
    Variant("vlrl now with one decode shard per torch thread", "lean", True, None, True, True),
]


class VlrlSide:
    """A vlrl RL run (`build_run`) stepped by hand with `rl_step`; EOS suppressed like vision tokens. Without a
    `variant`, vlrl runs with its defaults (the side-by-side comparison); a variant overrides them (the ablation)."""

    def __init__(self, model_dir: Path, data: Path, beta: float, s: Settings, out: Path,
                 variant: Variant | None = None) -> None:
        cfg = RLConfig(model=str(model_dir), data=[str(data)], out=str(out), rewards=list(REWARDS),
                       rollout=RolloutConfig(batch_size=s.batch, group_size=s.group, max_new_tokens=s.new_tokens,
                                             temperature=1.0),
                       algorithm=AlgorithmConfig(beta=beta), optim=OptimConfig(lr=s.lr),
                       micro_batch_size=s.micro_batch, seed=s.seed, max_steps=10_000,
                       **({"shared_prefix": variant.shared_prefix} if variant is not None else {}))
        self.run: RLRun = build_run(cfg, ONE, str(model_dir))
        if variant is not None:
            self._apply(variant, s, cfg)
        engine: Any = self.run.engine
        engine.suppress_ids = sorted(set(engine.suppress_ids) | set(engine.stop_ids))
        self.run.loss.suppress_ids = sorted(set(self.run.loss.suppress_ids) | set(engine.stop_ids))
        self.step_no = 0
        self.position = 0
        self.times: list[float] = []
        self.stages: list[dict[str, float]] = []

    def _apply(self, variant: Variant, s: Settings, cfg: RLConfig) -> None:
        """Override vlrl's defaults with an ablation variant's settings."""
        if variant.engine == "generate":
            self.run.engine = GenerateEngine(self.run.model, self.run.processor)
        self.run.engine.decode_threads = variant.decode_threads  # type: ignore[attr-defined]
        self.run.engine.lean_step = variant.lean_step  # type: ignore[attr-defined]
        if not variant.fused_adam:
            params = self.run.params
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in self.run.opt.param_groups]
            self.run.opt = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(cfg.optim.adam_betas), fused=False)
            self.run.sched = make_scheduler(self.run.opt, cfg.optim.warmup_steps, cfg.max_steps,
                                            cfg.optim.min_lr_ratio)
            assert sum(len(g["params"]) for g in self.run.opt.param_groups) == len(params)

    def step(self) -> None:
        t = time.perf_counter()
        metrics, _, self.position = rl_step(self.run, self.step_no, self.position)
        self.times.append(time.perf_counter() - t)
        self.stages.append({k: metrics.get(f"time/{k}", 0.0) for k in STAGES})
        if metrics["completion/len_mean"] != self.run.cfg.rollout.max_new_tokens:
            raise RuntimeError(f"vlrl completions are not all {self.run.cfg.rollout.max_new_tokens} tokens long")
        self.step_no += 1

    def stage_medians(self, warmup: int) -> dict[str, float]:
        kept = self.stages[warmup:]
        return {k: statistics.median(st[k] for st in kept) for k in STAGES}


# ------------------------------------------------------------------------------------------------ TRL


def image_processor_class() -> type:
    """transformers' `Qwen2VLProcessor` without its video processor (which needs torchvision)."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            self.image_token = "<|image_pad|>"
            self.video_token = "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageQwen2VLProcessor


def trl_reward(samples: list[Sample]) -> Any:
    """vlrl's weighted reward as a TRL reward function (dataset column `idx` names the sample)."""

    def reward(prompts: list, completions: list, idx: list[int], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        total, _, _ = combine(REWARDS, texts, [samples[i] for i in idx])
        return total

    reward.__name__ = "vlrl_reward"
    return reward


def trl_dataset(samples: list[Sample]) -> Any:
    from datasets import Dataset
    from PIL import Image

    rows = []
    for i, smp in enumerate(samples):
        text = smp.messages[0]["content"].replace("<image>", "")
        rows.append({"prompt": [{"role": "user", "content": text}], "image": Image.open(smp.images[0]).convert("RGB"),
                     "idx": i})
    return Dataset.from_list(rows)


class TRLSide:
    """TRL's GRPOTrainer on the same model folder; `train(steps, after_step)` runs `after_step()` after each."""

    def __init__(self, model_dir: Path, samples: list[Sample], beta: float, s: Settings, out: Path) -> None:
        from trl import GRPOConfig, GRPOTrainer

        base = ImageOnlyProcessor.from_pretrained(model_dir)
        processor = image_processor_class()(base.image_processor, base.tokenizer, chat_template=base.chat_template)
        tok = base.tokenizer
        model = load_model(model_dir, torch.float32)
        stop = {int(tok.eos_token_id)}
        gen_eos = model.generation_config.eos_token_id
        stop |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        suppress = sorted(set(vision_token_ids(tok)) | stop)
        n = s.batch * s.group
        args = GRPOConfig(
            output_dir=str(out), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            per_device_train_batch_size=n, num_generations=s.group, generation_batch_size=n,
            gradient_accumulation_steps=1, num_iterations=1,
            max_completion_length=s.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=beta,
            loss_type="grpo", learning_rate=s.lr, lr_scheduler_type="constant", max_grad_norm=1.0,
            logging_steps=100_000, save_strategy="no", report_to="none", disable_tqdm=True,
            log_completions=False, seed=s.seed, cache_implementation=s.trl_cache,
            generation_kwargs={"suppress_tokens": suppress}, dataloader_num_workers=0,
        )
        self.trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(samples), args=args,
                                   train_dataset=trl_dataset(samples), processing_class=processor)
        self.times: list[float] = []
        self.new_tokens = s.new_tokens

    def train(self, steps: int, after_step: Any = None) -> None:
        from transformers import TrainerCallback

        side = self

        class Clock(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.mark = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                side.times.append(time.perf_counter() - self.mark)
                lengths = side.trainer._metrics["train"]["completions/mean_length"]
                if lengths and lengths[-1] != side.new_tokens:
                    raise RuntimeError(f"TRL completions are not all {side.new_tokens} tokens long")
                if after_step is not None:
                    after_step()
                self.mark = time.perf_counter()

        self.trainer.args.max_steps = steps
        self.trainer.add_callback(Clock())
        self.trainer.train()


# --------------------------------------------------------------------------------------------- FLOPs


def matmul_gflops(threads: int, n: int = 1024, reps: int = 60) -> float:
    """Best-of fp32 `torch.mm` rate (GFLOP/s) at `threads` threads (measured before and after each config, the
    higher kept: a busy moment of the shared machine must not lower the floor)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(model_dir: Path, data: Path, beta: float, s: Settings) -> float:
    """FLOPs a step cannot avoid: (prompt once per group + every completion token) x (1 generation + 3 training
    + 1 reference if beta > 0). Completion cost = forward of B*G prompt+completion rows minus B*G prompt rows."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlrl.models.inputs import encode_for_generation
    from vlrl.models.processor import image_token_id, load_processor

    model = load_model(model_dir).eval()
    proc = load_processor(model_dir)
    enc = encode_for_generation(proc, load_samples([str(data)])[: s.batch])
    pad, img = proc.tokenizer.pad_token_id, image_token_id(proc)

    def flops(items: list, keep: int) -> float:
        batch = collate(items, pad, img, padding_side="left")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**batch, logits_to_keep=keep, use_cache=False)
        return float(counter.get_total_flops())

    rows = [e for e in enc for _ in range(s.group)]
    ext = [type(e)(torch.cat([e.input_ids, torch.full((s.new_tokens,), 100)]), None, e.pixel_values,
                   e.image_grid_thw) for e in rows]
    prompt = flops(enc, 1)
    completion = flops(ext, s.new_tokens + 1) - flops(rows, 1)
    passes = 1 + 3 + (1 if beta > 0 else 0)
    return passes * (prompt + completion)


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Result:
    name: str
    beta: float
    threads: int
    vlrl_times: list[float] = field(default_factory=list)
    trl_times: list[float] = field(default_factory=list)
    vlrl_stages: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    gflops: float = 0.0
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> peak_rss_mb, rss_before_mb
    loadavg: tuple[float, float] = (float("nan"), float("nan"))  # 1-minute load average before / after the run

    def summary(self, samples_per_step: int) -> dict[str, Any]:
        v, t = statistics.median(self.vlrl_times), statistics.median(self.trl_times)
        nan = float("nan")
        mem = {f"{side}_{k}": round(self.memory.get(side, {}).get(k, nan), 1) for side in ("vlrl", "trl")
               for k in ("peak_rss_mb", "rss_before_mb")}
        return {"name": self.name, "beta": self.beta, "threads": self.threads, "vlrl_step_s": round(v, 4),
                "trl_step_s": round(t, 4), "speedup": round(t / v, 3),
                "vlrl_samples_per_s": round(samples_per_step / v, 2), "trl_samples_per_s": round(samples_per_step / t, 2),
                "vlrl_stage_s": {k: round(x, 4) for k, x in self.vlrl_stages.items()},
                "step_gflop": round(self.flops / 1e9, 2), "matmul_gflops": round(self.gflops, 1),
                "flop_floor_s": round(self.flops / (self.gflops * 1e9), 4), **mem,
                "loadavg_before_after": [round(x, 2) for x in self.loadavg],
                "vlrl_step_times": [round(x, 4) for x in self.vlrl_times],
                "trl_step_times": [round(x, 4) for x in self.trl_times]}


def alternate(size: str, model_dir: Path, data: Path, beta: float, s: Settings, steps: int, warmup: int,
              tmp: Path) -> Result:
    """Warm-up + `steps` steps of each trainer, alternating TRL, vlrl, TRL, vlrl, ... in this process."""
    torch.set_num_threads(s.threads)
    vl = VlrlSide(model_dir, data, beta, s, tmp / f"vlrl-{size}-{beta}")
    trl = TRLSide(model_dir, load_samples([str(data)]), beta, s, tmp / f"trl-{size}-{beta}")
    trl.train(warmup + steps, after_step=vl.step)
    res = Result(size, beta, s.threads, vlrl_times=vl.times[warmup:], trl_times=trl.times[warmup:],
                 vlrl_stages=vl.stage_medians(warmup))
    del trl, vl
    return res


def ablation(size: str, model_dir: Path, data: Path, beta: float, s: Settings, steps: int, warmup: int,
             tmp: Path) -> list[dict[str, Any]]:
    """vlrl alone, one run per `VARIANTS` entry, stepped round-robin in this process: the effect of each change."""
    torch.set_num_threads(s.threads)
    sides = [VlrlSide(model_dir, data, beta, s, tmp / f"abl-{size}-{beta}-{i}", v) for i, v in enumerate(VARIANTS)]
    for _ in range(warmup + steps):
        for side in sides:
            side.step()
    rows = []
    for v, side in zip(VARIANTS, sides):
        st = side.stage_medians(warmup)
        rows.append({"name": size, "beta": beta, "threads": s.threads, "variant": v.name,
                     "step_s": round(statistics.median(side.times[warmup:]), 4),
                     "stage_s": {k: round(x, 4) for k, x in st.items()}})
    return rows


def child(args: argparse.Namespace, s: Settings) -> None:
    """Run one trainer alone for `--mem-steps` steps; print {"peak_rss_mb", "rss_before_mb"} as JSON."""
    torch.set_num_threads(s.threads)
    models, data = prepare(Path(args.work), [args.size])
    tmp = Path(tempfile.mkdtemp(prefix="rl_vs_trl_"))
    before: list[float] = []
    if args.child == "vlrl":
        vl = VlrlSide(models[args.size], data, args.beta, s, tmp / "vlrl")
        before.append(rss_mb())
        for _ in range(args.mem_steps):
            vl.step()
    else:
        trl = TRLSide(models[args.size], load_samples([str(data)]), args.beta, s, tmp / "trl")
        before.append(rss_mb())
        trl.train(args.mem_steps)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_before_mb": before[0]}))


def measure_memory(args: argparse.Namespace, s: Settings, side: str, size: str, beta: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", side, "--size", size, "--beta", str(beta), "--work", args.work,
           "--mem-steps", str(args.mem_steps), "--threads", str(s.threads), "--micro-batch", str(s.micro_batch)]
    if s.trl_cache:
        cmd += ["--trl-cache", s.trl_cache]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | beta | threads | vlrl step (s) | TRL step (s) | speedup | samples/s vlrl / TRL | "
             "vlrl rollout / reward / log-probs / update (s) | FLOP floor (s) | peak RSS vlrl / TRL (MB) |",
             "|" + "---|" * 10]
    for r in rows:
        st = r["vlrl_stage_s"]
        stages = f"{st['rollout']:.2f} / {st['reward']:.3f} / {st['ref_logp'] + st['old_logp']:.2f} / {st['update']:.2f}"
        lines.append(f"| {r['name']} | {r['beta']} | {r['threads']} | {r['vlrl_step_s']:.2f} | {r['trl_step_s']:.2f} | "
                     f"**{r['speedup']:.2f}x** | {r['vlrl_samples_per_s']:.1f} / {r['trl_samples_per_s']:.1f} | "
                     f"{stages} | {r['flop_floor_s']:.2f} | {r['vlrl_peak_rss_mb']:.0f} / {r['trl_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | beta | threads | vlrl variant | step (s) | rollout (s) | log-probs (s) | update (s) |",
             "|" + "---|" * 8]
    for r in rows:
        st = r["stage_s"]
        lines.append(f"| {r['name']} | {r['beta']} | {r['threads']} | {r['variant']} | {r['step_s']:.2f} | "
                     f"{st['rollout']:.2f} | {st['ref_logp'] + st['old_logp']:.2f} | {st['update']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--betas", nargs="+", type=float, default=[0.0, 0.04])
    p.add_argument("--threads", nargs="+", type=int, default=[2], help="torch threads (each value: a full run)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per trainer (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2, help="steps of each memory child (0: no memory runs)")
    p.add_argument("--micro-batch", type=int, default=Settings.micro_batch)
    p.add_argument("--trl-cache", default=None, help="TRL's cache_implementation (e.g. static)")
    p.add_argument("--ablation", action="store_true", help="also time vlrl's variants (VARIANTS) against each other")
    p.add_argument("--no-trl", action="store_true", help="skip the side-by-side runs (with --ablation)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "vlrl-rl-vs-trl"))
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--child", choices=["vlrl", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--beta", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args, Settings(threads=args.threads[0], micro_batch=args.micro_batch, trl_cache=args.trl_cache))
        return
    models, data = prepare(Path(args.work), args.sizes)
    rows: list[dict[str, Any]] = []
    abl: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rl_vs_trl_") as tmp:
        for threads in args.threads:
            s = Settings(threads=threads, micro_batch=args.micro_batch, trl_cache=args.trl_cache)
            for size in args.sizes:
                for beta in args.betas:
                    if args.ablation:
                        abl += ablation(size, models[size], data, beta, s, args.steps, args.warmup, Path(tmp))
                        print(json.dumps(abl[-len(VARIANTS):]), flush=True)
                    if args.no_trl:
                        continue
                    gflops, load = matmul_gflops(threads), os.getloadavg()[0]
                    res = alternate(size, models[size], data, beta, s, args.steps, args.warmup, Path(tmp))
                    res.flops = step_flops(models[size], data, beta, s)
                    res.gflops = max(gflops, matmul_gflops(threads))
                    res.loadavg = (load, os.getloadavg()[0])
                    if args.mem_steps > 0:
                        res.memory = {side: measure_memory(args, s, side, size, beta) for side in ("vlrl", "trl")}
                    rows.append(res.summary(s.batch * s.group))
                    print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_times")}), flush=True)
    if rows:
        print(table(rows))
    if abl:
        print(ablation_table(abl))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "steps": args.steps,
                "warmup": args.warmup, "mem_steps": args.mem_steps, "micro_batch": args.micro_batch,
                "trl_cache": args.trl_cache, "loadavg_at_end": os.getloadavg()}
        Path(args.out).write_text(json.dumps({"meta": meta, "configs": rows, "ablation": abl}, indent=2) + "\n")


if __name__ == "__main__":
    main()
