"""Generate Python code from proto/ into src/meshway/api (reproducible: pinned grpcio-tools).

`--check` regenerates into a temporary directory and fails if the committed files differ.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = Path("meshway") / "api"


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--mypy_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    generated = sorted(p.relative_to(out) for p in (out / OUT_PACKAGE).rglob("*") if p.is_file())
    return generated


def main() -> int:
    check = "--check" in sys.argv[1:]
    dest = ROOT / "src"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = generate(out)
        stale = [
            f for f in files if not (dest / f).exists() or not filecmp.cmp(out / f, dest / f, False)
        ]
        if check:
            if stale:
                print("generated protobuf code is out of date; run `make proto`:", file=sys.stderr)
                for f in stale:
                    print(f"  {f}", file=sys.stderr)
                return 1
            return 0
        for f in files:
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / f, dest / f)
        print(f"generated {len(files)} files under src/{OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
