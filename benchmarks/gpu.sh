#!/usr/bin/env bash
# Every GPU check in one run, for a machine with one CUDA device: the CUDA tests, then
# overhead.py on the device (peak memory at the 0.6b shape only). Logs go to $OUT
# (default /tmp/isopo-gpu).
#     bash benchmarks/gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/isopo-gpu}
mkdir -p "$OUT"
W="-W ignore::DeprecationWarning -W ignore::FutureWarning"
B="python3 benchmarks/overhead.py --device cuda"
run() {  # run NAME SECONDS COMMAND...: its output to the screen and to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | grep -v "^\s*$\|USDT\|interleaved rounds" | tail -n 12
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py $W
run 0.6b 120 $B --size 0.6b --dtype bf16 --repeats 5 --methods reinforce ntk fisher
run ops 30 $B --size tiny --ops
run tiny 45 $B --size tiny --methods reinforce ntk fisher --no-memory
run mlp 45 $B --size mlp --n 8 32 128 --methods reinforce ntk --no-memory
run short 45 $B --size short --dtype bf16 --methods reinforce ntk fisher --no-memory
