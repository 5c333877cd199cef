#!/usr/bin/env bash
# Downloads the packages the GPU machine's image lacks into .whl/ (ignored by git; carried with
# `carry=[".whl"]`), for its Python 3.12 on x86-64. Its image has torch 2.11, transformers 5.x, peft,
# safetensors, huggingface_hub, pyyaml, matplotlib; it lacks diffusers, pydantic and open_clip. Ray is not
# carried (its wheel exceeds what can travel): everything run there uses the local backend.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -la .whl
du -sh .whl
