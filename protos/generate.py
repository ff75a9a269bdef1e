"""Regenerate the committed gRPC stubs: `python -m protos.generate` from the repository root.

tests/protos/test_stubs.py runs this into a temporary directory and fails when the committed
stubs differ, so the .proto and the stubs never drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["PROTO", "generate"]

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/edgeweave_v1.proto"


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Writes protos/edgeweave_v1_pb2.py, _pb2.pyi and _pb2_grpc.py under out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                      f"--grpc_python_out={out_dir}", str(ROOT / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    stem = out_dir / "protos" / "edgeweave_v1"
    return [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT))
    sys.exit(0)
