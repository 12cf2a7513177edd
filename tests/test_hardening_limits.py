"""`--max-request-bytes` and the API key, both checked before the body is read: a body
over the limit is a 413 while it arrives, a request without the key a 401 before any
body byte is read (runtime/server/limits.py)."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from server_helpers import LiveServer, write_tiny_chat_model

LIMIT = 65536
KEY = {"Authorization": "Bearer sekret"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    path = write_tiny_chat_model(tmp_path_factory.mktemp("tinychat"), smollm2_path)
    server = LiveServer("--model", str(path), "--served-model-name", "tiny", "--max-model-len", "256",
                        "--max-request-bytes", str(LIMIT), "--api-key", "other", "--api-key", "sekret")
    yield server
    code, err = server.stop()
    assert code == 0, err


def padded_tokenize_body(size: int, rng) -> bytes:
    """A valid /tokenize body of exactly `size` bytes: a random prompt, then JSON whitespace."""
    words = " ".join(f"w{n}" for n in rng.integers(0, 10**6, 200))
    body = json.dumps({"model": "tiny", "prompt": words}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def slow_body(chunks: int, chunk: int, pause: float, sent: list[int]):
    """A chunked body that takes chunks * pause seconds; counts its chunks in `sent`."""
    for _ in range(chunks):
        time.sleep(pause)
        sent.append(1)
        yield b"x" * chunk


def raw_headers_only(server: LiveServer, headers: str, timeout: float = 10) -> bytes:
    """Send a request's head announcing a 300 MB body, send no body, and return the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 300000000\r\n{headers}\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
        return answer


def assert_error(res: httpx.Response, status: int, kind: str) -> None:
    assert res.status_code == status, res.text
    assert res.json()["error"]["type"] == kind and res.json()["error"]["code"] == status


def test_body_at_the_limit_works_one_byte_more_is_413(server, rng):
    with httpx.Client(base_url=server.url, headers=KEY, timeout=60) as http:
        ok = http.post("/tokenize", content=padded_tokenize_body(LIMIT, rng), headers=JSON)
        assert ok.status_code == 200 and ok.json()["count"] > 200
        over = http.post("/tokenize", content=padded_tokenize_body(LIMIT + 1, rng), headers=JSON)
        assert_error(over, 413, "RequestTooLarge")
        assert "65536" in over.json()["error"]["message"]


def test_content_length_over_the_limit_is_413_before_the_body(server):
    head = raw_headers_only(server, "Authorization: Bearer sekret\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"RequestTooLarge" in head


def test_chunked_body_is_cut_off_at_the_limit(server):
    sent: list[int] = []
    with httpx.Client(base_url=server.url, headers=KEY, timeout=60) as http:
        res = http.post("/v1/completions", content=slow_body(200, 16384, 0.01, sent), headers=JSON)
    assert "content-length" not in res.request.headers  # really chunked
    assert_error(res, 413, "RequestTooLarge")
    assert len(sent) < 50  # 200 chunks were on offer; the server stopped reading after ~4


def test_no_key_is_401_before_any_body_byte(server):
    head = raw_headers_only(server, "")  # no body at all is sent: the 401 cannot have waited for it
    assert head.startswith(b"HTTP/1.1 401") and b"AuthenticationError" in head
    head = raw_headers_only(server, "Authorization: Bearer wrong\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    sent: list[int] = []
    start = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as http:  # a body that would take 20 s
        res = http.post("/v1/chat/completions", content=slow_body(400, 16384, 0.05, sent), headers=JSON)
    assert_error(res, 401, "AuthenticationError")
    assert time.monotonic() - start < 10 and len(sent) < 200


def test_keyed_requests_work_and_open_paths_stay_open(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for key in ("sekret", "other"):
            res = http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
            assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] == 2
        for path in ("/v1/models", "/v1/models/tiny", "/v1/unknown"):
            assert_error(http.get(path), 401, "AuthenticationError")
        assert_error(http.post("/detokenize", json={"model": "tiny", "tokens": [1, 2]}), 401, "AuthenticationError")
        for path in ("/health", "/version", "/metrics"):
            assert http.get(path).status_code == 200, path


def test_cors_preflight_passes_and_refusals_carry_cors_headers(server, rng):
    origin = {"Origin": "http://example.com"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        pre = http.options("/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
        unauthorized = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=origin)
        assert_error(unauthorized, 401, "AuthenticationError")
        assert unauthorized.headers["access-control-allow-origin"] == "*"
        too_large = http.post("/tokenize", content=padded_tokenize_body(LIMIT + 1, rng),
                              headers={**origin, **KEY, **JSON})
        assert_error(too_large, 413, "RequestTooLarge")
        assert too_large.headers["access-control-allow-origin"] == "*"
