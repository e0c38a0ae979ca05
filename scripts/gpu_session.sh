#!/usr/bin/env bash
# On the GPU host (device tool), after .gpu1/stash.sh in the call before:
#   phase 1: bash scripts/gpu_session.sh 1   MLX-CUDA set up, llama-bench built in the background,
#            the CUDA kernel tests, the kernels' speed, the 7B files made, where a token's time
#            goes (host time, graph, pipelined step; kernels and GPU time under Nsight Compute)
#   phase 2: bash scripts/gpu_session.sh 2   end to end: mlx_llama (kernels on/off), llama-bench, mlx-lm
#   d1, d2: for the compiled decode step: its tests (8 processes), a token's time and its kernels
#            under Nsight Compute; then the table (defaults, llama-bench, mlx-lm first),
#            then rows for 2 steps ahead, one CUDA graph per step (MLX_MAX_OPS_PER_BUFFER) and
#            without inplace, on Q4_0
#   f0, f1, f2: the stash call that also starts llama-bench's build (carry .gpu1 and .gpuwork); the GPU
#            tests of the compiled step and its kernels, a step's host time (built, submitted;
#            profile_decode.py --host) with and without tail and embed, Q4_0 and Q4_K_M; then the
#            table; f3: the table alone again (warm host)
#   long (after d1): 2000 positions cached, the attention split or not; explore: d1 without llama-bench;
#            mini: mlx_llama and mlx-lm on the Q4_0 file alone (a few minutes of device time)
# Logs and JSON go to $OUT. Carry .gpu2 (the kit) and .gpuwork (a 32000-token vocabulary file).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DIR=/tmp/bench7b; mkdir -p "$DIR"
VOCAB=.gpuwork/ggml-vocab-llama-spm.gguf
LB=/root/llama.cpp/build/bin/llama-bench
Q40="$DIR/llama2-7b-shape-random-Q4_0-32l.gguf"
Q4KM="$DIR/llama2-7b-shape-random-Q4_K_M-32l.gguf"
step() { echo; echo "=== $* ($(date +%T))"; }
offline_vocab() {  # the tests' vocabulary files from the carried copy (the host has no network), and
  # pytest-xdist (pyproject's addopts run the suite in processes: -n)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwork/whl/*.whl
  mkdir -p tests/.cache/vocab && cp .gpuwork/*.gguf tests/.cache/vocab/ && touch tests/.cache/vocab/.complete
}
make_files() {  # bench_gpu's four files (Q4_0, Q4_K_M; 2 and 32 layers)
  timeout "$1" python3 -c "import sys; sys.path[:0]=['scripts']; import bench_gpu; bench_gpu.make_files('$DIR', 32, '$VOCAB')"
}
make_q40() {  # the 32-layer Q4_0 file alone
  timeout "$1" python3 -c "import sys; sys.path[:0]=['scripts']; import bench_load; bench_load.make_7b('$Q40', 'Q4_0', 32, '$VOCAB')"
}
ncu_token() {  # kernels per decoded token and their GPU time (profile_decode.py --ncu [--compiled], 2 steps)
  local limit=$1; shift
  timeout "$limit" ncu --metrics gpu__time_duration.sum --csv --profile-from-start off --clock-control none \
      python3 scripts/profile_decode.py "$Q40" --ncu --ncu-steps 2 "$@" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  python3 scripts/profile_decode.py --parse "$OUT/ncu.csv" --ncu-steps 2 2>&1 | tee "$OUT/ncu_summary.txt"
}
failed() { grep -q "$1.* FAILED\|FAILED.*$1" "$2"; }  # a test whose name matches $1 failed in log $2
fuse_env_from_tests() {  # exports that turn off the fused decode pieces whose GPU tests failed
  # (pytest -v lines, "tests/…::test_name[…] FAILED"; read as far as the run got)
  # (either order: pytest -v "name FAILED", xdist and the summary "FAILED name")
  local pieces=sym,norm,rope,act,inplace,tail,embed
  failed "embedding_row" "$1" && pieces=${pieces/,embed/}
  failed "\(add_norm\|fused_cuda_pieces.*tail\]\|given.*tail\]\)" "$1" && pieces=${pieces/,tail/}
  failed "\(in_place\|fused_cuda_pieces.*inplace\]\)" "$1" && pieces=${pieces/,inplace/}
  failed "symmetric" "$1" && pieces=${pieces/sym,/}
  failed "\(epilogue\|fused_cuda_pieces.*-sym,norm,rope,act\]\)" "$1" && pieces=${pieces/,act/}
  failed "test_add_rms_norm" "$1" && pieces=${pieces/norm,/}
  failed "\(decode_attention\|fused_cuda_pieces.*-sym,norm,rope\]\)" "$1" && pieces=${pieces/rope/}
  echo "export MLX_LLAMA_CUDA_FUSE=${pieces%,}"
  failed "decode_attention_equals_mlx_attention\[none" "$1" && echo "export MLX_LLAMA_CUDA_ATTENTION=0"
  true
}
host_time() {  # a compiled step's host time, built and submitted (profile_decode.py --host), 128 cached; $1: the file
  echo -n "$(basename "$1") $MLX_LLAMA_CUDA_FUSE: " | tee -a "$OUT/host.txt"
  timeout 70 python3 scripts/profile_decode.py "$1" --host --context 128 --steps 96 2>&1 | tail -1 | tee -a "$OUT/host.txt"
}
kit_and_files() {  # MLX-CUDA set up (after the stash call), llama-bench's build started unless it is, xdist, the
  # tests' vocabulary, the 7B files made in the background (their pid in $files)
  step setup
  source .gpu2/setup.sh
  [ -f /root/llama.cpp/build.log ] || bash .gpu2/build_llama_bench.sh
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  offline_vocab
  make_files 300 > "$OUT/make_files.txt" 2>&1 &
  files=$!
}
gpu_tests() {  # $1: seconds, then pytest's selection: 8 processes; the pieces whose tests pass into attn.env; the files
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -v -n 8 -p no:cacheprovider "$@" > "$OUT/gpu_tests.txt" 2>&1
  grep -E "FAILED|ERROR| passed| failed" "$OUT/gpu_tests.txt" | cut -c1-300 | tail -30
  fuse_env_from_tests "$OUT/gpu_tests.txt" | tee /root/stash/attn.env
  step "7B files"
  wait $files; cat "$OUT/make_files.txt"
  source /root/stash/attn.env
}
wait_llama_bench() {  # up to $1 × 5 s for the background build
  for i in $(seq "$1"); do grep -q BUILD_DONE /root/llama.cpp/build.log && break; sleep 5; done
  tail -1 /root/llama.cpp/build.log
}

if [ "${1:-1}" = d1 ]; then  # after stash: the kernels' tests in parallel (xdist from .gpuwork/whl), files, a token's time
  kit_and_files
  step "GPU tests, 8 processes (the tensor-core matvec's left out: it is off)"
  gpu_tests 240 -k "not mma" tests/test_cuda_kernels.py tests/test_decode_step.py
  step "a token's time, 128 cached, compiled, pieces $MLX_LLAMA_CUDA_FUSE"
  timeout 80 python3 scripts/profile_decode.py "$Q40" --context 128 --steps 48 2>&1 | tail -5 | tee "$OUT/profile.txt"
  step "kernels per token under Nsight Compute"
  ncu_token 80 --compiled --context 128
  step "the attention and add+norm kernels in detail (Nsight Compute sections), while llama-bench builds"
  for k in decode_attention add_rms_norm; do
    timeout 90 ncu -k regex:$k -c 1 --clock-control none --profile-from-start off --section SpeedOfLight \
        --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 scripts/profile_decode.py "$Q40" --ncu --ncu-steps 1 --compiled --context 128 > "$OUT/ncu_$k.txt" 2>&1
    grep -E "Duration|Throughput|Registers|Achieved Occupancy|Stall|Warp Cycles|Block Size|Shared Memory Config" "$OUT/ncu_$k.txt" | head -30
  done
  tail -1 /root/llama.cpp/build.log
elif [ "${1:-1}" = d2 ]; then  # the warm host after d1: the table, rows for 2 ahead, MLX's graph size, no inplace
  source /root/stash/env.sh
  cat /root/stash/attn.env && source /root/stash/attn.env
  step "wait for llama-bench"
  wait_llama_bench 60
  step "end to end"
  rows=(--row "mlx_llama, 2 steps ahead;MLX_LLAMA_DECODE_AHEAD=2"
        --row "mlx_llama, one CUDA graph a step;MLX_MAX_OPS_PER_BUFFER=2000;MLX_MAX_MB_PER_BUFFER=1000000"
        --row "mlx_llama, without inplace;MLX_LLAMA_CUDA_FUSE=sym,norm,rope,act")
  timeout 570 python3 scripts/bench_gpu.py --dir "$DIR" --vocab-from "$VOCAB" --check "${rows[@]}" --mlx-lm \
      --llama-bench "$LB" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
elif [ "${1:-1}" = f0 ]; then  # with the stash call (carry .gpu1 and .gpuwork, which holds llama.cpp's source): the build starts
  bash .gpu1/stash.sh && cp .gpuwork/llama.cpp-src.tar.xz /root/stash/ && bash .gpuwork/build_llama_bench.sh
elif [ "${1:-1}" = f1 ]; then  # after f0, ~5 min: the compiled step's GPU tests, files, a step's host time
  kit_and_files
  step "GPU tests, 8 processes: the compiled step (given tokens, the fused pieces), the kernels it runs"
  gpu_tests 220 tests/test_decode_step.py tests/test_cuda_kernels.py -k "given or fused_cuda_pieces or fused_alone or \
in_place or add_norm or add_rms_norm or equals_the_model or decode_attention or embedding_row"
  step "a step's host time (128 cached; llama-bench builds meanwhile): the pieces, then the last table's defaults"
  for f in "$Q40" "$Q4KM"; do
    host_time "$f"
    MLX_LLAMA_CUDA_FUSE=sym,norm,rope,act,inplace host_time "$f"
  done
  tail -1 /root/llama.cpp/build.log
elif [ "${1:-1}" = f2 ]; then  # after f1: the table
  source /root/stash/env.sh
  cat /root/stash/attn.env && source /root/stash/attn.env
  step "wait for llama-bench"
  wait_llama_bench 60
  step "end to end"
  timeout 560 python3 scripts/bench_gpu.py --dir "$DIR" --vocab-from "$VOCAB" --check --mlx-lm --llama-bench "$LB" \
      --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
elif [ "${1:-1}" = f3 ]; then  # after f2 on the warm host: the table alone (defaults changed between calls)
  source /root/stash/env.sh
  cat /root/stash/attn.env && source /root/stash/attn.env
  step "end to end"
  timeout 500 python3 scripts/bench_gpu.py --dir "$DIR" --vocab-from "$VOCAB" --check --mlx-lm --llama-bench "$LB" \
      --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
elif [ "${1:-1}" = long ]; then  # the warm host after d1: decoding at 2000 cached positions, attention split or not
  source /root/stash/env.sh
  [ -f /root/stash/attn.env ] && source /root/stash/attn.env
  step "2000 positions cached: one block per head, then split over chunks (MLX_LLAMA_ATTENTION_SPLIT_FROM=1024)"
  timeout 150 python3 scripts/profile_decode.py "$Q40" --context 2000 --steps 32 2>&1 | tail -5 | tee "$OUT/profile_2000.txt"
  MLX_LLAMA_ATTENTION_SPLIT_FROM=1024 timeout 150 python3 scripts/profile_decode.py "$Q40" --context 2000 --steps 32 2>&1 \
      | tail -5 | tee "$OUT/profile_2000_split.txt"
elif [ "${1:-1}" = mini ]; then  # after stash, a few minutes: tg128/pp512 of mlx_llama and mlx-lm on Q4_0 only
  step setup
  source .gpu2/setup.sh
  step "Q4_0 file"
  make_q40 60
  step "mlx_llama (compiled step), then mlx-lm 4-bit g32, Q4_0, 2 repetitions each"
  cd scripts && timeout 150 python3 -c "
import json, bench_gpu
print('mlx_llama', json.dumps(bench_gpu.in_child('mlx_llama_worker', '$Q40', 2)), flush=True)
print('mlx-lm g32', json.dumps(bench_gpu.in_child('mlx_lm_worker', 32, 2)), flush=True)"
elif [ "${1:-1}" = mini2 ]; then  # after stash, ~3 minutes: the in-place piece's GPU tests, then Q4_0 tg128 with and without it
  step setup
  source .gpu2/setup.sh
  offline_vocab
  make_q40 100 > "$OUT/make_q40.txt" 2>&1 &
  files=$!
  step "GPU tests: inplace, the symmetric form"
  timeout 100 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_decode_step.py tests/test_cuda_kernels.py \
      -k "inplace or in_place or symmetric_form" 2>&1 | tee "$OUT/gpu_tests.txt" | grep -E "FAILED|passed|failed"
  wait $files
  step "Q4_0 tg128, the default pieces, then without inplace, 2 repetitions each"
  cd scripts && timeout 120 python3 -c "
import json, bench_gpu
for name, env in [('defaults', {}), ('without inplace', {'MLX_LLAMA_CUDA_FUSE': 'sym,norm,rope,act'})]:
    print(name, json.dumps(bench_gpu.in_child('mlx_llama_worker', '$Q40', 2, env=env)), flush=True)" 2>&1 | tee "$OUT/mini.txt"
elif [ "${1:-1}" = explore ]; then  # one call after stash: the compiled decode step, no llama-bench
  step setup
  source .gpu2/setup.sh
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  offline_vocab
  step "GPU tests (CUDA kernels, compiled decode step)"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_decode_step.py -m "slow or not slow" 2>&1 | tail -15
  step "7B Q4_0 file"
  make_q40 200
  step "where a decoded token's time goes, op by op and compiled"
  timeout 120 python3 scripts/profile_decode.py "$Q40" --steps 48 2>&1 | tail -5 | tee "$OUT/profile.txt"
  step "kernels per token under Nsight Compute, compiled step"
  ncu_token 100 --compiled
elif [ "${1:-1}" = final ]; then  # one call on a fresh host: the end-to-end table alone
  step setup
  source .gpu2/setup.sh && bash .gpu2/build_llama_bench.sh
  step "7B files, check"
  make_files 200
  step "wait for llama-bench"
  wait_llama_bench 100
  step "end to end"
  timeout 330 python3 scripts/bench_gpu.py --dir "$DIR" --vocab-from "$VOCAB" --check --mlx-lm --llama-bench "$LB" \
      --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
elif [ "${1:-1}" = 1 ]; then
  step setup
  source .gpu2/setup.sh && bash .gpu2/build_llama_bench.sh
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import mlx.core as mx; print('MLX', mx.__version__, mx.default_device())"
  offline_vocab
  step "CUDA kernel tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tail -25
  step "kernel speed"
  timeout 280 python3 scripts/check_cuda_kernels.py /root/stash/tiles.env 2>&1 | tee "$OUT/kernels.txt"
  [ -f /root/stash/tiles.env ] && cat /root/stash/tiles.env && source /root/stash/tiles.env  # the fastest tiling from here on
  step "7B files"
  make_files 250
  step "where a decoded token's time goes (Q4_0, Q4_K_M)"
  for r in Q4_0 Q4_K_M; do
    timeout 60 python3 scripts/profile_decode.py "$DIR/llama2-7b-shape-random-$r-32l.gguf" 2>&1 | tail -7 | tee "$OUT/profile_$r.txt"
  done
  step "kernels per token under Nsight Compute (Q4_0, 2 decode steps)"
  ncu_token 100
  step "llama-bench build"
  tail -2 /root/llama.cpp/build.log
else
  source /root/stash/env.sh
  [ -f /root/stash/tiles.env ] && cat /root/stash/tiles.env && source /root/stash/tiles.env  # phase 1's fastest tiling
  step "wait for llama-bench"
  wait_llama_bench 60
  step "end to end"
  timeout 560 python3 scripts/bench_gpu.py --dir "$DIR" --vocab-from "$VOCAB" --check --baseline --mlx-lm \
      --llama-bench "$LB" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
fi
