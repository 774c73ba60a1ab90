"""Core lists, binding every thread of a process, and splitting cores between workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ember.cpu_cores import (
    available_cores,
    bind_to_cores,
    format_cpu_list,
    parse_cpu_list,
    split_cores,
)


@pytest.mark.parametrize("text, cores", [
    ("0", (0,)), ("0-3", (0, 1, 2, 3)), ("0-1,6", (0, 1, 6)), (" 3, 1 ,1", (1, 3)),
])
def test_core_lists_parse_like_taskset(text, cores):
    assert parse_cpu_list(text) == cores
    assert parse_cpu_list(format_cpu_list(cores)) == cores


@pytest.mark.parametrize("text, message", [
    ("", "no cores"), ("a", "not a core number"), ("3-1", "bad range"), ("-1", "not a core"),
])
def test_bad_core_lists_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_cpu_list(text)


def test_split_gives_disjoint_equal_shares():
    assert split_cores(2, (0, 1, 2, 3, 4)) == [(0, 1), (2, 3)]
    assert split_cores(1, (4, 5)) == [(4, 5)]
    with pytest.raises(ValueError, match="cannot give 3 workers a core each: only 2"):
        split_cores(3, (0, 1))


def test_binding_to_a_core_this_process_may_not_use_is_refused():
    beyond = max(available_cores()) + 1
    with pytest.raises(ValueError, match=rf"cores \[{beyond}\] are not available"):
        bind_to_cores((beyond,))


def test_binding_covers_threads_already_running_and_threads_started_later():
    # in a child process: binding the test process itself would narrow every later test
    script = textwrap.dedent("""
        import os, threading
        from ember.cpu_cores import bind_to_cores
        started, stop = threading.Event(), threading.Event()
        ids = {}
        def before():
            ids["before"] = threading.get_native_id(); started.set(); stop.wait()
        t = threading.Thread(target=before); t.start(); started.wait()
        bind_to_cores((0,))
        after = threading.Thread(target=lambda: ids.update(after=os.sched_getaffinity(0)))
        after.start(); after.join()
        print(sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(ids["before"])),
              sorted(ids["after"]))
        stop.set(); t.join()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
    assert out.split() == ["[0]"] * 3
