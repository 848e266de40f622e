"""The denoising loop with the latents resident on the device (ONNX Runtime, I/O binding).

The numpy loop of :mod:`runtime.pipeline` copies the latents to the host and back around every U-Net
call, and runs the classifier-free-guidance combine and the scheduler update in numpy. On a GPU that
is a host round trip per step. Here the whole loop stays on the device:

* the U-Net reads its ``sample`` from, and writes ``out_sample`` to, fixed device buffers (OrtValues
  bound once), so CUDA graphs can replay it (ORT's ``enable_cuda_graph``);
* two tiny ONNX graphs, run by the same provider, do the rest: ``prepare`` scales the latents
  (``scale_model_input``), duplicates them for CFG and writes the U-Net's input and timestep;
  ``combine`` applies guidance and the scheduler step.

The scheduler step becomes device arithmetic through a **linear plan**. Every scheduler we ship
(without x0 clipping or thresholding) updates its state by linear combinations of the current
sample, the model output, fresh noise and tensors it kept from earlier steps (DPM-Solver's and
UniPC's model-output history, PNDM's ``ets``, Heun's first stage, ...). The coefficients depend on
the timesteps only, not on the data, so they can be computed on the host before the loop: the
numpy scheduler itself is stepped on *symbolic* tensors -- tiny float32 arrays whose values are
coefficients over the step's operands -- and whatever it returns or stores is read back as a row of
coefficients. No scheduler code is duplicated or changed; a self-check then runs the real scheduler
and the plan side by side on random data and refuses a plan that disagrees (a scheduler with a
non-linear step falls back to the numpy loop, with the reason).

Per step the host sends the step index (8 bytes) and, for the stochastic samplers, the noise it drew
with the run's RNG (so a seed gives the same image as the numpy loop); the latents come back once,
at the end. :class:`TransferLog` counts every copy, which is how the tests prove it.

The same code runs on ONNX Runtime's CPU provider (CI); the graphs are plain ONNX, built here
without the ``onnx`` package (a small protobuf writer below), so the runtime keeps its dependencies.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from runtime.numerics import check_finite

__all__ = [
    "PlanError",
    "DeviceLoopUnsupported",
    "LinearStep",
    "LinearPlan",
    "linear_plan",
    "nonlinear_reason",
    "TransferLog",
    "DeviceLoop",
    "prepare_graph",
    "combine_graph",
    "CUDA_KERNEL_OPS",
    "graph_capture_blockers",
    "node_placements",
    "symbolic_sizes",
]

F32 = np.float32


class PlanError(ValueError):
    """The scheduler's step cannot be written as a linear plan; the message says why."""


class DeviceLoopUnsupported(RuntimeError):
    """This run needs the numpy loop (the message says what the device loop lacks)."""


# =============================================================================================
# Linear plans: the scheduler step as coefficients over the step's operands
# =============================================================================================

# Operand order of every step: the guided model output, the step's noise, then the state slots
# (slot 0 is the current sample, the others what the scheduler keeps between steps).
MODEL_OUTPUT, NOISE, STATE = 0, 1, 2


# A symbolic tensor is a float32 array of shape (1, 1, 1, K): one sample of one channel and one pixel,
# whose K values are its coefficients on the K operands. The schedulers' arithmetic (float32 scalars
# times tensors, sums, differences) then computes exactly the coefficients of their step, and the
# tensors they keep between steps are found in their state by that shape.


def _unit(size: int, index: int) -> np.ndarray:
    v = np.zeros((1, 1, 1, size), F32)
    v[..., index] = 1.0
    return v


def _is_symbol(obj, size: int) -> bool:
    return isinstance(obj, np.ndarray) and obj.shape == (1, 1, 1, size) and obj.dtype.kind == "f"


def _coefficients(symbol: np.ndarray) -> np.ndarray:
    return np.asarray(symbol, np.float64).reshape(-1)


class _NoiseProbe:
    """Stands in for the RNG while planning: the step's noise is one more operand."""

    def __init__(self, symbol: np.ndarray):
        self.symbol, self.calls = symbol, 0

    def randn(self, shape):
        self.calls += 1
        if self.calls > 1:
            raise PlanError("the scheduler draws noise more than once in a step")
        if tuple(shape) != self.symbol.shape:
            raise PlanError(f"the scheduler draws noise of shape {tuple(shape)}, not the sample's")
        return self.symbol.copy()


def _find_syms(obj, size: int, found: dict[int, np.ndarray]) -> None:
    if _is_symbol(obj, size):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _find_syms(item, size, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _find_syms(item, size, found)


def _substitute(obj, mapping: dict[int, np.ndarray]):
    if isinstance(obj, np.ndarray):
        return mapping.get(id(obj), obj)
    if isinstance(obj, list):
        return [_substitute(item, mapping) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_substitute(item, mapping) for item in obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, mapping) for k, v in obj.items()}
    return obj


def _state_syms(sched, size: int) -> list[np.ndarray]:
    found: dict[int, np.ndarray] = {}
    for value in vars(sched).values():
        _find_syms(value, size, found)
    return list(found.values())


def _rebase(sched, mapping: dict[int, np.ndarray]) -> None:
    for name, value in list(vars(sched).items()):
        new = _substitute(value, mapping)
        if new is not value:
            setattr(sched, name, new)


def nonlinear_reason(sched) -> str | None:
    """Why this scheduler's step is not linear in the latents (None when it is)."""
    config = getattr(sched, "config", None)
    if getattr(config, "thresholding", False):
        return "dynamic thresholding of x0 is not linear"
    if getattr(config, "clip_sample", False):
        return "clip_sample clips x0, which is not linear"
    return None


@dataclasses.dataclass(frozen=True)
class LinearStep:
    """One loop iteration: the U-Net's timestep, the divisor of ``scale_model_input``, whether the
    step draws noise, and ``coeffs[j, k]``: new state slot j = sum_k coeffs[j, k] * operand k."""

    timestep: float
    divisor: float
    noise: bool
    coeffs: np.ndarray  # [slots out, 2 + slots in], float64


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    steps: tuple[LinearStep, ...]

    @property
    def slots(self) -> int:
        """State tensors kept on the device (1: the sample only)."""
        return max(s.coeffs.shape[0] for s in self.steps)

    @property
    def noise_draws(self) -> int:
        return sum(s.noise for s in self.steps)

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(timesteps [S], divisors [S], coefficients [S, R, 2 + R]) as the device graphs read them."""
        r = self.slots
        coeffs = np.zeros((len(self.steps), r, 2 + r), F32)
        for i, step in enumerate(self.steps):
            rows, cols = step.coeffs.shape
            coeffs[i, :rows, :cols] = step.coeffs
        timesteps = np.array([s.timestep for s in self.steps], F32)
        divisors = np.array([s.divisor for s in self.steps], F32)
        return timesteps, divisors, coeffs

    def emulate(self, x: np.ndarray, model: Callable[[int, np.ndarray], np.ndarray],
                noise: Callable[[int], np.ndarray]) -> np.ndarray:
        """The plan in numpy, as the device graphs compute it: ``model(i, scaled_sample)`` gives the
        (guided) model output of step i, ``noise(i)`` its noise."""
        _, divisors, table = self.tables()
        r = self.slots
        state = [np.asarray(x, F32)] + [np.zeros_like(x, F32) for _ in range(r - 1)]
        zero = np.zeros_like(x, F32)
        for i, step in enumerate(self.steps):
            m = np.asarray(model(i, state[0] / divisors[i]), F32)
            n = np.asarray(noise(i), F32) if step.noise else zero
            stack = np.stack([m, n, *state])
            state = list(np.sum(stack[None] * table[i].reshape(r, 2 + r, *(1,) * x.ndim), axis=1, dtype=F32))
        return state[0]


def _prune(steps: list[LinearStep]) -> list[LinearStep]:
    """Drop state slots that no later step reads (LCM's ``denoised``, a finished Heun stage ...)."""
    needed = [0]
    out: list[LinearStep] = []
    for step in reversed(steps):
        rows = step.coeffs[needed]
        used = sorted({0} | {k - STATE for k in np.flatnonzero(np.any(rows != 0, axis=0)) if k >= STATE})
        cols = [MODEL_OUTPUT, NOISE] + [STATE + s for s in used]
        out.append(dataclasses.replace(step, coeffs=rows[:, cols]))
        needed = used
    return out[::-1]


def linear_plan(sched, timesteps: Sequence, check: bool = True) -> LinearPlan:
    """The scheduler's steps over ``timesteps`` as a :class:`LinearPlan`.

    ``sched`` is left untouched (a copy is stepped): call this where the numpy loop would start, after
    ``set_timesteps`` (and ``set_begin_index`` for img2img). Raises :class:`PlanError` when the step is
    not linear; with ``check``, the plan is also compared with the real scheduler on random data.
    """
    reason = nonlinear_reason(sched)
    if reason:
        raise PlanError(reason)
    shadow = copy.deepcopy(sched)
    if _state_syms(shadow, STATE + 1):
        raise PlanError("the scheduler holds tensors from an earlier run; call set_timesteps first")
    slots = 1
    steps: list[LinearStep] = []
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for t in np.asarray(timesteps):
            k = STATE + slots
            x = _unit(k, STATE)
            scaled = shadow.scale_model_input(x, t)
            if not _is_symbol(scaled, k):
                raise PlanError("scale_model_input does not act linearly on the sample")
            scale = float(_coefficients(scaled)[STATE])
            others = np.delete(_coefficients(scaled), STATE)
            if scale == 0 or np.any(others != 0) or not np.isfinite(scale):
                raise PlanError("scale_model_input is not a scaling of the sample")
            probe = _NoiseProbe(_unit(k, NOISE))
            try:
                out = shadow.step(_unit(k, MODEL_OUTPUT), t, x, rng=probe)
            except PlanError:
                raise
            except Exception as e:  # a scheduler doing something a coefficient vector cannot do
                raise PlanError(f"the scheduler's step is not linear here ({type(e).__name__}: {e})") from None
            if not _is_symbol(out, k):
                raise PlanError("the scheduler's step does not return a linear combination of its inputs")
            live = [out] + [s for s in _state_syms(shadow, k) if s is not out]
            coeffs = np.stack([_coefficients(s) for s in live])
            if not np.all(np.isfinite(coeffs)):
                raise PlanError(f"the step at timestep {t} has non-finite coefficients")
            new_k = STATE + len(live)
            _rebase(shadow, {id(s): _unit(new_k, STATE + j) for j, s in enumerate(live)})
            divisor = float(F32(1.0 / scale))
            steps.append(LinearStep(float(t), divisor, probe.calls > 0, coeffs))
            slots = len(live)
    plan = LinearPlan(tuple(_prune(steps)))
    if check:
        _self_check(sched, timesteps, plan)
    return plan


class _RecordingRNG:
    def __init__(self, seed: int):
        self.gen = np.random.default_rng(seed)
        self.draws: list[np.ndarray] = []

    def randn(self, shape):
        value = self.gen.standard_normal(shape).astype(F32)
        self.draws.append(value)
        return value


def _self_check(sched, timesteps, plan: LinearPlan, shape=(2, 4, 3, 3), tolerance: float = 1e-4) -> None:
    """The real scheduler and the plan on the same random data must agree (up to rounding)."""
    real = copy.deepcopy(sched)
    gen = np.random.default_rng(1234)
    x0 = gen.standard_normal(shape).astype(F32) * F32(getattr(sched, "init_noise_sigma", 1.0))
    outputs = [gen.standard_normal(shape).astype(F32) for _ in range(len(timesteps))]
    rng = _RecordingRNG(99)
    x = x0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, t in enumerate(np.asarray(timesteps)):
            real.scale_model_input(x, t)
            x = np.asarray(real.step(outputs[i], t, x, rng=rng), F32)
    draws = iter(rng.draws)
    noise_at = {i: next(draws) for i, s in enumerate(plan.steps) if s.noise}
    got = plan.emulate(x0, lambda i, _: outputs[i], lambda i: noise_at[i])
    scale = max(1.0, float(np.max(np.abs(x))) if np.all(np.isfinite(x)) else 1.0)
    if not np.all(np.isfinite(got)) or not np.allclose(got, x, rtol=0, atol=tolerance * scale):
        diff = float(np.max(np.abs(got.astype(np.float64) - x))) if np.all(np.isfinite(got)) else float("nan")
        raise PlanError(f"{type(sched).__name__}: the linear plan disagrees with the scheduler (max diff {diff:.3g})")


# =============================================================================================
# ONNX graphs without the onnx package: a small protobuf writer
# =============================================================================================

_FLOAT, _INT64, _FLOAT16 = 1, 7, 10
_ONNX_TYPES = {np.dtype(np.float32): _FLOAT, np.dtype(np.int64): _INT64, np.dtype(np.float16): _FLOAT16}
OPSET = 17


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative numbers
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: ints as varints, str/bytes as length-delimited, floats as fixed32."""
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return _varint(number << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint((number << 3) | 5) + struct.pack("<f", value)
    data = value.encode() if isinstance(value, str) else bytes(value)
    return _varint((number << 3) | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    body = b"".join(_field(1, d) for d in array.shape)
    return body + _field(2, _ONNX_TYPES[array.dtype]) + _field(8, name) + _field(9, array.tobytes())


def _value_info(name: str, dtype, shape: Sequence[int | str]) -> bytes:
    dims = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in shape)
    tensor_type = _field(1, _ONNX_TYPES[np.dtype(dtype)]) + _field(2, dims)
    return _field(1, name) + _field(2, _field(1, tensor_type))


def _attribute(name: str, value) -> bytes:
    if isinstance(value, int):
        return _field(1, name) + _field(3, value) + _field(20, 2)  # INT
    if isinstance(value, (list, tuple)):
        return _field(1, name) + b"".join(_field(8, v) for v in value) + _field(20, 7)  # INTS
    raise TypeError(value)


class _Graph:
    """Builds one ONNX model: ``g.op("Add", a, b)`` returns the output name."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[bytes] = []
        self.inits: list[bytes] = []
        self.inputs: list[bytes] = []
        self.outputs: list[bytes] = []
        self._n = 0

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype, shape) -> None:
        self.outputs.append(_value_info(name, dtype, shape))

    def const(self, array: np.ndarray) -> str:
        self._n += 1
        name = f"c{self._n}"
        self.inits.append(_tensor(name, np.asarray(array)))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, **attrs) -> Any:
        names = [f"{op_type.lower()}{self._n + i + 1}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self._n += len(names)
        body = b"".join(_field(1, i) for i in inputs) + b"".join(_field(2, o) for o in names)
        body += _field(3, names[0]) + _field(4, op_type)
        body += b"".join(_field(5, _attribute(k, v)) for k, v in attrs.items())
        self.nodes.append(body)
        return names[0] if len(names) == 1 else names

    def serialize(self) -> bytes:
        graph = b"".join(_field(1, n) for n in self.nodes) + _field(2, self.name)
        graph += b"".join(_field(5, t) for t in self.inits)
        graph += b"".join(_field(11, v) for v in self.inputs) + b"".join(_field(12, v) for v in self.outputs)
        opset = _field(1, "") + _field(2, OPSET)
        return _field(1, 8) + _field(2, "sdexport.device_loop") + _field(7, graph) + _field(8, opset)


def prepare_graph(batch: int, latent_shape: Sequence[int], copies: int, sample_dtype, timestep_dtype,
                  extra_channels: int = 0) -> bytes:
    """x [B, C, h, w], step [1], timesteps [S], divisors [S] (, extra [N, E, h, w]) ->
    sample [N, C(+E), h, w] = concat(copies x (x / divisors[step])) (, extra), timestep [N]."""
    c, h, w = latent_shape
    n = batch * copies
    g = _Graph("prepare")
    x = g.input("x", F32, (batch, c, h, w))
    step = g.input("step", np.int64, (1,))
    timesteps = g.input("timesteps", F32, ("S",))
    divisors = g.input("divisors", F32, ("S",))
    y = g.op("Div", x, g.op("Gather", divisors, step, axis=0))
    if copies > 1:
        y = g.op("Concat", *([y] * copies), axis=0)
    if extra_channels:
        extra = g.input("extra", F32, (n, extra_channels, h, w))
        y = g.op("Concat", y, extra, axis=1)
    sample_type = _ONNX_TYPES[np.dtype(sample_dtype)]
    g.op("Cast", y, outputs=["sample"], to=sample_type)
    t = g.op("Expand", g.op("Gather", timesteps, step, axis=0), g.const(np.array([n], np.int64)))
    g.op("Cast", t, outputs=["timestep"], to=_ONNX_TYPES[np.dtype(timestep_dtype)])
    g.output("sample", sample_dtype, (n, c + extra_channels, h, w))
    g.output("timestep", timestep_dtype, (n,))
    return g.serialize()


def combine_graph(batch: int, latent_shape: Sequence[int], cfg: str, output_dtype, slots: int) -> bytes:
    """Guidance, then the scheduler step: new state slot j = sum_k coeffs[step, j, k] * operand k
    over the operands (guided model output, noise, state slots 0..R-1).

    cfg "batched": one U-Net output [2B] (unconditional half first); "sequential": two outputs [B];
    "off": one output [B]. Inputs noise, guidance [1], step [1], coeffs [S, R, 2 + R], s0..s{R-1};
    outputs o0..o{R-1}.
    """
    c, h, w = latent_shape
    shape = (batch, c, h, w)
    g = _Graph("combine")
    if cfg == "batched":
        raw = g.input("unet_out", output_dtype, (2 * batch, c, h, w))
        uncond, text = g.op("Split", g.op("Cast", raw, to=_FLOAT), outputs=2, axis=0)
    elif cfg == "sequential":
        uncond = g.op("Cast", g.input("unet_out_uncond", output_dtype, shape), to=_FLOAT)
        text = g.op("Cast", g.input("unet_out_text", output_dtype, shape), to=_FLOAT)
    elif cfg == "off":
        model = g.op("Cast", g.input("unet_out", output_dtype, shape), to=_FLOAT)
    else:
        raise ValueError(f"cfg {cfg!r}")
    noise = g.input("noise", F32, shape)
    guidance = g.input("guidance", F32, (1,))
    step = g.input("step", np.int64, (1,))
    table = g.input("coeffs", F32, ("S", slots, STATE + slots))
    state = [g.input(f"s{j}", F32, shape) for j in range(slots)]
    if cfg != "off":
        # uncond + g * (text - uncond): the numpy loop's expression, operation for operation
        model = g.op("Add", uncond, g.op("Mul", guidance, g.op("Sub", text, uncond)))
    axis0 = g.const(np.array([0], np.int64))
    operands = [g.op("Unsqueeze", v, axis0) for v in (model, noise, *state)]
    stack = g.op("Unsqueeze", g.op("Concat", *operands, axis=0), axis0)  # [1, K, B, C, h, w]
    coeffs = g.op("Reshape", g.op("Gather", table, step, axis=0),
                  g.const(np.array([slots, STATE + slots, 1, 1, 1, 1], np.int64)))
    summed = g.op("ReduceSum", g.op("Mul", stack, coeffs), g.const(np.array([1], np.int64)), keepdims=0)
    parts = [summed] if slots == 1 else g.op("Split", summed, outputs=slots, axis=0)
    for j, part in enumerate(parts):
        g.op("Squeeze", part, axis0, outputs=[f"o{j}"])
        g.output(f"o{j}", F32, shape)
    return g.serialize()


# =============================================================================================
# The loop on ONNX Runtime
# =============================================================================================


@dataclasses.dataclass
class TransferLog:
    """Every host<->device copy the loop makes, by what was copied (count and bytes)."""

    uploads: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    upload_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    downloads: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    download_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def upload(self, what: str, array: np.ndarray) -> None:
        self.uploads[what] += 1
        self.upload_bytes[what] += int(array.nbytes)

    def download(self, what: str, array: np.ndarray) -> None:
        self.downloads[what] += 1
        self.download_bytes[what] += int(array.nbytes)

    def clear(self) -> None:
        for counter in (self.uploads, self.upload_bytes, self.downloads, self.download_bytes):
            counter.clear()

    def to_json(self) -> dict:
        return {"uploads": dict(self.uploads), "upload_bytes": dict(self.upload_bytes),
                "downloads": dict(self.downloads), "download_bytes": dict(self.download_bytes)}


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}
_DEVICE_PROVIDERS = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def _provider_name(p) -> str:
    return p[0] if isinstance(p, tuple) else p


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


#: the op types prepare_graph/combine_graph may use: each has a CUDA kernel for float32/float16 data and
#: int64 indices (onnxruntime docs/OperatorKernels.md, CUDAExecutionProvider), so the step runs on the GPU
CUDA_KERNEL_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Concat", "Expand", "Gather", "Reshape", "ReduceSum",
                             "Split", "Squeeze", "Unsqueeze"})


def graph_capture_blockers(placements: Sequence[tuple[str, str, str]], target: str = "CUDAExecutionProvider") -> str | None:
    """Why ONNX Runtime will refuse to capture a graph on ``target``, from (node, op type, provider)
    triples, or None. Its rule (InferenceSession::Initialize): every node on ``target`` or on the CPU,
    and no Memcpy node -- CPU nodes are fine only as shape computations that never copy to the device."""
    memcpy = [name for name, op, _ in placements if op.startswith("Memcpy")]
    foreign = [f"{name} ({op}) on {ep}" for name, op, ep in placements
               if ep not in (target, "CPUExecutionProvider") and not op.startswith("Memcpy")]
    reasons = []
    if foreign:
        reasons.append(f"{len(foreign)} node(s) on other providers: {', '.join(foreign[:3])}")
    if memcpy:
        on_cpu = [f"{name} ({op})" for name, op, ep in placements if ep == "CPUExecutionProvider"]
        reasons.append(f"{len(memcpy)} host/device copies around {len(on_cpu)} CPU node(s)"
                       + (f" such as {', '.join(on_cpu[:3])}" if on_cpu else ""))
    return "; ".join(reasons) or None


def node_placements(model: str | bytes, providers: Sequence, feeds: Mapping[str, np.ndarray]) -> list[tuple[str, str, str]]:
    """(node, op type, provider) for every node ONNX Runtime ran, read from one profiled run (the
    session API does not expose the assignment; the profile does, Memcpy nodes included)."""
    import json
    import os

    from runtime.backends.onnxruntime import create_session

    session = create_session(model, providers, profiling=True)
    session.run(None, dict(feeds))
    path = session.end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        os.remove(path)
    seen: dict[str, tuple[str, str, str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            seen.setdefault(name, (name, args.get("op_name", "?"), args["provider"]))
    return list(seen.values())


def symbolic_sizes(inputs: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The values of the symbolic dimensions of ``inputs`` (ORT NodeArg metadata) for these shapes."""
    dims: dict[str, int] = {}
    for name, shape in shapes.items():
        if name in inputs:
            for dim, value in zip(inputs[name].shape, shape):
                if isinstance(dim, str):
                    dims[dim] = int(value)
    return dims


class DeviceLoop:
    """Runs the denoising loop of one U-Net with everything on the provider's device.

    >>> loop = DeviceLoop.open(manifest.component("unet"), root, SessionOptions(device="cuda"))
    >>> latents = loop.denoise(sched, timesteps, latents, embeddings, guidance_scale=7.5, rng=rng)

    ``cuda_graph``: capture the U-Net in a CUDA graph per input shape (CUDA provider only; a model
    ORT cannot capture falls back to plain runs, see :attr:`cuda_graph_status`).
    """

    def __init__(self, model_path: str | Path, providers: Sequence, *, cuda_graph: bool = True, threads: int = 0,
                 device_id: int = 0, precision: str | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.model_path = str(model_path)
        self.precision = precision  # named when the U-Net's output is not finite
        names = [_provider_name(p) for p in providers] or ["CPUExecutionProvider"]
        if names[0] not in _DEVICE_PROVIDERS:
            raise DeviceLoopUnsupported(f"the device loop runs on the CUDA or CPU provider, not {names[0]}")
        self.device = _DEVICE_PROVIDERS[names[0]]
        self.device_id = device_id
        self.threads = threads
        self.transfers = TransferLog()
        self.cuda_graph_status = "off"
        self._want_graph = cuda_graph and self.device == "cuda"
        self._plain_unet = None  # a U-Net session without a graph, for shapes a graph cannot take
        # "session": the U-Net session replays graphs; "static": one graph session per shape with the
        # sizes fixed; "off": plain runs
        self._graph_mode = "off"
        self.unet = self._open_unet(self._want_graph)
        self._inputs = {i.name: i for i in self.unet.get_inputs()}
        self._outputs = [o.name for o in self.unet.get_outputs()]
        self._small: dict[tuple, Any] = {}
        self._unet_buffers: dict[tuple, dict] = {}
        self._plans: dict[tuple, LinearPlan] = {}
        self._graph_ids = 0

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def open(cls, component, root: str | Path, options=None, *, cuda_graph: bool | None = None) -> "DeviceLoop":
        """From a manifest component and the pipeline's SessionOptions (provider choice as the
        ONNX Runtime backend makes it)."""
        from runtime.backends.base import SessionOptions
        from runtime.backends.onnxruntime import resolve_providers

        if component.backend != "onnxruntime":
            raise DeviceLoopUnsupported(f"{component.name} runs on {component.backend}, not ONNX Runtime")
        options = options if isinstance(options, SessionOptions) else SessionOptions.from_mapping(options or {})
        if cuda_graph is None:
            cuda_graph = str(options.extra.get("cuda_graph", "on")).lower() not in ("off", "0", "false")
        providers = resolve_providers(options)
        device_id = int(options.extra.get("device_id", 0))
        return cls(Path(root) / component.main_file.path, providers, cuda_graph=cuda_graph,
                   threads=options.threads, device_id=device_id, precision=component.precision)

    def _session(self, model: str | bytes, cuda_graph: bool = False):
        from runtime.backends.onnxruntime import create_session

        providers = ["CPUExecutionProvider"] if self.device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return create_session(model, providers, threads=self.threads, device_id=self.device_id, cuda_graph=cuda_graph)

    def _open_unet(self, cuda_graph: bool):
        if cuda_graph:
            try:
                session = self._session(self.model_path, cuda_graph=True)
                self.cuda_graph_status, self._graph_mode = "on", "session"
                return session
            except Exception as e:  # e.g. nodes ORT placed on the CPU: a CUDA graph cannot hold them
                self.cuda_graph_status = f"off: ONNX Runtime refused CUDA graph capture ({_first_line(e)})"
                self._graph_mode = "static"
        self._plain_unet = self._session(self.model_path)
        return self._plain_unet

    def _plain(self):
        if self._plain_unet is None:
            self._plain_unet = self._session(self.model_path)
        return self._plain_unet

    def _static_graph_unet(self, dims: Mapping[str, int]):
        """The U-Net with its symbolic dimensions fixed to this run's sizes, for a CUDA graph, or None.

        With symbolic sizes the exported graph computes shapes at run time (Shape -> Gather -> Cast ->
        Sqrt for the attention scale ...): ORT runs those on the CPU and copies between host and
        device, which a CUDA graph cannot hold. A graph is captured per shape anyway, and with the sizes
        fixed ORT's constant folding removes those nodes, so the whole graph can stay on CUDA.
        """
        from runtime.backends.onnxruntime import create_session

        providers = ["CPUExecutionProvider"] if self.device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            session = create_session(self.model_path, providers, threads=self.threads, device_id=self.device_id,
                                     cuda_graph=True, fixed_sizes=dims)
        except Exception as e:
            self.cuda_graph_status = f"off: ONNX Runtime refused CUDA graph capture, also with fixed sizes ({_first_line(e)})"
            self._graph_mode = "off"
            return None
        fixed = ", ".join(f"{k}={v}" for k, v in dims.items())
        self.cuda_graph_status = f"on (sizes fixed: {fixed})" if fixed else "on"
        return session

    def _session_for(self, shapes: Mapping[str, Sequence[int]]):
        """(session, whether it replays a CUDA graph) for U-Net inputs of these shapes."""
        if self._graph_mode == "session":
            return self.unet, True
        if self._graph_mode == "static":
            session = self._static_graph_unet(symbolic_sizes(self._inputs, shapes))
            if session is not None:
                return session, True
        return self._plain(), False

    def _small_session(self, key: tuple, model: bytes):
        if key not in self._small:
            self._small[key] = self._session(model)
        return self._small[key]

    # -- device memory --------------------------------------------------------------------------

    def _empty(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)

    def _upload(self, what: str, array: np.ndarray, into=None):
        """Host -> device, counted. ``into`` updates a bound buffer in place (its address stays)."""
        array = np.ascontiguousarray(array)
        self.transfers.upload(what, array)
        if into is not None:
            into.update_inplace(array)
            return into
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

    def _download(self, what: str, value) -> np.ndarray:
        array = value.numpy()
        self.transfers.download(what, array)
        return array

    # -- the loop -------------------------------------------------------------------------------

    def plan(self, sched, timesteps) -> LinearPlan:
        """:func:`linear_plan`, cached: it depends on the scheduler's config and timesteps only."""
        key = (type(sched).__name__, repr(getattr(sched, "config", None)), tuple(np.asarray(timesteps).tolist()),
               getattr(sched, "begin_index", None))
        if key not in self._plans:
            if len(self._plans) > 16:
                self._plans.clear()
            self._plans[key] = linear_plan(sched, timesteps)
        return self._plans[key]

    def input_type(self, name: str):
        return _ORT_TYPES[self._inputs[name].type]

    def denoise(self, sched, timesteps: Sequence, latents: np.ndarray, embeddings: np.ndarray, *,
                guidance_scale: float, rng, cfg: str = "batched", extra: np.ndarray | None = None,
                constants: Mapping[str, np.ndarray] | None = None, plan: LinearPlan | None = None,
                callback: Callable[[int, float, np.ndarray], None] | None = None,
                added: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The numpy loop's result, computed on the device.

        ``latents`` [B, C, h, w] are the initial latents (already noised / scaled by
        ``init_noise_sigma``); ``embeddings`` [N, 77, D] the text embeddings (unconditional first
        under CFG, as the pipeline concatenates them); ``cfg``: "batched" (one U-Net call on 2B),
        "sequential" (two calls on B) or "off"; ``extra`` [N, E, h, w]: channels appended to the
        U-Net input (the mask and masked-image latents of 9-channel inpainting U-Nets);
        ``constants``: other U-Net inputs that stay the same every step; ``added``: U-Net inputs with one
        row per embedding row (SDXL's ``text_embeds`` and ``time_ids``), bound once per generation like
        the embeddings and split with them under sequential CFG. ``rng`` draws the noise of
        the stochastic samplers, in the numpy loop's order. Returns the final latents (one download).
        """
        if len(timesteps) == 0:
            return np.asarray(latents, F32)
        if plan is None:
            plan = self.plan(sched, timesteps)
        if len(plan.steps) != len(timesteps):
            raise ValueError(f"plan has {len(plan.steps)} steps for {len(timesteps)} timesteps")
        latents = np.ascontiguousarray(latents, F32)
        batch, shape = latents.shape[0], tuple(latents.shape[1:])
        copies = 2 if cfg == "batched" else 1
        n = batch * copies
        if cfg not in ("batched", "sequential", "off"):
            raise ValueError(f"cfg {cfg!r}: use batched, sequential or off")
        expected_emb = 2 * batch if cfg != "off" else batch
        if embeddings.shape[0] != expected_emb:
            raise ValueError(f"embeddings have batch {embeddings.shape[0]}, expected {expected_emb} for cfg {cfg}")
        for name, value in (added or {}).items():
            if value.shape[0] != expected_emb:
                raise ValueError(f"{name} has batch {value.shape[0]}, expected {expected_emb} (one row per embedding)")
        extra_channels = 0 if extra is None else int(extra.shape[1])
        sample_dtype, t_dtype = self.input_type("sample"), self.input_type("timestep")
        out_dtype = _ORT_TYPES[self.unet.get_outputs()[0].type]
        slots = plan.slots

        # U-Net buffers: fixed per shape, so a captured CUDA graph can replay them run after run.
        unet = self._unet_io(n, batch, shape, extra_channels, embeddings, cfg, sample_dtype, t_dtype, out_dtype,
                             constants or {}, added or {})
        # Scheduler state, double-buffered: a graph cannot read and write the same buffer.
        sets = [[self._empty((batch, *shape), F32) for _ in range(slots)] for _ in range(2)]
        self._upload("latents", latents, into=sets[0][0])
        for state in (sets[0][1:], sets[1]):
            for value in state:
                self._upload("state init", np.zeros((batch, *shape), F32), into=value)
        noise = self._upload("noise init", np.zeros((batch, *shape), F32), into=self._empty((batch, *shape), F32))
        step = self._upload("step", np.zeros((1,), np.int64), into=self._empty((1,), np.int64))
        timesteps_table, divisors, coeffs = plan.tables()
        tables = {name: self._upload("plan", value) for name, value in
                  (("timesteps", timesteps_table), ("divisors", divisors), ("coeffs", coeffs))}
        guidance = self._upload("plan", np.array([guidance_scale], F32))
        extra_value = self._upload("extra", np.ascontiguousarray(extra, F32)) if extra is not None else None

        prepare = self._small_session(
            ("prepare", batch, shape, copies, np.dtype(sample_dtype).str, np.dtype(t_dtype).str, extra_channels),
            prepare_graph(batch, shape, copies, sample_dtype, t_dtype, extra_channels))
        combine = self._small_session(
            ("combine", batch, shape, cfg, np.dtype(out_dtype).str, slots),
            combine_graph(batch, shape, cfg, out_dtype, slots))

        prepare_bindings, combine_bindings = [], []
        for parity in (0, 1):
            src, dst = sets[parity], sets[1 - parity]
            b = prepare.io_binding()
            b.bind_ortvalue_input("x", src[0])
            b.bind_ortvalue_input("step", step)
            b.bind_ortvalue_input("timesteps", tables["timesteps"])
            b.bind_ortvalue_input("divisors", tables["divisors"])
            if extra_value is not None:
                b.bind_ortvalue_input("extra", extra_value)
            b.bind_ortvalue_output("sample", unet["sample"])
            b.bind_ortvalue_output("timestep", unet["timestep"])
            prepare_bindings.append(b)
            b = combine.io_binding()
            for name, value in unet["outputs"].items():
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_input("noise", noise)
            b.bind_ortvalue_input("guidance", guidance)
            b.bind_ortvalue_input("step", step)
            b.bind_ortvalue_input("coeffs", tables["coeffs"])
            for j in range(slots):
                b.bind_ortvalue_input(f"s{j}", src[j])
                b.bind_ortvalue_output(f"o{j}", dst[j])
            combine_bindings.append(b)

        noise_shape = (batch, *shape)
        for i, t in enumerate(np.asarray(timesteps)):
            parity = i % 2
            self._upload("step", np.array([i], np.int64), into=step)
            prepare.run_with_iobinding(prepare_bindings[parity])
            self._run_unet(unet)
            if plan.steps[i].noise:
                self._upload("noise", rng.randn(noise_shape).astype(F32, copy=False), into=noise)
            combine.run_with_iobinding(combine_bindings[parity])
            if callback is not None:
                callback(i, float(t), self._download("latents (callback)", sets[1 - parity][0]))
        final = sets[len(plan.steps) % 2][0]
        result = self._download("latents", final).astype(F32, copy=False)
        check_finite("unet", result, self.precision)
        return result

    def _unet_io(self, n, batch, shape, extra_channels, embeddings, cfg, sample_dtype, t_dtype, out_dtype,
                 constants, added) -> dict:
        """The U-Net's bound buffers and bindings for this shape (created once, then reused)."""
        c, h, w = shape
        emb_dtype = self.input_type("encoder_hidden_states")
        key = (n, batch, shape, extra_channels, tuple(embeddings.shape), cfg, tuple(sorted(constants)),
               tuple((name, value.shape) for name, value in sorted(added.items())))
        io = self._unet_buffers.get(key)
        if io is None:
            io = {"sample": self._empty((n, c + extra_channels, h, w), sample_dtype),
                  "timestep": self._empty((n,), t_dtype)}
            halves = ("uncond", "text") if cfg == "sequential" else (None,)
            emb_rows = batch if cfg == "sequential" else embeddings.shape[0]
            io["embeddings"] = {half: self._empty((emb_rows, *embeddings.shape[1:]), emb_dtype) for half in halves}
            io["added"] = {half: {name: self._empty((emb_rows, *value.shape[1:]), self.input_type(name))
                                  for name, value in added.items()} for half in halves}
            out_rows = batch if cfg == "sequential" else n
            out_shape = (out_rows, self._out_channels(c), h, w)
            io["outputs"] = {("unet_out" if half is None else f"unet_out_{half}"): self._empty(out_shape, out_dtype)
                             for half in halves}
            io["constants"] = {name: self._empty(value.shape, self.input_type(name)) for name, value in constants.items()}
            shapes = {"sample": (n, c + extra_channels, h, w), "timestep": (n,),
                      "encoder_hidden_states": (emb_rows, *embeddings.shape[1:]),
                      **{name: value.shape for name, value in constants.items()},
                      **{name: (emb_rows, *value.shape[1:]) for name, value in added.items()}}
            self._bind_unet(io, *self._session_for(shapes))
            self._unet_buffers[key] = io
        # the text embeddings change per prompt: written into the bound buffers, addresses kept
        if cfg == "sequential":
            self._upload("embeddings", embeddings[:batch].astype(self.input_type("encoder_hidden_states")), into=io["embeddings"]["uncond"])
            self._upload("embeddings", embeddings[batch:].astype(self.input_type("encoder_hidden_states")), into=io["embeddings"]["text"])
        else:
            self._upload("embeddings", embeddings.astype(self.input_type("encoder_hidden_states")), into=io["embeddings"][None])
        for name, value in constants.items():
            self._upload(name, np.asarray(value).astype(self.input_type(name)), into=io["constants"][name])
        for name, value in added.items():  # split as the embeddings are (unconditional rows first)
            parts = {"uncond": value[:batch], "text": value[batch:]} if cfg == "sequential" else {None: value}
            for half, rows in parts.items():
                self._upload(name, np.asarray(rows).astype(self.input_type(name)), into=io["added"][half][name])
        return io

    def _out_channels(self, latent_channels: int) -> int:
        dims = self.unet.get_outputs()[0].shape
        return dims[1] if isinstance(dims[1], int) else latent_channels

    def _bind_unet(self, io: dict, session, graph: bool) -> None:
        io["session"], io["graph"], runs = session, graph, []
        for half in io["embeddings"]:
            b = session.io_binding()
            b.bind_ortvalue_input("sample", io["sample"])
            b.bind_ortvalue_input("timestep", io["timestep"])
            b.bind_ortvalue_input("encoder_hidden_states", io["embeddings"][half])
            for name, value in {**io["constants"], **io["added"][half]}.items():
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output(self._outputs[0], io["outputs"]["unet_out" if half is None else f"unet_out_{half}"])
            runs.append((b, self._run_options() if graph else None))
        io["runs"] = runs

    def _run_unet(self, io: dict) -> None:
        """The U-Net call(s) of one step; a CUDA graph that fails to capture or replay is dropped for
        plain runs (same buffers), with the reason in :attr:`cuda_graph_status`: never a failed generation."""
        try:
            for binding, run_options in io["runs"]:
                io["session"].run_with_iobinding(binding, run_options)
        except Exception as e:
            if not io["graph"]:
                raise
            self.cuda_graph_status = f"off: CUDA graph capture failed at run time ({_first_line(e)})"
            self._graph_mode = "off"
            self._bind_unet(io, self._plain(), False)
            self._run_unet(io)

    def _run_options(self):
        options = self._ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(self._graph_ids))
        self._graph_ids += 1
        return options

    def stats(self) -> dict:
        return {"device": self.device, "cuda_graph": self.cuda_graph_status, "transfers": self.transfers.to_json()}
