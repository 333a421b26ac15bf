"""The headless command line: argument parsing and the commands that need no browser.

Errors from the services become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import TextIO

from chat import ChatService
from errors import AppError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser(default_config: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Enclave: a local, offline AI workstation (chat in the browser, an HTTP API, a CLI).",
    )
    parser.set_defaults(config=default_config, verbose=False)
    _add_common_options(parser)
    _add_server_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the web UI and API (the default command)")
    _add_common_options(serve)
    _add_server_options(serve)

    chat = commands.add_parser("chat", help="answer one prompt, streamed to stdout")
    _add_common_options(chat)
    chat.add_argument("prompt", help="the prompt, or - to read it from stdin")
    chat.add_argument("--system", help="system prompt (default from config)")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--seed", type=int, help="-1 for random")
    return parser


# Options are accepted before or after the command: SUPPRESS keeps a value given
# before the command from being reset by the command's own parser.


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="settings file (default: config.yaml beside main.py)"
    )
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="log more detail")


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default=argparse.SUPPRESS, help="address to listen on (default from config: server.host)"
    )
    parser.add_argument(
        "--port", type=int, default=argparse.SUPPRESS, help="port to listen on (default from config: server.port)"
    )


def run_chat(args: argparse.Namespace, chat: ChatService, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    prompt = stdin.read() if args.prompt == "-" else args.prompt
    cancel = threading.Event()
    try:
        params = chat.defaults.override(
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
        )
        stream = chat.stream([{"role": "user", "content": prompt}], params, system_prompt=args.system, cancel=cancel)
        for piece in stream:
            stdout.write(piece)
            stdout.flush()
    except AppError as error:
        print(f"error: {error}", file=stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        cancel.set()
        print("\ninterrupted", file=stderr)
        return EXIT_INTERRUPTED
    stdout.write("\n")
    return 0


def default_streams() -> tuple[TextIO, TextIO, TextIO]:
    return sys.stdin, sys.stdout, sys.stderr
