#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what benchmarks/device_suite.sh installs on the device machine,
# which reaches no package registry: the packages its image lacks, as wheels for its Python 3.12 on
# x86-64 at the versions this checkout's venv is tested with, and the project's own wheel (it
# registers the `vpdsr serve` entry points). The run tool carries the folder: keep it well under
# the 64 MiB a call may carry with the working tree. Run here, with network:
#
#   bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
# The device image has torch, numpy, safetensors, httpx, prometheus-client, timm, huggingface-hub,
# regex, six, click and h11. Everything else the service and the trainer import, with the
# requirements of those that the image may have too old (typing-extensions for pydantic) or lacks:
NAMES=(fastapi starlette anyio opentelemetry-api annotated-doc pydantic pydantic-core pydantic-settings python-dotenv
       typing-extensions typing-inspection annotated-types uvicorn python-multipart redis open_clip_torch ftfy wcwidth
       pytorch_wavelets PyWavelets setuptools)
mapfile -t PINS < <("$PYTHON" -c 'import importlib.metadata as m, sys; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]), sep="\n")' "${NAMES[@]}")
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PINS[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w .whl .
ls .whl
du -sh .whl
