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

The module reads top to bottom in the order a request flows: configuration,
errors, models, request translation (OpenAI -> CLI), the ``claude`` process,
response translation (CLI events -> OpenAI), the HTTP handler, and the server.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

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
    ("--port", "CLAUDE_PROXY_PORT", int, 3456, "TCP port to listen on"),
    ("--claude-bin", "CLAUDE_BIN", str, "claude",
     "the Claude Code CLI: a name looked up on PATH and the usual install places, or a path"),
    ("--default-model", "CLAUDE_PROXY_DEFAULT_MODEL", str, "claude-sonnet-4",
     "model used when a request names none"),
    ("--api-key", "CLAUDE_PROXY_API_KEY", str, "",
     "when set, every /v1 request needs 'Authorization: Bearer KEY'"),
    ("--max-concurrent", "CLAUDE_PROXY_MAX_CONCURRENT", int, 8,
     "most claude processes answering at once"),
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
     "allow browser calls from this origin ('*' for any); off when empty"),
    ("--allow-api-key", "CLAUDE_PROXY_ALLOW_API_KEY", bool, False,
     "pass ANTHROPIC_API_KEY/ANTHROPIC_AUTH_TOKEN to the CLI (bills per token!)"),
    ("--log-level", "CLAUDE_PROXY_LOG_LEVEL", str, "info",
     "debug, info, warning or error"),
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


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claude_max_proxy.py",
        description="OpenAI-compatible HTTP API over the Claude Code CLI (your Claude subscription).",
        epilog="Each flag's default can also be set by the environment variable shown.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
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


def parse_config(argv: Optional[List[str]] = None) -> Config:
    args = build_arg_parser().parse_args(argv)
    return Config(**vars(args))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
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
# Request translation: OpenAI chat request -> CLI argv and stdin message
# ---------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = ("You are Claude, a helpful AI assistant made by Anthropic. "
                         "Answer the user's messages directly.")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# OpenAI request fields that change nothing here, listed so the debug log can
# name the ones that are truly unknown.
IGNORED_FIELDS = frozenset((
    "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "user", "metadata",
    "logit_bias", "logprobs", "top_logprobs", "store", "service_tier", "prediction", "modalities",
    "audio", "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
))
HANDLED_FIELDS = frozenset(("model", "messages", "stream", "stream_options", "n"))


class ChatRequest:
    """A validated chat request, reduced to what the CLI needs."""

    def __init__(self, model: str, cli_model: str, system_prompt: str,
                 content: List[Dict[str, Any]], stream: bool, include_usage: bool) -> None:
        self.model = model              # as the client named it; echoed in responses
        self.cli_model = cli_model      # what --model gets
        self.system_prompt = system_prompt
        self.content = content          # the user message blocks sent on stdin
        self.stream = stream
        self.include_usage = include_usage


def parse_chat_request(body: Any, config: Config) -> ChatRequest:
    """Validate an OpenAI chat completion body; raise ProxyError(400) naming the bad param."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_type")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise invalid("`model` must be a string.", "model", "invalid_type")
    cli_model = resolve_model(model, config.default_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty array.", "messages",
                      "invalid_type" if not isinstance(messages, list) else "empty_array")
    for index, message in enumerate(messages):
        validate_message(message, index)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("`stream` must be a boolean.", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("`stream_options` must be an object.", "stream_options", "invalid_type")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise invalid("Only n=1 is supported: the Claude Code CLI gives one answer per request.",
                      "n", "unsupported_value")
    unknown = sorted(set(body) - HANDLED_FIELDS - IGNORED_FIELDS)
    if unknown:
        log.debug("ignoring request fields: %s", ", ".join(unknown))
    return ChatRequest(
        model=model or config.default_model,
        cli_model=cli_model,
        system_prompt=system_prompt_of(messages),
        content=prompt_content(messages),
        stream=stream,
        include_usage=bool(stream and options.get("include_usage")),
    )


def validate_message(message: Any, index: int) -> None:
    param = "messages[%d]" % index
    if not isinstance(message, dict):
        raise invalid("%s must be an object." % param, param, "invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise invalid("%s.role must be one of %s; got %r." % (param, ", ".join(ROLES), role),
                      param + ".role")
    content = message.get("content")
    if content is None and role == "assistant":
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid("%s.content must be a string or an array of content parts." % param,
                      param + ".content", "invalid_type")
    for part_index, part in enumerate(content):
        part_param = "%s.content[%d]" % (param, part_index)
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid("%s has unsupported content part type %r; text parts are supported."
                          % (part_param, kind), part_param + ".type")
        if not isinstance(part.get("text"), str):
            raise invalid("%s.text must be a string." % part_param, part_param + ".text",
                          "invalid_type")


def text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string, null, or an array of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def system_prompt_of(messages: List[Dict[str, Any]]) -> str:
    parts = [text_of(m.get("content")) for m in messages if m["role"] in ("system", "developer")]
    joined = "\n\n".join(part for part in parts if part.strip())
    return joined or DEFAULT_SYSTEM_PROMPT


def prompt_content(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The content blocks of the one user message the CLI receives on stdin.

    A single user turn is sent as it is. A longer conversation becomes one
    transcript of the earlier turns, each inside tags naming its role, followed
    by the newest user message; Claude then writes the next assistant turn.
    """
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    if not turns:
        raise invalid("`messages` holds only system messages; add a user message.", "messages")
    last = turns[-1]
    if last["role"] == "user":
        history, final = turns[:-1], text_of(last.get("content"))
    else:
        history, final = turns, ""
    if not history:
        return [{"type": "text", "text": final}]
    lines = ["Below is our conversation so far, oldest turn first. Reply to the latest "
             "message as the assistant; write only your reply, without role tags.", "",
             "<conversation>"]
    for turn in history:
        lines.append("<%s>\n%s\n</%s>" % (turn["role"], text_of(turn.get("content")), turn["role"]))
    lines.append("</conversation>")
    if final:
        lines += ["", final]
    return [{"type": "text", "text": "\n".join(lines)}]


def cli_argv(claude: str, request: ChatRequest) -> List[str]:
    """The argv of the child. Nothing from the request reaches a shell: argv is a list."""
    return [
        claude, "-p",
        "--input-format", "stream-json",
        "--output-format", "stream-json", "--verbose", "--include-partial-messages",
        "--model", request.cli_model,
        "--system-prompt", request.system_prompt,
        # Claude Code's own tools (Bash, Read, Edit, web) must never run for a proxied prompt.
        "--tools", "",
        "--max-turns", "1",
        "--no-session-persistence",
        # Keep the user's hooks, settings and MCP servers out of proxied requests;
        # the login itself lives outside settings and still applies.
        "--setting-sources", "",
        "--strict-mcp-config",
    ]


STRIPPED_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")


def cli_env(config: Config, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The child's environment: ours, minus API keys that would bill per token."""
    env = dict(os.environ if base is None else base)
    if not config.allow_api_key:
        for name in STRIPPED_ENV:
            env.pop(name, None)
    env.pop("CLAUDECODE", None)  # set when we run inside Claude Code; the child is not nested
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
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


class ClaudeProcess:
    """One `claude -p` child in its own process group and throwaway directory.

    It serves exactly one request: send() hands it the message, events() reads
    its stdout as JSON events, and close() or kill() reaps it and removes the
    directory. kill() is safe from any thread and any number of times.
    """

    STDERR_TAIL = 4096

    def __init__(self, argv: List[str], env: Dict[str, str]) -> None:
        self.workdir = tempfile.mkdtemp(prefix="claude-proxy-")
        try:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self.workdir, env=env, start_new_session=True, bufsize=0)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.pid = self.popen.pid
        self.last_output = time.monotonic()
        self.stderr_tail = b""
        self._lock = threading.Lock()
        self._reaped = False

    def send(self, message: bytes) -> None:
        """Write the one message and close stdin, so the CLI answers and exits."""
        # The request starts now; a pre-started process may have waited long.
        self.last_output = time.monotonic()
        try:
            self.popen.stdin.write(message)
        except (BrokenPipeError, OSError):
            pass  # it died already; events() reports that with its stderr
        finally:
            try:
                self.popen.stdin.close()
            except OSError:
                pass

    def events(self, next_deadline: Callable[[], Tuple[float, ProxyError]],
               client: Optional[socket.socket] = None) -> Iterator[Dict[str, Any]]:
        """Yield each JSON object the CLI prints, until its stdout closes.

        next_deadline() gives the earliest moment to give up and the error to raise
        then; it is asked again after every read, so callers can move it. When
        `client` is given, a client that closes its connection raises ClientGone
        at once, even while the CLI is silent.
        """
        out, err = self.popen.stdout, self.popen.stderr
        pending = b""
        with selectors.DefaultSelector() as selector:
            selector.register(out, selectors.EVENT_READ)
            selector.register(err, selectors.EVENT_READ)
            if client is not None:
                selector.register(client, selectors.EVENT_READ)
            while True:
                deadline, error = next_deadline()
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise error
                for key, _ in selector.select(min(wait, 3600.0)):
                    if key.fileobj is client:
                        if client_closed(client):
                            raise ClientGone()
                        selector.unregister(client)  # a pipelined request; not ours to read
                        continue
                    data = os.read(key.fd, 65536)
                    if key.fileobj is err:
                        if data:
                            self.stderr_tail = (self.stderr_tail + data)[-self.STDERR_TAIL:]
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

    def stderr_text(self) -> str:
        return self.stderr_tail.decode("utf-8", "replace").strip()

    def exit_code(self, wait: float = 2.0) -> Optional[int]:
        try:
            return self.popen.wait(wait)
        except subprocess.TimeoutExpired:
            return None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def close(self, grace: float = 1.0) -> None:
        """Let a child that has answered exit by itself for a moment, then make sure."""
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """Kill the child and everything it started, reap it, remove its directory."""
        with self._lock:
            if self._reaped:
                return
            self._reaped = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_claude(argv: List[str], env: Dict[str, str]) -> ClaudeProcess:
    """A new process for a request, or a 503 when the CLI cannot be started."""
    try:
        return ClaudeProcess(argv, env)
    except OSError as error:
        raise ProxyError(503, "Could not start %s: %s" % (argv[0], error), code="claude_not_found")


PoolKey = Tuple[Tuple[str, ...], Tuple[Tuple[str, str], ...]]


def pool_key(argv: List[str], env: Dict[str, str]) -> PoolKey:
    """Everything a process is started with: only a request with the same key may use it."""
    return tuple(argv), tuple(sorted(env.items()))


class Warm:
    """A pre-started process waiting on stdin, and the key it was started for."""

    def __init__(self, key: PoolKey, process: ClaudeProcess) -> None:
        self.key = key
        self.process = process
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

    def __init__(self, size: int, ttl: float) -> None:
        self.size = max(0, size)
        self.ttl = ttl
        self.hits = 0
        self.misses = 0
        self._idle: List[Warm] = []  # oldest first
        self._wanted: List[PoolKey] = []  # keys to start a process for, in order
        self._last_used: Dict[PoolKey, float] = {}  # keys used within the last ttl
        self._starting = 0
        self._closed = False
        self._changed = threading.Condition()
        self._keeper: Optional[threading.Thread] = None
        if self.size:
            self._keeper = threading.Thread(target=self._keep, name="warm-pool", daemon=True)
            self._keeper.start()

    # -- used by requests --------------------------------------------------------

    def take(self, argv: List[str], env: Dict[str, str]) -> Optional[ClaudeProcess]:
        """A live process started for this argv and env, or None; a replacement is queued either way."""
        if not self.size:
            return None
        key = pool_key(argv, env)
        found: Optional[ClaudeProcess] = None
        dead: List[ClaudeProcess] = []
        with self._changed:
            if self._closed:
                return None
            for warm in [warm for warm in self._idle if warm.key == key]:
                self._idle.remove(warm)
                if warm.process.alive():
                    found = warm.process
                    break
                dead.append(warm.process)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            self._want(key)
        for process in dead:
            process.kill()  # died while waiting; the request starts a new one instead
        return found

    def prewarm(self, argv: List[str], env: Dict[str, str]) -> None:
        """Start a process for a key no request has used yet (the default one, at start-up)."""
        if self.size:
            with self._changed:
                self._want(pool_key(argv, env))

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
            warm.process.kill()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(5.0)

    def _want(self, key: PoolKey) -> None:
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
                warm.process.kill()
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

    def _reserve_next(self, doomed: List[Warm]) -> Optional[PoolKey]:
        """The next wanted key there is room for, evicting into `doomed` when full."""
        while self._wanted:
            key = self._wanted.pop(0)
            if len(self._idle) + self._starting >= self.size:
                victim = self._least_recently_used_than(key)
                if victim is None:
                    continue  # every waiting process is for a key used at least as lately
                self._idle.remove(victim)
                doomed.append(victim)
            self._starting += 1
            return key
        return None

    def _least_recently_used_than(self, key: PoolKey) -> Optional[Warm]:
        never = float("-inf")
        used = self._last_used.get(key, never)
        older = [warm for warm in self._idle if self._last_used.get(warm.key, never) < used]
        return min(older, key=lambda warm: self._last_used.get(warm.key, never), default=None)

    def _start(self, key: PoolKey) -> None:
        process: Optional[ClaudeProcess] = None
        try:
            process = start_claude(list(key[0]), dict(key[1]))
        except ProxyError as error:
            log.warning("nothing pre-started: %s", error.message)
        with self._changed:
            self._starting -= 1
            if process is not None and not self._closed:
                self._idle.append(Warm(key, process))
                return
        if process is not None:
            process.kill()  # the pool closed while it started


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


_versions: Dict[str, Optional[str]] = {}


def claude_version(path: str) -> Optional[str]:
    """`claude --version`, asked once per path."""
    if path not in _versions:
        try:
            done = subprocess.run([path, "--version"], capture_output=True, timeout=15,
                                  env=cli_env(Config()), stdin=subprocess.DEVNULL)
            _versions[path] = done.stdout.decode("utf-8", "replace").strip() or None
        except (OSError, subprocess.SubprocessError):
            _versions[path] = None
    return _versions[path]


# ---------------------------------------------------------------------------
# Response translation: CLI events -> OpenAI chat completion
# ---------------------------------------------------------------------------

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}
AUTH_ERRORS = ("authentication_failed", "oauth_org_not_allowed")
RATE_LIMIT_STATUS = 429
OVERLOADED_STATUS = 529


def finish_reason(stop_reason: Optional[str]) -> str:
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


class Reply:
    """What one CLI run said, built up event by event. Pure: no I/O, no clock but `now`.

    feed() takes each CLI event and returns the pieces of output it adds, as
    (kind, text) pairs; it raises ProxyError when the CLI reports a failure.
    After the `result` event, `done` is set and `stop_reason` and `usage` hold.
    """

    def __init__(self, retry_budget: float) -> None:
        self.retry_budget = retry_budget
        self.done = False
        self.stop_reason: Optional[str] = None
        self.usage: Dict[str, Any] = {}
        self.streamed = False           # text came as deltas, so assistant lines repeat it
        self.emitted = False            # some text went out, so the result's text repeats it
        self.error_kind: Optional[str] = None
        self.retry_since: Optional[float] = None
        self.retry_error: Optional[ProxyError] = None

    def retry_deadline(self) -> Optional[Tuple[float, ProxyError]]:
        """When the CLI has retried too long, and the error to give then."""
        if self.retry_since is None or self.retry_error is None:
            return None
        return self.retry_since + self.retry_budget, self.retry_error

    def feed(self, event: Dict[str, Any], now: Optional[float] = None) -> List[Tuple[str, str]]:
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

    def _stream_event(self, event: Dict[str, Any]) -> List[Tuple[str, str]]:
        if event.get("type") == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                self.streamed = self.emitted = True
                return [("content", delta["text"])]
        elif event.get("type") == "message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
        return []

    def _assistant(self, event: Dict[str, Any]) -> List[Tuple[str, str]]:
        # An assistant message carrying "error" is the CLI's synthetic failure
        # notice ("Not logged in", "API Error: ..."): remember it for the result.
        if event.get("error"):
            self.error_kind = event["error"]
            return []
        if self.streamed:
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

    def _result(self, event: Dict[str, Any]) -> List[Tuple[str, str]]:
        if self.error_kind == "max_output_tokens" and self.emitted:
            # The CLI continued past the output limit three times and gave up; what
            # was written stands, cut off, as OpenAI's finish_reason "length".
            event = dict(event, is_error=False, stop_reason="max_tokens", result="")
            self.error_kind = None
        if event.get("is_error") or self.error_kind or event.get("subtype") not in (None, "success"):
            message = event.get("result") or ", ".join(event.get("errors") or []) or \
                "Claude Code reported %s" % event.get("subtype")
            if "not logged in" in str(message).lower():
                raise ProxyError(401, LOGIN_HELP, code="not_logged_in")
            raise upstream_error(event.get("api_error_status"), str(message), self.error_kind)
        self.done = True
        self.stop_reason = event.get("stop_reason") or self.stop_reason
        self.usage = event.get("usage") or {}
        if not self.emitted and event.get("result"):
            self.emitted = True
            return [("content", event["result"])]
        return []


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


class Completion:
    """The shape every response for one request shares: id, created, model."""

    def __init__(self, model: str) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model

    def response(self, content: str, finish: str, usage: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "logprobs": None, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, "refusal": None}}],
            "usage": usage,
        }

    def chunk(self, delta: Dict[str, Any], finish: Optional[str] = None,
              usage_field: bool = False) -> Dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}]}
        if usage_field:
            chunk["usage"] = None  # OpenAI sends null usage in each chunk before the last
        return chunk

    def usage_chunk(self, usage: Dict[str, Any]) -> Dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": [], "usage": usage}


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

class ProxyHandler(BaseHTTPRequestHandler):
    """Routes OpenAI requests; each chat completion runs one `claude` child."""

    protocol_version = "HTTP/1.1"
    server_version = "claude-max-proxy/" + __version__
    sys_version = ""
    server: "ProxyServer"

    # -- routing ------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        self.started = time.monotonic()
        self.request_id = "req_" + uuid.uuid4().hex[:16]
        self.status_sent = 0
        self.model_name = "-"
        self.usage: Dict[str, Any] = {}
        self.headers_sent = False
        try:
            self._route(method)
        except ClientGone:
            self.close_connection = True
            self.status_sent = self.status_sent or 499
        except ProxyError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("%s internal error", self.request_id)
            self._send_error(ProxyError(500, "Internal proxy error; see the proxy log.",
                                        code="internal_error"))
        finally:
            self._log_access(method)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path.startswith("/v1/") or path == "/v1":
            path = path[3:] or "/"
            if not (method == "OPTIONS" and self.server.config.cors):
                self._authorize()  # browsers send preflights without credentials
        handler = self._handler_for(path, method)
        handler()

    def _handler_for(self, path: str, method: str) -> Callable[[], None]:
        routes: Dict[str, Dict[str, Callable[[], None]]] = {
            "/health": {"GET": self._health},
            "/models": {"GET": self._list_models},
            "/chat/completions": {"POST": self._chat_completions},
        }
        if path.startswith("/models/"):
            routes[path] = {"GET": lambda: self._get_model(path[len("/models/"):])}
        methods = routes.get(path)
        if methods is None:
            self._discard_body()
            raise ProxyError(404, "Unknown path %s %s." % (method, self.path), code="unknown_url")
        if method == "OPTIONS" and self.server.config.cors:
            return self._preflight
        if method not in methods:
            self._discard_body()
            raise ProxyError(405, "Method %s is not allowed on %s; use %s."
                             % (method, self.path, ", ".join(methods)),
                             code="method_not_allowed", headers={"Allow": ", ".join(methods)})
        return methods[method]

    def _authorize(self) -> None:
        key = self.server.config.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8"), key.encode("utf-8")):
            self._discard_body()
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
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.status_sent = 204

    # -- chat completions ----------------------------------------------------

    def _chat_completions(self) -> None:
        body = self._read_json_body()
        request = parse_chat_request(body, self.server.config)
        self.model_name = request.model
        claude = find_claude(self.server.config.claude_bin)
        if claude is None:
            raise claude_not_found(self.server.config.claude_bin)
        with self.server.slot():
            self._run(request, claude)

    def _run(self, request: ChatRequest, claude: str) -> None:
        config = self.server.config
        completion = Completion(request.model)
        reply = Reply(config.retry_budget)
        process = self.server.spawn(cli_argv(claude, request), cli_env(config))
        finished = False
        try:
            process.send(stdin_message(request))
            deadlines = self._deadlines(process, reply)
            pieces: List[str] = []
            for event in process.events(deadlines, self.connection):
                for kind, text in reply.feed(event):
                    if request.stream:
                        self._stream_delta(completion, request, {"content": text})
                    else:
                        pieces.append(text)
                if reply.done:
                    break
            if not reply.done:
                raise self._no_result(process)
            finished = True
            self.usage = usage_from_cli(reply.usage)
            finish = finish_reason(reply.stop_reason)
            if request.stream:
                self._stream_end(completion, request, finish)
            else:
                self._send_json(200, completion.response("".join(pieces), finish, self.usage))
        except ProxyError as error:
            if not self.headers_sent:
                raise
            self._stream_error(error)
        finally:
            if finished:
                process.close()
            else:
                process.kill()
            self.server.release(process)

    def _deadlines(self, process: ClaudeProcess, reply: Reply) -> Callable[[], Tuple[float, ProxyError]]:
        config = self.server.config
        total_at = time.monotonic() + config.timeout

        def next_deadline() -> Tuple[float, ProxyError]:
            candidates = [
                (total_at, ProxyError(504, "Claude did not finish within %g s (--timeout)."
                                      % config.timeout, code="timeout")),
                (process.last_output + config.idle_timeout,
                 ProxyError(504, "Claude Code printed nothing for %g s (--idle-timeout)."
                            % config.idle_timeout, code="idle_timeout")),
            ]
            retry = reply.retry_deadline()
            if retry is not None:
                candidates.append(retry)
            return min(candidates, key=lambda pair: pair[0])
        return next_deadline

    def _no_result(self, process: ClaudeProcess) -> ProxyError:
        code = process.exit_code()
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
            delta = dict({"role": "assistant"}, **delta)
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
        self.send_header("Transfer-Encoding", "chunked")
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
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
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
        """http.server's own errors (bad request line, 501 ...) in the OpenAI shape too."""
        self.request_id = getattr(self, "request_id", "req_-")
        self.headers_sent = False
        self.close_connection = True
        self._send_error(ProxyError(code, message or self.responses.get(code, ("Error",))[0],
                                    code="http_%d" % code))

    # -- request body --------------------------------------------------------

    def _read_json_body(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise invalid("The request body is not valid JSON: %s" % error, code="invalid_json")

    def _read_body(self) -> bytes:
        limit = self.server.config.max_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body(limit)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise ProxyError(411, "A Content-Length header is required.", code="length_required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise invalid("Content-Length is not a valid number.", code="invalid_header")
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for a next request
            raise self._too_large(limit)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ClientGone()
        return body

    def _read_chunked_body(self, limit: int) -> bytes:
        body = b""
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise invalid("Malformed chunked request body.", code="invalid_body")
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass  # trailers
                return body
            if len(body) + size > limit:
                self.close_connection = True
                raise self._too_large(limit)
            body += self.rfile.read(size)
            self.rfile.readline(1024)

    @staticmethod
    def _too_large(limit: int) -> ProxyError:
        return ProxyError(413, "The request body is larger than %d bytes (--max-body)." % limit,
                          code="request_too_large")

    def _discard_body(self) -> None:
        """Skip a body we will not use, so a kept-alive connection stays in step."""
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.server.config.max_body:
            self.rfile.read(int(length))
        elif length or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

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
        self.server.count_request()


# ---------------------------------------------------------------------------
# Server and main()
# ---------------------------------------------------------------------------

class ProxyServer(ThreadingHTTPServer):
    """The HTTP server, its concurrency limit, and every live `claude` child."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's listen backlog of 5 resets connections when dozens of clients connect at once.
    request_queue_size = 128

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.requests_served = 0
        self._slots = threading.BoundedSemaphore(max(1, config.max_concurrent))
        self._children: Dict[int, ClaudeProcess] = {}
        self._lock = threading.Lock()
        self._closing = False
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.address_family = family
        super().__init__((config.host, config.port), ProxyHandler)
        self.pool = WarmPool(config.pool_size, config.pool_ttl)  # once the port is ours
        self._prewarm_default()

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for our fully qualified name, which can
        # stall start-up for seconds on a Mac with a slow resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout)):
            log.debug("client %s went away: %s", client_address, error)
        else:
            log.exception("error while serving %s", client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    # -- children --------------------------------------------------------------

    def slot(self) -> "Slot":
        return Slot(self._slots, self.config.queue_timeout)

    def spawn(self, argv: List[str], env: Dict[str, str]) -> ClaudeProcess:
        """The process for one request: a pre-started one when the pool has it, else a new one."""
        process = self.pool.take(argv, env)
        warm = process is not None
        if process is None:
            process = start_claude(argv, env)
        with self._lock:
            if not self._closing:
                self._children[process.pid] = process
                log.debug("claude pid %d (%s)", process.pid, "warm" if warm else "cold")
                return process
        process.kill()
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
        self.pool.prewarm(cli_argv(claude, request), cli_env(self.config))

    def release(self, process: ClaudeProcess) -> None:
        with self._lock:
            self._children.pop(process.pid, None)

    def active_children(self) -> List[int]:
        with self._lock:
            return sorted(self._children)

    def kill_children(self) -> None:
        with self._lock:
            self._closing = True
            children = list(self._children.values())
        self.pool.close()
        for process in children:
            process.kill()

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
        }

    def shutdown_gracefully(self) -> None:
        """Stop accepting, kill every child; safe to call from a signal handler."""
        self.kill_children()
        threading.Thread(target=self.shutdown, daemon=True).start()


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


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def startup_warnings(config: Config) -> List[str]:
    warnings = []
    if not is_loopback(config.host) and not config.api_key:
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


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def serve(config: Config) -> int:
    server = ProxyServer(config)
    for warning in startup_warnings(config):
        log.warning(warning)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        server.shutdown_gracefully()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("claude-max-proxy %s listening on http://%s:%d/v1", __version__,
             config.host, server.port)
    try:
        server.serve_forever()
    finally:
        server.kill_children()
        server.server_close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    config = parse_config(argv)
    setup_logging(config.log_level)
    try:
        return serve(config)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
