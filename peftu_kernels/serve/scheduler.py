"""Continuous batching for encoder-decoder models: every step admits waiting requests, encodes them once, and
runs one decoder step for every active request, each at its own position, with its own user, its own cache
row and its own encoder length. Finished requests leave at once and free their row.

    eng = Engine(model, capacity=64); srv = ServingEngine(model, eng, AdapterStore(eng, "adapters/"))
    req = srv.submit(Request("alice", ids, max_new_tokens=8)); srv.run_until_idle(); req.tokens

A step: (1) apply finished adapter loads and cancellations, fail requests whose adapter changed under them;
(2) admit, round-robin over users with waiting requests, while rows are free, the step's encoder budget
(tokens) lasts and the distinct users fit the device tier; (3) encode the admitted requests in one pass, keep
their cross-attention keys/values (and decoder prefixes) in the KV pool, answer score requests from the same
encoder output; (4) one decoder step for every active generate request.

Fairness (tested, at any device capacity): a request at the head of its user's queue, with its adapter loaded,
is admitted before any other user is admitted twice; so with U users waiting it waits at most U - 1 admissions,
whatever the length of other users' queues. When only the device tier keeps it out (its distinct users full),
admission stops behind it until a user on the device has finished its requests in flight (at most
max_new_tokens decode steps), and it is admitted next. Requests keep the module they started with or fail
with an error naming it.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generate import check_labels, score_encoded
from ..sampling import GREEDY, Sampling, pick, row_generator
from ..t5 import T5
from ..tenancy import Engine, methods
from .adapters import AdapterStore
from .kv import KVPool, PoolRows
from .usage import UserMetrics


class UnknownUser(KeyError):
    pass


class QueueFull(RuntimeError):
    pass


@dataclass(eq=False)
class Choice:
    """One of a generate request's n answers (its own KV row and random stream)."""
    index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None               # with Sampling.logprobs: per token
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None                  # stop | length (the request's own reasons otherwise)
    stop_reason: object = None                        # the stop sequence (ids) or "text" that ended it

    def snapshot(self) -> "Choice":
        """A copy the step thread will not change (for streaming consumers on other threads)."""
        return Choice(self.index, list(self.tokens), None if self.logprobs is None else list(self.logprobs),
                      None if self.top_logprobs is None else list(self.top_logprobs), self.finish_reason,
                      self.stop_reason)


@dataclass(eq=False)
class Request:
    user: str | None
    input_ids: list[int]
    max_new_tokens: int = 16
    labels: list[list[int]] | None = None   # set: a score request (log-likelihood of each candidate)
    # streaming: on_token(choice snapshot) after each step that changed a choice, on the engine's thread
    on_token: Callable[[Choice], None] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tokens: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    finish_reason: str | None = None        # stop | length | scored | cancelled | timeout | error
    error: str | None = None
    times: dict = field(default_factory=dict)  # arrival, admitted, first_token, finished (perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    timeout: float | None = None            # seconds from arrival; the server's request_timeout caps it
    error_type: str | None = None           # with an error: "invalid_adapter" when the user's own adapter is at fault
    sampling: Sampling = GREEDY             # temperature, top_p, top_k, seed, stop ids, logprobs
    n: int = 1                              # choices, each its own row, from one encoder pass
    stop_when: Callable[[list[int]], bool] | None = None  # e.g. stop strings (the server's tokenizer); step thread
    choices: list[Choice] = field(default_factory=list)

    def __post_init__(self):
        lp = self.sampling.logprobs is not None if isinstance(self.sampling, Sampling) else False
        n = self.n if isinstance(self.n, int) and 1 <= self.n <= 1024 else 1  # bad n: refused by submit
        self.choices = [Choice(i, self.tokens if i == 0 else [], [] if lp else None, [] if lp else None)
                        for i in range(n)]  # req.tokens is choice 0's

    @property
    def kind(self) -> str:
        return "score" if self.labels is not None else "generate"


@dataclass
class _Active:
    req: Request
    row: int
    base: int          # query position of the first generated token (the row's decoder prefix width)
    width: int         # cross keys used in the row
    version: object    # the user's version when admitted: a replace changes it, and the request fails
    last: int
    choice: Choice = None
    gen: torch.Generator | None = None  # the row's own random stream (sampling rows)
    t: int = 0


class ServingEngine:
    def __init__(self, model: T5, engine: Engine | None = None, store: AdapterStore | None = None,
                 max_rows: int = 32, max_input_len: int = 256, max_new_tokens: int = 64, max_virtual: int = 64,
                 encode_budget: int | None = None, max_queue: int = 4096, max_labels: int = 64,
                 max_label_tokens: int = 2048, request_timeout: float = 120.0, max_n: int = 8,
                 metrics_users: int = 0):
        """Limits (each refused with a ValueError naming it; the HTTP server answers 400): max_input_len tokens
        per prompt, max_new_tokens per generate request, max_labels candidates and max_label_tokens label tokens
        in all per score request, max_n choices per generate request (and at most max_rows), max_virtual
        virtual tokens or prefix length per adapter (checked when it is loaded and at submit: a batch never fails
        for a neighbour's adapter); max_rows requests decoding at once, max_queue requests in flight (QueueFull
        beyond it). Every request ends by its deadline (request_timeout seconds after arrival, or the request's
        own shorter `timeout`): finish_reason "timeout", whatever it waited on (a queue, an adapter load, the
        device tier). metrics_users: how many of the heaviest users get their own metric series
        (usage.UserMetrics; 0: none, all summed)."""
        if isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)) or \
                not request_timeout > 0:
            raise ValueError(f"ServingEngine: request_timeout must be a positive number of seconds, got "
                             f"{request_timeout!r}")
        self.request_timeout = float(request_timeout)
        self.usage = UserMetrics(metrics_users)
        self.loop = {"state": "not started", "step_errors": 0, "last_error": None}
        limits = dict(max_rows=max_rows, max_input_len=max_input_len, max_new_tokens=max_new_tokens,
                      max_queue=max_queue, max_labels=max_labels, max_label_tokens=max_label_tokens, max_n=max_n)
        for name, v in {**limits, "max_virtual": max_virtual, "encode_budget": encode_budget or 1}.items():
            least = 0 if name == "max_virtual" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"ServingEngine: {name} must be an int >= {least}, got {v!r}")
        self.max_labels, self.max_label_tokens, self.max_n = max_labels, max_label_tokens, min(max_n, max_rows)
        self.closed = False
        self.model, self.cfg = model.eval(), model.cfg
        self.engine = engine or Engine(model)
        self.store = store
        if store is not None:
            store.check = self.check_adapter  # an adapter past a limit is refused when it is loaded
        p = next(model.parameters())
        self.max_input_len, self.max_new, self.max_virtual = max_input_len, max_new_tokens, max_virtual
        # encoder tokens admitted per step: small keeps decoding rows at a steady pace (on a 2-core CPU, 1x
        # max_input_len gave a lower p99 than 4x at the same rate); a GPU may afford more
        self.encode_budget = max(encode_budget or max_input_len, max_input_len)
        self.max_queue = max_queue
        self.pool = KVPool(self.cfg, max_rows, max_virtual + max_new_tokens, max_input_len + 2 * max_virtual,
                           p.device, p.dtype)
        self.device, self.dtype = p.device, p.dtype
        self._queues: OrderedDict[str | None, deque] = OrderedDict()  # round-robin order of users waiting
        self._active: list[_Active] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._by_id: dict[str, Request] = {}
        self._calls: deque = deque()  # registry changes from other threads, run between steps
        self._rate: deque = deque(maxlen=256)  # (time, tokens) of recent steps, for tokens/s
        self.stats = {"steps": 0, "tokens": 0, "admitted": 0, "finished": 0, "cancelled": 0, "errors": 0, "timeouts": 0,
                      "step_seconds": 0.0, "last_step_seconds": 0.0}

    # --- the client side (any thread) ----------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue a request; raises UnknownUser, QueueFull, ValueError (bad input, a limit passed, a request
        submitted twice) or RuntimeError (after close()) at once."""
        if not isinstance(req, Request):
            raise TypeError(f"submit takes a Request, got {type(req).__name__}")
        if self.closed:
            raise RuntimeError("the serving engine is closed: no new requests")
        if self.loop["state"] == "stopped":
            raise RuntimeError(f"the step loop stopped ({self.loop['last_error']}): no new requests")
        if req.user is not None and not (self.engine.has(req.user) or (self.store and self.store.known(req.user))):
            raise UnknownUser(f"unknown user {req.user!r}")
        self._validate(req)
        if req.user is not None and self.engine.has(req.user):
            self.check_adapter(req.user, needs=self.engine.needs(req.user))
        with self._lock:
            if req.id in self._by_id or "arrival" in req.times:
                raise ValueError(f"request {req.id} was already submitted (make a new Request for each call)")
            if len(self._by_id) >= self.max_queue:
                raise QueueFull(f"{len(self._by_id)} requests in flight (max_queue {self.max_queue})")
            req.times["arrival"] = time.perf_counter()
            req.times["deadline"] = req.times["arrival"] + min(req.timeout or self.request_timeout,
                                                               self.request_timeout)
            self._by_id[req.id] = req
            self._queues.setdefault(req.user, deque()).append(req)
            self._wake.notify_all()
        if req.user is not None and self.store is not None:  # loaded (prefetched) by the step loop, off its path
            self.store.stats["hits" if self.engine.in_memory(req.user) else "misses"] += 1
        return req

    def _validate(self, req: Request) -> None:
        ids, V = req.input_ids, self.cfg.vocab_size
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) and 0 <= t < V for t in ids):
            raise ValueError(f"input ids must be a non-empty list of token ids in [0, {V})")
        if len(ids) > self.max_input_len:
            raise ValueError(f"input has {len(ids)} tokens, this server takes at most {self.max_input_len}")
        if req.labels is not None:
            check_labels(req.labels, V)
            if len(req.labels) > self.max_labels:
                raise ValueError(f"{len(req.labels)} labels, this server scores at most {self.max_labels} per "
                                 f"request (max_labels)")
            n = sum(len(x) for x in req.labels)
            if n > self.max_label_tokens:
                raise ValueError(f"the labels have {n} tokens in all, this server takes at most "
                                 f"{self.max_label_tokens} per request (max_label_tokens)")
        else:
            if not isinstance(req.max_new_tokens, int) or not 1 <= req.max_new_tokens <= self.max_new:
                raise ValueError(f"max_new_tokens must be in [1, {self.max_new}], got {req.max_new_tokens!r}")
            if isinstance(req.n, bool) or not isinstance(req.n, int) or not 1 <= req.n <= self.max_n:
                raise ValueError(f"n must be an int in [1, {self.max_n}] (max_n), got {req.n!r}")
            if len(req.choices) != req.n:
                raise ValueError(f"the request has {len(req.choices)} choices for n={req.n}")
            if req.stop_when is not None and not callable(req.stop_when):
                raise ValueError("stop_when must be callable")
        if not isinstance(req.sampling, Sampling):
            raise ValueError(f"sampling must be a Sampling, got {type(req.sampling).__name__}")
        req.sampling.check(V)
        t = req.timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {t!r}")

    def check_adapter(self, user: str, mods=None, needs: dict | None = None) -> None:
        """Raise ValueError when `user`'s adapter (its modules, or their summed Method.needs) passes a limit of
        this server that depends on the adapter: virtual tokens and prefix length (max_virtual)."""
        if needs is None:
            needs = methods.needs_of(mods)
        for key, what in (("virtual_tokens", "prepends {} virtual tokens"), ("prefix", "adds a prefix of {} tokens")):
            if needs.get(key, 0) > self.max_virtual:
                raise ValueError(f"user {user!r}: the adapter {what.format(needs[key])}, this server takes at most "
                                 f"{self.max_virtual} (max_virtual)")

    def close(self) -> None:
        """No new requests (submit raises); those waiting or running end as "cancelled" at the next step."""
        self.closed = True
        with self._lock:
            for r in self._by_id.values():
                r.cancelled = True
            self._wake.notify_all()

    def call_soon(self, fn) -> Future:
        """Run `fn()` on the step loop's thread between two steps (the registry is not thread-safe)."""
        f = Future()
        with self._lock:
            self._calls.append((fn, f))
            self._wake.notify_all()
        return f

    def wake(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def cancel(self, req_id: str) -> None:
        with self._lock:
            r = self._by_id.get(req_id)
            if r is not None:
                r.cancelled = True
                self._wake.notify_all()

    # --- the step loop -------------------------------------------------------------------------------
    def pending(self) -> int:
        with self._lock:
            return len(self._by_id)

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.pending():
                return
            self.step()
            if not self._active and self._waiting_for_loads():
                time.sleep(0.001)

    def serve_forever(self, stop: threading.Event) -> None:
        """The server's step loop, supervised: a step that raises fails only its own requests (step() does
        that) and the loop goes on; if the loop itself ends abnormally, every request in flight fails at once,
        `loop["state"]` says "stopped" (the HTTP server's /health) and submit refuses new requests."""
        self.loop["state"] = "running"
        try:
            while not stop.is_set():
                with self._lock:
                    if not self._by_id and not self._calls:
                        self._wake.wait(0.01)
                self.step()
                if not self._active and self._waiting_for_loads():
                    time.sleep(0.001)
            self.loop["state"] = "stopped cleanly"
        except BaseException as e:
            self.loop.update(state="stopped", last_error=f"{type(e).__name__}: {e}")
            self._fail_all(f"the step loop stopped ({type(e).__name__}: {e})")
            raise

    def _fail_all(self, why: str) -> None:
        for a in list(self._active):
            self._retire(a, "error", why)
        with self._lock:  # every request still waiting is in _by_id
            self._queues.clear()
            for r in list(self._by_id.values()):
                self._finish(r, "error", why, locked=True)

    def _waiting_for_loads(self) -> bool:
        return self.store is not None and any(self.store.loading(u) for u in list(self._queues) if u is not None)

    @torch.no_grad()
    def step(self) -> None:
        t0 = time.perf_counter()
        self._housekeeping()
        new = self._admit()
        with self.engine.lock:  # the step's forwards read the banks: no registry change from any thread meanwhile
            if new:
                self._guarded(lambda: self._prefill(new), new)
            if self._active:
                self._guarded(self._decode, [a.req for a in self._active])
        if new or self._active or self.stats["tokens"] != (self._rate[-1][1] if self._rate else 0):
            dt = time.perf_counter() - t0
            self.stats["steps"] += 1
            self.stats["step_seconds"] += dt
            self.stats["last_step_seconds"] = dt
            self._rate.append((time.perf_counter(), self.stats["tokens"]))

    def _guarded(self, work, reqs: list[Request]) -> None:
        """Run one phase of a step; if it raises, only the requests it served fail (rows freed), the loop goes
        on. Expected refusals (bad input) are handled inside the phases; this is for the unexpected."""
        try:
            work()
        except Exception as e:
            self.loop["step_errors"] += 1
            self.loop["last_error"] = f"{type(e).__name__}: {e}"
            why = f"the server failed this request's step ({type(e).__name__}: {e})"
            ids = {id(r) for r in reqs}
            for a in [a for a in self._active if id(a.req) in ids]:
                self._retire(a, "error", why)
            for r in reqs:
                if not r.done.is_set():
                    self._finish(r, "error", why)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self._rate if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / max(recent[-1][0] - recent[0][0], 1e-9)

    def _finish(self, req: Request, reason: str, error: str | None = None, locked: bool = False) -> None:
        """End a request (`locked`: the caller holds the lock)."""
        req.finish_reason, req.error = reason, error
        req.times["finished"] = time.perf_counter()
        if locked:
            self._by_id.pop(req.id, None)
        else:
            with self._lock:
                self._by_id.pop(req.id, None)
        self.stats["finished"] += 1
        self.stats["cancelled"] += reason == "cancelled"
        self.stats["errors"] += reason == "error"
        self.stats["timeouts"] += reason == "timeout"
        self.usage.record(req.user, reason, sum(len(c.tokens) for c in req.choices), len(req.input_ids),
                          req.times["finished"] - req.times.get("arrival", req.times["finished"]))
        req.done.set()

    def _retire(self, a: _Active, reason: str, error: str | None = None) -> None:
        """End a row: "stop" / "length" end its choice (the request when no other choice runs); any other
        reason ends the request and all its rows. Rows already ended are left alone."""
        if a not in self._active:
            return
        self._active.remove(a)
        self.pool.release(a.row)
        if reason in ("stop", "length"):
            a.choice.finish_reason = reason
            if a.req.on_token is not None:
                self._emit(a.req, a.choice)
            if any(b.req is a.req for b in self._active):
                return
            reason = a.req.choices[0].finish_reason
        else:
            for b in [b for b in self._active if b.req is a.req]:
                self._active.remove(b)
                self.pool.release(b.row)
        self._finish(a.req, reason, error)

    def _emit(self, req: Request, choice: Choice) -> None:
        try:
            req.on_token(choice.snapshot())
        except Exception:  # a broken stream consumer cancels its own request only
            req.cancelled = True

    def _housekeeping(self) -> None:
        with self._lock:
            calls, self._calls = list(self._calls), deque()
        for fn, f in calls:
            try:
                f.set_result(fn())
            except Exception as e:
                f.set_exception(e)
        if self.store is not None:
            with self._lock:
                queued = [u for u in self._queues if u is not None]
            pinned = {a.req.user for a in self._active} | {u for u in queued if self.engine.in_memory(u)}
            self.store.poll(pinned, [u for u in queued if not self.engine.in_memory(u)])
        now = time.perf_counter()
        for a in list(self._active):
            u = a.req.user
            if a.req.cancelled:
                self._retire(a, "cancelled")
            elif now > a.req.times.get("deadline", float("inf")):
                self._retire(a, "timeout", f"the request's deadline passed ({self._late(a.req)})")
            elif u is not None and not self.engine.has(u):
                self._retire(a, "error", f"the adapter of user {u!r} was unloaded while the request ran")
            elif u is not None and self.engine.version(u) != a.version:
                self._retire(a, "error", f"the adapter of user {u!r} was replaced while the request ran")
        with self._lock:
            for u, q in list(self._queues.items()):
                for r in [r for r in q if r.cancelled]:
                    q.remove(r)
                    self._finish(r, "cancelled", locked=True)
                for r in [r for r in q if now > r.times.get("deadline", float("inf"))]:
                    q.remove(r)
                    self._finish(r, "timeout", f"the request's deadline passed while it waited ({self._late(r)})",
                                 locked=True)
                if u is not None and not self._servable(u):
                    why = self.store.failed.get(u) if self.store else None
                    for r in list(q):
                        q.remove(r)
                        r.error_type = "invalid_adapter" if why else None
                        self._finish(r, "error", f"user {u!r}: " + (why or "unknown user"), locked=True)
                if not q:
                    del self._queues[u]

    def _late(self, r: Request) -> str:
        return f"{r.times['deadline'] - r.times['arrival']:.3g} s after arrival"

    def _servable(self, u: str) -> bool:
        if self.engine.has(u):
            return True
        return self.store is not None and self.store.path(u) is not None and u not in self.store.failed

    # --- admission ---------------------------------------------------------------------------------
    def _admit(self) -> list[Request]:
        # score work per step: at most max_label_tokens label tokens in all (one request always fits, since each
        # is refused above it at submit), so score requests cannot hold the step thread for longer than that
        out, budget, label_budget = [], self.encode_budget, self.max_label_tokens
        cap = self.engine.capacity
        users = {a.req.user for a in self._active if a.req.user is not None}
        free, rows_blocked = self.pool.free, False
        with self._lock:
            progress = True
            while progress and self._queues:
                progress = False
                for u in list(self._queues):
                    q = self._queues[u]
                    r = q[0]
                    ready = u is None or self.engine.in_memory(u)
                    fits_dev = u is None or u in users or cap is None or len(users) < cap
                    rows_needed = r.n if r.kind == "generate" else 0
                    label_tokens = sum(len(x) for x in r.labels) if r.labels is not None else 0
                    if ready and not fits_dev:
                        # a loaded user waits only for the device tier: nobody behind it in round-robin order goes
                        # first (the users on the device drain, one leaves, it is admitted next)
                        progress = False
                        break
                    if ready and rows_needed > free and not rows_blocked:
                        # a request for n rows waits for rows to drain: generate requests behind it in round-robin
                        # order do not take them first (score requests, which need no row, still go)
                        rows_blocked = True
                        continue
                    if not ready or len(r.input_ids) > budget or (rows_needed and rows_blocked) or \
                            free < rows_needed or label_tokens > label_budget:
                        continue
                    q.popleft()
                    self._queues.move_to_end(u)  # round robin: served users go to the back
                    if not q:
                        del self._queues[u]
                    out.append(r)
                    budget -= len(r.input_ids)
                    label_budget -= label_tokens
                    free -= rows_needed
                    if u is not None:
                        users.add(u)
                    progress = True
                    break  # restart from the front: the next user in round-robin order
        for r in out:
            r.times["admitted"] = time.perf_counter()
        self.stats["admitted"] += len(out)
        return out

    # --- prefill: encode once, answer scores, seed the KV rows ---------------------------------------
    def _prefill(self, reqs: list[Request]) -> None:
        for r in [r for r in reqs if r.user is not None and not self.engine.has(r.user)]:
            reqs.remove(r)
            self._finish(r, "error", f"user {r.user!r} was unloaded before its request started")
        # users with virtual prompt tokens widen every row of their encoder pass: encode them apart, so the
        # others' rows are not padded by their prompts
        widens = lambda r: r.user is not None and self.engine.needs(r.user).get("virtual_tokens", 0) > 0  # noqa
        for group in ([r for r in reqs if not widens(r)], [r for r in reqs if widens(r)]):
            if group:
                self._prefill_group(group)

    def _prefill_group(self, reqs: list[Request]) -> None:
        L = max(len(r.input_ids) for r in reqs)
        ids = torch.zeros(len(reqs), L, dtype=torch.long)
        mask = torch.zeros(len(reqs), L, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[i, :len(r.input_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        users = [r.user for r in reqs]
        peft = self.engine.batch(users) if any(u is not None for u in users) else None
        try:
            enc, emask = self.model.encode(ids, mask, peft)
        except ValueError as e:
            for r in reqs:
                self._finish(r, "error", str(e))
            return
        gen = [i for i, r in enumerate(reqs) if r.kind == "generate"]
        self._score(reqs, [i for i, r in enumerate(reqs) if r.kind == "score"], enc, emask)
        if gen:
            self._seed_rows(reqs, gen, enc, emask, peft)

    def _score(self, reqs, idx, enc, emask) -> None:
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            groups.setdefault(tuple(map(tuple, reqs[i].labels)), []).append(i)
        for labels, rows in groups.items():
            users = [reqs[i].user for i in rows]
            sub = self.engine.batch(users) if any(u is not None for u in users) else None
            sel = torch.tensor(rows, device=enc.device)
            sc = score_encoded(self.model, enc[sel], emask[sel], [list(x) for x in labels], sub, check_finite=False)
            for j, i in enumerate(rows):
                if not torch.isfinite(sc[j]).all():  # this row's adapter overflows: it fails alone
                    self._finish(reqs[i], "error", f"user {reqs[i].user!r}: logits are not finite (the adapter "
                                                   f"overflows)")
                    continue
                reqs[i].scores = sc[j].tolist()
                reqs[i].times["first_token"] = time.perf_counter()
                self._finish(reqs[i], "scored")

    def _seed_rows(self, reqs, gen, enc, emask, peft) -> None:
        m, pool = self.model, self.pool
        gen = [i for i in gen for _ in range(reqs[i].n)]  # a row per choice, from the one encoder output
        sel = torch.tensor(gen, device=enc.device)
        sub = [reqs[i] for i in gen]
        speft = self.engine.batch([r.user for r in sub]) if peft is not None else None
        state = m.row_state(enc[sel], emask[sel], speft)
        W, P = state.cross_mask.shape[1], state.prefix_len
        if W > pool.cross_len or P > self.max_virtual:  # adapters past max_virtual are refused when loaded
            for r in dict.fromkeys(sub):
                self._finish(r, "error", f"the batch needs {W} cross keys and a decoder prefix of {P}, over the "
                                         f"pool's {pool.cross_len} / max_virtual={self.max_virtual}")
            return
        rows = [pool.alloc() for _ in sub]
        pool.seed(rows, state)
        k = 0
        for r, row in zip(sub, rows):
            k = k + 1 if self._active and self._active[-1].req is r else 0  # choice index within the request
            s = r.sampling
            self._active.append(_Active(r, row, P, W, self.engine.version(r.user), self.cfg.decoder_start_token_id,
                                        r.choices[k], None if s.greedy else row_generator(s.seed, k)))

    # --- one decoder step for every active request: the model's own step over the pool's rows ----------
    def _decode(self) -> None:
        m, cfg, pool, act = self.model, self.cfg, self.pool, self._active
        dev = self.device
        users = [a.req.user for a in act]
        peft = self.engine.batch(users) if any(u is not None for u in users) else None
        rows = PoolRows(pool, torch.tensor([a.row for a in act], device=dev),
                        torch.tensor([a.base + a.t for a in act], device=dev), max(a.base + a.t for a in act) + 1,
                        max(a.width for a in act))
        logits = m.decode_rows(torch.tensor([a.last for a in act], device=dev), rows, peft)
        finite = torch.isfinite(logits).all(-1).tolist()
        if all(a.req.sampling.greedy and a.req.sampling.logprobs is None for a in act):  # the all-greedy step: argmax only, as before sampling
            got = None
            nxt = logits.argmax(-1).tolist()
        else:
            got = pick(logits, [a.req.sampling for a in act], [a.gen for a in act])
            nxt = got.tokens
        now = time.perf_counter()
        self.stats["tokens"] += len(act)
        for j, (a, tok, ok) in enumerate(zip(list(act), nxt, finite)):
            if a not in self._active:  # a sibling choice failed this step
                continue
            if not ok:  # this row's adapter overflows: it fails alone
                self._retire(a, "error", f"user {a.req.user!r}: logits are not finite (the adapter overflows)")
                continue
            c = a.choice
            c.tokens.append(tok)
            if c.logprobs is not None:
                c.logprobs.append(got.logprob[j])
                c.top_logprobs.append(got.top[j])
            a.req.times.setdefault("first_token", now)
            a.t += 1
            a.last = tok
            hit = a.req.sampling.cut_stop(c.tokens, c.logprobs, c.top_logprobs)  # left out of the answer
            if hit is not None:
                c.stop_reason = list(hit)
            elif a.req.stop_when is not None:
                try:
                    if a.req.stop_when(c.tokens):
                        hit = c.stop_reason = "text"
                except Exception as e:  # confined to its own request
                    self._retire(a, "error", f"the request's stop check failed ({type(e).__name__})")
                    continue
            if tok == cfg.eos_token_id or hit is not None:
                self._retire(a, "stop")
            elif a.t >= a.req.max_new_tokens:
                self._retire(a, "length")
            elif a.req.on_token is not None:
                self._emit(a.req, c)

    # --- reports -------------------------------------------------------------------------------------
    def report(self) -> dict:
        with self._lock:
            waiting = sum(len(q) for q in self._queues.values())
        return {"waiting": waiting, "active": len(self._active), "kv_rows_used": self.pool.used,
                "kv_rows": self.pool.rows, "kv_bytes": self.pool.nbytes(),
                "kv_bytes_per_request": self.pool.bytes_per_row(), "tokens_per_second": self.tokens_per_second(),
                "users_loaded": len(self.engine.users), "users_resident": len(self.engine.slots), **self.stats,
                "loop": self.loop["state"], "step_errors": self.loop["step_errors"],
                **({f"adapter_{k}": v for k, v in self.store.stats.items()} if self.store else {})}
