"""Multi-tenant PEFT: users, a bank per method (one file per method in methods/), BatchMeta, save/load,
HF PEFT / AdapterHub import/export."""
from .engine import Engine, PeftBatch, StaleBatchError
from .meta import BatchMeta
from . import methods
from .methods import validate
from .modules import UserModule, owned
from .ids import folder_name, user_of
from .store import UserStore, load_user, save_user

__all__ = ["Engine", "PeftBatch", "StaleBatchError", "BatchMeta", "UserModule", "owned", "methods", "validate", "load_user",
           "save_user", "UserStore", "folder_name", "user_of"]
