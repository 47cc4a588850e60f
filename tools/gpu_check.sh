#!/usr/bin/env bash
# Everything that needs a GPU, in one short run: a build with the CUDA kernels
# for the local device, the CUDA tests (every kernel against the CPU kernels
# and the pure-PyTorch references, opcheck on CUDA), their emulated twins
# (the same kernels on the emulated device, as CI runs them), then the CUDA
# tables of the loss, Gibbs, prediction and fused linear loss benchmarks
# (ratios against PyTorch's own ops in the same run). Run from the repository
# root, in an environment with torch and the test extras installed:
#
#     bash tools/gpu_check.sh [output folder, default gpu_check]
#
# Each stage writes its output to a file of the folder; a failing stage does
# not stop the later ones, and the exit status says whether all passed.
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
status=0
stage() {  # stage NAME COMMAND...
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  local start=$SECONDS
  "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc, $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 5 "$out/$name.txt" | sed 's/^/   /' | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}
python - > "$out/device.txt" 2>&1 <<'PY' || { echo "torch with a CUDA device is needed: see $out/device.txt"; exit 2; }
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
cat "$out/device.txt" | tee -a "$out/summary.txt"
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
stage build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
  python setup.py build_ext --inplace
# the in-place build lands in src/lmm_fast
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
stage tests_cuda python -m pytest tests -m cuda -q -p no:cacheprovider
stage tests_cuda_emulated python -m pytest tests -m cuda_emulated -q -p no:cacheprovider
stage bench_loss python -m pytest benchmarks/bench_loss.py -k cuda -q -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds --benchmark-group-by=param:case
stage bench_gibbs python benchmarks/bench_gibbs.py --device cuda --repeats 21
stage bench_predict python benchmarks/bench_predict.py --device cuda --rounds 21
stage bench_linear_loss python benchmarks/bench_linear_loss.py --device cuda --rounds 5
exit $status
