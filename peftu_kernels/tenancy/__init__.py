"""Multi-tenant PEFT: users, banks per method, BatchMeta, save/load, HF PEFT import/export."""
from .engine import Engine, PeftBatch
from .meta import BatchMeta
from .modules import METHODS, UserModule, validate
from .store import load_user, save_user

__all__ = ["Engine", "PeftBatch", "BatchMeta", "UserModule", "METHODS", "validate", "load_user", "save_user"]
