"""`ember router --config fleet.yaml`: workers and options from a file, re-read when it
changes; bad files are refused by name, bad edits keep the last good fleet."""

from __future__ import annotations

import time

import pytest

from ember.config import RouterConfig
from ember.router.fleet_file import FleetFileWatcher, apply_fleet_file, read_fleet_file
from tests.router.test_router import RouterProcess, _BrokenWorker


def test_reads_workers_and_options(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("workers:\n  - http://a:1/\n  - http://b:2\ndecode-weight: 0.5\n")
    fleet = read_fleet_file(path)
    assert fleet.workers == ("http://a:1", "http://b:2")
    assert fleet.options == {"decode_weight": 0.5}
    config = RouterConfig(workers=("http://c:3",), config=str(path), decode_weight=2.0)
    merged = apply_fleet_file(config, {"decode_weight": 2.0})  # the CLI set it: CLI wins
    assert merged.workers == ("http://c:3", "http://a:1", "http://b:2")
    assert merged.decode_weight == 2.0
    assert apply_fleet_file(RouterConfig(config=str(path)), {}).decode_weight == 0.5


@pytest.mark.parametrize("text, message", [
    ("- just\n- a list\n", "expected a mapping"),
    ("workers: http://a:1\n", "`workers` must be a list"),
    ("workers: []\nfastest: true\n", "unknown option(s) fastest"),
    ("workers: [\n", "fleet file"),
])
def test_bad_files_are_refused_by_name(tmp_path, text, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="fleet.yaml") as err:
        read_fleet_file(path)
    assert message in str(err.value)
    with pytest.raises(ValueError, match="missing.yaml"):
        read_fleet_file(tmp_path / "missing.yaml")


def test_watcher_reports_changes_and_keeps_the_last_good_file(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("workers: [http://a:1]\n")
    watcher = FleetFileWatcher(path)
    assert watcher.poll() is None
    _rewrite(path, "workers: [http://a:1, http://b:2]\n")
    previous, new = watcher.poll()
    assert previous.workers == ("http://a:1",) and new.workers == ("http://a:1", "http://b:2")
    _rewrite(path, "workers: [\n")
    assert watcher.poll() is None and watcher.current is new


def _rewrite(path, text: str) -> None:
    mtime = path.stat().st_mtime_ns
    path.write_text(text)
    while path.stat().st_mtime_ns == mtime:  # coarse file-system clocks
        time.sleep(0.01)
        path.write_text(text)


def test_router_follows_the_file(tmp_path):
    a, b = _BrokenWorker("503"), _BrokenWorker("503")  # healthy by /health; enough here
    path = tmp_path / "fleet.yaml"
    path.write_text(f"workers: [{a.url}]\n")
    router = RouterProcess(flags=("--config", str(path)))
    try:
        assert _urls(router) == {a.url}
        _rewrite(path, f"workers: [{a.url}, {b.url}]\n")
        _wait_for(router, {a.url, b.url})
        _rewrite(path, f"workers: [{b.url}]\n")
        _wait_for(router, {b.url})
        _rewrite(path, "workers: [oops\n")  # a bad edit: the fleet stays
        time.sleep(1.5)
        assert _urls(router) == {b.url}
    finally:
        router.stop()


def _urls(router) -> set[str]:
    return {w["url"] for w in router.workers()}


def _wait_for(router, urls: set[str]) -> None:
    deadline = time.monotonic() + 10
    while _urls(router) != urls or not all(w["healthy"] for w in router.workers()):
        assert time.monotonic() < deadline, router.workers()
        time.sleep(0.1)
