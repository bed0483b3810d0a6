"""A small HTTP JSON ranking service over a :class:`~din_torchrec.serving.predictor.Predictor`.

Endpoints (stdlib :class:`http.server.ThreadingHTTPServer`, one thread per connection, loopback by
default):

* ``GET /health`` -> ``{"status": "ok", "model", "quantization", "cache": {...}, "requests": {...}}``.
* ``POST /rank`` with one request (:mod:`din_torchrec.serving.requests`), optionally ``"top_k": k`` and
  ``"attention": true`` -> ``{"scores": [...], "logits": [...], "order": [...], "cache_hit", "truncated"}``
  (``order``/``scores`` cut to the best k with ``top_k``); or ``{"requests": [...]}`` (at most
  ``max_batch``) -> ``{"rankings": [...]}``.
* ``POST /explain`` with one request -> the :class:`~din_torchrec.serving.explain.Explanation` JSON.

Concurrent ``/rank`` requests are micro-batched: handler threads validate their request, then hand it to
one scoring thread that scores whatever has queued up (up to ``max_batch`` requests, waiting at most
``batch_wait_ms`` for more) with one ``rank_prepared`` call.

Every bad input gets a 4xx and a JSON body ``{"error": {"status", "field", "message"}}``; the server keeps
serving: 400 malformed JSON / wrong types / missing or unknown fields, 404 unknown path, 405 wrong method,
411 no Content-Length, 413 body, history or candidate list too large, 415 non-JSON content type, 422 ids
outside their tables. An unexpected failure is a 500 with the exception's message (and is logged).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from din_torchrec.serving.predictor import Predictor, Ranking
from din_torchrec.serving.requests import PreparedRequest, RankRequest, RequestError

log = logging.getLogger(__name__)

RANK_OPTIONS = ("top_k", "attention")


class MicroBatcher:
    """Scores prepared requests from many threads in batches, on one worker thread."""

    def __init__(self, predictor: Predictor, max_batch: int = 64, wait_ms: float = 2.0) -> None:
        self.predictor = predictor
        self.max_batch = max(1, max_batch)
        self.wait = max(0.0, wait_ms) / 1000.0
        self._queue: queue.Queue[tuple[PreparedRequest, bool, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ranking-batcher", daemon=True)
        self.batches = 0
        self._thread.start()

    def submit(self, prepared: PreparedRequest, attention: bool = False) -> Future:
        fut: Future = Future()
        self._queue.put((prepared, attention, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            deadline = time.monotonic() + self.wait
            stop = False
            while len(items) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                items.append(item)
            self._score(items)
            if stop:
                return

    def _score(self, items: list[tuple[PreparedRequest, bool, Future]]) -> None:
        attention = any(a for _, a, _ in items)
        try:
            rankings = self.predictor.rank_prepared([p for p, _, _ in items], attention=attention)
        except Exception as e:  # one bad batch must not kill the worker
            for _, _, fut in items:
                fut.set_exception(e)
            return
        self.batches += 1
        for (_, a, fut), r in zip(items, rankings):
            if not a:
                r.attention = None
            fut.set_result(r)


class RankingServer(ThreadingHTTPServer):
    """The HTTP server; ``predictor`` and the limits are read by :class:`RankingHandler`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        predictor: Predictor,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body_bytes: int = 4 << 20,
        max_batch: int = 64,
        batch_wait_ms: float = 2.0,
    ) -> None:
        super().__init__((host, port), RankingHandler)
        self.predictor = predictor
        self.max_body_bytes = max_body_bytes
        self.max_batch = max_batch
        self.batcher = MicroBatcher(predictor, max_batch, batch_wait_ms)
        self.started = time.time()
        self.counts = {"ok": 0, "client_error": 0, "server_error": 0}
        self._count_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, status: int) -> None:
        key = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
        with self._count_lock:
            self.counts[key] += 1

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()


class RankingHandler(BaseHTTPRequestHandler):
    server: RankingServer
    server_version = "din-torchrec"

    # ------------------------------------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.count(status)

    def _error(self, status: int, message: str, field: str | None = None) -> None:
        self._send(status, RequestError(message, status, field).to_json())

    def _read_json(self) -> Any:
        ctype = self.headers.get("Content-Type", "application/json")
        if ctype.split(";")[0].strip().lower() not in ("application/json", ""):
            raise RequestError(f"expected Content-Type application/json, got {ctype!r}", 415)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a body with Content-Length is required", 411)
        try:
            n = int(length)
        except ValueError:
            raise RequestError(f"bad Content-Length {length!r}", 400) from None
        if n < 0:
            raise RequestError(f"bad Content-Length {length!r}", 400)
        if n > self.server.max_body_bytes:
            raise RequestError(f"body of {n} bytes, more than the limit of {self.server.max_body_bytes}", 413)
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError("body is not UTF-8", 400) from None
        except json.JSONDecodeError as e:
            raise RequestError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}", 400) from None

    # ------------------------------------------------------------------------------------------ endpoints

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?")[0]
        if path == "/health":
            pred = self.server.predictor
            self._send(
                200,
                {
                    "status": "ok",
                    "model": pred.cfg.model.name,
                    "quantization": pred.quantization,
                    "uptime_s": time.time() - self.server.started,
                    "cache": vars(pred.cache_info()),
                    "requests": dict(self.server.counts),
                    "batches": self.server.batcher.batches,
                },
            )
        elif path in ("/rank", "/explain"):
            self._error(405, f"{path} expects POST")
        else:
            self._error(404, f"no endpoint {path}; try GET /health, POST /rank, POST /explain")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if path not in ("/rank", "/explain"):
            if path == "/health":
                self._error(405, "/health expects GET")
            else:
                self._error(404, f"no endpoint {path}; try GET /health, POST /rank, POST /explain")
            return
        try:
            body = self._read_json()
            result = self._rank(body) if path == "/rank" else self._explain(body)
        except RequestError as e:
            self._send(e.status, e.to_json())
            return
        except Exception as e:  # keep serving; the client learns what failed
            log.exception("internal error on %s", path)
            self._error(500, f"internal error: {type(e).__name__}: {e}")
            return
        self._send(200, result)

    def _options(self, body: dict[str, Any]) -> tuple[int | None, bool]:
        top_k = body.pop("top_k", None)
        attention = body.pop("attention", False)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise RequestError("top_k: expected a positive integer", 400, "top_k")
        if not isinstance(attention, bool):
            raise RequestError("attention: expected true or false", 400, "attention")
        return top_k, attention

    @staticmethod
    def _ranking_json(r: Ranking, top_k: int | None) -> dict[str, Any]:
        out = r.to_json()
        if top_k is not None:
            order = [int(i) for i in r.order[:top_k]]
            out["order"] = order
            out["top"] = [{"index": i, "score": float(r.scores[i])} for i in order]
        return out

    def _rank(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise RequestError("request: expected a JSON object", 400, "request")
        pred = self.server.predictor
        if "requests" in body:
            reqs = body.pop("requests")
            top_k, attention = self._options(body)
            if body:
                raise RequestError(
                    f"unknown field {sorted(body)[0]!r} beside 'requests'", 400, sorted(body)[0]
                )
            if not isinstance(reqs, list) or not reqs:
                raise RequestError("requests: expected a non-empty array of requests", 400, "requests")
            if len(reqs) > self.server.max_batch:
                raise RequestError(
                    f"requests: {len(reqs)} requests, more than the limit of {self.server.max_batch}",
                    413,
                    "requests",
                )
            prepared = []
            for i, r in enumerate(reqs):
                try:
                    prepared.append(pred.prepare(RankRequest.from_json(r)))
                except RequestError as e:
                    raise RequestError(
                        f"requests[{i}]: {e.message}", e.status, f"requests[{i}].{e.field}"
                    ) from None
            futures = [self.server.batcher.submit(p, attention) for p in prepared]
            return {"rankings": [self._ranking_json(f.result(), top_k) for f in futures]}
        top_k, attention = self._options(body)
        prepared_one = pred.prepare(RankRequest.from_json(body))
        ranking = self.server.batcher.submit(prepared_one, attention).result()
        return self._ranking_json(ranking, top_k)

    def _explain(self, body: Any) -> dict[str, Any]:
        from din_torchrec.serving.explain import explain_prepared

        pred = self.server.predictor
        prepared = pred.prepare(RankRequest.from_json(body))
        return explain_prepared(pred, prepared).to_json()


def start_server(
    predictor: Predictor, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> tuple[RankingServer, threading.Thread]:
    """Start serving on a background thread; stop with ``server.shutdown(); server.server_close()``."""
    server = RankingServer(predictor, host, port, **kwargs)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="ranking-server", daemon=True
    )
    thread.start()
    return server, thread


def serve(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    duration: float | None = None,
    on_ready: Any = None,
    **kwargs: Any,
) -> dict[str, int]:
    """Serve in this thread until interrupted (or for ``duration`` seconds); returns the request counts."""
    server = RankingServer(predictor, host, port, **kwargs)
    if on_ready is not None:
        on_ready(server)
    timer = None
    if duration is not None:
        timer = threading.Timer(duration, server.shutdown)
        timer.daemon = True
        timer.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if timer is not None:
            timer.cancel()
        server.server_close()
    return dict(server.counts)
