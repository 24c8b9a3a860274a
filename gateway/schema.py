"""Building blocks of the configuration schema, shared by ``gateway.config`` and the backends.

Owns the base model (unknown keys are errors, values frozen), secrets (inline, ``{file: ..}``
or ``{env: ..}``; never logged) and ``ConfigError`` (file, key path, what was expected).
It imports nothing of the gateway, so ``gateway.config`` and ``gateway.sources.settings`` can
both build on it without importing each other in a cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr, model_validator


class ConfigError(Exception):
    """A configuration problem, with the file, the key path and what was expected."""

    def __init__(self, path: str | Path, key: str, message: str,
                 more: list[tuple[str, str]] | None = None) -> None:
        self.path = str(path)
        self.key = key
        self.message = message
        self.more = list(more or [])  # further (key, message) problems of the same file
        super().__init__(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def lines(self) -> list[str]:
        """Every problem, one line each (the first is ``str(self)``)."""
        return [str(self)] + [f"{self.path}: {k}: {m}" if k else f"{self.path}: {m}"
                              for k, m in self.more]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(Model):
    """A secret given inline (``value``), read from a file (``file``) or the environment (``env``).

    The value is never logged: ``repr`` shows only where it comes from.
    """

    value: SecretStr | None = None
    file: Path | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        given = [k for k in ("value", "file", "env") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of value, file or env")
        return self

    def get(self) -> str:
        if self.value is not None:
            return self.value.get_secret_value()
        if self.file is not None:
            try:
                return self.file.read_text().strip()
            except OSError as exc:
                raise ConfigError(self.file, "file", f"cannot read secret: {exc.strerror}") from exc
        assert self.env is not None
        val = os.environ.get(self.env)
        if val is None:
            raise ConfigError("<environment>", self.env, "environment variable is not set")
        return val

    def __repr__(self) -> str:
        where = "value=***" if self.value is not None else (
            f"file={self.file}" if self.file is not None else f"env={self.env}"
        )
        return f"SecretRef({where})"


def _secret(v: Any) -> Any:
    # a bare string is an inline secret
    return {"value": v} if isinstance(v, str) else v


Secret = Annotated[SecretRef, BeforeValidator(_secret)]
"""A secret: a bare string (inline), or ``{file: PATH}`` / ``{env: NAME}``."""
