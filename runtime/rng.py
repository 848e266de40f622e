"""Seeded Gaussian noise for the denoising loop.

Two generators share one small interface, ``randn(shape) -> float32 array``:

* ``numpy``: numpy's PCG64 Generator; fast, the default.
* ``torch``: ``torch.Generator().manual_seed(seed)`` followed by ``torch.randn(shape)`` on an
  x86-64 CPU, reproduced bit for bit, so that a seed gives the same image as diffusers.

How torch draws normals on the CPU (ATen ``normal_kernel``), which the torch mode follows:

* The engine is a 32-bit Mersenne Twister seeded with ``init_genrand(seed & 0xffffffff)``;
  numpy's ``MT19937`` with legacy seeding yields the same 32-bit stream.
* float32 tensors of 16 or more elements: one 24-bit uniform per element, then Box-Muller over
  blocks of 16 (``u[j]`` pairs with ``u[j + 8]``) with AVX2 code: Cephes polynomials for log and
  sin/cos (``avx_mathfun.h``) evaluated in float32, with the multiply-adds that GCC contracts into
  FMA instructions. A size that is not a multiple of 16 redraws the last 16 outputs from 16 fresh
  uniforms.
* Smaller tensors: one double-precision Box-Muller per element from 53-bit uniforms; the second
  value of each pair is cached in the generator and returned by the next small draw.

torch builds without AVX2 (aarch64, Apple Silicon) use libm's logf/sinf/cosf instead; their
normals differ in the last bits from the ones reproduced here.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["NumpyRNG", "TorchCompatRNG", "make_rng", "check_seed", "RNG_KINDS"]

RNG_KINDS = ("numpy", "torch")

_F32 = np.float32


class NumpyRNG:
    """numpy's default bit generator; not comparable with torch, but the fastest choice."""

    kind = "numpy"

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._gen = np.random.default_rng(self.seed)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        return self._gen.standard_normal(tuple(int(s) for s in shape), dtype=np.float32)


# --- float32 vector math as torch's AVX2 kernel computes it -------------------------------------


def _mul(a, b):
    return np.multiply(a, b, dtype=_F32)


def _fma(a, b, c):
    """Fused multiply-add rounded once to float32 (a float32 product is exact in float64)."""
    return (np.multiply(a, b, dtype=np.float64) + np.asarray(c, np.float64)).astype(_F32)


_LOG_P = tuple(_F32(p) for p in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
))
_LOG_Q1, _LOG_Q2 = _F32(-2.12194440e-4), _F32(0.693359375)
_SQRT_HALF = _F32(0.707106781186547524)
_FOUR_OVER_PI = _F32(1.27323954473516)
_DP = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))
_COS_P = (_F32(2.443315711809948e-5), _F32(-1.388731625493765e-3), _F32(4.166664568298827e-2))
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))


def _log_cephes(x: np.ndarray) -> np.ndarray:
    """Natural log of positive normal float32 values, Cephes ``logf`` as vectorised in ATen."""
    bits = x.view(np.int32)
    exponent = ((bits >> 23) - 0x7F).astype(_F32) + _F32(1)
    mantissa = ((bits & ~0x7F800000) | 0x3F000000).view(_F32)  # in [0.5, 1)
    small = mantissa < _SQRT_HALF  # use 2m - 1 and exponent - 1 to stay near 1
    x = (mantissa - _F32(1)) + np.where(small, mantissa, _F32(0))
    exponent = exponent - small.astype(_F32)
    z = _mul(x, x)
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)
    y = _fma(_mul(y, x), z, _mul(exponent, _LOG_Q1))
    y = y - _mul(z, _F32(0.5))
    return _fma(exponent, _LOG_Q2, x + y)


def _sincos_cephes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of non-negative float32 values, Cephes ``sincosf`` as vectorised in ATen."""
    octant = (_mul(x, _FOUR_OVER_PI).astype(np.int32) + 1) & ~1
    y = octant.astype(_F32)
    for dp in _DP:  # extended-precision reduction: x - y * pi/4 in three parts
        x = _fma(y, dp, x)
    sin_negative = (octant & 4) != 0
    cos_negative = ((octant - 2) & 4) == 0
    use_sin_poly_for_sin = (octant & 2) == 0
    z = _mul(x, x)
    cos_poly = _fma(_fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2])
    cos_poly = _fma(_mul(cos_poly, z), z, _mul(z, _F32(-0.5))) + _F32(1)
    sin_poly = _fma(_fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2])
    sin_poly = _fma(_mul(sin_poly, z), x, x)
    sin = np.where(use_sin_poly_for_sin, sin_poly, cos_poly)
    cos = np.where(use_sin_poly_for_sin, cos_poly, sin_poly)
    return np.where(sin_negative, -sin, sin), np.where(cos_negative, -cos, cos)


class TorchCompatRNG:
    """``torch.Generator().manual_seed(seed)`` + ``torch.randn(shape)`` (float32, x86-64 CPU), in numpy."""

    kind = "torch"

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._mt = np.random.MT19937()
        # torch's mt19937 keeps only the low 32 bits of the seed.
        self._mt._legacy_seeding(self.seed & 0xFFFFFFFF)
        self._cached_normal: float | None = None

    def _raw32(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def _uniform24(self, n: int) -> np.ndarray:
        # (x & (2**24 - 1)) * 2**-24: exact in float32.
        return (self._raw32(n) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    @staticmethod
    def _box_muller_16(u: np.ndarray) -> np.ndarray:
        """Uniforms in blocks of 16, shape [n, 16] -> normals of the same shape."""
        u1 = _F32(1) - u[:, :8]  # [0, 1) -> (0, 1] for the log
        radius = np.sqrt(_mul(_F32(-2), _log_cephes(np.ascontiguousarray(u1))))
        sin, cos = _sincos_cephes(_mul(_F32(2 * math.pi), u[:, 8:]))
        return np.concatenate([_mul(radius, cos), _mul(radius, sin)], axis=1)

    def _normal_fill(self, n: int) -> np.ndarray:
        out = self._uniform24(n)
        full = n // 16
        out[: full * 16] = self._box_muller_16(out[: full * 16].reshape(full, 16)).ravel()
        if n % 16:
            out[n - 16 :] = self._box_muller_16(self._uniform24(16).reshape(1, 16)).ravel()
        return out

    def _uniform53(self) -> float:
        hi, lo = (int(v) for v in self._raw32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    def _normal_double(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._uniform53()
        u2 = self._uniform53()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        if n >= 16:
            return self._normal_fill(n).reshape(shape)
        return np.array([self._normal_double() for _ in range(n)], dtype=_F32).reshape(shape)


def check_seed(seed: int, kind: str = "numpy") -> int:
    """Seeds are integers from 0; torch's generator takes 64 bits and would wrap a larger one silently
    (2**64 giving seed 0's image), so that is refused rather than reproduced."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed {seed!r}: expected an integer")
    if seed < 0:
        raise ValueError(f"seed {seed}: must be 0 or more")
    if kind == "torch" and seed >= 2**64:
        raise ValueError(f"seed {seed}: --rng torch takes seeds below 2**64")
    return int(seed)


def make_rng(seed: int, kind: str = "numpy"):
    """A seeded noise source: ``kind`` is "numpy" (default) or "torch" (torch.randn-compatible)."""
    seed = check_seed(seed, kind)
    if kind == "numpy":
        return NumpyRNG(seed)
    if kind == "torch":
        return TorchCompatRNG(seed)
    raise ValueError(f"unknown rng kind {kind!r}: expected one of {', '.join(RNG_KINDS)}")
