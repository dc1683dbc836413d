"""Serving replicas on Ray Serve (the `replicas` extra): one replica per GPU, or per process on CPU.

Each replica is our ServingEngine with its own adapter store. Ray Serve's model multiplexing, keyed by the
user id (the request's `model`), sends a user's requests to a replica that already holds that user's
adapter, and evicts a replica's least recently used users beyond `users_per_replica` (the eviction unloads
them from that replica's engine). An ingress deployment serves the single-process server's JSON API
(`/v1/completions` without streaming, with every sampling option; `/v1/score`, `/v1/models`, `/health`), checks
API keys and tenants' scopes there as the single-process server does (--api-key / --api-keys among the engine
arguments), and forwards each request.

    python -m peftu_kernels.serve.replicas --model DIR --adapters DIR --replicas 2 [--port 8000]
"""

import argparse
import asyncio
import os
import threading
import uuid
from collections import Counter

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse
from ray import serve

from .auth import UNAUTHENTICATED, bearer, denied
from .http import json_errors
from .protocol import (CompletionBody, Refused, ScoreBody, completion_json, completion_request, refusals, score_json,
                       stop_lists)
from .scheduler import QueueFull, Request

BASE = "base"
# users each replica keeps (Ray Serve evicts the least recently used beyond it); set per application
USERS_PER_REPLICA = int(os.environ.get("PEFTU_USERS_PER_REPLICA", "64"))
app = FastAPI(title="peftu serving replicas")
json_errors(app)


def _err(status, message, kind):
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class _Held:
    """What multiplexing caches per user: dropping it (LRU eviction) unloads the user from the engine."""

    def __init__(self, replica, user):
        self.replica, self.user = replica, user

    def __del__(self):
        srv = self.replica.srv
        if srv.engine.has(self.user):
            srv.call_soon(lambda: srv.engine.has(self.user) and srv.engine.remove(self.user))


@serve.deployment
class Replica:
    def __init__(self, args: dict):
        from . import __main__ as cli
        self.srv, self.tok = cli.build(cli.parse(args["argv"]))
        self.stop = threading.Event()
        threading.Thread(target=self.srv.serve_forever, args=(self.stop,), daemon=True).start()
        self.id, self.counts = uuid.uuid4().hex[:8], Counter()

    @serve.multiplexed(max_num_models_per_replica=USERS_PER_REPLICA)
    async def get_user(self, user: str):
        if user != BASE:
            store = self.srv.store
            if store is None or not store.known(user):
                raise KeyError(user)
            for _ in range(60_000):
                if self.srv.engine.has(user):
                    break
                if user in store.failed:
                    raise ValueError(store.failed[user])
                store.want(user, reload=False)
                self.srv.wake()
                await asyncio.sleep(0.005)
        return _Held(self, user)

    async def _run(self, req):
        """The finished request, or an error dict with the HTTP status the single-process server would give."""
        try:
            self.srv.submit(req)
        except QueueFull as e:
            return {"error": {"message": str(e), "type": "rate_limit_error"}, "status": 429}
        except ValueError as e:
            return {"error": {"message": str(e), "type": "invalid_request_error"}, "status": 400}
        while not req.done.is_set():
            await asyncio.sleep(0.002)
        if req.error:
            return {"error": {"message": req.error, "type": "server_error"},
                    "status": 504 if req.finish_reason == "timeout" else 500}
        return req

    def _ids(self, p):
        return p if isinstance(p, list) else self.tok(p, add_special_tokens=True).input_ids

    async def complete(self, body: dict) -> dict:
        user = serve.get_multiplexed_model_id()
        await self.get_user(user)
        self.counts[user] += 1
        b = CompletionBody.model_validate(body)
        try:
            req, texts = completion_request(b, None if user == BASE else user, self._ids(b.prompt),
                                            b.max_tokens or min(16, self.srv.max_new), self.tok)
        except ValueError as e:
            return {"error": {"message": str(e), "type": "invalid_request_error"}, "status": 400}
        req = await self._run(req)
        return req if isinstance(req, dict) else completion_json(req, user, texts, replica=self.id)

    async def score(self, body: dict) -> dict:
        user = serve.get_multiplexed_model_id()
        await self.get_user(user)
        self.counts[user] += 1
        req = await self._run(Request(None if user == BASE else user, self._ids(body["prompt"]),
                                      labels=[self._ids(x) for x in body["labels"]], timeout=body.get("timeout")))
        return req if isinstance(req, dict) else score_json(req, user, replica=self.id)

    def stats(self) -> dict:
        return {"replica": self.id, "requests_by_user": dict(self.counts), "loaded": sorted(self.srv.engine.users)}

    def users(self) -> list[str]:
        return self.srv.store.on_disk() if self.srv.store is not None else []


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, replica, argv: list[str]):
        from . import __main__ as cli
        self.replica = replica
        # checked in each route: a middleware on the module's app did not see keys set here under Ray Serve
        # (test_serve_replicas answered 200 without a key); a body that fails validation is 400 before this check
        self.keys = cli.keys_of(cli.parse(argv))

    def _scope(self, http: HTTPRequest, model: str | None = None, route: str = ""):
        """None when the request may go on; else the 401 / 403 answer (scope checked before existence)."""
        if self.keys is None or route in self.keys.open:
            return None
        who = self.keys.who(bearer(http.headers.get("authorization")))
        if who is None:
            return _err(401, UNAUTHENTICATED, "authentication_error")
        if model is not None and not who.may_call(None if model == BASE else model):
            return _err(403, denied(f"call model {model!r}"), "permission_error")
        http.state.tenant = who
        return None

    async def _forward(self, method: str, model: str, body: dict):
        try:
            out = await getattr(self.replica.options(multiplexed_model_id=model), method).remote(body)
        except Exception as e:  # an unknown user raises KeyError inside the replica
            unknown = "KeyError" in type(e).__name__ or "KeyError" in str(e)
            return JSONResponse({"error": {"message": f"unknown model (user) {model!r}" if unknown else str(e),
                                           "type": "not_found_error" if unknown else "server_error"}},
                                status_code=404 if unknown else 500)
        if "error" in out:
            return JSONResponse({"error": out["error"]}, status_code=out.get("status", 500))
        return out

    @app.post("/v1/completions")
    async def completions(self, body: CompletionBody, http: HTTPRequest):
        if (denied := self._scope(http, body.model)) is not None:  # before anything that tells if the user exists
            return denied
        if body.stream:
            return _err(400, "stream: streaming is served by the single-process server only", "invalid_request_error")
        try:  # refused here, before a replica is picked
            refusals(body)
            stop_lists(body.stop, True)
        except Refused as e:
            return _err(400, str(e), "invalid_request_error")
        return await self._forward("complete", body.model, body.model_dump())

    @app.post("/v1/score")
    async def score(self, body: ScoreBody, http: HTTPRequest):
        if (denied := self._scope(http, body.model)) is not None:
            return denied
        return await self._forward("score", body.model, body.model_dump())

    @app.get("/v1/models")
    async def models(self, http: HTTPRequest):
        if (denied := self._scope(http)) is not None:
            return denied
        who = getattr(http.state, "tenant", None)
        users = [u for u in await self.replica.users.remote() if who is None or who.may_call(u)]
        return {"object": "list", "data": [{"id": u, "object": "model"} for u in [BASE] + users]}

    @app.get("/health")
    async def health(self, http: HTTPRequest):
        if (denied := self._scope(http, route="/health")) is not None:
            return denied
        return {"status": "ok"}


def application(argv: list[str], replicas: int = 2, users_per_replica: int = 64, cpus_per_replica: float = 1.0):
    """The Ray Serve application: `replicas` engines behind one ingress (argv: `python -m
    peftu_kernels.serve` arguments, e.g. ["--model", DIR, "--adapters", DIR])."""
    env = {"env_vars": {"PEFTU_USERS_PER_REPLICA": str(users_per_replica)}}
    rep = Replica.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica,
                                                                    "runtime_env": env}).bind({"argv": argv})
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(rep, argv)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m peftu_kernels.serve.replicas", description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--users-per-replica", type=int, default=64)
    ap.add_argument("--port", type=int, default=8000)
    a, rest = ap.parse_known_args(argv)
    import ray
    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    serve.run(application(rest, a.replicas, a.users_per_replica), blocking=True)


if __name__ == "__main__":
    main()
