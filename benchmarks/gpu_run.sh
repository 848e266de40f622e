#!/usr/bin/env bash
# The GPU benchmark of issues 7 and 17 (benchmarks/bench_gpu.py) as `device`-tool calls, for a session whose
# task has the GPU machine (the tool's `status` says so: can_start_another).
#
# Run this script on the CPU machine, in the checkout. It prepares what the GPU machine lacks and
# prints the calls to make, back to back (a warm machine is given back after ~30 s idle; a fresh one
# is bare and the wheels must be sent again). Each call stays under the tool's 10 minutes; all of
# them together take about 10 of the session's 15 device minutes.
#
#   1. ../shared/device/prepare-gpu-wheels.sh: onnxruntime-gpu 1.31.1 (CUDA 13) in parts, diffusers,
#      numpy 2.3 (onnxruntime.transformers' fusions fail with numpy 2.5);
#   2. .dev/extra: onnxscript, onnx-ir, ml_dtypes (sdexport's ONNX clean-up) and open_clip_torch (the
#      CLIP BPE list the random SD 1.5 builder reads) for the GPU machine's Python 3.12.
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
python3 -m pip download -q --no-deps "${plat[@]}" -d .dev/extra onnxscript==0.7.2 onnx-ir==1.1.0 ml_dtypes==0.6.0 \
  open_clip_torch==3.3.0

parts=$(ls -d .dev/p[0-9]* | wc -l)
# the split onnxruntime-gpu wheel is joined on the GPU machine under its own name
ort_name=$(sed -n 's|^cat /tmp/parts/part_\* > /tmp/\(.*\.whl\)$|\1|p' .dev/whl/install.sh)
echo "$ort_name" > .dev/extra/joined-name.txt
bench='python3 benchmarks/bench_gpu.py --stage all --wheels /tmp/wheels --out $OUT'

echo
echo "Device-tool calls (make them back to back; the last one installs, measures and reports in < 10 min):"
echo
for ((k = 1; k < parts; k++)); do
  echo "  call $k: carry [\".dev/p$k\"]"
  echo "          command: mkdir -p /tmp/wheels && cp .dev/p$k/* /tmp/wheels/"
done
echo "  call $parts: carry [\".dev/p$parts\", \".dev/whl\", \".dev/extra\"], timeout_s 600"
echo "          command: mkdir -p /tmp/wheels && cp .dev/p$parts/* .dev/whl/*.whl .dev/extra/*.whl .dev/extra/joined-name.txt /tmp/wheels/ && $bench"
echo
echo "  Each stage's JSON is in \$OUT as soon as the stage ends (a timeout loses nothing measured);"
echo "  the report is \$OUT/results/gpu-<gpu>.{json,md}. Options: --compile (torch.compile, ~90 s),"
echo "  --probe (fp16 overflow probe), --plain-fp16 (the plain fp16 export too), --repeats N."
