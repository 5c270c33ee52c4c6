"""Process plumbing shared by the commands: signals, settings errors, metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
from prometheus_client import start_http_server
from pydantic_settings import BaseSettings

from schemas.universe import BadUniverseFile, Listing, Universe, UniverseTooSmall, universe_from
from streams.settings import CommonSettings, ConfigError, load

T = TypeVar("T")
S = TypeVar("S", bound=BaseSettings)
log = logging.getLogger("tickwave")


def settings_or_exit(cls: type[S]) -> S:
    """Settings, or a usage error naming the variable (exit 2, no traceback)."""
    try:
        return load(cls)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def universe_or_exit(settings: CommonSettings) -> Universe:
    """The universe TICKWAVE_UNIVERSE_FILE names (or the built-in one), or a usage error naming it."""
    try:
        return universe_from(settings.universe_file)
    except BadUniverseFile as exc:
        raise click.UsageError(f"TICKWAVE_UNIVERSE_FILE: {exc}") from None


def pick_or_exit(universe: Universe, stocks: int) -> list[Listing]:
    """`stocks` listings of the universe, or a usage error on --stocks."""
    try:
        return universe.pick(stocks)
    except UniverseTooSmall as exc:
        raise click.BadParameter(str(exc), param_hint="--stocks") from None


def serve_metrics(port: int) -> None:
    """Serve /metrics on `port` (0: off)."""
    if port:
        start_http_server(port)
        log.info("metrics served", extra={"port": port})


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run `main(stop)`; SIGINT/SIGTERM set `stop` so it can finish its batch and return."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await main(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    return asyncio.run(runner())
