"""The one redaction of secrets, for everything ffscale writes or prints: config.yaml, model.json,
MLflow params and tags, the launcher's command line, warnings, rendered manifests.

What counts as a secret: the `user:password@` part of a URI, the value of a query or keyword
parameter with a secret-looking name (`?token=...`, `&sig=...`, `password=...` in a libpq string),
a value under a secret-looking key (`api_key: ...`), and the value of every credential variable in
the environment (`MLFLOW_TRACKING_PASSWORD`, `MLFLOW_TRACKING_TOKEN`, `AWS_SECRET_ACCESS_KEY`, ...)
wherever it appears. Redacting twice gives the same text.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# a name is secret when its last word says so: `api_token`, `MLFLOW_TRACKING_PASSWORD`,
# `AWS_SECRET_ACCESS_KEY`, but not `model.token_hidden` (nor `PWD`, the working directory)
_WORDS = r"(?:token|password|passwd|secret|credentials?|sig|signature|(?:api|access|private|account)[_-]?key)"
SECRET_NAME = re.compile(rf"{_WORDS}$", re.I)
_USERINFO = re.compile(r"(//)[^/@\s]+@")
_PARAM = re.compile(rf"(?i)((?:^|[?&;\s])[\w.-]*{_WORDS}=)[^&\s;'\"]+")
# environment variables whose values are credentials (their names say so); short values are not
# redacted wherever they appear, or every "1" and "true" would go
_ENV_MIN_LEN = 8


def secret_key(name: str) -> bool:
    """A config key or variable name that holds a secret (`tracking.api_key`, `MLFLOW_TRACKING_TOKEN`)."""
    return bool(SECRET_NAME.search(name.rsplit(".", 1)[-1]))


def env_secrets(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if secret_key(k) and len(v) >= _ENV_MIN_LEN and v != MASK}
    return sorted(vals, key=len, reverse=True)  # the longest first: one secret may hold another


def redact(text: str, environ=None) -> str:
    """`text` with every secret masked."""
    if not text:
        return text
    out = _USERINFO.sub(rf"\1{MASK}@", text)
    out = _PARAM.sub(rf"\1{MASK}", out)
    for v in env_secrets(environ):
        out = out.replace(v, MASK)
    return out


def has_secret(text: str) -> bool:
    return isinstance(text, str) and redact(text) != text


def scrub(obj: Any) -> Any:
    """Nested dicts and lists with secret-looking keys' values masked and every string redacted."""
    if isinstance(obj, dict):
        return {k: (MASK if secret_key(str(k)) and v not in (None, "") else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v) for v in obj)
    return redact(obj) if isinstance(obj, str) else obj


def secret_keys(obj: Any, prefix: str = "") -> list[str]:
    """The dotted keys of `obj` whose values `scrub` would change (for errors that name them)."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if secret_key(str(k)) and v not in (None, ""):
                out.append(key)
            else:
                out += secret_keys(v, key + ".")
        return out
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in secret_keys(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if has_secret(obj) else []
