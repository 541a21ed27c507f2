#!/usr/bin/env bash
# Every GPU check in one run, for a machine with one CUDA device: the CUDA tests, then
# overhead.py on the device. Logs go to $OUT (default /tmp/isopo-gpu).
#     bash benchmarks/gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/isopo-gpu}
mkdir -p "$OUT"
W="-W ignore::DeprecationWarning -W ignore::FutureWarning"
run() {  # run NAME SECONDS COMMAND...: its output to the screen and to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | grep -v "^\s*$" | tail -n 40
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run tests 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py $W
run ops 60 python3 benchmarks/overhead.py --size tiny --device cuda --ops
run tiny 90 python3 benchmarks/overhead.py --size tiny --device cuda --methods reinforce ntk fisher
run mlp 120 python3 benchmarks/overhead.py --size mlp --device cuda --n 8 32 128 512
run short 90 python3 benchmarks/overhead.py --size short --device cuda --dtype bf16
run 0.6b 240 python3 benchmarks/overhead.py --size 0.6b --device cuda --dtype bf16 --repeats 5
