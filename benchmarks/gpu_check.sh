#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU and the project's packages installed: the device tests of the training
# loop (a GPU student learns, resumes from its checkpoint, loads on a CPU), then the training benchmark with the DAN on
# the GPU (d = 100 and 1000, |V| = 1M, batch 2,048) beside fastText on the same texts and CPU threads.
#
#     benchmarks/gpu_check.sh OUT_DIR [IMDB_DIR] [THREADS]
#
# OUT_DIR receives gpu.txt, gpu_tests.log and train_throughput_gpu.{json,md}. IMDB_DIR holds train.parquet (25,000
# reviews: one pass); default ../shared/data/imdb.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [IMDB_DIR] [THREADS]}
data=${2:-../shared/data/imdb}
threads=${3:-$(nproc)}
py=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
"$py" -m pytest -q -p no:cacheprovider tests/test_training.py -k "gpu or device" 2>&1 | tee "$out/gpu_tests.log" | tail -n 15
"$py" benchmarks/train_throughput.py --device cuda --data "$data" --docs 25000 --vocab-size 1000000 \
    --dims 100 1000 --fasttext-dims 100 --optimizers rowwise_adam sparse_adam rowwise_adagrad --batch-size 2048 \
    --threads "$threads" --passes 8 --kill-above-mb 100000 --work /tmp/bench-train-gpu \
    --out "$out/train_throughput_gpu.json"
