"""Generate the gRPC messages and stubs of `schema/modelmora/v1/*.proto` (ours) and
`schema/inference/*.proto` (the Open Inference Protocol's) into a package folder.

`just proto` runs it into `modelmora/_proto/` (committed); a test runs it into a temporary folder
and fails when the result differs from the committed code. Uses the pinned betterproto2 compiler
(its plugin formats the code with ruff, so this environment's bin folder goes first on PATH) and
grpcio-tools' protoc. Also writes `descriptors.binpb`, the serialized file descriptors, which the
server's reflection service answers from (the generated messages carry no protobuf descriptors).

    python schema/generate_proto.py OUT_DIR
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCHEMA = Path(__file__).resolve().parent
PROTOS = sorted(
    str(p.relative_to(SCHEMA))
    for folder in ("modelmora/v1", "inference")  # ours, and the Open Inference Protocol's
    for p in (SCHEMA / folder).glob("*.proto")
)
OPTIONS = "client_generation=async,server_generation=async"


def generate(out: Path) -> None:
    """Replace `out` with freshly generated code (`out` becomes a package: `__init__.py`)."""
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))}
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{SCHEMA}"]
    subprocess.run(
        [*protoc, f"--python_betterproto2_out={out}", f"--python_betterproto2_opt={OPTIONS}", *PROTOS],
        check=True,
        env=env,
        cwd=SCHEMA,
    )
    subprocess.run(
        [*protoc, "--include_imports", f"--descriptor_set_out={out / 'descriptors.binpb'}", *PROTOS],
        check=True,
        env=env,
        cwd=SCHEMA,
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    generate(Path(sys.argv[1]))
