"""Winograd convolution for OpenVINO's CPU plugin: 3x3 convolutions as transforms plus batched GEMMs.

Why: at f32 the CPU plugin's direct convolution (oneDNN brgconv) already runs near this machine's
GEMM peak, so the only way to make an fp32 U-Net faster is to do fewer multiplications. Winograd's
minimal filtering F(m x m, 3 x 3) computes an m x m output tile from an (m+2) x (m+2) input tile with
(m+2)^2 multiplications per channel pair instead of 9 m^2: 2.25x fewer for F(2), 4x fewer for F(4).
cuDNN and most mobile runtimes use it for fp32; oneDNN 3.x dropped its x86 implementation.

The rewrite, in OpenVINO ops, of ``y = conv3x3(x, w)`` (stride 1, dilation 1, padding 1), x of
static shape [N, C, H, W], w [K, C, 3, 3], a = m + 2, T = a * a, P = (H / m) * (W / m):

- input transform: one GroupConvolution (C groups, T fixed a x a kernels B^T (x) B^T, stride m)
  gives every tile's V = B^T d B: [N, C*T, H/m, W/m] -> [N, T, C, P];
- weights: U = G w G^T as two MatMuls on the constant, folded to a constant [T, K, C] when the model
  is compiled (the IR on disk keeps the 3x3 weights);
- T batched GEMMs U[t] @ V[n, t]: [N, T, K, P], where the multiplications are saved;
- output transform: A^T (x) A^T as a MatMul over T, then DepthToSpace puts each m x m tile in place.

The result differs from the direct convolution by rounding only (relative 2e-6 for F(2), 2e-5 for
F(4) on SD 1.5 layers), which is why it is applied for f32 inference only: under bf16 the
transforms' large coefficients cost accuracy (U-Net output 43.8 dB instead of 49.5 dB against f32)
and it is slower. Which layers get which tile is measured per layer shape when the model is
exported (see ``sdexport.export.targets.winograd_tuning``) and stored in the manifest; this module only
applies such a plan.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import numpy as np
import openvino as ov
import openvino.opset13 as ops

TILES = (2, 4)

# Lavin & Gray (2015), "Fast Algorithms for Convolutional Neural Networks": B^T, G, A^T for F(m, 3).
_MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m x m, 3 x 3), float64."""
    if m not in _MATRICES:
        raise ValueError(f"Winograd tile {m}: use one of {TILES}")
    return tuple(np.asarray(x, np.float64) for x in _MATRICES[m])


def _i64(values) -> ov.Node:
    return ops.constant(np.asarray(values, np.int64))


def winograd_conv3x3(x: ov.Output, weights: ov.Output, m: int, shape: tuple[int, int, int, int, int]) -> ov.Node:
    """The Winograd F(m x m, 3 x 3) equivalent of ``Convolution(x, weights)`` (stride 1, padding 1);
    ``shape`` is (N, C, K, H, W) with H and W multiples of m. Bias is not part of it (a separate Add)."""
    n, c, k, h, w = shape
    bt, g, at = matrices(m)
    a = m + 2
    t = a * a
    ph, pw = h // m, w // m
    p = ph * pw
    # input transform: tile (i, j) at stride m, kernel element (u, v) weighted by B^T[i, u] B^T[j, v]
    kernels = np.einsum("iu,jv->ijuv", bt, bt).reshape(t, 1, a, a)
    group_w = np.broadcast_to(kernels[None], (c, t, 1, a, a)).astype(np.float32)
    v = ops.group_convolution(x, ops.constant(np.ascontiguousarray(group_w)), [m, m], [1, 1], [a - m - 1] * 2, [1, 1])
    v = ops.reshape(v, _i64([n, c, t, p]), False)
    v = ops.transpose(v, _i64([0, 2, 1, 3]))  # [N, T, C, P]: P stays contiguous, a cheap transpose
    # weights: U = G w G^T -> [T, K, C] as graph ops on the constant, folded when the model is compiled.
    # Folded rather than computed in numpy here: numpy costs 3.1 s at every open of the SD 1.5 U-Net
    # (measured), folding only the first compile (open 12.5 s vs 2.8 s with direct convolutions), which
    # the compiled-model cache then skips (warm: 3.0 s vs 2.4 s). The price: a higher peak while folding.
    gw = ops.matmul(ops.constant(g.astype(np.float32)), weights, False, False)  # [K, C, a, 3]
    u = ops.matmul(gw, ops.constant(g.T.astype(np.float32)), False, False)  # [K, C, a, a]
    u = ops.transpose(ops.reshape(u, _i64([k, c, t]), False), _i64([2, 0, 1]))
    mm = ops.matmul(u, v, False, False)  # [N, T, K, P]
    mm = ops.reshape(mm, _i64([n, t, k * p]), False)
    out = np.einsum("iu,jv->ijuv", at, at).reshape(m * m, t).astype(np.float32)
    y = ops.matmul(ops.constant(out), mm, False, False)  # [N, m*m, K*P]
    y = ops.reshape(y, _i64([n, m * m * k, ph, pw]), False)
    return ops.depth_to_space(y, "blocks_first", m)  # channel (i*m + j)*K + k -> pixel (i, j) of its tile


def conv_shape(op: ov.Node) -> tuple[int, int, int, int, int] | None:
    """(N, C, K, H, W) of a Convolution the rewrite can take, else None: constant float32 3x3
    weights, stride 1, dilation 1, padding 1 on every side, static input shape."""
    if op.get_type_name() != "Convolution":
        return None
    source = op.input_value(1).get_node()
    if source.get_type_name() != "Constant" or op.input_value(1).get_element_type() != ov.Type.f32:
        return None
    if list(op.get_strides()) != [1, 1] or list(op.get_dilations()) != [1, 1]:
        return None
    if list(op.get_pads_begin()) != [1, 1] or list(op.get_pads_end()) != [1, 1]:
        return None
    weights = list(op.input_value(1).get_shape())
    if len(weights) != 4 or weights[2:] != [3, 3]:
        return None
    ps = op.input(0).get_partial_shape()
    if ps.rank.is_dynamic or len(ps) != 4 or not ps.is_static:
        return None
    n, c, h, w = (int(d) for d in ps.to_shape())
    return (n, c, int(weights[0]), h, w)


def eligible_convs(model: ov.Model) -> Iterator[tuple[ov.Node, tuple[int, int, int, int, int]]]:
    for op in model.get_ordered_ops():
        shape = conv_shape(op)
        if shape is not None:
            yield op, shape


def fits(shape: tuple[int, ...], m: int) -> bool:
    _, _, _, h, w = shape
    return h % m == 0 and w % m == 0


def apply_plan(model: ov.Model, tiles: Mapping[tuple[int, ...], int]) -> int:
    """Replace every eligible convolution whose (N, C, K, H, W) has a tile in ``tiles``; returns how many."""
    done = 0
    for op, shape in list(eligible_convs(model)):
        m = tiles.get(shape)
        if not m or not fits(shape, m):
            continue
        new = winograd_conv3x3(op.input_value(0), op.input_value(1), m, shape)
        for target in op.output(0).get_target_inputs():
            target.replace_source_output(new.output(0))
        done += 1
    if done:
        model.validate_nodes_and_infer_types()
    return done


def plan_tiles(entries: Iterable[Mapping]) -> dict[tuple[int, ...], int]:
    """The manifest's ``details["winograd"]["layers"]`` -> {(N, C, K, H, W): tile}; direct layers left out."""
    tiles = {}
    for entry in entries:
        m = int(entry.get("tile") or 0)
        if m in TILES:
            tiles[tuple(int(v) for v in entry["shape"])] = m
    return tiles
