"""Generate the Python protobuf/gRPC code (and its type stubs) from protos/.

The output lives in the client package only, so the commerce service can
install it without the server's dependencies. Run through `make gen`; never
edit the output by hand. `--check` regenerates into a temporary folder and
fails when the committed code differs (CI runs it).

Besides the code, a FileDescriptorSet with the proto comments
(`--include_source_info`, which the generated _pb2 modules drop): the server's
reflection answers from it, so `grpcurl describe` shows the documentation.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python" / "src"
PACKAGE_DIR = Path("integrations") / "v1"
DESCRIPTOR_SET = "integrations_descriptor_set.binpb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi", DESCRIPTOR_SET)


def generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    # The mypy-protobuf plugins sit next to this interpreter, on PATH or not.
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        f"--descriptor_set_out={out_root / PACKAGE_DIR / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in (out_root / "integrations", out_root / PACKAGE_DIR):
        (package / "__init__.py").touch()


def generated_files(out_root: Path) -> set[str]:
    package = out_root / PACKAGE_DIR
    return {p.name for p in package.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected, actual = generated_files(fresh), generated_files(OUT_ROOT)
        differing = sorted(expected ^ actual)
        differing += sorted(
            name
            for name in expected & actual
            if not filecmp.cmp(fresh / PACKAGE_DIR / name, OUT_ROOT / PACKAGE_DIR / name, shallow=False)
        )
    if differing:
        print("generated code is out of date with protos/ (run `make gen`):", *differing, sep="\n  ")
        return 1
    print("generated code matches protos/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    if parser.parse_args().check:
        return check()
    target = OUT_ROOT / PACKAGE_DIR
    if target.exists():
        for stale in target.iterdir():
            if stale.name.endswith(GENERATED_SUFFIXES):
                stale.unlink()
    generate(OUT_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
