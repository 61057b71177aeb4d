#!/bin/bash
# Prepare, on this CPU machine, everything benchmarks/gpu_check.sh needs on a lent GPU machine; from the
# repository root:
#
#   bash benchmarks/gpu_pack.sh          graphs into .gpu/ (benchmarks/gpu_prepare.py), onnxruntime-gpu for
#                                        Python 3.12 and sm_90 packed into .gpu/ort.tar.xz.part-* (its wheel
#                                        from the package registry once), then the call plan with its bytes
#   bash benchmarks/gpu_pack.sh aside    move models/artifacts' big tracked files out of the tree, which
#                                        travels with every call (the calls need only fashion_resnet.onnx)
#   bash benchmarks/gpu_pack.sh restore  move them back
#   bash benchmarks/gpu_pack.sh plan     the call plan and each call's bytes against the 64 MiB limit
set -euo pipefail
ORT_VERSION=1.31.1
WHEELS=/tmp/moco-ort-wheel
ASIDE=/tmp/moco-artifacts-aside
BIG=(models/artifacts/*.pt models/artifacts/fashion_calib.npz models/artifacts/*_tokens.npz)
LIMIT=$((64 * 1024 * 1024))
PY=${PYTHON:-python}
CALL1=(.gpu/ort.tar.xz.part-00 .gpu/ort.tar.xz.part-01 .gpu/cnn/cnn_prepared.onnx .gpu/cnn/cnn_plan.json
       .gpu/cnn/cnn_test.npz)
CALL2=(.gpu/cnn .gpu/text)

tree_bytes() {  # what travels besides the carried paths: tracked files present, untracked ones not ignored
    { git ls-files -z; git ls-files -z --others --exclude-standard; } \
        | xargs -0 -I{} sh -c '[ -f "{}" ] && stat -c %s "{}" || true' | awk '{s += $1} END {print s + 0}'
}

call_plan() {
    local tree carried
    tree=$(tree_bytes)
    echo "tracked tree (travels with each call): $tree bytes"
    for call in 1 2; do
        local -n paths="CALL$call"
        carried=$(du -cb "${paths[@]}" | tail -1 | cut -f1)
        echo "call $call: carry ${paths[*]}"
        echo "  carried $carried + tree $tree = $((carried + tree)) bytes of $LIMIT ($(( (carried + tree) * 100 / LIMIT ))%)"
        [ $((carried + tree)) -le $LIMIT ] || echo "  OVER THE LIMIT: run 'bash benchmarks/gpu_pack.sh aside' first" >&2
    done
    echo "call 1 command: bash benchmarks/gpu_check.sh --groups served cycling   (timeout_s 540)"
    echo "call 2 command: bash benchmarks/gpu_check.sh --groups cnn no_exit text (timeout_s 360), within 30 s of call 1"
}

case "${1:-pack}" in
    pack)
        PYTHONPATH=. $PY benchmarks/gpu_prepare.py --out .gpu
        # two calls cannot hold it too (text 85 MB, onnxruntime 61 MB): the text group's float16 steps record
        # the file as missing; an optional third call carries .gpu/fp16 (see gpu_check.sh's header)
        mkdir -p .gpu/fp16 && mv .gpu/text/text_fp16.onnx .gpu/fp16/
        if ! ls "$WHEELS"/onnxruntime_gpu-"$ORT_VERSION"-cp312-*.whl >/dev/null 2>&1; then
            $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 "onnxruntime-gpu==$ORT_VERSION" -d "$WHEELS"
        fi
        rm -f .gpu/ort.tar.xz.part-*
        $PY benchmarks/gpu_pack_onnxruntime.py "$WHEELS"/onnxruntime_gpu-"$ORT_VERSION"-cp312-*.whl --arch 90 --out .gpu
        call_plan
        ;;
    aside)
        mkdir -p "$ASIDE"
        for file in "${BIG[@]}"; do [ -f "$file" ] && mv "$file" "$ASIDE/"; done
        call_plan
        ;;
    restore)
        mv "$ASIDE"/* models/artifacts/
        git status --short models/artifacts
        ;;
    plan)
        call_plan
        ;;
    *)
        echo "usage: bash benchmarks/gpu_pack.sh [pack|aside|restore|plan]" >&2
        exit 2
        ;;
esac
