"""OpenAI-compatible HTTP API over ``Session`` (FastAPI). ``memlm serve`` runs it with uvicorn.

Endpoints (JSON in, JSON out; every error is ``{"error": {"message", "type", "code"}}`` with a 4xx status):

    GET  /v1/models                      the one model served
    POST /v1/completions                 raw text continuation (``stream``: server-sent events)
    POST /v1/chat/completions            chat (``stream``: server-sent events)
    GET  /v1/sessions                    sessions in memory and in the store
    GET  /v1/sessions/{id}               mode, learning, turns, tokens seen, per-layer memory stats, controller
    GET  /v1/sessions/{id}/transcript    the session's messages
    POST /v1/sessions/{id}               {"mode": ..., "learning": ...}: change settings (creates the session)
    POST /v1/sessions/{id}/reset         forget the session's memory and transcript
    DELETE /v1/sessions/{id}             drop it from memory and the store
    GET  /health

A request names its session by the body field ``session_id`` or the header ``X-Session-Id`` (both: they must
agree). With a session, only the messages after the last assistant message in the request are fed — the session's
memory holds the rest — so clients may send either the whole history or just the new message. Without one, the
request is stateless: the whole message list is rendered and answered from a fresh memory.

Concurrency: a per-session asyncio lock serialises requests to one session; generation runs in a thread pool, so
different sessions run concurrently. The lock is released only when the worker thread has finished (a client that
disconnects cancels its turn, and the session is left exactly as before that turn).

Security: bodies above ``max_body_bytes`` get 413 before they are read; ``max_tokens`` is bounded; session ids are
validated (``[A-Za-z0-9_-]{1,64}``) wherever they come from, so no request names a path; with an API key every
``/v1`` route needs ``Authorization: Bearer <key>`` (compared in constant time).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memlm.errors import UserError
from memlm.inference.controller import ControllerConfig
from memlm.inference.sampling import SamplingConfig
from memlm.inference.session import MODES, Session
from memlm.inference.store import SessionStore, validate_session_id

__all__ = ["APIError", "ServerConfig", "create_app"]


@dataclass
class ServerConfig:
    """Server settings; the defaults are the safe ones."""

    model_name: str = "memlm"
    store: SessionStore | None = None
    default_mode: str = "session"  # mode of sessions created by requests
    default_learning: bool = True
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 1024  # the most tokens one request may ask for
    default_max_tokens: int = 128
    max_sessions: int = 256  # sessions kept in memory (idle persistent ones are evicted first)
    workers: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    controller: ControllerConfig | None = None
    system: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def _error_body(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code or str(status)}}).encode()


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(json.loads(_error_body(status, message, **kw)), status_code=status)


# --------------------------------------------------------------------------------------------- ASGI guard


class _TooLarge(APIError):
    """Raised from inside the body stream; being an APIError, whoever catches it first answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)", code="body_too_large")


class Guard:
    """Pure ASGI middleware: body size limit (413) and bearer-token auth for /v1 routes (401)."""

    def __init__(self, app, *, max_body_bytes: int, api_key: str | None) -> None:
        self.app, self.limit, self.api_key = app, max_body_bytes, api_key

    async def _reply(self, send, status: int, message: str, code: str) -> None:
        body = _error_body(status, message, code=code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.api_key is not None and path.startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                await self._reply(send, 401, "missing or wrong API key (Authorization: Bearer <key>)", "unauthorized")
                return
        cl = headers.get(b"content-length")
        if cl is not None:
            if not cl.isdigit():
                await self._reply(send, 400, "invalid Content-Length", "bad_request")
                return
            if int(cl) > self.limit:
                await self._reply(send, 413, f"request body too large (limit {self.limit} bytes)", "body_too_large")
                return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reply(send, 413, f"request body too large (limit {self.limit} bytes)", "body_too_large")


# --------------------------------------------------------------------------------------------- parsing


def _get(body: dict, key: str, kind, default=None, *, lo=None, hi=None):
    """body[key] checked against ``kind`` (int/float/bool/str) and bounds; APIError 400 names the field."""
    v = body.get(key, None)
    if v is None:
        return default
    ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        raise APIError(400, f"'{key}' must be {kind.__name__}, got {type(v).__name__}", param=key)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise APIError(400, f"'{key}'={v!r} out of range [{lo}, {hi}]", param=key)
    return v


def _sampling(body: dict, base: SamplingConfig) -> SamplingConfig:
    kw: dict[str, Any] = {}
    for key, kind, lo, hi in (("temperature", float, 0.0, 10.0), ("top_p", float, 0.0, 1.0),
                              ("top_k", int, 0, 1 << 20), ("min_p", float, 0.0, 1.0),
                              ("frequency_penalty", float, -2.0, 2.0), ("presence_penalty", float, -2.0, 2.0),
                              ("repetition_penalty", float, 0.01, 10.0), ("seed", int, -(1 << 63), (1 << 63) - 1)):
        v = _get(body, key, kind, lo=lo, hi=hi)
        if v is not None:
            kw[key] = v
    if kw.get("top_p") == 0:
        raise APIError(400, "'top_p' must be > 0", param="top_p")
    try:
        return base.replace(**kw)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _stops(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in v):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # OpenAI content parts: only text is understood
        out = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            out.append(p["text"])
        return "".join(out)
    raise APIError(400, f"messages[{i}].content must be a string", param="messages")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported (system, user, assistant)",
                           param="messages")
        out.append({"role": role, "content": _content(m, i)})
    return out


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


# --------------------------------------------------------------------------------------------- app


class _Server:
    def __init__(self, model, tokenizer, cfg: ServerConfig) -> None:
        if cfg.default_mode not in MODES:
            raise UserError(f"default memory mode {cfg.default_mode!r} unknown; choose from {', '.join(MODES)}")
        if cfg.default_mode == "persistent" and cfg.store is None:
            raise UserError("persistent sessions need a store (--store DIR)")
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # LRU order
        self.locks: dict[str, asyncio.Lock] = {}
        self.pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="memlm-gen")
        self.guard = threading.Lock()  # sessions dict is touched from worker threads too
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------ sessions
    def session_id(self, request: Request, body: dict | None) -> str | None:
        from_body = None if body is None else body.get("session_id")
        from_header = request.headers.get("x-session-id")
        if from_body is not None and from_header is not None and from_body != from_header:
            raise APIError(400, "session_id in the body and X-Session-Id header differ", param="session_id")
        sid = from_body if from_body is not None else from_header
        if sid is None:
            return None
        try:
            return validate_session_id(sid)
        except UserError as e:
            raise APIError(400, str(e), param="session_id", code="invalid_session_id") from None

    def lock(self, sid: str) -> asyncio.Lock:
        lk = self.locks.get(sid)
        if lk is None:
            if len(self.locks) > 4 * self.cfg.max_sessions:  # ids come from clients: keep the table bounded
                with self.guard:
                    live = set(self.sessions)
                for k in [k for k, v in self.locks.items() if k not in live and not v.locked()]:
                    del self.locks[k]
            lk = self.locks[sid] = asyncio.Lock()
        return lk

    def new_session(self, mode: str, sid: str | None, sampling: SamplingConfig | None = None) -> Session:
        c = self.cfg
        return Session(self.model, self.tok, mode=mode, learning=c.default_learning,
                       store=c.store if mode != "stateless" or sid else None, session_id=sid,
                       sampling=sampling or c.sampling,
                       controller=None if c.controller is None else c.controller.replace(),
                       system=c.system, max_new_tokens=c.default_max_tokens)

    def get(self, sid: str, *, create: bool) -> Session | None:
        """The session ``sid`` (loaded from the store on first use); runs in a worker under the session lock."""
        with self.guard:
            s = self.sessions.get(sid)
            if s is not None:
                self.sessions.move_to_end(sid)
                return s
        stored = self.cfg.store is not None and self.cfg.store.exists(sid)
        if not (create or stored):
            return None
        mode = self.cfg.default_mode
        if stored and mode not in ("persistent", "readonly"):
            mode = "persistent"  # a stored session keeps being saved
        s = self.new_session(mode, sid)
        with self.guard:
            if len(self.sessions) >= self.cfg.max_sessions:
                self._evict()
            self.sessions[sid] = s
        return s

    def _evict(self) -> None:
        for sid, s in self.sessions.items():
            lk = self.locks.get(sid)
            if s.mode in ("persistent", "readonly") and (lk is None or not lk.locked()):
                del self.sessions[sid]
                return
        raise APIError(429, f"too many sessions in memory ({self.cfg.max_sessions}); delete some or use a store",
                       type="rate_limit_error", code="too_many_sessions")

    async def run_locked(self, sid: str | None, fn):
        """Run ``fn`` in the pool, holding the session lock until the worker has really finished."""
        loop = asyncio.get_running_loop()
        if sid is None:
            return await loop.run_in_executor(self.pool, fn)
        lock = self.lock(sid)
        await lock.acquire()
        try:
            fut = loop.run_in_executor(self.pool, fn)
        except BaseException:
            lock.release()
            raise
        fut.add_done_callback(lambda _: lock.release())
        return await fut

    async def stream(self, sid: str | None, make_turn):
        """Start a turn in the pool; return (first event, async iterator of the rest). Events: ("piece", str),
        ("done", TurnResult), ("error", Exception). Leaving the iterator early cancels the turn."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(ev) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop is gone (server shutting down)
                cancel.set()

        def work() -> None:
            try:
                turn = make_turn()
                for piece in turn:
                    if cancel.is_set():
                        turn.close()
                        return
                    put(("piece", piece))
                put(("done", turn.result))
            except Exception as e:  # noqa: BLE001 — handed to the request, which turns it into an error response
                put(("error", e))

        lock = None if sid is None else self.lock(sid)
        if lock is not None:
            await lock.acquire()
        try:
            fut = loop.run_in_executor(self.pool, work)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            fut.add_done_callback(lambda _: lock.release())
        try:
            first = await queue.get()
        except BaseException:
            cancel.set()
            raise

        async def rest():
            try:
                while True:
                    ev = await queue.get()
                    yield ev
                    if ev[0] != "piece":
                        return
            finally:
                cancel.set()

        return first, rest, cancel


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):
        return APIError(400, str(e))
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    return APIError(500, f"internal error ({type(e).__name__})", type="server_error")


def create_app(model, tokenizer, config: ServerConfig | None = None):
    """The ASGI application (FastAPI wrapped in the size/auth guard). ``app.state.server`` holds the sessions."""
    cfg = config or ServerConfig()
    srv = _Server(model, tokenizer, cfg)
    app = FastAPI(title="memlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, type=e.type, code=e.code, param=e.param)

    @app.exception_handler(UserError)
    async def _user_error(_, e: UserError):
        return _error(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        msg = {404: "no such route", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return _error(e.status_code, msg, code=str(e.status_code))

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        err = _as_api_error(e)
        return _error(err.status, err.message, type=err.type)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != cfg.model_name:
            raise APIError(404, f"model {name!r} not found; this server has {cfg.model_name!r}", code="model_not_found",
                           param="model")

    def max_tokens(body: dict) -> int:
        v = _get(body, "max_tokens", int, lo=1)
        v = _get(body, "max_completion_tokens", int, v, lo=1)
        if v is not None and v > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={v} exceeds this server's limit ({cfg.max_tokens_limit})",
                           param="max_tokens")
        return cfg.default_max_tokens if v is None else v

    def common(body: dict) -> tuple[SamplingConfig, int, list[str] | None, bool]:
        check_model(body)
        n = _get(body, "n", int, 1)
        if n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if body.get("logprobs") or body.get("top_logprobs"):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        stream = _get(body, "stream", bool, False)
        return _sampling(body, cfg.sampling), max_tokens(body), _stops(body), stream

    def memlm_ext(sid: str | None, res, s: Session | None) -> dict:
        out = {"session_id": sid, "turn": res.turn if sid else None, "surprise_mean": round(res.surprise_mean, 4),
               "prompt_tokens": res.prompt_tokens}
        if sid and s is not None:
            out.update(state_hash=res.state_hash, mode=s.mode, learning=s.learning, tokens_seen=s.tokens_seen)
        if res.controller:
            out["controller"] = res.controller
        return out

    def usage(res) -> dict:
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "total_tokens": res.prompt_tokens + res.completion_tokens}

    async def generate(request: Request, body: dict, *, chat: bool):
        sampling, n_max, stops, stream = common(body)
        sid = srv.session_id(request, body)
        if chat:
            msgs = _messages(body)
            if sid is not None:
                last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
                msgs = msgs[last + 1:]
                if not msgs:
                    raise APIError(400, "nothing to answer: the last message is the assistant's", param="messages")
            elif msgs[-1]["role"] == "assistant":
                raise APIError(400, "nothing to answer: the last message is the assistant's", param="messages")
            payload: Any = msgs
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string", param="prompt")
            payload = prompt
        holder: dict[str, Session] = {}

        def make_turn():
            s = srv.new_session("stateless", None, sampling) if sid is None else srv.get(sid, create=True)
            holder["s"] = s
            kw = {"max_new_tokens": n_max, "sampling": sampling, "stop": stops}
            return s.send(payload, **kw) if chat else s.complete(payload, **kw)

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        if not stream:
            res = await srv.run_locked(sid, lambda: make_turn().result)
            choice = {"index": 0, "finish_reason": _finish(res.finish_reason)}
            if chat:
                choice["message"] = {"role": "assistant", "content": res.reply}
            else:
                choice.update(text=res.reply, logprobs=None)
            return {"id": rid, "object": obj, "created": created, "model": cfg.model_name, "choices": [choice],
                    "usage": usage(res), "session_id": sid, "memlm": memlm_ext(sid, res, holder.get("s"))}

        first, rest, cancel = await srv.stream(sid, make_turn)
        if first[0] == "error":
            raise _as_api_error(first[1])
        include_usage = isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))

        def chunk(delta: dict | None = None, text: str | None = None, finish: str | None = None, **extra) -> str:
            if chat:
                choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj_c = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                     "model": cfg.model_name, "choices": [choice], **extra}
            return f"data: {json.dumps(obj_c, ensure_ascii=False)}\n\n"

        async def events():
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""})
                ev = first
                agen = rest()
                while True:
                    kind, val = ev
                    if kind == "piece":
                        yield chunk({"content": val}, text=val)
                    elif kind == "done":
                        extra = {"session_id": sid, "memlm": memlm_ext(sid, val, holder.get("s"))}
                        yield chunk({}, text="", finish=_finish(val.finish_reason), **extra)
                        if include_usage:
                            last = {"id": rid, "object": obj + ".chunk", "created": created, "model": cfg.model_name,
                                    "choices": [], "usage": usage(val)}
                            yield f"data: {json.dumps(last)}\n\n"
                        break
                    else:
                        err = _as_api_error(val)
                        yield f"data: {_error_body(err.status, err.message, type=err.type).decode()}\n\n"
                        break
                    ev = await agen.__anext__()
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "memlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, await body_of(request), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, await body_of(request), chat=False)

    def summary(sid: str, s: Session | None) -> dict:
        if s is not None:
            return {"id": sid, "loaded": True, "mode": s.mode, "learning": s.learning, "turns": s.turns,
                    "tokens_seen": s.tokens_seen, "updated": s.updated, "stored": bool(cfg.store and cfg.store.exists(sid))}
        info = cfg.store.info(sid, decrypt=False)  # listing must not run a key derivation per session
        h = info.get("header") or {}
        return {"id": sid, "loaded": False, "mode": h.get("mode"), "learning": h.get("learning"),
                "turns": h.get("turns"), "tokens_seen": h.get("tokens_seen"), "updated": h.get("updated",
                                                                                                 info["modified"]),
                "stored": True, "encrypted": info["encrypted"]}

    @app.get("/v1/sessions")
    async def list_sessions():
        def work():  # file reads: off the event loop
            with srv.guard:
                loaded = dict(srv.sessions)
            ids = set(loaded) | set(cfg.store.ids() if cfg.store else [])
            return {"object": "list", "data": [summary(sid, loaded.get(sid)) for sid in sorted(ids)]}

        return await srv.run_locked(None, work)

    def path_id(sid: str) -> str:
        try:
            return validate_session_id(sid)
        except UserError as e:
            raise APIError(400, str(e), param="session_id", code="invalid_session_id") from None

    async def existing(sid: str, fn):
        def work():
            s = srv.get(sid, create=False)
            if s is None:
                raise APIError(404, f"session {sid!r} not found", code="session_not_found")
            return fn(s)

        return await srv.run_locked(sid, work)

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str):
        sid = path_id(sid)
        return await existing(sid, lambda s: s.stats())

    @app.get("/v1/sessions/{sid}/transcript")
    async def get_transcript(sid: str):
        sid = path_id(sid)
        return await existing(sid, lambda s: {"id": sid, "messages": list(s.transcript)})

    @app.post("/v1/sessions/{sid}/reset")
    async def reset_session(sid: str):
        sid = path_id(sid)

        def do(s: Session):
            s.reset()
            return s.stats()

        return await existing(sid, do)

    @app.post("/v1/sessions/{sid}")
    async def configure_session(sid: str, request: Request):
        sid = path_id(sid)
        body = await body_of(request)
        unknown = set(body) - {"mode", "learning"}
        if unknown:
            raise APIError(400, f"unknown setting(s) {sorted(unknown)}; allowed: mode, learning")
        mode = body.get("mode")
        if mode is not None and mode not in MODES:
            raise APIError(400, f"mode {mode!r} unknown; choose from {', '.join(MODES)}", param="mode")
        learning = _get(body, "learning", bool)

        def work():
            s = srv.get(sid, create=True)
            if mode is not None and mode != s.mode:
                s.set_mode(mode)
            if learning is not None:
                s.set_learning(learning)
            return s.stats()

        return await srv.run_locked(sid, work)

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str):
        sid = path_id(sid)

        def work():
            with srv.guard:
                had = srv.sessions.pop(sid, None) is not None
            stored = cfg.store is not None and cfg.store.exists(sid)
            if stored:
                cfg.store.delete(sid)
            if not (had or stored):
                raise APIError(404, f"session {sid!r} not found", code="session_not_found")
            return {"id": sid, "deleted": True}

        return await srv.run_locked(sid, work)

    from memlm.serve.web import add_web_routes

    add_web_routes(app)
    return Guard(app, max_body_bytes=cfg.max_body_bytes, api_key=cfg.api_key)
