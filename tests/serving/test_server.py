"""The HTTP service: every bad input class gets its 4xx, a concurrent burst is served, it stops by itself."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from din_torchrec.serving.cli import register
from din_torchrec.serving.predictor import Predictor
from din_torchrec.serving.requests import ServingPolicy
from din_torchrec.serving.server import RankingServer, start_server
from tests.serving.conftest import MAX_HISTORY, random_model, tiny_config
from tests.serving.test_predictor import _request


def _call(server: RankingServer, method: str, path: str, body: bytes | None = None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _post(server: RankingServer, path: str, obj) -> tuple[int, dict]:
    return _call(server, "POST", path, json.dumps(obj).encode())


@pytest.fixture()
def server() -> Iterator[RankingServer]:
    cfg = tiny_config("din")
    policy = ServingPolicy.for_config(cfg, long_history="reject", max_candidates=50)
    srv, thread = start_server(Predictor(random_model(cfg), cfg, policy=policy), "127.0.0.1", 0, max_batch=16)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_bad_inputs_get_their_4xx_and_the_server_keeps_serving(server: RankingServer) -> None:
    cfg = server.predictor.cfg
    good = _request(cfg, 4, 6)

    def with_(**changes):
        body = json.loads(json.dumps(good))
        for path, value in changes.items():
            node = body
            *parents, last = path.split("__")
            for p in parents:
                node = node[p]
            node[last] = value
        return body

    cases = [
        ("malformed JSON", _call(server, "POST", "/rank", b'{"user_id": 1,')[0], 400),
        ("not an object", _post(server, "/rank", [1, 2])[0], 400),
        (
            "missing field",
            _post(server, "/rank", {k: v for k, v in good.items() if k != "candidates"})[0],
            400,
        ),
        ("wrong type", _post(server, "/rank", with_(user_id="7"))[0], 400),
        ("wrong element type", _post(server, "/rank", with_(history__item=[1, 2, "x", 4, 5, 6]))[0], 400),
        ("unknown field", _post(server, "/rank", with_(colour="red"))[0], 400),
        ("unknown table", _post(server, "/rank", with_(candidates__brand=[1, 2, 3, 4]))[0], 400),
        ("bad top_k", _post(server, "/rank", with_(top_k=0))[0], 400),
        ("unknown item id", _post(server, "/rank", with_(candidates__item=[1, 2, 10**7, 4]))[0], 422),
        ("negative id", _post(server, "/rank", with_(history__category=[1, -2, 3, 4, 5, 6]))[0], 422),
        ("over-long history", _post(server, "/rank", _request(cfg, 2, MAX_HISTORY + 1))[0], 413),
        ("too many candidates", _post(server, "/rank", _request(cfg, 51, 3))[0], 413),
        (
            "body too large",
            _call(
                server,
                "POST",
                "/rank",
                b"{}",
                {"Content-Type": "application/json", "Content-Length": str(1 << 30)},
            )[0],
            413,
        ),
        ("not JSON content", _call(server, "POST", "/rank", b"x", {"Content-Type": "text/plain"})[0], 415),
        ("wrong method", _call(server, "GET", "/rank")[0], 405),
        ("unknown path", _post(server, "/score", good)[0], 404),
        ("batch too large", _post(server, "/rank", {"requests": [good] * 17})[0], 413),
        ("bad request in a batch", _post(server, "/rank", {"requests": [good, with_(user_id=None)]})[0], 400),
    ]
    wrong = [(name, got, want) for name, got, want in cases if got != want]
    assert not wrong, wrong

    # No Content-Length at all (http.client always sends one): a raw request.
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /rank HTTP/1.0\r\nContent-Type: application/json\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n")[0]

    status, body = _post(server, "/rank", with_(candidates__item=[1, 2, 10**7, 4]))
    assert (
        body["error"]["field"] == "candidates.item[2]" and "not in table 'item'" in body["error"]["message"]
    )
    status, health = _call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["requests"]["client_error"] >= len(cases)
    status, ranked = _post(server, "/rank", {**good, "top_k": 2})
    assert status == 200 and len(ranked["scores"]) == 4 and len(ranked["top"]) == 2


def test_concurrent_burst(server: RankingServer) -> None:
    cfg = server.predictor.cfg
    bodies = [_request(cfg, 1 + i % 7, i % (MAX_HISTORY + 1), seed=i, user=i % 13) for i in range(50)]
    expected = [Predictor(server.predictor.model, cfg, cache_size=0).rank_many([b])[0] for b in bodies]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda b: _post(server, "/rank", b), bodies))
    assert [s for s, _ in results] == [200] * 50
    for (_, got), exp in zip(results, expected):
        np.testing.assert_allclose(got["logits"], exp.logits, rtol=1e-5, atol=1e-6)
    status, batch = _post(server, "/rank", {"requests": bodies[:5], "attention": True})
    assert status == 200 and len(batch["rankings"]) == 5
    assert np.asarray(batch["rankings"][0]["attention"]["history"]).shape == (1, 0)  # user 0: empty history
    status, exp = _post(server, "/explain", bodies[7])
    assert status == 200 and np.asarray(exp["attention"]["history"]).shape == (1, 7)
    _, health = _call(server, "GET", "/health")
    assert health["requests"]["server_error"] == 0 and health["requests"]["client_error"] == 0
    assert health["cache"]["hits"] > 0 and 0 < health["batches"] <= 56


def test_serve_command_stops_by_itself(trained_run: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parser = argparse.ArgumentParser(prog="din-torchrec")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--run", str(trained_run), "--port", str(port), "--duration", "2"])
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(args.func(args)), daemon=True)
    t0 = time.monotonic()
    t.start()
    status = None
    while time.monotonic() - t0 < 20 and status != 200:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            status = conn.getresponse().status
            conn.close()
        except OSError:
            time.sleep(0.1)
    assert status == 200
    t.join(timeout=30)
    assert not t.is_alive() and codes == [0]
