"""`memlm serve` as a client sees it: a LIVE server (subprocess, 127.0.0.1, a free port) driven with httpx —
OpenAI-style chat and completions, streaming (SSE) and not; sessions that keep their memory across requests;
20 concurrent sessions × 10 requests without cross-session leakage; traversal ids and oversize bodies rejected;
a clean JSON 4xx for every bad request. API-key checks run in-process (ASGI transport).

Notation: none beyond the API's field names.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

import memlm
from memlm.data.chat import render_prompt

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

N_SESSIONS, N_REQUESTS = 20, 10
N_REPLAY = 8  # sessions replayed sequentially for the exact-memory check (all 20 are checked for turns/transcripts)


@pytest.fixture(scope="module")
def server(tmp_path_factory, live_server):
    return live_server(tmp_path_factory.mktemp("serve"))


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat(client, content, sid=None, **kw):
    body = {"model": "model", "messages": [{"role": "user", "content": content}], **kw}
    if sid is not None:
        body["session_id"] = sid
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(lines) -> list[dict | str]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_chat(client, body) -> list:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse(r.iter_lines())


# ------------------------------------------------------------------------------------------------ basics


def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "model" and r.json()["object"] == "list"
    assert client.get("/health").json()["status"] == "ok"


def test_chat_streaming_equals_non_streaming(client):
    a = chat(client, "hello there", sid="ns")
    assert a["object"] == "chat.completion" and a["choices"][0]["message"]["role"] == "assistant"
    assert a["usage"]["completion_tokens"] == 4 and a["choices"][0]["finish_reason"] == "length"
    events = stream_chat(client, {"messages": [{"role": "user", "content": "hello there"}], "session_id": "st",
                                  "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks if c["choices"])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 2  # streamed
    assert text == a["choices"][0]["message"]["content"]
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["memlm"]["state_hash"] == a["memlm"]["state_hash"]  # same input, same memory, any transport
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_completions_streaming_and_not(client):
    a = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 6}).json()
    assert a["object"] == "text_completion" and a["usage"]["completion_tokens"] <= 6
    with client.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 6,
                                                        "stream": True}) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == a["choices"][0]["text"]
    # on a session, raw completions continue the same memory
    s1 = client.post("/v1/completions", json={"prompt": "abc", "session_id": "cmp"}).json()["memlm"]
    s2 = client.post("/v1/completions", json={"prompt": "def", "session_id": "cmp"}).json()["memlm"]
    assert s2["tokens_seen"] > s1["tokens_seen"] and s2["turn"] == 2


def test_sessions_keep_memory_and_take_only_new_messages(client, server):
    tok = memlm.load_tokenizer("byte")
    h = {"X-Session-Id": "mem1"}
    assert client.post("/v1/sessions/mem1", json={"mode": "persistent"}).json()["mode"] == "persistent"
    r1 = client.post("/v1/chat/completions", headers=h,
                     json={"messages": [{"role": "user", "content": "My name is Zed."}]}).json()
    reply = r1["choices"][0]["message"]["content"]
    # OpenAI-style clients resend the history: only the messages after the last assistant one are fed
    history = [{"role": "user", "content": "My name is Zed."}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "Who am I?"}]
    r2 = client.post("/v1/chat/completions", headers=h, json={"messages": history}).json()
    assert r2["usage"]["prompt_tokens"] == len(render_prompt(tok, [{"role": "user", "content": "Who am I?"}]))
    assert r2["memlm"]["turn"] == 2 and r2["memlm"]["tokens_seen"] > r1["memlm"]["tokens_seen"]
    # a stateless request with the same second message sees no Zed: a different prompt length and memory
    before = {s["id"] for s in client.get("/v1/sessions").json()["data"]}
    r3 = client.post("/v1/chat/completions", json={"messages": history}).json()
    assert r3["session_id"] is None and r3["usage"]["prompt_tokens"] > r2["usage"]["prompt_tokens"]
    assert {s["id"] for s in client.get("/v1/sessions").json()["data"]} == before
    tx = client.get("/v1/sessions/mem1/transcript").json()["messages"]
    assert [m["role"] for m in tx] == ["user", "assistant", "user", "assistant"]
    # persistent (the server has a store): the memory is on disk after every turn
    assert (server.store / "mem1" / "state.safetensors").exists()


def test_session_endpoints(client, server):
    chat(client, "one", sid="ep")
    info = client.get("/v1/sessions/ep").json()
    assert info["turns"] == 1 and info["mode"] == "session" and info["learning"] is True
    assert not (server.store / "ep").exists()  # session mode: RAM only
    info = client.post("/v1/sessions/ep", json={"mode": "persistent"}).json()  # saved at once
    assert info["mode"] == "persistent" and (server.store / "ep" / "state.safetensors").exists()
    assert [row["kind"] for row in info["layers"]] == ["attention", "attention"]
    assert all(row["bytes"] > 0 and row["norms"] for row in info["layers"])
    assert "ep" in {s["id"] for s in client.get("/v1/sessions").json()["data"]}
    # learning off: the turn is answered, the memory stays bit-identical
    assert client.post("/v1/sessions/ep", json={"learning": False}).json()["learning"] is False
    r = chat(client, "two", sid="ep")
    assert r["memlm"]["state_hash"] == info["state_hash"] and r["choices"][0]["message"]["content"] is not None
    # readonly: nothing on disk changes
    assert client.post("/v1/sessions/ep", json={"mode": "readonly", "learning": True}).json()["mode"] == "readonly"
    files = {p: p.read_bytes() for p in (server.store / "ep").iterdir()}
    chat(client, "three", sid="ep")
    assert {p: p.read_bytes() for p in (server.store / "ep").iterdir()} == files
    assert client.post("/v1/sessions/ep/reset").status_code == 400  # readonly refuses
    assert client.post("/v1/sessions/ep", json={"mode": "persistent"}).status_code == 200
    reset = client.post("/v1/sessions/ep/reset").json()
    assert reset["tokens_seen"] == 0 and reset["turns"] == 0
    assert client.delete("/v1/sessions/ep").json()["deleted"] is True
    assert client.get("/v1/sessions/ep").status_code == 404 and not (server.store / "ep").exists()
    assert client.post("/v1/sessions/ep2", json={"mode": "nope"}).status_code == 400


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_sessions_do_not_leak(server):
    """200 requests at once: 20 sessions × 10, each session always sending its own message (half of them streamed).
    Per-session serialisation means every session ends with exactly 10 turns, and — greedy decoding being
    deterministic — with the very memory that 10 sequential turns of ITS message give (replayed afterwards in fresh
    sessions). A leak or a lost update would change turns, transcripts or hashes."""

    async def one(client, i, j):
        body = {"messages": [{"role": "user", "content": f"session {i} says {i * 7919 % 1000}"}],
                "session_id": f"c{i}", "max_tokens": 3}
        if j % 2:
            async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = sse([line async for line in r.aiter_lines()])
            assert events[-1] == "[DONE]"
        else:
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text

    async def replay(client, i):
        for _ in range(N_REQUESTS):
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"session {i} says {i * 7919 % 1000}"}],
                "session_id": f"replay{i}", "max_tokens": 3})
            assert r.status_code == 200
        return r.json()["memlm"]["state_hash"]

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250, keepalive_expiry=3)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            t0 = time.time()
            await asyncio.gather(*(one(client, i, j) for i in range(N_SESSIONS) for j in range(N_REQUESTS)))
            elapsed = time.time() - t0
            infos = [(await client.get(f"/v1/sessions/c{i}")).json() for i in range(N_SESSIONS)]
            txs = [(await client.get(f"/v1/sessions/c{i}/transcript")).json()["messages"] for i in range(N_SESSIONS)]
            t1 = time.time()
            expected = await asyncio.gather(*(replay(client, i) for i in range(N_REPLAY)))
            print(f"replay {time.time() - t1:.1f}s")
            return infos, txs, expected, elapsed

    infos, txs, expected, elapsed = asyncio.run(main())
    for i, (info, tx) in enumerate(zip(infos, txs)):
        assert info["turns"] == N_REQUESTS and len(tx) == 2 * N_REQUESTS, (i, info["turns"], len(tx))
        users = {m["content"] for m in tx if m["role"] == "user"}
        assert users == {f"session {i} says {i * 7919 % 1000}"}, (i, users)
        if i < N_REPLAY:
            assert info["state_hash"] == expected[i], i
    assert len({info["state_hash"] for info in infos}) == N_SESSIONS  # they really differ: a swap would show
    print(f"\n200 concurrent requests in {elapsed:.1f}s")


# ------------------------------------------------------------------------------------------------ hostile input


def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):  # "Connection: close": read to the end
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize("sid", ["../x", "..", "%2e%2e", "/etc/passwd", "a/../../b", "..\\x", "x" * 65, ""])
def test_traversal_ids_rejected(client, server, sid):
    before = sorted(p.name for p in server.workdir.iterdir())
    stored = sorted(p.name for p in server.store.iterdir()) if server.store.exists() else []
    body = {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post("/v1/chat/completions", json={**body, "session_id": sid})
    assert r.status_code == 400 and "invalid" in r.json()["error"]["message"]
    if sid:
        r = client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": sid})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_session_id"
    from urllib.parse import quote

    for path in (f"/v1/sessions/{quote(sid, safe='')}", f"/v1/sessions/{quote(sid, safe='')}/reset") if sid else ():
        r = client.request("GET" if path.count("/") == 3 else "POST", path)
        assert 400 <= r.status_code < 500 and "error" in r.json()
    assert sorted(p.name for p in server.workdir.iterdir()) == before
    after = sorted(p.name for p in server.store.iterdir()) if server.store.exists() else []
    assert after == stored


@pytest.mark.parametrize("target", [b"/v1/sessions/../x", b"/v1/sessions/..%2Fx", b"/v1/sessions/%2e%2e",
                                    b"/v1/sessions/%2E%2E/reset", b"/v1/sessions//etc/passwd"])
def test_raw_traversal_paths_rejected(server, target):
    """No client-side normalisation: the raw request line goes to the server as written."""
    status, data = raw_request(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert 400 <= status < 500 and b'"error"' in data


def test_oversize_requests_rejected(client, server):
    big = {"messages": [{"role": "user", "content": "x" * 30000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]

    def gen():  # no Content-Length: chunked transfer, cut off while streaming in
        for _ in range(40):
            yield b" " * 1000
    r = client.post("/v1/chat/completions", content=gen(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 65})
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]


BAD = [
    ("POST", "/v1/chat/completions", b"not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/chat/completions", {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "text parts"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "nothing to answer"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400,
     "temperature"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n=1"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "stream"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404,
     "not found"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400,
     "logprobs"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("GET", "/v1/chat/completions", None, 405, "method"),
    ("GET", "/v1/nope", None, 404, "route"),
    ("GET", "/v1/sessions/never-seen", None, 404, "not found"),
    ("POST", "/v1/sessions/never-seen/reset", None, 404, "not found"),
    ("DELETE", "/v1/sessions/never-seen", None, 404, "not found"),
    ("POST", "/v1/sessions/x1", {"colour": "red"}, 400, "unknown setting"),
    ("POST", "/v1/sessions/x1", {"learning": "yes"}, 400, "learning"),
    ("GET", "/static/../memlm/serve/api.py", None, 404, ""),
    ("GET", "/static/secret.py", None, 404, "no such file"),
]


@pytest.mark.parametrize("method, path, body, status, words", BAD)
def test_bad_requests_get_clean_json_errors(client, method, path, body, status, words):
    kw = {}
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kw = {"json": body}
    r = client.request(method, path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower() and err["type"]


def test_mismatched_session_id_and_header(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "session_id": "a"},
                    headers={"X-Session-Id": "b"})
    assert r.status_code == 400 and "differ" in r.json()["error"]["message"]


def test_web_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>memlm chat</title>" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")


# ------------------------------------------------------------------------------------------------ in-process


def test_api_key_is_required_when_configured():
    from memlm.serve.api import ServerConfig, create_app

    app = create_app(memlm.build_model("transformer-debug"), memlm.load_tokenizer("byte"),
                     ServerConfig(model_name="m", api_key="s3cret", default_max_tokens=2))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"messages": [{"role": "user", "content": "x"}]}
            no = await c.post("/v1/chat/completions", json=body)
            wrong = await c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
            ok = await c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
            page = await c.get("/")  # the page itself is public; it asks for the key
            return no, wrong, ok, page

    no, wrong, ok, page = asyncio.run(go())
    assert no.status_code == 401 and wrong.status_code == 401 and "API key" in no.json()["error"]["message"]
    assert ok.status_code == 200 and page.status_code == 200


def test_binding_beyond_loopback_needs_an_api_key(capsys, monkeypatch):
    from memlm.cli.main import main

    monkeypatch.delenv("MEMLM_API_KEY", raising=False)
    assert main(["serve", "transformer-debug", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
