#!/usr/bin/env python3
"""claude-max-proxy: an OpenAI-compatible HTTP API over the Claude Code CLI.

Point any OpenAI client at ``http://127.0.0.1:3456/v1`` and it talks to Claude
through your Claude Pro/Max subscription instead of per-token API billing.

Each chat completion runs the official ``claude`` CLI as a child process
(``claude -p --input-format stream-json --output-format stream-json ...``),
hands it the conversation on stdin, reads its JSON events line by line and
answers in the exact OpenAI wire format, streaming as Server-Sent Events.

Run::

    python3 claude_max_proxy.py --port 3456

Standard library only; runs on Python 3.9 through 3.13. ``--help`` lists every
flag and the environment variable that sets its default.

Other commands of the same file run it as a service and check on it::

    python3 claude_max_proxy.py install     # at login: LaunchAgent (macOS), systemd unit (Linux)
    python3 claude_max_proxy.py doctor      # what is wrong, and how to fix it
    python3 claude_max_proxy.py status      # installed, loaded, answering; pid, uptime, counters
    python3 claude_max_proxy.py uninstall

The module reads top to bottom in the order a request flows: configuration,
errors, models, request translation (OpenAI -> CLI), the ``claude`` process,
response translation (CLI events -> OpenAI), the HTTP handler, the server,
then running as a service (install, uninstall, status, doctor) and main().
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import http.client
import hmac
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
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

try:
    import resource
except ImportError:  # not a POSIX system: the open-file limit stays as it is
    resource = None  # type: ignore[assignment]

__version__ = "0.1.0"

log = logging.getLogger("claude_max_proxy")


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
     "when set, every request but /health needs 'Authorization: Bearer KEY'"),
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


class Config:
    """Settings for one server; attribute names follow the flags."""

    def __init__(self, **values: Any) -> None:
        for flag, _env, _type, default, _help in OPTIONS:
            setattr(self, flag_attr(flag), default)
        for name, value in values.items():
            if not hasattr(self, name):
                raise TypeError("unknown setting %r" % name)
            setattr(self, name, value)


def flag_attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def env_value(env: str, kind: Any, default: Any) -> Any:
    """The default a flag takes from its environment variable, if set."""
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


# The first argument may name a command; without one the proxy serves, so
# `python3 claude_max_proxy.py --port 3456` keeps working as it always has.
COMMANDS = ("serve", "doctor", "install", "uninstall", "status")
COMMAND_HELP = {
    "serve": "OpenAI-compatible HTTP API over the Claude Code CLI (your Claude subscription).",
    "doctor": "Check everything the proxy needs and say how to fix what is wrong.",
    "install": "Run the proxy at login: a LaunchAgent on macOS, a systemd user unit on Linux. "
               "The serve flags given here go into it.",
    "uninstall": "Stop the proxy's LaunchAgent or systemd unit and remove what install wrote.",
    "status": "Is the proxy installed, loaded and answering; its pid, uptime and counters.",
}


def build_arg_parser(command: str = "serve") -> argparse.ArgumentParser:
    """The parser of one command; every command takes the serve flags (port, claude-bin ...)."""
    parser = argparse.ArgumentParser(
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
            value = env_value(env, kind, default)
        except ValueError:
            parser.error("%s=%r is not a valid %s" % (env, os.environ[env], kind.__name__))
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=value,
                                help="%s [env %s]" % (help_text, env))
        else:
            parser.add_argument(flag, type=kind, default=value, metavar=flag_attr(flag).upper(),
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
    """The command, the server's settings, and whether --dry-run was given."""
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    rest = argv[1:] if argv[:1] == [command] else argv
    values = vars(build_arg_parser(command).parse_args(rest))
    dry_run = values.pop("dry_run", False)  # an option of the command, not a server setting
    return command, Config(**values), dry_run


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
MODELS_CREATED = 1735689600  # 2025-01-01; the table has no real dates


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
    if bare.lower().startswith("claude-"):
        return bare  # a full id such as claude-sonnet-4-5-20250929: the CLI takes it as is
    raise ProxyError(
        400, "The model `%s` does not exist. Use one of: %s, or a full claude-* model id."
        % (requested, ", ".join(model_id for model_id, _ in MODELS)),
        code="model_not_found", param="model")


def model_object(model_id: str) -> Dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "anthropic"}


def find_model(model_id: str) -> Optional[Dict[str, Any]]:
    for known, _alias in MODELS:
        if known == model_id:
            return model_object(known)
    return None


# ---------------------------------------------------------------------------
# Request translation: OpenAI chat request -> CLI argv, environment and stdin
# ---------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = ("You are Claude, a helpful AI assistant made by Anthropic. "
                         "Answer the user's messages directly.")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# OpenAI's reasoning_effort -> Claude Code's --effort. "none" turns thinking off instead.
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "xhigh": "xhigh", "max": "max"}
# --json-schema needs turns to spare: the CLI asks Claude again when its
# structured output is missing or does not match the schema.
STRUCTURED_MAX_TURNS = 3
# OpenAI request fields that change nothing here, listed so the debug log can
# name the ones that are truly unknown.
IGNORED_FIELDS = frozenset((
    "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "user", "metadata",
    "logit_bias", "logprobs", "top_logprobs", "store", "service_tier", "prediction", "modalities",
    "audio", "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
))
HANDLED_FIELDS = frozenset((
    "model", "messages", "stream", "stream_options", "n", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "response_format", "max_tokens",
    "max_completion_tokens", "stop", "reasoning_effort", "reasoning", "include_reasoning",
))


class ChatRequest:
    """A validated chat request, reduced to what the CLI needs."""

    def __init__(self, model: str, cli_model: str, system_prompt: str,
                 content: List[Dict[str, Any]], stream: bool = False, include_usage: bool = False,
                 tools: Optional[List[Dict[str, Any]]] = None, parallel_tool_calls: bool = True, legacy_functions: bool = False,
                 json_schema: Optional[Dict[str, Any]] = None, max_tokens: Optional[int] = None,
                 stops: Optional[List[str]] = None, effort: Optional[str] = None,
                 thinking: bool = True, want_reasoning: bool = False) -> None:
        self.model = model              # as the client named it; echoed in responses
        self.cli_model = cli_model      # what --model gets
        self.system_prompt = system_prompt
        self.content = content          # the user message blocks sent on stdin
        self.stream = stream
        self.include_usage = include_usage
        self.tools = tools or []        # offered to Claude (empty when tool_choice is "none")
        self.parallel_tool_calls = parallel_tool_calls
        self.legacy_functions = legacy_functions  # answer with function_call, not tool_calls
        self.json_schema = json_schema
        self.max_tokens = max_tokens
        self.stops = stops or []
        self.effort = effort
        self.thinking = thinking
        self.want_reasoning = want_reasoning


def parse_chat_request(body: Any, config: Config,
                       fetch: Optional[Callable[[str, int], Tuple[str, bytes]]] = None) -> ChatRequest:
    """Validate an OpenAI chat completion body; raise ProxyError(400) naming the bad param.

    `fetch` loads remote images (only with --fetch-images); tests pass a fake.
    """
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_type")
    model = body.get("model") or ""
    if not isinstance(model, str) or not model.isprintable():
        raise invalid("`model` must be a string of printable characters.", "model", "invalid_type")
    cli_model = resolve_model(model, config.default_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty array.", "messages",
                      "invalid_type" if not isinstance(messages, list) else "empty_array")
    for index, message in enumerate(messages):
        validate_message(message, index)
    stream = optional_bool(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("`stream_options` must be an object.", "stream_options", "invalid_type")
    if body.get("n") not in (None, 1):
        raise invalid("Only n=1 is supported: the Claude Code CLI gives one answer per request.",
                      "n", "unsupported_value")
    unknown = sorted(set(body) - HANDLED_FIELDS - IGNORED_FIELDS)
    if unknown:
        log.debug("ignoring request fields: %s", ", ".join(unknown))
    tools, tool_choice, parallel, legacy = parse_tools(body)
    json_schema = parse_response_format(body.get("response_format"))
    if json_schema is not None and tools:
        raise invalid("`response_format` with a JSON schema cannot be combined with `tools` here; "
                      "send one or the other.", "response_format", "unsupported_value")
    effort, thinking, asked = parse_reasoning(body)
    max_tokens = parse_max_tokens(body)
    load_image = image_loader(config, fetch or fetch_image)
    return ChatRequest(
        model=model or config.default_model,
        cli_model=cli_model,
        system_prompt=system_prompt_of(messages, tools, tool_choice, parallel),
        content=prompt_content(messages, load_image),
        stream=stream,
        include_usage=bool(stream and options.get("include_usage")),
        tools=tools, parallel_tool_calls=parallel,
        legacy_functions=legacy, json_schema=json_schema, max_tokens=max_tokens,
        stops=parse_stop(body.get("stop")), effort=effort,
        # A small output cap must go to the visible answer, not to hidden thinking.
        thinking=thinking and (max_tokens is None or asked),
        # Thinking is shown unless hidden: agents kill a stream that goes quiet, and only
        # non-empty deltas reset their watchdogs.
        want_reasoning=asked or not (config.hide_reasoning or body.get("include_reasoning") is False),
    )


def optional_bool(body: Dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid("`%s` must be a boolean." % name, name, "invalid_type")
    return value


def validate_message(message: Any, index: int) -> None:
    param = "messages[%d]" % index
    if not isinstance(message, dict):
        raise invalid("%s must be an object." % param, param, "invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise invalid("%s.role must be one of %s; got %r." % (param, ", ".join(ROLES), role),
                      param + ".role")
    if role == "assistant":
        validate_tool_calls(message.get("tool_calls"), param + ".tool_calls")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str) or \
            role == "function" and not isinstance(message.get("name"), str):
        field = "tool_call_id" if role == "tool" else "name"
        raise invalid("%s.%s must name the call this result answers." % (param, field),
                      "%s.%s" % (param, field), "invalid_type")
    content = message.get("content")
    if content is None and role == "assistant":
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid("%s.content must be a string or an array of content parts." % param,
                      param + ".content", "invalid_type")
    for part_index, part in enumerate(content):
        validate_part(part, role, "%s.content[%d]" % (param, part_index))


def validate_part(part: Any, role: str, param: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    if kind in ("text", "input_text"):
        if not isinstance(part.get("text"), str):
            raise invalid("%s.text must be a string." % param, param + ".text", "invalid_type")
    elif kind == "image_url" and role == "user":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise invalid("%s.image_url.url must be a string." % param, param + ".image_url",
                          "invalid_type")
    else:
        raise invalid("%s has unsupported content part type %r; text parts (and image_url parts "
                      "in user messages) are supported." % (param, kind), param + ".type")


def validate_tool_calls(calls: Any, param: str) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise invalid("%s must be an array." % param, param, "invalid_type")
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(call.get("id", ""), str):
            raise invalid("%s[%d] must be {\"id\", \"type\": \"function\", \"function\": "
                          "{\"name\", \"arguments\"}}." % (param, index), "%s[%d]" % (param, index),
                          "invalid_type")


def parse_tools(body: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], str, bool, bool]:
    """(tools offered, tool choice, parallel calls allowed, legacy functions API)."""
    legacy = body.get("tools") is None and body.get("functions") is not None
    entries = body.get("functions") if legacy else body.get("tools")
    param = "functions" if legacy else "tools"
    if entries is None:
        return [], "auto", True, False
    if not isinstance(entries, list):
        raise invalid("`%s` must be an array." % param, param, "invalid_type")
    tools = []
    for index, entry in enumerate(entries):
        spec = entry if legacy else (entry.get("function") if isinstance(entry, dict)
                                     and entry.get("type", "function") == "function" else None)
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise invalid("%s[%d] must be a function with a name." % (param, index),
                          "%s[%d]" % (param, index), "invalid_type")
        parameters = spec.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise invalid("%s[%d] parameters must be a JSON Schema object." % (param, index),
                          "%s[%d].parameters" % (param, index), "invalid_type")
        tools.append({"name": spec["name"], "description": spec.get("description") or "",
                      "parameters": parameters})
    choice = tool_choice_of(body.get("function_call" if legacy else "tool_choice"),
                            [t["name"] for t in tools], "function_call" if legacy else "tool_choice")
    if choice == "none":
        tools = []  # not offered at all, so Claude cannot call them
    parallel = not legacy and body.get("parallel_tool_calls") is not False
    return tools, choice, parallel, legacy


def tool_choice_of(choice: Any, names: List[str], param: str) -> str:
    """"auto", "none", "required", or the name of the one tool that must be called."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    name = None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
    if not isinstance(name, str):
        raise invalid("`%s` must be \"auto\", \"none\", \"required\" or name a function." % param,
                      param)
    if name not in names:
        raise invalid("`%s` names %r, which is not among the tools offered." % (param, name), param)
    return name


def parse_response_format(response_format: Any) -> Optional[Dict[str, Any]]:
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
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise invalid("`response_format.json_schema.schema` must be a JSON Schema whose root is "
                          "an object.", "response_format", "invalid_value")
        return schema
    raise invalid("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\".",
                  "response_format")


def parse_reasoning(body: Dict[str, Any]) -> Tuple[Optional[str], bool, bool]:
    """(--effort value, thinking on, reasoning asked for by the request)."""
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")  # the OpenRouter / LiteLLM spelling
    if effort is None:
        return None, True, body.get("include_reasoning") is True or isinstance(reasoning, dict)
    if effort == "none":
        return None, False, False
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise invalid("`reasoning_effort` must be one of none, %s." % ", ".join(EFFORTS),
                      "reasoning_effort")
    return EFFORTS[effort], True, True


def parse_max_tokens(body: Dict[str, Any]) -> Optional[int]:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid("`%s` must be a positive integer." % name, name, "invalid_type")
        return value
    return None


def parse_stop(stop: Any) -> List[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise invalid("`stop` must be a string or an array of up to 4 strings.", "stop")
    return [s for s in stops if s]


def text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string, null, or an array of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def system_prompt_of(messages: List[Dict[str, Any]], tools: List[Dict[str, Any]],
                     tool_choice: str, parallel: bool) -> str:
    parts = [text_of(m.get("content")) for m in messages if m["role"] in ("system", "developer")]
    joined = "\n\n".join(part for part in parts if part.strip()) or DEFAULT_SYSTEM_PROMPT
    if tools:
        joined += "\n\n" + tools_prompt(tools, tool_choice, parallel)
    return joined


TOOL_OPEN, TOOL_CLOSE = "<tool_calls>", "</tool_calls>"


def tools_prompt(tools: List[Dict[str, Any]], tool_choice: str, parallel: bool) -> str:
    """How Claude is told about the client's tools and how to call them.

    Claude Code's own tool use is off, so calls travel as text in a block the
    proxy parses out of the reply (see ToolCallParser).
    """
    if tool_choice == "required":
        rule = "In this reply you must call at least one tool."
    elif tool_choice != "auto":
        rule = "In this reply you must call the tool `%s`." % tool_choice
    else:
        rule = "Call a tool when you need its result to answer well; otherwise answer directly."
    if not parallel:
        rule += " Call at most one tool per reply."
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\n"
        "The user's application offers you these tools. It runs them itself, not you: when you call "
        "one, your reply ends and the result comes back to you in the next message, inside "
        "<tool_result> tags.\n\n"
        "<tools>\n%s\n</tools>\n\n"
        "To call tools, end your reply with exactly this block, and write nothing after it:\n\n"
        "%s\n[{\"name\": \"tool_name\", \"arguments\": {\"parameter\": \"value\"}}]\n%s\n\n"
        "The block holds a JSON array with one object per call. \"arguments\" is a JSON object that "
        "matches the tool's parameters schema. Never write %s for any other purpose, and never make "
        "up tool results. %s" % (listing, TOOL_OPEN, TOOL_CLOSE, TOOL_OPEN, rule))


def prompt_content(messages: List[Dict[str, Any]],
                   load_image: Callable[[Dict[str, Any], str], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The content blocks of the one user message the CLI receives on stdin.

    A single user turn is sent as it is. A longer conversation becomes one
    transcript of the earlier turns, each inside tags naming its role, followed
    by the newest user message; Claude then writes the next assistant turn.
    Images stay where they were, as image blocks between the text.
    """
    indexed = [(i, m) for i, m in enumerate(messages) if m["role"] not in ("system", "developer")]
    if not indexed:
        raise invalid("`messages` holds only system messages; add a user message.", "messages")
    final = indexed.pop() if indexed[-1][1]["role"] == "user" else None
    blocks: List[Dict[str, Any]] = []
    if indexed:
        add_text(blocks, "Below is our conversation so far, oldest turn first. Reply to the latest "
                         "message as the assistant; write only your reply, without role tags.\n\n"
                         "<conversation>\n")
        tool_names = {call.get("id"): call["function"]["name"] for _, m in indexed
                      for call in m.get("tool_calls") or []}
        for index, message in indexed:
            render_turn(blocks, message, "messages[%d]" % index, tool_names, load_image)
        add_text(blocks, "</conversation>")
        if final is not None:
            add_text(blocks, "\n\n")
    if final is not None:
        index, message = final
        add_content(blocks, message.get("content"), "messages[%d]" % index, load_image)
    return blocks or [{"type": "text", "text": ""}]


def render_turn(blocks: List[Dict[str, Any]], message: Dict[str, Any], param: str,
                tool_names: Dict[Any, str], load_image: Callable[..., Dict[str, Any]]) -> None:
    role = message["role"]
    if role in ("tool", "function"):
        name = message.get("name") or tool_names.get(message.get("tool_call_id"), "")
        attributes = ' name="%s"' % name
        if role == "tool":
            attributes = ' tool_call_id="%s"%s' % (message["tool_call_id"], attributes)
        add_text(blocks, "<tool_result%s>\n%s\n</tool_result>\n"
                 % (attributes, text_of(message.get("content"))))
        return
    add_text(blocks, "<%s>\n" % role)
    add_content(blocks, message.get("content"), param, load_image)
    calls = [{"name": c["function"]["name"], "arguments": arguments_of(c["function"])}
             for c in message.get("tool_calls") or []]
    if isinstance(message.get("function_call"), dict):
        calls.append({"name": message["function_call"].get("name"),
                      "arguments": arguments_of(message["function_call"])})
    if calls:
        add_text(blocks, "\n%s\n%s\n%s" % (TOOL_OPEN, json.dumps(calls, ensure_ascii=False), TOOL_CLOSE))
    add_text(blocks, "\n</%s>\n" % role)


def arguments_of(function: Dict[str, Any]) -> Any:
    """A call's arguments as JSON, however the client spelled them."""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}


def add_content(blocks: List[Dict[str, Any]], content: Any, param: str,
                load_image: Callable[[Dict[str, Any], str], Dict[str, Any]]) -> None:
    if not isinstance(content, list):
        add_text(blocks, text_of(content))
        return
    for index, part in enumerate(content):
        if part.get("type") == "image_url":
            blocks.append(load_image(part, "%s.content[%d]" % (param, index)))
        else:
            add_text(blocks, part.get("text", ""))


def add_text(blocks: List[Dict[str, Any]], text: str) -> None:
    """Append text, joining it to a text block just before it."""
    if not text:
        return
    if blocks and blocks[-1]["type"] == "text":
        blocks[-1]["text"] += text
    else:
        blocks.append({"type": "text", "text": text})


# What one request may make the proxy download with --fetch-images. The total bounds its memory
# (10 URLs of a 19 MB image took 905 MB): 24 MiB is 32 MiB in base64, the most the Messages API
# takes in one request anyway. The count bounds its time, each fetch taking up to 15 s.
IMAGE_FETCH_MAX_COUNT = 20
IMAGE_FETCH_TOTAL_LIMIT = 24 * MIB
IMAGE_FETCH_LIMIT = 20 * MIB  # one image
IMAGE_FETCH_TIMEOUT = 15.0


def image_loader(config: Config, fetch: Callable[[str, int], Tuple[str, bytes]]
                 ) -> Callable[[Dict[str, Any], str], Dict[str, Any]]:
    """Turns one request's image parts into image blocks, in order; keeps the count and bytes fetched."""
    fetched = [0, 0]  # images, bytes

    def load(part: Dict[str, Any], param: str) -> Dict[str, Any]:
        image = part["image_url"]
        url = (image.get("url") if isinstance(image, dict) else image).strip()
        if url.startswith("data:"):
            media_type, data = decode_data_url(url, param)
        elif url.lower().startswith(("http://", "https://")):
            if not config.fetch_images:
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


class Launch(NamedTuple):
    """Everything a `claude` process starts with. A pre-started process serves only
    a request with an equal Launch: the rest of a request goes to it on stdin."""

    argv: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...]
    files: Tuple[Tuple[str, str], ...]  # (name, text) written into its directory first


# The system prompt goes in a file: one argument may hold only 128 KiB on Linux
# (tool listings grow past that), and argv is visible to every user in `ps`.
SYSTEM_PROMPT_FILE = "system-prompt.txt"


def cli_launch(claude: str, request: ChatRequest, config: Config) -> Launch:
    return Launch(tuple(cli_argv(claude, request)),
                  tuple(sorted(cli_env(config, request).items())),
                  ((SYSTEM_PROMPT_FILE, request.system_prompt),))


def cli_argv(claude: str, request: ChatRequest) -> List[str]:
    """The argv of the child. Nothing from the request reaches a shell: argv is a list."""
    argv = [
        claude, "-p",
        "--input-format", "stream-json",
        "--output-format", "stream-json", "--verbose", "--include-partial-messages",
        "--model", request.cli_model,
        "--system-prompt-file", SYSTEM_PROMPT_FILE,  # relative: the child runs in its directory
        # Claude Code's own tools (Bash, Read, Edit, web) must never run for a proxied prompt.
        "--tools", "",
        "--max-turns", str(STRUCTURED_MAX_TURNS if request.json_schema else 1),
        "--no-session-persistence",
        # Keep the user's hooks, settings and MCP servers out of proxied requests;
        # the login itself lives outside settings and still applies.
        "--setting-sources", "",
        "--strict-mcp-config",
    ]
    if request.effort:
        argv += ["--effort", request.effort]
    if request.json_schema is not None:
        argv += ["--json-schema", json.dumps(request.json_schema, separators=(",", ":"))]
    return argv


STRIPPED_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
PROXY_KEY_ENV = "CLAUDE_PROXY_API_KEY"


def cli_env(config: Config, request: Optional[ChatRequest] = None,
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
    if request is not None and request.max_tokens is not None:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(request.max_tokens)
    if request is not None and not request.thinking:
        env["MAX_THINKING_TOKENS"] = "0"
    return env


def stdin_message(request: ChatRequest) -> bytes:
    message = {"type": "user", "message": {"role": "user", "content": request.content},
               "parent_tool_use_id": None}
    return (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")


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
    """The HTTP client hung up; its child must die now."""


WORKDIR_PREFIX = "claude-proxy-"


def new_workdir() -> str:
    """A private directory for one child, named after this proxy's pid so that a
    later proxy can tell it was left behind (see remove_abandoned_workdirs)."""
    return tempfile.mkdtemp(prefix="%s%d-" % (WORKDIR_PREFIX, os.getpid()))


def remove_abandoned_workdirs(root: Optional[str] = None) -> int:
    """Remove the children's directories of proxies that died without cleaning up
    (kill -9, a crash): they hold system prompts. Returns how many went."""
    owner = re.compile(r"%s(\d+)-" % re.escape(WORKDIR_PREFIX))
    removed = 0
    try:
        entries = list(os.scandir(root or tempfile.gettempdir()))
    except OSError:
        return 0
    for entry in entries:
        match = owner.match(entry.name)
        if not match or process_exists(int(match.group(1))):
            continue
        try:
            ours = entry.is_dir(follow_symlinks=False) and \
                entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if ours:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's
    return True


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


class ClaudeProcess:
    """One `claude -p` child in its own process group and throwaway directory.

    It serves exactly one request: send() hands it the message, events() writes
    that to its stdin and reads its stdout as JSON events, and close() reaps it,
    closes its pipes and removes the directory. Only the thread that reads it
    calls those; any thread may call terminate(), which leaves the pipes alone.
    """

    STDERR_TAIL = 4096
    KILL_WAIT = 5.0  # how long terminate() waits for a killed child to go; one stuck in the kernel stays

    def __init__(self, launch: Launch, lifeline: Optional[Lifeline] = None) -> None:
        self.workdir = new_workdir()
        try:
            for name, text in launch.files:
                with open(os.path.join(self.workdir, name), "w", encoding="utf-8") as f:
                    f.write(text)
            self.popen = subprocess.Popen(
                list(launch.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=self.workdir, env=dict(launch.env),
                start_new_session=True, bufsize=0)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.pid = self.popen.pid
        self.lifeline = lifeline
        if lifeline is not None:
            lifeline.hold(self.pid)  # its group is named after it
        self.last_output = time.monotonic()
        self.stderr_tail = b""
        self._unsent = memoryview(b"")
        self._lock = threading.Lock()
        self._reaped = False
        self._closed = False

    def send(self, message: bytes) -> None:
        """Queue the one message; events() writes it and then closes stdin, so the CLI
        answers and exits. Writing there keeps a CLI that never reads under the timeouts."""
        # The request starts now; a pre-started process may have waited long.
        self.last_output = time.monotonic()
        self._unsent = memoryview(message)  # slices of a view copy nothing, however long the prompt
        os.set_blocking(self.popen.stdin.fileno(), False)

    def events(self, next_deadline: Callable[[], Tuple[float, ProxyError]],
               client: Optional[socket.socket] = None) -> Iterator[Dict[str, Any]]:
        """Yield each JSON object the CLI prints, until its stdout closes.

        next_deadline() gives the earliest moment to give up and the error to raise
        then; it is asked again after every read, so callers can move it. When
        `client` is given, a client that closes its connection raises ClientGone
        at once, even while the CLI is silent.
        """
        out, err, stdin = self.popen.stdout, self.popen.stderr, self.popen.stdin
        pending = b""
        with selectors.DefaultSelector() as selector:
            selector.register(out, selectors.EVENT_READ)
            selector.register(err, selectors.EVENT_READ)
            if not stdin.closed:
                selector.register(stdin, selectors.EVENT_WRITE)
            if client is not None:
                selector.register(client, selectors.EVENT_READ)
            while True:
                deadline, error = next_deadline()
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise error
                for key, _ in selector.select(min(wait, 3600.0)):
                    if key.fileobj is stdin:
                        if self._write_some():
                            selector.unregister(stdin)
                        continue
                    if key.fileobj is client:
                        if client_closed(client):
                            raise ClientGone()
                        selector.unregister(client)  # a pipelined request; not ours to read
                        continue
                    data = os.read(key.fd, 65536)
                    if key.fileobj is err:
                        if data:
                            self._keep_stderr(data)
                        else:
                            selector.unregister(err)
                        continue
                    if not data:
                        if pending.strip():
                            event = parse_event_line(pending)
                            if event is not None:
                                yield event
                        return
                    self.last_output = time.monotonic()
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        event = parse_event_line(line)
                        if event is not None:
                            yield event

    def _write_some(self) -> bool:
        """Write what stdin takes now; True once all is written and stdin closed."""
        try:
            written = os.write(self.popen.stdin.fileno(), self._unsent)
            self._unsent = self._unsent[written:]
        except BlockingIOError:
            return False
        except OSError:
            self._unsent = memoryview(b"")  # it died; events() sees its stdout close
        if self._unsent:
            return False
        self.popen.stdin.close()
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
        """Give the child `grace` seconds to exit by itself, then kill what is left of
        its group, reap it and clean up. Returns its exit code (negative: a signal)."""
        with self._lock:
            if self._closed:
                return self.popen.returncode
            self._closed = True
        deadline = time.monotonic() + grace
        while not self._exited() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._drain_stderr()
        self.terminate()
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        return self.popen.returncode

    def terminate(self) -> None:
        """Kill the child and everything it started, reap it, remove its directory."""
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
        shutil.rmtree(self.workdir, ignore_errors=True)

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


def binary_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """What tells a replaced (upgraded) `claude` from the one a pre-started process runs:
    installers write a new file, or point the symlink at one, and os.stat follows symlinks."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class Warm:
    """A pre-started process waiting on stdin, the key it was started for, and its binary."""

    def __init__(self, key: Launch, process: ClaudeProcess, binary: Optional[Tuple[int, int, int]]) -> None:
        self.key = key
        self.process = process
        self.binary = binary
        self.born = time.monotonic()


class WarmPool:
    """`claude` processes started ahead of time, so a request skips the CLI's start-up.

    The CLI spends ~0.7 s starting, then waits on stdin; one started early with
    the exact argv and environment of a request (its key) answers that request
    within tens of milliseconds. Each serves one request and is never reused:
    it would carry the first conversation. Every request for a key queues a
    replacement for it, so a client that repeats its system prompt finds one.

    At most `size` processes wait at once; when full, the least recently used
    key gives way. A process that waited `ttl` seconds is retired, and replaced
    only if its key was used within the last `ttl` seconds. One background
    thread starts and retires processes; a request's thread only takes one.
    """

    CHECK_INTERVAL = 5.0  # how long a warm process that died by itself may stay unreaped

    def __init__(self, size: int, ttl: float, lifeline: Optional[Lifeline] = None) -> None:
        self.size = max(0, size)
        self.ttl = ttl
        self.lifeline = lifeline
        self.hits = 0
        self.misses = 0
        self._idle: List[Warm] = []  # oldest first
        self._wanted: List[Launch] = []  # keys to start a process for, in order
        self._last_used: Dict[Launch, float] = {}  # keys used within the last ttl
        self._closed = False
        self._changed = threading.Condition()
        self._keeper: Optional[threading.Thread] = None
        if self.size:
            self._keeper = threading.Thread(target=self._keep, name="warm-pool", daemon=True)
            self._keeper.start()

    # -- used by requests --------------------------------------------------------

    def take(self, key: Launch) -> Optional[ClaudeProcess]:
        """A live process started for this launch from the binary that is there now, or None;
        a replacement is queued either way."""
        if not self.size:
            return None
        binary = binary_identity(key.argv[0])
        found: Optional[ClaudeProcess] = None
        unfit: List[ClaudeProcess] = []
        with self._changed:
            if self._closed:
                return None
            for warm in [warm for warm in self._idle if warm.key == key]:
                self._idle.remove(warm)
                if warm.binary == binary and warm.process.alive():
                    found = warm.process
                    break
                unfit.append(warm.process)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            self._want(key)
        for process in unfit:
            process.close()  # died while waiting, or runs a replaced claude; the request starts anew
        return found

    def prewarm(self, key: Launch) -> None:
        """Start a process for a key no request has used yet (the default one, at start-up)."""
        if self.size:
            with self._changed:
                self._want(key)

    def stats(self) -> Dict[str, int]:
        with self._changed:
            return {"size": len(self._idle), "max": self.size, "hits": self.hits,
                    "misses": self.misses}

    def close(self) -> None:
        """Kill every waiting process; one being started is killed as soon as it exists."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify()
        for warm in idle:
            warm.process.close()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(5.0)

    def _want(self, key: Launch) -> None:
        self._last_used[key] = time.monotonic()
        self._wanted.append(key)
        del self._wanted[:-self.size]  # a burst of requests must not queue more than can wait
        self._changed.notify()

    # -- the background thread ---------------------------------------------------

    def _keep(self) -> None:
        while True:
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
                if warm.key in self._last_used:
                    self._wanted.append(warm.key)
            else:
                kept.append(warm)
        self._idle = kept
        return retired

    def _reserve_next(self, doomed: List[Warm]) -> Optional[Launch]:
        """The next wanted key there is room for, evicting into `doomed` when full."""
        while self._wanted:
            key = self._wanted.pop(0)
            if len(self._idle) >= self.size:
                victim = self._least_recently_used_than(key)
                if victim is None:
                    continue  # every waiting process is for a key used at least as lately
                self._idle.remove(victim)
                doomed.append(victim)
            return key
        return None

    def _least_recently_used_than(self, key: Launch) -> Optional[Warm]:
        never = float("-inf")
        used = self._last_used.get(key, never)
        older = [warm for warm in self._idle if self._last_used.get(warm.key, never) < used]
        return min(older, key=lambda warm: self._last_used.get(warm.key, never), default=None)

    def _start(self, key: Launch) -> None:
        process: Optional[ClaudeProcess] = None
        binary = binary_identity(key.argv[0])  # before the start: a later replacement counts as one
        try:
            process = start_claude(key, self.lifeline)
        except ProxyError as error:
            log.warning("nothing pre-started: %s", error.message)
        with self._changed:
            if process is not None and not self._closed:
                self._idle.append(Warm(key, process, binary))
                return
        if process is not None:
            process.close()  # the pool closed while it started


def parse_event_line(line: bytes) -> Optional[Dict[str, Any]]:
    """A CLI output line as a JSON object; anything else (banners, blank lines) is None."""
    line = line.strip()
    if not line.startswith(b"{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def client_closed(client: socket.socket) -> bool:
    """True when a readable client socket is readable because the peer closed it."""
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


_versions: Dict[Tuple[str, float], Optional[str]] = {}


def claude_version(path: str) -> Optional[str]:
    """`claude --version`, asked again only when the file at `path` changes (an upgrade)."""
    try:
        key = (path, os.stat(path).st_mtime)
    except OSError:
        return None
    if key not in _versions:
        try:
            done = subprocess.run([path, "--version"], capture_output=True, timeout=15,
                                  env=cli_env(Config()), stdin=subprocess.DEVNULL)
            _versions[key] = done.stdout.decode("utf-8", "replace").strip() or None
        except (OSError, subprocess.SubprocessError):
            _versions[key] = None
    return _versions[key]


# ---------------------------------------------------------------------------
# Subscription usage: plan windows, extra usage, and Anthropic's refusals
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


def report_token(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) else None


def report_number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


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


class UsageLimits:
    """The latest report on each usage window, shared by every request of one server.

    It feeds the response headers, /health and `status`, and decides two refusals before
    a claude starts: a window used up with no extra usage to fall back on (429 until its
    reset), and with --no-extra-usage, extra usage being spent or about to be (403).
    """

    def __init__(self) -> None:
        self._windows: Dict[str, LimitWindow] = {}
        self._lock = threading.Lock()

    def observe(self, event: Dict[str, Any]) -> None:
        """Take in a CLI event; all but rate_limit_event lines pass untouched."""
        window = rate_limit_info(event)
        if window is None:
            return
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
# Response translation: CLI events -> OpenAI chat completion
# ---------------------------------------------------------------------------

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "tool_use": "stop",  # only the CLI's own StructuredOutput tool; client calls are parsed from text
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}
AUTH_ERRORS = ("authentication_failed", "oauth_org_not_allowed")
RATE_LIMIT_STATUS = 429
OVERLOADED_STATUS = 529


def openai_finish_reason(stop_reason: Optional[str]) -> str:
    return FINISH_REASONS.get(stop_reason or "end_turn", "stop")


def usage_from_cli(usage: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """OpenAI usage from the CLI's Anthropic usage: every input kind counts as prompt."""
    usage = usage or {}
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached + int(usage.get("cache_creation_input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def upstream_error(status: Optional[int], message: str, kind: Optional[str] = None,
                   retry_after: Optional[float] = None) -> ProxyError:
    """The OpenAI error for a failure the CLI reported from the Anthropic API."""
    if kind in AUTH_ERRORS or status == 401:
        return ProxyError(401, LOGIN_HELP + " (Claude Code said: %s)" % message,
                          code="authentication_failed")
    refusal = extra_usage_refusal(message)
    if refusal is not None:
        return refusal
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


Piece = Tuple[str, Any]  # ("content" | "reasoning", text) or ("tool_calls", [call, ...])


class Reply:
    """What one CLI run said, built up event by event. Pure: no I/O, no clock but `now`.

    feed() takes each CLI event and returns the pieces of output it adds, as
    ("content" | "reasoning", text) pairs; it raises ProxyError when the CLI
    reports a failure. `done` is set by the `result` event, or earlier by the
    first max_tokens stop when `stop_at_max_tokens` (the CLI would otherwise
    continue past the limit on its own). With `structured`, the answer is the
    result's structured_output as JSON text, and free text is dropped.
    """

    def __init__(self, retry_budget: float, stop_at_max_tokens: bool = False,
                 structured: bool = False) -> None:
        self.retry_budget = retry_budget
        self.stop_at_max_tokens = stop_at_max_tokens
        self.structured = structured
        self.done = False
        self.completed = False          # the CLI printed its result and will exit by itself
        self.stop_reason: Optional[str] = None
        self.result_usage: Optional[Dict[str, Any]] = None
        self.stream_usage: Dict[str, Any] = {}
        self.streamed = False           # text came as deltas, so assistant lines repeat it
        self.emitted = False            # some text went out, so the result's text repeats it
        self.error_kind: Optional[str] = None
        self.retry_since: Optional[float] = None
        self.retry_error: Optional[ProxyError] = None

    @property
    def usage(self) -> Dict[str, Any]:
        return self.result_usage if self.result_usage is not None else self.stream_usage

    def retry_deadline(self) -> Optional[Tuple[float, ProxyError]]:
        """When the CLI has retried too long, and the error to give then."""
        if self.retry_since is None or self.retry_error is None:
            return None
        return self.retry_since + self.retry_budget, self.retry_error

    def feed(self, event: Dict[str, Any], now: Optional[float] = None) -> List[Piece]:
        kind = event.get("type")
        if kind == "stream_event":
            return self._stream_event(event.get("event") or {})
        if kind == "assistant":
            return self._assistant(event)
        if kind == "system" and event.get("subtype") == "api_retry":
            self._retry(event, time.monotonic() if now is None else now)
            return []
        if kind == "result":
            return self._result(event)
        return []

    def _stream_event(self, event: Dict[str, Any]) -> List[Piece]:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "thinking_delta" and delta.get("thinking"):
                return [("reasoning", delta["thinking"])]
            if delta.get("type") == "text_delta" and delta.get("text") and not self.structured:
                self.streamed = self.emitted = True
                return [("content", delta["text"])]
        elif kind == "message_start":
            # Claude is answering, so any retrying before this has succeeded.
            self.retry_since = self.retry_error = None
            self.stream_usage = dict((event.get("message") or {}).get("usage") or {})
        elif kind == "message_delta":
            self.stream_usage.update(event.get("usage") or {})
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            if self.stop_reason == "max_tokens" and self.stop_at_max_tokens:
                self.done = True
        return []

    def _assistant(self, event: Dict[str, Any]) -> List[Piece]:
        # An assistant message carrying "error" is the CLI's synthetic failure
        # notice ("Not logged in", "API Error: ..."): remember it for the result.
        if event.get("error"):
            self.error_kind = event["error"]
            return []
        if self.streamed or self.structured:
            return []  # the deltas already carried this text
        # Without partial messages the CLI prints one assistant line per content block.
        text = "".join(block.get("text", "") for block in (event.get("message") or {}).get("content") or []
                       if isinstance(block, dict) and block.get("type") == "text")
        if text:
            self.emitted = True
            return [("content", text)]
        return []

    def _retry(self, event: Dict[str, Any], now: float) -> None:
        status = event.get("error_status")
        error = event.get("error")
        message = "the Anthropic API answered %s (%s); Claude Code was retrying (attempt %s of %s)" % (
            status, error, event.get("attempt"), event.get("max_retries"))
        failure = upstream_error(status, message, error,
                                 retry_after=(event.get("retry_delay_ms") or 0) / 1000.0 or None)
        if failure.status == 401 or status == 403:
            raise failure  # a bad login never heals by retrying
        if self.retry_since is None:
            self.retry_since = now
        self.retry_error = failure

    def _result(self, event: Dict[str, Any]) -> List[Piece]:
        if self.error_kind == "max_output_tokens" and self.emitted:
            # The CLI continued past the output limit three times and gave up; what
            # was written stands, cut off, as OpenAI's finish_reason "length".
            event = dict(event, is_error=False, stop_reason="max_tokens", result="")
            self.error_kind = None
        if self.structured and event.get("subtype") == "error_max_turns":
            raise ProxyError(502, "Claude did not produce JSON matching the requested response_format "
                             "schema, even after being asked again.", code="invalid_structured_output")
        if event.get("is_error") or self.error_kind or event.get("subtype") not in (None, "success"):
            message = event.get("result") or ", ".join(event.get("errors") or []) or \
                "Claude Code reported %s" % event.get("subtype")
            if "not logged in" in str(message).lower():
                raise ProxyError(401, LOGIN_HELP, code="not_logged_in")
            raise upstream_error(event.get("api_error_status"), str(message), self.error_kind)
        self.done = self.completed = True
        self.stop_reason = event.get("stop_reason") or self.stop_reason
        self.result_usage = event.get("usage") or {}
        if self.structured:
            return [("content", structured_text(event))]
        if not self.emitted and event.get("result"):
            self.emitted = True
            return [("content", event["result"])]
        return []


def structured_text(result: Dict[str, Any]) -> str:
    """The JSON answer of a --json-schema run, as compact text."""
    if "structured_output" in result:
        return json.dumps(result["structured_output"], ensure_ascii=False)
    try:
        return json.dumps(json.loads(result.get("result") or ""), ensure_ascii=False)
    except ValueError:
        raise ProxyError(502, "Claude's answer was not valid JSON although response_format asked "
                         "for JSON.", code="invalid_structured_output")


def held_back(text: str, markers: List[str]) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class MarkerSplitter:
    """Lets text through up to the first of some markers, even one split across deltas.

    An end of the text that may turn into a marker (a stop sequence, a tool block's
    opening tag) is held until the next delta tells; all before it goes out at once.
    """

    def __init__(self, markers: List[str]) -> None:
        self.markers = markers
        self.held = ""

    def feed(self, text: str) -> Tuple[str, Optional[str]]:
        """The text that can go out, and the text from the first marker on (None: no marker yet)."""
        text = self.held + text
        found = [i for i in (text.find(marker) for marker in self.markers) if i >= 0]
        if found:
            self.held = ""
            return text[:min(found)], text[min(found):]
        keep = held_back(text, self.markers)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class StopFilter:
    """Cuts the text at the first stop sequence."""

    def __init__(self, stops: List[str]) -> None:
        self.splitter = MarkerSplitter(stops)
        self.hit = False

    def feed(self, text: str) -> str:
        before, stopped = self.splitter.feed(text)
        if stopped is not None:
            self.hit = True
        return before

    def flush(self) -> str:
        return self.splitter.flush()


class ToolCallParser:
    """Finds the <tool_calls> block in Claude's text and turns it into tool calls.

    Text before the block passes through; from a possible start of the block
    on, text is held until it is a block or is not. A block that does not hold
    a JSON array of calls to offered tools, with object arguments, goes out as
    the text it was (with a warning): a repair turn is not possible here.
    """

    def __init__(self, tool_names: List[str], single: bool) -> None:
        self.tool_names = set(tool_names)
        self.single = single
        self.text = MarkerSplitter([TOOL_OPEN])  # the reply's text until the block
        self.block: Optional[List[str]] = None  # text after the opening tag, while inside a block
        self.scan = JsonScan()                  # the block's JSON, followed as it arrives
        self.closed = False                     # the block was parsed; the reply is over

    def feed(self, text: str) -> List[Piece]:
        if self.closed:
            return []
        if self.block is None:
            before, block = self.text.feed(text)
            if block is None:
                return content_piece(before)
            self.block, self.scan = [], JsonScan()
            return content_piece(before) + self.feed(block[len(TOOL_OPEN):])
        self.block.append(text)
        self.scan.feed(text)
        return self._settle(final=False)

    def flush(self) -> List[Piece]:
        pieces: List[Piece] = []
        while self.block is not None:  # a release may reveal another opening tag
            pieces += self._settle(final=True)
        if not self.closed:
            pieces += content_piece(self.text.flush())
        return pieces

    def _settle(self, final: bool) -> List[Piece]:
        scan = self.scan
        if scan.start is None:
            return self._release("nothing after the opening tag") if final else []
        if not scan.is_json:
            return self._release("no JSON after the opening tag")
        if scan.end is None:
            return self._release("the JSON never ends") if final else []
        block = self._block_text()
        after = block[scan.end:].lstrip()
        if not after.startswith(TOOL_CLOSE) and not final:
            if TOOL_CLOSE.startswith(after):
                return []  # the closing tag may still be on its way
            return self._release("text between the JSON and the closing tag")
        calls = parse_tool_calls(block[scan.start:scan.end], self.tool_names)
        if calls is None:
            return self._release("not a JSON array of calls to offered tools, with object arguments")
        self.closed, self.block = True, None
        return [("tool_calls", calls[:1] if self.single else calls)]

    def _block_text(self) -> str:
        text = "".join(self.block or [])
        self.block = [text]  # joined once, not again for each delta still to come
        return text

    def _release(self, why: str) -> List[Piece]:
        """Send the opening tag on as text, and read what followed it afresh."""
        rest = self._block_text()
        self.block = None
        log.warning("tool call block passed on as text: %s", why)
        return content_piece(TOOL_OPEN) + self.feed(rest)


class JsonScan:
    """Follows the JSON array or object at the start of a text as the text arrives,
    to tell where it starts and ends.

    Brackets and tags inside JSON strings do not count. Each character is read
    once, however many deltas a long tool call comes in.
    """

    def __init__(self) -> None:
        self.length = 0                   # characters fed so far
        self.start: Optional[int] = None  # the first character that is not white space
        self.is_json = False              # that character opens an array or object
        self.end: Optional[int] = None    # just past the closing bracket, once it came
        self.depth, self.in_string, self.escaped = 0, False, False

    def feed(self, text: str) -> None:
        offset, self.length = self.length, self.length + len(text)
        if self.end is not None or (self.start is not None and not self.is_json):
            return
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for index, char in enumerate(text, offset):
            if self.start is None:
                if char.isspace():
                    continue
                self.start, self.is_json = index, char in "[{"
                if not self.is_json:
                    return
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    self.end = index + 1
                    return
        self.depth, self.in_string, self.escaped = depth, in_string, escaped


def content_piece(text: str) -> List[Piece]:
    return [("content", text)] if text else []


def parse_tool_calls(body: str, tool_names: Any) -> Optional[List[Dict[str, Any]]]:
    """OpenAI tool calls from the JSON in a block, or None when it is not valid."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        return None
    calls = []
    for item in data:
        if not isinstance(item, dict) or item.get("name") not in tool_names:
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):  # a model may spell the object as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "name": item["name"],
                      "arguments": json.dumps(arguments, ensure_ascii=False)})
    return calls


class Answer:
    """What the client receives, shaped from the CLI's events.

    The Reply's text goes through the stop sequences, then the tool-call parser;
    reasoning is kept unless the request or --hide-reasoning hid it. Streaming and
    non-streaming responses are built from the same pieces.
    """

    def __init__(self, request: ChatRequest, retry_budget: float) -> None:
        self.reply = Reply(retry_budget, stop_at_max_tokens=request.max_tokens is not None,
                           structured=request.json_schema is not None)
        self.want_reasoning = request.want_reasoning
        self.stop = StopFilter(request.stops) if request.stops else None
        self.tools = (ToolCallParser([t["name"] for t in request.tools],
                                     single=not request.parallel_tool_calls)
                      if request.tools else None)
        self.called_tools = False
        self.done = False

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.hit

    def feed(self, event: Dict[str, Any]) -> List[Piece]:
        pieces: List[Piece] = []
        for kind, text in self.reply.feed(event):
            if kind == "reasoning":
                if self.want_reasoning:
                    pieces.append((kind, text))
            elif not self.stopped:
                pieces += self._content(self.stop.feed(text) if self.stop else text)
        if (self.reply.done or self.stopped) and not self.done:
            self.done = True
            if self.stop and not self.stopped:
                pieces += self._content(self.stop.flush())
            if self.tools:
                pieces += self._tool_pieces(self.tools.flush())
        return pieces

    def _content(self, text: str) -> List[Piece]:
        if self.tools is None:
            return content_piece(text)
        return self._tool_pieces(self.tools.feed(text))

    def _tool_pieces(self, pieces: List[Piece]) -> List[Piece]:
        self.called_tools = self.called_tools or any(kind == "tool_calls" for kind, _ in pieces)
        return pieces

    def finish_reason(self, legacy_functions: bool) -> str:
        if self.called_tools:
            return "function_call" if legacy_functions else "tool_calls"
        if self.stopped:
            return "stop"
        return openai_finish_reason(self.reply.stop_reason)


def stream_deltas(kind: str, value: Any, legacy_functions: bool) -> List[Dict[str, Any]]:
    """The chunk deltas that carry one piece of the answer."""
    if kind == "content":
        return [{"content": value}]
    if kind == "reasoning":
        return [{"reasoning_content": value}]
    if legacy_functions:
        call = value[0]
        return [{"function_call": {"name": call["name"], "arguments": ""}},
                {"function_call": {"arguments": call["arguments"]}}]
    deltas = []
    for index, call in enumerate(value):
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["arguments"]}}]})
    return deltas


class Collector:
    """The non-streaming message, put together from the same pieces a stream sends."""

    def __init__(self) -> None:
        self.content: List[str] = []
        self.reasoning: List[str] = []
        self.tool_calls: List[Dict[str, Any]] = []

    def add(self, kind: str, value: Any) -> None:
        if kind == "tool_calls":
            self.tool_calls += value
        else:
            (self.content if kind == "content" else self.reasoning).append(value)

    def message(self, legacy_functions: bool) -> Dict[str, Any]:
        content: Optional[str] = "".join(self.content)
        if self.tool_calls:
            content = content.strip() or None  # OpenAI sends null content beside tool calls
        message: Dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls and legacy_functions:
            call = self.tool_calls[0]
            message["function_call"] = {"name": call["name"], "arguments": call["arguments"]}
        elif self.tool_calls:
            message["tool_calls"] = [{"id": call["id"], "type": "function",
                                      "function": {"name": call["name"], "arguments": call["arguments"]}}
                                     for call in self.tool_calls]
        return message


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


class Completion:
    """The shape every response for one request shares: id, created, model."""

    def __init__(self, model: str) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model

    def response(self, message: Dict[str, Any], finish: str, usage: Dict[str, Any]) -> Dict[str, Any]:
        return self._envelope("chat.completion", usage=usage, choices=[
            {"index": 0, "logprobs": None, "finish_reason": finish, "message": message}])

    def chunk(self, delta: Dict[str, Any], finish: Optional[str] = None,
              usage_field: bool = False) -> Dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk", choices=[
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if usage_field:
            chunk["usage"] = None  # OpenAI sends null usage in each chunk before the last
        return chunk

    def usage_chunk(self, usage: Dict[str, Any]) -> Dict[str, Any]:
        return self._envelope("chat.completion.chunk", choices=[], usage=usage)

    def _envelope(self, kind: str, **fields: Any) -> Dict[str, Any]:
        return dict({"id": self.id, "object": kind, "created": self.created, "model": self.model,
                     "system_fingerprint": None}, **fields)


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

class ClientStalled(ConnectionError):
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
        count = self.sock.recv_into(buffer)
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


def parse_json_text(text: bytes) -> Any:
    """A request body's JSON, or a 400 saying why it is none the CLI could be given."""
    try:
        body = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise invalid("The request body is not valid JSON: %s" % error, code="invalid_json")
    problem = json_problem(body)
    if problem:
        raise invalid("The request body %s." % problem, code="invalid_json")
    return body


class ProxyHandler(BaseHTTPRequestHandler):
    """Routes OpenAI requests; each chat completion runs one `claude` child."""

    protocol_version = "HTTP/1.1"
    # Seconds a connection may wait for a request to begin, and then for all of it
    # (line, headers, body) to arrive; see ClientConnection.
    timeout = 120
    # Seconds one write may wait for a client that reads nothing before it counts as gone.
    write_timeout = 30
    server_version = "claude-max-proxy/" + __version__
    sys_version = ""
    server: "ProxyServer"

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
        self.model_name = "-"
        self.usage: Dict[str, Any] = {}
        self.headers_sent = False
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True  # the client closed the connection between requests
                return
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
        except (ClientGone, ConnectionError):
            # Gone, or not reading (ClientStalled): logged as nginx does, whatever was sent.
            self.close_connection = True
            self.status_sent = 499
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
        path = "/" + self.path.split("?", 1)[0].strip("/")
        if path.startswith("/v1/") or path == "/v1":
            path = path[3:] or "/"
        try:
            self._check_source()
            # Every route but /health needs the key, with or without /v1 before it;
            # browsers send CORS preflights without credentials.
            if path != "/health" and not (method == "OPTIONS" and self.server.config.cors):
                self._authorize()
            handler = self._handler_for(path, method)
        except ProxyError:
            self._discard_body()  # an unread body would be taken for the next request
            raise
        if handler != self._chat_completions:
            self._discard_body()
        handler()

    def _handler_for(self, path: str, method: str) -> Callable[[], None]:
        # HEAD answers like GET; _send_json leaves the body out.
        routes: Dict[str, Dict[str, Callable[[], None]]] = {
            "/health": {"GET": self._health, "HEAD": self._health},
            "/models": {"GET": self._list_models, "HEAD": self._list_models},
            "/chat/completions": {"POST": self._chat_completions},
        }
        if path.startswith("/models/"):
            get_model = lambda: self._get_model(path[len("/models/"):])  # noqa: E731
            routes[path] = {"GET": get_model, "HEAD": get_model}
        methods = routes.get(path)
        if methods is None:
            raise ProxyError(404, "Unknown path %s %s." % (method, self.path), code="unknown_url")
        if method == "OPTIONS" and self.server.config.cors:
            return self._preflight
        if method not in methods:
            raise ProxyError(405, "Method %s is not allowed on %s; use %s."
                             % (method, self.path, ", ".join(methods)),
                             code="method_not_allowed", headers={"Allow": ", ".join(methods)})
        return methods[method]

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
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8"), key.encode("utf-8")):
            raise ProxyError(401, "Invalid or missing API key. Send 'Authorization: Bearer <key>' "
                             "with the key the proxy was started with.", code="invalid_api_key")

    # -- simple routes -------------------------------------------------------

    def _health(self) -> None:
        self._send_json(200, self.server.health())

    def _list_models(self) -> None:
        self._send_json(200, {"object": "list", "data": [model_object(m) for m, _ in MODELS]})

    def _get_model(self, model_id: str) -> None:
        model = find_model(model_id)
        if model is None:
            raise ProxyError(404, "The model `%s` does not exist." % model_id,
                             code="model_not_found", param="model")
        self._send_json(200, model)

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

    # -- chat completions ----------------------------------------------------

    def _chat_completions(self) -> None:
        self.server.count_request()  # chat completions only: probes of /health are not served requests
        text = self._read_json_text()
        self.server.limits.check(self.server.config.no_extra_usage)
        # Parsed JSON can take many times its text: parsed only in a slot, so at most
        # --max-concurrent bodies take that room at once, and neither outlives the translation.
        with self.server.slot():
            request = parse_chat_request(parse_json_text(text), self.server.config)
            del text
            self.model_name = request.model
            claude = find_claude(self.server.config.claude_bin)
            if claude is None:
                raise claude_not_found(self.server.config.claude_bin)
            self._run(request, claude)

    def _run(self, request: ChatRequest, claude: str) -> None:
        config = self.server.config
        completion = Completion(request.model)
        answer = Answer(request, config.retry_budget)
        collector = Collector()
        process = self.server.spawn(cli_launch(claude, request, config))
        try:
            process.send(stdin_message(request))
            for event in process.events(self._deadlines(process, answer.reply), self.connection):
                self.server.limits.observe(event)
                for kind, value in answer.feed(event):
                    if request.stream:
                        for delta in stream_deltas(kind, value, request.legacy_functions):
                            self._stream_delta(completion, request, delta)
                    else:
                        collector.add(kind, value)
                if answer.done:
                    break
            if not answer.done:
                raise self._no_result(process)
            if not answer.reply.completed:
                # Cut short (a stop sequence, the max_tokens limit): stop the CLI before
                # answering, or it goes on spending the subscription on text nobody reads.
                process.close()
            self.usage = usage_from_cli(answer.reply.usage)
            finish = answer.finish_reason(request.legacy_functions)
            if request.stream:
                self._stream_end(completion, request, finish)
            else:
                self._send_json(200, completion.response(
                    collector.message(request.legacy_functions), finish, self.usage))
        except ProxyError as error:
            error = self.server.limits.explain(error)  # a 429 names the used-up window and its reset
            if not self.headers_sent:
                raise error
            self._stream_error(error)
        finally:
            # A child that printed its result exits by itself (and may be writing
            # Claude Code's own files); one cut short is killed now.
            process.close(grace=1.0 if answer.reply.completed else 0.0)
            self.server.release(process)

    def _deadlines(self, process: ClaudeProcess, reply: Reply) -> Callable[[], Tuple[float, ProxyError]]:
        config = self.server.config
        total = (time.monotonic() + config.timeout,
                 ProxyError(504, "Claude did not finish within %g s (--timeout)." % config.timeout,
                            code="timeout"))
        idle = ProxyError(504, "Claude Code printed nothing for %g s (--idle-timeout)."
                          % config.idle_timeout, code="idle_timeout")

        def next_deadline() -> Tuple[float, ProxyError]:  # asked after every read: keep it cheap
            earliest = min(total, (process.last_output + config.idle_timeout, idle),
                           key=lambda pair: pair[0])
            retry = reply.retry_deadline()
            return earliest if retry is None or earliest[0] <= retry[0] else retry
        return next_deadline

    def _no_result(self, process: ClaudeProcess) -> ProxyError:
        if self.server.closing:
            return ProxyError(503, "The proxy is shutting down.", code="shutting_down")
        code = process.close(grace=2.0)
        tail = process.stderr_text()[-1000:]
        return ProxyError(
            502, "Claude Code exited (code %s) without an answer. %s"
            % (code, ("Its last output: " + tail) if tail else "It printed nothing on stderr."),
            code="cli_failed")

    # -- response writing ------------------------------------------------------

    def _stream_delta(self, completion: Completion, request: ChatRequest,
                      delta: Dict[str, Any]) -> None:
        if not self.headers_sent:
            self._start_stream()
            delta = dict({"role": "assistant", "content": None}, **delta)
        self._send_event(completion.chunk(delta, usage_field=request.include_usage))

    def _stream_end(self, completion: Completion, request: ChatRequest, finish: str) -> None:
        if not self.headers_sent:
            self._stream_delta(completion, request, {"content": ""})
        self._send_event(completion.chunk({}, finish, usage_field=request.include_usage))
        if request.include_usage:
            self._send_event(completion.usage_chunk(self.usage))
        self._end_stream()

    def _stream_error(self, error: ProxyError) -> None:
        log.warning("%s failed mid-stream: %s", self.request_id, error.message)
        self._send_event(error.body())
        self._end_stream()

    def _start_stream(self) -> None:
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

    def _send_event(self, payload: Any) -> None:
        """One SSE frame as one HTTP chunk, written straight to the socket."""
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        self._write_chunk(("data: %s\n\n" % data).encode("utf-8"))

    def _end_stream(self) -> None:
        self._send_event("[DONE]")
        self._write_chunk(b"")

    def _write_chunk(self, data: bytes) -> None:
        try:
            if self.chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            if data:
                self.wfile.write(data)
        except OSError:
            raise ClientGone()

    def _send_json(self, status: int, payload: Any, headers: Optional[Dict[str, str]] = None) -> None:
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
        if self.headers_sent:
            self.close_connection = True
            return
        if error.status >= 500 or error.status == 429:
            log.warning("%s %s: %s", self.request_id, error.status, error.message)
        try:
            self._send_json(error.status, error.body(), error.headers)
        except OSError:
            self.close_connection = True

    def _common_headers(self) -> None:
        self.send_header("X-Request-Id", self.request_id)
        for name, value in self.server.limits.headers().items():
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
        usage = self.usage or {}
        log.info("%s %s %s %s model=%s prompt_tokens=%s completion_tokens=%s %.0fms",
                 self.request_id, method, self.path.split("?", 1)[0], self.status_sent,
                 self.model_name, usage.get("prompt_tokens", "-"),
                 usage.get("completion_tokens", "-"),
                 (time.monotonic() - self.started) * 1000)


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
    """The HTTP server, its limits on connections and children, and every live `claude` child."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's listen backlog of 5 resets connections when dozens of clients connect at once.
    request_queue_size = 128
    # Seconds to wait before accepting again when accept() found no file or memory left.
    accept_backoff = 0.5

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.requests_served = 0
        self.limits = UsageLimits()
        self._slots = threading.BoundedSemaphore(max(1, config.max_concurrent))
        self._children: Dict[int, ClaudeProcess] = {}
        self._lock = threading.Lock()
        self._closing = False
        self.max_connections = connection_cap(config, open_file_limit())
        if self.max_connections < config.max_connections:
            log.warning("at most %d connections at once (not %d): the open-file limit is %s",
                        self.max_connections, config.max_connections, open_file_limit())
        self.connections = 0
        self._accept_failing = False
        self._too_many = refusal_bytes(ProxyError(
            503, "The proxy has %d connections open already (--max-connections); retry shortly."
            % self.max_connections, code="too_many_connections", headers={"Retry-After": "1"}))
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.address_family = family
        super().__init__((config.host, config.port), ProxyHandler)
        # Once the port is ours: a proxy that cannot start touches nothing.
        abandoned = remove_abandoned_workdirs()
        if abandoned:
            log.info("removed %d working directories left by proxies that did not exit cleanly", abandoned)
        self.lifeline = Lifeline()
        self.pool = WarmPool(config.pool_size, config.pool_ttl, self.lifeline)
        self._prewarm_default()

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
            admitted = self.connections < self.max_connections
            if admitted:
                self.connections += 1
        if not admitted:
            self._refuse_connection(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self._lock:
            self.connections -= 1

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
        if isinstance(error, (ConnectionError, socket.timeout)):
            log.debug("client %s went away: %s", client_address, error)
        else:
            log.exception("error while serving %s", client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def closing(self) -> bool:
        return self._closing

    # -- children --------------------------------------------------------------

    def slot(self) -> "Slot":
        return Slot(self._slots, self.config.queue_timeout)

    def spawn(self, launch: Launch) -> ClaudeProcess:
        """The process for one request: a pre-started one when the pool has it, else a new one."""
        process = self.pool.take(launch)
        warm = process is not None
        if process is None:
            process = start_claude(launch, self.lifeline)
        with self._lock:
            if not self._closing:
                self._children[process.pid] = process
                log.debug("claude pid %d (%s)", process.pid, "warm" if warm else "cold")
                return process
        process.close()
        raise ProxyError(503, "The proxy is shutting down.", code="shutting_down")

    def _prewarm_default(self) -> None:
        """Warm what a request naming no model and no system prompt needs."""
        claude = find_claude(self.config.claude_bin)
        if claude is None:
            return
        try:
            request = parse_chat_request({"messages": [{"role": "user", "content": ""}]}, self.config)
        except ProxyError as error:
            log.warning("nothing pre-started: %s", error.message)
            return
        self.pool.prewarm(cli_launch(claude, request, self.config))

    def release(self, process: ClaudeProcess) -> None:
        with self._lock:
            if self._children.get(process.pid) is process:  # its pid may be a new child's already
                del self._children[process.pid]

    def active_children(self) -> List[int]:
        with self._lock:
            return sorted(self._children)

    def kill_children(self) -> None:
        with self._lock:
            self._closing = True
            children = list(self._children.values())
        self.pool.close()
        for process in children:
            process.terminate()  # its request's thread still reads it, and closes it
        self.lifeline.close()

    # -- status ----------------------------------------------------------------

    def count_request(self) -> None:
        with self._lock:
            self.requests_served += 1

    def health(self) -> Dict[str, Any]:
        claude = find_claude(self.config.claude_bin)
        return {
            "status": "ok" if claude else "degraded",
            "version": __version__,
            "claude": {"found": claude is not None, "path": claude,
                       "version": claude_version(claude) if claude else None},
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "requests_served": self.requests_served,
            "active_children": len(self.active_children()),
            "max_concurrent": self.config.max_concurrent,
            "pool": self.pool.stats(),
            "usage_limits": self.limits.health(),
        }

    def shutdown_gracefully(self) -> None:
        """Kill every child and stop serving; call it from any thread but serve_forever's."""
        self.kill_children()
        self.shutdown()


class Slot:
    """A place among --max-concurrent running children; a 429 when none frees in time."""

    def __init__(self, semaphore: threading.BoundedSemaphore, timeout: float) -> None:
        self.semaphore = semaphore
        self.timeout = timeout

    def __enter__(self) -> "Slot":
        if not self.semaphore.acquire(timeout=self.timeout):
            raise ProxyError(429, "Too many requests at once: every one of the proxy's claude slots "
                             "stayed busy for %g s (--max-concurrent, --queue-timeout)."
                             % self.timeout, code="too_many_requests", headers={"Retry-After": "5"})
        return self

    def __exit__(self, *exc: Any) -> None:
        self.semaphore.release()


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
    log.info("claude-max-proxy %s listening on http://%s:%d/v1", __version__,
             config.host, server.port)
    try:
        server.serve_forever()
    finally:
        server.kill_children()
        server.server_close()
    return 0


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


def perform(system: System, actions: List[Action], dry_run: bool) -> None:
    for action in actions:
        if dry_run:
            print("would " + action.describe())
            if isinstance(action, WriteFile):
                print("    " + action.shown().replace("\n", "\n    "))
        else:
            print(action.describe())
            apply_action(system, action)


def apply_action(system: System, action: Action) -> None:
    """One step; a file that cannot be written (a read-only home, say) stops it with a FAIL line."""
    try:
        action.apply(system)
    except OSError as error:
        raise ServiceError("could not %s: %s" % (action.describe(), error))


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

    def loaded(self) -> Tuple[Optional[bool], str]:
        ran = self.system.run(["launchctl", "print", self.service])
        if ran.code == 127:
            return None, ran.err.strip()
        return ran.code == 0, "loaded" if ran.code == 0 else "not loaded"


SYSTEMD_TEMPLATE = """\
[Unit]
Description=claude-max-proxy: an OpenAI-compatible API over the Claude Code CLI
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


def fetch_health(url: str, timeout: float = 2.0) -> Optional[Dict[str, Any]]:
    """The proxy's /health answer, or None when no claude-max-proxy answers there."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via http_proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            health = json.loads(response.read().decode("utf-8"))
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


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [(n, unit) for n, unit in parts if n][:2] or [(0, "s")]
    return " ".join("%d%s" % pair for pair in shown)


def describe_health(health: Dict[str, Any]) -> str:
    claude = health.get("claude") or {}
    return ("pid %s, up %s, version %s, %s requests served, %s of %s children active; claude %s"
            % (health.get("pid"), format_duration(health.get("uptime_s") or 0),
               health.get("version"), health.get("requests_served"),
               health.get("active_children"), health.get("max_concurrent"),
               "%s at %s" % (claude.get("version"), claude.get("path")) if claude.get("found")
               else "NOT FOUND"))


def describe_limits(health: Dict[str, Any]) -> List[str]:
    """One line per usage window the running proxy knows of, reset times in UTC and local time."""
    windows = (health.get("usage_limits") or {}).get("windows") or {}
    if not windows:
        return ["nothing reported yet (Claude Code reports it with answers on a subscription login)"]
    lines = []
    for name, window in sorted(windows.items()):
        used = window.get("utilization")
        reset = window.get("resets_at_unix")
        lines.append("%s: %s%s%s%s" % (
            WINDOW_NAMES.get(name, name), window.get("status"),
            ", %d%% used" % round(used * 100) if isinstance(used, (int, float)) else "",
            ", resets %s (local time %s)" % (window.get("resets_at"), time.strftime(
                "%a %Y-%m-%d %H:%M %Z", time.localtime(reset))) if isinstance(reset, int) else "",
            ", EXTRA USAGE IN USE" if window.get("extra_usage_in_use") else ""))
    return lines


# -- the commands --------------------------------------------------------------

def removal_actions(system: System, manager: ServiceManager) -> List[Action]:
    """What uninstall does: the manager's steps, and the key file when install wrote one."""
    key = [RemoveFile(manager.key_path)] if system.exists(manager.key_path) else []
    return manager.uninstall_actions() + key


def install(system: System, config: Config, dry_run: bool, wait: float = HEALTH_WAIT) -> int:
    manager = required_manager(system)
    config = with_absolute_paths(config)
    claude = find_claude(config.claude_bin)
    if claude is None:
        print("WARN  %s The service will still look in the usual install places."
              % claude_not_found(config.claude_bin).message)
    problem = None if dry_run else manager.unreachable()
    if problem:  # found before anything is written, so a failed install leaves nothing behind
        raise ServiceError("cannot install the %s: %s. Nothing was written." % (manager.kind, problem))
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
    print("OK    claude-max-proxy answers %s: %s" % (url, describe_health(health)))
    return 0


def with_absolute_paths(config: Config) -> Config:
    """A service starts in /, so paths given relative to here must be made absolute."""
    claude_bin = config.claude_bin
    absolute = {name: os.path.abspath(getattr(config, name))
                for name in ("log_file", "api_key_file") if getattr(config, name)}
    return with_setting(config, claude_bin=os.path.abspath(claude_bin) if os.sep in claude_bin
                        else claude_bin, **absolute)


def uninstall(system: System, dry_run: bool) -> int:
    manager = required_manager(system)
    if not system.exists(manager.path):
        print("nothing to uninstall: %s does not exist" % manager.path)
        return 0
    perform(system, removal_actions(system, manager), dry_run)
    if isinstance(manager, LaunchAgent):
        print("the logs stay in %s" % manager.logs)
    return 0


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
    health = fetch_health(url)
    print("answering: %s" % ("yes, " + url if health else "no, nothing at " + url))
    if health is None:
        return 1
    print("           " + describe_health(health))
    for number, line in enumerate(describe_limits(health)):
        print("%s%s" % ("usage:     " if number == 0 else "           ", line))
    return 0 if health.get("status") == "ok" else 1


def self_command() -> str:
    return "python3 %s" % os.path.basename(__file__)


class Check(NamedTuple):
    level: str  # OK, WARN or FAIL
    message: str
    fix: str = ""


def check_python(system: System, config: Config) -> Check:
    version = "Python %d.%d.%d (%s)" % (sys.version_info[:3] + (system.python,))
    if sys.version_info < (3, 9):
        return Check("FAIL", version + " is too old", "run it with Python 3.9 or newer, "
                     "such as macOS's /usr/bin/python3")
    return Check("OK", version)


def check_claude(system: System, config: Config) -> Check:
    claude = find_claude(config.claude_bin)
    if claude is None:
        return Check("FAIL", "claude (`%s`) not found on PATH or in %s"
                     % (config.claude_bin, ", ".join(CLAUDE_INSTALL_DIRS)),
                     "npm install -g @anthropic-ai/claude-code, or pass --claude-bin /full/path")
    return Check("OK", "claude %s at %s" % (claude_version(claude) or "(version unknown)", claude))


def check_login(system: System, config: Config) -> Check:
    claude = find_claude(config.claude_bin)
    if claude is None:
        return Check("FAIL", "login not checked: claude not found", "install claude first")
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
    return Check("FAIL", where + " is taken by another program",
                 "find it with `lsof -nP -iTCP:%d -sTCP:LISTEN` and stop it, or choose another "
                 "--port" % config.port)


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
    if health.get("status") != "ok":
        return Check("FAIL", "the running proxy cannot find claude: %s" % describe_health(health),
                     "re-run `%s install` from a shell where `claude` works, or pass "
                     "--claude-bin /full/path/to/claude" % self_command())
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
        log.error("cannot listen on %s:%d: %s", config.host, config.port, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
