"""Every benchmark runs as its real command at a tiny size against the test servers and prints
its figures beside their same-run baselines. No timing is asserted: these prove the benchmarks
still run, so that a change that breaks one fails here and not on the day someone measures."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench._common import Figure, parse_figures

REPO = Path(__file__).resolve().parents[1]
# modules in bench/ that are not benchmarks: plumbing, the faust app bench.driver starts, and
# bench.pipeline's set-up and its WebSocket client processes
NOT_BENCHMARKS = {"__init__", "_common", "driver_app", "pipeline_setup", "pipeline_clients"}


@dataclass(frozen=True)
class Smoke:
    command: str
    figures: tuple[str, ...]  # how each figure's name starts, in the order printed
    database: bool = False  # needs DATABASE_URL too
    lines: tuple[str, ...] = ()  # further lines the output must have (regular expressions)


FANOUT_OURS = (r"^ +ours +p50 +[\d.]+ ms +p99 +[\d.]+ ms +max +[\d.]+ ms +\(80 deliveries counted of 80, 0 lost \(not in by 2 s after the last\), "
               r"0 duplicated; closed by the server: none\)$")
FANOUT_SOCKETIO = (r"^ +socketio +p50 +[\d.]+ ms +p99 +[\d.]+ ms +max +[\d.]+ ms +\([1-9][\d,]* deliveries counted "
                   r"of 80, \d+ lost \(not in by 2 s after the last\), 0 duplicated; closed by the server: none\)$")
FANOUT_CPU = r"^ +CPU, % of one core: edge \d+, clients 1 \d+, clients 2 \d+, redis \d+, bench \d+; .* load average"

SMOKES = {
    "ingest": Smoke("python -m bench.ingest --ticks 300", ("file replay",)),
    "events": Smoke("python -m bench.events --events 300 --history 400", ("(a)", "(b)", "(c)"), database=True,
                    lines=(r"\(200 from the archive, the rest from Redis",)),
    "events replica wait": Smoke("python -m bench.events --replica-wait 20 --events 800", ("(d)", "(e)", "(f)")),
    "edge resume": Smoke("python -m bench.edge resume --missed 300", ("(c)",)),
    "edge idle": Smoke("python -m bench.edge idle --idle 50", ("(b)",)),
    # clients in two processes of their own, the same ones for both servers; every event delivered
    "edge fanout": Smoke("python -m bench.edge fanout --clients 4 --client-procs 2 --seconds 1 --rate 20",
                         ("(a) fan-out", "(a) append -> frame p99"), lines=(FANOUT_OURS, FANOUT_SOCKETIO, FANOUT_CPU)),
    "edge fanout workers": Smoke("python -m bench.edge fanout --clients 4 --seconds 1 --rate 20 --edge-workers 2",
                                 ("(a) fan-out", "(a) append -> frame p99"),
                                 lines=(FANOUT_OURS, r"^ +CPU, % of one core: edge \d+, clients 1 \d+, clients 2 \d+, "
                                                     r"edge 1 \d+, edge 2 \d+, redis")),
    # thousands, not hundreds: the rate is taken between the first and last output seen
    # by a 20 ms poll, and needs more than one poll to be a number
    "driver": Smoke("python -m bench.driver --messages 3000", ("faust agent",),
                    lines=(r"^worker start to first output +[\d.]+ s$",)),
    "compaction": Smoke("python -m bench.compaction --updates 3000 --keys 100",
                        ("(a) append, compacting", "(b) memory, compacting", "(c) read the partition back"),
                        lines=(r"compacted partition keeps 100 entries, plain 3,000$",)),
    "signals api": Smoke("python -m bench.signals_api --signals 50 --requests 120",
                         ("GET /api/signals/buy p50", "GET /api/signals/buy p99"), database=True),
    "driver uvloop": Smoke("python -m bench.driver --messages 3000 --loop uvloop", ("faust agent",)),
    # 300 stocks at 300 ticks/s, a minute of the tick clock every 2 s: 2-3 minutes close per phase
    "analytics": Smoke("python -m bench.analytics --stocks 300 --signalled 30 --rate 300 --seconds 6 --speed 30 "
                       "--subscribers 3", ("(a) worker CPU", "(b) bar close"),
                       lines=(r"^ +K-line +p50 .* [1-9]\d* closed bars received of \d+ owed, 0 duplicated$",
                              r"^ +baseline +p50 .* [1-9]\d* closed bars received of \d+ owed, 0 duplicated$")),
    "breadth": Smoke("python -m bench.breadth --stocks 300 --rate 300 --seconds 2",
                     ("(a) worker CPU", "(b) breadth complete", "(c) breadth changelog"),
                     lines=(r"^ +600 paced ticks consumed in [\d.]+ s with breadth, 600 in [\d.]+ s without$",)),
    # every part at once: a 300-stock market, 600-tick bursts, 1 s paced phases, 6 clients in 2 processes
    "pipeline": Smoke("python -m bench.pipeline --stocks 300 --signalled 30 --ticks 600 --rate 300 --seconds 1 "
                      "--clients 6 --client-procs 2",
                      ("(a) join, one worker", "(a) join, two workers", "(a) raw loop, two processes", "(b)", "(c)"),
                      lines=(r"^ +one worker +600 ticks, 72 events appended of 72 owed, \d+ µs of join CPU per tick; CPU",
                             r"^ +two workers +600 ticks, 72 events appended of 72 owed, \d+ µs of join CPU per tick; CPU",
                             r"^ +one worker +p50 +[\d.]+ ms +p99 +[\d.]+ ms +max +[\d.]+ ms +300 ticks, "
                             r"36 events appended of 36 owed$",
                             r"^ +raw loop +p50 .* 36 events appended of 36 owed$",
                             r"^ +join +p50 +[\d.]+ ms +p99 +[\d.]+ ms +max +[\d.]+ ms +72 of 72 deliveries, 0 lost, "
                             r"0 duplicated$",
                             r"^ +direct +p50 .* 72 of 72 deliveries, 0 lost, 0 duplicated$")),
}


def run_bench(smoke: Smoke, redis_url: str, database_url: str | None, timeout: float = 90) -> str:
    """The benchmark's stdout; fails the test with its output when it exits non-zero or overruns."""
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("DATABASE_URL", None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    argv = [sys.executable, *shlex.split(smoke.command)[1:]]
    # its own process group, so the servers and workers it starts go with it if it hangs
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        failure = None if proc.returncode == 0 else f"exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # asyncio.run cancels main(): the bench's finally blocks stop its servers
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        failure = f"did not finish in {timeout:.0f} s"
    if failure:
        pytest.fail(f"`{smoke.command}` {failure}\n--- stdout ---\n{stdout}\n--- stderr (tail) ---\n{stderr[-4000:]}",
                    pytrace=False)
    return stdout


def check_figure(figure: Figure, output: str) -> None:
    where = f"{figure.name!r} in\n{output}"
    assert figure.baseline is not None and figure.base_name and figure.ratio is not None, \
        f"no same-run baseline and ratio for {where}"
    if figure.unit.split()[0].endswith("/s"):
        # a rate of zero means nothing went through: the code path is broken, however fast it is
        assert figure.value > 0 and figure.baseline > 0, f"nothing moved for {where}"


@pytest.mark.parametrize("name", SMOKES)
def test_benchmark_runs_and_prints_its_figures_with_baselines(name: str, request: pytest.FixtureRequest) -> None:
    smoke = SMOKES[name]
    redis_url = request.getfixturevalue("redis_url")
    database_url = request.getfixturevalue("database_url") if smoke.database else None
    output = run_bench(smoke, redis_url, database_url)
    figures = [f for f in parse_figures(output) if f.name.startswith(smoke.figures)]
    assert [next(p for p in smoke.figures if f.name.startswith(p)) for f in figures] == list(smoke.figures), \
        f"expected figures starting {smoke.figures} in\n{output}"
    for figure in figures:
        check_figure(figure, output)
    for pattern in smoke.lines:
        assert re.search(pattern, output, re.MULTILINE), f"no line matching {pattern!r} in\n{output}"


def modes(module: str) -> list[str]:
    """The choices of a benchmark's positional argument (bench.edge's modes), without 'all'."""
    found = importlib.import_module(module).parser()._actions
    return [c for a in found if not a.option_strings and a.choices for c in a.choices if c != "all"]


def test_every_benchmark_and_mode_has_a_smoke_run() -> None:
    smoked = {tuple(shlex.split(s.command)[2:4]) for s in SMOKES.values()}
    modules = sorted(f"bench.{p.stem}" for p in (REPO / "bench").glob("*.py") if p.stem not in NOT_BENCHMARKS)
    missing = []
    for module in modules:
        wanted: list[tuple[str, ...]] = [(module, mode) for mode in modes(module)] or [(module,)]
        missing += [" ".join(w) for w in wanted if not any(s[:len(w)] == w for s in smoked)]
    assert not missing, f"benchmarks without a smoke run in SMOKES: {missing}"


def test_every_command_in_the_benchmarks_doc_is_accepted_by_its_benchmark() -> None:
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    commands = re.findall(r"`(python -m bench\.[^`]*)`", doc)
    assert commands, "docs/benchmarks.md names no benchmark command"
    smoked = {shlex.split(s.command)[2] for s in SMOKES.values()}
    wrong = []
    for command in commands:
        _, _, module, *args = shlex.split(command)
        try:
            importlib.import_module(module).parser().parse_args(args)
        except (SystemExit, ModuleNotFoundError):
            wrong.append(f"`{command}`: not accepted by {module} (see its usage above)")
            continue
        if module not in smoked:
            wrong.append(f"`{command}`: {module} has no smoke run")
    assert not wrong, "docs/benchmarks.md:\n" + "\n".join(wrong)
