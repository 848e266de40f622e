"""How far diffusers' own fp16 pipeline drifts from its fp32 one on random weights (issue 17, item 5).

On the H200 our fp16 image was 13.0 dB from diffusers fp16's, and our fp32 numpy loop's image too,
while on a CPU our fp32 export is 90 dB from diffusers fp32. This measures, on a CPU, PyTorch fp16 against
PyTorch fp32 for the same random-weight pipeline, prompt and seed:

* one call of each component (text encoder, U-Net, VAE decoder) on the same inputs: the rounding error
  of a single fp16 pass;
* the latents after every step of the whole loop, and the final image: how the loop amplifies it;
* a control in fp32: the same loop started from the initial noise rounded to fp16, which separates the
  loop's sensitivity from fp16 arithmetic.

    python benchmarks/bench_fp16_drift.py --model tiny --size 64 --steps 50
    python benchmarks/bench_fp16_drift.py --model sd15 --size 128 --steps 20 --seeds 42
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine_info, markdown_table, prepare_model, write_results  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
GUIDANCE = 7.5


def _psnr(a, b, peak=None) -> float | None:
    from runtime.metrics import finite, psnr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return finite(psnr(a, b, peak=peak)) if peak else finite(psnr(a, b))


def _pipes(src: Path):
    import diffusers
    import torch

    pipes = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src), dtype=dtype, safety_checker=None,
                                                                 requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


def component_drift(pipes: dict, size: int) -> dict:
    """PSNR (dB) of each fp16 component's output against fp32 on identical inputs."""
    import torch

    p32, p16 = pipes["fp32"], pipes["fp16"]
    gen = torch.Generator().manual_seed(0)
    ids = p32.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latent = size // 8
    sample = torch.randn((2, 4, latent, latent), generator=gen)
    emb = torch.randn((2, 77, p32.text_encoder.config.hidden_size), generator=gen)
    z = torch.randn((1, 4, latent, latent), generator=gen) * 4
    t = torch.tensor([500.0, 500.0])
    out = {}
    with torch.inference_mode():
        pairs = {
            "text_encoder": [m.text_encoder(ids)[0] for m in (p32, p16)],
            "unet": [m.unet(sample.to(m.unet.dtype), t, emb.to(m.unet.dtype)).sample for m in (p32, p16)],
            "vae_decoder": [m.vae.decode(z.to(m.vae.dtype) / m.vae.config.scaling_factor).sample for m in (p32, p16)],
        }
    for name, (a, b) in pairs.items():
        a, b = a.float().numpy(), b.float().numpy()
        out[name] = {"psnr_db": _psnr(a, b), "max_abs": float(np.abs(a).max()),
                     "rel_err": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)), "finite_fp16": bool(np.isfinite(b).all())}
    return out


def loop_drift(pipes: dict, size: int, steps: int, seed: int) -> dict:
    """The whole pipeline: per-step latent PSNR fp16 vs fp32, final image PSNR, and the fp32 control."""
    import torch

    def run(pipe, latents=None):
        seen = []

        def on_step(p, i, t, kwargs):
            seen.append(kwargs["latents"].float().numpy().copy())
            return kwargs

        with torch.inference_mode():
            image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                         generator=torch.Generator().manual_seed(seed), latents=latents,
                         callback_on_step_end=on_step).images[0]
        return np.asarray(image), seen

    start = time.perf_counter()
    img32, lat32 = run(pipes["fp32"])
    t32 = time.perf_counter() - start
    start = time.perf_counter()
    img16, lat16 = run(pipes["fp16"])
    t16 = time.perf_counter() - start
    # the fp16 pipeline's initial noise is drawn in fp16: the same draw, rounded, given to the fp32 pipeline
    latent = size // 8
    noise = torch.randn((1, 4, latent, latent), generator=torch.Generator().manual_seed(seed), dtype=torch.float16)
    img_ctl, lat_ctl = run(pipes["fp32"], noise.float())
    per_step = [_psnr(a, b) for a, b in zip(lat32, lat16)]
    control_steps = [_psnr(a, b) for a, b in zip(lat32, lat_ctl)]
    return {
        "seed": seed,
        "image_psnr_db": {"diffusers fp16 vs fp32": _psnr(img32, img16, 255.0),
                          "fp32 from fp16-rounded noise vs fp32 (control)": _psnr(img32, img_ctl, 255.0)},
        "latent_psnr_per_step_db": {"fp16 vs fp32": per_step, "control": control_steps},
        "seconds": {"fp32": t32, "fp16": t16},
        "fp16_image_finite": bool(np.isfinite(lat16[-1]).all()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdexport-fp16-drift"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--name", default="fp16-drift-cpu")
    args = ap.parse_args()
    import diffusers
    import torch

    src = prepare_model(args.model, args.work)
    pipes = _pipes(src)
    data = {"machine": machine_info(), "command": " ".join(["python benchmarks/bench_fp16_drift.py", *sys.argv[1:]]),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "model": args.model, "size": args.size,
            "steps": args.steps, "guidance": GUIDANCE, "scheduler": type(pipes["fp32"].scheduler).__name__,
            "components": component_drift(pipes, args.size), "loops": []}
    write_results(args.name, data, markdown(data), args.results)  # a slow CPU keeps what was measured
    for seed in args.seeds:
        data["loops"].append(loop_drift(pipes, args.size, args.steps, seed))
        write_results(args.name, data, markdown(data), args.results)
    print(markdown(data))


def markdown(d: dict) -> str:
    model = "SD 1.5 architecture" if d["model"] == "sd15" else "tiny SD1 (diffusers test sizes)"
    fmt = lambda v: "identical" if v is None else f"{v:.1f}"  # noqa: E731
    comp = [[k, fmt(v["psnr_db"]), f"{v['rel_err']:.2e}", v["finite_fp16"]] for k, v in d["components"].items()]
    loops = []
    for run in d["loops"]:
        steps = run["latent_psnr_per_step_db"]["fp16 vs fp32"]
        picks = [steps[0], steps[len(steps) // 2], steps[-1]]
        loops.append([run["seed"], *(fmt(v) for v in picks), fmt(run["image_psnr_db"]["diffusers fp16 vs fp32"]),
                      fmt(run["image_psnr_db"]["fp32 from fp16-rounded noise vs fp32 (control)"])])
    return "\n".join([
        f"# diffusers fp16 vs fp32 on random weights ({model}, CPU)", "",
        f"`{d['command']}`; torch {d['torch']}, diffusers {d['diffusers']}, {d['machine'].get('cpu')}; "
        f"{d['size']}x{d['size']}, {d['steps']} steps {d['scheduler']}, CFG {d['guidance']}. {d['machine'].get('date', '')}", "",
        "## One call per component, same inputs", "",
        markdown_table(["component", "PSNR fp16 vs fp32 (dB)", "max rel. error", "fp16 finite"], comp), "",
        "## The whole pipeline", "",
        markdown_table(["seed", "latents after step 1 (dB)", "mid-loop (dB)", "last step (dB)", "image fp16 vs fp32 (dB)",
                        "image, fp32 from fp16-rounded noise (dB)"], loops), "",
    ])


if __name__ == "__main__":
    main()
