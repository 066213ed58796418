#!/usr/bin/env python
"""A static file server on loopback for published cache roots (kdcache publish): aiohttp's static files (Range
requests answered with 206), a log of every request, and faults to inject. Used by tests/test_http.py and
tools/bench_http.py; also by hand, to try a published root:

    kdcache publish /scratch/root
    python tools/static_server.py /scratch/root            # prints the URL; serves until interrupted
    kdcache ls http://127.0.0.1:PORT

Faults (`StaticServer.inject(path, *modes)`, consumed one per request to that path, in order):
    "truncate"      send the first half of the object under a Content-Length of the whole, then close
    "fail"          answer 503
    "ignore-range"  answer as a server without Range support: the whole object, status 200
"""

import argparse
import asyncio
import collections
import sys
import threading
from pathlib import Path
from typing import Deque, Dict, List, NamedTuple, Optional


class Request(NamedTuple):
    method: str
    path: str
    range: Optional[str]     # the Range header sent, if any
    status: int


class StaticServer:
    """Serves `root` at http://HOST:PORT/ from a thread of this process (port 0: a free port)."""

    def __init__(self, root, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root).resolve()
        self.host, self.port = host, port
        self.requests: List[Request] = []
        self._faults: Dict[str, Deque[str]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def inject(self, path: str, *modes: str) -> None:
        with self._lock:
            self._faults[path].extend(modes)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _fault(self, path: str) -> Optional[str]:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    def _log(self, request, range_header, status) -> None:
        with self._lock:
            self.requests.append(Request(request.method, request.path, range_header, status))

    def _middleware(self):
        from aiohttp import web

        @web.middleware
        async def middleware(request, handler):
            request["sent_range"] = request.headers.get("Range")
            fault = self._fault(request.path)
            if fault == "fail":
                return web.Response(status=503, text="injected failure")
            if fault == "truncate":
                data = (self.root / request.path.lstrip("/")).read_bytes()
                response = web.StreamResponse(status=200, headers={"Content-Length": str(len(data))})
                await response.prepare(request)
                await response.write(data[:len(data) // 2])
                request.transport.close()   # the connection drops mid-body
                return response
            if fault == "ignore-range":   # the whole object, as a server without Range support sends it
                return web.Response(body=(self.root / request.path.lstrip("/")).read_bytes(), status=200,
                                    content_type="application/octet-stream")
            return await handler(request)
        return middleware

    async def _on_prepare(self, request, response) -> None:
        # the status a file response sends (206 for a range) is known only once it is prepared
        self._log(request, request.get("sent_range"), response.status)

    def start(self) -> "StaticServer":
        from aiohttp import web
        ready, failed = threading.Event(), []

        def serve():
            loop = self._loop = asyncio.new_event_loop()
            try:
                app = web.Application(middlewares=[self._middleware()])
                app.on_response_prepare.append(self._on_prepare)
                app.router.add_static("/", self.root, show_index=False, follow_symlinks=False)
                runner = web.AppRunner(app, access_log=None)
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = runner.addresses[0][1]
            except BaseException as exc:   # reported by start()
                failed.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()
        self._thread = threading.Thread(target=serve, daemon=True, name="static-server")
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("the static server did not start within 60 s")
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
            self._thread = None

    def __enter__(self) -> "StaticServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    server = StaticServer(args.root, args.host, args.port).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
