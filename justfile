# ModelMora tasks. `uv run just` lists them; `uv run just test` is what CI runs.

default:
    @just --list

# Run the server on its embedded defaults (SQLite registry under MODELMORA_HOME, port 8000).
serve *ARGS:
    mm serve {{ARGS}}

# The whole test suite: lint, format check, type check, tests with coverage (>= 90%).
test: lint typecheck pytest

lint:
    ruff check .
    ruff format --check .

typecheck:
    mypy

# Tests with coverage; `just pytest -m "not slow"` is the quick loop (CI runs them all).
pytest *ARGS:
    coverage erase
    pytest --cov --cov-report=term-missing:skip-covered --durations=25 {{ARGS}}

# Format and fix what ruff can.
fmt:
    ruff format .
    ruff check --fix .

# Benchmarks (results go to bench/RESULTS.md).
bench-latency *ARGS:
    python bench/bench_latency.py {{ARGS}}

bench-ipc *ARGS:
    python bench/bench_ipc.py {{ARGS}}

# TLS + tokens against cleartext without tokens at concurrency 64, REST (needs wrk) and gRPC.
bench-security *ARGS:
    python bench/bench_security.py {{ARGS}}

# Embeddings through native, OpenAI and Open Inference Protocol (REST, gRPC) endpoints in one run.
bench-protocols *ARGS:
    python bench/bench_protocols.py {{ARGS}}

# Needs a CUDA GPU: utilisation with and without batching, GPU memory around load and unload.
bench-gpu *ARGS:
    python bench/bench_gpu.py {{ARGS}}

# Regenerate the gRPC messages and stubs in modelmora/_proto/ from schema/modelmora/v1/*.proto and
# schema/inference/*.proto (the Open Inference Protocol's)
# (betterproto2, pinned in uv.lock; commit the result: a test fails when it is stale).
proto:
    python schema/generate_proto.py modelmora/_proto

# Regenerate schema/openapi.json and the registry's JSON Schemas from the msgspec types.
schema:
    python -c "import json; from modelmora.api import openapi; open('schema/openapi.json', 'w').write(json.dumps(openapi.document(), indent=2, sort_keys=True) + '\n')"
    python -m modelmora.registry.schemas schema

# Build deploy/Dockerfile with podman and run the image: non-root user, health check, a MiniLM embedding
# from a mounted volume, a 64 MB /dev/shm refused (slow: it installs torch into the image; not in `test`).
image-test *ARGS:
    python deploy/image_test.py {{ARGS}}
