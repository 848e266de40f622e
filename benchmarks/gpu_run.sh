#!/usr/bin/env bash
# The issue-7 GPU benchmark (benchmarks/bench_gpu.py) as `device`-tool calls, for a session whose
# task has the GPU machine (the tool's `status` says so: can_start_another).
#
# Run this script on the CPU machine, in the checkout. It prepares what the GPU machine lacks and
# prints the calls to make, back to back (a warm machine is given back after ~30 s idle; a fresh one
# is bare and the wheels must be sent again). Each call stays under the tool's 10 minutes; all of
# them together take about 20 of the session's 30 device minutes.
#
#   1. ../shared/device/prepare-gpu-wheels.sh: onnxruntime-gpu 1.31.1 (CUDA 13) in parts, diffusers,
#      numpy 2.3 (onnxruntime.transformers' fusions fail with numpy 2.5);
#   2. .dev/extra: onnxscript, onnx-ir, ml_dtypes (sdexport's ONNX clean-up) for the GPU machine's
#      Python 3.12.
#
# After the last call, copy the report it returns (files_at/.../results/gpu-<gpu>.{json,md}) into
# benchmarks/results/ and commit it. Say in the commit which goals were met; never round up.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared="${SDEXPORT_SHARED:-$root/../shared}"
[ -f "$shared/device/prepare-gpu-wheels.sh" ] || shared=/work/shared
bash "$shared/device/prepare-gpu-wheels.sh"

plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .dev/extra && mkdir -p .dev/extra
python3 -m pip download -q --no-deps "${plat[@]}" -d .dev/extra onnxscript==0.7.2 onnx-ir==1.1.0 ml_dtypes==0.6.0
printf '%s\n' 'set -e' \
  'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/extra/*.whl' \
  > .dev/extra/install.sh

parts=$(ls -d .dev/p[0-9]* | wc -l)
w='--work /tmp/sdexport-gpu-bench --out $OUT'
env='export PYTHONPATH=/tmp/site:$PWD'
install="bash .dev/whl/install.sh && bash /tmp/extra/install.sh && $env"
bench='python3 benchmarks/bench_gpu.py'

echo
echo "Device-tool calls (kind nvidia-h100-x1; make them back to back):"
echo
if [ "$parts" -eq 1 ]; then
  echo "  call 1: carry [\".dev/p1\", \".dev/whl\", \".dev/extra\"]"
  echo "          command: mkdir -p /tmp/parts /tmp/extra && cp .dev/p1/* /tmp/parts/ && cp .dev/extra/* /tmp/extra/ && $install && $bench --stage export $w"
else
  echo "  call 1: carry [\".dev/p1\", \".dev/extra\"]"
  echo "          command: mkdir -p /tmp/parts /tmp/extra && cp .dev/p1/* /tmp/parts/ && cp .dev/extra/* /tmp/extra/"
  for ((k = 2; k < parts; k++)); do
    echo "  call $k: carry [\".dev/p$k\"]"
    echo "          command: cp .dev/p$k/* /tmp/parts/"
  done
  echo "  call $parts: carry [\".dev/p$parts\", \".dev/whl\"]    (installs; SD 1.5 fp32 + plain fp16 ONNX, ~6 min)"
  echo "          command: cp .dev/p$parts/* /tmp/parts/ && $install && $bench --stage export $w"
fi
echo "  next:   command: $env && $bench --stage optimize $w   (--optimize gpu: fusions, fp16 islands; ~5 min)"
echo "  next:   command: $env && $bench --stage torch $w      (eager, torch.compile, reference image; ~5 min)"
echo "  next:   command: $env && $bench --stage ort $w        (ORT CUDA variants, device-loop e2e, PSNR; ~4 min)"
echo "  next:   command: $env && $bench --stage report $w     (writes \$OUT/results/gpu-<gpu>.json and .md)"
echo
echo "  Short of time: --no-probe skips the fp16 overflow probe, --no-compile skips torch.compile, --repeats 20"
echo "  shortens the timings. The CUDA tests (skipped on CPU machines) run there too:"
echo "    $env && python3 -m pytest -q tests/test_device_loop.py tests/test_onnx_gpu.py -k cuda"
