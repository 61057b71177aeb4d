#!/bin/bash
# Run benchmarks/gpu_check.py on a lent GPU machine (the `device` tool), from the repository root.
#
# Here, once: `bash benchmarks/gpu_pack.sh` builds the graphs (.gpu/cnn, .gpu/text), packs onnxruntime-gpu
# for the machine's Python 3.12 and sm_90 (.gpu/ort.tar.xz.part-*) and prints each call's bytes against the
# 64 MiB limit; `bash benchmarks/gpu_pack.sh aside` moves models/artifacts' big tracked files out of the tree
# (the tracked tree travels with every call: 91 MB with them, about 3 MB without).
#
# Then two device calls, back to back (the machine keeps /tmp/ort-gpu only while warm, 30 s after a call):
#   call 1, about 5 min: carry .gpu/ort.tar.xz.part-00 .gpu/ort.tar.xz.part-01 .gpu/cnn/cnn_prepared.onnx
#       .gpu/cnn/cnn_plan.json .gpu/cnn/cnn_test.npz; timeout_s 540;
#       command: bash benchmarks/gpu_check.sh --groups served cycling
#   call 2, about 3 min: carry .gpu/cnn .gpu/text; timeout_s 360;
#       command: bash benchmarks/gpu_check.sh --groups cnn no_exit text
#   (text_fp16.onnx, 29 MB, fits neither call: gpu_pack.sh keeps it in .gpu/fp16, so call 2 records the text
#   float16 steps as errors; an optional call 3 carries .gpu/fp16 and runs
#   `mkdir -p .gpu/text && cp .gpu/fp16/text_fp16.onnx .gpu/text/ && bash benchmarks/gpu_check.sh --groups text`.)
# Each writes $OUT/gpu_check_<groups>.json (rewritten after every step: a call cut short still reports) and
# $OUT/gpu_check_<groups>.log.  Back here: copy the JSON files to benchmarks/gpu_runs/, run
# `python benchmarks/gpu_check.py --record benchmarks/gpu_runs/<both files>` (RESULTS.md, "GPU (CUDA)" and
# its subsection "Served shapes") and `bash benchmarks/gpu_pack.sh restore`.
set -euo pipefail
SITE=/tmp/ort-gpu
if [ ! -d "$SITE/onnxruntime" ]; then
    if ! ls .gpu/ort.tar.xz.part-* >/dev/null 2>&1; then
        echo "onnxruntime-gpu is neither unpacked in $SITE nor carried (.gpu/ort.tar.xz.part-*): this machine" \
             "is fresh, so run call 1 (benchmarks/gpu_check.sh's header) first" >&2
        exit 2
    fi
    mkdir -p "$SITE"
    cat .gpu/ort.tar.xz.part-* | xz -d -T0 | tar -C "$SITE" -xf -
fi
# onnxruntime-gpu needs CUDA 13 and cuDNN 9: the machine's PyTorch ships them as nvidia-* packages.
NVIDIA=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || echo /usr/local/cuda/lib64)
LIBS=$( (find "$NVIDIA" -name 'lib*.so*' -printf '%h\n' 2>/dev/null || true) | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
ln -sfn ../passes moco_compile/passes
ln -sfn ../runtime moco_compile/runtime
export PYTHONPATH="$SITE:." PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-out/gpu}"
mkdir -p "$OUT_DIR"
GROUPS_NAME=$(echo "$@" | sed -n 's/.*--groups \([a-z_ ]*\).*/\1/p' | xargs | tr ' ' '_')
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
python3 -c 'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())'
python3 benchmarks/gpu_check.py --artefacts .gpu --out "$OUT_DIR" "$@" 2>&1 \
    | tee "$OUT_DIR/gpu_check_${GROUPS_NAME:-all}.log"
