#!/usr/bin/env python3
"""claude-max-proxy: the OpenAI and Anthropic APIs over the Claude Code CLI.

Point any OpenAI client at ``http://127.0.0.1:3456/v1`` (or an Anthropic client at
``http://127.0.0.1:3456``) and it talks to Claude through your Claude Pro/Max
subscription instead of per-token API billing.

Three doors lead to one core. A door (OpenAI chat completions, OpenAI Responses,
Anthropic Messages) translates its request into the native form of a conversation,
Anthropic's own: a system prompt, messages of content blocks, and tools. The core
gives that conversation to the official ``claude`` CLI as a real conversation: the
earlier turns resumed from a session transcript, the newest on stdin (or, when it
brings tool results, taken up by the CLI as an interrupted turn), the client's
tools served as real tools through an in-process MCP server, all through the
control protocol the Agent SDKs use. A conversation's process is kept between its
turns, so an agent's next call starts warm and extends the previous request byte
for byte, and the prompt cache hits. The CLI's stream-json events become session
events, which the door turns into its own wire format, streamed as Server-Sent
Events when asked.

Run::

    python3 claude_max_proxy.py --port 3456

Standard library only; runs on Python 3.9 through 3.13. ``--help`` lists every
flag and the environment variable that sets its default.

Other commands of the same file run it as a service and check on it::

    python3 claude_max_proxy.py install     # at login: LaunchAgent (macOS), systemd unit (Linux)
    python3 claude_max_proxy.py doctor      # what is wrong, and how to fix it
    python3 claude_max_proxy.py status      # installed, loaded, answering; pid, uptime, counters
    python3 claude_max_proxy.py uninstall

The design, and the order of this file. A request passes each layer once, top to bottom,
and nothing calls up: each part uses only what is above it.

FOUNDATIONS   Errors (ProxyError), Models (the name table), Configuration (Config, flags).
1. PROTOCOL   Pure. The native conversation (Turn, Conversation, content blocks, images);
              the CLI's form of it (Launch argv and transcript, stdin lines, ToolBridge);
              what the CLI reports of plan windows (LimitWindow) and refusals; and the CLI
              session (Session), a state machine in the manner of h11: begin() turns a turn
              into stdin bytes, receive() turns each line the CLI prints (parsed by
              parse_event_line) into typed events (BlockStart, BlockDelta, BlockStop, End
              with one Outcome; Send, Limits for the runtime), and its state says whether
              the session may take a given next turn.
2. DOORS      Pure. One per API (ChatDoor, ResponsesDoor, MessagesDoor): parse_*_request()
              turns a body into a Turn; the door encodes session events and the one Outcome
              into its frames or its whole response, and reads the reply back for the next turn.
3. RUNTIME    I/O. ClaudeProcess moves bytes; the WarmPool pre-starts processes and keeps a
              conversation's for its next turn; Probes check the `claude` binary; the Runner
              owns them all, with the slots and the lifeline. fetch_image downloads images
              for --fetch-images, the one network call of a door. UsageLimits and the stores keep
              what outlives a request. An Exchange runs one turn through one process. The Core
              is the proxy in memory: its answer() is the one path of a turn, from a
              request body to a door's frames written to a Sink.
4. EDGE       HTTP only. The status page, ProxyHandler (framing, Host/Origin and key, the
              ROUTES table, SSE through HttpSink), ProxyServer (connections) and serve().
SERVICE       install, uninstall, status and doctor; main().
"""

import sys

# Before anything only a newer Python runs, so an older one says why instead of failing
# somewhere below. So that Python 3.6 gets this far, the module has no syntax newer than 3.6
# (no `from __future__ import annotations`: its type hints are ones 3.9 evaluates as they are).
if sys.version_info < (3, 9):
    sys.exit("claude-max-proxy needs Python 3.9 or newer, and %s is Python %d.%d.%d: run it "
             "with a newer python3 (macOS's /usr/bin/python3 is 3.9)."
             % ((sys.executable or "this",) + tuple(sys.version_info[:3])))

import argparse
import base64
import binascii
import collections
import difflib
import errno
import functools
import hashlib
import http.client
import hmac
import html
import io
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import plistlib
import re
import selectors
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, NoReturn, Optional, Set, Tuple, Union

try:
    import resource
except ImportError:  # not a POSIX system: the open-file limit stays as it is
    resource = None  # type: ignore[assignment]

__version__ = "0.1.0"
__all__ = [
    "Config", "ProxyError", "parse_command_line",                                # foundations
    "Turn", "Conversation", "Session", "BlockStart", "BlockDelta", "BlockStop",  # protocol
    "End", "Send", "Limits", "Outcome",
    "parse_chat_request", "parse_responses_request", "parse_messages_request",   # doors
    "ChatDoor", "ResponsesDoor", "MessagesDoor",
    "ClaudeProcess", "WarmPool", "Probes", "Runner", "Exchange", "Core", "Sink",  # runtime
    "TurnRecord",
    "ProxyHandler", "ProxyServer", "serve",                                      # edge
    "main",                                                                      # service
]

log = logging.getLogger("claude_max_proxy")

# What could end a log line, or make a terminal or log viewer act: C0 and C1 controls,
# DEL, and Unicode's own line and paragraph separators.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class EscapedControls(logging.Filter):
    """Each log record is one line, whatever a request or Claude Code put in it. The values a
    message is built from (a client's field names and model, paths, the CLI's output, error
    messages) have their control characters escaped as JSON writes them, so a line break in
    one cannot end the line and forge the next; the messages' own text is the proxy's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(arg if isinstance(arg, (int, float)) else
                                CONTROL_CHARS.sub(lambda m: json.dumps(m.group())[1:-1], str(arg))
                                for arg in record.args)
        return True


log.addFilter(EscapedControls())


# ===========================================================================
# FOUNDATIONS: errors, models, configuration
# ===========================================================================

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

# Error types by status (the SDKs map errors by status alone); any other 4xx is an
# invalid_request_error, any 5xx a server_error.
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    402: "insufficient_quota",  # OpenAI's type for a quota that is spent
    408: "timeout_error",
    429: "rate_limit_error",
}


class ProxyError(Exception):
    """Every failure a client sees: an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ProxyError:
    return ProxyError(400, message, code=code or "invalid_value", param=param)


UPGRADE_HELP = "npm install -g @anthropic-ai/claude-code@latest (the proxy is tested with 2.1.197)"
NOT_LOGGED_IN = "Claude Code is not logged in: run `claude` and /login"
LOGIN_HELP = ("Claude Code is not logged in. Run `claude` once in a terminal on this machine, "
              "log in with your Claude subscription (/login), then retry.")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

# One table drives both the name mapping and GET /v1/models: the OpenAI-side id
# and the CLI alias it stands for. The CLI resolves an alias to the newest model
# of that family; a full id such as "claude-opus-4" would go upstream verbatim
# and be rejected, hence the mapping.
MODELS: List[Tuple[str, str]] = [
    ("claude-opus-4", "opus"),
    ("claude-sonnet-4", "sonnet"),
    ("claude-haiku-4", "haiku"),
    ("claude-fable", "fable"),
]
MODEL_PREFIXES = ("openai/", "anthropic/", "claude-max/")
# A full model id goes to the CLI's argv as it is: only what ids are made of, and not much of it.
FULL_MODEL_ID = re.compile(r"^claude-[A-Za-z0-9._:\[\]-]{1,120}$", re.I)
MODELS_CREATED = 1735689600  # 2025-01-01; the table has no real dates
MODELS_CREATED_AT = "2025-01-01T00:00:00Z"  # the same, as Anthropic writes it


def resolve_model(name: str, default: str) -> str:
    """The CLI --model value for an OpenAI model name, or a 400 naming the choices."""
    requested = name.strip() or default
    bare = requested
    for prefix in MODEL_PREFIXES:
        if bare.lower().startswith(prefix):
            bare = bare[len(prefix):]
    for model_id, alias in MODELS:
        if bare.lower() in (model_id, alias):
            return alias
    if FULL_MODEL_ID.match(bare):
        return bare  # a full id such as claude-sonnet-4-5-20250929: the CLI takes it as is
    raise ProxyError(
        400, "The model `%s` does not exist. Use one of: %s, or a full claude-* model id."
        % (requested[:200], ", ".join(model_id for model_id, _ in MODELS)),
        code="model_not_found", param="model")


def model_object(model_id: str, anthropic: bool = False) -> Dict[str, Any]:
    """A model as GET /v1/models lists it: in Anthropic's shape to its clients, else OpenAI's."""
    if anthropic:
        return {"type": "model", "id": model_id,
                "display_name": " ".join(word.capitalize() for word in model_id.split("-")),
                "created_at": MODELS_CREATED_AT}
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "anthropic"}


def model_list(anthropic: bool = False) -> Dict[str, Any]:
    """GET /v1/models: every model of the table, in one page of the asking API's shape."""
    data = [model_object(model_id, anthropic) for model_id, _alias in MODELS]
    if anthropic:
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    return {"object": "list", "data": data}


def find_model(model_id: str, anthropic: bool = False) -> Optional[Dict[str, Any]]:
    for known, _alias in MODELS:
        if known == model_id:
            return model_object(known, anthropic)
    return None


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

MIB = 1024 * 1024

# One row per flag: (flag, environment variable, type, default, help).
# argparse, --help and README all describe the same table.
OPTIONS: List[Tuple[str, str, Any, Any, str]] = [
    ("--host", "CLAUDE_PROXY_HOST", str, "127.0.0.1",
     "address to bind; anything but loopback needs --api-key to be safe"),
    ("--allow-host", "CLAUDE_PROXY_ALLOW_HOST", str, "",
     "more names clients may reach the proxy by, comma-separated ('*' for any); a request whose "
     "Host header names anything but these, localhost, a loopback or the proxy's own address is "
     "refused, so a web page cannot reach the proxy through DNS rebinding"),
    ("--port", "CLAUDE_PROXY_PORT", int, 3456, "TCP port to listen on"),
    ("--claude-bin", "CLAUDE_BIN", str, "claude",
     "the Claude Code CLI: a name looked up on PATH and the usual install places, or a path"),
    ("--default-model", "CLAUDE_PROXY_DEFAULT_MODEL", str, "claude-sonnet-4",
     "model used when a request names none"),
    ("--api-key", "CLAUDE_PROXY_API_KEY", str, "",
     "when set, every request but /health, HEAD / and the status page's key form needs it, as "
     "'Authorization: Bearer KEY' or 'x-api-key: KEY'"),
    ("--api-key-file", "CLAUDE_PROXY_API_KEY_FILE", str, "",
     "read --api-key from this file instead, which keeps it out of `ps` (install writes one, owner-only)"),
    ("--max-concurrent", "CLAUDE_PROXY_MAX_CONCURRENT", int, 8,
     "most claude processes answering at once"),
    ("--max-connections", "CLAUDE_PROXY_MAX_CONNECTIONS", int, 256,
     "most client connections open at once (kept below the open-file limit); more get a 503"),
    ("--pool-size", "CLAUDE_PROXY_POOL_SIZE", int, 2,
     "claude processes started ahead of time so answers skip the CLI's start-up; 0 turns it off"),
    ("--pool-ttl", "CLAUDE_PROXY_POOL_TTL", float, 600.0,
     "seconds a pre-started claude waits for a request before it is retired"),
    ("--queue-timeout", "CLAUDE_PROXY_QUEUE_TIMEOUT", float, 30.0,
     "seconds a request waits for a free slot before a 429"),
    ("--timeout", "CLAUDE_PROXY_TIMEOUT", float, 600.0,
     "seconds one completion may take in total before a 504"),
    ("--idle-timeout", "CLAUDE_PROXY_IDLE_TIMEOUT", float, 180.0,
     "seconds the CLI may print nothing before a 504"),
    ("--retry-budget", "CLAUDE_PROXY_RETRY_BUDGET", float, 20.0,
     "seconds the CLI may spend retrying rate limits or overload before a 429/503"),
    ("--max-body", "CLAUDE_PROXY_MAX_BODY", int, 10 * MIB,
     "largest request body in bytes (413 above it)"),
    ("--cors", "CLAUDE_PROXY_CORS", str, "",
     "allow browser calls from this origin ('*' for any); off when empty: a request with an "
     "Origin header it does not allow is refused"),
    ("--fetch-images", "CLAUDE_PROXY_FETCH_IMAGES", bool, False,
     "fetch http(s) image URLs (public addresses only); off: images must be data: URLs"),
    ("--allow-api-key", "CLAUDE_PROXY_ALLOW_API_KEY", bool, False,
     "pass ANTHROPIC_API_KEY/ANTHROPIC_AUTH_TOKEN to the CLI (bills per token!)"),
    ("--no-extra-usage", "CLAUDE_PROXY_NO_EXTRA_USAGE", bool, False,
     "refuse requests (403) while Claude Code reports that extra usage, billed beyond the plan, "
     "is being spent or would be"),
    ("--hide-reasoning", "CLAUDE_PROXY_HIDE_REASONING", bool, False,
     "send Claude's thinking (reasoning_content) only to requests that ask for it; "
     "by default it streams whenever Claude thinks"),
    ("--log-level", "CLAUDE_PROXY_LOG_LEVEL", str, "info",
     "debug, info, warning or error"),
    ("--log-file", "CLAUDE_PROXY_LOG_FILE", str, "",
     "log to this file instead of stderr, rotated at 10 MiB with 3 old files kept"),
]


def flag_attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class Config:
    """Settings for one server; attribute names follow the flags."""

    def __init__(self, **values: Any) -> None:
        for flag, _env, _type, default, _help in OPTIONS:
            setattr(self, flag_attr(flag), default)
        for name, value in values.items():
            if not hasattr(self, name):
                raise TypeError("unknown setting %r" % name)
            setattr(self, name, value)


# What a value must be beyond its type, and how to say so: a port that does not exist, no
# room for a single request, or a timeout that ends every request at once would start a
# proxy that cannot work, so they are refused at the door with the flag's name.
VALUE_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "--port": (lambda v: 0 <= v <= 65535, "a port from 1 to 65535 (0 picks a free one)"),
    "--max-concurrent": (lambda v: v >= 1, "at least 1"),
    "--max-connections": (lambda v: v >= 1, "at least 1"),
    "--pool-size": (lambda v: v >= 0, "0 or more"),
    "--pool-ttl": (lambda v: v > 0, "more than 0 seconds"),
    "--queue-timeout": (lambda v: v > 0, "more than 0 seconds"),
    "--timeout": (lambda v: v > 0, "more than 0 seconds"),
    "--idle-timeout": (lambda v: v > 0, "more than 0 seconds"),
    "--retry-budget": (lambda v: v >= 0, "0 seconds or more"),
    "--max-body": (lambda v: v >= 1, "at least 1 byte"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")
# What an on/off environment variable may say; anything else is more likely a typo than "off".
SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}


def option_value(flag: str, kind: Any, raw: str) -> Any:
    """A flag's value read from text (the command line or its environment variable), or
    argparse.ArgumentTypeError saying what it must be."""
    try:
        value = kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a valid %s" % (raw, kind.__name__)) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError("%r is not a finite number" % raw)
    if flag == "--log-level":
        value = value.lower()
        if value not in LOG_LEVELS:
            raise argparse.ArgumentTypeError("%r is not a log level: choose %s"
                                             % (raw, ", ".join(LOG_LEVELS)))
    if flag == "--default-model":  # else every request that names no model would be a 400
        try:
            resolve_model(value, value)
        except ProxyError as error:
            raise argparse.ArgumentTypeError("%r: %s" % (raw, error.message)) from None
    rule = VALUE_RULES.get(flag)
    if rule is not None and not rule[0](value):
        raise argparse.ArgumentTypeError("%r: it must be %s" % (raw, rule[1]))
    return value


def env_value(flag: str, env: str, kind: Any, default: Any) -> Any:
    """The default a flag takes from its environment variable, if set; checked as the flag is."""
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    if kind is bool:
        if raw.strip().lower() not in SWITCH_WORDS:
            raise argparse.ArgumentTypeError("%r is neither on (1, true, yes, on) nor off (0, false, "
                                             "no, off)" % raw)
        return SWITCH_WORDS[raw.strip().lower()]
    return option_value(flag, kind, raw)


# The first argument may name a command; without one the proxy serves, so
# `python3 claude_max_proxy.py --port 3456` keeps working as it always has.
COMMANDS = ("serve", "doctor", "install", "uninstall", "status")
COMMAND_HELP = {
    "serve": "The OpenAI and Anthropic APIs (chat completions, Responses, Messages) over the Claude "
             "Code CLI, on your Claude subscription.",
    "doctor": "Check everything the proxy needs and say how to fix what is wrong.",
    "install": "Run the proxy at login: a LaunchAgent on macOS, a systemd user unit on Linux. "
               "The serve flags given here go into it.",
    "uninstall": "Stop the proxy's LaunchAgent or systemd unit and remove what install wrote.",
    "status": "Is the proxy installed, loaded and answering; its pid, uptime and counters.",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors in one line: the usage of twenty flags above it would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


def build_arg_parser(command: str = "serve") -> argparse.ArgumentParser:
    """The parser of one command; every command takes the serve flags (port, claude-bin ...)."""
    parser = ArgumentParser(
        prog="claude_max_proxy.py" + ("" if command == "serve" else " " + command),
        description=COMMAND_HELP[command],
        epilog="Commands: serve (the default), doctor, install, uninstall, status; "
               "`claude_max_proxy.py COMMAND --help` tells more. "
               "Each flag's default can also be set by the environment variable shown.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    if command in ("install", "uninstall"):
        parser.add_argument("--dry-run", action="store_true",
                            help="print what would be written and run, and change nothing")
    for flag, env, kind, default, help_text in OPTIONS:
        try:
            value = env_value(flag, env, kind, default)
        except argparse.ArgumentTypeError as error:
            parser.error("environment variable %s=%s" % (env, error))
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=value,
                                help="%s [env %s]" % (help_text, env))
        else:
            checked = functools.partial(option_value, flag, kind)
            parser.add_argument(flag, type=checked, default=value, metavar=flag_attr(flag).upper(),
                                help="%s (default: %s) [env %s]" % (help_text, default or "off", env))
    return parser


def load_api_key_file(config: Config) -> None:
    """Set the API key from --api-key-file, if given: a key on the command line is there for
    every local user to read in `ps`. Raises ValueError (or OSError) when it cannot."""
    if not config.api_key_file:
        return
    if config.api_key:
        raise ValueError("give --api-key or --api-key-file, not both")
    with open(os.path.expanduser(config.api_key_file), encoding="utf-8") as f:
        config.api_key = f.read().strip()
    if not config.api_key:
        raise ValueError("%s holds no key" % config.api_key_file)


def parse_command_line(argv: List[str]) -> Tuple[str, Config, bool]:
    """The command, the server's settings, and whether --dry-run was given. A first word that
    is no command (`instal`) exits 2 naming the command it most looks like."""
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        build_arg_parser().error("unknown command %r; %s" % (argv[0], (
            "did you mean %r?" % close[0]) if close else "the commands are " + ", ".join(COMMANDS)))
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    rest = argv[1:] if argv[:1] == [command] else argv
    values = vars(build_arg_parser(command).parse_args(rest))
    dry_run = values.pop("dry_run", False)  # an option of the command, not a server setting
    return command, Config(**values), dry_run


# ===========================================================================
# 1. THE PROTOCOL (pure): the conversation, the CLI's form of it, and the CLI session
# A turn in, bytes for the CLI's stdin out; the CLI's lines in, typed block events out.
# ===========================================================================

# ---------------------------------------------------------------------------
# The native conversation
# ---------------------------------------------------------------------------

# Every door translates its request into one form, Anthropic's own: a system
# prompt, messages of content blocks, and tools. Claude gets it as it is: the
# earlier turns as a session transcript the CLI resumes (or a live process that
# holds them already), the newest user turn on stdin, the client's tools as
# real tools through an in-process MCP server. The upstream request is then a
# real conversation, and each request extends the previous one, so the prompt
# cache hits block by block every turn.

DEFAULT_SYSTEM_PROMPT = ("You are Claude, a helpful AI assistant made by Anthropic. "
                         "Answer the user's messages directly.")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
DOCUMENT_TYPES = ("application/pdf",)
# OpenAI's reasoning effort -> Claude Code's effort level. "none" turns thinking off instead.
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "xhigh": "xhigh", "max": "max"}


class Conversation(NamedTuple):
    system: str
    # {"role": "user" | "assistant", "content": [block, ...]}; roles alternate, but a "system" message
    # (text blocks) may stand after a user message (see messages_conversation)
    messages: List[Dict[str, Any]]
    tools: List[Dict[str, Any]]     # {"name", "description", "input_schema"}


class Turn:
    """One answer Claude must give: the conversation, and how to generate the reply."""

    def __init__(self, model: str, cli_model: str, conversation: Conversation,
                 tool_choice: str = "auto", parallel_tool_calls: bool = True,
                 json_schema: Optional[Dict[str, Any]] = None, max_tokens: Optional[int] = None,
                 stops: Optional[List[str]] = None, effort: Optional[str] = None,
                 thinking: bool = True) -> None:
        self.model = model              # as the client named it; echoed in responses
        self.cli_model = cli_model      # what --model gets
        self.conversation = conversation
        self.tool_choice = tool_choice  # "auto", "required", or the name of the tool to call
        self.parallel_tool_calls = parallel_tool_calls
        self.json_schema = json_schema
        self.max_tokens = max_tokens
        self.stops = stops or []
        self.effort = effort
        self.thinking = thinking

    @property
    def system_prompt(self) -> str:
        """The system prompt Claude gets: the client's, and a line for what the CLI cannot
        force (it passes no tool_choice upstream), so that Claude is at least told."""
        rules = []
        if self.conversation.tools and self.tool_choice == "required":
            rules.append("In this reply you must call at least one of the tools.")
        elif self.conversation.tools and self.tool_choice != "auto":
            rules.append("In this reply you must call the tool `%s`." % self.tool_choice)
        if self.conversation.tools and not self.parallel_tool_calls:
            rules.append("Call at most one tool per reply.")
        return "\n\n".join([self.conversation.system] + rules)


class MessageList:
    """Builds native messages from a client's: consecutive messages of one role
    become one message, and empty text is dropped (Anthropic refuses both).

    The result depends only on the messages so far, so a conversation that grows
    by a turn keeps its earlier messages as they were: the prompt cache hits.
    """

    def __init__(self) -> None:
        self.messages: List[Dict[str, Any]] = []
        self._results = 0  # tool_result blocks leading the last message

    def add(self, role: str, blocks: List[Dict[str, Any]]) -> None:
        blocks = [b for b in blocks if b["type"] != "text" or b["text"].strip()]
        if not blocks:
            return
        if not self.messages or self.messages[-1]["role"] != role:
            self.messages.append({"role": role, "content": []})
            self._results = 0
        content = self.messages[-1]["content"]
        for block in blocks:
            if block["type"] == "tool_result":
                # Tool results answer the turn before, and must come first in a user message.
                content.insert(self._results, block)
                self._results += 1
            else:
                content.append(block)


def text_block(text: str) -> Dict[str, Any]:
    return {"type": "text", "text": text}


def tool_input(arguments: Any, param: str) -> Dict[str, Any]:
    """A call's arguments as the object Anthropic's tool_use.input must be."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise invalid("%s is not valid JSON." % param, param, "invalid_tool_arguments")
    if not isinstance(arguments, dict):
        raise invalid("%s must be a JSON object." % param, param, "invalid_tool_arguments")
    return arguments


# Anthropic takes tool ids of these characters only; a client's ids are mapped alike
# wherever they stand, so calls and their results still pair up.
UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# Anthropic's rule for tool names (the CLI passes any name on, and the API would refuse it).
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def tool_id(value: str) -> str:
    return UNSAFE_ID_CHARS.sub("_", value) or "call"


def native_tool(name: Any, description: Any, parameters: Any, param: str,
                schema_param: str = "parameters") -> Dict[str, Any]:
    """A tool as Claude takes it; `schema_param` is what the client's API calls its schema."""
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise invalid("%s.name must be 1 to 64 letters, digits, '_' or '-'." % param,
                      param + ".name", "invalid_tool_name")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise invalid("%s.%s must be a JSON Schema of an object." % (param, schema_param),
                      "%s.%s" % (param, schema_param), "invalid_type")
    return {"name": name, "description": description if isinstance(description, str) else "",
            "input_schema": parameters}


def tool_result_block(call_id: str, content: Any, is_error: bool = False) -> Dict[str, Any]:
    """A tool result as the CLI builds one from an MCP result: content as a list of blocks,
    keys in its order, so a resumed history and a live one send the same bytes."""
    blocks = [text_block(content)] if isinstance(content, str) else content
    result: Dict[str, Any] = {"tool_use_id": call_id, "type": "tool_result",
                              "content": [b for b in blocks if b["type"] != "text" or b["text"]]}
    if is_error:
        result["is_error"] = True
    return result


def decode_data_url(url: str, param: str) -> Tuple[str, str]:
    """(media type, base64 data) of a data: URL, checked to be valid base64."""
    header, _, data = url[len("data:"):].partition(",")
    media_type, _, encoding = header.partition(";")
    if encoding.lower() != "base64" or not data:
        raise invalid("%s must be a base64 data: URL (data:image/png;base64,...)." % param,
                      param + ".image_url", "invalid_image")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("%s holds invalid base64 data." % param, param + ".image_url", "invalid_image")
    return media_type.lower(), data


def document_block(data_url: Any, param: str) -> Dict[str, Any]:
    """A PDF sent as a data: URL, as the document block Claude reads."""
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise invalid("%s must hold a base64 data: URL of a PDF (uploaded file ids are not "
                      "supported)." % param, param, "unsupported_file")
    media_type, data = decode_data_url(data_url, param)
    if media_type not in DOCUMENT_TYPES:
        raise invalid("%s is %s; Claude reads documents of type %s." % (
            param, media_type or "of unknown type", ", ".join(DOCUMENT_TYPES)), param, "unsupported_file")
    return {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}


def parse_effort(effort: Any, param: str) -> Tuple[Optional[str], bool]:
    """(effort level, thinking on) for an OpenAI reasoning effort; None leaves both as the CLI chooses."""
    if effort is None:
        return None, True
    if effort == "none":
        return None, False
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise invalid("`%s` must be one of none, %s." % (param, ", ".join(EFFORTS)), param)
    return EFFORTS[effort], True


def parse_max_tokens(body: Dict[str, Any], names: Tuple[str, ...]) -> Optional[int]:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid("`%s` must be a positive integer." % name, name, "invalid_type")
        return value
    return None


def json_schema_of(schema: Any, param: str) -> Dict[str, Any]:
    """A response schema as the CLI takes it: a JSON Schema whose root is an object."""
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise invalid("`%s` must be a JSON Schema whose root is an object." % param, param, "invalid_value")
    return schema


# What one request may make the proxy download with --fetch-images. The total bounds its memory
# (10 URLs of a 19 MB image took 905 MB): 24 MiB is 32 MiB in base64, the most the Messages API
# takes in one request anyway. The count bounds its time, each fetch taking up to 15 s.
IMAGE_FETCH_MAX_COUNT = 20
IMAGE_FETCH_TOTAL_LIMIT = 24 * MIB
IMAGE_FETCH_LIMIT = 20 * MIB  # one image
IMAGE_FETCH_TIMEOUT = 15.0


ImageLoader = Callable[[str, str], Dict[str, Any]]  # (URL, param) -> image block


def fetch_within_budget(fetch: Callable[[str, int], Tuple[str, bytes]], url: str, param: str,
                        fetched: List[int]) -> Tuple[str, bytes]:
    """One remote image, refused when it would pass the request's count or total bytes;
    `fetched` counts [images, bytes] so far. The download itself stops at what is left."""
    if fetched[0] >= IMAGE_FETCH_MAX_COUNT:
        raise invalid("%s: a request may hold at most %d remote images (--fetch-images); send the "
                      "others inline as data: URLs." % (param, IMAGE_FETCH_MAX_COUNT),
                      param + ".image_url", "too_many_images")
    left = IMAGE_FETCH_TOTAL_LIMIT - fetched[1]
    try:
        media_type, raw = fetch(url, min(IMAGE_FETCH_LIMIT, left))
    except ProxyError as error:
        if error.code == "image_too_large" and left < IMAGE_FETCH_LIMIT:
            raise invalid("%s: the remote images of one request may hold %d bytes in all; this one "
                          "goes past that." % (param, IMAGE_FETCH_TOTAL_LIMIT),
                          param + ".image_url", "images_too_large")
        raise
    fetched[0] += 1
    fetched[1] += len(raw)
    return media_type, raw


def image_loader(config: Config, fetch: Optional[Callable[[str, int], Tuple[str, bytes]]]) -> ImageLoader:
    """Turns one request's image URLs into image blocks, in order; keeps the count and bytes fetched.
    A remote URL is fetched with `fetch` (the runtime's fetch_image) when --fetch-images is on and
    there is a fetch; else refused."""
    fetched = [0, 0]  # images, bytes

    def load(url: str, param: str) -> Dict[str, Any]:
        url = url.strip()
        if url.startswith("data:"):
            media_type, data = decode_data_url(url, param)
        elif url.lower().startswith(("http://", "https://")):
            if not config.fetch_images or fetch is None:
                raise invalid("%s is a remote image URL, and fetching images is off. Send the image "
                              "inline as a data: URL (base64), or start the proxy with "
                              "--fetch-images." % param, param + ".image_url", "image_url_not_allowed")
            media_type, raw = fetch_within_budget(fetch, url, param, fetched)
            data = base64.b64encode(raw).decode("ascii")
        else:
            raise invalid("%s.image_url.url must be a data: URL or an http(s) URL." % param,
                          param + ".image_url")
        if media_type not in IMAGE_TYPES:
            raise invalid("%s is %s; Claude reads %s." % (param, media_type or "of unknown type",
                                                         ", ".join(IMAGE_TYPES)),
                          param + ".image_url", "unsupported_image_type")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return load


class Launch(NamedTuple):
    """Everything a `claude` process starts with. A pre-started process serves only a
    turn with an equal Launch: the rest of a turn goes to it on stdin."""

    argv: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...]
    resume: Optional[Tuple[str, str]] = None  # the (session id, transcript) it resumes


# The client's tools are served by an in-process MCP server of this name; Claude may
# call them (--allowedTools), and each call waits on the proxy, which answers it with
# the result the client sends in its next request (see ToolBridge).
MCP_SERVER = "proxy"
# Each round of tool calls is a turn of the CLI's; an agent's loop must never run out.
MAX_TURNS = 100000


STRIPPED_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
PROXY_KEY_ENV = "CLAUDE_PROXY_API_KEY"


def cli_env(config: Config, turn: Optional[Turn] = None,
            base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The child's environment: ours, minus API keys that would bill per token and the
    proxy's own key, which is no business of the CLI's (nor of what it runs)."""
    env = dict(os.environ if base is None else base)
    if not config.allow_api_key:
        for name in STRIPPED_ENV:
            env.pop(name, None)
    env.pop(PROXY_KEY_ENV, None)
    env.pop("CLAUDECODE", None)  # set when we run inside Claude Code; the child is not nested
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    env["CLAUDE_AGENT_SDK_MCP_NO_PREFIX"] = "1"  # the client's tools go upstream under their own names
    # A client's tool named Agent (Claude Code's own, when it is the client) would have the CLI list
    # its built-in agent types to Claude, beside the client's own list.
    env["CLAUDE_AGENT_SDK_DISABLE_BUILTIN_AGENTS"] = "1"
    # Past the context window the CLI would summarize the client's conversation and go on
    # with that: the client must hear that its prompt is too long instead.
    env["DISABLE_AUTO_COMPACT"] = "1"
    if turn is not None and not turn.thinking:
        env["MAX_THINKING_TOKENS"] = "0"
    return env


def session_transcript(messages: List[Dict[str, Any]]) -> str:
    """Messages as the session file `claude --resume` reads: one JSON line each, chained by uuid.

    Only what the CLI needs (type, uuid, parentUuid, timestamp, message; a message id
    for assistants, without which it merges or drops them, and the model of one that
    names it, without which it drops signed thinking). Consecutive user messages are
    one line already (MessageList), as the CLI would otherwise alter their text.
    A system message is an attachment line per text block: the message of an asynchronous
    hook, which the CLI sends on as it is, as a system message after the user's (with the
    mid-conversation-system beta; without it, in <system-reminder> tags in the user's).
    """
    lines, parent = [], None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    entries: List[Dict[str, Any]] = []
    for index, message in enumerate(messages):
        if message["role"] == "system":
            entries += [{"type": "attachment", "attachment": {
                "type": "async_hook_response", "response": {"systemMessage": block["text"]}}}
                for block in message["content"]]
            continue
        body: Dict[str, Any] = {"role": message["role"], "content": message["content"]}
        if message["role"] == "assistant":
            body = dict({"id": "msg_%024d" % index}, **body)
            if "model" in message:
                body["model"] = message["model"]
        entries.append({"type": message["role"], "message": body})
    for index, entry in enumerate(entries):
        entry_id = str(uuid.UUID(int=index + 1))
        lines.append(json.dumps(dict({"parentUuid": parent, "uuid": entry_id, "timestamp": stamp}, **entry),
                                ensure_ascii=False))
        parent = entry_id
    return "\n".join(lines) + "\n"


def not_a_command(content: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The blocks of the user turn the CLI answers, such that it sends them to Claude.

    Claude Code runs a turn whose last block is a text starting with "/" as one of its own
    commands (/compact, a skill; any other name such as /2024 answers "Unknown command")
    instead of sending it to Claude: a turn on stdin, and one it takes up from a transcript at
    start alike. It looks at the last block only, and drops empty text blocks before it asks
    Anthropic: an empty text after such a prompt keeps it the user's text, and Anthropic
    still gets exactly the client's blocks."""
    if content and content[-1]["type"] == "text" and content[-1]["text"].startswith("/"):
        return content + [text_block("")]
    return content


# A resumed interrupted turn ends with a prompt of the CLI's (CLAUDE_CODE_RESUME_PROMPT), which
# it joins to a text that ends the turn with a newline between: in that request, and not in the
# next one when the tool loop goes on, which then no longer extends it (the prompt cache misses).
# So a text after the turn's tool results goes as that prompt, and Claude gets it as the client
# sent it, then and later. An environment string holds no NUL and is bounded (128 KiB on Linux):
# a longer text stays in the transcript. So does a text starting with "/": as that prompt, the
# CLI would run it as one of its commands (see not_a_command, which keeps it the user's there).
RESUME_PROMPT_LIMIT = 64 * 1024


def interrupted_turn(history: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], str]:
    """(the history to resume, the prompt that ends it) for a turn resumed with its tool results:
    a text right after the results is the prompt when it can be one; else the prompt is blank."""
    content = history[-1]["content"]
    last = content[-1]
    if len(content) >= 2 and content[-2]["type"] == "tool_result" and last["type"] == "text" \
            and "\x00" not in last["text"] and len(last["text"].encode("utf-8")) <= RESUME_PROMPT_LIMIT \
            and not last["text"].startswith("/"):
        return history[:-1] + [dict(history[-1], content=content[:-1])], last["text"]
    return history, " "  # blank: nothing is added to the client's turn


def cli_launch(claude: str, turn: Turn, config: Config, history: List[Dict[str, Any]],
               interrupted: bool = False) -> Launch:
    """The process for a turn; `history` is resumed from a transcript.

    Its newest user message comes on stdin, unless `interrupted`: then `history` ends
    with that message (which holds tool results, or follows nothing but system messages),
    or with system messages after it, and the CLI takes the turn up at start as an
    interrupted one (see interrupted_turn). No stdin message can hold results for calls of
    a resumed history (the CLI would drop the calls), while this sends exactly what a
    process that waited on the calls would (see ToolBridge).
    """
    argv = [
        claude, "-p",
        "--input-format", "stream-json",
        "--output-format", "stream-json", "--verbose", "--include-partial-messages",
        "--model", turn.cli_model,
        # The prompt itself comes on stdin (initialize): argv is visible to every user in
        # `ps`, and one argument may hold only 128 KiB on Linux.
        "--system-prompt", "",
        # Claude Code's own tools (Bash, Read, Edit, web) must never run for a proxied prompt;
        # the client's tools are the only ones Claude sees.
        "--tools", "",
        "--allowedTools", "mcp__" + MCP_SERVER,
        "--max-turns", str(MAX_TURNS),
        "--no-session-persistence",
        # Keep the user's hooks, settings and MCP servers out of proxied requests;
        # the login itself lives outside settings and still applies.
        "--setting-sources", "",
        "--strict-mcp-config",
        # No skills of the CLI's: a client's tool named Skill would have it list them to Claude.
        "--disable-slash-commands",
    ]
    resume = None
    env = cli_env(config, turn)
    if interrupted:
        # The turn is its newest user message; system entries after it stay after it.
        last = max(index for index, message in enumerate(history) if message["role"] == "user")
        head, env["CLAUDE_CODE_RESUME_PROMPT"] = interrupted_turn(history[:last + 1])
        history = head[:-1] + [dict(head[-1], content=not_a_command(head[-1]["content"]))] + history[last + 1:]
    if history:
        transcript = session_transcript(history)
        # Named after what it holds, so equal histories start equal Launches (the pool's key).
        session_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "claude-max-proxy:" + json.dumps(history, sort_keys=True)))
        argv += ["--resume", session_id]
        resume = (session_id, transcript)
    if interrupted:
        # The turn starts before stdin could register the tools, so they are named here.
        argv += ["--mcp-config", json.dumps({"mcpServers": {MCP_SERVER: {"type": "sdk", "name": MCP_SERVER}}})]
        env["CLAUDE_CODE_RESUME_INTERRUPTED_TURN"] = "1"
    return Launch(tuple(argv), tuple(sorted(env.items())), resume)


def stdin_line(message: Dict[str, Any]) -> bytes:
    return (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")


def user_line(content: List[Dict[str, Any]]) -> bytes:
    """A user turn on stdin; content as a list of blocks, as a resumed history holds it too."""
    return stdin_line({"type": "user", "message": {"role": "user", "content": not_a_command(content)},
                       "parent_tool_use_id": None})


def control_line(request_id: str, request: Dict[str, Any]) -> bytes:
    return stdin_line({"type": "control_request", "request_id": request_id, "request": request})


def opening_lines(turn: Turn, tools_on_stdin: bool = True) -> bytes:
    """What a new process is told before its first turn, through the Agent SDK's control
    protocol: the system prompt and answer schema (initialize), the output cap and effort
    (apply_flag_settings), and the client's tools (mcp_set_servers). So nothing of a turn
    is in argv, and one pre-started process serves any of them."""
    initialize: Dict[str, Any] = {"subtype": "initialize", "hooks": None, "systemPrompt": turn.system_prompt}
    if turn.json_schema is not None:
        initialize["jsonSchema"] = turn.json_schema
    lines = [control_line("initialize", initialize)]
    settings: Dict[str, Any] = {}
    if turn.max_tokens is not None:
        settings["env"] = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(turn.max_tokens)}
    if turn.effort is not None:
        settings["effortLevel"] = turn.effort
    if settings:
        lines.append(control_line("settings", {"subtype": "apply_flag_settings", "settings": settings}))
    if turn.conversation.tools and tools_on_stdin:
        lines.append(control_line("tools", {"subtype": "mcp_set_servers",
                                            "servers": {MCP_SERVER: {"type": "sdk", "name": MCP_SERVER}}}))
    return b"".join(lines)


MCP_PROTOCOL_VERSION = "2025-11-25"
TOOL_USE_ID_META = "claudecode/toolUseId"  # how a tools/call names the tool_use it runs


def mcp_tool_result(result: Dict[str, Any]) -> Dict[str, Any]:
    """A client's tool_result block as the MCP result the CLI turns back into that block."""
    content = []
    for block in result["content"]:
        if block["type"] == "image":
            content.append({"type": "image", "data": block["source"]["data"],
                            "mimeType": block["source"]["media_type"]})
        else:
            content.append({"type": "text", "text": block["text"]})
    return {"result": dict({"content": content}, **({"isError": True} if result.get("is_error") else {}))}


class ToolBridge:
    """The client's tools, served to a running CLI as an in-process MCP server.

    The CLI asks for them through `control_request` lines of subtype mcp_message
    (initialize, tools/list) and sends them upstream as they are. When Claude calls
    one, the CLI sends tools/call and waits: answer() holds it until the client's next
    request brings the result (give_results), so the same process goes on with the
    same conversation. Control requests of any other kind are refused: nothing is
    run here, and no permission is granted.
    """

    def __init__(self, tools: List[Dict[str, Any]]) -> None:
        # The CLI drops every tool of a server when one schema lacks "type": "object".
        self.listing = [{"name": t["name"], "description": t["description"],
                         "inputSchema": dict(t["input_schema"], type="object")} for t in tools]
        self.waiting: List[Dict[str, Any]] = []      # tools/call requests not answered yet
        self.results: Dict[str, Dict[str, Any]] = {}  # tool_use id -> the client's tool_result

    def answer(self, event: Dict[str, Any]) -> Optional[bytes]:
        """The stdin line answering a control request of the CLI's, or None (not one, or held)."""
        request = event.get("request")
        if event.get("type") != "control_request" or not isinstance(request, dict):
            return None
        message = request.get("message")
        if request.get("subtype") != "mcp_message" or not isinstance(message, dict):
            return self._response(event, {"subtype": "error", "error": "not supported by claude-max-proxy"})
        if message.get("method") == "tools/call":
            self.waiting.append(event)
            return self.give_results({})
        return self._mcp_response(event, self._mcp_result(message))

    def give_results(self, results: Dict[str, Dict[str, Any]]) -> bytes:
        """Lines answering the waiting tool calls whose results are known now."""
        self.results.update(results)
        lines = []
        for event in list(self.waiting):
            params = event["request"]["message"].get("params")
            meta = params.get("_meta") if isinstance(params, dict) else None
            call_id = meta.get(TOOL_USE_ID_META) if isinstance(meta, dict) else None
            if call_id in self.results:
                self.waiting.remove(event)
                lines.append(self._mcp_response(event, mcp_tool_result(self.results.pop(call_id))))
        return b"".join(lines)

    def _mcp_result(self, message: Dict[str, Any]) -> Dict[str, Any]:
        method = message.get("method")
        if method == "initialize":
            return {"result": {"protocolVersion": MCP_PROTOCOL_VERSION, "capabilities": {"tools": {}},
                               "serverInfo": {"name": "claude-max-proxy", "version": __version__}}}
        if method == "tools/list":
            return {"result": {"tools": self.listing}}
        if "id" in message and not str(method).startswith("notifications/"):
            return {"error": {"code": -32601, "message": "Method not found: %s" % method}}
        return {"result": {}}

    def _mcp_response(self, event: Dict[str, Any], outcome: Dict[str, Any]) -> bytes:
        message = event["request"]["message"]
        reply = dict({"jsonrpc": "2.0"}, **({"id": message["id"]} if "id" in message else {}), **outcome)
        return self._response(event, {"subtype": "success", "response": {"mcp_response": reply}})

    @staticmethod
    def _response(event: Dict[str, Any], response: Dict[str, Any]) -> bytes:
        return stdin_line({"type": "control_response",
                           "response": dict(response, request_id=event.get("request_id"))})


# ---------------------------------------------------------------------------
# Subscription usage as the CLI reports it: plan windows, extra usage, Anthropic's refusals
# ---------------------------------------------------------------------------

# A subscription is metered in windows (five_hour, seven_day, seven_day_opus, ...); past a
# window's limit Anthropic either refuses, or bills "extra usage" when the account has it on.
# A subscriber's CLI reads Anthropic's anthropic-ratelimit-unified-* response headers and prints
# what they say as a `rate_limit_event` line. The proxy keeps the latest report on each window.
WINDOW_NAMES = {"five_hour": "5-hour session limit", "seven_day": "weekly limit",
                "seven_day_opus": "weekly Opus limit", "seven_day_sonnet": "weekly Sonnet limit",
                "overage": "extra usage limit"}
EXTRA_USAGE_SERVES = ("allowed", "allowed_warning")  # overageStatus values under which extra usage pays
STATUS_RANK = {"allowed": 0, "allowed_warning": 1, "rejected": 2}
LATEST_EPOCH = 2 ** 33  # the year 2242: a larger reset time is garbage, not a date
RATELIMIT_HEADER = "x-claude-ratelimit-"


class LimitWindow(NamedTuple):
    """The latest report on one usage window."""

    name: str                       # rateLimitType: five_hour, seven_day, ...
    status: str                     # allowed, allowed_warning or rejected
    resets_at: Optional[float]      # epoch seconds
    utilization: Optional[float]    # 0..1; Anthropic sends it only near a limit
    extra_usage: Optional[str]      # overageStatus: allowed, allowed_warning or rejected
    extra_usage_in_use: bool        # answers are billed as extra usage now

    def current(self, now: float) -> bool:
        """Past its reset time a report says nothing about the window any more."""
        return self.resets_at is None or now < self.resets_at

    def used_up(self) -> bool:
        """Rejected until a known reset time: nothing else would ever lift a refusal."""
        return self.status == "rejected" and self.resets_at is not None

    def refuses(self) -> bool:
        return self.used_up() and self.extra_usage not in EXTRA_USAGE_SERVES

    def bills_extra(self) -> bool:
        return self.extra_usage_in_use or (self.status == "rejected"
                                           and self.extra_usage in EXTRA_USAGE_SERVES)

    def title(self) -> str:
        return "%s (%s)" % (WINDOW_NAMES.get(self.name, self.name.replace("_", " ") + " limit"), self.name)


def report_token(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) else None


def report_number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def rate_limit_info(event: Dict[str, Any]) -> Optional[LimitWindow]:
    """The window a `rate_limit_event` reports on; None for any other event, or a malformed one.

    Values go into response headers, so every string must be a plain token."""
    info = event.get("rate_limit_info") if event.get("type") == "rate_limit_event" else None
    if not isinstance(info, dict) or report_token(info.get("status")) is None:
        return None
    resets_at = report_number(info.get("resetsAt"))
    return LimitWindow(
        name=report_token(info.get("rateLimitType")) or "plan",
        status=info["status"],
        resets_at=resets_at if resets_at is not None and 0 < resets_at < LATEST_EPOCH else None,
        utilization=report_number(info.get("utilization")),
        extra_usage=report_token(info.get("overageStatus")),
        extra_usage_in_use=info.get("isUsingOverage") is True or info.get("overageInUse") is True)


def utc_iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def limit_reached(window: LimitWindow, now: float, said: str = "") -> ProxyError:
    """The 429 for a used-up window: Retry-After counts down to its reset."""
    assert window.resets_at is not None
    return ProxyError(
        429, "Your Claude %s is used up until %s (UTC), and no extra usage is available to go on with. "
        "Requests succeed again after that time.%s" % (window.title(), utc_iso(window.resets_at),
                                                      " Claude Code said: " + said if said else ""),
        code="usage_limit_reached", headers={"Retry-After": str(max(1, math.ceil(window.resets_at - now)))})


# Anthropic's 400s about extra usage that users of subscription proxies report, told apart by
# a stable part of their text: (text, status, code, what it means and what to do). The
# statuses are ones SDKs do not retry: waiting a few seconds changes none of these.
EXTRA_USAGE_REFUSALS: List[Tuple[str, int, str, str]] = [
    ("draw from your extra usage", 403, "third_party_needs_extra_usage",
     "Anthropic bills this request, as one from a third-party app, to your extra usage instead of "
     "your plan limits, and the account has no extra usage to bill. Turn extra usage on in your "
     "Claude account's usage settings to have such requests served."),
    ("out of extra usage", 402, "extra_usage_exhausted",
     "Your extra usage, billed beyond your plan, is spent. Add more in your Claude account's usage "
     "settings, or wait for your plan limits to reset."),
    ("extra usage is required for long context", 400, "long_context_needs_extra_usage",
     "Anthropic serves requests with a long context only as extra usage, which this account does not "
     "have. Shorten or compact the conversation, or turn extra usage on in your Claude account's "
     "usage settings."),
]


def extra_usage_refusal(message: str) -> Optional[ProxyError]:
    """The error for one of Anthropic's extra-usage refusals, with Anthropic's own words kept."""
    lowered = message.lower()
    for text, status, code, meaning in EXTRA_USAGE_REFUSALS:
        if text in lowered:
            return ProxyError(status, "%s (Anthropic said: %s)" % (meaning, message), code=code)
    return None


# ---------------------------------------------------------------------------
# The CLI session: CLI events in, typed session events out
# ---------------------------------------------------------------------------

# A session says what happens in order, as these typed events. A reply is a sequence of
# content blocks, each opened (BlockStart), given in pieces (BlockDelta) and closed with the
# whole block (BlockStop), in index order, one open at a time; End closes the turn with its
# Outcome. Send carries bytes for the CLI's stdin (the answers to its control requests) and
# Limits a report on a usage window: those are for the runtime, the rest for the door.


class BlockStart(NamedTuple):
    """A content block opens: {"type": "text"}, {"type": "thinking"}, or {"type": "tool_use",
    "id", "name"}, a call of one of the client's tools."""
    index: int
    block: Dict[str, Any]


class BlockDelta(NamedTuple):
    """A piece of the open block: its text, its thinking, or a piece of its call's JSON arguments."""
    index: int
    kind: str  # the block's type
    piece: str


class BlockStop(NamedTuple):
    """The block is whole: the native block, thinking with its signature, a call with its input."""
    index: int
    block: Dict[str, Any]


class Outcome(NamedTuple):
    """How a reply ended: the one value a door's last frames and whole answers are made of."""
    stop_reason: str                # Anthropic's, or stop_sequence; end_turn when it gave none,
                                    # and after the CLI's own StructuredOutput call
    stop_sequence: Optional[str]    # the stop sequence that cut the text
    usage: Dict[str, int]           # Anthropic's usage fields, totals of the turn
    blocks: List[Dict[str, Any]]    # the reply as the client got it, as native content blocks
    model: Optional[str]            # the model that answered, as Anthropic named it

    @property
    def calls(self) -> List[Dict[str, Any]]:
        """The calls of the client's tools, as tool_use blocks."""
        return [block for block in self.blocks if block["type"] == "tool_use"]


class End(NamedTuple):
    outcome: Outcome


class Send(NamedTuple):
    """Lines for the CLI's stdin."""
    data: bytes


class Limits(NamedTuple):
    """The CLI's report on one usage window (a rate_limit_event)."""
    window: LimitWindow


SessionEvent = Union[BlockStart, BlockDelta, BlockStop, End, Send, Limits]

STRUCTURED_OUTPUT_TOOL = "StructuredOutput"  # how the CLI asks Claude for a schema's answer
# How a run ends when Claude gave no answer matching the schema: out of retries, or of turns.
STRUCTURED_FAILURES = ("error_max_structured_output_retries", "error_max_turns")
AUTH_ERRORS = ("authentication_failed", "oauth_org_not_allowed")
RATE_LIMIT_STATUS = 429
OVERLOADED_STATUS = 529
PROMPT_TOO_LONG = re.compile(r"prompt is too long|context.{0,20}(window|length).{0,20}exceed", re.I)

# How Claude Code words a model Anthropic does not know (its error kind is model_not_found):
# "There's an issue with the selected model (X). It may not exist or you may not have access
# to it. Run --model to pick a different model." The last sentence is about the CLI's flag.
SELECTED_MODEL = re.compile(r"issue with the selected model \((.{1,200}?)\)")


def model_refused(message: str) -> ProxyError:
    """A 404 model_not_found in the API's words, naming the model, for the CLI's message."""
    named = SELECTED_MODEL.search(message)
    return ProxyError(
        404, "The model `%s` does not exist, or your Claude plan has no access to it. Use one of: "
        "%s (GET /v1/models lists them), or another full claude-* model id your plan offers."
        % (named.group(1) if named else "asked for", ", ".join(model_id for model_id, _ in MODELS)),
        code="model_not_found", param="model")


def upstream_error(status: Optional[int], message: str, kind: Optional[str] = None,
                   retry_after: Optional[float] = None) -> ProxyError:
    """The error for a failure the CLI reported from the Anthropic API."""
    if status == 403:
        # Claude Code calls a 403 a failed login too, but the login was good: Anthropic refused
        # this request (a model or feature the account or its organization may not use).
        return ProxyError(403, "Anthropic refused the request: 403 permission_error (Claude Code said: %s)"
                          % message, code="permission_error")
    if kind in AUTH_ERRORS or status == 401:
        return ProxyError(401, LOGIN_HELP + " (Claude Code said: %s)" % message,
                          code="authentication_failed")
    if kind == "model_not_found" or SELECTED_MODEL.search(message):
        return model_refused(message)
    refusal = extra_usage_refusal(message)
    if refusal is not None:
        return refusal
    if PROMPT_TOO_LONG.search(message):
        return ProxyError(400, "The conversation is longer than the model's context window: %s"
                          % message, code="context_length_exceeded", param="messages")
    headers = {"Retry-After": str(max(1, int(round(retry_after))))} if retry_after else {}
    if status == RATE_LIMIT_STATUS or (status is None and kind == "rate_limit"):
        return ProxyError(429, "Claude usage limit or rate limit reached: %s" % message,
                          code="rate_limit_exceeded", headers=headers or {"Retry-After": "30"})
    if status == OVERLOADED_STATUS or (status is None and kind == "overloaded"):
        return ProxyError(503, "Claude is overloaded: %s" % message, code="overloaded",
                          headers=headers or {"Retry-After": "30"})
    if status is not None and 400 <= status < 600:
        return ProxyError(status, message, code="upstream_error")
    return ProxyError(502, message, code="upstream_error")


def count(value: Any) -> int:
    """A count from the CLI's output; 0 when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return 0
    return max(0, int(value)) if abs(value) < 1e15 else 0


def status_code(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# A content block delta's type -> (the field holding its piece, the kind of piece it is).
CLI_DELTAS = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
              "signature_delta": ("signature", "signature"),
              "input_json_delta": ("partial_json", "tool_arguments")}
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def conversation_key(turn: Turn, messages: List[Dict[str, Any]]) -> str:
    """What a kept process holds: its settings and the conversation so far. A turn whose
    history has this key continues that very process."""
    state = [turn.cli_model, turn.effort, turn.thinking, turn.max_tokens, turn.json_schema,
             turn.system_prompt, turn.conversation.tools, messages]
    return "conversation:" + hashlib.sha256(
        json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def tool_results(message: Dict[str, Any]) -> Optional[Dict[str, Dict[str, Any]]]:
    """The tool results a user message brings, by call id, when it holds nothing else."""
    content = message["content"]
    if not all(block["type"] == "tool_result" for block in content):
        return None
    return {block["tool_use_id"]: block for block in content}


def split_newest(messages: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """(the history before it, the newest user message) of a conversation.

    System messages after the newest user message stay in the history, at its end: the
    CLI holds a system message back to the end of the user messages that follow it, so
    it sends them after the newest one, where the client put them."""
    last = max(index for index, message in enumerate(messages) if message["role"] == "user")
    return messages[:last] + messages[last + 1:], messages[last]


def held_back(text: str, markers: List[str]) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def parse_event_line(line: bytes) -> Optional[Dict[str, Any]]:
    """A CLI output line as a JSON object; anything else (banners, blank lines, and JSON nested
    deeper than Python's parser goes) is None."""
    line = line.strip()
    if not line.startswith(b"{"):
        return None
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


# A session's states. NEW: started, no turn yet. ANSWERING: a turn is under way. A turn ends in
# one of three. WAITING: Claude called the client's tools and the CLI waits for their results,
# which the client's next request brings. IDLE: Claude answered, and the CLI waits for the next
# user message. CUT: the proxy ended the turn short (a stop sequence, the output cap, a call beyond
# the one allowed, a call of the client's that the CLI answered itself): the CLI's conversation is
# no longer the client's, and its process must end. Only a WAITING or IDLE session goes on.
NEW, ANSWERING, WAITING, IDLE, CUT = "new", "answering", "waiting", "idle", "cut"


class Session:
    """One `claude` process's conversation, as a state machine in the manner of h11: pure, no
    I/O, no clock but the `now` it is given.

    begin() starts a turn and gives the bytes for the CLI's stdin; receive() takes each JSON
    object the CLI prints and gives the typed events it makes, the last of them End; it raises
    ProxyError when the CLI reports a failure. What the CLI prints is not ours to trust: an
    event of an unknown kind or shape is passed over.

    The reply the client gets is Claude's, less what is not the client's: a call of a tool the
    client did not offer (the CLI answers it, and Claude goes on), the CLI's own StructuredOutput
    call (with a schema, its input is the answer, streamed as text, and free text is dropped;
    held until the CLI has checked it when the answer goes out whole, so a refused attempt is
    dropped), text from the first stop sequence on (even one split across deltas), and calls
    after the first when parallel calls are off. The turn ends with the CLI's `result`; or when
    Claude has called the client's tools (the CLI waits for their results), or stopped at
    max_tokens with an output cap (the CLI would go on by itself), or hit a stop sequence.
    """

    def __init__(self, tools: List[Dict[str, Any]]) -> None:
        self.bridge = ToolBridge(tools)
        self.state = NEW
        self.open_calls: List[str] = []  # what a WAITING session waits on the results of

    def continues(self, newest: Dict[str, Any]) -> bool:
        """Whether this session, after its last turn, takes `newest` as the next: results for
        exactly the calls it waits on, or a user message after an answer."""
        results = tool_results(newest)
        if self.state == WAITING:
            return results is not None and set(results) == set(self.open_calls)
        return self.state == IDLE and results is None

    def begin(self, turn: Turn, newest: Dict[str, Any], retry_budget: float, whole: bool = False,
              interrupted: bool = False) -> bytes:
        """Start a turn whose newest message is `newest`; the bytes to write to the CLI's stdin.
        A new session is told the turn's settings first; an `interrupted` one has its turn in
        the transcript it resumes (see cli_launch). `whole`: the answer goes out in one piece."""
        if self.state == NEW:
            data = opening_lines(turn, tools_on_stdin=not interrupted) + \
                (b"" if interrupted else user_line(newest["content"]))
        elif self.state == WAITING:
            data = self.bridge.give_results(tool_results(newest) or {})
        else:
            data = user_line(newest["content"])
        self.state = ANSWERING
        self.open_calls = []
        self.retry_budget = retry_budget
        self.cap_stops = turn.max_tokens is not None
        self.structured = turn.json_schema is not None
        self.hold_structured = self.structured and whole
        self.tool_names = [tool["name"] for tool in turn.conversation.tools]
        self.stops = turn.stops
        self.single_call = not turn.parallel_tool_calls
        # Read from the CLI:
        self.stop_reason: Optional[str] = None
        self.model: Optional[str] = None
        self.usage: Dict[str, int] = {}
        self.calls: List[str] = []          # ids of the client's tools Claude called
        self.completed = False              # the CLI printed its result: the turn ended by itself
        self.answered_by_cli = False        # the CLI answered a call of the client's itself
        self.error_kind: Optional[str] = None
        self.retry_since: Optional[float] = None
        self.retry_error: Optional[ProxyError] = None
        self._source: Optional[str] = None  # the type of the CLI's content block streaming now
        self._arguments = False             # the streaming call's arguments have begun
        self._structured_ids: List[str] = []
        self._attempt: List[str] = []       # a structured answer the CLI has not checked yet
        self._done = False
        # Given to the client:
        self.emitted = False                # some answer went out, so the result's text repeats it
        self.calls_out = 0                  # calls that got past the stop sequences and the one-call rule
        self.stop_hit: Optional[str] = None
        self._unsure = ""                   # text that may be the start of a stop sequence
        self._blocks: List[Dict[str, Any]] = []
        self._open: Optional[Dict[str, Any]] = None
        self._parts: List[str] = []
        self._signature: List[str] = []
        return data

    def retry_deadline(self) -> Optional[Tuple[float, ProxyError]]:
        """When the CLI has retried the API too long, and the error to give then."""
        if self.retry_since is None or self.retry_error is None:
            return None
        return self.retry_since + self.retry_budget, self.retry_error

    def receive(self, event: Any, now: float) -> List[SessionEvent]:
        """The events one JSON object the CLI printed makes; none once the turn has ended."""
        if self.state != ANSWERING or not isinstance(event, dict):
            return []
        answer = self.bridge.answer(event)
        if answer is not None:
            return [Send(answer)] if answer else []
        window = rate_limit_info(event)
        if window is not None:
            return [Limits(window)]
        return self._give(self._read(event, now))

    # -- what the CLI says: pieces of the reply ------------------------------------
    # A piece is (kind, value): ("text" | "thinking" | "signature" | "tool_arguments", str)
    # or ("tool_call", {"id", "name"}).

    def _read(self, event: Dict[str, Any], now: float) -> List[Tuple[str, Any]]:
        kind = event.get("type")
        if kind == "stream_event" and isinstance(event.get("event"), dict):
            return self._stream_event(event["event"])
        if kind == "assistant" and isinstance(event.get("error"), str):
            # The CLI's synthetic failure notice ("Not logged in", "API Error: ..."):
            # remember it for the result. Real answers came as deltas already.
            self.error_kind = event["error"]
        elif kind == "user":
            return self._user(event)
        elif kind == "system" and event.get("subtype") == "api_retry":
            self._retry(event, now)
        elif kind == "result":
            return self._result(event)
        return []

    def _stream_event(self, event: Dict[str, Any]) -> List[Tuple[str, Any]]:
        kind = event.get("type")
        if kind == "content_block_start":
            return self._block_start(event.get("content_block"))
        if kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            return self._block_delta(event["delta"])
        if kind == "content_block_stop":
            source, self._source = self._source, None
            if source == "tool_use" and not self._arguments:
                return [("tool_arguments", "{}")]  # a call without arguments streams none
        elif kind == "message_start":
            # Claude is answering, so any retrying before this has succeeded.
            self.retry_since = self.retry_error = None
            message = event.get("message")
            self._add_usage(message.get("usage") if isinstance(message, dict) else None)
            model = message.get("model") if isinstance(message, dict) else None
            self.model = model if isinstance(model, str) else self.model
        elif kind == "message_delta":
            self._add_usage(event.get("usage"))
            delta = event.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            if isinstance(stop, str):
                self.stop_reason = stop
            if stop == "tool_use" and self.calls or stop == "max_tokens" and self.cap_stops:
                self._done = True
        return []

    def _block_start(self, block: Any) -> List[Tuple[str, Any]]:
        kind = block.get("type") if isinstance(block, dict) else None
        self._source = kind if isinstance(kind, str) else None
        if kind != "tool_use":
            return []
        name, call_id = block.get("name"), block.get("id")
        if not isinstance(name, str) or not isinstance(call_id, str):
            self._source = None
            return []
        if name == STRUCTURED_OUTPUT_TOOL and self.structured:
            self._source = "structured"
            self._structured_ids.append(call_id)
            return []
        if name not in self.tool_names:
            self._source = None  # not the client's: the CLI answers it itself
            return []
        self.calls.append(call_id)
        self.emitted = True
        self._arguments = False
        return [("tool_call", {"id": call_id, "name": name})]

    def _block_delta(self, delta: Dict[str, Any]) -> List[Tuple[str, Any]]:
        kind = delta.get("type")
        # Only a string names a delta kind (a list would not even hash).
        field, out = CLI_DELTAS.get(kind, (None, None)) if isinstance(kind, str) else (None, None)
        value = delta.get(field) if field else None
        if not isinstance(value, str) or not value:
            return []
        if kind == "input_json_delta":
            if self._source == "structured" and self.hold_structured:
                self._attempt.append(value)
                return []
            if self._source == "structured":
                out = "text"  # the structured answer streams as the reply's text
            elif self._source != "tool_use":
                return []
            self._arguments = True
        elif kind == "text_delta" and self.structured:
            return []  # only the structured answer counts
        if out == "text" or out == "tool_arguments":
            self.emitted = True
        return [(out, value)]

    def _add_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage.update((name, count(usage[name])) for name in USAGE_FIELDS if name in usage)

    def _user(self, event: Dict[str, Any]) -> List[Tuple[str, Any]]:
        """A tool result the CLI made itself: its verdict on its own StructuredOutput call (a
        refusal means it asks again), or its answer to a client call it would not wait on."""
        message = event.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        released: List[Tuple[str, Any]] = []
        for block in content if isinstance(content, list) else []:
            call_id = block.get("tool_use_id") if isinstance(block, dict) else None
            if call_id in self.calls:
                self.answered_by_cli = True
            if call_id not in self._structured_ids:
                continue
            self._structured_ids.remove(call_id)
            attempt, self._attempt = self._attempt, []
            if not block.get("is_error"):
                released += [("text", piece) for piece in attempt]
            elif self.emitted:
                raise ProxyError(502, "Claude's structured answer did not match the requested "
                                 "schema, and part of it was already sent.",
                                 code="invalid_structured_output")
        self.emitted = self.emitted or bool(released)
        return released

    def _retry(self, event: Dict[str, Any], now: float) -> None:
        status = status_code(event.get("error_status"))
        error = event.get("error") if isinstance(event.get("error"), str) else None
        # No status: no answer came at all (the connection closed, or could not be made).
        answer = "answered %d (%s)" % (status, error) if status is not None else \
            "gave no answer: the connection closed or failed (%s)" % error
        message = "the Anthropic API %s; Claude Code was retrying (attempt %s of %s)" % (
            answer, count(event.get("attempt")), count(event.get("max_retries")))
        failure = upstream_error(status, message, error,
                                 retry_after=count(event.get("retry_delay_ms")) / 1000.0 or None)
        if failure.status == 401 or status == 403:
            raise failure  # a bad login never heals by retrying
        if self.retry_since is None:
            self.retry_since = now
        self.retry_error = failure

    def _result(self, event: Dict[str, Any]) -> List[Tuple[str, Any]]:
        subtype = event.get("subtype")
        if self.error_kind == "max_output_tokens" and self.emitted:
            # The CLI continued past the output limit three times and gave up; what
            # was written stands, cut off, as a max_tokens stop.
            self.error_kind, self.stop_reason = None, "max_tokens"
        elif self.structured and subtype in STRUCTURED_FAILURES and not self.calls:
            raise ProxyError(502, "Claude did not produce JSON matching the requested schema, "
                             "even after being asked again.", code="invalid_structured_output")
        elif event.get("is_error") is True or self.error_kind or subtype not in (None, "success"):
            raise self._failure(event)
        self._done = self.completed = True
        if isinstance(event.get("stop_reason"), str) and self.stop_reason != "max_tokens":
            self.stop_reason = event["stop_reason"]
        self._add_usage(event.get("usage"))
        if self.structured and not self.emitted and "structured_output" in event:
            self.emitted = True
            return [("text", json.dumps(event["structured_output"], ensure_ascii=False))]
        if not self.emitted and not self.structured and isinstance(event.get("result"), str) \
                and event["result"]:
            self.emitted = True
            return [("text", event["result"])]
        return []

    def _failure(self, event: Dict[str, Any]) -> ProxyError:
        message = event.get("result") if isinstance(event.get("result"), str) else ""
        errors = event.get("errors")
        if not message and isinstance(errors, list):
            message = ", ".join(str(error) for error in errors if error)
        message = message or "Claude Code reported %s" % str(event.get("subtype"))[:100]
        if "not logged in" in message.lower():
            return ProxyError(401, LOGIN_HELP, code="not_logged_in")
        return upstream_error(status_code(event.get("api_error_status")), message, self.error_kind)

    # -- what the client gets: blocks ------------------------------------------------

    def _give(self, pieces: List[Tuple[str, Any]]) -> List[SessionEvent]:
        """The client's events for pieces of the reply, and the turn's end when it has come."""
        events: List[SessionEvent] = []
        for kind, value in pieces:
            if self.stop_hit is not None:
                break
            if kind == "text" and self.stops:
                value = self._cut_at_stop(value)
            elif kind != "text":
                events += self._add("text", self._unsure)  # held text goes before what follows it
                self._unsure = ""
            if kind == "tool_call":
                self.calls_out += 1
            if self.single_call and self.calls_out > 1 and kind in ("tool_call", "tool_arguments"):
                continue  # parallel calls are off: the first call alone goes out
            events += self._add(kind, value)
        if (self._done or self.stop_hit is not None) and self.state == ANSWERING:
            if self.stop_hit is None:
                events += self._add("text", self._unsure)
            events += self._close()
            self.state = self._ending()
            events.append(End(self._outcome()))
        return events

    def _cut_at_stop(self, text: str) -> str:
        """The text up to the first stop sequence; an end that may turn into one is held back."""
        text = self._unsure + text
        found = [(at, stop) for stop, at in ((stop, text.find(stop)) for stop in self.stops) if at >= 0]
        if found:
            at, self.stop_hit = min(found)
            self._unsure = ""
            return text[:at]
        unsure = held_back(text, self.stops)
        self._unsure = text[len(text) - unsure:]
        return text[:len(text) - unsure]

    def _add(self, kind: str, value: Any) -> List[SessionEvent]:
        if not value:
            return []
        if kind == "signature":
            self._signature.append(value)
            return []
        block_type = "tool_use" if kind in ("tool_call", "tool_arguments") else kind
        events: List[SessionEvent] = []
        # Thinking after its block's signature is the next thinking block, with a signature of its own.
        if kind == "tool_call" or self._open is None or self._open["type"] != block_type \
                or kind == "thinking" and self._signature:
            events += self._close()
            self._open = ({"type": "tool_use", "id": value["id"], "name": value["name"]} if kind == "tool_call"
                          else {"type": block_type})
            events.append(BlockStart(len(self._blocks), dict(self._open)))
        if kind != "tool_call":
            self._parts.append(value)
            events.append(BlockDelta(len(self._blocks), block_type, value))
        return events

    def _close(self) -> List[SessionEvent]:
        block, self._open = self._open, None
        if block is None:
            return []
        joined, self._parts = "".join(self._parts), []
        if block["type"] == "tool_use":
            try:
                arguments = json.loads(joined) if joined.strip() else {}
            except ValueError:
                arguments = None
            block["input"] = arguments if isinstance(arguments, dict) else {}
        else:
            block[block["type"]] = joined
        if block["type"] == "thinking":
            block["signature"], self._signature = "".join(self._signature), []
        self._blocks.append(block)
        return [BlockStop(len(self._blocks) - 1, block)]

    def _ending(self) -> str:
        """The state a turn that has ended leaves the session in."""
        whole = not self.single_call or self.calls_out <= 1
        if self.stop_hit is not None or not whole or self.answered_by_cli:
            return CUT
        if self.completed:
            return IDLE
        if self.calls and self.stop_reason == "tool_use":
            self.open_calls = list(self.calls)
            return WAITING
        return CUT

    def _outcome(self) -> Outcome:
        reason = "stop_sequence" if self.stop_hit is not None else self.stop_reason or "end_turn"
        if reason == "tool_use" and not self.calls_out:
            reason = "end_turn"  # the CLI's own StructuredOutput call: the answer is text
        return Outcome(reason, self.stop_hit, dict(self.usage), self._blocks, self.model)


class ProbeResult(NamedTuple):
    """What one probe of a `claude` found."""

    problem: Optional[str]              # why it cannot take a conversation; None when it can
    lasting: bool = False               # the binary's own problem (too old): it stays until the file changes
    logged_in: Optional[bool] = None    # as its initialize answer says; None when unknown


def logged_in(initialize: Dict[str, Any]) -> Optional[bool]:
    """Whether the CLI has a login, from its initialize answer's `account`: a logged-out CLI
    says tokenSource "none" with no apiKeySource (checked with 2.1.197 and an empty config)."""
    account = initialize.get("account")
    if not isinstance(account, dict):
        return None
    return account.get("tokenSource") not in (None, "none") or bool(account.get("apiKeySource")) or \
        account.get("apiProvider") not in (None, "firstParty")  # Bedrock, Vertex: their own credentials


class ProbeSession:
    """The probe's conversation with a `claude`, pure, in the manner of Session: begin() tells it a
    system prompt and one tool; receive() takes each JSON object it prints and gives the bytes to
    answer with (its control requests) and, once it has answered initialize and the tools and
    asked for the tool list, before any prompt (so nothing reaches Anthropic), the ProbeResult.
    A refused control request is the binary's lasting problem: it is too old for the protocol."""

    def __init__(self) -> None:
        tool = native_tool("probe", "", None, "probe")
        self.turn = Turn("probe", "haiku", Conversation("probe", [], [tool]))
        self.bridge = ToolBridge([tool])
        self.answered: List[str] = []
        self.login: Optional[bool] = None

    def begin(self) -> bytes:
        return opening_lines(self.turn)

    def receive(self, event: Any) -> Tuple[bytes, Optional[ProbeResult]]:
        if not isinstance(event, dict):
            return b"", None
        if event.get("type") == "control_response":
            response = event.get("response") if isinstance(event.get("response"), dict) else {}
            if response.get("subtype") != "success":
                return b"", ProbeResult("it refused %s: %s" % (response.get("request_id"),
                                                                str(response.get("error"))[:200]), True)
            self.answered.append(str(response.get("request_id")))
            if response.get("request_id") == "initialize" and isinstance(response.get("response"), dict):
                self.login = logged_in(response["response"])
        request = event.get("request") if isinstance(event.get("request"), dict) else {}
        message = request.get("message") if isinstance(request.get("message"), dict) else {}
        answer = self.bridge.answer(event) or b""
        if message.get("method") == "tools/list" and {"initialize", "tools"} <= set(self.answered):
            return answer, ProbeResult(None, logged_in=self.login)
        return answer, None


# ===========================================================================
# 2. THE DOORS (pure): each API's request into a turn, the session's events into its frames
# ===========================================================================

# ---------------------------------------------------------------------------
# The doors: what they share
# ---------------------------------------------------------------------------

# A door turns a request into a Turn, and the session's events and the one Outcome into its
# own wire format: frames of a stream, each an SSE event name (None for a bare data line)
# and its payload, or one whole response.
Frame = Tuple[Optional[str], Any]


def request_model(body: Dict[str, Any], config: Config) -> Tuple[str, str]:
    """(the model as the client named it, the CLI's --model for it)."""
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise invalid("`model` must be a string.", "model", "invalid_type")
    return model or config.default_model, resolve_model(model, config.default_model)


def request_fields(body: Any, config: Config, known: frozenset, ignored: frozenset) -> Tuple[str, str]:
    """(the model as the client named it, the CLI's --model for it) of a request body, checked to be
    an object; fields it neither knows nor ignores are named in the debug log."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_type")
    unknown = sorted(set(body) - known - ignored)
    if unknown:
        log.debug("ignoring request fields: %s", ", ".join(unknown))
    return request_model(body, config)


def optional_bool(body: Dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid("`%s` must be a boolean." % name, name, "invalid_type")
    return value


def string_field(block: Dict[str, Any], name: str, param: str) -> str:
    value = block.get(name)
    if not isinstance(value, str):
        raise invalid("%s.%s must be a string." % (param, name), "%s.%s" % (param, name), "invalid_type")
    return value


def named_entry(table: Dict[str, Any], name: Any) -> Any:
    """The entry a request's value names in a table keyed by names (roles, types), or None when it
    names none. Only a string can name one: a JSON object or array would not even hash, and a
    client's mistake must stay a 400."""
    return table.get(name) if isinstance(name, str) else None


def distinct_tool(tool: Dict[str, Any], offered: List[Dict[str, Any]], param: str) -> Dict[str, Any]:
    """The tool, checked to have a name none of the tools offered before it has: Anthropic refuses
    a request that offers two tools of one name."""
    if any(other["name"] == tool["name"] for other in offered):
        raise invalid("%s.name is %r, the name of an earlier tool: each tool needs a name of its own."
                      % (param, tool["name"]), param + ".name", "duplicate_tool_name")
    return tool


def content_blocks(content: Any, param: str, kinds: Tuple[str, ...],
                   block: Callable[[str, Dict[str, Any], str], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A message's content as native blocks: a string is one text block, and each part of an
    array is checked to be of a kind taken here, then made a block by `block(kind, part, param)`."""
    if isinstance(content, str):
        return [text_block(content)]
    if not isinstance(content, list):
        raise invalid("%s must be a string or an array of content parts." % param, param, "invalid_type")
    blocks = []
    for index, part in enumerate(content):
        part_param = "%s[%d]" % (param, index)
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in kinds:
            raise invalid("%s has type %r; here the parts are of type %s." % (
                part_param, kind, ", ".join(kinds)), part_param + ".type", "unsupported_content_type")
        blocks.append(block(kind, part, part_param))
    return blocks


def stop_list(value: Any, param: str, most: Optional[int] = None) -> List[str]:
    """Stop sequences: a string (where `most` allows several) or an array of strings."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) and most is not None else value
    well_typed = isinstance(stops, list) and all(isinstance(stop, str) for stop in stops)
    if not well_typed or most is not None and len(stops) > most:
        raise invalid("`%s` must be %s." % (param, "a string or an array of up to %d strings" % most
                                            if most is not None else "an array of strings"),
                      param, "invalid_value" if well_typed else "invalid_type")
    return [stop for stop in stops if stop]


def named_tool(choice: Any, names: List[str], param: str) -> str:
    name = None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
    if not isinstance(name, str):
        raise invalid("`%s` must be \"auto\", \"none\", \"required\" or name a function." % param, param)
    if name not in names:
        raise invalid("`%s` names %r, which is not among the tools offered." % (param, name), param)
    return name


def parse_tool_choice(choice: Any, names: List[str], param: str) -> Tuple[str, Optional[List[str]]]:
    """("auto" | "none" | "required" | the one tool to call, the tools allowed when restricted)."""
    if choice is None:
        return "auto", None
    if choice in ("auto", "none", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        nested = "allowed_tools" in choice  # chat nests mode and tools; the Responses API does not
        spec = choice["allowed_tools"] if nested else choice
        mode = spec.get("mode", "auto") if isinstance(spec, dict) else None
        listed = spec.get("tools") if isinstance(spec, dict) else None
        if mode not in ("auto", "required") or not isinstance(listed, list):
            raise invalid("`%s` must hold a mode (auto or required) and a tools array of allowed_tools."
                          % param, param, "invalid_value")
        tools_param = param + (".allowed_tools.tools" if nested else ".tools")
        return mode, [named_tool(entry, names, tools_param) for entry in listed]
    return named_tool(choice, names, param), None


def chosen_tools(tools: List[Dict[str, Any]], choice: Any, param: str) -> Tuple[List[Dict[str, Any]], str]:
    """(the tools Claude may call, the tool choice as a Turn takes it) under a client's tool choice."""
    choice, allowed = parse_tool_choice(choice, [tool["name"] for tool in tools], param)
    if allowed is not None:
        tools = [tool for tool in tools if tool["name"] in allowed]
    if choice == "none":
        tools = []  # not offered at all, so Claude cannot call them
    return tools, choice


def all_input_tokens(usage: Dict[str, int]) -> int:
    """Anthropic counts fresh input, cache reads and cache writes apart; OpenAI's input is all three."""
    return (usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
            + usage.get("cache_creation_input_tokens", 0))


def random_id(prefix: str) -> str:
    """A fresh id for something the proxy answers (a completion, a response, an output item)."""
    return prefix + uuid.uuid4().hex[:24]


MAX_JSON_DEPTH = 100


def json_problem(value: Any) -> Optional[str]:
    """Why a parsed body could not be written out again for the CLI, or None.

    Deep nesting would hit the recursion limit in json.dumps, and a lone UTF-16
    surrogate (a bare \\ud800 escape) is no text that UTF-8 can carry. One walk,
    without recursion, finds both.
    """
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return "holds a lone UTF-16 surrogate escape, which is not valid text"
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return "nests deeper than %d levels" % MAX_JSON_DEPTH
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return None


def refuse_constant(name: str) -> Any:
    """NaN and Infinity, which Python's json takes and JSON has not (nor the CLI)."""
    raise ValueError("%s is not a JSON value" % name)


def parse_json_text(text: bytes) -> Any:
    """A request body's JSON, or a 400 saying why it is none the CLI could be given."""
    try:
        body = json.loads(text.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise invalid("The request body is not valid JSON: %s" % error, code="invalid_json")
    problem = json_problem(body)
    if problem:
        raise invalid("The request body %s." % problem, code="invalid_json")
    return body


def asked_model(body: Any) -> str:
    """The model a request body names, fit for a log line (a client may send any text), or "-"."""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        return "-"
    return re.sub(r"[^A-Za-z0-9._:/@\[\]-]", "?", model[:100])


class Door:
    """What every door is to the core, made of a Turn and its options: one answer's translator.

    `stream`: the answer goes out as frames (encode() for each session event, keepalive() for a
    silence, then end() with the Outcome, or failure() with the error), else whole (response()).
    `returns_thinking`: the client sends Claude's thinking back with its signature, so a history
    it resumes needs none put back. echo() is the reply as the client will send it back (native
    blocks), to keep the process for the next turn; stored() what the Responses store keeps of
    the answer, None when nothing. A door reads nothing but these events and the Outcome."""

    stream = False
    returns_thinking = False

    def encode(self, event: SessionEvent) -> List[Frame]:
        raise NotImplementedError

    def keepalive(self) -> List[Frame]:
        return []  # no event of the API's for a silence: an SSE comment

    def end(self, outcome: Outcome) -> List[Frame]:
        raise NotImplementedError

    def failure(self, error: ProxyError) -> List[Frame]:
        raise NotImplementedError

    def response(self, outcome: Outcome) -> Dict[str, Any]:
        raise NotImplementedError

    def echo(self, outcome: Outcome) -> Optional[List[Dict[str, Any]]]:
        raise NotImplementedError

    def stored(self, echo: Optional[List[Dict[str, Any]]] = None) -> Optional["StoredResponse"]:
        return None


# ---------------------------------------------------------------------------
# Door: OpenAI chat completions (POST /v1/chat/completions)
# ---------------------------------------------------------------------------

# OpenAI request fields that change nothing here, listed so the debug log can
# name the ones that are truly unknown.
CHAT_IGNORED_FIELDS = frozenset((
    "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "user", "metadata",
    "logit_bias", "logprobs", "top_logprobs", "store", "service_tier", "prediction", "modalities",
    "audio", "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
))
CHAT_FIELDS = frozenset((
    "model", "messages", "stream", "stream_options", "n", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "response_format", "max_tokens",
    "max_completion_tokens", "stop", "reasoning_effort", "reasoning", "include_reasoning",
))
CHAT_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


class ChatOptions(NamedTuple):
    """How the chat door answers, beside the Turn it asks for."""
    stream: bool
    include_usage: bool
    legacy_functions: bool   # answer with function_call, not tool_calls
    want_reasoning: bool     # thinking goes out as reasoning_content


def chat_reasoning(body: Dict[str, Any]) -> Tuple[Optional[str], bool, bool]:
    """(effort level, thinking on, reasoning asked for explicitly)."""
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")  # the OpenRouter / LiteLLM spelling
    level, thinking = parse_effort(effort, "reasoning_effort")
    asked = effort not in (None, "none") or body.get("include_reasoning") is True or isinstance(reasoning, dict)
    return level, thinking, asked


def chat_response_format(response_format: Any) -> Optional[Dict[str, Any]]:
    """The JSON schema the answer must match, or None for free text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        return json_schema_of(spec.get("schema") if isinstance(spec, dict) else None,
                              "response_format.json_schema.schema")
    raise invalid("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\".",
                  "response_format")


def chat_blocks(content: Any, param: str, kinds: Tuple[str, ...],
                load_image: ImageLoader, nullable: bool = False
                ) -> List[Dict[str, Any]]:
    """The content blocks of a message's content: a string, null, or an array of parts."""
    if content is None and nullable:
        return []

    def block(kind: str, part: Dict[str, Any], part_param: str) -> Dict[str, Any]:
        if kind in ("text", "input_text", "refusal"):
            return text_block(string_field(part, "refusal" if kind == "refusal" else "text", part_param))
        if kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise invalid("%s.image_url.url must be a string." % part_param,
                              part_param + ".image_url", "invalid_type")
            return load_image(url, part_param)
        file = part.get("file")
        return document_block(file.get("file_data") if isinstance(file, dict) else None, part_param + ".file")
    return content_blocks(content, param + ".content", kinds + ("input_text",) * ("text" in kinds), block)


def assistant_calls(message: Dict[str, Any], param: str, legacy_ids: List[str]) -> List[Dict[str, Any]]:
    """The tool_use blocks of an assistant message's tool_calls (or legacy function_call)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise invalid("%s.tool_calls must be an array." % param, param + ".tool_calls", "invalid_type")
    blocks = []
    for index, call in enumerate(calls):
        call_param = "%s.tool_calls[%d]" % (param, index)
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(call.get("id"), str):
            raise invalid("%s must be {\"id\", \"type\": \"function\", \"function\": {\"name\", "
                          "\"arguments\"}}." % call_param, call_param, "invalid_type")
        blocks.append({"type": "tool_use", "id": tool_id(call["id"]), "name": function["name"],
                       "input": tool_input(function.get("arguments"), call_param + ".function.arguments")})
    legacy = message.get("function_call")
    if legacy is not None:
        if not isinstance(legacy, dict) or not isinstance(legacy.get("name"), str):
            raise invalid("%s.function_call must be {\"name\", \"arguments\"}." % param,
                          param + ".function_call", "invalid_type")
        legacy_ids.append("call_function_%d" % len(legacy_ids))
        blocks.append({"type": "tool_use", "id": legacy_ids[-1], "name": legacy["name"],
                       "input": tool_input(legacy.get("arguments"), param + ".function_call.arguments")})
    return blocks


def chat_tool_result(message: Dict[str, Any], param: str, legacy_ids: List[str],
                     load_image: ImageLoader) -> Dict[str, Any]:
    """A tool (or legacy function) message as the tool_result block answering its call."""
    if message["role"] == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise invalid("%s.tool_call_id must name the call this result answers." % param,
                          param + ".tool_call_id", "invalid_type")
        call_id = tool_id(call_id)
    else:
        if not isinstance(message.get("name"), str):
            raise invalid("%s.name must name the function this result answers." % param,
                          param + ".name", "invalid_type")
        if not legacy_ids:
            raise invalid("%s answers no function_call before it." % param, param, "invalid_value")
        call_id = legacy_ids[-1]
    content = message.get("content")
    return tool_result_block(call_id, chat_blocks("" if content is None else content, param,
                                                  ("text", "image_url"), load_image))


def chat_conversation(messages: List[Any], tools: List[Dict[str, Any]],
                      load_image: ImageLoader) -> Conversation:
    """OpenAI chat messages as a native conversation.

    System and developer messages make the system prompt; tool (and legacy
    function) messages become tool_result blocks of a user message; assistant
    tool calls become tool_use blocks. Consecutive user messages (OpenClaw ends
    each turn with two) are one user turn, answered as a whole.
    """
    system: List[str] = []
    native = MessageList()
    legacy_ids: List[str] = []  # legacy function calls carry no ids: they are numbered in order
    for index, message in enumerate(messages):
        param = "messages[%d]" % index
        if not isinstance(message, dict):
            raise invalid("%s must be an object." % param, param, "invalid_type")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append("".join(b["text"] for b in chat_blocks(content, param, ("text",), load_image)))
        elif role == "user":
            native.add("user", chat_blocks(content, param, ("text", "image_url", "file"), load_image))
        elif role == "assistant":
            native.add("assistant", chat_blocks(content, param, ("text", "refusal"), load_image, nullable=True)
                       + assistant_calls(message, param, legacy_ids))
        elif role in ("tool", "function"):
            native.add("user", [chat_tool_result(message, param, legacy_ids, load_image)])
        else:
            raise invalid("%s.role must be one of system, developer, user, assistant, tool, function; "
                          "got %r." % (param, role), param + ".role")
    if not native.messages:
        raise invalid("`messages` holds only system messages; add a user message.", "messages")
    if native.messages[-1]["role"] != "user":
        raise invalid("The conversation must end with a user or tool message: Claude Code cannot "
                      "continue a partial assistant message (a prefill).", "messages", "unsupported_value")
    return Conversation("\n\n".join(s for s in system if s.strip()) or DEFAULT_SYSTEM_PROMPT,
                        native.messages, tools)


def chat_tools(body: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], str, bool, bool]:
    """(native tools offered, tool choice, parallel calls allowed, legacy functions API)."""
    legacy = body.get("tools") is None and body.get("functions") is not None
    entries = body.get("functions") if legacy else body.get("tools")
    param = "functions" if legacy else "tools"
    if entries is None:
        return [], "auto", True, False
    if not isinstance(entries, list):
        raise invalid("`%s` must be an array." % param, param, "invalid_type")
    tools = []
    for index, entry in enumerate(entries):
        entry_param = "%s[%d]" % (param, index)
        if not isinstance(entry, dict):
            raise invalid("%s must be an object." % entry_param, entry_param, "invalid_type")
        if not legacy and entry.get("type", "function") != "function":
            raise invalid("%s has type %r; only function tools are supported." % (
                entry_param, entry.get("type")), entry_param + ".type", "unsupported_tool_type")
        spec = entry if legacy else entry.get("function")
        if not isinstance(spec, dict):
            raise invalid("%s must be a function with a name." % entry_param, entry_param, "invalid_type")
        spec_param = entry_param if legacy else entry_param + ".function"
        tool = native_tool(spec.get("name"), spec.get("description"), spec.get("parameters"), spec_param)
        tools.append(distinct_tool(tool, tools, spec_param))
    tools, choice = chosen_tools(tools, body.get("function_call" if legacy else "tool_choice"),
                                 "function_call" if legacy else "tool_choice")
    parallel = not legacy and body.get("parallel_tool_calls") is not False
    return tools, choice, parallel, legacy


def parse_chat_request(body: Any, config: Config,
                       fetch: Optional[Callable[[str, int], Tuple[str, bytes]]] = None
                       ) -> Tuple[Turn, ChatOptions]:
    """Validate an OpenAI chat completion body into a Turn; a 400 names the bad param.

    `fetch` loads remote images (only with --fetch-images); tests pass a fake.
    """
    model, cli_model = request_fields(body, config, CHAT_FIELDS, CHAT_IGNORED_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty array.", "messages",
                      "invalid_type" if not isinstance(messages, list) else "empty_array")
    stream = optional_bool(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("`stream_options` must be an object.", "stream_options", "invalid_type")
    if body.get("n") not in (None, 1):
        raise invalid("Only n=1 is supported: the Claude Code CLI gives one answer per request.",
                      "n", "unsupported_value")
    tools, tool_choice, parallel, legacy = chat_tools(body)
    effort, thinking, asked = chat_reasoning(body)
    conversation = chat_conversation(messages, tools, image_loader(config, fetch))
    turn = Turn(model=model, cli_model=cli_model, conversation=conversation,
                tool_choice=tool_choice, parallel_tool_calls=parallel,
                json_schema=chat_response_format(body.get("response_format")),
                max_tokens=parse_max_tokens(body, ("max_completion_tokens", "max_tokens")),
                stops=stop_list(body.get("stop"), "stop", 4), effort=effort, thinking=thinking)
    # Thinking goes out as reasoning_content unless turned off: agents keep a stream alive
    # by its deltas (the convention of DeepSeek, vLLM and OpenRouter; others ignore it).
    want_reasoning = asked or not (config.hide_reasoning or body.get("include_reasoning") is False)
    return turn, ChatOptions(stream=stream, include_usage=bool(stream and options.get("include_usage")),
                             legacy_functions=legacy, want_reasoning=thinking and want_reasoning)


def chat_usage(usage: Dict[str, int]) -> Dict[str, Any]:
    """OpenAI usage from Anthropic usage: every input kind counts as prompt."""
    prompt, completion = all_input_tokens(usage), usage.get("output_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": usage.get("cache_read_input_tokens", 0)}}


class ChatDoor(Door):
    """OpenAI chat completions: a request in, chunks or a completion out, errors in OpenAI's shape."""

    returns_thinking = False  # a chat message has no place for a signature (see ThinkingStore)

    def __init__(self, turn: Turn, options: ChatOptions) -> None:
        self.turn = turn
        self.options = options
        self.stream = options.stream
        self.id = random_id("chatcmpl-")
        self.created = int(time.time())
        self.calls = -1  # index of the current tool call
        self.started = False

    # -- streaming: session events -> chunks -----------------------------------------

    def encode(self, event: SessionEvent) -> List[Frame]:
        return [self._chunk(delta) for delta in self._deltas(event)]

    def _deltas(self, event: SessionEvent) -> List[Dict[str, Any]]:
        legacy = self.options.legacy_functions
        if isinstance(event, BlockStart) and event.block["type"] == "tool_use":
            self.calls += 1
            name = event.block["name"]
            if legacy:
                return [{"function_call": {"name": name, "arguments": ""}}] if self.calls == 0 else []
            return [{"tool_calls": [{"index": self.calls, "id": event.block["id"], "type": "function",
                                     "function": {"name": name, "arguments": ""}}]}]
        if not isinstance(event, BlockDelta):
            return []  # a block's end: chunks have no event for it
        if event.kind == "text":
            return [{"content": event.piece}]
        if event.kind == "thinking":
            return [{"reasoning_content": event.piece}] if self.options.want_reasoning else []
        if legacy:
            return [{"function_call": {"arguments": event.piece}}] if self.calls == 0 else []
        return [{"tool_calls": [{"index": self.calls, "function": {"arguments": event.piece}}]}]

    def end(self, outcome: Outcome) -> List[Frame]:
        frames = [] if self.started else [self._chunk({"content": ""})]
        frames.append(self._chunk({}, self._finish_reason(outcome)))
        if self.options.include_usage:
            frames.append((None, self._envelope("chat.completion.chunk", choices=[],
                                                usage=chat_usage(outcome.usage))))
        return frames + [(None, "[DONE]")]

    def failure(self, error: ProxyError) -> List[Frame]:
        return [(None, error.body()), (None, "[DONE]")]

    def _chunk(self, delta: Dict[str, Any], finish: Optional[str] = None) -> Frame:
        if not self.started:
            self.started = True
            delta = dict({"role": "assistant", "content": None}, **delta)
        chunk = self._envelope("chat.completion.chunk", choices=[
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if self.options.include_usage:
            chunk["usage"] = None  # OpenAI sends null usage in each chunk before the last
        return None, chunk

    # -- whole: the completion ------------------------------------------------------

    def response(self, outcome: Outcome) -> Dict[str, Any]:
        return self._envelope("chat.completion", usage=chat_usage(outcome.usage), choices=[
            {"index": 0, "logprobs": None, "finish_reason": self._finish_reason(outcome),
             "message": self._message(outcome)}])

    def _message(self, outcome: Outcome) -> Dict[str, Any]:
        calls = outcome.calls
        text = "".join(block["text"] for block in outcome.blocks if block["type"] == "text")
        thinking = "".join(block["thinking"] for block in outcome.blocks if block["type"] == "thinking")
        message: Dict[str, Any] = {"role": "assistant", "content": text or (None if calls else ""),
                                   "refusal": None}
        if self.options.want_reasoning and thinking:
            message["reasoning_content"] = thinking
        arguments = [json.dumps(call["input"], ensure_ascii=False) for call in calls]
        if calls and self.options.legacy_functions:
            message["function_call"] = {"name": calls[0]["name"], "arguments": arguments[0]}
        elif calls:
            message["tool_calls"] = [{"id": call["id"], "type": "function", "function": {
                "name": call["name"], "arguments": args}} for call, args in zip(calls, arguments)]
        return message

    def echo(self, outcome: Outcome) -> List[Dict[str, Any]]:
        """This reply as the client will send it back: the message it got, read as the door reads
        an assistant message (one text, no thinking, the first call alone for legacy functions)."""
        message = self._message(outcome)
        return [text_block(message["content"])] * bool(message["content"]) + \
            assistant_calls(message, "echo", [])

    def _finish_reason(self, outcome: Outcome) -> str:
        if outcome.calls:
            return "function_call" if self.options.legacy_functions else "tool_calls"
        return CHAT_FINISH_REASONS.get(outcome.stop_reason, "stop")

    def _envelope(self, kind: str, **fields: Any) -> Dict[str, Any]:
        return dict({"id": self.id, "object": kind, "created": self.created, "model": self.turn.model,
                     "system_fingerprint": None}, **fields)


# ---------------------------------------------------------------------------
# Door: OpenAI Responses (POST /v1/responses, GET /v1/responses/{id})
# ---------------------------------------------------------------------------

# Where the Responses API differs from chat: the conversation is a list of items (messages,
# function calls and their outputs, reasoning), a reply is a list of output items streamed
# as typed events, and OpenAI may keep the conversation, so that the next request names the
# response it continues (previous_response_id) instead of sending it all again.

# Request fields that change nothing here, listed so the debug log can name the truly unknown.
RESPONSES_IGNORED_FIELDS = frozenset((
    "temperature", "top_p", "user", "metadata", "truncation", "prompt_cache_key", "safety_identifier",
    "service_tier", "top_logprobs", "max_tool_calls", "stream_options", "client_metadata", "background",
))
RESPONSES_FIELDS = frozenset((
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning",
    "max_output_tokens", "stream", "store", "previous_response_id", "include",
))
# Fields that would make this a different kind of request: OpenAI's server-side conversations and
# prompt templates, which the proxy does not have.
RESPONSES_UNSUPPORTED_FIELDS = ("conversation", "prompt")
# Tools OpenAI runs on its own servers. Claude has none of them here; a client that offers one
# still wants an answer (the Codex CLI offers web_search on every request and has no switch for
# it), so they are left out. A namespace groups a client's tools under a name (Codex's sub-agent
# tools) whose calls have a shape of their own: left out as well.
RESPONSES_HOSTED_TOOLS = frozenset((
    "web_search", "web_search_preview", "file_search", "code_interpreter", "image_generation",
    "computer_use_preview", "computer", "mcp", "tool_search", "namespace",
))
DATED_TOOL_TYPE = re.compile(r"_\d{4}_\d{2}_\d{2}$")  # web_search_2025_08_26 is a web_search
REASONING_SUMMARIES = ("auto", "concise", "detailed")
# A reasoning item's encrypted_content carries Claude's thinking signature after this mark, so the
# item becomes Claude's thinking block again when the client sends it back.
THINKING_SIGNATURE_MARK = "claude-thinking-signature:"
# Why an answer stopped short (Anthropic stop reason -> incomplete_details.reason).
RESPONSES_INCOMPLETE = {
    "max_tokens": "max_output_tokens",
    "model_context_window_exceeded": "max_output_tokens",
    "refusal": "content_filter",
}
RESPONSE_STORE_COUNT = 100
RESPONSE_STORE_BYTES = 64 * MIB


class StoredResponse(NamedTuple):
    """A response kept for the requests that continue it, and for GET /v1/responses/{id}."""
    response: Dict[str, Any]        # the response object as the client got it
    system: List[str]               # system and developer messages of the input so far
    messages: List[Dict[str, Any]]  # the native conversation, the reply included
    item_ids: List[str]             # ids of its input and output items, earlier turns' too


class ResponsesOptions(NamedTuple):
    """How the Responses door answers, beside the Turn it asks for."""
    stream: bool
    want_reasoning: bool            # thinking goes out as reasoning items
    sealed_reasoning: bool          # with its signature in encrypted_content (include asks for it)
    settings: Dict[str, Any]        # the request's settings, repeated in each response object
    store: bool                     # the response is kept (for previous_response_id and GET)
    system: List[str]               # the input's system and developer messages, for the next turn
    item_ids: List[str]             # ids of the input's items, earlier turns' too


def previous_response(response_id: Any, find_response: Optional[Callable[[str], Optional[StoredResponse]]]
                      ) -> Optional[StoredResponse]:
    if response_id is None:
        return None
    if not isinstance(response_id, str):
        raise invalid("`previous_response_id` must be a string.", "previous_response_id", "invalid_type")
    found = find_response(response_id) if find_response is not None else None
    if found is None:
        raise invalid("Previous response with id '%s' not found. The proxy keeps the last %d responses "
                      "in memory (not those sent with store: false, nor across restarts); send the whole "
                      "conversation in `input` instead." % (response_id, RESPONSE_STORE_COUNT),
                      "previous_response_id", "previous_response_not_found")
    return found


def responses_tools(body: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], str]:
    """(native tools offered, the function tools as a response repeats them, tool choice)."""
    entries = body.get("tools")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise invalid("`tools` must be an array.", "tools", "invalid_type")
    tools, echoed = [], []
    for index, entry in enumerate(entries):
        param = "tools[%d]" % index
        kind = entry.get("type") if isinstance(entry, dict) else None
        if isinstance(kind, str) and DATED_TOOL_TYPE.sub("", kind) in RESPONSES_HOSTED_TOOLS:
            log.debug("leaving out the %s tool: Claude has no such tool here", kind)
            continue
        if kind != "function":
            raise invalid("%s has type %r; the proxy offers function tools (hosted tools such as "
                          "web_search are left out)." % (param, kind), param + ".type",
                          "unsupported_tool_type")
        tool = native_tool(entry.get("name"), entry.get("description"), entry.get("parameters"), param)
        tools.append(distinct_tool(tool, tools, param))
        echoed.append({"type": "function", "name": entry["name"], "description": entry.get("description"),
                       "parameters": tools[-1]["input_schema"],
                       "strict": entry.get("strict") if isinstance(entry.get("strict"), bool) else None})
    tools, choice = chosen_tools(tools, body.get("tool_choice"), "tool_choice")
    return tools, echoed, choice


def responses_reasoning(reasoning: Any) -> Tuple[Optional[str], bool, Optional[str]]:
    """(effort level, thinking on, the summary asked for)."""
    if reasoning is None:
        reasoning = {}
    if not isinstance(reasoning, dict):
        raise invalid("`reasoning` must be an object.", "reasoning", "invalid_type")
    effort, thinking = parse_effort(reasoning.get("effort"), "reasoning.effort")
    summary = reasoning.get("summary", reasoning.get("generate_summary"))  # the older name
    if summary is not None and summary not in REASONING_SUMMARIES:
        raise invalid("`reasoning.summary` must be one of %s." % ", ".join(REASONING_SUMMARIES),
                      "reasoning.summary")
    return effort, thinking, summary


def responses_text_format(text: Any) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """(the JSON schema the answer must match or None for free text, the format as asked)."""
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise invalid("`text` must be an object.", "text", "invalid_type")
    answer_format = text.get("format")
    if answer_format is None:
        return None, {"type": "text"}
    kind = answer_format.get("type") if isinstance(answer_format, dict) else None
    if kind == "text":
        return None, answer_format
    if kind == "json_object":
        return {"type": "object"}, answer_format
    if kind == "json_schema":
        return json_schema_of(answer_format.get("schema"), "text.format.schema"), answer_format
    raise invalid("`text.format.type` must be \"text\", \"json_object\" or \"json_schema\".", "text.format")


def responses_blocks(content: Any, param: str, kinds: Tuple[str, ...],
                     load_image: ImageLoader) -> List[Dict[str, Any]]:
    """The native blocks of a message's content (or a function output): a string or an array of parts."""
    def block(kind: str, part: Dict[str, Any], part_param: str) -> Dict[str, Any]:
        if kind == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise invalid("%s.image_url must be a URL (uploaded file ids are not supported)."
                              % part_param, part_param + ".image_url", "invalid_type")
            return load_image(part["image_url"], part_param)
        if kind == "input_file":
            return document_block(part.get("file_data"), part_param + ".file_data")
        return text_block(string_field(part, "refusal" if kind == "refusal" else "text", part_param))
    return content_blocks(content, param, kinds, block)


def thinking_blocks(item: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A reasoning item from an earlier answer: Claude's thinking block again when it carries the
    signature the proxy gave it, else nothing. Anthropic refuses thinking without its signature,
    and OpenAI's own encrypted reasoning means nothing to Claude."""
    sealed = item.get("encrypted_content")
    if not isinstance(sealed, str) or not sealed.startswith(THINKING_SIGNATURE_MARK):
        return []
    summary = item.get("summary") if isinstance(item.get("summary"), list) else []
    thinking = "".join(part["text"] for part in summary
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return [{"type": "thinking", "thinking": thinking, "signature": sealed[len(THINKING_SIGNATURE_MARK):]}]


def responses_item(item: Dict[str, Any], param: str,
                   load_image: ImageLoader) -> Tuple[str, List[Dict[str, Any]]]:
    """One input item as (role, native blocks); role "system" for system and developer messages."""
    kind = item.get("type", "message")  # the Agents SDK sends messages without a type
    if kind == "message":
        role = item.get("role")
        kinds = named_entry({"user": ("input_text", "input_image", "input_file"), "system": ("input_text",),
                             "developer": ("input_text",),
                             "assistant": ("output_text", "refusal", "input_text")}, role)
        if kinds is None:
            raise invalid("%s.role must be one of user, assistant, system, developer; got %r."
                          % (param, role), param + ".role")
        blocks = responses_blocks(item.get("content"), param + ".content", kinds, load_image)
        return ("system" if role == "developer" else role), blocks
    if kind == "function_call":
        if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
            raise invalid("%s must have a call_id and a name." % param, param, "invalid_type")
        return "assistant", [{"type": "tool_use", "id": tool_id(item["call_id"]), "name": item["name"],
                              "input": tool_input(item.get("arguments"), param + ".arguments")}]
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise invalid("%s.call_id must name the call this output answers." % param,
                          param + ".call_id", "invalid_type")
        output = item.get("output")
        return "user", [tool_result_block(tool_id(item["call_id"]), responses_blocks(
            "" if output is None else output, param + ".output", ("input_text", "input_image"), load_image))]
    if kind == "reasoning":
        return "assistant", thinking_blocks(item)
    raise invalid("%s has type %r; the proxy takes message, function_call, function_call_output, reasoning "
                  "and item_reference items." % (param, kind), param + ".type", "unsupported_item_type")


def responses_conversation(items: Any, instructions: Optional[str], previous: Optional[StoredResponse],
                           tools: List[Dict[str, Any]], load_image: ImageLoader
                           ) -> Tuple[Conversation, List[str], List[str]]:
    """The input items, after the conversation a previous response holds, as a native conversation;
    also the system texts and the item ids so far, kept with the response for the next turn.

    Instructions and system or developer messages make the system prompt (instructions are
    not carried over to the next response, as OpenAI does it). An item_reference may only name
    an item of the conversation continued, where it stands already."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise invalid("`input` must be a string or a non-empty array of items.", "input",
                      "invalid_type" if not isinstance(items, list) else "empty_array")
    system = list(previous.system) if previous else []
    item_ids = list(previous.item_ids) if previous else []
    native = MessageList()
    for message in previous.messages if previous else []:
        native.add(message["role"], message["content"])
    for index, item in enumerate(items):
        param = "input[%d]" % index
        if not isinstance(item, dict):
            raise invalid("%s must be an object." % param, param, "invalid_type")
        if item.get("type") == "item_reference":
            if item.get("id") not in item_ids:
                raise invalid("%s refers to item %r, which is not in the conversation of "
                              "`previous_response_id`; send the item itself." % (param, item.get("id")),
                              param + ".id", "item_not_found")
            continue
        if isinstance(item.get("id"), str):
            item_ids.append(item["id"])
        role, blocks = responses_item(item, param, load_image)
        if role == "system":
            system.append("".join(block["text"] for block in blocks))
        else:
            native.add(role, blocks)
    if not native.messages:
        raise invalid("`input` holds only system messages; add a user message.", "input")
    if native.messages[-1]["role"] != "user":
        raise invalid("The input must end with a user message or a function_call_output: Claude Code "
                      "cannot continue a partial assistant message.", "input", "unsupported_value")
    prompt = "\n\n".join(text for text in [instructions or ""] + system if text.strip())
    return Conversation(prompt or DEFAULT_SYSTEM_PROMPT, native.messages, tools), system, item_ids


def parse_responses_request(body: Any, config: Config,
                            find_response: Optional[Callable[[str], Optional[StoredResponse]]] = None,
                            fetch: Optional[Callable[[str, int], Tuple[str, bytes]]] = None
                            ) -> Tuple[Turn, ResponsesOptions]:
    """Validate a Responses API body into a Turn; a 400 names the bad param.

    `find_response` finds a response a previous_response_id may name (in the proxy's store);
    `fetch` loads remote images (only with --fetch-images); tests pass a fake.
    """
    model, cli_model = request_fields(body, config, RESPONSES_FIELDS, RESPONSES_IGNORED_FIELDS)
    for name in RESPONSES_UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise invalid("`%s` is not supported: send the whole conversation in `input`, or continue a "
                          "response with `previous_response_id`." % name, name, "unsupported_parameter")
    if body.get("background") is True:
        raise invalid("Background responses are not supported: Claude answers while the request waits.",
                      "background", "unsupported_value")
    stream = optional_bool(body, "stream", False)
    store = optional_bool(body, "store", True)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("`instructions` must be a string.", "instructions", "invalid_type")
    include = body.get("include") or []
    if not isinstance(include, list):
        raise invalid("`include` must be an array.", "include", "invalid_type")
    previous = previous_response(body.get("previous_response_id"), find_response)
    tools, echoed_tools, tool_choice = responses_tools(body)
    parallel = optional_bool(body, "parallel_tool_calls", True)
    effort, thinking, summary = responses_reasoning(body.get("reasoning"))
    json_schema, text_format = responses_text_format(body.get("text"))
    conversation, system, item_ids = responses_conversation(
        body.get("input"), instructions, previous, tools, image_loader(config, fetch))
    max_tokens = parse_max_tokens(body, ("max_output_tokens",))
    turn = Turn(model=model, cli_model=cli_model, conversation=conversation, tool_choice=tool_choice,
                parallel_tool_calls=parallel, json_schema=json_schema, max_tokens=max_tokens,
                effort=effort, thinking=thinking)
    metadata = body.get("metadata")
    settings = {
        "instructions": instructions, "max_output_tokens": max_tokens, "model": model,
        "parallel_tool_calls": parallel, "previous_response_id": previous and previous.response["id"],
        "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": summary},
        "store": store, "text": {"format": text_format}, "tool_choice": body.get("tool_choice") or "auto",
        "tools": echoed_tools, "truncation": "disabled",
        "metadata": {key: value for key, value in metadata.items() if isinstance(value, str)}
        if isinstance(metadata, dict) else {},
    }
    # Thinking goes out as reasoning summaries unless turned off, as the chat door sends it.
    want_reasoning = thinking and (summary is not None or not config.hide_reasoning)
    return turn, ResponsesOptions(
        stream=stream, want_reasoning=want_reasoning,
        sealed_reasoning=want_reasoning and "reasoning.encrypted_content" in include,
        settings=settings, store=store, system=system, item_ids=item_ids)


def response_not_found(response_id: str) -> ProxyError:
    """GET or DELETE of /v1/responses/{id} for an id the store does not hold."""
    return ProxyError(404, "No response found with id '%s'." % response_id, param="response_id",
                      code="response_not_found")


def responses_usage(usage: Dict[str, int]) -> Dict[str, Any]:
    """Responses usage from Anthropic usage. Claude's thinking is not counted apart: its tokens are
    in output_tokens, and reasoning_tokens says 0."""
    total_input, output = all_input_tokens(usage), usage.get("output_tokens", 0)
    return {"input_tokens": total_input,
            "input_tokens_details": {"cached_tokens": usage.get("cache_read_input_tokens", 0),
                                     "cache_write_tokens": usage.get("cache_creation_input_tokens", 0)},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": total_input + output}


def responses_error_code(error: ProxyError) -> str:
    """The code of a failed response. The Codex CLI retries server_error five times and stops at
    once on the others: a failure that will happen again must not look like a server error."""
    if error.code == "context_length_exceeded":
        return error.code
    if error.status == 429:
        return "rate_limit_exceeded"
    return "server_error" if error.status >= 500 else "invalid_prompt"


# The event that streams the pieces of each type of output item.
DELTA_EVENTS = {"message": "response.output_text.delta", "reasoning": "response.reasoning_summary_text.delta",
                "function_call": "response.function_call_arguments.delta"}


def output_text_part(text: str) -> Dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def summary_part(text: str) -> Dict[str, Any]:
    return {"type": "summary_text", "text": text}


class ResponsesDoor(Door):
    """OpenAI Responses: a request in, typed events or a response object out, errors in OpenAI's shape.

    Each native block of the reply is one output item: thinking a reasoning item (its text as
    the summary), text a message, a tool call a function_call whose call_id is Claude's id.
    The items the client got make the conversation its next request continues.
    """

    # Only a reasoning item sealed with its signature (reasoning.encrypted_content) comes back
    # as thinking; a message that holds one is the client's as it is (ThinkingStore.restore).
    returns_thinking = False

    def __init__(self, turn: Turn, options: ResponsesOptions) -> None:
        self.turn = turn
        self.options = options
        self.stream = options.stream
        self.id = random_id("resp_")
        self.created = int(time.time())
        self.sequence = 0
        self.started = False
        self.output: List[Dict[str, Any]] = []   # the items so far, the one streaming last
        self.parts: List[str] = []               # the streaming item's text or arguments
        self.signature = ""                      # of the streaming reasoning item, once its block is whole
        self.open = False                        # the last item is streaming
        self.final: Optional[Dict[str, Any]] = None  # the response object, once finished or failed

    # -- streaming: session events -> typed events -------------------------------------

    def encode(self, event: SessionEvent) -> List[Frame]:
        if not isinstance(event, (BlockStart, BlockDelta, BlockStop)):
            return []
        kind = event.kind if isinstance(event, BlockDelta) else event.block["type"]
        if kind == "thinking" and not self.options.want_reasoning:
            return []
        frames = self._begin()
        if isinstance(event, BlockStart):
            # The item before is done now (its status is known once the next one begins, or at the end).
            frames += self._close("completed") + self._open(event.block)
        elif isinstance(event, BlockDelta):
            self.parts.append(event.piece)
            extra = {"logprobs": []} if kind == "text" else {}
            frames.append(self._event(DELTA_EVENTS[self.output[-1]["type"]], delta=event.piece, **extra,
                                      **self._place()))
        elif kind == "thinking":
            self.signature = event.block["signature"]
        return frames

    def _begin(self) -> List[Frame]:
        if self.started:
            return []
        self.started = True
        response = self._response("in_progress", [], None)
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def _open(self, block: Dict[str, Any]) -> List[Frame]:
        self.open, self.parts, self.signature = True, [], ""
        if block["type"] == "tool_use":
            item = self._function_call(block["id"], block["name"], "", "in_progress")
        elif block["type"] == "thinking":
            item = self._reasoning("", "")
        else:
            item = self._message("", "in_progress")
        self.output.append(item)
        frames = [self._event("response.output_item.added", output_index=len(self.output) - 1,
                              item=dict(item, content=[]) if block["type"] == "text" else item)]
        if block["type"] == "text":
            frames.append(self._event("response.content_part.added", part=output_text_part(""),
                                      **self._place()))
        elif block["type"] == "thinking":
            frames.append(self._event("response.reasoning_summary_part.added", part=summary_part(""),
                                      **self._place()))
        return frames

    def _close(self, status: str) -> List[Frame]:
        """The done events of the streaming item, which is whole now."""
        if not self.open:
            return []
        self.open = False
        item, joined, place = self.output[-1], "".join(self.parts), self._place()
        if item["type"] == "message":
            item = self._message(joined, status, item["id"])
            frames = [self._event("response.output_text.done", text=joined, logprobs=[], **place),
                      self._event("response.content_part.done", part=item["content"][0], **place)]
        elif item["type"] == "reasoning":
            item = self._reasoning(joined, self.signature, item["id"])
            frames = [self._event("response.reasoning_summary_text.done", text=joined, **place),
                      self._event("response.reasoning_summary_part.done", part=summary_part(joined), **place)]
        else:
            item = self._function_call(item["call_id"], item["name"], joined, status, item["id"])
            frames = [self._event("response.function_call_arguments.done", arguments=joined, **place)]
        self.output[-1] = item
        return frames + [self._event("response.output_item.done", output_index=len(self.output) - 1,
                                     item=item)]

    def _place(self) -> Dict[str, Any]:
        """Where a content event belongs: its item, and the part within it."""
        item = self.output[-1]
        place: Dict[str, Any] = {"item_id": item["id"], "output_index": len(self.output) - 1}
        if item["type"] == "message":
            place["content_index"] = 0
        elif item["type"] == "reasoning":
            place["summary_index"] = 0
        return place

    def end(self, outcome: Outcome) -> List[Frame]:
        status, incomplete = self._status(outcome)
        frames = self._begin() + self._close("incomplete" if incomplete else "completed")
        return frames + [self._event("response.%s" % status, response=self._finished(status, incomplete, outcome))]

    def failure(self, error: ProxyError) -> List[Frame]:
        frames = self._begin() + self._close("incomplete")
        self.final = self._response("failed", self.output, None,
                                    error={"code": responses_error_code(error), "message": error.message})
        return frames + [self._event("response.failed", response=self.final)]

    def _event(self, kind: str, **fields: Any) -> Frame:
        payload = dict({"type": kind, "sequence_number": self.sequence}, **fields)
        self.sequence += 1
        return kind, payload

    # -- whole: the response object ---------------------------------------------------

    def response(self, outcome: Outcome) -> Dict[str, Any]:
        status, incomplete = self._status(outcome)
        for block in outcome.blocks:
            if block["type"] == "text":
                self.output.append(self._message(block["text"], "completed"))
            elif block["type"] == "thinking" and self.options.want_reasoning:
                self.output.append(self._reasoning(block["thinking"], block["signature"]))
            elif block["type"] == "tool_use":
                self.output.append(self._function_call(block["id"], block["name"], json.dumps(
                    block["input"], ensure_ascii=False), "completed"))
        if incomplete and self.output and self.output[-1]["type"] != "reasoning":
            self.output[-1]["status"] = "incomplete"  # the item the limit cut
        return self._finished(status, incomplete, outcome)

    @staticmethod
    def _status(outcome: Outcome) -> Tuple[str, Optional[Dict[str, str]]]:
        reason = RESPONSES_INCOMPLETE.get(outcome.stop_reason)
        return ("incomplete", {"reason": reason}) if reason else ("completed", None)

    def _finished(self, status: str, incomplete: Optional[Dict[str, str]], outcome: Outcome) -> Dict[str, Any]:
        self.final = self._response(status, self.output, responses_usage(outcome.usage),
                                    incomplete_details=incomplete)
        return self.final

    def echo(self, outcome: Outcome) -> Optional[List[Dict[str, Any]]]:
        """The output items as the client will send them back, read as the door reads input items;
        None when they cannot be read back (arguments cut short)."""
        native = MessageList()
        no_images = image_loader(Config(), None)  # output items hold none
        try:
            for index, item in enumerate(self.output):
                native.add(*responses_item(item, "output[%d]" % index, no_images))
        except ProxyError:
            return None
        return native.messages[0]["content"] if native.messages else []

    def stored(self, echo: Optional[List[Dict[str, Any]]] = None) -> Optional[StoredResponse]:
        """The response to keep with its conversation, for previous_response_id and GET: the
        final one, with `echo`, the reply as the next request holds it (none after a failure:
        a request continuing a failed response continues the conversation before it)."""
        if not self.options.store or self.final is None:
            return None
        messages = self.turn.conversation.messages + [{"role": "assistant", "content": echo}] * bool(echo)
        item_ids = self.options.item_ids + [item["id"] for item in self.output]
        return StoredResponse(self.final, self.options.system, messages, item_ids)

    # -- items and the response object --------------------------------------------------

    def _message(self, text: str, status: str, item_id: Optional[str] = None) -> Dict[str, Any]:
        return {"id": item_id or random_id("msg_"), "type": "message", "status": status, "role": "assistant",
                "content": [output_text_part(text)]}

    def _reasoning(self, thinking: str, signature: str, item_id: Optional[str] = None) -> Dict[str, Any]:
        item: Dict[str, Any] = {"id": item_id or random_id("rs_"), "type": "reasoning",
                                "summary": [summary_part(thinking)] if thinking else []}
        if self.options.sealed_reasoning and signature:
            item["encrypted_content"] = THINKING_SIGNATURE_MARK + signature
        return item

    @staticmethod
    def _function_call(call_id: str, name: str, arguments: str, status: str,
                       item_id: Optional[str] = None) -> Dict[str, Any]:
        return {"id": item_id or random_id("fc_"), "type": "function_call", "status": status,
                "arguments": arguments, "call_id": call_id, "name": name}

    def _response(self, status: str, output: List[Dict[str, Any]], usage: Optional[Dict[str, Any]],
                  error: Optional[Dict[str, str]] = None,
                  incomplete_details: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        return dict({"id": self.id, "object": "response", "created_at": self.created, "status": status,
                     "background": False, "error": error, "incomplete_details": incomplete_details,
                     "output": list(output), "usage": usage}, **self.options.settings)


# ---------------------------------------------------------------------------
# Door: Anthropic Messages (POST /v1/messages)
# ---------------------------------------------------------------------------

# The Messages API speaks the native form already: this door checks a request,
# keeps of it what Claude Code can pass on, and refuses what it cannot do.

MESSAGES_IGNORED_FIELDS = frozenset((
    "temperature", "top_p", "top_k", "metadata", "service_tier", "cache_control", "inference_geo",
    "speed", "diagnostics", "container", "context_management",
))
MESSAGES_FIELDS = frozenset((
    "model", "messages", "max_tokens", "system", "stream", "tools", "tool_choice", "stop_sequences",
    "thinking", "output_config", "mcp_servers",
))
# The content blocks each role may hold.
MESSAGES_BLOCKS = {"user": ("text", "image", "document", "tool_result"),
                   "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}
TOOL_RESULT_BLOCKS = ("text", "image")  # what an MCP tool result can carry back to the CLI
MESSAGES_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
MESSAGES_THINKING = {"enabled": True, "adaptive": True, "disabled": False}
# A block's type -> (the field holding a piece of it, the delta that carries the piece).
MESSAGES_DELTAS = {"text": ("text", "text_delta"), "thinking": ("thinking", "thinking_delta"),
                   "tool_use": ("partial_json", "input_json_delta")}
MESSAGES_STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                         "model_context_window_exceeded")
# Anthropic's error types by status; its SDKs pick the exception by status alone.
MESSAGES_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    OVERLOADED_STATUS: "overloaded_error",
}


class MessagesOptions(NamedTuple):
    """How the Messages door answers, beside the Turn it asks for."""
    stream: bool


def messages_list(body: Dict[str, Any]) -> List[Any]:
    """The request's `messages`, checked to be a non-empty array."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty array.", "messages",
                      "invalid_type" if not isinstance(messages, list) else "empty_array")
    return messages


def messages_thinking(thinking: Any) -> bool:
    """Whether Claude thinks: as on the Messages API, only when asked. How long is the CLI's
    to decide (its models think adaptively), so a budget_tokens changes nothing."""
    if thinking is None:
        return False
    thinks = named_entry(MESSAGES_THINKING, thinking.get("type") if isinstance(thinking, dict) else None)
    if thinks is None:
        raise invalid("`thinking.type` must be \"enabled\", \"adaptive\" or \"disabled\".", "thinking.type")
    return thinks


def messages_output_config(output_config: Any) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(effort level, JSON schema of the answer) from output_config."""
    if output_config is None:
        return None, None
    if not isinstance(output_config, dict):
        raise invalid("`output_config` must be an object.", "output_config", "invalid_type")
    effort, _ = parse_effort(output_config.get("effort"), "output_config.effort")
    output_format = output_config.get("format")
    if output_format is None:
        return effort, None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
        raise invalid("`output_config.format.type` must be \"json_schema\".", "output_config.format")
    return effort, json_schema_of(output_format.get("schema"), "output_config.format.schema")


def messages_tool_choice(choice: Any, names: List[str]) -> Tuple[str, bool]:
    """("auto" | "none" | "required" | the one tool to call, parallel calls allowed)."""
    if choice is None:
        return "auto", True
    kind = choice.get("type") if isinstance(choice, dict) else None
    chosen = named_entry(MESSAGES_TOOL_CHOICES, kind)
    if chosen is None and kind != "tool":
        raise invalid("`tool_choice.type` must be \"auto\", \"any\", \"tool\" or \"none\".", "tool_choice.type")
    parallel = not optional_bool(choice, "disable_parallel_tool_use", False)
    if kind == "tool":
        return named_tool(choice, names, "tool_choice"), parallel
    return chosen, parallel


def messages_tools(body: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], str, bool]:
    """(native tools offered, tool choice, parallel calls allowed)."""
    entries = body.get("tools")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise invalid("`tools` must be an array.", "tools", "invalid_type")
    tools = []
    for index, entry in enumerate(entries):
        param = "tools[%d]" % index
        if not isinstance(entry, dict):
            raise invalid("%s must be an object." % param, param, "invalid_type")
        if entry.get("type") not in (None, "custom"):
            raise invalid("%s is a server tool of type %r, which Claude Code cannot run for a client; only "
                          "custom tools ({name, description, input_schema}) are supported."
                          % (param, entry.get("type")), param + ".type", "unsupported_tool_type")
        tool = native_tool(entry.get("name"), entry.get("description"), entry.get("input_schema"), param,
                           "input_schema")
        tools.append(distinct_tool(tool, tools, param))
    choice, parallel = messages_tool_choice(body.get("tool_choice"), [tool["name"] for tool in tools])
    if choice == "none":
        tools = []  # not offered at all, so Claude cannot call them
    return tools, choice, parallel


def messages_image(source: Any, param: str, load_image: Optional[ImageLoader]) -> Dict[str, Any]:
    """An image block from a base64 or url source, checked and loaded as every door's images are."""
    kind = source.get("type") if isinstance(source, dict) else None
    if load_image is None or kind not in ("base64", "url"):
        raise invalid("%s.source must be a base64 or url image source (uploaded files are not supported)."
                      % param, param + ".source", "unsupported_image_source")
    if kind == "url":
        return load_image(string_field(source, "url", param + ".source"), param)
    return load_image("data:%s;base64,%s" % (string_field(source, "media_type", param + ".source"),
                                             string_field(source, "data", param + ".source")), param)


def messages_document(block: Dict[str, Any], param: str) -> Dict[str, Any]:
    """A document block from a base64 PDF or plain text source, with its title and context."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        data_url = "data:%s;base64,%s" % (string_field(source, "media_type", param + ".source"),
                                          string_field(source, "data", param + ".source"))
        document = document_block(data_url, param)
    elif kind == "text":
        document = {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                   "data": string_field(source, "data", param + ".source")}}
    else:
        raise invalid("%s.source must be a base64 PDF or a text source (url, content and file sources are "
                      "not supported)." % param, param + ".source", "unsupported_file")
    for name in ("title", "context"):
        if isinstance(block.get(name), str):
            document[name] = block[name]
    return document


def messages_block(block: Dict[str, Any], param: str, load_image: Optional[ImageLoader]) -> Dict[str, Any]:
    """One block as Claude takes it: only its own fields (no cache_control, no citations; the CLI
    places its own cache breakpoints)."""
    kind = block["type"]
    if kind == "text":
        return text_block(string_field(block, "text", param))
    if kind == "image":
        return messages_image(block.get("source"), param, load_image)
    if kind == "document":
        return messages_document(block, param)
    if kind == "tool_use":
        return {"type": "tool_use", "id": tool_id(string_field(block, "id", param)),
                "name": string_field(block, "name", param),
                "input": tool_input(block.get("input"), param + ".input")}
    if kind == "tool_result":
        content = block.get("content")
        return tool_result_block(tool_id(string_field(block, "tool_use_id", param)),
                                 "" if content is None else messages_blocks(
                                     content, param + ".content", TOOL_RESULT_BLOCKS, load_image),
                                 optional_bool(block, "is_error", False))
    if kind == "thinking":
        return {"type": "thinking", "thinking": string_field(block, "thinking", param),
                "signature": string_field(block, "signature", param)}
    return {"type": "redacted_thinking", "data": string_field(block, "data", param)}


def messages_blocks(content: Any, param: str, kinds: Tuple[str, ...],
                    load_image: Optional[ImageLoader]) -> List[Dict[str, Any]]:
    """Content (a string or an array of blocks) as native blocks of the kinds allowed here."""
    return content_blocks(content, param, kinds, lambda _kind, block, block_param: messages_block(
        block, block_param, load_image))


def messages_system(system: Any, load_image: ImageLoader) -> str:
    """The system prompt: a string, or text blocks (Claude Code sends several), one paragraph each."""
    if system is None:
        return ""
    if isinstance(system, str):
        return system if system.strip() else ""
    return "\n\n".join(block["text"] for block in messages_blocks(system, "system", ("text",), load_image)
                       if block["text"].strip())


def system_reminder(text: str) -> Dict[str, Any]:
    """A system entry as Claude Code itself puts one where Anthropic takes no system message:
    a text block of the user message there, in its <system-reminder> tags."""
    return text_block("<system-reminder>\n%s\n</system-reminder>" % text)


def messages_conversation(messages: List[Any], load_image: ImageLoader) -> List[Dict[str, Any]]:
    """The native messages of a request; the newest must be the user's (a tool result is one),
    or system entries after it.

    Claude Code sends `{"role": "system"}` entries inside `messages` (its agent types and skills,
    with the mid-conversation-system beta). Right after a user message and before Claude's reply
    (or the end), one stays a system message there: a native "system" message, which the CLI sends
    upstream as it sends its own (see session_transcript). Anywhere else the CLI would hold it back
    to the end of the next user message, so it goes into the next user message where it stands,
    as Claude Code sends a system entry without that beta (system_reminder). Its text never changes.
    """
    native = MessageList()
    roles = [message.get("role") if isinstance(message, dict) else None for message in messages]
    for index, message in enumerate(messages):
        param = "messages[%d]" % index
        role = roles[index]
        if role == "system":
            blocks = messages_blocks(message.get("content"), param + ".content", ("text",), load_image)
            reply_next = next((later for later in roles[index + 1:] if later != "system"), None) != "user"
            if native.messages and native.messages[-1]["role"] in ("user", "system") and reply_next:
                native.add("system", blocks)
            else:
                native.add("user", [system_reminder(block["text"]) for block in blocks])
            continue
        kinds = named_entry(MESSAGES_BLOCKS, role)
        if kinds is None:
            raise invalid("%s must be {\"role\": \"user\", \"assistant\" or \"system\", \"content\"}."
                          % param, param + ".role")
        native.add(role, messages_blocks(message.get("content"), param + ".content", kinds, load_image))
    spoken = [message for message in native.messages if message["role"] != "system"]
    if not spoken or spoken[-1]["role"] != "user":
        raise invalid("The last message must be a user message: Claude Code cannot continue a partial "
                      "assistant message (a prefill).", "messages", "unsupported_value")
    return native.messages


def parse_messages_request(body: Any, config: Config,
                           fetch: Optional[Callable[[str, int], Tuple[str, bytes]]] = None
                           ) -> Tuple[Turn, MessagesOptions]:
    """Validate an Anthropic Messages body into a Turn; a 400 names the bad param.

    `fetch` loads remote images (only with --fetch-images); tests pass a fake.
    """
    model, cli_model = request_fields(body, config, MESSAGES_FIELDS, MESSAGES_IGNORED_FIELDS)
    if body.get("max_tokens") is None:
        raise invalid("`max_tokens` is required, as on the Anthropic API.", "max_tokens",
                      "missing_required_field")
    messages = messages_list(body)
    if body.get("mcp_servers"):
        raise invalid("`mcp_servers` is not supported: Claude Code cannot connect to a client's remote MCP "
                      "servers. Offer their tools as custom tools instead.", "mcp_servers", "unsupported_value")
    tools, tool_choice, parallel = messages_tools(body)
    effort, json_schema = messages_output_config(body.get("output_config"))
    load_image = image_loader(config, fetch)
    conversation = Conversation(messages_system(body.get("system"), load_image) or DEFAULT_SYSTEM_PROMPT,
                                messages_conversation(messages, load_image), tools)
    turn = Turn(model=model, cli_model=cli_model, conversation=conversation,
                tool_choice=tool_choice, parallel_tool_calls=parallel, json_schema=json_schema,
                max_tokens=parse_max_tokens(body, ("max_tokens",)),
                stops=stop_list(body.get("stop_sequences"), "stop_sequences"), effort=effort,
                thinking=messages_thinking(body.get("thinking")))
    return turn, MessagesOptions(stream=optional_bool(body, "stream", False))


def messages_usage(usage: Dict[str, int]) -> Dict[str, int]:
    """Anthropic usage as the CLI reported it (input_tokens counts no cache reads or writes)."""
    return {name: usage.get(name, 0) for name in
            ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")}


# /v1/messages/count_tokens. Claude Code cannot count a request without answering it, so the
# proxy estimates, and errs high: a client that trims its history to fit a context window must
# not be told it fits when it does not. Claude's tokenizers take about 3.5 bytes of English or
# code per token (Anthropic's figure), the newest up to a third more tokens for the same text;
# 2.5 bytes per token stays above both, and above CJK text (3 bytes a character, about a token);
# only strings of random characters (hashes, base64 text) come near it.
# Images and PDFs count by what Claude sees, not by their base64: an image is scaled to at most
# about 1,600 tokens (newer models take larger ones: the allowance doubles that), a PDF page is
# its text and its picture. The fixed part stands for what Anthropic and the CLI add to every
# request (the tool-use system prompt, the CLI's date reminder).
COUNT_BYTES_PER_TOKEN = 2.5
COUNT_IMAGE_TOKENS = 3200
COUNT_PDF_PAGE_TOKENS = 3000 + COUNT_IMAGE_TOKENS
COUNT_REQUEST_TOKENS = 500
ESTIMATE_HEADER = "x-claude-proxy-estimate"  # "true" on every count_tokens answer
PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")


def pdf_pages(data: str) -> int:
    """The pages of a base64 PDF, at least one (a compressed page tree hides its pages)."""
    return max(1, len(PDF_PAGE.findall(base64.b64decode(data))))


def estimate_input_tokens(body: Any, config: Config) -> int:
    """The input tokens of a Messages request (count_tokens' body: no max_tokens), estimated
    to err high (see above); the request is checked as /v1/messages checks it."""
    request_fields(body, config, MESSAGES_FIELDS, MESSAGES_IGNORED_FIELDS)
    messages = messages_list(body)
    images: List[str] = []

    def count_image(url: str, _param: str) -> Dict[str, Any]:  # counted, never fetched nor decoded
        images.append(url)
        return {"type": "image"}
    tools, _, _ = messages_tools(body)
    system = messages_system(body.get("system"), count_image)
    conversation = messages_conversation(messages, count_image)
    pages = 0
    for message in conversation:
        for index, block in enumerate(message["content"]):
            if block["type"] == "document" and block["source"]["type"] == "base64":
                pages += pdf_pages(block["source"]["data"])
                message["content"][index] = dict(block, source={"type": "base64"})
    text = json.dumps([system, conversation, tools], ensure_ascii=False).encode("utf-8")
    return (COUNT_REQUEST_TOKENS + math.ceil(len(text) / COUNT_BYTES_PER_TOKEN)
            + len(images) * COUNT_IMAGE_TOKENS + pages * COUNT_PDF_PAGE_TOKENS)


class MessagesDoor(Door):
    """Anthropic Messages: a request in, a message or its events out, errors in Anthropic's shape.

    The anthropic SDKs read a stream strictly: every event named by an `event:` line,
    message_start first with empty content, each block opened by content_block_start with
    the next index, a thinking block's signature in one signature_delta before its stop.
    """

    returns_thinking = True  # thinking blocks come back with their signatures, as the client got them

    def __init__(self, turn: Turn, options: MessagesOptions) -> None:
        self.turn = turn
        self.stream = options.stream
        self.id = random_id("msg_")
        self.started = False

    # -- streaming: session events -> events -----------------------------------------

    def encode(self, event: SessionEvent) -> List[Frame]:
        if isinstance(event, BlockStart):
            block = event.block
            if block["type"] == "tool_use":
                content = dict(block, input={})
            else:
                content = dict(block, **{block["type"]: ""})  # a thinking block opens with its signature empty
                if block["type"] == "thinking":
                    content["signature"] = ""
            return self._start() + [("content_block_start", {"type": "content_block_start", "index": event.index,
                                                              "content_block": content})]
        if isinstance(event, BlockDelta):
            field, delta = MESSAGES_DELTAS[event.kind]
            return [self._delta(event.index, {"type": delta, field: event.piece})]
        if isinstance(event, BlockStop):
            signature = event.block.get("signature") if event.block["type"] == "thinking" else None
            frames = [self._delta(event.index, {"type": "signature_delta", "signature": signature})] * bool(signature)
            return frames + [("content_block_stop", {"type": "content_block_stop", "index": event.index})]
        return []

    def keepalive(self) -> List[Frame]:
        """A ping while Claude is silent; the stream starts with the message if it has not yet."""
        return self._start() or [("ping", {"type": "ping"})]

    def end(self, outcome: Outcome) -> List[Frame]:
        return self._start() + [
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": self._stop_reason(outcome),
                                         "stop_sequence": outcome.stop_sequence},
                               # totals, which the SDKs put in place of message_start's zeros
                               "usage": messages_usage(outcome.usage)}),
            ("message_stop", {"type": "message_stop"})]

    def failure(self, error: ProxyError) -> List[Frame]:
        return [("error", self.error_body(error))]

    def _start(self) -> List[Frame]:
        if self.started:
            return []
        self.started = True
        return [("message_start", {"type": "message_start", "message": self._message(
            [], None, None, messages_usage({}))}), ("ping", {"type": "ping"})]

    @staticmethod
    def _delta(index: int, delta: Dict[str, Any]) -> Frame:
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}

    # -- whole: the message -----------------------------------------------------------

    def response(self, outcome: Outcome) -> Dict[str, Any]:
        return self._message(outcome.blocks, self._stop_reason(outcome), outcome.stop_sequence,
                             messages_usage(outcome.usage))

    def echo(self, outcome: Outcome) -> List[Dict[str, Any]]:
        """This reply as the client will send it back: its content as it is (thinking with its
        signature too), read as the door reads an assistant message."""
        native = MessageList()
        native.add("assistant", messages_blocks(outcome.blocks, "echo", MESSAGES_BLOCKS["assistant"], None))
        return native.messages[0]["content"] if native.messages else []

    @staticmethod
    def _stop_reason(outcome: Outcome) -> str:
        if outcome.calls:
            return "tool_use"
        return outcome.stop_reason if outcome.stop_reason in MESSAGES_STOP_REASONS else "end_turn"

    def _message(self, content: List[Dict[str, Any]], stop_reason: Optional[str], stop_sequence: Optional[str],
                 usage: Dict[str, int]) -> Dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.turn.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    # -- errors -------------------------------------------------------------------------

    @staticmethod
    def error_status(error: ProxyError) -> int:
        """Anthropic's status: Claude overloaded is its own 529 (OpenAI clients get a 503)."""
        return OVERLOADED_STATUS if error.code == "overloaded" else error.status

    @staticmethod
    def error_body(error: ProxyError) -> Dict[str, Any]:
        status = MessagesDoor.error_status(error)
        kind = MESSAGES_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}

    @staticmethod
    def error_reply(error: ProxyError) -> Tuple[int, Dict[str, Any]]:
        return MessagesDoor.error_status(error), MessagesDoor.error_body(error)


# ===========================================================================
# 3. THE RUNTIME (I/O): claude processes, the pool, probes, limits, stores, the exchange
# The runtime moves bytes and holds what outlives a request; the Runner owns every child.
# It ends with the Core, the proxy in memory, which the edge below calls.
# ===========================================================================

# ---------------------------------------------------------------------------
# The claude process
# ---------------------------------------------------------------------------

# Where installers put `claude`; a LaunchAgent's PATH holds none of them.
CLAUDE_INSTALL_DIRS = ("~/.local/bin", "~/.claude/local", "/opt/homebrew/bin", "/usr/local/bin",
                       "~/.npm-global/bin", "~/.bun/bin")


def find_claude(name: str) -> Optional[str]:
    """Absolute path of the CLI, looked up on PATH and then the usual install places."""
    if os.sep in name:
        path = os.path.expanduser(name)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    search = os.pathsep.join([os.environ.get("PATH", "")] +
                             [os.path.expanduser(d) for d in CLAUDE_INSTALL_DIRS])
    return shutil.which(name, path=search)


def claude_not_found(name: str) -> ProxyError:
    return ProxyError(
        503, "The Claude Code CLI (`%s`) was not found. Install it with "
        "`npm install -g @anthropic-ai/claude-code` (or Anthropic's installer), run `claude` once "
        "to log in, or point --claude-bin / CLAUDE_BIN at it." % name,
        code="claude_not_found")


class ClientGone(Exception):
    """The HTTP client hung up; its child must die now. Raised only for the client's own
    connection (see ClientConnection): any other connection's failure is the proxy's."""


WORKDIR_PREFIX = "claude-proxy-"


def new_workdir() -> str:
    """A private directory for one child, named after this proxy's pid so that a
    later proxy can tell it was left behind (see remove_abandoned_workdirs)."""
    return tempfile.mkdtemp(prefix="%s%d-" % (WORKDIR_PREFIX, os.getpid()))


def claude_config_dir(env: Dict[str, str]) -> str:
    """Where the CLI keeps its state, sessions included."""
    return env.get("CLAUDE_CONFIG_DIR") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".claude")


def session_file(workdir: str, env: Dict[str, str], session_id: str) -> str:
    """Where `claude --resume ID`, run in `workdir`, looks for the session: a directory named
    after the real path of its working directory (/private/var/... on macOS)."""
    project = re.sub(r"[^A-Za-z0-9]", "-", os.path.realpath(workdir))
    return os.path.join(claude_config_dir(env), "projects", project, session_id + ".jsonl")


def write_private(path: str, text: str) -> None:
    """A file only this user can read: it holds a conversation."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        f.write(text)


def remove_tree(path: str) -> bool:
    """Remove a directory that holds a conversation; False, and a warning naming what stays,
    when it cannot be (one already gone is removed)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove %s, which holds a conversation: %s", path, error)
        return False
    return True


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's
    return True


def remove_abandoned_workdirs(root: Optional[str] = None, projects: Optional[str] = None) -> int:
    """Remove the children's directories, and the session transcripts named after them, of
    proxies that died without cleaning up (kill -9, a crash): they hold conversations.
    Returns how many went."""
    removed = 0
    for directory, owner in (
            (root or tempfile.gettempdir(), re.compile(r"%s(\d+)-" % re.escape(WORKDIR_PREFIX))),
            # a transcript's directory is the working directory's real path, with '-' for '/' and '_'
            (projects or os.path.join(claude_config_dir(dict(os.environ)), "projects"),
             re.compile(r".*-%s(\d+)-" % re.escape(WORKDIR_PREFIX)))):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            match = owner.match(entry.name)
            if not match or process_exists(int(match.group(1))):
                continue
            try:
                ours = entry.is_dir(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_uid == os.getuid()
            except OSError:
                continue
            if ours and remove_tree(entry.path):
                removed += 1
    return removed


# The lifeline's whole program (see Lifeline). It runs as `python -I -S -c`: no site, no user paths.
LIFELINE_SOURCE = r"""
import os, signal
groups, pending = set(), b""
while True:
    data = os.read(0, 4096)
    if not data:
        break
    *lines, pending = (pending + data).split(b"\n")
    for line in lines:
        (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class Lifeline:
    """Ties the life of every `claude` child to the proxy's, however the proxy ends (kill -9 too).

    A small process of its own learns each child's process group on a pipe (+PGID
    when it starts, -PGID before it is reaped, so a reused pid is never named) and
    kills every group still listed when the pipe reaches end-of-file, which the
    kernel brings about when the proxy dies. It works alike on Linux and macOS.
    PR_SET_PDEATHSIG would not do: it is Linux-only and fires when the *thread*
    that started the child exits (request threads do); a preexec_fn is unsafe in a
    threaded server. A child costs two short writes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen] = None
        try:
            # A session of its own: a Ctrl-C meant for the proxy must not end it first.
            self._process = subprocess.Popen([sys.executable, "-I", "-S", "-c", LIFELINE_SOURCE],
                                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             start_new_session=True)
        except OSError as error:
            log.warning("children will outlive the proxy if it is killed: no lifeline (%s)", error)

    def hold(self, group: int) -> None:
        self._send(b"+%d\n" % group)

    def drop(self, group: int) -> None:
        self._send(b"-%d\n" % group)

    def close(self) -> None:
        """End the lifeline (it kills any group still held); the proxy's own shutdown is done."""
        with self._lock:
            self._end()

    def _send(self, line: bytes) -> None:
        with self._lock:
            if self._process is None:
                return
            try:
                os.write(self._process.stdin.fileno(), line)  # shorter than PIPE_BUF: one atomic write
            except OSError as error:
                log.warning("children will outlive the proxy if it is killed: the lifeline "
                            "(pid %d) is gone (%s)", self._process.pid, error)
                self._end()

    def _end(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ClientWatch:
    """The client of a turn, as the runtime watches it while Claude answers: fileno() turns
    readable when the client sends something or leaves, and left() says whether it left."""

    def fileno(self) -> int:
        raise NotImplementedError

    def left(self) -> bool:
        raise NotImplementedError


def binary_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """What tells a replaced (upgraded) `claude` from the one a pre-started process runs:
    installers write a new file, or point the symlink at one, and os.stat follows symlinks."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class ClaudeProcess:
    """One `claude -p` child in its own process group and throwaway directory.

    send() queues lines for its stdin, output() writes them as the CLI reads and
    yields the lines it prints, and close() reaps it, closes its pipes
    and removes its directory and session transcript. Its stdin stays open: the
    CLI answers one turn after another of one conversation, and a process is kept
    between turns (see Exchange), so what output() read but did not hand out yet
    waits for the next call. Only the thread that serves its turn calls those;
    any thread may call terminate(), which leaves the pipes alone.
    """

    STDERR_TAIL = 4096
    KILL_WAIT = 5.0  # how long terminate() waits for a killed child to go; one stuck in the kernel stays

    def __init__(self, launch: Launch, lifeline: Optional[Lifeline] = None) -> None:
        # Before the start: a binary replaced while it starts counts as replaced.
        self.binary = binary_identity(launch.argv[0])
        self.workdir = new_workdir()
        self.session_path: Optional[str] = None
        try:
            if launch.resume:
                self.session_path = session_file(self.workdir, dict(launch.env), launch.resume[0])
                write_private(self.session_path, launch.resume[1])
            self.popen = subprocess.Popen(
                list(launch.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=self.workdir, env=dict(launch.env),
                start_new_session=True, bufsize=0)
        except BaseException:
            self._remove_files()
            raise
        self.pid = self.popen.pid
        self.lifeline = lifeline
        if lifeline is not None:
            lifeline.hold(self.pid)  # its group is named after it
        os.set_blocking(self.popen.stdin.fileno(), False)  # writes wait in output(), under the timeouts
        self.started = time.monotonic()
        self.last_output = self.started
        self.stderr_tail = b""
        self._outbox: List[memoryview] = []
        self._partial: List[bytes] = []    # the pieces of a line not ended yet, joined once it ends
        self._lines: List[bytes] = []  # lines read and not handed out yet
        self._stdout_open = True
        self._stderr_open = True
        self._lock = threading.Lock()
        self._reaped = False
        self.closed = False

    def send(self, data: bytes) -> None:
        """Queue lines for stdin (none, for a turn that needs none); output() writes them as the
        CLI takes them. A turn starts now: a pre-started or kept process may have waited long."""
        self.last_output = time.monotonic()
        if data:
            self._outbox.append(memoryview(data))  # slices of a view copy nothing, however long

    def output(self, next_deadline: Callable[[], Tuple[float, ProxyError]],
               client: Optional[ClientWatch] = None, tick: Optional[float] = None) -> Iterator[Optional[bytes]]:
        """Yield each line the CLI prints (empty ones left out), until its stdout closes.

        next_deadline() gives the earliest moment to give up and the error to raise
        then; it is asked again after every read, so callers can move it. When
        `client` is given, a client that leaves raises ClientGone at once, even while
        the CLI is silent. With `tick`, None is yielded after each
        `tick` seconds in which the CLI printed nothing.
        """
        out, err, stdin = self.popen.stdout, self.popen.stderr, self.popen.stdin
        quiet_since = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(out, selectors.EVENT_READ)
            if self._stderr_open:
                selector.register(err, selectors.EVENT_READ)
            if client is not None:
                selector.register(client, selectors.EVENT_READ)
            writing = False
            while True:
                while self._lines:
                    yield self._lines.pop(0)
                if not self._stdout_open:
                    return
                if self._outbox and not writing and not stdin.closed:
                    selector.register(stdin, selectors.EVENT_WRITE)
                    writing = True
                deadline, error = next_deadline()
                now = time.monotonic()
                if deadline <= now:
                    raise error
                wait = deadline - now
                if tick is not None:
                    wait = min(wait, max(0.0, max(self.last_output, quiet_since) + tick - now))
                ready = selector.select(min(wait, 3600.0))
                now = time.monotonic()
                if tick is not None and now >= max(self.last_output, quiet_since) + tick:
                    quiet_since = now
                    yield None
                for key, _ in ready:
                    if key.fileobj is stdin:
                        if self._write_some():
                            selector.unregister(stdin)
                            writing = False
                    elif key.fileobj is client:
                        if client.left():
                            raise ClientGone()
                        # A pipelined request (not ours to read), or a half-close: it still reads.
                        selector.unregister(client)
                    elif key.fileobj is err:
                        data = os.read(key.fd, 65536)
                        if data:
                            self._keep_stderr(data)
                        else:
                            self._stderr_open = False
                            selector.unregister(err)
                    else:
                        self._take(os.read(key.fd, 65536))

    def _take(self, data: bytes) -> None:
        """Keep the lines of what stdout gave; end-of-file ends the last line too.

        Linear in a line's length: a read that does not end the line is only set aside.
        (Adding each read to what came before copied a long line over and over: a 20 MB
        line took seconds, while every other stream waited on the lock.)"""
        if not data:
            self._stdout_open = False
            lines, self._partial = [b"".join(self._partial)], []
        elif b"\n" not in data:
            self.last_output = time.monotonic()
            self._partial.append(data)
            return
        else:
            self.last_output = time.monotonic()
            pieces = data.split(b"\n")
            pieces[0] = b"".join(self._partial + pieces[:1])
            *lines, last = pieces
            self._partial = [last]
        # A blank line is parse_event_line's to pass over: stripping each here would copy it.
        self._lines.extend(line for line in lines if line)

    def _write_some(self) -> bool:
        """Write what stdin takes now; True once the queue is empty."""
        try:
            while self._outbox:
                written = os.write(self.popen.stdin.fileno(), self._outbox[0])
                self._outbox[0] = self._outbox[0][written:]
                if self._outbox[0]:
                    return False
                self._outbox.pop(0)
        except BlockingIOError:
            return False
        except OSError:
            self._outbox = []  # it died; output() sees its stdout close
        return True

    def _keep_stderr(self, data: bytes) -> None:
        self.stderr_tail = (self.stderr_tail + data)[-self.STDERR_TAIL:]

    def _drain_stderr(self) -> None:
        """Keep what is still in the stderr pipe, without waiting for more."""
        fd = self.popen.stderr.fileno()
        os.set_blocking(fd, False)  # a grandchild may hold the pipe open: never wait on it
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                self._keep_stderr(data)
        except OSError:
            pass

    def stderr_text(self) -> str:
        return self.stderr_tail.decode("utf-8", "replace").strip()

    def alive(self) -> bool:
        return not self._exited()

    def close(self, grace: float = 0.0) -> Optional[int]:
        """Close its stdin, give the child `grace` seconds to exit by itself, then kill what
        is left of its group, reap it and clean up. Returns its exit code (negative: a signal)."""
        with self._lock:
            if self.closed:
                return self.popen.returncode
            self.closed = True
        if grace <= 0:
            # Killed before its stdin closes: at end-of-input a CLI waiting on tool calls would
            # answer them itself, with an error, and send that upstream.
            self.terminate()
        try:
            self.popen.stdin.close()  # the CLI ends once its input does
        except OSError:
            pass
        deadline = time.monotonic() + grace
        while not self._exited() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._drain_stderr()
        self.terminate()
        for pipe in (self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        return self.popen.returncode

    def terminate(self) -> None:
        """Kill the child and everything it started, reap it, remove its files."""
        with self._lock:
            if self._reaped:
                return
            self._reaped = True
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the leader is not reaped yet: its pid is still ours
        except (ProcessLookupError, PermissionError):
            pass
        if self.lifeline is not None:
            self.lifeline.drop(self.pid)  # before the reap frees the pid for another process
        try:
            self.popen.wait(self.KILL_WAIT)
        except subprocess.TimeoutExpired:  # never hang a request or the shutdown on it
            log.error("claude pid %d did not exit within %g s of SIGKILL; left behind",
                      self.pid, self.KILL_WAIT)
        self._remove_files()

    def _remove_files(self) -> None:
        remove_tree(self.workdir)
        if self.session_path is not None:
            remove_tree(os.path.dirname(self.session_path))

    def _exited(self) -> bool:
        """Whether the child has exited, without reaping it where the OS has waitid
        (Linux; macOS from Python 3.13), so that its pid, which names the process group
        we kill, cannot be reused yet. Elsewhere poll() reaps, leaving a tiny window."""
        if self.popen.returncode is not None:
            return True
        if hasattr(os, "waitid"):
            try:
                return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                return True
        return self.popen.poll() is not None  # no waitid (macOS): poll reaps


def start_claude(launch: Launch, lifeline: Optional[Lifeline] = None) -> ClaudeProcess:
    """A new process for a request, or a 503 when the CLI cannot be started."""
    try:
        return ClaudeProcess(launch, lifeline)
    except OSError as error:
        missing = isinstance(error, FileNotFoundError) and error.filename == launch.argv[0]
        raise ProxyError(503, "Could not start %s: %s" % (launch.argv[0], error),
                         code="claude_not_found" if missing else "cli_start_failed")


# ---------------------------------------------------------------------------
# The pool: processes pre-started for a turn, and kept for a conversation's next
# ---------------------------------------------------------------------------

# The pause after a background thread's failure (the pool's, the probe's), doubled after each
# one that follows, up to the second: bounded work while something is wrong, soon back after.
RETRY_PAUSES = (5.0, 300.0)
FAULTS_REMEMBERED = 100  # a fault whose text changes each time (a pid, a path) is not kept forever
_faults_logged: Set[Tuple[str, str]] = set()
_faults_lock = threading.Lock()


def log_fault(where: str, error: Exception) -> None:
    """Log an unexpected exception of a background thread, which goes on: at ERROR with its
    traceback, once for each distinct fault (a retry that fails alike says nothing new)."""
    fault = (where, "%s: %s" % (type(error).__name__, error))
    with _faults_lock:
        if fault in _faults_logged:
            return
        if len(_faults_logged) >= FAULTS_REMEMBERED:
            _faults_logged.clear()
        _faults_logged.add(fault)
    log.error("%s failed, and is tried again: %s", where, fault[1], exc_info=error)


PoolKey = Union[Launch, str]  # a Launch to start a process for, or a kept conversation's key


class Warm:
    """A process waiting on stdin, the key it waits under, and for a kept conversation the
    session it holds."""

    def __init__(self, key: PoolKey, process: ClaudeProcess, session: Optional[Session] = None) -> None:
        self.key = key
        self.process = process
        self.session = session
        self.born = time.monotonic()


class WarmPool:
    """`claude` processes waiting for a turn, so a request skips the CLI's start-up.

    The CLI spends ~0.7 s starting, then waits on stdin; one started early with
    the argv and environment of a turn (its Launch) answers that turn within tens
    of milliseconds, the turn itself coming on stdin. Every request for a Launch that
    resumes no history queues a replacement for it. A process that has answered a
    turn may wait too, kept under its conversation's key for the turn that continues
    it (keep()).

    At most `size` processes wait at once; when full, the least recently used
    key gives way. A process that waited `ttl` seconds is retired; a Launch's is
    replaced if it was used within the last `ttl` seconds. One background thread
    starts and retires processes; a request's thread only takes or keeps one.
    """

    CHECK_INTERVAL = 5.0  # how long a warm process that died by itself may stay unreaped

    def __init__(self, size: int, ttl: float, lifeline: Optional[Lifeline] = None) -> None:
        self.size = max(0, size)
        self.ttl = ttl
        self.lifeline = lifeline
        self.hits = 0
        self.misses = 0
        self.continued = 0  # turns a kept conversation's process answered
        self._idle: List[Warm] = []  # oldest first
        self._wanted: List[Launch] = []  # keys to start a process for, in order
        self._last_used: Dict[PoolKey, float] = {}  # keys used within the last ttl
        self._closed = False
        self._changed = threading.Condition()
        self._maintainer: Optional[threading.Thread] = None
        if self.size:
            self._maintainer = threading.Thread(target=self._maintain, name="warm-pool", daemon=True)
            self._maintainer.start()

    # -- used by requests --------------------------------------------------------

    def take(self, key: PoolKey, claude: str) -> Optional[Warm]:
        """A live process waiting under this key and running the `claude` that is there now,
        or None; for a Launch, a replacement is queued either way. Nothing is started ahead for
        a Launch that resumes a history: it would serve only a retry of that very turn."""
        if not self.size or isinstance(key, Launch) and key.resume:
            return None
        binary = binary_identity(claude)
        found: Optional[Warm] = None
        unfit: List[ClaudeProcess] = []
        with self._changed:
            if self._closed:
                return None
            for warm in [warm for warm in self._idle if warm.key == key]:
                self._idle.remove(warm)
                if warm.process.binary == binary and warm.process.alive():
                    found = warm
                    break
                unfit.append(warm.process)
            if isinstance(key, Launch):
                self.hits += found is not None
                self.misses += found is None
                self._want(key)
            else:
                self.continued += found is not None
        for process in unfit:
            process.close()  # died while waiting, or runs a replaced claude; the request starts anew
        return found

    def keep(self, key: str, process: ClaudeProcess, session: Session) -> bool:
        """Let a process that answered a turn, and its session, wait for the turn continuing
        its conversation; False when there is no room (the caller ends it)."""
        with self._changed:
            if not self.size or self._closed:
                return False
            self._last_used[key] = time.monotonic()
            doomed: List[Warm] = []
            if not self._room_for_kept(doomed):
                return False
            self._idle.append(Warm(key, process, session))
            self._changed.notify()
        for warm in doomed:
            warm.process.close()
        return True

    def prewarm(self, key: Launch) -> None:
        """Start a process for a key no request has used yet (the default one, at start-up)."""
        if self.size:
            with self._changed:
                self._want(key)

    def stats(self) -> Dict[str, int]:
        with self._changed:
            return {"size": len(self._idle), "max": self.size, "hits": self.hits,
                    "misses": self.misses, "conversations": sum(not isinstance(w.key, Launch) for w in self._idle),
                    "continued": self.continued}

    def close(self) -> None:
        """Kill every waiting process; one being started is killed as soon as it exists."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify()
        for warm in idle:
            warm.process.close()
        if self._maintainer is not None and self._maintainer is not threading.current_thread():
            self._maintainer.join(5.0)

    def _want(self, key: Launch) -> None:
        self._last_used[key] = time.monotonic()
        self._wanted.append(key)
        del self._wanted[:-self.size]  # a burst of requests must not queue more than can wait
        self._changed.notify()

    # -- the background thread ---------------------------------------------------

    def _maintain(self) -> None:
        """Start what is wanted and retire what is done, until the pool closes. A fault of
        its own is logged and its key tried again after a pause (RETRY_PAUSES): the thread
        must not end, or nothing would be pre-started again."""
        pause = RETRY_PAUSES[0]
        while True:
            key: Optional[Launch] = None
            try:
                with self._changed:
                    if not self._wanted and not self._closed:
                        self._changed.wait(self._time_to_next_check())
                    if self._closed:
                        return
                    doomed = self._retire(time.monotonic())
                    key = self._reserve_next(doomed)
                for warm in doomed:
                    warm.process.close()
                if key is not None:
                    self._start(key)
                pause = RETRY_PAUSES[0]
            except Exception as error:
                log_fault("the warm pool", error)
                with self._changed:
                    if key is not None:
                        self._wanted.insert(0, key)
                    if not self._closed:
                        self._changed.wait(pause)
                pause = min(pause * 2, RETRY_PAUSES[1])

    def _time_to_next_check(self) -> Optional[float]:
        if not self._idle:
            return None  # nothing waits, so nothing can expire or die
        expires = self._idle[0].born + self.ttl - time.monotonic()
        return max(0.0, min(expires, self.CHECK_INTERVAL))

    def _retire(self, now: float) -> List[Warm]:
        """Take out processes that died or waited ttl; queue the expired ones' keys still in use."""
        self._last_used = {key: used for key, used in self._last_used.items() if now - used < self.ttl}
        kept: List[Warm] = []
        retired: List[Warm] = []
        for warm in self._idle:
            if not warm.process.alive():
                retired.append(warm)  # not replaced: a CLI that dies at start would just die again
            elif now - warm.born >= self.ttl:
                retired.append(warm)
                if isinstance(warm.key, Launch) and warm.key in self._last_used:
                    self._wanted.append(warm.key)
            else:
                kept.append(warm)
        self._idle = kept
        return retired

    def _reserve_next(self, doomed: List[Warm]) -> Optional[Launch]:
        """The next wanted key there is room for, evicting into `doomed` when full."""
        while self._wanted:
            key = self._wanted.pop(0)
            if self._room_for_started(key, doomed):
                return key
        return None

    # Two policies, one per kind of waiting process. Kept conversations hold at most size - 1
    # places (the one place, at size 1), so a pre-started process can always wait too: clients
    # that never continue a conversation would otherwise fill the pool with theirs. A pre-started
    # process never takes a kept one's place: a conversation's process holds its warm prompt
    # cache, a pre-started one saves only the CLI's start.

    def _room_for_kept(self, doomed: List[Warm]) -> bool:
        """Make a place for a conversation just kept, moving what gives way into `doomed`: past
        its share, the least recently used kept one; in a full pool, the least recently used
        pre-started one."""
        kept = [warm for warm in self._idle if not isinstance(warm.key, Launch)]
        if len(kept) >= max(1, self.size - 1):
            return self._evict(kept, doomed)
        if len(self._idle) < self.size:
            return True
        return self._evict([warm for warm in self._idle if isinstance(warm.key, Launch)], doomed)

    def _room_for_started(self, key: Launch, doomed: List[Warm]) -> bool:
        """Make a place for a process pre-started for `key`: in a full pool, a pre-started one
        for a key used less lately gives way; False when none does."""
        if len(self._idle) < self.size:
            return True
        used = self._last_used.get(key, float("-inf"))
        return self._evict([warm for warm in self._idle if isinstance(warm.key, Launch)
                            and self._last_used.get(warm.key, float("-inf")) < used], doomed)

    def _evict(self, candidates: List[Warm], doomed: List[Warm]) -> bool:
        """Move the least recently used of `candidates` into `doomed`; False when there is none."""
        if not candidates:
            return False
        victim = min(candidates, key=lambda warm: self._last_used.get(warm.key, float("-inf")))
        self._idle.remove(victim)
        doomed.append(victim)
        return True

    def _start(self, key: Launch) -> None:
        process: Optional[ClaudeProcess] = None
        try:
            process = start_claude(key, self.lifeline)
        except ProxyError as error:
            log.warning("nothing pre-started: %s", error.message)
        doomed: List[Warm] = []
        with self._changed:
            # A conversation kept while it started may have taken the place made for it.
            if process is not None and not self._closed and self._room_for_started(key, doomed):
                self._idle.append(Warm(key, process))
                process = None
        for warm in doomed:
            warm.process.close()
        if process is not None:
            process.close()  # the pool closed, or filled, while it started


# ---------------------------------------------------------------------------
# Probes: whether a `claude` can take a conversation, and is logged in
# ---------------------------------------------------------------------------

# The proxy relies on Claude Code's control protocol (initialize, mcp_set_servers and the MCP
# messages that follow), first there in the 2.1 releases; an older CLI gets a clear error.
PROBE_TIMEOUT = 20.0


class Probe:
    """The probes of one `claude` file: none yet (pending), or the latest result. A failure
    that is not the binary's (a timeout on a loaded machine, a failed start), or a CLI not
    logged in yet, is probed again once its pause has passed, the pause doubling from
    RETRY_PAUSES[0] up to RETRY_PAUSES[1]."""

    def __init__(self) -> None:
        self.result: Optional[ProbeResult] = None
        self.running = False
        self.pause = RETRY_PAUSES[0]
        self.retry_at = 0.0

    @property
    def state(self) -> str:
        if self.result is None:
            return "pending"
        return "ok" if self.result.problem is None else "failed"

    @staticmethod
    def transient(result: ProbeResult) -> bool:
        """Whether what the result found wrong may right itself, the binary unchanged."""
        return not result.lasting and (result.problem is not None or result.logged_in is False)

    def due(self, now: float) -> bool:
        """Whether a probe should start now (the caller then sets `running`)."""
        if self.running:
            return False
        return self.result is None or self.transient(self.result) and now >= self.retry_at

    def done(self, result: ProbeResult, now: float) -> None:
        self.result, self.running = result, False
        if self.transient(result):
            self.retry_at = now + self.pause
            self.pause = min(self.pause * 2, RETRY_PAUSES[1])


def unsupported(claude: str, result: ProbeResult) -> str:
    return "This Claude Code (%s) cannot take a conversation natively: %s. Upgrade it: %s" % (
        claude, result.problem, UPGRADE_HELP)


def claude_problems(claude: str, probe: Probe) -> List[str]:
    """What the probe found wrong with this `claude`, each with its fix."""
    result = probe.result
    if result is None:
        return []
    if result.lasting:
        return [unsupported(claude, result)]
    if result.problem is not None:
        return ["The proxy could not check Claude Code (%s): %s. It tries again within %d s; if "
                "that fails too, run `claude` in a terminal to see why." % (
                    claude, result.problem, max(0, math.ceil(probe.retry_at - time.monotonic())))]
    return [NOT_LOGGED_IN] if result.logged_in is False else []


def probe_native(path: str, config: Config, lifeline: Optional[Lifeline] = None) -> ProbeResult:
    """Run this `claude` through a ProbeSession: started as a turn's would be, within PROBE_TIMEOUT."""
    probe = ProbeSession()
    try:
        process = start_claude(cli_launch(path, probe.turn, config, []), lifeline)
    except ProxyError as error:
        return ProbeResult(error.message)
    process.send(probe.begin())
    deadline = time.monotonic() + PROBE_TIMEOUT
    timeout = ProxyError(504, "it did not ask for the tools within %g s" % PROBE_TIMEOUT)
    try:
        for printed in process.output(lambda: (deadline, timeout)):
            answer, result = probe.receive(parse_event_line(printed or b""))
            if answer:
                process.send(answer)
            if result is not None:
                return result
        return ProbeResult("it exited (code %s) without asking for the tools: %s" % (
            process.close(), process.stderr_text()[-300:] or "nothing on stderr"), True)
    except ProxyError as error:
        return ProbeResult(error.message)  # a timeout: a loaded machine may start it slowly
    finally:
        process.close()


class Probes:
    """What the proxy knows of each `claude` file, by its path and modification time (an
    upgrade is a new file): the probe of whether it can take a conversation, and its version.

    probe() starts a probe when due: the first time, again when the file changes, and after a
    transient failure once its pause is over. With `wait` a due probe runs in the caller's
    thread, one running elsewhere is waited for, and the result is there on return; without,
    it runs in the background (a problem is logged), and the Probe says what is known so far.
    A `claude` is probed with the environment a turn's gets from `config` (a key it may keep).
    """

    def __init__(self, config: Optional[Config] = None) -> None:
        self.config = config if config is not None else Config()
        self.lifeline: Optional[Lifeline] = None  # the runner's, once open: a probe's child dies with the proxy
        self._probes: Dict[Tuple[str, float], Probe] = {}
        self._versions: Dict[Tuple[str, float], Optional[str]] = {}
        self._changed = threading.Condition()  # a probe ended
        self._asking_version = threading.Lock()  # one `claude --version` at a time, then its answer kept

    def probe(self, path: str, wait: bool = True) -> Probe:
        try:
            key = (path, os.stat(path).st_mtime)
        except OSError:
            probe = Probe()
            probe.result = ProbeResult("not found", lasting=True)
            return probe
        with self._changed:
            probe = self._probes.setdefault(key, Probe())
            due = probe.due(time.monotonic())
            probe.running = probe.running or due
            while wait and not due and probe.running:
                self._changed.wait()  # bounded by PROBE_TIMEOUT
        if due and wait:
            self._run(path, probe)
        elif due:
            threading.Thread(target=self._run, args=(path, probe), name="probe", daemon=True).start()
        return probe

    def version(self, path: str) -> Optional[str]:
        """`claude --version`, asked again only when the file changes."""
        try:
            key = (path, os.stat(path).st_mtime)
        except OSError:
            return None
        with self._asking_version:
            if key not in self._versions:
                try:
                    done = subprocess.run([path, "--version"], capture_output=True, timeout=15,
                                          env=cli_env(self.config), stdin=subprocess.DEVNULL)
                    self._versions[key] = done.stdout.decode("utf-8", "replace").strip() or None
                except (OSError, subprocess.SubprocessError):
                    self._versions[key] = None
            return self._versions[key]

    def _run(self, path: str, probe: Probe) -> None:
        """Probe and record the result; a fault of the proxy's own is logged and retried like a timeout."""
        try:
            result = probe_native(path, self.config, self.lifeline)
        except Exception as error:
            log_fault("the probe of %s" % path, error)
            result = ProbeResult("the proxy's own check failed (%s); see its log" % error)
        now = time.monotonic()
        with self._changed:
            probe.done(result, now)
            self._changed.notify_all()
        if result.lasting:
            log.warning("%s cannot take a conversation natively (%s); requests will fail until it is "
                        "upgraded: %s", path, result.problem, UPGRADE_HELP)
        elif result.problem is not None:
            log.warning("the check of %s failed (%s); tried again after %g s", path, result.problem,
                        probe.retry_at - now)
        elif result.logged_in is False:
            log.warning(NOT_LOGGED_IN)


# ---------------------------------------------------------------------------
# The runner: the slots, the pool, the lifeline and the probes, for the core
# ---------------------------------------------------------------------------

class Slot:
    """A place among --max-concurrent running children; a 429 when none frees in time."""

    def __init__(self, semaphore: threading.BoundedSemaphore, timeout: float) -> None:
        self.semaphore = semaphore
        self.timeout = timeout
        self.held = False

    def __enter__(self) -> "Slot":
        if not self.semaphore.acquire(timeout=self.timeout):
            raise ProxyError(429, "Too many requests at once: every one of the proxy's claude slots "
                             "stayed busy for %g s (--max-concurrent, --queue-timeout)."
                             % self.timeout, code="too_many_requests", headers={"Retry-After": "5"})
        self.held = True
        return self

    def release(self) -> None:
        """Give the place back, once: a finished turn does so early, before its process exits."""
        if self.held:
            self.held = False
            self.semaphore.release()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def shutting_down() -> ProxyError:
    return ProxyError(503, "The proxy is shutting down.", code="shutting_down")


class Runner:
    """The runtime under the core: every `claude` child of the proxy and what starts, keeps and
    ends them: the --max-concurrent slots, the pool of pre-started and kept processes, the
    lifeline that takes the children with the proxy, and the probes of the `claude` binary.

    Built inert, with nothing pre-started; open() starts it once the port is the proxy's (a proxy
    that cannot start touches nothing), close() ends every child, and no process starts after it.
    Requests' threads call the rest.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.probes = Probes(config)
        self.lifeline: Optional[Lifeline] = None
        self.pool = WarmPool(0, config.pool_ttl)  # open() replaces it with the configured one
        self._slots = threading.BoundedSemaphore(max(1, config.max_concurrent))
        self._children: Dict[int, ClaudeProcess] = {}
        self._lock = threading.Lock()
        self._opened = False
        self._closing = False

    def open(self) -> None:
        """Clean up after proxies that did not exit cleanly, then pre-start what a first turn of
        the default model needs and probe the `claude` there, before a request needs either.
        Once only, and never after close()."""
        with self._lock:
            if self._opened or self._closing:
                return
            self._opened = True
            abandoned = remove_abandoned_workdirs()
            self.lifeline = self.probes.lifeline = Lifeline()
            self.pool = WarmPool(self.config.pool_size, self.config.pool_ttl, self.lifeline)
        if abandoned:
            log.info("removed %d working directories left by proxies that did not exit cleanly", abandoned)
        claude = find_claude(self.config.claude_bin)
        if claude is None:
            return
        self.probes.probe(claude, wait=False)
        try:
            cli_model = resolve_model("", self.config.default_model)
        except ProxyError as error:
            log.warning("nothing pre-started: %s", error.message)
            return
        turn = Turn(self.config.default_model, cli_model, Conversation(DEFAULT_SYSTEM_PROMPT, [], []))
        self.pool.prewarm(cli_launch(claude, turn, self.config, []))

    @property
    def closing(self) -> bool:
        return self._closing

    def slot(self) -> Slot:
        return Slot(self._slots, self.config.queue_timeout)

    def claude(self) -> str:
        """The `claude` a turn runs; a 503 when it is not there, or is probed unable to take a
        conversation (the probe runs in the background, again after an upgrade or a transient
        failure: a request finds out any other trouble for itself)."""
        claude = find_claude(self.config.claude_bin)
        if claude is None:
            raise claude_not_found(self.config.claude_bin)
        result = self.probes.probe(claude, wait=False).result
        if result is not None and result.lasting:
            raise ProxyError(503, unsupported(claude, result), code="claude_unsupported")
        return claude

    def start(self, launch: Launch) -> Tuple[ClaudeProcess, str]:
        """A process for a turn and its origin: "warm" (pre-started by the pool), or "cold"."""
        if self._closing:
            raise shutting_down()
        warm = self.pool.take(launch, launch.argv[0])
        origin = "warm" if warm is not None else "cold"
        process = warm.process if warm is not None else start_claude(launch, self.lifeline)
        log.debug("claude pid %d (%s)", process.pid, origin)
        return self._adopt(process), origin

    def take_kept(self, key: str, claude: str) -> Optional[Tuple[ClaudeProcess, Session]]:
        """The kept process, and its session, of the conversation a turn continues, if still there."""
        warm = self.pool.take(key, claude)
        if warm is None:
            return None
        assert warm.session is not None  # what waits under a conversation's key holds its session
        log.debug("claude pid %d (continues its conversation)", warm.process.pid)
        return self._adopt(warm.process), warm.session

    def keep(self, key: str, process: ClaudeProcess, session: Session) -> bool:
        """Let a process and its session wait for their conversation's next turn; False when
        there is no room (the caller ends the process)."""
        self._release(process)  # first: once in the pool, another request may take it
        return self.pool.keep(key, process, session)

    def end(self, process: ClaudeProcess, grace: float = 0.0) -> None:
        """End a process a turn had, giving it `grace` seconds to exit by itself."""
        self._release(process)
        process.close(grace)

    def active_children(self) -> List[int]:
        with self._lock:
            return sorted(self._children)

    def report(self) -> Dict[str, Any]:
        """The `claude` there and what its probe found, the children and the pool, for /health;
        `problems` says what is wrong with the `claude`, each with its fix. Asking retries a
        probe that is due."""
        claude = find_claude(self.config.claude_bin)
        probe = None if claude is None else self.probes.probe(claude, wait=False)
        result = None if probe is None else probe.result
        problems = [claude_not_found(self.config.claude_bin).message] if claude is None else \
            claude_problems(claude, probe)
        return {
            "problems": problems,
            "claude": {"found": claude is not None, "path": claude,
                       "version": self.probes.version(claude) if claude else None,
                       "probe": None if probe is None else probe.state,
                       "problem": None if result is None else result.problem,
                       "native": None if result is None else not result.lasting,
                       "logged_in": None if result is None else result.logged_in},
            "active_children": len(self.active_children()),
            "max_concurrent": self.config.max_concurrent,
            "pool": self.pool.stats(),
        }

    def close(self) -> None:
        """End every child: the pool's at once, the requests' by a signal (each request's thread
        still reads its process, and closes it); no process starts after."""
        with self._lock:
            self._closing = True
            children = list(self._children.values())
            pool, lifeline = self.pool, self.lifeline
        pool.close()
        for process in children:
            process.terminate()
        if lifeline is not None:
            lifeline.close()

    def _adopt(self, process: ClaudeProcess) -> ClaudeProcess:
        with self._lock:
            if not self._closing:
                self._children[process.pid] = process
                return process
        process.close()
        raise shutting_down()

    def _release(self, process: ClaudeProcess) -> None:
        with self._lock:
            if self._children.get(process.pid) is process:  # its pid may be a new child's already
                del self._children[process.pid]


# ---------------------------------------------------------------------------
# Image fetching (--fetch-images): public addresses only, pinned, bounded
# ---------------------------------------------------------------------------

def read_before(response: http.client.HTTPResponse, deadline: float, limit: int) -> bytes:
    """The response body, refused when it is larger than `limit` or slower than `deadline`.
    It grows in a bytearray: adding to bytes copies all so far, quadratic (20 MiB took 19 s)."""
    body = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise invalid("The image took longer than %g s to download." % IMAGE_FETCH_TIMEOUT,
                          code="image_fetch_failed")
        data = response.read1(65536)
        if not data:
            return bytes(body)
        if len(body) + len(data) > limit:
            raise invalid("The image is larger than %d bytes." % limit, code="image_too_large")
        body += data


def pinned_connection(host: str, address: str, port: int, secure: bool) -> http.client.HTTPConnection:
    """An HTTP(S) connection to `address` that still names and verifies `host`."""
    base = http.client.HTTPSConnection if secure else http.client.HTTPConnection

    class Pinned(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            self.sock = socket.create_connection((address, port), IMAGE_FETCH_TIMEOUT)
            if secure:
                self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)

    return Pinned(host, port, timeout=IMAGE_FETCH_TIMEOUT)


# IPv6 ranges that carry an IPv4 address in their last 32 bits (NAT64, IPv4-compatible).
IPV4_CARRIERS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and any(ip in network for network in IPV4_CARRIERS):
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None and not is_public_address(str(inner)):
            return False
    return ip.is_global and not ip.is_multicast


def fetch_image(url: str, limit: int = IMAGE_FETCH_LIMIT,
                allow: Optional[Callable[[str], bool]] = None) -> Tuple[str, bytes]:
    """(media type, bytes) of a remote image, for --fetch-images.

    Only public addresses are fetched, and the connection goes to the very
    address that was checked, so DNS cannot swap in a private one afterwards.
    Redirects are not followed. Size (`limit` bytes) and total time are capped.
    """
    allow = allow or is_public_address
    deadline = time.monotonic() + IMAGE_FETCH_TIMEOUT
    try:
        parts = urllib.parse.urlsplit(url)
        host, secure = parts.hostname or "", parts.scheme.lower() == "https"
        port = parts.port or (443 if secure else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not all(allow(info[4][0]) for info in infos):
            raise invalid("Images are only fetched from public addresses; %s is not one." % host,
                          code="image_url_not_allowed")
        connection = pinned_connection(host, infos[0][4][0], port, secure)
        try:
            connection.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                               headers={"Host": host if parts.port is None else "%s:%d" % (host, port),
                                        "User-Agent": "claude-max-proxy"})
            response = connection.getresponse()
            if response.status != 200:
                raise invalid("Fetching %s gave HTTP %d." % (url, response.status),
                              code="image_fetch_failed")
            raw = read_before(response, deadline, limit)
        finally:
            connection.close()
    except (OSError, ValueError, http.client.HTTPException) as error:  # UnicodeError is a ValueError
        raise invalid("Fetching %s failed: %s" % (url, error), code="image_fetch_failed")
    media_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    return media_type, raw


# ---------------------------------------------------------------------------
# The conversation as the CLI takes it: argv, session transcript, stdin lines
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Usage limits: what the CLI reported of each plan window
# ---------------------------------------------------------------------------

class UsageLimits:
    """The latest report on each usage window, shared by every request of one core.

    It feeds the response headers, /health and `status`, and decides two refusals before
    a claude starts: a window used up with no extra usage to fall back on (429 until its
    reset), and with --no-extra-usage, extra usage being spent or about to be (403).
    """

    def __init__(self) -> None:
        self._windows: Dict[str, LimitWindow] = {}
        self._lock = threading.Lock()

    def record(self, window: LimitWindow) -> None:
        """Take in the latest report on a window (see rate_limit_info)."""
        with self._lock:
            billed_before = any(w.bills_extra() for w in self._current(time.time()))
            self._windows[window.name] = window
        if window.bills_extra() and not billed_before:
            log.warning("extra usage has started: Claude Code reports answers billed beyond your plan "
                        "(%s, extra usage %s)%s", window.title(), window.extra_usage or "status unknown",
                        self._until(window))

    def check(self, no_extra_usage: bool) -> None:
        """Raise the refusal a new request gets now, if any."""
        now = time.time()
        with self._lock:
            windows = self._current(now)
        used_up = [w for w in windows if w.refuses()]
        if used_up:  # the request must wait for the last of them
            raise limit_reached(max(used_up, key=lambda w: w.resets_at or 0), now)
        billing = [w for w in windows if w.bills_extra()]
        if no_extra_usage and billing:
            raise ProxyError(
                403, "Refused by --no-extra-usage: Claude Code reports that extra usage, billed beyond "
                "your plan, is in use for your Claude %s%s. Wait until then, or restart the proxy "
                "without --no-extra-usage to pay for it." % (billing[0].title(), self._until(billing[0])),
                code="extra_usage_refused")

    def explain(self, error: ProxyError) -> ProxyError:
        """An upstream 429 while a window is used up becomes that window's 429."""
        if error.status != 429:
            return error
        now = time.time()
        with self._lock:
            used_up = [w for w in self._current(now) if w.used_up()]
            if not used_up:
                return error
            window = max(used_up, key=lambda w: w.resets_at or 0)
            # Refused although extra usage was reported available: it is not, until the reset.
            self._windows[window.name] = window._replace(extra_usage="rejected", extra_usage_in_use=False)
        return limit_reached(window, now, error.message)

    def headers(self) -> Dict[str, str]:
        """The state for every response: the most constraining window, then each one."""
        with self._lock:
            windows = sorted(self._current(time.time()), key=lambda w: w.name)
        if not windows:
            return {}
        worst = max(windows, key=lambda w: (STATUS_RANK.get(w.status, 0), w.utilization or 0))
        extra = "in_use" if any(w.bills_extra() for w in windows) else \
            next((w.extra_usage for w in [worst] + windows if w.extra_usage), None)
        headers = self._window_headers(RATELIMIT_HEADER, worst)
        headers[RATELIMIT_HEADER + "window"] = worst.name
        if extra:
            headers[RATELIMIT_HEADER + "extra-usage"] = extra
        for window in windows:
            prefix = RATELIMIT_HEADER + window.name.replace("_", "-") + "-"
            headers.update(self._window_headers(prefix, window))
        return headers

    def health(self) -> Dict[str, Any]:
        with self._lock:
            windows = sorted(self._current(time.time()), key=lambda w: w.name)
        return {
            "extra_usage_in_use": any(w.bills_extra() for w in windows),
            "windows": {w.name: {
                "status": w.status, "utilization": w.utilization,
                "resets_at": utc_iso(w.resets_at) if w.resets_at else None,
                "resets_at_unix": int(w.resets_at) if w.resets_at else None,
                "extra_usage": w.extra_usage, "extra_usage_in_use": w.bills_extra()} for w in windows},
        }

    def _current(self, now: float) -> List[LimitWindow]:
        """The windows whose reports still hold; a report past its reset is forgotten."""
        for name in [name for name, w in self._windows.items() if not w.current(now)]:
            del self._windows[name]
        return list(self._windows.values())

    @staticmethod
    def _window_headers(prefix: str, window: LimitWindow) -> Dict[str, str]:
        headers = {prefix + "status": window.status}
        if window.resets_at:
            headers[prefix + "reset"] = "%d" % window.resets_at
        if window.utilization is not None:
            headers[prefix + "utilization"] = "%g" % window.utilization
        return headers

    @staticmethod
    def _until(window: LimitWindow) -> str:
        return " until %s (UTC)" % utc_iso(window.resets_at) if window.resets_at else ""


# ---------------------------------------------------------------------------
# Stores: responses for previous_response_id, thinking for cold resumes
# ---------------------------------------------------------------------------

class BoundedStore:
    """Values by key: at most `count` of them, and `size` bytes in all (each value's size as the
    caller gives it: the bytes of the compact JSON it holds); the least recently used go first.
    In memory: they go with the proxy."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self._entries: Dict[str, Tuple[Any, int]] = {}  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, key: str, value: Any, size: int) -> bool:
        """Keep a value of `size` bytes, in place of any under its key; False (nothing kept,
        nothing lost) when it is larger than the whole store."""
        if size > self.size:
            return False
        with self._lock:
            _, replaced = self._entries.pop(key, (None, 0))
            self._entries[key] = (value, size)
            self._bytes += size - replaced
            while len(self._entries) > self.count or self._bytes > self.size:
                _, dropped = self._entries.pop(next(iter(self._entries)))
                self._bytes -= dropped
        return True

    def get(self, key: str) -> Any:
        """The value under `key`, now the most recently used, or None."""
        with self._lock:
            found = self._entries.pop(key, None)
            if found is None:
                return None
            self._entries[key] = found  # the most recently used now
            return found[0]

    def delete(self, key: str) -> bool:
        with self._lock:
            found = self._entries.pop(key, None)
            if found is not None:
                self._bytes -= found[1]
            return found is not None


# Thinking kept for tool loops resumed cold (ThinkingStore). An entry is one reply's thinking
# before a call: a few KB, up to the thinking budget. A thousand covers the loops a busy
# proxy has under way at once (an entry matters only until its loop's next turn); the
# bytes cap the worst case of many long ones.
THINKING_STORE_COUNT = 1000
THINKING_STORE_BYTES = 16 * MIB


class ThinkingStore(BoundedStore):
    """Claude's recent thinking blocks (a BoundedStore): each run of them by the id of the tool
    call it came before, the model that gave each block by its signature, and the model each
    --model value last ran as.

    Chat and Responses clients cannot send thinking back (they have no place for its
    signature), so a tool loop whose kept process is gone resumes with tool_use blocks
    alone, which Anthropic may refuse while thinking is on. restore() puts the thinking
    back where it stood, so a resumed history is the one the kept process would have sent.
    And a resumed CLI drops signed thinking from an assistant message unless the message
    names the model it runs (signatures are the model's): restore() names the model that
    gave it, for thinking a client sent back too; thinking it never saw (given before a
    restart) is taken for the model the CLI runs now, when that is known. If that is
    wrong, Anthropic refuses the signature and the CLI asks again without the thinking.
    """

    def __init__(self, count: int = THINKING_STORE_COUNT, size: int = THINKING_STORE_BYTES) -> None:
        super().__init__(count, size)

    def put(self, cli_model: str, model: Optional[str], blocks: List[Dict[str, Any]]) -> None:
        """Keep a reply's thinking, given the --model it ran with and the model that gave it
        (without one, a resumed CLI would drop it anyway). A run larger than the store is not
        kept: a resume goes without it, as it would anyway."""
        if model is None:
            return
        self.add("runs:" + cli_model, model, len(cli_model) + len(model))
        thinking: List[Dict[str, Any]] = []
        for block in blocks:
            if block["type"] == "thinking" and block["signature"]:
                thinking.append(block)
                self.add("signature:" + block["signature"], model, len(block["signature"]) + len(model))
            elif block["type"] == "tool_use" and thinking:
                data = json.dumps(thinking, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                self.add("call:" + block["id"], data, len(data))  # held as counted (see ResponseStore)
                thinking = []

    def restore(self, messages: List[Dict[str, Any]], insert: bool, cli_model: str) -> List[Dict[str, Any]]:
        """The messages for a transcript resumed with this --model: with `insert`, an assistant
        message that holds no thinking gets its calls' kept thinking back, each run before the
        text that leads up to its call, as Claude gave it; and one that holds thinking names
        the model that gave it ("model"). Thinking a message holds is the client's as it is;
        the list given is not changed."""
        # A full id is the model the CLI runs (less its context size, as in claude-opus-4-8[1m]).
        runs = self.get("runs:" + cli_model) or (
            re.sub(r"\[\d+m\]", "", cli_model, flags=re.I) if cli_model.startswith("claude-") else None)
        restored = []
        for message in messages:
            content = message["content"]
            if message["role"] != "assistant":
                restored.append(message)
                continue
            if insert and not any(b["type"] in ("thinking", "redacted_thinking") for b in content):
                content = self._with_thinking(content)
            signed = [b["signature"] for b in content if b["type"] == "thinking" and b["signature"]]
            models = [self.get("signature:" + signature) for signature in signed]
            model = next((model for model in models if model is not None), runs if signed else None)
            restored.append(message if model is None else dict(message, content=content, model=model))
        return restored

    def _with_thinking(self, content: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        blocks: List[Dict[str, Any]] = []
        for block in content:
            data = self.get("call:" + block["id"]) if block["type"] == "tool_use" else None
            if data is not None:
                thinking = json.loads(data)
                at = len(blocks)
                while at and blocks[at - 1]["type"] == "text":
                    at -= 1
                blocks[at:at] = thinking
            blocks.append(block)
        return blocks


class ResponseStore(BoundedStore):
    """The newest responses, by id (a BoundedStore).

    Each is held as its compact JSON, the only copy, so the bytes counted are the bytes held:
    parsed, the same conversation takes several times its JSON's size (nine times, of many
    small values), which a cap on the text would not see. `get` parses a fresh copy that
    nobody else holds or changes.
    """

    def __init__(self, count: int = RESPONSE_STORE_COUNT, size: int = RESPONSE_STORE_BYTES) -> None:
        super().__init__(count, size)

    def put(self, entry: StoredResponse) -> None:
        data = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if not self.add(entry.response["id"], data, len(data)):
            log.info("response %s is not kept: its conversation is larger than the store (%d bytes)",
                     entry.response["id"], self.size)

    def get(self, response_id: str) -> Optional[StoredResponse]:
        data = super().get(response_id)
        return None if data is None else StoredResponse(*json.loads(data))


# ---------------------------------------------------------------------------
# The exchange: one turn through one claude process
# ---------------------------------------------------------------------------

KEEPALIVE_INTERVAL = 15.0  # seconds of silence after which a stream shows it is alive


class Exchange:
    """One turn through one `claude` process: from the turn to the session's events.

    A conversation's process is kept between its turns (keep): when a reply ends
    with calls to the client's tools, the CLI waits for their results, and after
    an answer, for the next user message. A request that continues exactly that
    conversation takes the process back, so its turn is warm and its prompt a strict
    extension of the previous one: the prompt cache hits all of it. Any other turn
    starts a process (a pre-started one when the pool has it) that resumes the
    history from a session transcript.
    """

    def __init__(self, runner: Runner, limits: UsageLimits, thinking: ThinkingStore, turn: Turn,
                 claude: str, client: Optional[ClientWatch] = None, whole: bool = False,
                 restore_thinking: bool = False) -> None:
        self.runner = runner
        self.config = runner.config
        self.limits = limits
        self.thinking = thinking
        self.turn = turn
        self.claude = claude
        self.client = client
        self.whole = whole
        # The client cannot send thinking back, so the ThinkingStore puts it back in a history
        # this turn resumes.
        self.restore_thinking = restore_thinking
        self.process: Optional[ClaudeProcess] = None
        self.session: Optional[Session] = None
        # Its process's origin: "kept" (its conversation's, from the turn before), "warm"
        # (pre-started by the pool) or "cold" (started for it); None until it has one.
        self.origin: Optional[str] = None

    def events(self) -> Iterator[Optional[SessionEvent]]:
        """The reply's block events as they come, then End; None after each KEEPALIVE_INTERVAL
        of silence. A turn cut short ends its process before End is given, or the CLI would go
        on spending the subscription on text nobody reads."""
        try:
            process, session = self._begin()
            for line in process.output(self._deadlines(process, session), self.client, KEEPALIVE_INTERVAL):
                if line is None:
                    yield None
                    continue
                for event in session.receive(parse_event_line(line), time.monotonic()):
                    if isinstance(event, Send):
                        process.send(event.data)
                    elif isinstance(event, Limits):
                        self.limits.record(event.window)
                    else:
                        if isinstance(event, End) and session.state == CUT:
                            self._end()
                        yield event
                if session.state != ANSWERING:
                    return
            raise self._no_result(process)
        except ProxyError as error:
            raise self.limits.explain(error)

    def _begin(self) -> Tuple[ClaudeProcess, Session]:
        conversation = self.turn.conversation
        history, newest = split_newest(conversation.messages)
        budget = self.config.retry_budget
        kept = self.runner.take_kept(conversation_key(self.turn, history), self.claude)
        if kept is not None and kept[1].continues(newest):
            (process, session), self.origin = kept, "kept"
            self.process, self.session = process, session
            process.send(session.begin(self.turn, newest, budget, self.whole))
            return process, session
        if kept is not None:
            self.runner.end(kept[0])  # the client did not bring back what it waits for
        messages = self.thinking.restore(conversation.messages, self.restore_thinking, self.turn.cli_model)
        history = split_newest(messages)[0]  # with its thinking back
        interrupted = bool(history) and any(block["type"] == "tool_result" for block in newest["content"])
        if not interrupted and history and all(message["role"] == "system" for message in history):
            # A transcript of system messages alone is no conversation: the CLI would take it for
            # an interrupted turn and answer that. Ended by the newest message, it is one, and the
            # CLI takes that message up as its first prompt (with the system messages after it).
            interrupted, messages = True, history + [newest]
        process, self.origin = self.runner.start(cli_launch(self.claude, self.turn, self.config,
                                                           messages if interrupted else history, interrupted))
        self.process = process
        self.session = Session(conversation.tools)
        process.send(self.session.begin(self.turn, newest, budget, self.whole, interrupted))
        return process, self.session

    def _deadlines(self, process: ClaudeProcess, session: Session) -> Callable[[], Tuple[float, ProxyError]]:
        config = self.config
        total = (time.monotonic() + config.timeout,
                 ProxyError(504, "Claude did not finish within %g s (--timeout)." % config.timeout,
                            code="timeout"))
        idle = ProxyError(504, "Claude Code printed nothing for %g s (--idle-timeout)."
                          % config.idle_timeout, code="idle_timeout")

        def next_deadline() -> Tuple[float, ProxyError]:  # asked after every read: keep it cheap
            earliest = min(total, (process.last_output + config.idle_timeout, idle),
                           key=lambda pair: pair[0])
            retry = session.retry_deadline()
            return earliest if retry is None or earliest[0] <= retry[0] else retry
        return next_deadline

    def _no_result(self, process: ClaudeProcess) -> ProxyError:
        if self.runner.closing:
            return shutting_down()
        code = process.close(grace=2.0)
        tail = process.stderr_text()[-1000:]
        return ProxyError(
            502, "Claude Code exited (code %s) without an answer. %s"
            % (code, ("Its last output: " + tail) if tail else "It printed nothing on stderr."),
            code="cli_failed")

    def keep(self, outcome: Outcome, echo: Optional[List[Dict[str, Any]]]) -> None:
        """Keep the process for its conversation's next turn, which will hold `echo` as this
        reply (the reply as the client got it), when the session may go on and there is room;
        else finish() ends it once the answer is out. The reply's thinking is kept too, for a
        turn that resumes the conversation without this process (ThinkingStore)."""
        if self.session is None or self.session.state not in (WAITING, IDLE):
            return
        self.thinking.put(self.turn.cli_model, outcome.model, outcome.blocks)
        process = self.process
        if process is None or not echo or process.closed:
            return
        messages = self.turn.conversation.messages + [{"role": "assistant", "content": echo}]
        if self.runner.keep(conversation_key(self.turn, messages), process, self.session):
            self.process = None

    def finish(self) -> None:
        """End the process unless it was kept; called however the turn went."""
        self._end()

    def _end(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            # A turn that ended by itself may be writing Claude Code's own files: a moment for that.
            self.runner.end(process, grace=1.0 if self.session is not None and self.session.completed else 0.0)


# ---------------------------------------------------------------------------
# The core: a turn from a request body to a door's answer, in memory
# ---------------------------------------------------------------------------

class Sink(ClientWatch):
    """Where the core writes one request's answer; the edge gives one per request (HttpSink).

    frames() writes a door's frames as one stream, begun by the first write; keepalive() shows
    a silent stream is alive (with the door's frames, or its own when it has none); end() ends
    the stream; whole() writes a complete answer, status 200, instead of a stream. `started`:
    something of a stream went out, so a failure can only be its last frame. A `watched` sink
    is also the ClientWatch of its client, so that a turn ends as soon as the client leaves.
    """

    watched = False

    @property
    def started(self) -> bool:
        raise NotImplementedError

    def frames(self, frames: List[Frame]) -> None:
        raise NotImplementedError

    def keepalive(self, frames: List[Frame]) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def whole(self, payload: Dict[str, Any]) -> None:
        raise NotImplementedError


class TurnRecord:
    """What a request's access line and the status page tell of its turn, filled in by the core
    as it goes (never the content): the door, the model, the usage, when the first content went
    out, its process's origin (kept, warm or cold) and the error's code."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.door: Optional[str] = None
        self.model = "-"
        self.usage: Dict[str, Any] = {}
        self.first_content: Optional[float] = None
        self.origin: Optional[str] = None
        self.error: Optional[str] = None


RECENT_REQUESTS = 50
# Failed requests may name any model: past this many rows, new names are counted together.
COUNTED_MODELS = 100
OTHER_MODELS = "(others)"


class Activity:
    """Requests each door served per model, and the records of the last RECENT_REQUESTS."""

    def __init__(self) -> None:
        self._counts: Dict[Tuple[str, str], List[int]] = {}  # (door, model) -> [requests, failed]
        self._recent: collections.deque[Dict[str, Any]] = collections.deque(maxlen=RECENT_REQUESTS)
        self._lock = threading.Lock()

    def record(self, entry: Dict[str, Any]) -> None:
        """Take the record of a finished request: door, model, status, error and so on, no content."""
        key = (entry["door"], entry["model"])
        with self._lock:
            if key not in self._counts and len(self._counts) >= COUNTED_MODELS:
                key = (entry["door"], OTHER_MODELS)
            counts = self._counts.setdefault(key, [0, 0])
            counts[0] += 1
            counts[1] += entry["error"] is not None
            self._recent.appendleft(entry)

    def report(self) -> Dict[str, Any]:
        """The counts per door and model, and the recent records, newest first."""
        with self._lock:
            return {"requests": [{"door": door, "model": model, "count": count, "failed": failed}
                                 for (door, model), (count, failed) in sorted(self._counts.items())],
                    "recent_requests": list(self._recent)}


class Core:
    """The proxy in memory, below the HTTP edge and above nothing but its runner: it answers a
    door's turn, counts a Messages body's tokens, and keeps what outlives a request (usage
    limits, stored responses, thinking for cold resumes, the activity the status page shows).

    answer() is the one path of a turn: read and check the body, parse it in a --max-concurrent
    slot, find the `claude`, run the exchange, and write the door's frames to the sink.
    """

    def __init__(self, config: Config, runner: Runner) -> None:
        self.config = config
        self.runner = runner
        self.started_at = time.time()
        self.requests_served = 0
        self.limits = UsageLimits()
        self.activity = Activity()  # for the status page
        self.responses = ResponseStore()  # for previous_response_id and GET /v1/responses/{id}
        self.thinking = ThinkingStore()  # for tool loops resumed cold
        self._lock = threading.Lock()
        # Each door: how its body becomes a turn (images fetched by the runtime, a stored response
        # found in the core), and the door that answers it.
        self.doors: Dict[str, Tuple[Callable[[Any, Config], Tuple[Turn, Any]], Callable[[Turn, Any], Door]]] = {
            "chat": (functools.partial(parse_chat_request, fetch=fetch_image), ChatDoor),
            "responses": (functools.partial(parse_responses_request, find_response=self.responses.get,
                                            fetch=fetch_image), ResponsesDoor),
            "messages": (functools.partial(parse_messages_request, fetch=fetch_image), MessagesDoor),
        }

    def answer(self, door_name: str, read_body: Callable[[], bytes], sink: Sink, record: TurnRecord) -> None:
        """Answer one request of a door (chat, responses or messages) into the sink. A ProxyError
        before the sink has started is the caller's to answer with its status; after, the
        stream's last frame says it."""
        with self._lock:
            self.requests_served += 1  # turns only: probes of /health are not served requests
        record.door = door_name
        text = read_body()
        self.limits.check(self.config.no_extra_usage)
        parse, door_type = self.doors[door_name]
        # Parsed JSON can take many times its text: parsed only in a slot, so at most
        # --max-concurrent bodies take that room at once, and neither outlives the translation.
        with self.runner.slot() as slot:
            body = parse_json_text(text)
            record.model = asked_model(body)  # for the access line, should the translation fail
            turn, options = parse(body, self.config)
            del text, body
            record.model = turn.model
            claude = self.runner.claude()
            door = door_type(turn, options)
            exchange = Exchange(self.runner, self.limits, self.thinking, turn, claude,
                                sink if sink.watched else None, not door.stream,
                                restore_thinking=not door.returns_thinking)
            self._run(door, exchange, sink, slot, record)

    def _run(self, door: Door, exchange: Exchange, sink: Sink, slot: Slot, record: TurnRecord) -> None:
        """Run the exchange and answer through the door: a stream of its frames, or its whole
        response once the reply is complete. A complete reply gives the slot back before its
        last bytes go out and before the process exits; a failed one, once its turn is over."""
        outcome: Optional[Outcome] = None
        try:
            for event in exchange.events():
                if isinstance(event, End):
                    outcome = event.outcome  # the last event
                elif event is None:
                    if door.stream:  # the client, and any proxy between, see the answer is coming
                        sink.keepalive(door.keepalive())
                elif door.stream:
                    frames = door.encode(event)
                    sink.frames(frames)
                    if frames and record.first_content is None:  # the time to first token, as the client saw it
                        record.first_content = time.monotonic()
            assert outcome is not None  # the events end with End, or raise
            record.usage = outcome.usage
            last = door.end(outcome) if door.stream else door.response(outcome)
            try:
                echo = door.echo(outcome)
            except ProxyError as error:  # a reply the door cannot read back is not kept; the answer stands
                log.warning("%s not kept for its next turn: %s", record.request_id, error.message)
                echo = None
            # Kept, and the slot given back, before the answer ends: a client may come back with
            # the next turn at once, while a process not kept still takes its time to exit.
            self._store(door.stored(echo))
            exchange.keep(outcome, echo)
            slot.release()
            if door.stream:
                sink.frames(last)
                sink.end()
            else:
                record.first_content = time.monotonic()  # all of it goes out at once
                sink.whole(last)
        except ProxyError as error:
            if not door.stream or not sink.started:
                raise
            log.warning("%s failed mid-stream: %s", record.request_id, error.message)
            record.error = error.code or error.type  # its status went out as 200 already
            frames = door.failure(error)
            self._store(door.stored())
            sink.frames(frames)
            sink.end()
        finally:
            record.origin = exchange.origin
            if outcome is None and exchange.session is not None:
                record.usage = dict(exchange.session.usage)  # what a failed turn spent all the same
            exchange.finish()  # ends the process unless it was kept above

    def _store(self, stored: Optional[StoredResponse]) -> None:
        if stored is not None:
            self.responses.put(stored)

    def count_tokens(self, read_body: Callable[[], bytes]) -> int:
        """An estimate of a Messages body's input tokens (see estimate_input_tokens)."""
        text = read_body()
        with self.runner.slot():  # parsed in a slot, as a turn's body is (see answer)
            return estimate_input_tokens(parse_json_text(text), self.config)

    def stored_response(self, response_id: str) -> Dict[str, Any]:
        stored = self.responses.get(response_id)
        if stored is None:
            raise response_not_found(response_id)
        return stored.response

    def delete_response(self, response_id: str) -> None:
        if not self.responses.delete(response_id):
            raise response_not_found(response_id)

    def health(self) -> Dict[str, Any]:
        """What the proxy knows of itself; `problems` says what is wrong, each with its fix."""
        runtime = self.runner.report()
        return {
            "status": "degraded" if runtime["problems"] else "ok",
            "problems": runtime["problems"],
            "version": __version__,
            "claude": runtime["claude"],
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "requests_served": self.requests_served,
            "active_children": runtime["active_children"],
            "max_concurrent": runtime["max_concurrent"],
            "pool": runtime["pool"],
            "usage_limits": self.limits.health(),
        }

    def status_report(self) -> Dict[str, Any]:
        """What the status page shows, and its JSON twin carries: /health, the --no-extra-usage
        guard, the requests per door and model, and the last ones (never their content)."""
        return dict(self.health(), no_extra_usage=self.config.no_extra_usage, **self.activity.report())

    def finished(self, record: TurnRecord, status: int, began: float) -> None:
        """Take the record of a request that has been answered (with `status`; `began` on the
        monotonic clock): a turn's goes on the status page, without its content."""
        if record.door is None:
            return
        usage, first = record.usage or {}, record.first_content
        self.activity.record({
            "time": utc_iso(time.time()), "door": record.door, "model": record.model,
            "status": status, "error": record.error,
            "first_token_ms": round((first - began) * 1000) if first is not None else None,
            "total_ms": round((time.monotonic() - began) * 1000), "input_tokens": usage.get("input_tokens"),
            "cached_tokens": usage.get("cache_read_input_tokens"), "output_tokens": usage.get("output_tokens"),
            "process": record.origin})

    def headers(self) -> Dict[str, str]:
        """Headers every response carries: what the CLI last reported of the plan's windows."""
        return self.limits.headers()

    def open(self) -> None:
        """Start the runtime (see Runner.open)."""
        self.runner.open()

    def close(self) -> None:
        """End every child; no process starts after."""
        self.runner.close()


# ===========================================================================
# 4. THE EDGE (HTTP): the status page, the handler, the server
# ===========================================================================

# ---------------------------------------------------------------------------
# The status page (GET /) and its JSON twin (GET /status)
# ---------------------------------------------------------------------------

# What a user asks of a local proxy first: is it up, how much of the plan is left and who
# pays, is Claude Code ready, did the last requests work. The page shows what /health holds
# and what the proxy served, never what was said: a request's record holds what its access-log
# line holds, and a page or twin shows nothing more.
PAGE_REFRESH_SECONDS = 5
# The page loads nothing from anywhere: its one script carries the nonce, its style is inline.
PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-%s'; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_KEY_STORE = "claude-max-proxy-key"  # the sessionStorage entry: the key lives in its tab only


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [(n, unit) for n, unit in parts if n][:2] or [(0, "s")]
    return " ".join("%d%s" % pair for pair in shown)


# What the page and `status` both say, in the same words: from a status report (see
# Core.status_report; /health's fields, and what the twin adds, each may be missing).

def window_fill(window: Dict[str, Any]) -> Optional[float]:
    """How full a usage window's bar is, 0..1; None when Anthropic did not say (it sends the
    utilization only near a limit). A refused window is full whatever it said."""
    used = window.get("utilization")
    if window.get("status") == "rejected":
        return 1.0
    return max(0.0, min(1.0, float(used))) if isinstance(used, (int, float)) else None


def reset_text(window: Dict[str, Any], now: float) -> str:
    reset = window.get("resets_at_unix")
    if not isinstance(reset, int):
        return "reset time not reported"
    return "resets in %s" % format_duration(reset - now) if reset > now else "resets now"


def billing_text(report: Dict[str, Any]) -> Tuple[str, str, str]:
    """(who pays for answers now, what that means, what --no-extra-usage does about it)."""
    extra = (report.get("usage_limits") or {}).get("extra_usage_in_use")
    paying = (("extra usage", "answers are billed beyond your plan") if extra else
              ("your plan", "answers are within your subscription's limits"))
    guard = report.get("no_extra_usage")
    return paying + ("unknown" if guard is None else
                     "on: a request that extra usage would pay for is refused (403)" if guard else
                     "off: past a limit, requests go on as extra usage if your account has it on",)


def probe_text(claude: Dict[str, Any]) -> str:
    probe = claude.get("probe")
    if probe is None and claude.get("found"):
        probe = {True: "ok", False: "failed"}.get(claude.get("native"), "pending")
    return probe or "not found"


def login_text(claude: Dict[str, Any]) -> str:
    return {True: "yes", False: "no"}.get(claude.get("logged_in"), "unknown")


def children_text(report: Dict[str, Any]) -> str:
    return "%s of %s running" % (report.get("active_children"), report.get("max_concurrent"))


def pool_text(report: Dict[str, Any]) -> str:
    pool = report.get("pool") or {}
    kept = pool.get("conversations") or 0
    return ("%d pre-started waiting, %d conversation%s kept (pool of %s); %s hits, %s misses, "
            "%s turns continued" % ((pool.get("size") or 0) - kept, kept, "" if kept == 1 else "s",
                                    pool.get("max"), pool.get("hits"), pool.get("misses"), pool.get("continued")))


def degraded_reasons(report: Dict[str, Any]) -> List[str]:
    claude = report.get("claude") or {}
    reasons = [str(problem) for problem in report.get("problems") or []]
    if not reasons and claude.get("problem"):
        reasons.append(str(claude["problem"]))
    if not reasons and not claude.get("found", True):
        reasons.append("Claude Code is not found (see --claude-bin).")
    return reasons


def millis_text(ms: Any) -> str:
    if not isinstance(ms, (int, float)):
        return "\u2013"
    return "%d ms" % ms if ms < 1000 else "%.1f s" % (ms / 1000)


def count_text(value: Any) -> str:
    return "{:,}".format(value) if isinstance(value, int) else "\u2013"


PAGE_STYLE = """
:root{--bg:#f6f6f8;--fg:#1c1c1f;--mute:#6b6b73;--card:#fff;--line:#e4e4e9;--ok:#1a7f37;--warn:#b26a00;
--bad:#c62828;--bar:#3b6fe0;--track:#e9e9ef}
@media (prefers-color-scheme:dark){:root{--bg:#111114;--fg:#ececf1;--mute:#9a9aa4;--card:#1a1a1f;
--line:#2b2b32;--ok:#3fb950;--warn:#d29922;--bad:#f85149;--bar:#5b8ff0;--track:#2b2b32}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",sans-serif}
main{max-width:1120px;margin:0 auto;padding:22px 20px 36px}
header{display:flex;flex-wrap:wrap;align-items:center;gap:6px 14px;margin-bottom:16px}
h1{font-size:20px;margin:0;font-weight:650;letter-spacing:-.01em}
h1 small{font-weight:400;color:var(--mute);font-size:13px;margin-left:4px}
h2{font-size:11.5px;text-transform:uppercase;letter-spacing:.07em;color:var(--mute);margin:0 0 10px;font-weight:600}
.meta{color:var(--mute);font-size:13px}
.pill{display:inline-block;padding:1px 10px;border-radius:99px;font-size:12px;font-weight:600;color:#fff;
background:var(--ok)}
.pill.degraded,.pill.bad{background:var(--bad)}.pill.warn{background:var(--warn)}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;margin-bottom:14px}
section.alert{border-left:4px solid var(--bad)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:14px;margin-bottom:14px}
.grid section{margin:0}
.win{margin-bottom:12px}.win .top{display:flex;justify-content:space-between;gap:10px}
.win b{font-weight:600}
.bar{height:10px;border-radius:5px;background:var(--track);overflow:hidden;margin:5px 0 3px}
.bar i{display:block;height:100%;background:var(--bar);border-radius:5px}
.bar i.warn{background:var(--warn)}.bar i.bad{background:var(--bad)}
.sub,.none{color:var(--mute);font-size:12.5px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:5px 16px;margin:0}
dt{color:var(--mute)}dd{margin:0;overflow-wrap:anywhere}
.wrap{overflow-x:auto}
table{width:100%;border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
th,td{padding:4px 8px;text-align:left;border-bottom:1px solid var(--line);white-space:nowrap}
tr:last-child td{border-bottom:0}
th{color:var(--mute);font-weight:600}.n{text-align:right}
.err{color:var(--bad);font-weight:600}
form{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
input{font:inherit;padding:6px 9px;border:1px solid var(--line);border-radius:6px;background:var(--bg);
color:var(--fg);width:24em;max-width:100%}
button{font:inherit;padding:6px 14px;border:0;border-radius:6px;background:var(--bar);color:#fff;cursor:pointer}
.stale header .meta::after{content:" \\2013 not answering";color:var(--bad)}
"""

# Re-reads the page every few seconds with the tab's key and swaps its <main> for the new one
# (one renderer, the server's); counts resets down and shows times in local time in between.
PAGE_SCRIPT = """
(function () {
  var store = "%(store)s", key = sessionStorage.getItem(store);
  function span(s) {
    var units = [[86400, "d"], [3600, "h"], [60, "m"], [1, "s"]], out = [];
    s = Math.floor(s);
    units.forEach(function (u) {
      var n = Math.floor(s / u[0]);
      s %%= u[0];
      if (n && out.length < 2) out.push(n + u[1]);
    });
    return out.join(" ") || "0s";
  }
  function tick() {
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-reset]").forEach(function (e) {
      var left = Number(e.dataset.reset) - now;
      e.textContent = left > 0 ? "resets in " + span(left) : "resets now";
    });
  }
  function prepare() {
    document.querySelectorAll("time[datetime]").forEach(function (t) {
      t.textContent = new Date(t.dateTime).toLocaleTimeString([], {timeZoneName: "short"});
    });
    var form = document.getElementById("key-form");
    if (form) form.onsubmit = function (event) {
      event.preventDefault();
      key = form.elements.key.value.trim();
      sessionStorage.setItem(store, key);
      refresh();
    };
    tick();
  }
  function refresh() {
    var page = document.getElementById("page");
    if (page.dataset.key === "required" && !key) return;
    fetch(location.pathname, {headers: key ? {"Authorization": "Bearer " + key} : {}, cache: "no-store"})
      .then(function (response) {
        if (response.status === 401) {
          sessionStorage.removeItem(store);
          key = null;
          var note = document.getElementById("key-note");
          if (note) note.textContent = "That key was refused.";
          else location.reload();
          return;
        }
        return response.text().then(function (text) {
          var next = new DOMParser().parseFromString(text, "text/html").getElementById("page");
          if (next) { page.replaceWith(next); document.body.classList.remove("stale"); prepare(); }
        });
      })
      .catch(function () { document.body.classList.add("stale"); });
  }
  prepare();
  refresh();
  setInterval(tick, 1000);
  setInterval(refresh, %(refresh)d * 1000);
})();
"""


def page_escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page_header(report: Dict[str, Any]) -> str:
    if not report:
        return "<header><h1>claude-max-proxy</h1></header>"
    reasons = degraded_reasons(report)
    state = str(report.get("status") or "unknown")
    return ("<header><h1>claude-max-proxy <small>%s</small></h1><span class=\"pill %s\">%s</span>"
            "<span class=\"meta\">up %s \u00b7 pid %s \u00b7 %s requests served</span></header>%s"
            % (page_escape(report.get("version")), page_escape(state), page_escape(state),
               format_duration(report.get("uptime_s") or 0), page_escape(report.get("pid")),
               count_text(report.get("requests_served")),
               "<section class=\"alert\"><h2>Needs attention</h2>%s</section>"
               % "".join("<p>%s</p>" % page_escape(reason) for reason in reasons) if reasons else ""))


def page_windows(report: Dict[str, Any], now: float) -> str:
    windows = (report.get("usage_limits") or {}).get("windows") or {}
    rows = []
    for name, window in sorted(windows.items()):
        fill = window_fill(window)
        level = ("bad" if window.get("status") == "rejected" else
                 "warn" if window.get("status") == "allowed_warning" or (fill or 0) >= 0.8 else "")
        reset = window.get("resets_at_unix")
        rows.append(
            "<div class=\"win\"><div class=\"top\"><b>%s</b><span>%s</span></div>"
            "<div class=\"bar\"><i class=\"%s\" style=\"width:%.1f%%\"></i></div>"
            "<div class=\"sub\">%s%s \u00b7 <span%s>%s</span></div></div>"
            % (page_escape(WINDOW_NAMES.get(name, name.replace("_", " ") + " limit")),
               "%d%% used" % round(fill * 100) if fill is not None else "not near its limit",
               level, (fill or 0) * 100, page_escape(window.get("status")),
               " \u00b7 extra usage " + page_escape(window["extra_usage"]) if window.get("extra_usage") else "",
               " data-reset=\"%d\"" % reset if isinstance(reset, int) else "", reset_text(window, now)))
    if not rows:
        rows.append("<p class=\"none\">Nothing reported yet: Claude Code reports the plan's windows with "
                    "its answers on a subscription login.</p>")
    payer, meaning, guard = billing_text(report)
    return ("<section><h2>Plan usage</h2>%s<dl><dt>Paying now</dt><dd><span class=\"pill %s\">%s</span> %s</dd>"
            "<dt>--no-extra-usage</dt><dd>%s</dd></dl></section>"
            % ("".join(rows), "warn" if payer == "extra usage" else "", payer, page_escape(meaning),
               page_escape(guard)))


def page_facts(title: str, facts: List[Tuple[str, Any]]) -> str:
    return "<section><h2>%s</h2><dl>%s</dl></section>" % (title, "".join(
        "<dt>%s</dt><dd>%s</dd>" % (page_escape(name), page_escape(value)) for name, value in facts))


def page_table(title: str, heads: List[str], rows: List[List[Any]], empty: str) -> str:
    """A table; a head ending in "#" (and its column) is right-aligned, without the "#"."""
    numeric = [head.endswith("#") for head in heads]
    cells = "".join("<tr>%s</tr>" % "".join(
        "<td%s>%s</td>" % (" class=\"n\"" if numeric[i] else "", cell) for i, cell in enumerate(row))
        for row in rows)
    return ("<section><h2>%s</h2>%s</section>" % (title, "<div class=\"wrap\"><table><tr>%s</tr>%s</table></div>"
            % ("".join("<th%s>%s</th>" % (" class=\"n\"" if numeric[i] else "", head.rstrip("#"))
                       for i, head in enumerate(heads)), cells) if rows else
            "<p class=\"none\">%s</p>" % empty))


def page_requests(report: Dict[str, Any]) -> str:
    counts = [[page_escape(row["door"]), page_escape(row["model"]), count_text(row["count"]),
               "<span class=\"err\">%s</span>" % count_text(row["failed"]) if row["failed"] else "0"]
              for row in report.get("requests") or []]
    recent = [["<time datetime=\"%s\">%s UTC</time>" % (page_escape(entry["time"]),
                                                         page_escape(entry["time"][11:19])),
               page_escape(entry["door"]), page_escape(entry["model"]),
               ("<span class=\"err\">%s</span>" if entry["error"] else "%s") % page_escape(entry["status"]),
               "<span class=\"err\">%s</span>" % page_escape(entry["error"]) if entry["error"] else "",
               millis_text(entry["first_token_ms"]), millis_text(entry["total_ms"]),
               count_text(entry["input_tokens"]), count_text(entry["cached_tokens"]),
               count_text(entry["output_tokens"]), page_escape(entry["process"] or "\u2013")]
              for entry in report.get("recent_requests") or []]
    return (page_table("Requests per door and model", ["Door", "Model", "Requests#", "Failed#"], counts,
                       "None yet.")
            + page_table("Last %d requests" % RECENT_REQUESTS,
                         ["Time", "Door", "Model", "Status", "Error", "First token#", "Total#", "Input#",
                          "Cached#", "Output#", "Process"], recent, "None yet."))


def status_page(report: Optional[Dict[str, Any]], nonce: str) -> str:
    """The page: the report rendered, or with report None the shell that asks for the key."""
    if report is None:
        body = ("<main id=\"page\" data-key=\"required\">%s<section><h2>API key</h2><form id=\"key-form\">"
                "<input name=\"key\" type=\"password\" autocomplete=\"off\" placeholder=\"the proxy's --api-key\" "
                "aria-label=\"API key\" required><button>Show status</button></form><p id=\"key-note\" "
                "class=\"sub\">This proxy needs its key. It is kept in this tab only, and gone when the tab closes.</p>"
                "</section></main>" % page_header({}))
    else:
        claude = report.get("claude") or {}
        body = "<main id=\"page\">%s%s<div class=\"grid\">%s%s</div>%s</main>" % (
            page_header(report), page_windows(report, time.time()),
            page_facts("Claude Code", [("Path", claude.get("path") or "not found"),
                                       ("Version", claude.get("version") or "\u2013"),
                                       ("Probe", probe_text(claude)), ("Logged in", login_text(claude))]
                       + ([("Problem", claude["problem"])] if claude.get("problem") else [])),
            page_facts("Processes", [("Children", children_text(report)), ("Pool", pool_text(report))]),
            page_requests(report))
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            "content=\"width=device-width,initial-scale=1\"><meta name=\"color-scheme\" content=\"light dark\">"
            "<title>claude-max-proxy</title><style>%s</style></head><body>%s<script nonce=\"%s\">%s</script>"
            "</body></html>" % (PAGE_STYLE, body, nonce,
                                PAGE_SCRIPT % {"store": PAGE_KEY_STORE, "refresh": PAGE_REFRESH_SECONDS}))


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

class ClientStalled(ClientGone):
    """The client read nothing of the answer for a whole write timeout: taken as gone."""


class ClientConnection(io.RawIOBase):
    """The client's socket as the handler reads and writes it.

    Reads share one deadline per request, from its first byte to the end of its
    body, so a client that sends a byte now and then cannot hold a connection (a
    per-read timeout would restart with every byte). Each write has a bound of its
    own, so a client that stops reading a stream frees its slot and its claude.
    """

    def __init__(self, sock: socket.socket, read_seconds: float, write_seconds: float) -> None:
        super().__init__()
        self.sock = sock
        self.read_seconds = read_seconds
        self.write_seconds = write_seconds
        self.received = 0
        self.deadline = 0.0

    def begin_request(self) -> None:
        """Wait up to read_seconds for a request to begin; its first byte starts its own deadline."""
        self.received = 0
        self.deadline = time.monotonic() + self.read_seconds

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the request did not arrive in time")
        self.sock.settimeout(remaining)
        try:
            count = self.sock.recv_into(buffer)
        except socket.timeout:
            raise
        except OSError as error:  # a reset
            raise ClientGone(str(error)) from error
        if count and not self.received:
            self.deadline = time.monotonic() + self.read_seconds
        self.received += count
        return count

    def write(self, data: Any) -> int:
        self.sock.settimeout(self.write_seconds)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise ClientStalled("the client read nothing for %g s" % self.write_seconds)
        except OSError as error:  # a reset, a broken pipe: the client closed its end
            raise ClientGone(str(error)) from error
        return len(data)


# The request line, strictly: METHOD SP target SP HTTP/x.y. http.server would also take
# "GET /" (HTTP/0.9, answered without a status line) and words split by any whitespace.
REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r?\n")
MAX_REQUEST_LINE = 65536


def check_request_line(line: bytes) -> None:
    """A ProxyError for a request line that is too long, malformed, or not HTTP/1.x."""
    if len(line) > MAX_REQUEST_LINE:
        raise ProxyError(414, "The request line is longer than %d bytes." % MAX_REQUEST_LINE,
                         code="request_line_too_long")
    match = REQUEST_LINE.fullmatch(line)
    if match is None:
        raise invalid("Malformed request line; expected 'METHOD /path HTTP/1.1'.",
                      code="invalid_request_line")
    if match.group(3) != b"1":
        raise ProxyError(505, "HTTP/%s.%s is not supported; use HTTP/1.1."
                         % (match.group(3).decode(), match.group(4).decode()),
                         code="http_version_not_supported")


class Framing(NamedTuple):
    """Where a request's body ends: chunked, a Content-Length, or no body (length None)."""
    chunked: bool
    length: Optional[int]


def body_framing(headers: Any, http_1_0: bool) -> Framing:
    """The one reading of the headers that say where the body ends; a ProxyError on any doubt.

    A request whose framing two parsers could read differently is how a second
    request gets smuggled inside a first: every doubt is an error, and the caller
    closes the connection after it.
    """
    if headers.defects or any("\n" in value for value in headers.values()):
        raise invalid("Malformed header line.", code="invalid_header")
    if len(headers.get_all("Host") or []) > 1:
        raise invalid("More than one Host header.", code="invalid_header")
    lengths = headers.get_all("Content-Length") or []
    codings = headers.get_all("Transfer-Encoding") or []
    if codings:
        if lengths:
            raise invalid("Transfer-Encoding and Content-Length together; send one of them.",
                          code="invalid_header")
        if len(codings) > 1 or codings[0].strip(" \t").lower() != "chunked":
            raise ProxyError(501, "Transfer-Encoding %r is not supported; send 'chunked' or a "
                             "Content-Length." % ", ".join(codings), code="unsupported_transfer_encoding")
        if http_1_0:
            raise invalid("HTTP/1.0 has no chunked bodies; send a Content-Length.", code="invalid_header")
        return Framing(True, None)
    if not lengths:
        return Framing(False, None)
    if len(lengths) > 1:
        raise invalid("More than one Content-Length header.", code="invalid_header")
    value = lengths[0].strip(" \t")
    if not re.fullmatch(r"[0-9]+", value):
        raise invalid("Content-Length is not a valid number.", code="invalid_header")
    return Framing(False, int(value) if len(value) <= 18 else sys.maxsize)  # int() refuses 4300+ digits


CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r\n")
MAX_CHUNK_LINE = 1024
MAX_TRAILER_LINES = 100


def host_name(host: str) -> Optional[str]:
    """The name or address in a Host header, lower case, without port, brackets or final dot."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@\s]+)(?::[0-9]*)?", host.strip(" \t"))
    if match is None:
        return None
    return match.group(1).strip("[]").lower().rstrip(".")


def is_loopback_name(name: str) -> bool:
    """localhost, *.localhost (browsers resolve those to loopback themselves) or a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def request_source_error(host: Optional[str], origin: Optional[str], config: Config,
                         local_address: str) -> Optional[ProxyError]:
    """Why a request may not use the proxy, or None: it came from a web page, not a client.

    A page the user visits can send requests to 127.0.0.1, and with DNS rebinding
    (its own name, resolved to 127.0.0.1) read the answers too. Browsers always send
    a Host naming the page's server, and an Origin with any cross-origin request;
    curl, the SDKs and agents send no Origin. Sec-Fetch-* headers are no sign of a
    browser (OpenClaw sends them).
    """
    allowed = [name.strip().lower().rstrip(".") for name in config.allow_host.split(",") if name.strip()]
    if host is not None and "*" not in allowed:
        name = host_name(host)
        own = (config.host.lower(), local_address.lower())
        if name is None or not (is_loopback_name(name) or name in own or name in allowed):
            return ProxyError(403, "Host %r does not name this proxy. If you reach it by that name, "
                              "start it with --allow-host %s." % (host, name or "NAME"),
                              code="host_not_allowed")
    cors = config.cors.strip().rstrip("/").lower()
    if origin is not None and cors != "*" and origin.strip().rstrip("/").lower() != cors:
        return ProxyError(403, "Requests from web pages at %r may not use this proxy (--cors allows %s)."
                          % (origin, repr(config.cors) if config.cors else "none"),
                          code="origin_not_allowed")
    return None


# Parsed JSON takes up to ~50 times the size of its text ([{}, {}, ...]), and what a
# request holds beyond its text is mostly values: 250,000 of them is ten times a
# 1,000-message agent history with its tools, and bounds a parse to ~50 MB.
MAX_JSON_VALUES = 250000
# A JSON string with its escapes removed holds no quote, so strings can be cut
# out with a regex that never backtracks.
JSON_ESCAPES = (b"\\\\", b'\\"')
JSON_STRING = re.compile(rb'"[^"]*"')


def json_value_count(text: bytes) -> int:
    """How many values and keys a JSON text holds, counted at C speed without parsing it.

    Outside strings, each value or key but the first follows a comma, a colon or
    an opening bracket. Invalid JSON gets some count; its parse fails later.
    """
    for escape in JSON_ESCAPES:
        text = text.replace(escape, b"")
    bare = JSON_STRING.sub(b"", text)
    return 1 + sum(bare.count(mark) for mark in (b",", b":", b"[", b"{"))


def route_path(target: str) -> str:
    """The route a request target names: no query string, no /v1 before it, no slash after it."""
    path = "/" + target.split("?", 1)[0].strip("/")
    if path.startswith("/v1/") or path == "/v1":
        path = path[3:] or "/"
    return path


# The routes: a path (after /v1, which may be left out) -> method -> the name of the handler's
# method that answers it (ProxyHandler._<name>), or for a turn the door's name too. HEAD answers
# like GET, without the body; only a POST, a turn or a count, reads a body. The page is at / alone,
# not at /v1; HEAD / is also Claude Code's check of the connection.
ROUTES: Dict[str, Dict[str, str]] = {
    "/health": {"GET": "health", "HEAD": "health"},
    "/models": {"GET": "list_models", "HEAD": "list_models"},
    "/chat/completions": {"POST": "turn chat"},
    "/responses": {"POST": "turn responses"},
    "/messages": {"POST": "turn messages"},
    "/messages/count_tokens": {"POST": "count_tokens"},
    "/status": {"GET": "status_report", "HEAD": "status_report"},
    "/": {"GET": "status_page", "HEAD": "status_page"},
}
# Routes whose path goes on with an id, the handler's argument: (prefix, may the id hold a slash,
# methods). A model id may ("anthropic/claude-..."); a response id may not.
ID_ROUTES: Tuple[Tuple[str, bool, Dict[str, str]], ...] = (
    ("/models/", True, {"GET": "get_model", "HEAD": "get_model"}),
    ("/responses/", False, {"GET": "get_response", "HEAD": "get_response", "DELETE": "delete_response"}),
)


def find_route(path: str, page: bool) -> Tuple[Optional[Dict[str, str]], Optional[str]]:
    """A route's methods and its id argument for a path from route_path; (None, None) when no
    route has it. `page`: the request's target was / itself, where the status page is."""
    if path == "/" and not page:
        return None, None
    if path in ROUTES:
        return ROUTES[path], None
    for prefix, slashes, methods in ID_ROUTES:
        argument = path[len(prefix):]
        if path.startswith(prefix) and argument and (slashes or "/" not in argument):
            return methods, argument
    return None, None


class HttpSink(Sink):
    """The core's Sink on a handler's connection: Server-Sent Events, one frame per HTTP chunk,
    written as it comes; or one JSON body."""

    watched = True

    def __init__(self, handler: "ProxyHandler") -> None:
        self.handler = handler

    def fileno(self) -> int:
        return self.handler.connection.fileno()

    def left(self) -> bool:
        """Whether the client's connection, readable while its turn runs, is readable because the
        client left: it reset the connection, or closed it while it keeps connections alive.

        A client that asked to close the connection after this request (HTTP/1.0, `Connection:
        close`) may shut down its sending side once the request is sent (`nc -q`, some HTTP/1.0
        clients) and still read the answer: its end-of-file is no sign it is gone, and no portable
        call tells that from a full close until a write to it fails (see ClientConnection). A
        keep-alive client never half-closes, so its end-of-file means it hung up."""
        try:
            data = self.handler.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return data == b"" and not self.handler.close_connection

    @property
    def started(self) -> bool:
        return self.handler.headers_sent

    def frames(self, frames: List[Frame]) -> None:
        for name, payload in frames:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            self._write(("event: %s\ndata: %s\n\n" % (name, data)) if name else "data: %s\n\n" % data)

    def keepalive(self, frames: List[Frame]) -> None:
        if frames:
            self.frames(frames)
        else:
            self._write(": keep-alive\n\n")

    def end(self) -> None:
        self._begin()
        self.handler.write_chunk(b"")

    def whole(self, payload: Dict[str, Any]) -> None:
        self.handler.send_json(200, payload)

    def _write(self, text: str) -> None:
        self._begin()
        self.handler.write_chunk(text.encode("utf-8"))

    def _begin(self) -> None:
        if not self.handler.headers_sent:
            self.handler.start_stream()


ErrorReply = Callable[[ProxyError], Tuple[int, Dict[str, Any]]]  # an error as one API's status and body


def openai_error_reply(error: ProxyError) -> Tuple[int, Dict[str, Any]]:
    return error.status, error.body()


def anthropic_client(headers: Any) -> bool:
    """Whether a request comes from an Anthropic client: its SDKs send anthropic-version with
    every request, and a key as x-api-key (OpenAI's send neither)."""
    return bool(headers.get("anthropic-version") or headers.get("x-api-key"))


def shared_path(path: str) -> bool:
    """A route both APIs have (GET /v1/models), answered in the shape of the client's API."""
    return path == "/models" or path.startswith("/models/")


def error_reply_for(target: str, headers: Any) -> ErrorReply:
    """How errors of a request go out: in Anthropic's shape on the Messages API's paths (its
    clients read no other) and to Anthropic's clients on the paths both APIs have, in OpenAI's
    everywhere else."""
    path = route_path(target)
    messages = path == "/messages" or path.startswith("/messages/")
    if messages or (shared_path(path) and anthropic_client(headers)):
        return MessagesDoor.error_reply
    return openai_error_reply


class ProxyHandler(BaseHTTPRequestHandler):
    """HTTP only: reads and frames a request, checks where it comes from and its key, routes
    it by the ROUTES table, and writes the answer; each turn of a door goes to the core."""

    protocol_version = "HTTP/1.1"
    # Seconds a connection may wait for a request to begin, and then for all of it
    # (line, headers, body) to arrive; see ClientConnection.
    timeout = 120
    # Seconds one write may wait for a client that reads nothing before it counts as gone.
    write_timeout = 30
    server_version = "claude-max-proxy/" + __version__
    server: "ProxyServer"

    def version_string(self) -> str:
        return self.server_version  # without the Python version, which says nothing a client needs

    # -- connection and framing ------------------------------------------------

    def setup(self) -> None:
        self.connection = self.request
        # Nagle's algorithm would hold each small answer back ~40 ms for the client's ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = ClientConnection(self.connection, self.timeout, self.write_timeout)
        self.rfile = io.BufferedReader(self.client)
        self.wfile = self.client

    def handle_one_request(self) -> None:
        """Read one request within its deadline, check its line and framing, and answer it."""
        self.client.begin_request()
        self.started = time.monotonic()
        self.request_id = "req_" + uuid.uuid4().hex[:16]
        self.status_sent = 0
        self.record = TurnRecord(self.request_id)  # what the access line tells besides the status
        self.headers_sent = False
        self.error_reply: ErrorReply = openai_error_reply
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True  # the client closed the connection between requests
                return
            self.server.heard_from(self.connection)
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, "Method %s is not supported." % self.command)
                return
            method()
        except socket.timeout:
            # The request line or headers stalled (a stalled body is answered in _dispatch);
            # a connection idle between requests simply closes.
            self.close_connection = True
            if self.client.received:
                self._timed_out()

    def parse_request(self) -> bool:
        """http.server's parse of the headers, between strict checks of the line and the framing."""
        self.command = None
        self.request_version = self.protocol_version  # a refused request still gets a status line
        try:
            check_request_line(self.raw_requestline)
            if not super().parse_request():
                return False
            # Before anything about this request can fail:
            self.error_reply = error_reply_for(self.path, self.headers)
            self.framing = body_framing(self.headers, self.request_version == "HTTP/1.0")
        except ProxyError as error:
            self._refuse(error)
            return False
        return True

    # -- routing ------------------------------------------------------------

    def _dispatch_command(self) -> None:
        self._dispatch(self.command)

    # Every method goes through _dispatch, so an unknown path is a 404 and a
    # known path asked with the wrong method a 405, both in the OpenAI shape.
    do_GET = do_POST = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch_command

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except ClientGone:
            # Gone, or not reading (ClientStalled): logged as nginx does, whatever was sent.
            self.close_connection = True
            self.status_sent = 499
            self.record.error = "client_gone"
        except ProxyError as error:
            self._send_error(error)
        except socket.timeout:
            # Only reads time out (a write that cannot go on is ClientStalled): the body
            # stalled past the request's deadline.
            self._timed_out()
        except Exception:
            log.exception("%s internal error", self.request_id)
            self._send_error(ProxyError(500, "Internal proxy error; see the proxy log.",
                                        code="internal_error"))
        finally:
            self._log_access(method)

    def _route(self, method: str) -> None:
        path = route_path(self.path)
        try:
            self._check_source()
            # Every route but /health and / needs the key, with or without /v1 before it: the
            # status page's shell asks for the key itself, and HEAD / is Claude Code's check of the
            # connection, sent without one. Browsers send CORS preflights without credentials.
            if path not in ("/health", "/") and not (method == "OPTIONS" and self.server.config.cors):
                self._authorize()
            name, arguments = self._route_for(path, method)
        except ProxyError:
            self._discard_body()  # an unread body would be taken for the next request
            raise
        if method != "POST":
            self._discard_body()
        getattr(self, "_" + name)(*arguments)

    def _route_for(self, path: str, method: str) -> Tuple[str, List[str]]:
        """The route's handler (ProxyHandler._<name>, from ROUTES) and its arguments (a turn's
        door, the id in the path); a 404 or 405 when there is none."""
        if path == "/embeddings":
            raise ProxyError(404, "Claude offers no embeddings model, so the proxy has no /v1/embeddings; "
                             "use an embeddings provider of its own (or turn off the client's memory "
                             "search).", code="embeddings_not_supported")
        methods, argument = find_route(path, page=self.path.split("?", 1)[0] == "/")
        if methods is None:
            raise ProxyError(404, "Unknown path %s %s." % (method, self.path), code="unknown_url")
        if method == "OPTIONS" and self.server.config.cors:
            return "preflight", []
        if method not in methods:
            raise ProxyError(405, "Method %s is not allowed on %s; use %s."
                             % (method, self.path, ", ".join(methods)),
                             code="method_not_allowed", headers={"Allow": ", ".join(methods)})
        name, *arguments = methods[method].split()
        return name, arguments + ([] if argument is None else [argument])

    def _check_source(self) -> None:
        """Refuse web pages the user did not allow, before any work (see request_source_error)."""
        error = request_source_error(self.headers.get("Host"), self.headers.get("Origin"),
                                     self.server.config, self.connection.getsockname()[0])
        if error is not None:
            self.close_connection = True  # nothing more from that page, not even its body
            raise error

    def _authorize(self) -> None:
        key = self.server.config.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        # Anthropic's clients send the key as x-api-key (the newest as a bearer token, like OpenAI's).
        tokens = (given[7:] if given[:7].lower() == "bearer " else "", self.headers.get("X-Api-Key", ""))
        if not any(hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8")) for token in tokens):
            raise ProxyError(401, "Invalid or missing API key. Send 'Authorization: Bearer <key>' (or "
                             "'x-api-key: <key>') with the key the proxy was started with.",
                             code="invalid_api_key")

    # -- simple routes -------------------------------------------------------

    def _health(self) -> None:
        self.send_json(200, self.server.core.health())

    def _status_report(self) -> None:
        self.send_json(200, self.server.core.status_report(), {"Cache-Control": "no-store"})

    def _status_page(self) -> None:
        """The page with the report, or only its shell when a key is set and none came with the
        request: the shell asks for the key and fetches the page again with it."""
        given = self.headers.get("Authorization") or self.headers.get("X-Api-Key")
        report = None
        if not self.server.config.api_key or given:
            self._authorize()
            report = self.server.core.status_report()
        nonce = base64.b64encode(os.urandom(16)).decode("ascii")
        body = status_page(report, nonce).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", PAGE_POLICY % nonce)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self._common_headers()
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 200
        if self.command != "HEAD":
            self.wfile.write(body)

    def _list_models(self) -> None:
        self.send_json(200, model_list(anthropic_client(self.headers)))

    def _get_model(self, model_id: str) -> None:
        model = find_model(model_id, anthropic_client(self.headers))
        if model is None:
            raise ProxyError(404, "The model `%s` does not exist." % model_id,
                             code="model_not_found", param="model")
        self.send_json(200, model)

    def _get_response(self, response_id: str) -> None:
        self.send_json(200, self.server.core.stored_response(response_id))

    def _delete_response(self, response_id: str) -> None:
        self.server.core.delete_response(response_id)
        self.send_json(200, {"id": response_id, "object": "response", "deleted": True})

    def _preflight(self) -> None:
        self.send_response(204)
        self._cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers")
                         or "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "86400")
        self.end_headers()
        self.status_sent = 204

    # -- turns: each door's requests --------------------------------------------

    def _turn(self, door: str) -> None:
        self.server.core.answer(door, self._read_json_text, HttpSink(self), self.record)

    def _count_tokens(self) -> None:
        tokens = self.server.core.count_tokens(self._read_json_text)
        self.send_json(200, {"input_tokens": tokens}, headers={ESTIMATE_HEADER: "true"})

    # -- response writing ------------------------------------------------------

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.chunked = self.request_version == "HTTP/1.1"
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True  # HTTP/1.0 knows no chunks: the close ends the stream
        self.send_header("X-Accel-Buffering", "no")
        self._common_headers()
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 200

    def write_chunk(self, data: bytes) -> None:
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if data:
            self.wfile.write(data)

    def send_json(self, status: int, payload: Any, headers: Optional[Dict[str, str]] = None) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()
        self.headers_sent = True
        self.status_sent = status
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, error: ProxyError) -> None:
        self.record.error = error.code or error.type
        if self.headers_sent:
            self.close_connection = True
            return
        if error.status >= 500 or error.status == 429:
            log.warning("%s %s: %s", self.request_id, error.status, error.message)
        try:
            status, body = self.error_reply(error)
            self.send_json(status, body, error.headers)
        except ClientGone:
            self.close_connection = True

    def _common_headers(self) -> None:
        self.send_header("X-Request-Id", self.request_id)
        for name, value in self.server.core.headers().items():
            self.send_header(name, value)
        self._cors_headers()
        if self.close_connection:
            self.send_header("Connection", "close")

    def _cors_headers(self) -> None:
        origin = self.server.config.cors
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            if origin != "*":
                self.send_header("Vary", "Origin")

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (headers too long, 501 ...) in the OpenAI shape too."""
        self._refuse(ProxyError(code, message or self.responses.get(code, ("Error",))[0],
                                code="http_%d" % code))

    def _timed_out(self) -> None:
        self._refuse(ProxyError(408, "The request did not arrive within %g s." % self.timeout,
                                code="request_timeout"))

    def _refuse(self, error: ProxyError) -> None:
        """Answer a request that could not be read as one, and close: nothing after it can be trusted."""
        self.close_connection = True
        self._send_error(error)

    # -- request body --------------------------------------------------------

    def _read_json_text(self) -> bytes:
        """The body, once a cheap count shows it is no flood of tiny values (see MAX_JSON_VALUES)."""
        text = self._read_body()
        if json_value_count(text) > MAX_JSON_VALUES:
            raise ProxyError(413, "The request body holds more than %d JSON values." % MAX_JSON_VALUES,
                             code="too_many_json_values")
        return text

    def _read_body(self) -> bytes:
        limit = self.server.config.max_body
        if self.framing.chunked:
            return self._read_chunked_body(limit)
        length = self.framing.length
        if length is None:
            self.close_connection = True
            raise ProxyError(411, "A Content-Length header is required.", code="length_required")
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for a next request
            raise self._too_large(limit)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ClientGone()
        return body

    def _read_chunked_body(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            match = CHUNK_SIZE_LINE.fullmatch(self._chunk_line())
            if match is None:
                raise self._malformed_chunks()
            size = int(match.group(1), 16)
            if size == 0:
                break
            if len(body) + size > limit:
                self.close_connection = True
                raise self._too_large(limit)
            chunk = self.rfile.read(size + 2)
            if len(chunk) < size + 2:
                raise ClientGone()
            if chunk[size:] != b"\r\n":
                raise self._malformed_chunks()
            body += memoryview(chunk)[:size]
        for _ in range(MAX_TRAILER_LINES):
            if self._chunk_line() == b"\r\n":  # the end of the trailers (which we ignore)
                return bytes(body)
        raise self._malformed_chunks()

    def _chunk_line(self) -> bytes:
        line = self.rfile.readline(MAX_CHUNK_LINE)
        if not line.endswith(b"\n"):
            if len(line) < MAX_CHUNK_LINE:
                raise ClientGone()  # it hung up mid-line
            raise self._malformed_chunks()
        return line

    def _malformed_chunks(self) -> ProxyError:
        self.close_connection = True
        return invalid("Malformed chunked request body.", code="invalid_body")

    @staticmethod
    def _too_large(limit: int) -> ProxyError:
        return ProxyError(413, "The request body is larger than %d bytes (--max-body)." % limit,
                          code="request_too_large")

    def _discard_body(self) -> None:
        """Skip a body we will not use, so a kept-alive connection stays in step."""
        length = self.framing.length or 0
        if self.close_connection or self.framing.chunked or length > self.server.config.max_body:
            self.close_connection = True  # whatever is left unread goes with the connection
        elif length and len(self.rfile.read(length)) < length:
            raise ClientGone()

    # -- logging ---------------------------------------------------------------

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one access line per request comes from _log_access instead

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _log_access(self, method: str) -> None:
        """The request's access line, and for a turn its record on the status page."""
        record = self.record
        usage = record.usage or {}
        total_ms = (time.monotonic() - self.started) * 1000
        log.info("%s %s %s %s model=%s%s input_tokens=%s cached_tokens=%s output_tokens=%s %.0fms",
                 self.request_id, method, self.path.split("?", 1)[0], self.status_sent,
                 record.model, " error=" + record.error if record.error else "",
                 usage.get("input_tokens", "-"), usage.get("cache_read_input_tokens", "-"),
                 usage.get("output_tokens", "-"), total_ms)
        self.server.core.finished(record, self.status_sent, self.started)


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

# macOS refuses a soft open-file limit above OPEN_MAX, and its hard limit may be unlimited.
OPEN_MAX = 10240
# Files the proxy keeps open besides connections (listening socket, logs, image fetches ...),
# and what each claude child takes (its three pipes and a selector).
SPARE_FILES = 64
FILES_PER_CHILD = 6
# errno values of an accept() that failed for want of files or memory: the backlog stays
# readable, so retrying at once would spin.
ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files toward the hard one: launchd starts services with 256."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_MAX if hard == resource.RLIM_INFINITY else min(hard, OPEN_MAX)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)


# glibc's malloc maps a block of over 128 KiB on its own and unmaps it when it is freed, but each
# such free raises that threshold to the block's size (up to 32 MiB): the next bodies, images and
# stdin lines of a burst then come from its heaps, which give memory back only from their top, so
# after ten fetched images the proxy stayed 180 MB above idle for good. Setting the threshold keeps
# it where it is. macOS's malloc gives large blocks back by itself; a libc without mallopt (musl)
# keeps its own ways.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def keep_large_blocks_returnable() -> None:
    """On glibc, map every block over MMAP_THRESHOLD on its own, so what a burst frees goes back."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes  # only here: nowhere else does the proxy reach into C
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused: freed memory may stay with the proxy")


def open_file_limit() -> Optional[int]:
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(config: Config, file_limit: Optional[int]) -> int:
    """--max-connections, lowered so connections and children together stay under the file limit."""
    cap = max(1, config.max_connections)
    if file_limit is not None:
        children = max(1, config.max_concurrent) + max(0, config.pool_size)
        cap = min(cap, max(1, file_limit - SPARE_FILES - FILES_PER_CHILD * children))
    return cap


def refusal_bytes(error: ProxyError) -> bytes:
    """A whole HTTP response for `error`, for a connection no handler will serve."""
    body = json.dumps(error.body()).encode("utf-8")
    head = ["HTTP/1.1 %d %s" % (error.status, http.client.responses.get(error.status, "Error")),
            "Content-Type: application/json", "Content-Length: %d" % len(body), "Connection: close"]
    head += ["%s: %s" % header for header in error.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class ProxyServer(ThreadingHTTPServer):
    """The HTTP edge: the listening socket, its limits on connections, and a handler thread per
    connection, each answering through the core (by default a new Core on a new Runner). The
    core's runtime is opened once the port is the server's, and closed by shutdown_gracefully()."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's listen backlog of 5 resets connections when dozens of clients connect at once.
    request_queue_size = 128
    # Seconds to wait before accepting again when accept() found no file or memory left.
    accept_backoff = 0.5

    def __init__(self, config: Config, core: Optional[Core] = None) -> None:
        self.config = config
        self.core = core if core is not None else Core(config, Runner(config))
        self._lock = threading.Lock()
        self.max_connections = connection_cap(config, open_file_limit())
        if self.max_connections < config.max_connections:
            log.warning("at most %d connections at once (not %d): the open-file limit is %s",
                        self.max_connections, config.max_connections, open_file_limit())
        self.connections = 0
        # Connections that have not sent a request line yet, oldest first: at the cap they give
        # way to a new one, so that a pile of silent ones cannot lock everyone out.
        self._silent: Dict[socket.socket, None] = {}
        self._accept_failing = False
        self._too_many = refusal_bytes(ProxyError(
            503, "The proxy has %d connections open already (--max-connections); retry shortly."
            % self.max_connections, code="too_many_connections", headers={"Retry-After": "1"}))
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.address_family = family
        super().__init__((config.host, config.port), ProxyHandler)
        try:
            self.core.open()  # once the port is ours: a proxy that cannot start touches nothing
        except BaseException:
            self.server_close()
            raise

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for our fully qualified name, which can
        # stall start-up for seconds on a Mac with a slow resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    # -- connections -----------------------------------------------------------

    def get_request(self) -> Tuple[socket.socket, Any]:
        try:
            accepted = super().get_request()
        except OSError as error:
            if error.errno in ACCEPT_EXHAUSTED:
                if not self._accept_failing:  # once per burst: the next success says it is over
                    log.warning("cannot accept connections: %s; retrying every %g s",
                                error, self.accept_backoff)
                self._accept_failing = True
                time.sleep(self.accept_backoff)
            raise  # socketserver drops this attempt
        if self._accept_failing:
            log.warning("accepting connections again")
            self._accept_failing = False
        return accepted

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            silent = None if self.connections < self.max_connections else self._silent_one()
            admitted = self.connections < self.max_connections or silent is not None
            if admitted:
                self.connections += 1  # one over the cap until the silent one's thread ends
                self._silent[request] = None
        if silent is not None:
            log.debug("closed a connection that sent no request line, to make room for a new one")
            try:
                silent.shutdown(socket.SHUT_RDWR)  # its handler reads end-of-file and ends
            except OSError:
                pass
        if not admitted:
            self._refuse_connection(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_closed(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed(request)

    def _silent_one(self) -> Optional[socket.socket]:
        """The oldest connection that has sent no request line, taken out of the list; None if none
        is waiting for its line (one whose bytes have just come is left to its handler)."""
        for sock in self._silent:
            # Not sock.recv(MSG_PEEK): on a socket with a timeout, Python waits for data first.
            with selectors.DefaultSelector() as selector:
                try:
                    selector.register(sock, selectors.EVENT_READ)
                except (ValueError, OSError):
                    continue  # its handler has just closed it, and ends
                if selector.select(0):
                    continue  # bytes (or its close) just came: its handler reads them now
            del self._silent[sock]
            return sock
        return None

    def heard_from(self, request: socket.socket) -> None:
        """A connection sent a request line: it no longer gives way at the cap."""
        with self._lock:
            self._silent.pop(request, None)

    def _connection_closed(self, request: socket.socket) -> None:
        with self._lock:
            self.connections -= 1
            self._silent.pop(request, None)

    def _refuse_connection(self, request: socket.socket) -> None:
        """A 503 at once, from the accepting thread, without waiting on the client in any way."""
        try:
            request.setblocking(False)
            request.recv(65536)  # what already came: unread, it would turn the close into a reset
        except OSError:
            pass
        try:
            request.send(self._too_many)  # a new connection's send buffer has room for it
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ClientGone, socket.timeout)):
            log.debug("client %s went away: %s", client_address, error)
        else:
            log.exception("error while serving %s", client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def shutdown_gracefully(self) -> None:
        """End every child and stop serving; call it from any thread but serve_forever's."""
        self.core.close()
        self.shutdown()


def startup_warnings(config: Config) -> List[str]:
    warnings = []
    if not is_loopback_name(config.host.lower()) and not config.api_key:
        warnings.append(
            "!!! Listening on %s without --api-key: anyone who can reach this port can use your "
            "Claude subscription. Bind 127.0.0.1 or set --api-key. !!!" % config.host)
    present = [name for name in STRIPPED_ENV if os.environ.get(name)]
    if present and config.allow_api_key:
        warnings.append("%s is set and --allow-api-key is on: requests may be billed per token "
                        "to that key instead of your subscription." % " and ".join(present))
    elif present:
        warnings.append("%s is set in this environment; it is removed from the claude child so "
                        "your subscription is used (pass --allow-api-key to keep it)."
                        % " and ".join(present))
    if find_claude(config.claude_bin) is None:
        warnings.append(claude_not_found(config.claude_bin).message)
    return warnings


LOG_FILE_BYTES = 10 * MIB
LOG_FILE_BACKUPS = 3


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose every file is the owner's alone: it names models, clients and
    errors, and whatever the umask says, other users have no business reading it."""

    def _open(self) -> Any:  # the one place RotatingFileHandler opens a file, at start and rotation
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # a file an older version left readable
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def log_handler(log_file: str, max_bytes: int = LOG_FILE_BYTES) -> logging.Handler:
    """stderr, or a file that rotates by size: launchd never rotates what it captures."""
    if not log_file:
        return logging.StreamHandler(sys.stderr)
    path = os.path.expanduser(log_file)
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    return PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=LOG_FILE_BACKUPS,
                                      encoding="utf-8")


def setup_logging(config: Config) -> None:
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[log_handler(config.log_file)])


def serve(config: Config) -> int:
    raise_open_file_limit()
    keep_large_blocks_returnable()
    server = ProxyServer(config)
    for warning in startup_warnings(config):
        log.warning(warning)

    def on_signal(signum: int, _frame: Any) -> None:
        # The handler interrupts serve_forever's own thread, which shutdown() waits for.
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown_gracefully, daemon=True).start()

    # Children run in sessions of their own, so a hangup or quit never reaches them: all
    # four signals end the proxy the same way, taking every child with it.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, on_signal)
    base = "http://%s:%d" % ("[%s]" % config.host if ":" in config.host else config.host, server.port)
    log.info("claude-max-proxy %s listening: OpenAI clients %s/v1, Anthropic clients %s, status page %s/",
             __version__, base, base, base)
    try:
        server.serve_forever()
    finally:
        server.core.close()
        server.server_close()
    return 0


# ===========================================================================
# SERVICE COMMANDS: install, uninstall, status, doctor, and main()
# ===========================================================================

# ---------------------------------------------------------------------------
# Running as a service: install, uninstall, status, doctor
# ---------------------------------------------------------------------------

SERVICE_LABEL = "com.claude-max-api"
SYSTEMD_UNIT = "claude-max-api.service"
# launchd and systemd start a service with about this PATH and nothing else.
BASE_PATH = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
HEALTH_WAIT = 15.0
# Apple's /usr/bin/python3 is a stub that runs the Command Line Tools' (or Xcode's)
# Python, and sys.executable names that inner binary, which moves with Xcode updates.
APPLE_PYTHON_HOMES = ("/Library/Developer/CommandLineTools/", "/Applications/Xcode")


class ServiceError(Exception):
    """install or uninstall could not go on; the message says why."""


class Ran(NamedTuple):
    """What a command did: code 127 when it could not start, 124 when it timed out."""
    code: int
    out: str
    err: str


def current_python() -> str:
    if not sys.executable or sys.executable.startswith(APPLE_PYTHON_HOMES):
        return "/usr/bin/python3"
    return sys.executable


class System:
    """Everything install, uninstall, status and doctor touch outside this process:
    commands, the platform, the home directory, the uid, files under home.

    Tests pass a subclass with a temporary home and a run() that answers for
    launchctl, systemctl and `claude auth status`. The HTTP probes (/health, is
    the port free) stay real: tests aim them at real servers on loopback.
    """

    def __init__(self, home: Optional[str] = None, platform: Optional[str] = None,
                 uid: Optional[int] = None, environ: Optional[Dict[str, str]] = None,
                 python: Optional[str] = None, script: Optional[str] = None) -> None:
        self.home = home or os.path.expanduser("~")
        self.platform = platform or sys.platform
        self.uid = os.getuid() if uid is None else uid
        self.environ = dict(os.environ if environ is None else environ)
        self.python = python or current_python()
        self.script = script or os.path.abspath(__file__)

    def run(self, argv: List[str], env: Optional[Dict[str, str]] = None,
            timeout: float = 30.0) -> Ran:
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except OSError as error:
            return Ran(127, "", "%s: %s" % (argv[0], error))
        except subprocess.TimeoutExpired:
            return Ran(124, "", "`%s` did not finish within %g s" % (shlex.join(argv), timeout))
        return Ran(done.returncode, done.stdout.decode("utf-8", "replace"),
                   done.stderr.decode("utf-8", "replace"))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        # Owner-only, like everything install writes: the API key file above all.
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)

    def makedirs(self, path: str) -> None:
        """An owner-only directory (the service's logs go there)."""
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)

    def remove(self, path: str) -> None:
        os.unlink(path)


# -- what install and uninstall do, step by step, so --dry-run can show it ---

class WriteFile:
    """A file, owner-only; a `secret` one's content is never printed, not even by --dry-run."""

    def __init__(self, path: str, data: bytes, secret: bool = False) -> None:
        self.path = path
        self.data = data
        self.secret = secret

    def describe(self) -> str:
        return "write %s" % self.path

    def shown(self) -> str:
        return "(the API key)" if self.secret else self.data.decode("utf-8").rstrip("\n")

    def apply(self, system: System) -> None:
        system.write(self.path, self.data)


class MakeDir:
    def __init__(self, path: str) -> None:
        self.path = path

    def describe(self) -> str:
        return "create directory %s" % self.path

    def apply(self, system: System) -> None:
        system.makedirs(self.path)


class RemoveFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def describe(self) -> str:
        return "remove %s" % self.path

    def apply(self, system: System) -> None:
        system.remove(self.path)


class Run:
    """A command that must succeed; with `only_if`, run only when that query succeeds."""

    def __init__(self, argv: List[str], only_if: Optional[List[str]] = None) -> None:
        self.argv = argv
        self.only_if = only_if

    def describe(self) -> str:
        text = "run %s" % shlex.join(self.argv)
        if self.only_if:
            text += "   (only if `%s` succeeds)" % shlex.join(self.only_if)
        return text

    def apply(self, system: System) -> None:
        if self.only_if and system.run(self.only_if).code != 0:
            return
        ran = system.run(self.argv)
        if ran.code != 0:
            raise ServiceError("`%s` failed (exit %d): %s"
                               % (shlex.join(self.argv), ran.code, (ran.err or ran.out).strip()))


class AwaitGone:
    """Waits until a query fails: launchctl bootout returns before launchd lets go of the
    label, and a bootstrap straight after it fails ("Bootstrap failed: 5")."""

    POLL = 0.2

    def __init__(self, query: List[str], wait: float = 10.0) -> None:
        self.query = query
        self.wait = wait

    def describe(self) -> str:
        return "wait until `%s` fails" % shlex.join(self.query)

    def apply(self, system: System) -> None:
        deadline = time.monotonic() + self.wait
        while system.run(self.query).code == 0:
            if time.monotonic() >= deadline:
                raise ServiceError("`%s` still succeeds after %g s" % (shlex.join(self.query), self.wait))
            time.sleep(self.POLL)


Action = Union[WriteFile, MakeDir, RemoveFile, Run, AwaitGone]


def apply_action(system: System, action: Action) -> None:
    """One step; a file that cannot be written (a read-only home, say) stops it with a FAIL line."""
    try:
        action.apply(system)
    except OSError as error:
        raise ServiceError("could not %s: %s" % (action.describe(), error))


def perform(system: System, actions: List[Action], dry_run: bool) -> None:
    for action in actions:
        if dry_run:
            print("would " + action.describe())
            if isinstance(action, WriteFile):
                print("    " + action.shown().replace("\n", "\n    "))
        else:
            print(action.describe())
            apply_action(system, action)


# -- what the service runs -------------------------------------------------

def in_home(home: str, path: str) -> str:
    return home + path[1:] if path.startswith("~") else path


def service_path(home: str, claude: Optional[str]) -> str:
    """The service's PATH: where `claude` is now, then every usual install place."""
    dirs = [os.path.dirname(claude)] if claude else []
    dirs += [in_home(home, d) for d in CLAUDE_INSTALL_DIRS] + list(BASE_PATH)
    return os.pathsep.join(dict.fromkeys(dirs))  # in order, each once


def service_args(config: Config) -> List[str]:
    """The serve flags that differ from their defaults, and always the port.

    A service gets no shell environment, so a setting taken from CLAUDE_PROXY_*
    now is written out as its flag.
    """
    args: List[str] = []
    for flag, _env, kind, default, _help in OPTIONS:
        value = getattr(config, flag_attr(flag))
        if kind is bool:
            args += [flag] if value else []
        elif value != default or flag == "--port":
            args += [flag, str(value)]
    return args


def with_setting(config: Config, **values: Any) -> Config:
    return Config(**dict(vars(config), **values))


API_KEY_FILE = "api-key"


def key_to_file(config: Config, key_path: str) -> Tuple[Config, List[Action]]:
    """The service's settings with its API key moved into an owner-only file, and the step that
    writes it. On the command line the key would show in `ps` to every local user, and in the
    service's file it would show in every --dry-run and every pasted plist or unit."""
    if config.api_key and config.api_key_file:
        raise ServiceError("give --api-key or --api-key-file, not both")
    if not config.api_key:
        return config, []
    return (with_setting(config, api_key="", api_key_file=key_path),
            [WriteFile(key_path, (config.api_key + "\n").encode("utf-8"), secret=True)])


class LaunchAgent:
    """macOS: a LaunchAgent in ~/Library/LaunchAgents, loaded into the login session."""

    kind = "LaunchAgent"

    def __init__(self, system: System) -> None:
        self.system = system
        self.path = os.path.join(system.home, "Library", "LaunchAgents", SERVICE_LABEL + ".plist")
        self.logs = os.path.join(system.home, "Library", "Logs", "claude-max-api")
        self.key_path = os.path.join(system.home, "Library", "Application Support", "claude-max-api",
                                     API_KEY_FILE)
        self.domain = "gui/%d" % system.uid
        self.service = "%s/%s" % (self.domain, SERVICE_LABEL)
        self.logs_hint = "the logs in %s" % self.logs

    def render(self, config: Config, claude: Optional[str]) -> bytes:
        if not config.log_file:  # launchd never rotates StandardErrorPath; the proxy's own log does
            config = with_setting(config, log_file=os.path.join(self.logs, "claude-max-proxy.log"))
        return plistlib.dumps({
            "Label": SERVICE_LABEL,
            "ProgramArguments": [self.system.python, self.system.script] + service_args(config),
            "EnvironmentVariables": {"PATH": service_path(self.system.home, claude),
                                     "PYTHONUNBUFFERED": "1"},
            "RunAtLoad": True,
            "KeepAlive": True,
            "ThrottleInterval": 10,
            "ProcessType": "Interactive",
            "StandardOutPath": os.path.join(self.logs, "stdout.log"),
            "StandardErrorPath": os.path.join(self.logs, "stderr.log"),
        })

    def install_actions(self, config: Config, claude: Optional[str]) -> List[Action]:
        # bootstrap refuses a label that is already loaded, so an update boots the old one out.
        return [MakeDir(self.logs), WriteFile(self.path, self.render(config, claude)),
                self._bootout(), AwaitGone(["launchctl", "print", self.service]),
                Run(["launchctl", "bootstrap", self.domain, self.path])]

    def uninstall_actions(self) -> List[Action]:
        return [self._bootout(), RemoveFile(self.path)]

    def _bootout(self) -> Run:
        return Run(["launchctl", "bootout", self.service],
                   only_if=["launchctl", "print", self.service])

    def unreachable(self) -> Optional[str]:
        return None  # every macOS login session has launchd; bootstrap says what goes wrong

    def service_pid(self) -> Optional[int]:
        """The pid launchd runs the service as, or None when it runs none now."""
        ran = self.system.run(["launchctl", "print", self.service])
        found = re.search(r"^\s*pid = (\d+)\s*$", ran.out, re.M)
        return int(found.group(1)) if ran.code == 0 and found else None

    def loaded(self) -> Tuple[Optional[bool], str]:
        ran = self.system.run(["launchctl", "print", self.service])
        if ran.code == 127:
            return None, ran.err.strip()
        return ran.code == 0, "loaded" if ran.code == 0 else "not loaded"


SYSTEMD_TEMPLATE = """\
[Unit]
Description=claude-max-proxy: the OpenAI and Anthropic APIs over the Claude Code CLI
After=network.target

[Service]
ExecStart={exec_start}
Environment={path}
Environment=PYTHONUNBUFFERED=1
Restart=always
RestartSec=10

[Install]
WantedBy=default.target
"""


def unit_quote(value: str) -> str:
    """A word of a systemd unit line: % starts a specifier there, quotes group words."""
    value = value.replace("%", "%%")
    if value and not re.search(r"[\s\"'\\;]", value):
        return value
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def exec_start(argv: List[str]) -> str:
    return " ".join(unit_quote(arg.replace("$", "$$")) for arg in argv)  # ExecStart expands $VAR


class SystemdUnit:
    """Linux: a systemd user unit, started at login with the user's session."""

    kind = "systemd user unit"

    def __init__(self, system: System) -> None:
        self.system = system
        config_home = system.environ.get("XDG_CONFIG_HOME") or os.path.join(system.home, ".config")
        self.path = os.path.join(config_home, "systemd", "user", SYSTEMD_UNIT)
        self.key_path = os.path.join(config_home, "claude-max-api", API_KEY_FILE)
        self.logs_hint = "`journalctl --user -u %s`" % SYSTEMD_UNIT

    def render(self, config: Config, claude: Optional[str]) -> bytes:
        # No --log-file by default: the journal keeps stderr and rotates it.
        argv = [self.system.python, self.system.script] + service_args(config)
        path = "PATH=" + service_path(self.system.home, claude)
        return SYSTEMD_TEMPLATE.format(exec_start=exec_start(argv),
                                       path=unit_quote(path)).encode("utf-8")

    def install_actions(self, config: Config, claude: Optional[str]) -> List[Action]:
        # try-restart before enable --now: a running old version restarts with the new
        # unit, and a fresh install starts once.
        return [WriteFile(self.path, self.render(config, claude)), self._systemctl("daemon-reload"),
                self._systemctl("try-restart", SYSTEMD_UNIT),
                self._systemctl("enable", "--now", SYSTEMD_UNIT)]

    def uninstall_actions(self) -> List[Action]:
        return [self._systemctl("disable", "--now", SYSTEMD_UNIT), RemoveFile(self.path),
                self._systemctl("daemon-reload")]

    @staticmethod
    def _systemctl(*args: str) -> Run:
        return Run(["systemctl", "--user"] + list(args))

    def unreachable(self) -> Optional[str]:
        """Why systemctl --user cannot work here (no user session bus), or None."""
        loaded, detail = self.loaded()
        return detail if loaded is None else None

    def service_pid(self) -> Optional[int]:
        """The pid systemd runs the service as, or None when it runs none now."""
        ran = self.system.run(["systemctl", "--user", "show", "--property", "MainPID", "--value",
                               SYSTEMD_UNIT])
        pid = ran.out.strip()
        return int(pid) if ran.code == 0 and pid.isdigit() and pid != "0" else None

    def loaded(self) -> Tuple[Optional[bool], str]:
        ran = self.system.run(["systemctl", "--user", "is-active", SYSTEMD_UNIT])
        state = ran.out.strip()
        if ran.code == 127 or not state:  # no systemctl, or no user session bus to ask
            return None, (ran.err or ran.out).strip() or "systemctl said nothing"
        return state == "active", state


ServiceManager = Union[LaunchAgent, SystemdUnit]


def service_manager(system: System) -> Optional[ServiceManager]:
    if system.platform == "darwin":
        return LaunchAgent(system)
    if system.platform.startswith("linux"):
        return SystemdUnit(system)
    return None


def without_a_manager(system: System, config: Config) -> str:
    """What to do where systemctl --user cannot reach a user manager (su, sudo, cron, an ssh
    login without one): get one, or run the proxy without it."""
    keyed = bool(config.api_key)  # the key itself never: this line goes to a screen and a crontab
    config = with_setting(config, api_key="", log_file=config.log_file
                          or os.path.join(system.home, "claude-max-proxy.log"))
    command = " ".join([shlex.quote(system.python), shlex.quote(system.script)]
                       + [shlex.quote(arg) for arg in service_args(config)])
    return ("systemctl --user needs your login session's user manager: log in as this user "
            "directly (not su or sudo), and for one that lasts without a login run "
            "`sudo loginctl enable-linger %s`, then install again. Or run the proxy without "
            "a service: `nohup %s >/dev/null 2>&1 &`, and to start it at boot add "
            "`@reboot %s` to `crontab -e`%s."
            % (system.environ.get("USER") or "$USER", command, command,
               ", each with --api-key-file naming a file only you can read that holds your key"
               if keyed else ""))


def required_manager(system: System) -> ServiceManager:
    manager = service_manager(system)
    if manager is None:
        raise ServiceError("install and uninstall know macOS (launchd) and Linux (systemd), "
                           "not %s; run the proxy by hand or under your own supervisor."
                           % system.platform)
    return manager


# -- talking to the running proxy -------------------------------------------

def health_url(config: Config) -> str:
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    return "http://%s:%d/health" % ("[%s]" % host if ":" in host else host, config.port)


def status_url(config: Config) -> str:
    return health_url(config).rsplit("/", 1)[0] + "/status"


def fetch_health(url: str, timeout: float = 2.0, key: str = "") -> Optional[Dict[str, Any]]:
    """The proxy's /health answer (or its status report, a superset, at /status with its key),
    or None when no claude-max-proxy answers there."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via http_proxy
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + key} if key else {})
    try:
        with opener.open(request, timeout=timeout) as response:
            health = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:  # a refusal (401 without the key, 404 from an older proxy)
        error.close()
        return None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return health if isinstance(health, dict) and "pid" in health else None


def wait_for_health(url: str, wait: float) -> Optional[Dict[str, Any]]:
    deadline = time.monotonic() + wait
    while True:
        health = fetch_health(url, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        if health is not None or time.monotonic() >= deadline:
            return health
        time.sleep(0.25)


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def find_port_holder(port: int) -> str:
    return ("find it with `lsof -nP -iTCP:%d -sTCP:LISTEN` and stop it, or choose another --port"
            % port)


def self_command() -> str:
    return "python3 %s" % os.path.basename(__file__)


def port_in_use(config: Config) -> str:
    """Why the proxy cannot listen, when its port is taken: by claude-max-proxy already
    (its /health says so), or by another program; and what to do."""
    where = "%s:%d" % (config.host, config.port)
    health = fetch_health(health_url(config))
    if health is None:
        return "%s is in use by another program: %s" % (where, find_port_holder(config.port))
    return ("claude-max-proxy %s is already serving on %s (pid %s): use it, or stop it "
            "(`%s uninstall` if install started it, else `kill %s`), or give this one "
            "another --port" % (health.get("version"), where, health["pid"], self_command(),
                                health["pid"]))


def describe_health(health: Dict[str, Any]) -> str:
    claude = health.get("claude") or {}
    return ("pid %s, up %s, version %s, %s requests served, %s of %s children active; claude %s"
            % (health.get("pid"), format_duration(health.get("uptime_s") or 0),
               health.get("version"), health.get("requests_served"),
               health.get("active_children"), health.get("max_concurrent"),
               "%s at %s" % (claude.get("version"), claude.get("path")) if claude.get("found")
               else "NOT FOUND"))


def text_bar(fill: Optional[float], width: int = 20) -> str:
    """The status page's bar in ASCII, which every terminal shows."""
    filled = round((fill or 0.0) * width)
    return "[%s%s]" % ("#" * filled, "." * (width - filled))


def describe_limits(health: Dict[str, Any]) -> List[str]:
    """Two lines per usage window the running proxy knows of: its state with reset times in UTC
    and local time, and its bar with the reset counting down."""
    windows = (health.get("usage_limits") or {}).get("windows") or {}
    if not windows:
        return ["nothing reported yet (Claude Code reports it with answers on a subscription login)"]
    lines = []
    now = time.time()
    for name, window in sorted(windows.items()):
        used = window.get("utilization")
        reset = window.get("resets_at_unix")
        lines.append("%s: %s%s%s%s" % (
            WINDOW_NAMES.get(name, name), window.get("status"),
            ", %d%% used" % round(used * 100) if isinstance(used, (int, float)) else "",
            ", resets %s (local time %s)" % (window.get("resets_at"), time.strftime(
                "%a %Y-%m-%d %H:%M %Z", time.localtime(reset))) if isinstance(reset, int) else "",
            ", EXTRA USAGE IN USE" if window.get("extra_usage_in_use") else ""))
        fill = window_fill(window)
        lines.append("  %s %s, %s" % (text_bar(fill), "%3d%% used" % round(fill * 100) if fill is not None
                                       else "not near its limit", reset_text(window, now)))
    return lines


def describe_activity(report: Dict[str, Any]) -> List[Tuple[str, str]]:
    """Who pays, the CLI, the processes and the requests served, as `status` prints them: the
    status page's facts (the requests only from its twin, which takes the key)."""
    payer, meaning, guard = billing_text(report)
    claude = report.get("claude") or {}
    if "requests" in report:
        requests = "; ".join("%s %s: %d%s" % (row["door"], row["model"], row["count"],
                                               " (%d failed)" % row["failed"] if row["failed"] else "")
                             for row in report["requests"]) or "none yet"
    else:
        requests = ("per door and model only with the proxy's key (--api-key, %s or --api-key-file)"
                    % PROXY_KEY_ENV)
    return [("paying", "%s, %s; --no-extra-usage %s" % (payer, meaning, guard)),
            ("claude", "probe %s, logged in %s%s" % (probe_text(claude), login_text(claude),
                                                      "; " + claude["problem"] if claude.get("problem") else "")),
            ("processes", "%s; %s" % (children_text(report), pool_text(report))),
            ("requests", requests)]


# -- the commands --------------------------------------------------------------

def removal_actions(system: System, manager: ServiceManager) -> List[Action]:
    """What uninstall does: the manager's steps, and the key file when install wrote one."""
    key = [RemoveFile(manager.key_path)] if system.exists(manager.key_path) else []
    return manager.uninstall_actions() + key


def with_absolute_paths(config: Config) -> Config:
    """A service starts in /, so paths given relative to here must be made absolute."""
    claude_bin = config.claude_bin
    absolute = {name: os.path.abspath(getattr(config, name))
                for name in ("log_file", "api_key_file") if getattr(config, name)}
    return with_setting(config, claude_bin=os.path.abspath(claude_bin) if os.sep in claude_bin
                        else claude_bin, **absolute)


def install(system: System, config: Config, dry_run: bool, wait: float = HEALTH_WAIT) -> int:
    manager = required_manager(system)
    config = with_absolute_paths(config)
    claude = find_claude(config.claude_bin)
    if claude is None:
        print("WARN  %s The service will still look in the usual install places."
              % claude_not_found(config.claude_bin).message)
    problem = manager.unreachable()
    if problem and dry_run:
        print("WARN  the %s could not be installed here: %s. %s"
              % (manager.kind, problem, without_a_manager(system, config)))
    elif problem:  # found before anything is written, so a failed install leaves nothing behind
        raise ServiceError("cannot install the %s: %s. Nothing was written. %s"
                           % (manager.kind, problem, without_a_manager(system, config)))
    fresh = not system.exists(manager.path)
    config, key_actions = key_to_file(config, manager.key_path)
    try:
        perform(system, key_actions + manager.install_actions(config, claude), dry_run)
    except ServiceError as error:
        if not fresh:
            raise ServiceError("%s. The new %s stays in %s: fix the cause and install again, or uninstall."
                               % (error, manager.kind, manager.path))
        for action in removal_actions(system, manager):  # a new install that failed leaves nothing
            try:
                apply_action(system, action)
            except ServiceError:
                pass
        raise ServiceError("%s. %s is removed again." % (error, manager.path))
    url = health_url(config)
    if dry_run:
        print("would wait up to %g s for %s" % (wait, url))
        return 0
    health = wait_for_health(url, wait)
    if health is None:
        print("FAIL  the %s is installed, but nothing answered %s within %g s. Look at %s, "
              "and run `%s doctor`." % (manager.kind, url, wait, manager.logs_hint, self_command()))
        return 1
    # A proxy started by hand answers too, while the service cannot bind its port. The service
    # manager may know the proxy's parent instead (a python3 that is a shim starting the real one).
    service_pid = manager.service_pid()
    if service_pid is None or service_pid not in (health["pid"], health.get("ppid")):
        print("FAIL  the %s is installed, but the claude-max-proxy answering %s is pid %s, not the "
              "service (%s): one started by hand holds the port, so the service cannot listen. "
              "Stop it (`kill %s`), and the service takes the port within about ten seconds."
              % (manager.kind, url, health["pid"], "pid %d" % service_pid if service_pid
                 else "not running", health["pid"]))
        return 1
    print("OK    claude-max-proxy answers %s: %s" % (url, describe_health(health)))
    return 0


def uninstall(system: System, dry_run: bool) -> int:
    manager = required_manager(system)
    if not system.exists(manager.path):
        print("nothing to uninstall: %s does not exist" % manager.path)
        return 0
    perform(system, removal_actions(system, manager), dry_run)
    if isinstance(manager, LaunchAgent):
        print("the logs stay in %s" % manager.logs)
    return 0


def status_key(system: System, config: Config, manager: Optional[ServiceManager]) -> str:
    """The key for the status report: the one given, else the installed service's key file."""
    path = config.api_key_file or (manager.key_path if manager is not None else "")
    if config.api_key or not path or not system.exists(os.path.expanduser(path)):
        return config.api_key
    keyed = with_setting(config, api_key_file=path)
    try:
        load_api_key_file(keyed)
    except (OSError, ValueError):
        return ""
    return keyed.api_key


def status(system: System, config: Config) -> int:
    manager = service_manager(system)
    if manager is None:
        print("installed: no service support on %s" % system.platform)
    else:
        installed = system.exists(manager.path)
        print("installed: %s" % ("yes, " + manager.path if installed else "no"))
        loaded, detail = manager.loaded()
        print("loaded:    %s" % ({True: "yes", False: "no"}.get(loaded, "unknown") + " (%s)" % detail))
    url = health_url(config)
    # Without the key, /health tells all but the requests.
    health = fetch_health(status_url(config), key=status_key(system, config, manager)) or fetch_health(url)
    print("answering: %s" % ("yes, " + url if health else "no, nothing at " + url))
    if health is None:
        return 1
    print("           " + describe_health(health))
    for problem in health.get("problems") or []:
        print("problem:   " + problem)
    for number, line in enumerate(describe_limits(health)):
        print("%s%s" % ("usage:     " if number == 0 else "           ", line))
    for label, line in describe_activity(health):
        print("%-11s%s" % (label + ":", line))
    return 0 if health.get("status") == "ok" else 1


class Check(NamedTuple):
    level: str  # OK, WARN or FAIL
    message: str
    fix: str = ""


def check_python(system: System, config: Config) -> Check:
    # An older Python never gets here: the module refuses it at the top.
    return Check("OK", "Python %d.%d.%d (%s)" % (sys.version_info[:3] + (system.python,)))


def check_claude(system: System, config: Config) -> Check:
    claude = find_claude(config.claude_bin)
    if claude is None:
        return Check("FAIL", "claude (`%s`) not found on PATH or in %s"
                     % (config.claude_bin, ", ".join(CLAUDE_INSTALL_DIRS)),
                     "npm install -g @anthropic-ai/claude-code, or pass --claude-bin /full/path")
    probes = Probes(config)  # this process's own, for when no proxy runs
    version = probes.version(claude) or "(version unknown)"
    health = fetch_health(health_url(config))
    seen = (health or {}).get("claude")
    if isinstance(seen, dict) and seen.get("probe"):
        # The running proxy's probe is the one its requests stand on: one run here could pass
        # while the proxy's timed out.
        by = "checked by the running proxy, pid %s" % health["pid"]
        if seen["probe"] == "failed":
            return Check("FAIL", "claude %s at %s failed the running proxy's check (pid %s): %s" % (
                seen.get("version"), seen.get("path"), health["pid"], seen.get("problem")),
                UPGRADE_HELP if seen.get("native") is False else
                "run `claude` in a terminal to see why; the proxy checks again by itself")
        if seen["probe"] == "pending":
            return Check("WARN", "claude %s at %s is still being checked by the running proxy (pid %s)"
                         % (seen.get("version"), seen.get("path"), health["pid"]),
                         "run doctor again in a moment")
        return Check("OK", "claude %s at %s (%s)" % (seen.get("version"), seen.get("path"), by))
    result = probes.probe(claude).result  # waited for: never None here
    if result is not None and result.lasting:
        return Check("FAIL", "claude %s at %s does not speak the control protocol the proxy needs: %s"
                     % (version, claude, result.problem), UPGRADE_HELP)
    if result is not None and result.problem is not None:
        return Check("FAIL", "claude %s at %s could not be checked: %s" % (version, claude, result.problem),
                     "run `claude` in a terminal to see why")
    return Check("OK", "claude %s at %s" % (version, claude))


def check_login(system: System, config: Config) -> Check:
    claude = find_claude(config.claude_bin)
    if claude is None:
        return Check("FAIL", "login not checked: claude not found", "install claude first")
    health = fetch_health(health_url(config))
    if health is not None and (health.get("claude") or {}).get("logged_in") is False:
        return Check("FAIL", "Claude Code is not logged in (its claude told the running proxy, pid %s, "
                     "at its check)" % health["pid"], "run `claude` in a terminal as this user and "
                     "/login with your Claude subscription; the running proxy sees it within minutes")
    # Asked with the environment the proxy gives claude: a stray API key that the
    # proxy strips must not make it look logged in.
    ran = system.run([claude, "auth", "status", "--json"], env=cli_env(config, base=system.environ),
                     timeout=15)
    how = "judged by `claude auth status` with the environment the proxy gives claude"
    try:
        auth = json.loads(ran.out)
    except ValueError:
        auth = None
    if not isinstance(auth, dict):
        said = (ran.err or ran.out).strip()[-300:] or "nothing"
        return Check("WARN", "could not tell whether Claude Code is logged in: `claude auth "
                     "status` exited %d and said %s" % (ran.code, said),
                     "run `claude` in a terminal and check that it answers")
    if not auth.get("loggedIn") and health is not None and (health.get("claude") or {}).get("logged_in"):
        return Check("OK", "Claude Code is logged in, as the running proxy's claude told it (pid %s); "
                     "`claude auth status` here says not, so this shell's environment differs from the "
                     "proxy's (a CLAUDE_CODE_OAUTH_TOKEN given to the proxy alone, say)" % health["pid"])
    if not auth.get("loggedIn"):
        return Check("FAIL", "Claude Code is not logged in (%s)" % how,
                     "run `claude` in a terminal as this user and /login with your Claude "
                     "subscription")
    method = auth.get("authMethod")
    if method == "api_key":
        return Check("WARN", "Claude Code is logged in with an API key (%s), which bills per "
                     "token (%s)" % (auth.get("apiKeySource", "source unknown"), how),
                     "run `claude`, /logout, then /login with your Claude subscription")
    return Check("OK", "Claude Code is logged in (%s; %s)" % (method, how))


def check_api_key_env(system: System, config: Config) -> Check:
    present = [name for name in STRIPPED_ENV if system.environ.get(name)]
    if not present:
        return Check("OK", "neither %s is set" % " nor ".join(STRIPPED_ENV))
    names = " and ".join(present)
    if config.allow_api_key:
        return Check("WARN", "%s is set and --allow-api-key passes it to claude: requests bill "
                     "per token to it" % names, "drop --allow-api-key, or unset " + names)
    return Check("WARN", "%s is set in this environment; the proxy strips it from claude, but "
                 "anything else here would bill per token" % names,
                 "unset %s (and remove it from your shell profile) unless you mean to use it"
                 % names)


def check_port(system: System, config: Config) -> Check:
    where = "port %d on %s" % (config.port, config.host)
    if port_free(config.host, config.port):
        return Check("OK", where + " is free")
    health = fetch_health(health_url(config))
    if health is not None:
        return Check("OK", "%s is taken by claude-max-proxy itself (pid %s)" % (where, health["pid"]))
    return Check("FAIL", where + " is taken by another program", find_port_holder(config.port))


def check_service(system: System, config: Config) -> Check:
    manager = service_manager(system)
    if manager is None:
        return Check("WARN", "no service support on %s" % system.platform,
                     "run the proxy by hand or under your own supervisor")
    loaded, detail = manager.loaded()
    if loaded is None:
        return Check("WARN", "cannot ask about the %s: %s" % (manager.kind, detail),
                     "on Linux, install needs a systemd user session (log in normally, or "
                     "`loginctl enable-linger $USER`); else run the proxy by hand")
    if not system.exists(manager.path):
        return Check("WARN", "no %s installed (%s)" % (manager.kind, manager.path),
                     "`%s install` runs the proxy at login" % self_command())
    if not loaded:
        return Check("FAIL", "the %s at %s is installed but not running (%s)"
                     % (manager.kind, manager.path, detail),
                     "`%s install` loads it again; see %s" % (self_command(), manager.logs_hint))
    return Check("OK", "the %s at %s is installed and %s" % (manager.kind, manager.path, detail))


def check_health(system: System, config: Config) -> Check:
    url = health_url(config)
    health = fetch_health(url)
    manager = service_manager(system)
    if health is None:
        installed = manager is not None and system.exists(manager.path)
        return Check("FAIL" if installed else "WARN", "nothing answers %s" % url,
                     ("see %s" % manager.logs_hint) if installed else
                     "start it: `%s --port %d`, or install it" % (self_command(), config.port))
    if not (health.get("claude") or {}).get("found", True):
        return Check("FAIL", "the running proxy cannot find claude: %s" % describe_health(health),
                     "re-run `%s install` from a shell where `claude` works, or pass "
                     "--claude-bin /full/path/to/claude" % self_command())
    if health.get("status") != "ok":
        return Check("FAIL", "the running proxy answers %s but is degraded: %s" % (
            url, " ".join(health.get("problems") or [describe_health(health)])))
    if (health.get("usage_limits") or {}).get("extra_usage_in_use"):
        return Check("WARN", "the proxy answers %s, and Claude Code reports extra usage in use, billed "
                     "beyond your plan: %s" % (url, "; ".join(describe_limits(health))),
                     "start the proxy with --no-extra-usage to refuse requests while it lasts")
    return Check("OK", "the proxy answers %s: %s" % (url, describe_health(health)))


DOCTOR_CHECKS: List[Callable[[System, Config], Check]] = [
    check_python, check_claude, check_login, check_api_key_env, check_port, check_service,
    check_health,
]


def doctor(system: System, config: Config) -> int:
    failed = False
    for check in DOCTOR_CHECKS:
        try:
            result = check(system, config)
        except Exception as error:  # one broken probe must not hide the other answers
            result = Check("WARN", "%s could not run: %s" % (check.__name__, error))
        print("%-5s %s" % (result.level, result.message))
        if result.fix and result.level != "OK":
            print("      fix: " + result.fix)
        failed = failed or result.level == "FAIL"
    return 1 if failed else 0


def run_command(command: str, system: System, config: Config, dry_run: bool) -> int:
    if command == "install":
        return install(system, config, dry_run)
    if command == "uninstall":
        return uninstall(system, dry_run)
    if command == "status":
        return status(system, config)
    return doctor(system, config)


def main(argv: Optional[List[str]] = None, system: Optional[System] = None) -> int:
    command, config, dry_run = parse_command_line(sys.argv[1:] if argv is None else list(argv))
    if command != "serve":
        try:
            return run_command(command, system or System(), config, dry_run)
        except ServiceError as error:
            print("FAIL  %s" % error)
            return 1
    setup_logging(config)
    try:
        load_api_key_file(config)
    except (OSError, ValueError) as error:
        log.error("cannot read --api-key-file: %s", error)
        return 1
    try:
        return serve(config)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            log.error("cannot listen: %s", port_in_use(config))
        else:
            log.error("cannot listen on %s:%d: %s", config.host, config.port, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
