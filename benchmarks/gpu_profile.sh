#!/usr/bin/env bash
# Where ISOPO's time goes on a GPU: overhead.py --profile for the short and 0.6b sizes.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/isopo-gpu}; mkdir -p "$OUT"
for size in short 0.6b; do
  timeout 150 python3 benchmarks/overhead.py --size $size --device cuda --dtype bf16 --profile \
      --methods reinforce ntk --rows 30 2>&1 | grep -v USDT > "$OUT/profile-$size.txt"
  grep "^==" "$OUT/profile-$size.txt"
done
