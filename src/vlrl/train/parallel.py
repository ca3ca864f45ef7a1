"""How the trained model is spread over the ranks (`parallel: none | ddp | fsdp`), on PyTorch's own engines.

- `none`: one process, the model as it is.
- `ddp`: every rank holds the whole model; torch's `DistributedDataParallel` sums the gradients across ranks in
  its backward hooks (a communication hook that sums: each rank's loss is already normalised by the GLOBAL token or
  sample count, so the sum is the full batch's gradient at any world size).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each transformer block (the model's own
  `_no_split_modules`: decoder layers and vision blocks) and on the root, so every rank holds 1/world of the
  weights, gradients and optimizer state; gradients are reduce-scattered as sums (divide factor 1). With a mixed
  precision (`dtype: bfloat16`) FSDP2's `MixedPrecisionPolicy` computes in bf16 and reduces in fp32 over fp32
  sharded master weights. `cpu_offload` keeps the shards and optimizer state in host memory (`CPUOffloadPolicy`;
  GPU runs only). Every rank gathers the same blocks in the same order, so a micro-batch with images on one rank
  and without on another (the vision blocks would run on one side only) is refused (`same_blocks`), not hung.

Training code calls the model's submodules (the decoder without its head, then the head in chunks; a prompt pass
and a cached continuation), which FSDP2 and DDP only see through the wrapped module's forward. So both wrap a
`Root` whose forward runs a function of the model, `root(fn, *args)` = `fn(model, *args)`: one forward of the
wrapped root per micro-batch, whatever it calls inside. Outputs must be tensors, or tuples / lists / dicts / registered
dataclasses of them (FSDP2 hooks its backward on the output tensors).

Generation and validation run one rank's own prompts, each rank a different number of forwards, which FSDP2's
per-forward all-gathers would deadlock: `full_weights(root)` gathers every shard once on every rank (a collective),
keeps them gathered while the engine runs, and frees them after.
"""

# no `from __future__ import annotations`: DDP checks the communication hook's annotations at run time
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlrl.train.dist import DistInfo, is_distributed
from vlrl.train.precision import Precision

PARALLEL = ("none", "ddp", "fsdp")


class Root(nn.Module):
    """The module that DDP or FSDP2 wraps: `root(fn, *args, **kwargs)` returns `fn(root.model, *args, **kwargs)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def _sum_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients summed over ranks (DDP's default divides by the world)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()  # type: ignore[union-attr]
    return fut.then(lambda f: f.value()[0])


def block_classes(model: nn.Module) -> set[str]:
    """The class names of the model's transformer blocks (Hugging Face's `_no_split_modules`)."""
    names = getattr(model, "_no_split_modules", None) or []
    return set(names)


def wrap(model: nn.Module, mode: str, info: DistInfo, precision: Precision, *, cpu_offload: bool = False) -> Any:
    """`model` ready to train under `mode` (see the module docstring): a DDP- or FSDP2-wrapped `Root`, or a
    plain `Root` (`none`, or any mode in one process without a process group)."""
    if mode not in PARALLEL:
        raise ValueError(f"unknown parallel {mode!r}; valid: {', '.join(PARALLEL)}")
    root = Root(model)
    if mode == "none" or not is_distributed():
        return root
    if mode == "ddp":
        ddp = nn.parallel.DistributedDataParallel(
            root, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=True,  # a batch without images leaves the vision tower without gradients
            forward_sync_buffers=False,  # constant buffers (rotary frequencies); a broadcast per forward would be a
            #   collective in the no-grad passes, whose number differs between ranks
        )
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    kw: dict[str, Any] = {"offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    if precision.mixed:  # FSDP2 casts the gathered weights; autocast stays off (`autocast_here`)
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.compute_dtype, reduce_dtype=torch.float32)
    blocks = block_classes(model)
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kw)
    fully_shard(root, **kw)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sums, as DDP's hook above
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return root


def is_fsdp(root: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(root, FSDPModule)


def autocast_here(root: Any, precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The forwards' autocast: FSDP2 does mixed precision itself, otherwise `precision.autocast`."""
    return contextlib.nullcontext() if is_fsdp(root) else precision.autocast(device)


def syncs_gradients(root: Any) -> bool:
    """Whether backward passes of `root` are collectives (DDP or FSDP2 across several ranks)."""
    return is_distributed() and (isinstance(root, nn.parallel.DistributedDataParallel) or is_fsdp(root))


def unwrap(root: Any) -> Any:
    """The Hugging Face model inside a (wrapped) `Root`; anything else as it is."""
    inner = root.module if isinstance(root, nn.parallel.DistributedDataParallel) else root
    return inner.model if isinstance(inner, Root) else inner


@contextlib.contextmanager
def no_sync(root: Any, sync: bool) -> Iterator[None]:
    """Backward passes inside accumulate gradients locally unless `sync` (the last one of an optimizer step):
    DDP's `no_sync`. FSDP2 reduce-scatters every backward into the sharded gradients, which accumulate correctly."""
    if sync or not isinstance(root, nn.parallel.DistributedDataParallel):
        yield
        return
    with root.no_sync():
        yield


@contextlib.contextmanager
def full_weights(root: Any) -> Iterator[nn.Module]:
    """The Hugging Face model with every weight whole on this rank, for generation and validation (a collective:
    every rank enters). Under FSDP2 the shards are gathered once and stay gathered until the block ends."""
    if not is_fsdp(root):
        yield unwrap(root)
        return
    from torch.distributed.fsdp import FSDPModule

    root(_nothing)  # a forward of the root first: FSDP2 sets up its root there (before any child is gathered)
    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield unwrap(root)
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not root, recurse=False)  # fully_shard's own defaults


def _nothing(model: nn.Module) -> None:
    return None


def trainable_state(root: Any, named: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP2 the whole tensors of the trainable parameters only (LoRA's adapters: small, unlike the frozen
    base they sit in), on rank 0 and on CPU, a collective (every rank calls it); named as `named`, a module holding
    the same parameters (the peft model around the trained one), names them. None otherwise."""
    if not is_fsdp(root):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd: dict[str, Any] = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                             ignore_frozen_params=True))
    name_of = {id(p): n for n, p in named.named_parameters()}  # the same parameter objects as the root's
    trainable = {n: p for n, p in root.named_parameters() if p.requires_grad}  # the state may keep tied frozen ones
    return {name_of[id(trainable[k])]: v for k, v in sd.items() if k in trainable}


def clip_grads(params: list[nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_` of `params` (sharded gradients included: their norm is the whole gradient's)."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(total, "full_tensor", None)
    return float(full() if full is not None else total)


def _unprefixed(state: dict[str, Any]) -> dict[str, Any]:
    """`Root`'s state-dict names without its `model.` prefix: the Hugging Face model's own names."""
    return {k.removeprefix("model."): v for k, v in state.items()}


def model_state(root: Any) -> dict[str, torch.Tensor] | None:
    """Under FSDP2 the whole model's state dict on rank 0 (on CPU; a collective: every rank calls it), named as
    the Hugging Face model names it; None otherwise (`save_pretrained` reads the model itself)."""
    if not is_fsdp(root):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = _unprefixed(get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    model = unwrap(root)  # tied weights once, under the name `save_pretrained` keeps (named_* drop duplicates)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in sd.items() if k in names}


def optimizer_state(root: Any, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state (a collective under FSDP2: every rank calls it; rank 0 gets it on CPU)."""
    if not is_fsdp(root):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(root: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state written by `optimizer_state`, at any world size (each rank keeps its shard).
    Both forms load under either kind of root: torch's own (parameters numbered in the optimizer's order) and
    FSDP2's (parameters named): `Optimizer.load_state_dict` pairs parameters by order, whatever their keys."""
    if not is_fsdp(root):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # not strict: a parameter that never had a gradient (the vision tower on text-only data) has no AdamW state in
    # the checkpoint, as it had none in the run that saved it (AdamW adds it at its first gradient)
    set_optimizer_state_dict(root, opt, _named(root, opt, state),
                             options=StateDictOptions(full_state_dict=True, strict=False))


def _named(root: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A numbered optimizer state (`Optimizer.state_dict`) with the parameters' names instead (FSDP2's form)."""
    if not any(isinstance(k, int) for k in state["state"]) and not any(
            isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        return state
    name_of = {id(p): n for n, p in root.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def same_blocks(root: Any, with_images: bool) -> None:
    """Under FSDP2 on several ranks: refuse a micro-batch that runs the vision tower on some ranks only (their
    all-gathers would pair with other blocks' and hang). A collective: every rank calls it for each micro-batch."""
    if not (is_fsdp(root) and is_distributed()):
        return
    t = torch.tensor([float(with_images), 1.0])
    dist.all_reduce(t)
    if 0 < t[0] < t[1]:
        raise RuntimeError("parallel fsdp: in this micro-batch some ranks have images and others do not, so their "
                           "vision blocks would not run in step; data that mixes text-only and image samples needs "
                           "parallel ddp for now")


def call(model_or_root: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(model, *args, **kwargs)` through the root's forward when `model_or_root` is a (wrapped) `Root`."""
    if isinstance(model_or_root, (Root, nn.parallel.DistributedDataParallel)):
        return model_or_root(fn, *args, **kwargs)
    return fn(model_or_root, *args, **kwargs)


def matched_count(n_local: int, root: Any) -> int:
    """How many micro-batch forwards every rank runs: its own count, or under DDP / FSDP2 the largest of any rank
    (each backward is a collective there; a rank with fewer runs the rest with weight zero)."""
    if not syncs_gradients(root):
        return n_local
    t = torch.tensor([n_local], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def save_sharded(root: Any, opt: torch.optim.Optimizer, path: Any) -> None:
    """Write the model and optimizer state of `root` to folder `path` with torch.distributed.checkpoint: each rank
    writes its own shard file (FSDP2's shards; under DDP or one process the replicated tensors are spread over the
    ranks once), rank 0 the metadata. A collective: every rank calls it, and it returns once every rank's files
    are written. One process without a process group writes them all itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(root, opt)
    with _one_process_quiet():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)


def load_sharded(root: Any, opt: torch.optim.Optimizer, path: Any) -> None:
    """Load a `save_sharded` folder into `root` and `opt` at any world size and under any `parallel`: DCP reads the
    parts of each tensor this rank holds, whichever ranks wrote them. A collective like `save_sharded`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_sd, optim_sd = get_state_dict(root, opt)  # this rank's tensors, the destinations of the load
    sd: dict[str, Any] = {"model": model_sd, "optimizer": dict(optim_sd)}
    # AdamW keeps no state for a parameter that never had a gradient (a vision tower on text-only data), but
    # get_state_dict gives a fresh optimizer state for all: keep only those the checkpoint has, as it had them
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    has_state = {k.rsplit(".", 1)[0] for k in saved if k.startswith("optimizer.state.")}
    sd["optimizer"]["state"] = {n: v for n, v in sd["optimizer"]["state"].items()
                                if f"optimizer.state.{n}" in has_state}
    with _one_process_quiet():
        dcp.load(sd, checkpoint_id=path)  # in place: the tensors (and the optimizer's plain values) of `sd`
    set_model_state_dict(root, sd["model"])
    # not strict: the parameters left out above get no state, as in the run that saved (AdamW adds it at their
    # first gradient)
    set_optimizer_state_dict(root, opt, sd["optimizer"], options=StateDictOptions(strict=False))


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """DCP warns on every save and load that it assumes one process when there is no process group: that is
    this case's intent, so the warning is dropped."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
