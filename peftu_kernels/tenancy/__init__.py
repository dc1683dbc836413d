"""Multi-tenant PEFT: users, banks per method, BatchMeta, save/load, HF PEFT import/export."""
from .engine import Engine, PeftBatch, StaleBatchError
from .meta import BatchMeta
from .modules import METHODS, UserModule, validate
from .ids import folder_name, user_of
from .store import UserStore, load_user, save_user

__all__ = ["Engine", "PeftBatch", "StaleBatchError", "BatchMeta", "UserModule", "METHODS", "validate", "load_user",
           "save_user", "UserStore", "folder_name", "user_of"]
