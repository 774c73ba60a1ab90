"""`ember bench serve-compare` end to end with real `ember serve` processes on the tiny model:
the "vLLM" side is a fake venv whose bin/vllm starts a second ember server (vLLM itself is not
installed in CI). Checks the report, the ratios, the round order and that no process is left.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ember.bench.serve.compare import CompareConfig, compare_runs, run_compare, to_table
from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.servers import (
    EngineSettings,
    ServerLaunch,
    ServerProcess,
    running_server,
    vllm_launch,
)
from ember.cli import main
from tests.factories import tiny_model_dir

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("compare-models"))


@pytest.fixture
def fake_vllm_venv(tmp_path) -> Path:
    """bin/vllm: `vllm serve DIR ARGS...` -> `ember serve --model DIR ARGS...` (ember takes
    every flag serve-compare gives vLLM) on one thread and a 4 MiB KV cache."""
    script = tmp_path / "venv" / "bin" / "vllm"
    script.parent.mkdir(parents=True)
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        shift
        model="$1"
        shift
        cd {REPO}
        exec {sys.executable} -m ember.cli serve --model "$model" --num-threads 1 \\
            --kv-cache-memory 4194304 "$@"
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script.parent.parent


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE}


def test_cli_runs_both_servers_reports_ratios_and_leaves_no_process(
        model_dir, fake_vllm_venv, tmp_path, capsys) -> None:
    before = _descendants()
    out = tmp_path / "out"
    rc = main(["bench", "serve-compare", "--model-dir", str(model_dir), "--dtype", "float32",
               "--served-model-name", "tiny", "--vllm-venv", str(fake_vllm_venv),
               "--kv-cache-gib", str(4 / 1024), "--max-num-seqs", "16",
               "--max-num-batched-tokens", "512", "--num-threads", "1", "--num-warmup", "2",
               "--num-prompts", "6", "--input-len", "16", "--output-len", "6",
               "--range-ratio", "0.5", "--max-concurrency", "4", "--ignore-eos",
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "compare.json").read_text())
    assert (report["subject"], report["baseline"]) == ("ember", "vllm")
    assert [(r["engine"], r["round"]) for r in report["runs"]] == [("ember", 0), ("vllm", 0)]
    for run in report["runs"]:
        assert run["summary"]["num_completed"] == 6 and run["summary"]["num_errors"] == 0
        assert run["exit_code"] == 0 and run["processes_left"] == []
        assert Path(run["report"]).exists()
        assert (out / f"{run['engine']}-r0.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "logs" / f"{run['engine']}-r0.log").exists()
    # Same model, tokenizer and trace on both sides: identical request and token counts.
    assert report["same_trace"] is True
    assert report["totals"]["ember"]["total_completion_tokens"] == sum(
        r["completion_tokens"] for r in json.loads(
            Path(report["runs"][0]["report"]).read_text())["requests"])
    for key in ("output_tok_s", "request_s", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms",
                "itl_p90_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p90_ms"):
        assert report["ratios"][key] > 0
        assert report["ratios"][key] == pytest.approx(
            report["metrics"]["ember"][key] / report["metrics"]["vllm"][key])
    assert set(report["target"]) == {"throughput_ratio_min", "throughput_met", "itl_p90_met"}
    vllm_run = report["runs"][1]
    assert vllm_run["env"]["VLLM_CPU_KVCACHE_SPACE"] == f"{4 / 1024:g}"
    assert "| output_tok_s |" in capsys.readouterr().out
    assert _descendants() <= before


def _tiny_launch(model_dir: Path, name: str) -> ServerLaunch:
    argv = (sys.executable, "-m", "ember.cli", "serve", "--model", str(model_dir),
            "--served-model-name", "tiny", "--max-model-len", "256", "--num-threads", "1",
            "--kv-cache-memory", str(4 << 20))
    return ServerLaunch(name, argv, start_timeout_s=120)


def test_error_during_a_run_still_stops_the_server(model_dir, tmp_path, monkeypatch) -> None:
    import ember.bench.serve.compare as compare

    seen: list[ServerProcess] = []
    real_running = compare.running_server

    def spying_running_server(launch, log_path):
        cm = real_running(launch, log_path)
        server = cm.__enter__()
        seen.append(server)

        class Wrapper:
            def __enter__(self):
                return server

            def __exit__(self, *exc):
                return cm.__exit__(*exc)
        return Wrapper()

    def boom(cfg):
        raise KeyboardInterrupt  # as if Ctrl-C arrived mid-trace

    monkeypatch.setattr(compare, "running_server", spying_running_server)
    monkeypatch.setattr(compare, "run_serve_bench", boom)
    cfg = CompareConfig(load=ServeBenchConfig(url="http://x", num_prompts=2, model="tiny"),
                        engine=EngineSettings(model_dir, "tiny"), out_dir=tmp_path,
                        num_warmup=0, plot=False)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, [_tiny_launch(model_dir, "a"), _tiny_launch(model_dir, "b")])
    assert len(seen) == 1  # the second server was never started
    assert seen[0].proc.returncode is not None and seen[0].alive_pids() == []


def test_server_that_dies_while_starting_raises_with_its_log(tmp_path) -> None:
    launch = ServerLaunch("broken", (sys.executable, "-c",
                                     "import sys; print('no model here'); sys.exit(3)"))
    with pytest.raises(RuntimeError, match="(?s)broken server exited with 3.*no model here"), \
            running_server(launch, tmp_path / "broken.log"):
        pass


def test_stop_kills_a_group_that_ignores_sigterm_and_its_orphans(tmp_path) -> None:
    # A parent ignoring SIGTERM with a child in a new session (out of the group's reach).
    code = textwrap.dedent("""\
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
        time.sleep(600)
        """)
    server = ServerProcess(ServerLaunch("stubborn", (sys.executable, "-c", code)),
                           tmp_path / "s.log")
    deadline = time.monotonic() + 30
    while len(psutil.Process(server.proc.pid).children()) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(server.proc.pid).children()[0]
    server.cpu_seconds()  # notes the descendants, as wait_ready() does
    t0 = time.monotonic()
    assert server.stop(grace_s=0.5) == -9
    assert time.monotonic() - t0 < 15
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert server.alive_pids() == []


def test_vllm_launch_matches_the_engine_settings(tmp_path) -> None:
    s = EngineSettings(Path("/m"), "bench", dtype="bfloat16", max_model_len=1024,
                       kv_cache_gib=4.0, max_num_seqs=64, max_num_batched_tokens=2048,
                       num_threads=2)
    launch = vllm_launch(s, Path("/venvs/vllm"), tmp_path)
    argv = list(launch.argv)
    assert argv[:3] == ["/venvs/vllm/bin/vllm", "serve", "/m"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags == {"--dtype": "bfloat16", "--max-model-len": "1024", "--max-num-seqs": "64",
                     "--max-num-batched-tokens": "2048", "--served-model-name": "bench",
                     "--seed": "0"}
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert launch.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert all(os.path.isdir(launch.env[k]) for k in ("TMPDIR", "VLLM_CACHE_ROOT",
                                                      "TORCHINDUCTOR_CACHE_DIR"))


def _run(engine: str, round_idx: int, tok_s: float, itl_p90: float) -> dict:
    metrics = {"output_tok_s": tok_s, "request_s": tok_s / 10, "ttft_p50_ms": 10.0,
               "ttft_p90_ms": 20.0, "itl_p50_ms": 5.0, "itl_p90_ms": itl_p90,
               "itl_p99_ms": 9.0, "tpot_p50_ms": 5.0, "e2e_p50_ms": 100.0, "e2e_p90_ms": 200.0}
    summary = {"num_completed": 4, "num_errors": 0, "total_prompt_tokens": 64,
               "total_completion_tokens": 32}
    return {"engine": engine, "round": round_idx, "metrics": metrics, "summary": summary}


def test_compare_runs_takes_each_servers_best_round_and_judges_the_target() -> None:
    runs = [_run("ember", 0, 100.0, 6.0), _run("vllm", 0, 80.0, 7.0),
            _run("vllm", 1, 70.0, 5.0), _run("ember", 1, 140.0, 6.5)]
    result = compare_runs(["ember", "vllm"], runs)
    assert result["best_round"] == {"ember": 1, "vllm": 0}
    assert result["ratios"]["output_tok_s"] == pytest.approx(140 / 80)
    assert result["ratios"]["itl_p90_ms"] == pytest.approx(6.5 / 7.0)
    assert result["same_trace"] is True
    assert result["target"]["throughput_met"] and result["target"]["itl_p90_met"]
    assert "1.75×" in to_table(result)


def test_rounds_alternate_the_order(tmp_path, monkeypatch) -> None:
    import ember.bench.serve.compare as compare

    order: list[tuple[str, int]] = []

    def fake_measure(cfg, launch, round_idx):
        order.append((launch.name, round_idx))
        return _run(launch.name, round_idx, 10.0, 1.0) | {"runs": []}

    monkeypatch.setattr(compare, "measure_server", fake_measure)
    monkeypatch.setattr(compare, "machine_info", lambda: {})
    monkeypatch.setattr(compare, "code_version", lambda: {})
    cfg = CompareConfig(load=ServeBenchConfig(url="http://x"),
                        engine=EngineSettings(Path("/m"), "m"), out_dir=tmp_path, repeats=3)
    report = run_compare(cfg, [ServerLaunch("ember", ("x",)), ServerLaunch("vllm", ("y",))])
    assert order == [("ember", 0), ("vllm", 0), ("vllm", 1), ("ember", 1),
                     ("ember", 2), ("vllm", 2)]
    assert len(report["runs"]) == 6 and (tmp_path / "compare.md").exists()
    with pytest.raises(ValueError, match="two servers"):
        run_compare(cfg, [ServerLaunch("a", ("x",)), ServerLaunch("a", ("y",))])
    with pytest.raises(ValueError, match="repeats"):
        CompareConfig(load=cfg.load, engine=cfg.engine, out_dir=tmp_path, repeats=0)

