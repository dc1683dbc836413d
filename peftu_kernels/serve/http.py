"""The HTTP API (FastAPI): OpenAI-style completions with `model` naming the user (the multi-LoRA convention of
vLLM and LoRAX), label scoring, adapter load/unload, health and Prometheus metrics.

    POST /v1/completions   {"model": user | base, "prompt": str | [ids], "max_tokens": 16, "stream": false,
                            "temperature", "top_p", "top_k", "seed", "n", "stop", "logprobs"}  (protocol.py)
    POST /v1/score         {"model": ..., "prompt": ..., "labels": [str | [ids], ...]}
    GET  /v1/models        users (loaded and on disk)
    POST /v1/adapters/{user}   load (or reload) the user's folder from the adapter store
    DELETE /v1/adapters/{user} unload it from memory
    GET  /health, GET /metrics

Errors are JSON {"error": {"message", "type"}}: 400 bad request (a field not honoured is named), 401 no or a
wrong API key, 403 a user or route outside the key's scope (the same answer whether or not the user exists),
404 unknown user, 429 queue full, 503 when shutting down. Keys and tenants: auth.py. A client that disconnects has its request cancelled (its KV row freed at the next step).
The step loop runs in one background thread; registry changes requested over HTTP run on that thread.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .auth import UNAUTHENTICATED, Keys, Tenant, bearer, denied
from .protocol import CompletionBody, ScoreBody, completion_json, completion_request, logprobs_json, score_json
from .scheduler import QueueFull, Request, ServingEngine, UnknownUser


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _denied(what: str) -> JSONResponse:
    return _error(403, denied(what), "permission_error")


def json_errors(app: FastAPI) -> None:
    """Every error as JSON {"error": {"message", "type"}}: validation failures 400 naming the field (unknown
    fields too), framework refusals with their status, anything unexpected 500 without paths."""
    @app.exception_handler(RequestValidationError)
    async def _bad(request, exc):
        msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return _error(400, msg or "invalid request", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):  # unknown routes, wrong methods, framework-level refusals: JSON too
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    @app.exception_handler(Exception)
    async def _any(request, exc):  # anything unexpected (a body too deeply nested to parse, ...): JSON, no paths
        if isinstance(exc, RecursionError):
            return _error(400, "the request body is nested too deeply", "invalid_request_error")
        return _error(500, f"internal error ({type(exc).__name__})", "server_error")


def build_app(srv: ServingEngine, tokenizer=None, base_name: str = "base",
              encode_prompt: Callable[[str | None, str], list[int]] | None = None, drain_seconds: float = 5.0,
              load_seconds: float = 60.0, keys: Keys | None = None):
    """`encode_prompt(user, text)` turns a text prompt into ids (default: the tokenizer, with its special
    tokens); the base model answers `model == base_name`. `keys` (auth.Keys): every route but keys.open needs
    a key, and each key reaches only its tenant's users; None: open to every client."""
    stop, state = threading.Event(), {"closing": False}
    everyone = Tenant("open", ("*",), manage=True, metrics=True)

    def tenant(http: HTTPRequest) -> Tenant:
        return getattr(http.state, "tenant", everyone)

    def ids_of(user, p, what="prompt") -> list[int]:
        if isinstance(p, list):
            return p
        if tokenizer is None:
            raise ValueError(f"{what} is text but this server has no tokenizer: send token ids")
        if encode_prompt is not None and what == "prompt":
            return encode_prompt(user, p)
        return tokenizer(p, add_special_tokens=True).input_ids

    @asynccontextmanager
    async def lifespan(app):
        loop_thread = threading.Thread(target=srv.serve_forever, args=(stop,), name="peftu-step-loop", daemon=True)
        loop_thread.start()
        yield
        state["closing"] = True  # drain what is in flight, then cancel the rest
        t_end = time.perf_counter() + drain_seconds
        while srv.pending() and time.perf_counter() < t_end:
            await asyncio.sleep(0.01)
        for rid in list(srv._by_id):
            srv.cancel(rid)
        t_end = time.perf_counter() + 2
        while srv.pending() and time.perf_counter() < t_end:
            await asyncio.sleep(0.01)
        stop.set()
        loop_thread.join(timeout=5)
        if srv.store is not None:
            srv.store.close()

    app = FastAPI(title="peftu serving", lifespan=lifespan)

    @app.middleware("http")
    async def authenticate(http: HTTPRequest, call_next):
        """Before routing, for every path (unknown ones too): no key or a wrong one is 401."""
        if keys is not None and http.url.path not in keys.open:
            who = keys.who(bearer(http.headers.get("authorization")))
            if who is None:
                return _error(401, UNAUTHENTICATED, "authentication_error", {"WWW-Authenticate": "Bearer"})
            http.state.tenant = who
        return await call_next(http)

    json_errors(app)

    def submit(body, http, labels=None, on_token=None):
        """(Request, Texts) submitted, or an error response. The key's scope is checked before anything else,
        so a 403 says nothing of whether the user exists."""
        user = None if body.model == base_name else body.model
        if not tenant(http).may_call(user):
            return None, _denied(f"call model {body.model!r}")
        if state["closing"]:
            return None, _error(503, "the server is shutting down", "unavailable")
        try:
            ids = ids_of(user, body.prompt)
            if labels is not None:
                req, texts = Request(user, ids, labels=[ids_of(user, x, "label") for x in labels],
                                     timeout=body.timeout), None
            else:
                req, texts = completion_request(body, user, ids, body.max_tokens or min(16, srv.max_new), tokenizer)
            req.on_token = on_token
            return (srv.submit(req), texts), None
        except UnknownUser:
            return None, _error(404, f"unknown model (user) {body.model!r}", "not_found_error")
        except QueueFull as e:
            return None, _error(429, str(e), "rate_limit_error")
        except ValueError as e:  # Refused too: the message names the field
            return None, _error(400, str(e), "invalid_request_error")
        except RuntimeError as e:  # the engine was closed
            return None, _error(503, str(e), "unavailable")

    async def wait(req: Request, http: HTTPRequest) -> bool:
        """Until the request ends; False (and the request cancelled) if the client went away."""
        while not req.done.is_set():
            if await http.is_disconnected():
                srv.cancel(req.id)
                return False
            await asyncio.sleep(0.002)
        return True

    def failed(req: Request):
        if req.finish_reason == "error" and req.error_type == "invalid_adapter":  # the tenant's own adapter
            return _error(400, req.error, "invalid_adapter")
        if req.finish_reason == "error":
            return _error(404 if "unknown user" in (req.error or "") else 500, req.error, "server_error")
        if req.finish_reason == "timeout":
            return _error(504, req.error, "timeout")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        if not body.stream:
            got, err = submit(body, http)
            if err is not None:
                return err
            req, texts = got
            if not await wait(req, http):
                return _error(499, "client closed the request", "cancelled")
            return failed(req) or completion_json(req, body.model, texts)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        got, err = submit(body, http, on_token=lambda c: loop.call_soon_threadsafe(q.put_nowait, c))
        if err is not None:
            return err
        req, texts = got

        def chunk(choices):
            body_ = {"id": req.id, "object": "text_completion", "model": body.model, "created": int(time.time()),
                     "choices": choices}
            return f"data: {json.dumps(body_)}\n\n"

        async def events():
            """Per choice, what became visible since the last chunk (tokens, text, their logprobs); a tail
            that may still turn into a stop sequence waits. Then each choice's finish, or the error."""
            sent = {c.index: (0, 0) for c in req.choices}  # tokens, characters already sent
            ended = set()
            try:
                while len(ended) < len(req.choices):
                    try:
                        snap = await asyncio.wait_for(q.get(), 0.05)
                    except asyncio.TimeoutError:
                        if req.done.is_set() and q.empty():
                            break
                        continue
                    if snap.index in ended:
                        continue
                    toks, text = texts.visible(snap)
                    nt, nc = sent[snap.index]
                    if len(toks) > nt or len(text) > nc or snap.finish_reason:
                        c = {"index": snap.index, "text": text[nc:], "tokens": toks[nt:],
                             "logprobs": logprobs_json(snap, texts, nt, len(toks)),
                             "finish_reason": snap.finish_reason}
                        if snap.finish_reason and snap.stop_reason is not None:
                            c["stop_reason"] = snap.stop_reason
                        sent[snap.index] = (max(nt, len(toks)), max(nc, len(text)))
                        yield chunk([c])
                    if snap.finish_reason:
                        ended.add(snap.index)
                if req.finish_reason not in (None, "stop", "length"):  # the request failed, timed out, ...
                    yield chunk([{"index": c.index, "text": "", "finish_reason": req.finish_reason,
                                  **({"error": req.error} if req.error else {})}
                                 for c in req.choices if c.index not in ended])
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): never leave the request running
                if not req.done.is_set():
                    srv.cancel(req.id)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/score")
    async def score(body: ScoreBody, http: HTTPRequest):
        got, err = submit(body, http, labels=body.labels)
        if err is not None:
            return err
        req = got[0]
        if not await wait(req, http):
            return _error(499, "client closed the request", "cancelled")
        return failed(req) or score_json(req, body.model)

    async def on_loop(fn):
        """fn() on the step loop's thread (the registry is not thread-safe), awaited here."""
        fut = srv.call_soon(fn)
        while not fut.done():
            await asyncio.sleep(0.002)
        return fut.result()

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        """The base model and the users this key may call."""
        who = tenant(http)
        loaded = set(await on_loop(lambda: list(srv.engine.users)))
        users = sorted(u for u in loaded | set(srv.store.on_disk() if srv.store is not None else [])
                       if who.may_call(u))
        return {"object": "list", "data": [{"id": base_name, "object": "model", "loaded": True}] +
                [{"id": u, "object": "model", "loaded": u in loaded} for u in users]}

    def may_manage(http, user):
        who = tenant(http)
        if not who.manage:
            return _denied("manage adapters")
        return None if who.may_call(user) else _denied(f"manage model {user!r}")

    @app.post("/v1/adapters/{user}")
    async def load(user: str, http: HTTPRequest):
        """(Re)load from the adapter folder; answers once the engine holds the new version, or with the truth:
        400 `loaded: false` and the reason when it failed, 504 `loaded: false` when it did not finish in time."""
        if (denied := may_manage(http, user)) is not None:
            return denied
        if srv.store is None or srv.store.path(user) is None:
            return _error(404, f"no adapter folder for user {user!r} in the store", "not_found_error")
        before = srv.engine.version(user)
        srv.store.want(user, reload=True)
        t_end = time.perf_counter() + load_seconds
        while time.perf_counter() < t_end:
            if user in srv.store.failed:
                return JSONResponse({"id": user, "loaded": False, "error": {"message": srv.store.failed[user],
                                                                              "type": "invalid_adapter"}}, 400)
            now = srv.engine.version(user)
            if now is not None and now != before and not srv.store.loading(user):
                return {"id": user, "loaded": True, "version": now}
            srv.wake()
            await asyncio.sleep(0.005)
        return JSONResponse({"id": user, "loaded": False, "error": {"message": f"loading {user!r} did not finish "
                                                                               f"within {load_seconds} s",
                                                                    "type": "timeout"}}, 504)

    @app.delete("/v1/adapters/{user}")
    async def unload(user: str, http: HTTPRequest):
        """The check and the removal are one call on the step loop: concurrent DELETEs get one 200, the others
        404, never a 500."""
        if (denied := may_manage(http, user)) is not None:
            return denied
        def remove():
            if not srv.engine.has(user):
                return False
            srv.engine.remove(user)
            return True
        if not await on_loop(remove):
            return _error(404, f"user {user!r} is not loaded", "not_found_error")
        return {"id": user, "loaded": False}

    @app.get("/health")
    async def health():
        """200 "ok" while the step loop runs; 503 "stopped" (with the loop's last error) once it has died."""
        if srv.loop["state"] == "stopped":
            return JSONResponse({"status": "stopped", "error": srv.loop["last_error"], **srv.report()}, status_code=503)
        return {"status": "closing" if state["closing"] else "ok", **srv.report()}

    @app.get("/metrics")
    async def metrics(http: HTTPRequest):
        if keys is not None and "/metrics" not in keys.open and not tenant(http).metrics:
            return _denied("read /metrics")
        from .metrics import render
        return PlainTextResponse(render(srv), media_type="text/plain; version=0.0.4")

    return app


class serve_in_thread:
    """`with serve_in_thread(app) as url:` the app on 127.0.0.1 at a free port (uvicorn in a thread), for tests
    and benchmarks; stopped on exit."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import socket

        import uvicorn
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(1000):
            if self.server.started:
                return self.url
            time.sleep(0.01)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
