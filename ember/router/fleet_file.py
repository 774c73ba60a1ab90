"""`ember router --config fleet.yaml`: the workers (and router options) in a file that the
router re-reads when it changes, so workers join and leave by editing it.

    workers:
      - http://10.0.0.1:8000
      - http://10.0.0.2:8000
    decode_weight: 0.25          # any `ember router` option, underscores or dashes

Options on the command line win over the file. On a reload the worker list and the routing
weights (decode_weight, affinity_load_factor) take effect; other options need a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ember.config import RouterConfig

logger = logging.getLogger(__name__)

RELOADABLE = ("decode_weight", "affinity_load_factor")


@dataclass(frozen=True)
class FleetFile:
    workers: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


def read_fleet_file(path: str | Path) -> FleetFile:
    """The file's workers and options; ValueError naming the file and the bad entry."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"fleet file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"fleet file {path}: expected a mapping with a `workers` list")
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    workers = options.pop("workers", [])
    if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
        raise ValueError(f"fleet file {path}: `workers` must be a list of URLs")
    known = {f.name for f in dataclasses.fields(RouterConfig)} - {"workers", "config"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"fleet file {path}: unknown option(s) {', '.join(unknown)}")
    return FleetFile(tuple(w.rstrip("/") for w in workers), options)


def apply_fleet_file(config: RouterConfig, cli_values: dict[str, Any]) -> RouterConfig:
    """`config` with the file's workers added and its options where the CLI set none."""
    if config.config is None:
        return config
    fleet_file = read_fleet_file(config.config)
    options = {k: v for k, v in fleet_file.options.items() if k not in cli_values}
    workers = tuple(dict.fromkeys(config.workers + fleet_file.workers))
    return dataclasses.replace(config, workers=workers, **options)


class FleetFileWatcher:
    """Re-reads the file when its modification time changes; a bad edit is logged and the
    last good version stays in force."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mtime = self._stat()
        self.current = read_fleet_file(self.path)

    def poll(self) -> tuple[FleetFile, FleetFile] | None:
        """(previous, new) when the file changed and parses; None otherwise."""
        mtime = self._stat()
        if mtime == self._mtime:
            return None
        self._mtime = mtime
        try:
            new = read_fleet_file(self.path)
        except ValueError as err:
            logger.error("%s; keeping the previous fleet", err)
            return None
        previous, self.current = self.current, new
        return previous, new

    def _stat(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None
