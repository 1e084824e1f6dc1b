#!/usr/bin/env bash
# One prepared run on a lent GPU (H100/H200, jax 0.11.2 + CUDA 13, no network): the parity and kernel tests on
# the GPU, then the train-step and sampler benchmarks at SmolLM2-135M's and Llama-3.2-1B's shapes, bf16 compute,
# each against transformers/PyTorch on the same card; `families`: the newer families' parity tests and sampler.
# Output goes to $OUT/log.txt (and the terminal).
#   device run: bash benchmarks/gpu.sh      (carry .whl: the packages that image lacks, as cp312 wheels, made here by
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain==0.2.18 array_record==0.8.6 portpicker ml_collections==1.1.0 tensorboardX==2.6.5 gguf==0.19.0 flax==0.12.12)
set -u
OUT=${OUT:-/tmp/s2d_gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint as o, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())"
step() { echo; echo "=== $*"; local start=$SECONDS; timeout "${LIMIT:-150}" "$@"; echo "=== rc $? in $((SECONDS - start)) s"; }
# Sections (default: all): tests, train, sampler, families, rollouts. E.g. `bash benchmarks/gpu.sh families`.
want() { [ $# -eq 0 ] || [[ " $SECTIONS " == *" $1 "* ]]; }
SECTIONS="${*:-tests train sampler families rollouts}"
if want tests; then
LIMIT=200 step env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
  tests/test_model.py tests/test_lora.py -k "not splash and not end_to_end and not bad_lora and not resume and not only_adapters"
fi
if want train; then
LIMIT=50 step python3 benchmarks/train.py --preset smollm2-135m --dtype bfloat16 --batch 16 --seq 1024 --steps 5
LIMIT=50 step python3 benchmarks/train.py --preset smollm2-135m --dtype bfloat16 --batch 16 --seq 1024 --steps 5 --lora 16
LIMIT=75 step python3 benchmarks/train.py --preset llama3.2-1b --dtype bfloat16 --batch 8 --seq 1024 --steps 5
LIMIT=75 step python3 benchmarks/train.py --preset llama3.2-1b --dtype bfloat16 --batch 8 --seq 1024 --steps 5 --lora 16
fi
if want sampler; then
LIMIT=90 step python3 benchmarks/sampler.py --preset smollm2-135m --dtype bfloat16 --batches 32,64 --new 128
LIMIT=90 step python3 benchmarks/sampler.py --preset llama3.2-1b --dtype bfloat16 --batches 64 --new 128
fi
if want families; then  # the newer families: parity on the GPU (one device: no mesh tests), then their sampler
LIMIT=240 step env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -p no:cacheprovider tests/test_families.py \
  tests/test_model.py tests/test_sampler.py -k "not sharded and not smollm2 and (families or logits or greedy_matches or padded or gguf or scanned or window or count)"
LIMIT=100 step python3 benchmarks/sampler.py --preset gemma3-1b --dtype bfloat16 --batches 64 --new 128
LIMIT=100 step python3 benchmarks/sampler.py --preset qwen3-0.6b --dtype bfloat16 --batches 64 --new 128
fi
if want rollouts; then  # the engine (continuous, static) vs transformers on a System 2 workload, random weights
LIMIT=240 step python3 benchmarks/rollouts.py --preset smollm2-135m --dtype bfloat16 --inputs 64 --samples 8 --new 256
LIMIT=240 step python3 benchmarks/rollouts.py --preset llama3.2-1b --dtype bfloat16 --inputs 64 --samples 8 --new 256 \
  --programs cot
fi
