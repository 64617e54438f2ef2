"""Credentials and paths: what a training job accepts from configs and the command line.

Credentials for MLflow and object storage come from the environment only (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AZURE_STORAGE_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), where MLflow, pyarrow and Ray read them
themselves. Everything in the training config is logged as MLflow params, and the data path and tracking
URI as tags, so the config and the command line must never hold a secret:

- a config key that names a credential (a ``.``/``_``-separated segment ``password``, ``secret``,
  ``token``, ``credential(s)``, ``api_key``, ``access_key``) is refused, whether it is known or not;
- a path or URI with a password in it (``s3://KEY:SECRET@bucket``, ``https://user:pass@host``) or a
  signed query (``?sig=``, ``?X-Amz-Signature=``, ``?token=``) is refused.

Paths (docs/configuration.md, "Paths"): ``--data`` must be a dataset folder (a ``manifest.json`` and
``_SUCCESS`` inside; `autocdsr.data.shards.open_dataset` checks the rest); nothing a job writes
(checkpoints under ``train.storage_path``, a local SQLite store and its ``mlartifacts`` folder) may lie
inside it, because a rebuild replaces the folder wholesale and training fingerprints what it reads.
Relative local paths are resolved against the working directory once, on the driver, so Ray workers
(which run in other directories) see the same absolute paths; ``..`` is allowed and resolved like any
other relative path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from autocdsr.configtools import ConfigError, flatten

# A key segment (between '.' or '_') naming a credential: "mlflow.token", "s3.secret_key", not "num_ib_tokens".
SECRET_KEY_RE = re.compile(
    r"(^|[._])(password|passwd|secret|token|credentials?|api[_-]?key|access[_-]?key)($|[._])", re.IGNORECASE
)
# Query parameters that carry a signature or a key (Azure SAS, S3/GCS presigned URLs, tokens).
SECRET_QUERY_KEYS = frozenset(
    {"sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
     "x-goog-credential", "code", "key"}
)  # fmt: skip
CREDENTIAL_ENV_HINT = (
    "MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow, "
    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or AZURE_STORAGE_*, "
    "GOOGLE_APPLICATION_CREDENTIALS) for object storage"
)


class PathError(ConfigError):
    """A path or URI from the command line or the config is not acceptable; the message names it."""


def refuse_credential_keys(raw: Mapping[str, Any], where: str = "config") -> None:
    """Raise ConfigError if any (flattened) key of ``raw`` looks like a credential."""
    bad = sorted(k for k in flatten(raw) if SECRET_KEY_RE.search(k))
    if bad:
        raise ConfigError(
            f"{where}: {', '.join(repr(k) for k in bad)} looks like a credential. Credentials are never read "
            f"from configs or the command line (everything there is logged as MLflow params); set them in "
            f"the environment instead: {CREDENTIAL_ENV_HINT}"
        )


def refuse_embedded_credentials(value: str, what: str) -> None:
    """Raise PathError if the URI ``value`` carries a password or a secret query parameter."""
    if "://" not in value:
        return
    parts = urlsplit(value)
    try:
        password = parts.password
    except ValueError:  # an unparsable netloc: let the filesystem layer report it
        password = None
    if password is not None:
        raise PathError(
            f"{what}: the URI carries a password ({parts.scheme}://USER:***@{parts.hostname}...); remove it and "
            f"set the credentials in the environment: {CREDENTIAL_ENV_HINT}"
        )
    secret = sorted(
        k for k, _ in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() in SECRET_QUERY_KEYS or SECRET_KEY_RE.search(k)
    )  # fmt: skip
    if secret:
        raise PathError(
            f"{what}: the URI carries a secret query parameter ({', '.join(secret)}); remove it and set "
            f"the credentials in the environment: {CREDENTIAL_ENV_HINT}"
        )


def resolve_local(path: str) -> str:
    """An absolute form of a local path (URIs unchanged)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _normalised_uri(path: str) -> str:
    if "://" not in path:
        return resolve_local(path).rstrip("/")
    scheme, rest = path.split("://", 1)
    scheme = {"s3a": "s3", "s3n": "s3"}.get(scheme.lower(), scheme.lower())
    if scheme == "file":
        return resolve_local(rest).rstrip("/")
    return f"{scheme}://{rest}".rstrip("/")


def is_within(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or lies under it (local paths resolved, URIs compared by prefix)."""
    c, p = _normalised_uri(child), _normalised_uri(parent)
    return c == p or c.startswith(p + "/")


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    return uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else None


def check_dataset_folder(data: str) -> str:
    """``--data``: no credentials; a local path must be a folder holding manifest.json. Returns it absolute."""
    refuse_embedded_credentials(data, "--data")
    if "://" in data:
        return data
    root = Path(resolve_local(data))
    if not root.is_dir():
        raise PathError(
            f"--data {data}: {root} is not a folder (expected an OUT folder of jobs/build_sequences.py)"
        )
    if not (root / "manifest.json").is_file():
        raise PathError(
            f"--data {data}: {root} holds no manifest.json: not an output folder of jobs/build_sequences.py "
            "(give the folder passed as --output to the job, not one of its splits)"
        )
    return str(root)


def check_training_paths(data: str, storage_path: str, tracking_uri: str, artifact_dir: str | None) -> None:
    """What a training run writes must not lie inside the dataset folder; URIs must hold no secrets."""
    refuse_embedded_credentials(storage_path, "train.storage_path")
    refuse_embedded_credentials(tracking_uri, "mlflow.tracking_uri (or $MLFLOW_TRACKING_URI)")
    writes = {"train.storage_path (checkpoints)": storage_path}
    db = sqlite_path(tracking_uri)
    if db is not None:
        writes["mlflow.tracking_uri (SQLite file)"] = db
        if artifact_dir is not None:
            writes["MLflow artifacts"] = artifact_dir
    for what, path in writes.items():
        if is_within(path, data):
            raise PathError(
                f"{what} {path} lies inside the dataset folder {data}: training never writes into its input "
                "(a rebuild replaces the folder, and the job checks its files for changes); choose a path "
                "outside it"
            )
    if "://" not in storage_path and Path(storage_path).exists() and not Path(storage_path).is_dir():
        raise PathError(f"train.storage_path {storage_path} exists and is not a folder")
