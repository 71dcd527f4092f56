#!/usr/bin/env bash
# Regenerates docs/results/moe_layer.md from the JSON runs kept in docs/results (see benchmarks/moe_layer_report.py
# for the commands that made each of them). Run from the repository root: bash benchmarks/moe_layer_report.sh
set -euo pipefail
PYTHON=${PYTHON:-python}
R=docs/results
"$PYTHON" benchmarks/moe_layer_report.py $R/moe_layer_cpu.json $R/moe_layer_cpu_reuse.json \
 --cuda $R/moe_layer_cuda_float32.json $R/moe_layer_cuda_bfloat16.json $R/moe_layer_cuda_float32_run2.json $R/moe_layer_cuda_bfloat16_run2.json $R/moe_layer_cuda_bfloat16_run3.json $R/moe_layer_cuda_bfloat16_run4.json \
 --note $R/moe_layer_cuda_float32.json "From \`benchmarks/cuda_suite.sh\`, which times float32 while the megablocks peer builds on all but 4 of the machine's cores (\`moemix\` here is \`\"auto\"\` before it took \`grouped_mm\` in bfloat16: the padded layout)." \
 --note $R/moe_layer_cuda_bfloat16.json "From \`benchmarks/cuda_suite.sh\`, after the megablocks build (\`moemix\` is \`\"auto\"\` before it took \`grouped_mm\` in bfloat16: the padded layout here)." \
 --note $R/moe_layer_cuda_float32_run2.json "A later machine, nothing else running; with the \`grouped_mm\` layout (\`moemix\` is \`\"auto\"\`: the padded layout)." \
 --note $R/moe_layer_cuda_bfloat16_run2.json "A later machine, nothing else running; with the \`grouped_mm\` layout, before \`\"auto\"\` took it in bfloat16 (\`moemix\` is the padded layout here): the data behind that rule." \
 --note $R/moe_layer_cuda_bfloat16_run3.json "A third machine, with \`\"auto\"\` taking \`grouped_mm\` in bfloat16 (\`moemix\` here)." \
 --note $R/moe_layer_cuda_bfloat16_run4.json "A fourth machine, with \`\"auto\"\` taking \`grouped_mm\` in bfloat16 (\`moemix\` here) and the load-balance loss taken from the plan's counts." \
 --cpu-grouped-mm $R/moe_layer_cpu_grouped_mm.json --workers $R/moe_layer_cpu_workers.json --row-buffers $R/moe_layer_cpu_row_buffers.json \
 --runs $R/moe_layer_cpu.json $R/moe_layer_cpu_run2.json $R/moe_layer_cpu_run3.json $R/moe_layer_cpu_run4.json $R/moe_layer_cpu_run5.json $R/moe_layer_cpu_run6.json \
 $R/moe_layer_cpu_run7.json $R/moe_layer_cpu_run8.json $R/moe_layer_cpu_run9.json \
 $R/moe_layer_cpu_run10.json $R/moe_layer_cpu_run11.json $R/moe_layer_cpu_run12.json $R/moe_layer_cpu_run13.json $R/moe_layer_cpu_run14.json $R/moe_layer_cpu_run15.json $R/moe_layer_cpu_run16.json $R/moe_layer_cpu_run17.json $R/moe_layer_cpu_run18.json --runs-since 7 10 11 \
 --runs-note "Runs 1-9 ran on AMD EPYC Zen 4 machines (AVX-512), where the fused loop's products run in oneDNN: runs 1-6 timed the library of earlier sessions, runs 7-9 the library at commit 99d4994 (aux losses from the plan's counts, fewer ops), one after another on a quiet machine. Runs 10-18 ran on an AMD EPYC Zen 3 (family 25 model 1, AVX2, as recorded in \`cpu_gemm_avx2.json\` on the same machine), where every variant's products run in BLAS: run 10 timed the library at commit e7bb8bc, runs 11-12 the library at 1a5647c, run 13 at 7b20eea, run 14 at c4cc46a, run 15 at b69035b (\`SparseMoE\` as a \`MoELayer\`; the same rule) runs 16-17 at f56398c and cb3f6f5 (the same dispatch; experts sharded through \`ShardedExperts\`, which the benchmark does not use) and run 18 at c3f8b75 (the same dispatch; the fused loop recomputes its activations for a second backward and steps aside under saved-tensor hooks; the machine ran faster that hour: the dense FFN took 19.7 ms at \`small_coarse\` against 25.3 and 30.0 ms in runs 16 and 17), whose \`\"auto\"\` rule takes the padded layout up to 1e8 multiply-adds per expert where the loop runs in BLAS (\`small_coarse\` balanced: padded, the loop before). Medians over all runs pool the two machine kinds." > $R/moe_layer.md
