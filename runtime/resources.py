"""What a request needs of this machine, checked before any model runs.

A generate call that cannot fit fails late and badly: 4096x4096 ran for minutes inside the first
U-Net call, a billion steps ended in MemoryError, a hundred thousand threads thrashed for minutes.
This module refuses such requests up front with one line naming the need and the limit.

The memory estimate is deliberately a lower bound, so that it only refuses what certainly cannot
fit (SD 1.5 at 1024x1024 needs about 2 GB by it and runs on a 24 GB machine):

* one attention-score matrix of the U-Net at the full latent resolution, one head, float32:
  ``N * (h*w)^2 * 4`` bytes, with ``N`` the U-Net batch (doubled under classifier-free guidance)
  and ``h, w`` the latent size (pixels / ``vae_scale_factor``). ONNX Runtime and OpenVINO on the CPU
  materialise this matrix; real models hold several heads and more layers, so the real peak is higher;
* the latents and the noise, a few copies of ``N * channels * h * w`` float32 values;
* the scheduler's per-step arrays (timesteps, sigmas, multistep history): 8 float64 per step.

Model weights are not counted: a loaded session's are already out of MemAvailable, the others are
read from disk when opened. Steps are also capped at MAX_STEPS whatever the memory: no sampler gains
anything from more, and each step is one U-Net call.
"""

from __future__ import annotations

import os

MAX_STEPS = 100_000
_STEP_ARRAYS = 8  # float64 arrays of one value per step the schedulers keep
_LATENT_COPIES = 8  # latents, noise, model input, CFG halves, scheduler state


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def bounded_threads(threads: int) -> int:
    """A thread count clamped to the usable CPUs: more only oversubscribe (100000 thrashed for minutes)."""
    return max(1, min(int(threads), usable_cpus()))


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, narrowed by an address-space limit; None if unknown."""
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    address_space = _address_space_left()
    if address_space is not None:
        limits.append(address_space)
    return min(limits) if limits else None


def _address_space_left() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def request_bytes(height: int, width: int, batch: int, cfg: bool, steps: int, vae_scale_factor: int,
                  latent_channels: int) -> int:
    """The lower-bound estimate of the module docstring, in bytes."""
    cells = (height // vae_scale_factor) * (width // vae_scale_factor)
    unet_batch = batch * (2 if cfg else 1)
    attention = unet_batch * cells * cells * 4
    latents = _LATENT_COPIES * unet_batch * latent_channels * cells * 4
    return attention + latents + _STEP_ARRAYS * 8 * steps


def check_request(info, height: int, width: int, batch: int, steps: int, cfg: bool, error: type = ValueError) -> None:
    """Raise ``error`` (one line) when a request exceeds MAX_STEPS or this machine's memory."""
    if steps > MAX_STEPS:
        raise error(f"steps {steps}: more than {MAX_STEPS:,} is refused (no sampler needs them; each is one U-Net call)")
    need = request_bytes(height, width, batch, cfg, steps, info.vae_scale_factor, info.latent_channels)
    have = available_memory()
    if have is not None and need > have:
        raise error(
            f"{width}x{height}, batch {batch}{' with guidance' if cfg else ''}, {steps} steps needs at least "
            f"{need / 2**30:.1f} GiB of memory, more than the {have / 2**30:.1f} GiB available; "
            "use a smaller size, batch or step count"
        )
