"""Generates the Python gRPC stubs for proto/upscale.proto into ./generated (not committed).

    python gen_stubs.py

Needs grpcio-tools (see requirements.txt).
"""

from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto"
OUT = HERE / "generated"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "__init__.py").touch()
    # protoc's own well-known types (google/protobuf/timestamp.proto) ship with grpc_tools.
    include = Path(protoc.__file__).resolve().parent / "_proto"
    rc = protoc.main([
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        str(PROTO_DIR / "upscale.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")
    # The generated service module imports `upscale_pb2` as a top-level module; make it
    # relative so `generated` works as a package.
    grpc_mod = OUT / "upscale_pb2_grpc.py"
    text = grpc_mod.read_text()
    grpc_mod.write_text(text.replace("import upscale_pb2 as", "from . import upscale_pb2 as"))
    print(f"stubs written to {OUT}")


if __name__ == "__main__":
    main()
