"""Attention implementations for Core ML, and the swap that puts one into a diffusers/transformers model.

``original`` leaves a model as it is: diffusers' scaled-dot-product attention on (B, S, C) tensors,
the layout the GPU and the CPU run well. ``split-einsum`` is Apple's layout for the Neural Engine
(machinelearning.apple.com/research/neural-engine-transformers, apple/ml-stable-diffusion): every
tensor of a transformer block stays 4-D as (B, C, 1, S), linear layers become 1x1 convolutions,
layer norms reduce over the channel axis, and attention runs one head at a time as two einsums
(``bchq,bkhc->bkhq`` and ``bkhq,bchk->bchq``, which coremltools keeps as MIL ``einsum`` ops), the heads
cut from the channel axis by one ``split`` per tensor, with no (B, S, heads, dim) reshape or transpose.

The rewrite keeps the model's own parameters (a 1x1 convolution reads ``linear.weight[:, :, None, None]``),
so it is the same function of the same weights: tests check it against the stock model in torch.

    with attention_implementation(unet, "split-einsum") as report:
        program = torch.export.export(unet, example)   # traced with the (B, C, 1, S) blocks
    # here ``unet`` is the stock model again

What is rewritten, per component:

- U-Net and ControlNet: every continuous-input ``Transformer2DModel`` (GroupNorm, proj_in, basic
  transformer blocks with self-attention, cross-attention and a GEGLU/GELU feed-forward, proj_out).
- VAE: the mid-block ``Attention`` (GroupNorm, one head over all pixels, residual).
- CLIP text encoder: every encoder layer (causal self-attention and the MLP).

A layer the rewrite does not cover exactly (ada-norm, gated or masked attention, q/k norms, GQA ...)
raises :class:`UnsupportedAttention` naming it, rather than being converted into something else.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sdexport.options import ATTENTION_MODES

__all__ = [
    "IMPLEMENTATIONS",
    "UnsupportedAttention",
    "split_einsum",
    "attention_implementation",
    "SplitEinsumTransformer2D",
    "SplitEinsumAttention",
    "SplitEinsumCLIPEncoder",
]

IMPLEMENTATIONS = ATTENTION_MODES  # declared once, with the other Core ML settings

# Additive mask value for causal attention: large enough that exp() underflows to exactly 0 in fp32
# and fp16, small enough to stay finite in fp16 (Apple's converter uses the same value).
MASK_VALUE = -1e4


class UnsupportedAttention(ValueError):
    """The split-einsum rewrite does not cover this layer; the message names it and the reason."""


# --- the building blocks, all on (B, C, 1, S) tensors ---------------------------------------------


def split_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention one head at a time, in the (B, C, 1, S) layout.

    q: (B, C, 1, Sq); k, v: (B, C, 1, Sk); mask: additive, broadcastable to (B, Sk, 1, Sq).
    Returns (B, C, 1, Sq). C = heads * dim_head, heads laid out one after the other along C.
    """
    dim_head = q.shape[1] // heads
    qs = q.split(dim_head, dim=1)  # heads x (B, dim_head, 1, Sq)
    ks = k.transpose(1, 3).split(dim_head, dim=3)  # heads x (B, Sk, 1, dim_head)
    vs = v.split(dim_head, dim=1)  # heads x (B, dim_head, 1, Sk)
    out = []
    for qh, kh, vh in zip(qs, ks, vs):
        weights = torch.einsum("bchq,bkhc->bkhq", qh, kh) * scale  # (B, Sk, 1, Sq)
        if mask is not None:
            weights = weights + mask
        weights = weights.softmax(dim=1)  # over keys
        out.append(torch.einsum("bkhq,bchk->bchq", weights, vh))  # (B, dim_head, 1, Sq)
    return torch.cat(out, dim=1)  # (B, C, 1, Sq)


def conv1x1(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` applied over the channel axis of (B, C, 1, S): a 1x1 convolution with its weights."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def layer_norm_channels(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm`` over the channel axis of (B, C, 1, S) (torch's LayerNorm normalises the last axis)."""
    mean = x.mean(dim=1, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=1, keepdim=True)
    out = centered * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight.view(1, -1, 1, 1)
    if norm.bias is not None:
        out = out + norm.bias.view(1, -1, 1, 1)
    return out


def to_bc1s(x: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (B, C, 1, S)."""
    return x.transpose(1, 2).unsqueeze(2)


def from_bc1s(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, S) -> (B, S, C)."""
    return x.squeeze(2).transpose(1, 2)


def _require(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise UnsupportedAttention(f"{where}: {what} is not supported by the split-einsum attention")


# --- diffusers Attention ---------------------------------------------------------------------------


def _check_attention(attn, where: str) -> None:
    _require(attn.spatial_norm is None, where, "spatial norm")
    _require(getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None, where, "q/k normalisation")
    _require(getattr(attn, "added_kv_proj_dim", None) is None, where, "added key/value projections")
    _require(attn.norm_cross is None, where, "cross-attention input normalisation")
    _require(attn.to_k.out_features == attn.to_q.out_features, where, "grouped-query attention")
    _require(attn.to_q.out_features % attn.heads == 0, where, "a head count that does not divide the width")


def attention_bc1s(attn, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers ``Attention`` minus its input/output reshapes: q from x, k/v from context, (B, C, 1, S)."""
    context = x if context is None else context
    q, k, v = conv1x1(x, attn.to_q), conv1x1(context, attn.to_k), conv1x1(context, attn.to_v)
    out = split_einsum(q, k, v, attn.heads, attn.scale)
    return conv1x1(out, attn.to_out[0])  # to_out[1] is dropout


class SplitEinsumAttention(nn.Module):
    """Stands in for a diffusers ``Attention`` called on its own (the VAE's mid block), same signature."""

    def __init__(self, attn, where: str = "Attention"):
        super().__init__()
        _check_attention(attn, where)
        self.attn = attn
        self.where = where

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _require(attention_mask is None, self.where, "an attention mask")
        attn = self.attn
        residual = hidden_states
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            x = hidden_states.view(b, c, 1, h * w)  # (B, C, 1, S)
        else:
            x = to_bc1s(hidden_states)  # (B, S, C) -> (B, C, 1, S)
        if attn.group_norm is not None:
            x = attn.group_norm(x)  # GroupNorm over (B, C, 1, S) = over (B, C, H, W)
        context = None if encoder_hidden_states is None else to_bc1s(encoder_hidden_states)
        out = attention_bc1s(attn, x, context)  # (B, C, 1, S)
        out = out.view(b, c, h, w) if hidden_states.ndim == 4 else from_bc1s(out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# --- diffusers Transformer2DModel ------------------------------------------------------------------


def _check_transformer_block(block, where: str) -> None:
    _require(block.norm_type == "layer_norm", where, f"norm_type {block.norm_type!r}")
    _require(block.pos_embed is None, where, "positional embeddings")
    _require(not hasattr(block, "fuser"), where, "gated (GLIGEN) attention")
    _require(block._chunk_size is None, where, "chunked feed-forward")
    _check_attention(block.attn1, f"{where}.attn1")
    if block.attn2 is not None:
        _check_attention(block.attn2, f"{where}.attn2")
    act = block.ff.net[0]
    _require(type(act).__name__ in ("GEGLU", "GELU"), where, f"feed-forward activation {type(act).__name__}")


def feed_forward_bc1s(ff, x: torch.Tensor) -> torch.Tensor:
    act, *rest = ff.net
    x = conv1x1(x, act.proj)
    if type(act).__name__ == "GEGLU":
        x, gate = x.chunk(2, dim=1)  # diffusers chunks the last axis, here the channel axis
        x = x * F.gelu(gate)
    else:  # GELU
        x = F.gelu(x, approximate=act.approximate)
    for layer in rest:
        if isinstance(layer, nn.Linear):
            x = conv1x1(x, layer)
        # dropout: identity in eval
    return x


def transformer_block_bc1s(block, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """diffusers ``BasicTransformerBlock`` (layer-norm variant) on (B, C, 1, S)."""
    self_context = context if block.only_cross_attention else None
    x = attention_bc1s(block.attn1, layer_norm_channels(x, block.norm1), self_context) + x
    if block.attn2 is not None:
        x = attention_bc1s(block.attn2, layer_norm_channels(x, block.norm2), context) + x
    return feed_forward_bc1s(block.ff, layer_norm_channels(x, block.norm3)) + x


class SplitEinsumTransformer2D(nn.Module):
    """Stands in for a continuous-input diffusers ``Transformer2DModel``, same call signature."""

    def __init__(self, model, where: str = "Transformer2DModel"):
        super().__init__()
        _require(model.is_input_continuous, where, "non-continuous (patched or vectorised) input")
        for i, block in enumerate(model.transformer_blocks):
            _check_transformer_block(block, f"{where}.transformer_blocks.{i}")
        self.model = model
        self.where = where

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                class_labels=None, cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None,
                return_dict=True):
        _require(attention_mask is None and encoder_attention_mask is None, self.where, "an attention mask")
        m = self.model
        b, _, h, w = hidden_states.shape
        residual = hidden_states
        x = m.norm(hidden_states)
        # proj_in is a 1x1 Conv2d (SD 1.x) or a Linear over channels (SD 2.x): the same map either way.
        x = m.proj_in(x) if isinstance(m.proj_in, nn.Conv2d) else F.conv2d(x, m.proj_in.weight[:, :, None, None], m.proj_in.bias)
        inner = x.shape[1]
        x = x.view(b, inner, 1, h * w)  # (B, inner, 1, S)
        context = None if encoder_hidden_states is None else to_bc1s(encoder_hidden_states)  # (B, D, 1, 77)
        for block in m.transformer_blocks:
            x = transformer_block_bc1s(block, x, context)
        x = x.view(b, inner, h, w)  # (B, inner, H, W)
        x = m.proj_out(x) if isinstance(m.proj_out, nn.Conv2d) else F.conv2d(x, m.proj_out.weight[:, :, None, None], m.proj_out.bias)
        out = x + residual
        return (out,) if not return_dict else _transformer_output(out)


def _transformer_output(sample):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


# --- transformers CLIP text encoder ----------------------------------------------------------------


def clip_layer_bc1s(layer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers ``CLIPEncoderLayer`` on (B, C, 1, S) with an additive causal mask."""
    attn = layer.self_attn
    y = layer_norm_channels(x, layer.layer_norm1)
    q, k, v = conv1x1(y, attn.q_proj), conv1x1(y, attn.k_proj), conv1x1(y, attn.v_proj)
    x = conv1x1(split_einsum(q, k, v, attn.num_heads, attn.scale, mask), attn.out_proj) + x
    y = layer_norm_channels(x, layer.layer_norm2)
    y = conv1x1(layer.mlp.activation_fn(conv1x1(y, layer.mlp.fc1)), layer.mlp.fc2)
    return y + x


def causal_mask(length: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(1, Sk, 1, Sq): 0 where key <= query, MASK_VALUE where the key lies in the query's future."""
    keys = torch.arange(length, device=device).view(1, length, 1, 1)
    queries = torch.arange(length, device=device).view(1, 1, 1, length)
    return torch.where(keys > queries, MASK_VALUE, 0.0).to(dtype)


class SplitEinsumCLIPEncoder(nn.Module):
    """Stands in for a transformers ``CLIPEncoder`` of a text model (causal self-attention, no padding mask)."""

    def __init__(self, encoder, where: str = "CLIPEncoder"):
        super().__init__()
        for i, layer in enumerate(encoder.layers):
            attn = layer.self_attn
            _require(attn.embed_dim % attn.num_heads == 0, f"{where}.layers.{i}", "a head count that does not divide the width")
        self.encoder = encoder
        self.where = where

    def forward(self, inputs_embeds, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        # transformers hands over the causal mask it built (or None with is_causal=True for SDPA);
        # the prompt-padding mask is never used by Stable Diffusion's text encoder call.
        x = to_bc1s(inputs_embeds)  # (B, D, 1, 77)
        mask = causal_mask(inputs_embeds.shape[1], inputs_embeds.dtype, inputs_embeds.device)
        for layer in self.encoder.layers:
            before = x
            x = clip_layer_bc1s(layer, x, mask)
            _fire_forward_hooks(layer, before, x)
        return BaseModelOutput(last_hidden_state=from_bc1s(x))


def _fire_forward_hooks(layer: nn.Module, before: torch.Tensor, after: torch.Tensor) -> None:
    """Call ``layer``'s forward hooks as if it had run, on (B, S, C) tensors: transformers records
    ``output_hidden_states`` (SDXL's penultimate states) by forward hooks on each ``CLIPEncoderLayer``,
    which the rewrite never calls. No hooks, no extra ops in the graph."""
    hooks = list(layer._forward_hooks.values())
    if hooks:
        args, out = (from_bc1s(before),), from_bc1s(after)
        for hook in hooks:
            hook(layer, args, out)


# --- the swap ----------------------------------------------------------------------------------------


def _replacement(name: str, module: nn.Module) -> nn.Module | None:
    kind = type(module).__name__
    if kind == "Transformer2DModel":
        return SplitEinsumTransformer2D(module, name)
    if kind == "Attention" and hasattr(module, "to_q") and hasattr(module, "residual_connection"):
        return SplitEinsumAttention(module, name)
    if kind == "CLIPEncoder":
        return SplitEinsumCLIPEncoder(module, name)
    return None


def _plan(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, attribute, original, replacement), outermost matches first, no match inside another."""
    swaps = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent.named_children():
            path = f"{prefix}.{attr}" if prefix else attr
            replacement = _replacement(path, child)
            if replacement is not None:
                swaps.append((parent, attr, child, replacement))
            else:
                visit(child, path)

    visit(model, "")
    return swaps


@contextlib.contextmanager
def attention_implementation(model: nn.Module, implementation: str) -> Iterator[dict]:
    """Within the block, ``model`` computes attention with ``implementation``; the stock modules are
    put back on exit (also on error). Yields a report: implementation and the modules rewritten per type."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    report: dict = {"implementation": implementation, "rewritten": {}}
    if implementation == "original":
        yield report
        return
    swaps = _plan(model)  # raises UnsupportedAttention before anything is changed
    for _, _, original, _ in swaps:
        kind = type(original).__name__
        report["rewritten"][kind] = report["rewritten"].get(kind, 0) + 1
    try:
        for parent, attr, _, replacement in swaps:
            setattr(parent, attr, replacement)
        yield report
    finally:
        for parent, attr, original, _ in swaps:
            setattr(parent, attr, original)
