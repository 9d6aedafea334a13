"""A client of the Flask service this server replaces, written as its users wrote them with
`requests`: post a picture to /upscale, poll /tasks/<id> until SUCCESS, download
/processed/<name>, post the same picture again and be sent to the stored result.

    python old_api.py --base-url http://127.0.0.1:50051 --image cat.png [--ca cert.pem]

Exits 0 when every step behaved as the old service did, 1 with a message otherwise.
"""

import argparse
import os
import struct
import sys
import time

import requests


def png_size(data):
    """Width and height from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError("the result is not a PNG")
    return struct.unpack(">II", data[16:24])


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def run(base, image_path, verify):
    session = requests.Session()
    # Per call: requests lets REQUESTS_CA_BUNDLE override a session's `verify`.
    def get(url):
        return session.get(url, timeout=30, verify=verify)
    name = os.path.basename(image_path)
    with open(image_path, "rb") as f:
        original = f.read()

    def post():
        with open(image_path, "rb") as f:
            return session.post(base + "/upscale", files={"image": (name, f, "image/png")},
                                timeout=30, verify=verify)

    r = post()
    check(r.status_code == 202, f"POST /upscale: {r.status_code} {r.text}")
    body = r.json()
    task_id = body["task_id"]
    check(r.headers["Location"] == f"/tasks/{task_id}", f"Location {r.headers.get('Location')}")
    print(f"queued task {task_id} (HTTP/{r.raw.version / 10:.1f})")

    deadline = time.time() + 120
    while True:
        r = get(f"{base}/tasks/{task_id}")
        check(r.status_code == 200, f"GET /tasks: {r.status_code} {r.text}")
        task = r.json()
        if task["status"] in ("SUCCESS", "FAILURE"):
            break
        check(time.time() < deadline, f"task not done: {task}")
        time.sleep(0.2)
    check(task["status"] == "SUCCESS", f"task failed: {task}")

    r = get(f"{base}/processed/{name}")
    check(r.status_code == 200, f"GET /processed: {r.status_code}")
    check(r.headers["Content-Type"] == "image/png", r.headers["Content-Type"])
    result = r.content
    w, h = png_size(original)
    check(png_size(result) == (4 * w, 4 * h), f"result is {png_size(result)}, input {w}x{h}")
    print(f"fetched {len(result)} bytes, {4 * w}x{4 * h}")

    r = post()
    check(r.status_code == 200, f"second POST: {r.status_code} {r.text}")
    body = r.json()
    check(body["outcome"] == "already_processed", f"second POST: {body}")
    again = get(base + r.headers["Location"])
    check(again.status_code == 200 and again.content == result, "the stored result differs")
    print("the same picture again was routed to the stored result")

    r = get(f"{base}/tasks/no-such-task")
    check(r.status_code == 404 and "error" in r.json(), f"unknown task: {r.status_code} {r.text}")
    r = session.post(base + "/upscale", files={"picture": (name, original)}, timeout=30,
                     verify=verify)
    check(r.status_code == 400, f"missing image field: {r.status_code} {r.text}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--ca", help="CA certificate to trust (https)")
    args = parser.parse_args()
    try:
        run(args.base_url.rstrip("/"), args.image, args.ca or True)
    except (AssertionError, requests.RequestException, KeyError, ValueError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
