"""One decode step of a Qwen2 / Qwen3 text decoder on weights laid out for small-batch matrix products.

`nn.Linear` keeps its weight as [out, in] and computes x @ W.T. At the decode loop's shapes (few rows: M = B*G)
the CPU's fp32 GEMM (MKL sgemm) runs that transposed product slower than x @ Wt with Wt = W.T made contiguous
once (benchmarks/README.md has the measurements). `LeanStep` copies the text decoder's weights into that layout
(buffers kept, reloaded per rollout) -- q/k/v fused into one [H, (nq + 2 nkv) * hd] matrix, gate/up into one
[H, 2 I] -- and runs the decode step itself: RMSNorm, rotary, grouped-query attention over the engine's
pre-allocated KV buffers (q of length 1: two small batched products and a softmax), SwiGLU, the LM head. The math
is the model's (fp32 in, the same operations); tests check its completions and sampling log-probs against the
model's own forward on every supported architecture. The prompt (images, the family's positions) is still
prefilled by the model itself; after the prompt every position is text, where the rotary embedding is the plain
1-D one (Qwen-VL's M-RoPE has the same position on its three axes there).

Which decoder it re-lays is the model family's answer (`Family.text_decoder`, `vlrl.models.families`): Qwen2-VL,
Qwen2.5-VL and Qwen3-VL text decoders, and InternVL's Qwen2 / Qwen3 text models (InternVL3, InternVL3.5). It
needs SiLU MLPs, full attention (Qwen3's per-head q/k norms supported), default rotary, unsharded parameters (not
FSDP2's DTensor), plain `nn.Linear` projections and no hooks. Anything else (`LeanStep.unsupported` names why)
decodes through the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlrl.models.families import SUPPORTED_MODEL_TYPES, family_of_model


@dataclass
class _Layer:
    ln1: Tensor  # [H]
    ln2: Tensor  # [H]
    qkv: Tensor  # [H, (nq + 2 * nkv) * hd]
    o: Tensor  # [nq * hd, H]
    gate_up: Tensor  # [H, 2 * I]
    down: Tensor  # [I, H]
    eps: float = 0.0
    qk_eps: float = 0.0
    qkv_bias: Tensor | None = None  # [(nq + 2 * nkv) * hd]
    q_norm: Tensor | None = None  # [hd] (Qwen3)
    k_norm: Tensor | None = None


Sources = dict[str, tuple[list[Tensor], bool]]  # buffer name -> (parameters stacked into it, stored transposed)


def _layer_sources(layer: Any) -> Sources:
    """Where each `_Layer` buffer comes from: the one mapping both the first build and every reload use."""
    a, m = layer.self_attn, layer.mlp
    src: Sources = {"ln1": ([layer.input_layernorm.weight], False),
                    "ln2": ([layer.post_attention_layernorm.weight], False),
                    "qkv": ([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], True),
                    "o": ([a.o_proj.weight], True),
                    "gate_up": ([m.gate_proj.weight, m.up_proj.weight], True),
                    "down": ([m.down_proj.weight], True)}
    biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise TypeError("q/k/v projections with and without bias")
    if biases[0] is not None:
        src["qkv_bias"] = (biases, False)
    if getattr(a, "q_norm", None) is not None:
        src["q_norm"], src["k_norm"] = ([a.q_norm.weight], False), ([a.k_norm.weight], False)
    return src


def _empty(sources: list[Tensor], transposed: bool) -> Tensor:
    """A buffer for `sources` stacked along their first dimension ([in, sum out] when transposed)."""
    n = sum(w.shape[0] for w in sources)
    shape = (sources[0].shape[1], n) if transposed else (n, *sources[0].shape[1:])
    return sources[0].new_empty(shape)


_STRIP = 256  # rows of W per transposed copy: a whole matrix's strided reads fall out of cache, a strip's do not


def _copy_into(buf: Tensor, sources: list[Tensor], transposed: bool) -> None:
    at = 0
    for w in sources:
        n, w = w.shape[0], w.detach()
        if transposed:  # in strips: a strip's strided reads stay in cache
            for k in range(0, n, _STRIP):
                buf[:, at + k : at + min(n, k + _STRIP)].copy_(w[k : k + _STRIP].t())
        else:
            buf[at : at + n].copy_(w)
        at += n
    if at != (buf.shape[1] if transposed else buf.shape[0]):
        raise ValueError(f"LeanStep: a model of other sizes ({at} vs {tuple(buf.shape)})")


def _text_model(model: Any) -> Any:
    """The text decoder the model's family lets `LeanStep` re-lay (None: none, or not a known family)."""
    if str(getattr(getattr(model, "config", None), "model_type", "")) not in SUPPORTED_MODEL_TYPES:
        return None
    return family_of_model(model).text_decoder(model)


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The models' RMSNorm (fp32 statistics)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanStep:
    """Decode-step forward of `model`'s text decoder (see the module docstring). It holds copies, not views:
    after the weights change, `load_(model)` copies them into the same buffers (the engine does so at every
    `generate`; allocating fresh buffers at every rollout would page-fault them in again every step)."""

    @staticmethod
    def supports(model: Any) -> bool:
        return LeanStep.unsupported(model) is None

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why `LeanStep` cannot decode for `model` (None: it can)."""
        text = _text_model(model)
        if text is None or not hasattr(model, "lm_head") or not hasattr(text, "layers"):
            return "no Qwen2 / Qwen3 text decoder of a known family"
        cfg = text.config
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "use_sliding_window", False):
            return "not a SiLU full-attention decoder"
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            return "not a SiLU full-attention decoder"
        rope = getattr(text, "rotary_emb", None)
        if rope is None or not hasattr(rope, "inv_freq") or getattr(rope, "rope_type", "default") != "default":
            return "not the default rotary embedding"
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            return "sharded parameters (FSDP2): no local copy of the whole decoder"
        layers = list(text.layers)
        if not all(hasattr(ly, "self_attn") and hasattr(ly, "mlp") for ly in layers):
            return "decoder layers without self_attn / mlp"
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        if not all(hasattr(ly.self_attn, n) for ly in layers for n in names):
            return "attention without q/k/v/o projections"
        if not all(hasattr(ly.mlp, n) for ly in layers for n in ("gate_proj", "up_proj", "down_proj")):
            return "not a gated (SwiGLU) MLP"
        # Plain linear layers only, and no hooks anywhere in the decoder: an adapter (LoRA) or a hook changes what
        # the model computes, and this step would silently skip it.
        linears = [model.lm_head] + [m for layer in layers for m in
                                     (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                      layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        if any(type(m) is not torch.nn.Linear for m in linears):
            return "projections that are not plain nn.Linear (an adapter?)"
        if any(m._forward_hooks or m._forward_pre_hooks for m in [model, *text.modules(), model.lm_head]):
            return "forward hooks on the model"
        return None

    @torch.no_grad()
    def __init__(self, model: Any) -> None:
        reason = self.unsupported(model)
        if reason is not None:
            raise TypeError(f"LeanStep does not support {type(model).__name__}: {reason}")
        text = _text_model(model)
        attn0 = text.layers[0].self_attn
        self.head_dim: int = attn0.head_dim
        self.n_heads: int = text.config.num_attention_heads
        self.n_kv: int = text.config.num_key_value_heads
        self.scaling: float = float(attn0.scaling)
        rope = text.rotary_emb
        self.inv_freq = rope.inv_freq.detach().float().clone()  # [hd / 2]
        self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self.norm_eps = float(text.norm.variance_epsilon)
        self.norm = _empty([text.norm.weight], False)  # [H]
        self.lm_head = _empty([model.lm_head.weight], True)  # [H, V]
        self.layers = []
        for layer in text.layers:
            q_norm = getattr(layer.self_attn, "q_norm", None)
            buffers = {name: _empty(ws, tr) for name, (ws, tr) in _layer_sources(layer).items()}
            self.layers.append(_Layer(**buffers, eps=float(layer.input_layernorm.variance_epsilon),
                                      qk_eps=float(q_norm.variance_epsilon) if q_norm is not None else 0.0))
        self.load_(model)

    def _plan(self, model: Any) -> list[tuple[Tensor, list[Tensor], bool]]:
        """(buffer, the parameters stacked into it, whether they are transposed) for every copied weight."""
        text = _text_model(model)
        plan = [(self.lm_head, [model.lm_head.weight], True), (self.norm, [text.norm.weight], False)]
        for ly, layer in zip(self.layers, text.layers, strict=True):
            plan += [(getattr(ly, name), ws, tr) for name, (ws, tr) in _layer_sources(layer).items()]
        return plan

    @torch.no_grad()
    def load_(self, model: Any) -> None:
        """Copy `model`'s current weights into this step's buffers (the same architecture and sizes it was built
        from; the embedding is read in place)."""
        self.embed = _text_model(model).embed_tokens.weight  # [V, H]
        for buf, sources, transposed in self._plan(model):
            _copy_into(buf, sources, transposed)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [b, 1, hd] of 1-D text positions [b] (Qwen-VL: equal on the three M-RoPE axes)."""
        freqs = positions[:, None].float() * self.inv_freq  # [b, hd / 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, hd]
        dtype = self.embed.dtype  # as the model does: rotate in its dtype, so keys stay in the cache's dtype
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, positions: Tensor, cache: Any, bias: Tensor) -> Tensor:
        """Logits [b, V] of the next token after `tokens` [b] at `positions` [b]. `cache.layers[i].update(k, v)`
        ([b, nkv, 1, hd] each) appends this step's keys / values and returns the filled [b, nkv, L, hd];
        `bias` [b, L] is 0 where a row may attend and -inf at its prompt padding (L = positions filled after
        this step's write)."""
        b = tokens.shape[0]
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv
        h = self.embed.index_select(0, tokens)  # [b, H]
        cos, sin = self.rotary(positions)  # [b, 1, hd]
        mask = bias[:, None, None, :].to(h.dtype)  # [b, 1, 1, L]
        for i, ly in enumerate(self.layers):
            x = _rms(h, ly.ln1, ly.eps)  # [b, H]
            qkv = x @ ly.qkv if ly.qkv_bias is None else torch.addmm(ly.qkv_bias, x, ly.qkv)  # [b, (nq + 2 nkv) hd]
            q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=1)
            q, k, v = q.view(b, nq, hd), k.view(b, nkv, hd), v.view(b, nkv, hd)
            if ly.q_norm is not None and ly.k_norm is not None:
                q, k = _rms(q, ly.q_norm, ly.qk_eps), _rms(k, ly.k_norm, ly.qk_eps)
            q = q * cos + _rotate_half(q) * sin  # [b, nq, hd]
            k = k * cos + _rotate_half(k) * sin  # [b, nkv, hd]
            keys, values = cache.layers[i].update(k[:, :, None], v[:, :, None])  # [b, nkv, L, hd]
            qg = q.view(b, nkv, nq // nkv, hd)  # [b, nkv, g, hd]: the g query heads sharing each KV head
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scaling + mask  # [b, nkv, g, L]
            attn = torch.matmul(torch.softmax(scores, dim=-1), values)  # [b, nkv, g, hd]
            h = h + attn.reshape(b, nq * hd) @ ly.o  # [b, H]
            x = _rms(h, ly.ln2, ly.eps)
            gate, up = (x @ ly.gate_up).chunk(2, dim=1)  # [b, I] each
            h = h + (torch.nn.functional.silu(gate) * up) @ ly.down  # [b, H]
        return _rms(h, self.norm, self.norm_eps) @ self.lm_head  # [b, V]
