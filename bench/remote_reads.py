"""A fit's buffer read from object storage, one ranged request at a time against several in flight,
side by side, at round trips a real bucket has (not a test).

    python bench/remote_reads.py [--tokens 16384] [--rtt-ms 0,10,25] [--rounds 3]

Harvests the offline SmolLM2 into a bucket of a moto server on 127.0.0.1, then reads the whole
training split as one shuffle buffer (`BufferReader.read`, what the fit's loader does per buffer:
one request per layer and run of chunks) through a loopback proxy that holds every request for
the given round trip before passing it on. Prints seconds per read with 1 reader and with
`data.REMOTE_READERS`, and their ratio. Moto answers from memory in a Python process, so at 0 ms
the ratio shows only what overlapping costs or saves on this machine; a bucket's tens of
milliseconds per request are what the readers overlap.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import make_bucket, s3_server  # noqa: E402


class _Delayed(BaseHTTPRequestHandler):
    """Passes each request on to the upstream server after the server's `delay` seconds."""

    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        time.sleep(self.server.delay)  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port)  # type: ignore[attr-defined]
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            # a HEAD reply's length is the object's; otherwise the body is re-sent whole
            if key.lower() not in ("transfer-encoding", "connection") and (
                    key.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def delaying_proxy(upstream_url: str) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Delayed)
    server.daemon_threads = True
    server.upstream_port = int(upstream_url.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    server.delay = 0.0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rtt-ms", default="0,10,25", help="round trips added to every request")
    ap.add_argument("--rounds", type=int, default=3, help="alternating reads of each kind; the best counts")
    a = ap.parse_args()
    with s3_server() as env:
        make_bucket(env, "bench-reads")
        url = "s3://bench-reads/store.zarr"
        subprocess.run([sys.executable, "-m", "routesae", "harvest", "--model", "smollm2", "--dataset", "builtin",
                        "--tokens", str(a.tokens), "--out", url], check=True, env={**os.environ, **env},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proxy, proxy_url = delaying_proxy(env["AWS_ENDPOINT_URL"])
        os.environ.update({**env, "AWS_ENDPOINT_URL": proxy_url})  # this process reads through the proxy

        import routesae.train.data as data
        from routesae import Cache

        cache = Cache.open(url, require_complete=True)
        split = data.TokenSplit.of(cache, 0.05)
        reader = data.BufferReader(cache, cache.layers, split, seed=0, include_special=False)
        chunks = np.arange(split.n_chunks)
        readers = data.REMOTE_READERS
        print(f"{a.tokens:,} tokens of SmolLM2, {len(cache.layers)} layers, {split.n_chunks} chunks in one buffer "
              f"(one request per layer and run of chunks), moto on 127.0.0.1 behind a delaying proxy")
        for rtt in (float(r) for r in a.rtt_ms.split(",")):
            proxy.delay = rtt / 1000  # type: ignore[attr-defined]
            best = {1: float("inf"), readers: float("inf")}
            for _ in range(a.rounds):
                for n in best:
                    data.REMOTE_READERS = n
                    t = time.perf_counter()
                    reader.read(0, 0, chunks)
                    best[n] = min(best[n], time.perf_counter() - t)
            data.REMOTE_READERS = readers
            print(f"  round trip {rtt:4.0f} ms: 1 reader {best[1]:6.2f} s, {readers} readers {best[readers]:6.2f} s, "
                  f"{best[1] / best[readers]:5.2f}x")
        proxy.shutdown()


if __name__ == "__main__":
    main()
