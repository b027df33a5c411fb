# 2-GPU checks and timings of context parallelism in one device call (nvidia-h200-x2, carry .whl):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/x2_refresh.sh
# bf16 CP=2 against one rank at 128K, bench_cp at 256K on 1 and 2 GPUs, 5 training steps per layout at 32K
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/mlflow/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; echo "code at ${COMMIT:-unknown}"
t=$(date +%s); timeout 200 torchrun --standalone --nproc_per_node 2 tools/gpu_check_cp.py --seq-len 131072 > $OUT/cp_check_128k_2gpu.log 2>&1; echo "cp check rc=$? $(( $(date +%s)-t )) s"; grep -v -i warn $OUT/cp_check_128k_2gpu.log | tail -40
for n in 1 2; do t=$(date +%s); timeout 150 torchrun --standalone --nproc_per_node $n tools/bench_cp.py --distributed --seq-lens 262144 --iters 3 --out $OUT/cp_nccl_${n}gpu.json > $OUT/bench_cp_${n}.log 2>&1; echo "bench_cp $n rc=$? $(( $(date +%s)-t )) s"; grep -v -i warn $OUT/bench_cp_${n}.log | tail -8; done
t=$(date +%s); timeout 300 torchrun --standalone --nproc_per_node 2 tools/gpu_check_layouts.py --seq-len 32768 --steps 5 > $OUT/layouts_32k_2gpu.log 2>&1; echo "layouts rc=$? $(( $(date +%s)-t )) s"; grep -v -i warn $OUT/layouts_32k_2gpu.log | tail -8
