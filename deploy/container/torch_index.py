"""A stand-in for PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu/) during
an image build on a machine that cannot reach it.

The CPU Bento's requirements name that index (``--extra-index-url``) for ``torch==...+cpu``;
uv asks it first for every package and stops at a network error. This serves the one local
torch wheel under the index's own URL layout (PEP 503 pages with sha256 fragments) and answers
404 for every other project, so uv falls through to PyPI for those, as it does against the
real index for projects it does not carry. TLS with a certificate signed by a CA made for the
build (see build_and_run.sh); the base image trusts that CA.

    python torch_index.py --wheel /opt/wheels/torch-...whl --cert server.pem --key server.key
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import ssl
import urllib.parse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True, action="append")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=443)
    args = parser.parse_args()

    wheels = {w.name: w for w in args.wheel}
    digests = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in wheels.items()}
    projects: dict[str, list[str]] = {}
    for name in wheels:
        projects.setdefault(name.split("-")[0].lower().replace("_", "-"), []).append(name)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # uv asks before downloading a wheel
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            self.head = head
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            parts = [p for p in path.split("/") if p]
            if parts[:2] == ["whl", "cpu"] and len(parts) == 3 and parts[2] in projects:
                links = "".join(
                    f'<a href="/whl/{urllib.parse.quote(n)}#sha256={digests[n]}">{n}</a><br>\n'
                    for n in projects[parts[2]]
                )
                self._send(
                    200,
                    "text/html",
                    f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode(),
                )
            elif parts[:1] == ["whl"] and len(parts) == 2 and parts[1] in wheels:
                self._send(200, "application/octet-stream", wheels[parts[1]].read_bytes())
            else:
                self._send(404, "text/plain", b"not mirrored here\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not self.head:
                self.wfile.write(body)

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"serving {sorted(wheels)} on https://{args.host}:{args.port}/whl/cpu/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
