#!/bin/bash
# Run benchmarks/gpu_check.py on a lent GPU machine (the `device` tool), from the repository root.
#
# Here, once: python benchmarks/gpu_prepare.py (graphs into .gpu/), then
# python benchmarks/gpu_pack_onnxruntime.py WHEEL (onnxruntime-gpu for the machine's Python 3.12, as
# .gpu/ort.tar.xz.part-*).  Each call sends the tracked tree too (75 MB, over the 64 MiB limit): move
# models/artifacts' big files aside for the calls, then `git checkout -- models/artifacts`.  Stop 21's
# calls: (1) carry part-00 + text/text_fp16.onnx; (2) part-01, cnn/ and text's small files, run
# `--groups cnn no_exit`; (3) text/text_weights.bin, run `--groups text`.  Results:
# $OUT/gpu_check_<groups>.json; back here, gpu_check.py --record them.
set -euo pipefail
SITE=/tmp/ort-gpu
if [ ! -d "$SITE/onnxruntime" ]; then
    mkdir -p "$SITE"
    cat .gpu/ort.tar.xz.part-* | xz -d | tar -C "$SITE" -xf -
fi
# onnxruntime-gpu needs CUDA 13 and cuDNN 9: the machine's PyTorch ships them as nvidia-* packages.
NVIDIA=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || echo /usr/local/cuda/lib64)
LIBS=$( (find "$NVIDIA" -name 'lib*.so*' -printf '%h\n' 2>/dev/null || true) | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
ln -sfn ../passes moco_compile/passes
ln -sfn ../runtime moco_compile/runtime
export PYTHONPATH="$SITE:." PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
python3 -c 'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())'
python3 benchmarks/gpu_check.py --artefacts .gpu --out "${OUT:-out/gpu}" "$@"
