"""Atomic publication of the job's output folder.

Everything is written under a hidden staging folder beside OUT (``.<name>.staging-<run id>``); the manifest
and ``_SUCCESS`` go in last; then the staging folder replaces OUT by rename. A crash or kill at any moment
leaves the previous complete OUT in place, or (in the instant between the two renames) parked as
``.<name>.previous-<run id>``, which the next run restores before doing anything else. Readers must
only trust a folder holding ``_SUCCESS``.

On object stores without atomic rename (S3), the rename is a copy: there ``_SUCCESS`` is the commit point.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from pipelines.fs import HadoopFS

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"


class OutputError(ValueError):
    """The output path cannot be used; the message says why."""


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


class AtomicOutput:
    def __init__(self, fs: HadoopFS, output: str, input_path: str | None = None, force: bool = False) -> None:
        self.fs = fs
        self.output = fs.qualify(output).rstrip("/")
        parent, name = self.output.rsplit("/", 1)
        self.parent, self.name = parent, name
        self.run_id = uuid.uuid4().hex[:12]
        self.staging = f"{parent}/.{name}.staging-{self.run_id}"
        self._previous = f"{parent}/.{name}.previous-{self.run_id}"
        self.force = force
        if input_path is not None:
            inp = fs.qualify(input_path).rstrip("/")
            if _inside(self.output, inp):
                raise OutputError(
                    f"output {self.output} lies inside the input {inp}; choose a folder outside it"
                )
            if _inside(inp, self.output):
                raise OutputError(
                    f"input {inp} lies inside the output {self.output}; replacing the output would delete the input"
                )

    def path(self, sub: str) -> str:
        return f"{self.staging}/{sub}"

    def _siblings(self, kind: str) -> list[str]:
        prefix = f".{self.name}.{kind}-"
        if not self.fs.exists(self.parent):
            return []
        return [d for d in self.fs.list_dirs(self.parent) if d.rsplit("/", 1)[-1].startswith(prefix)]

    def is_previous_result(self) -> bool:
        return self.fs.exists(f"{self.output}/{SUCCESS}") or self.fs.exists(f"{self.output}/{MANIFEST}")

    def prepare(self) -> None:
        """Restore a result parked by a crashed swap, check OUT may be replaced, create the staging folder."""
        if not self.fs.exists(self.output):
            parked = [p for p in self._siblings("previous") if self.fs.exists(f"{p}/{SUCCESS}")]
            if parked:
                latest = sorted(parked)[-1]
                log.warning("restoring %s, parked by a run that stopped mid-swap, to %s", latest, self.output)
                self.fs.rename(latest, self.output)
        if self.fs.exists(self.output) and not self.force:
            if not self.fs.is_dir(self.output):
                raise OutputError(
                    f"output {self.output} exists and is a file; remove it or choose another path"
                )
            has_content = bool(
                self.fs.list_files(self.output, recursive=False) or self.fs.list_dirs(self.output)
            )
            if has_content and not self.is_previous_result():
                raise OutputError(
                    f"refusing to replace {self.output}: it exists and holds no {MANIFEST} or {SUCCESS} of a previous "
                    f"run of this job; remove it, choose another path, or pass --force"
                )
        stale = self._siblings("staging")
        if stale:
            log.warning(
                "leftover staging folders of earlier interrupted runs (safe to delete): %s", ", ".join(stale)
            )
        self.fs.mkdirs(self.staging)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the manifest and _SUCCESS into staging, then swap staging in place of OUT."""
        self.fs.write_bytes(self.path(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
        self.fs.write_bytes(self.path(SUCCESS), b"")
        had_previous = self.fs.exists(self.output)
        if had_previous:
            self.fs.rename(self.output, self._previous)
        self.fs.rename(self.staging, self.output)
        if had_previous:
            self.fs.delete(self._previous)
        log.info("published %s", self.output)

    def abort(self) -> None:
        if self.fs.exists(self.staging):
            self.fs.delete(self.staging)


def read_manifest(fs: HadoopFS, output: str) -> dict[str, Any]:
    return json.loads(fs.read_bytes(f"{output.rstrip('/')}/{MANIFEST}").decode())
