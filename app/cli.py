"""Command line: ``emotion-server [--version] serve | predict | stream | config``.

* ``serve [--host --port --log-level]``: the HTTP server (uvicorn, one worker: the models, the ASR
  pool and the batchers live in one process and share its cores).
* ``predict FILE... [--models a,b] [--channels mix|separate] [--words] [--segmentation utterance|whole]``: the same pipeline
  in-process; one JSON object per line on stdout (the /v1/predict response plus ``file``; a failed
  file gives ``{"file", "error", "detail"}``); exit status 1 when any file failed.
* ``config``: the effective settings as JSON (API/admin keys and URL passwords redacted).
* ``stream``: added by ``app.streaming.client.add_parser`` when that module exists.

Every subcommand sets ``func`` (``args -> exit status``) with ``set_defaults``.
Thread-safety: a process entry point; ``predict`` runs one event loop with its own service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

log = logging.getLogger("app.cli")


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


async def _predict_files(args: argparse.Namespace, out) -> int:
    from app.analysis.audio import decode
    from app.api.predict import _limits
    from app.errors import status_and_code
    from app.service import EmotionService

    settings = _settings()
    service = EmotionService(settings)
    await service.start()
    failures = 0
    try:
        models = [m for m in (args.models or "").split(",") if m.strip()] or None
        service.resolve_models(models)  # a bad --models is a usage error, not a per-file one
        for path in args.files:
            try:
                t0 = time.perf_counter()
                audio = await service.engine.run_cpu(None, decode, path, args.channels, _limits(settings))
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
                line = {"file": path, **response.model_dump(mode="json")}
            except Exception as exc:
                mapped = status_and_code(exc)
                if mapped is None:
                    log.exception("%s: unexpected error", path)
                failures += 1
                line = {"file": path, "error": mapped[1] if mapped else "internal_error", "detail": str(exc)}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        await service.stop()
    return 1 if failures else 0


def cmd_predict(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from app.errors import UnknownModelError

    try:
        return asyncio.run(_predict_files(args, sys.stdout))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotion-server", description="Speech emotion recognition server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="print the effective settings as JSON (secrets redacted)")
    config.set_defaults(func=cmd_config)

    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", default=None, help="default: EMOTION_HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: EMOTION_PORT or 8000")
    serve.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)

    pred = sub.add_parser("predict", help="analyse audio files in-process; JSON lines on stdout")
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


if __name__ == "__main__":
    sys.exit(main())
