#!/usr/bin/env bash
# The GPU benchmark (issue 13) on a host with one NVIDIA GPU, in one command, under 10 min:
#
#   bash benchmarks/gpu.sh [WHEEL_DIR]          # on the GPU host
#   bash benchmarks/gpu.sh --fetch WHEEL_DIR    # beforehand, where the package registry is
#
# The GPU hosts have Python 3.12 and torch 2.11 (CUDA 13) with numpy, pyyaml, pyarrow,
# fsspec, torchmetrics, tqdm and tensorboard, but not torchrec, fbgemm-gpu, tensordict or
# pydantic. `--fetch` downloads those as cp312 wheels matched to torch 2.11 (fbgemm-gpu
# 1.6.0 is built for CUDA 13.0; torchrec 1.6.1 goes with it) into WHEEL_DIR and splits
# the 465 MB fbgemm-gpu wheel into 60 MB pieces, one folder each (piece.aa/, piece.ab/, ...)
# with the whole wheel's sha256 beside them, for hosts that take files in small parts.
# On the GPU host WHEEL_DIR (default /tmp/w) holds the wheels, or the pieces, which are
# joined and checked against the sha256 first. Writes
# benchmarks/results/gpu-<device>.json (or into $OUT/ when set) and prints each section.
set -euo pipefail
cd "$(dirname "$0")/.."

FBGEMM=fbgemm-gpu==1.6.0
TORCHREC=torchrec==1.6.1
TENSORDICT=${TENSORDICT:-tensordict==0.11.0}
# The versions this repository's tests run with (requirements/, the CPU environment).
OTHERS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        pyre-extensions==0.0.32 typing-inspect==0.9.0 mypy-extensions==1.2.0
        cloudpickle==3.1.3 pyvers==0.2.3 filelock==4.3.1)

if [[ "${1:-}" == "--fetch" ]]; then
    dir=${2:?usage: bash benchmarks/gpu.sh --fetch WHEEL_DIR}
    mkdir -p "$dir/all"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir/all" \
        "$FBGEMM" "$TORCHREC" "$TENSORDICT" "${OTHERS[@]}"
    wheel=$(ls "$dir"/all/fbgemm_gpu-*.whl)
    (cd "$dir/all" && sha256sum "$(basename "$wheel")" > ../fbgemm.sha256)
    split -b 60M "$wheel" "$dir/part."
    for part in "$dir"/part.*; do
        mkdir -p "$dir/piece.${part##*.}" && mv "$part" "$dir/piece.${part##*.}/"
    done
    mkdir -p "$dir/small" && find "$dir/all" -name '*.whl' ! -name 'fbgemm_gpu-*' \
        -exec cp {} "$dir/small/" \;
    echo "wheels in $dir/small, fbgemm-gpu in $(ls -d "$dir"/piece.* | wc -l) pieces"
    exit 0
fi

wheels=${1:-/tmp/w}
site=${SITE:-/tmp/tml-site}
found() { python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)"; }
if ! found torchrec || ! found fbgemm_gpu; then
    if [[ -f "$wheels/fbgemm.sha256" ]] && ! ls "$wheels"/fbgemm_gpu-*.whl >/dev/null 2>&1; then
        name=$(awk '{print $2}' "$wheels/fbgemm.sha256")
        cat "$wheels"/piece.*/part.* > "$wheels/$name"
        (cd "$wheels" && sha256sum -c fbgemm.sha256)
    fi
    python3 -m pip install -q --no-index --no-deps --target "$site" \
        "$wheels"/fbgemm_gpu-*.whl $(find "$wheels" -maxdepth 2 -name '*.whl' \
        ! -name 'fbgemm_gpu-*' ! -path '*/all/*')
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 560 python3 -m benchmarks.gpu --out-dir "${OUT:-benchmarks/results}" "${@:2}"
