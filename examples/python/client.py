"""A small Python client for the upscaler service: upload an image, watch its task, fetch
the result. Run `python gen_stubs.py` once first.

    python client.py cat.png -o cat_x4.png [--addr 127.0.0.1:50051] [--model NAME] [--token T]
                     [--wait-ready SECS]

A server that is not listening yet, or still loading its model, answers UNAVAILABLE; the
upload is retried with backoff for up to --wait-ready seconds (default 30).

Exit status: 0 success, 1 the task failed, 2 the server refused the request, 3 the server
is unreachable.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import grpc

from generated import upscale_pb2 as pb
from generated import upscale_pb2_grpc as rpc

CHUNK = 1 << 20


def upload_requests(path: Path, model: str):
    yield pb.UploadImageRequest(metadata=pb.UploadMetadata(file_name=path.name, model=model))
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield pb.UploadImageRequest(chunk=chunk)


def when_ready(call, wait_ready: float):
    """Runs `call` until it gets anything but UNAVAILABLE, for at most `wait_ready` seconds,
    with backoff; says once on stderr that it waits."""
    deadline = time.monotonic() + wait_ready
    delay, said = 0.1, False
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            left = deadline - time.monotonic()
            if e.code() != grpc.StatusCode.UNAVAILABLE or left <= 0:
                raise
            if not said:
                print(f"waiting for the server to become ready (up to {wait_ready:g}s): "
                      f"{e.details()}", file=sys.stderr)
                said = True
            time.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--addr", default=os.environ.get("UPSCALER_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--model", default="")
    parser.add_argument("--token", default=os.environ.get("UPSCALER_TOKEN"))
    parser.add_argument("--wait-ready", type=float, metavar="SECS",
                        default=float(os.environ.get("UPSCALER_WAIT_READY", "30")))
    args = parser.parse_args()

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with grpc.insecure_channel(args.addr.removeprefix("http://")) as channel:
        stub = rpc.UpscalerStub(channel)
        try:
            reply = when_ready(
                lambda: stub.UploadImage(upload_requests(args.file, args.model),
                                         metadata=metadata, timeout=60),
                args.wait_ready)
            outcome = pb.UploadOutcome.Name(reply.outcome)
            print(f"{outcome} {reply.file_name} task {reply.task_id}", file=sys.stderr)
            if reply.outcome != pb.UPLOAD_OUTCOME_ALREADY_PROCESSED:
                last = None
                for task in stub.WatchTask(pb.WatchTaskRequest(task_id=reply.task_id),
                                           metadata=metadata):
                    last = task
                    print(f"  {pb.TaskState.Name(task.state)} {task.tiles_done}/{task.tiles_total}",
                          file=sys.stderr)
                if last is None or last.state != pb.TASK_STATE_SUCCESS:
                    print(f"task failed: {last.error if last else 'no update'}", file=sys.stderr)
                    return 1
            stream = stub.FetchProcessed(pb.FetchProcessedRequest(file_name=reply.file_name),
                                         metadata=metadata)
            meta = next(stream).metadata
            data = b"".join(msg.chunk for msg in stream)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 3 if e.code() == grpc.StatusCode.UNAVAILABLE else 2
    if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
        print("error: the result does not match its announced size and sha256", file=sys.stderr)
        return 1
    args.output.write_bytes(data)
    print(f"{meta.file_name} -> {args.output} ({meta.width}x{meta.height}, {meta.size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
