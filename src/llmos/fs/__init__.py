"""Persistent state in LLMOS_HOME (default ~/.llmos): SQLite metadata and the model registry."""

from llmos.fs.registry import (
    DEFAULT_MODEL_NAME,
    ModelEntry,
    RegistryError,
    add_model,
    db_path,
    default_model_dir,
    get_model,
    list_models,
    llmos_home,
    remove_model,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME", "ModelEntry", "RegistryError", "add_model", "db_path", "default_model_dir", "get_model",
    "list_models", "llmos_home", "remove_model", "resolve_model",
]

from llmos.fs.users import ApiKey, Quota, User, UsersError, UserStore  # noqa: E402

__all__ += ["ApiKey", "Quota", "User", "UserStore", "UsersError"]
