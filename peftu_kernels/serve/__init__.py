"""Serving: continuous batching of user requests on one engine, adapters loaded on demand, an HTTP API
(`python -m peftu_kernels.serve`; FastAPI and uvicorn from the `serve` extra)."""
from ..tenancy.sources import read_folder
from .adapters import AdapterStore
from .kv import KVPool
from .scheduler import QueueFull, Request, ServingEngine, UnknownUser

__all__ = ["ServingEngine", "Request", "AdapterStore", "KVPool", "read_folder", "UnknownUser", "QueueFull"]
