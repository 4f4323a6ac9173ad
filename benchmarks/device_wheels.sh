#!/usr/bin/env bash
# The Python packages loraplex's server and benchmarks need that the H200 device image lacks
# (its python3 is 3.12 with torch, triton, transformers, numpy, safetensors, tokenizers, ...),
# as py3.12 x86-64 wheels in .whl/ (git-ignored). Run here, then name .whl in the device
# call's carry and start its command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit;
# (the device README's recipe; PATH for py-spy). About 23 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$@"
}
# The server (fastapi and its stack), structured outputs (llguidance), the benchmarks' client
# (openai and its stack), /metrics (prometheus_client), plugin hooks (pluggy), and py-spy for
# profiles; versions as tested on the CPU.
download fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 httptools==0.9.0 uvloop==0.23.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0 anyio==4.16.0 \
  opentelemetry-api==1.45.2 llguidance==1.9.1 openai==3.63.0 httpx2==2.17.0 httpcore2==2.17.0 truststore \
  idna==3.20 jiter==0.19.0 sniffio==1.3.1 distro py-spy prometheus_client==0.26.0 pluggy==1.7.0

# loraplex itself: run from src/ there (PYTHONPATH=src first), but its entry points (the
# built-in resolvers are plugins) exist only in an installed distribution's metadata.
rm -f .whl/loraplex-*.whl
python3 -m pip wheel -q --no-deps -w .whl .
ls .whl
