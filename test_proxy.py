"""Tests for claude_max_proxy.

Run them with:

    python3 test_proxy.py            # or: python3 -m unittest test_proxy -v

Standard library only. The tests drive the real server over loopback HTTP. In
place of the Claude Code CLI they run a fake `claude` (a small Python script
written to a temporary directory) that replays the event shapes the real CLI
2.1.197 printed, recorded below; it records the argv, stdin and environment it
got, so the tests can check what the proxy really passed. The end-to-end class
runs the real `claude` against a local fake of the Anthropic Messages API; it
is skipped when `claude` is not installed, except in CI (CI=true).
"""

from __future__ import annotations

import copy
import http.client
import io
import json
import logging
import os
import platform
import plistlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

import claude_max_proxy as proxy

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Real output of Claude Code 2.1.197 (one JSON event per line), recorded against a local
# fake of the Anthropic API. The fake CLI below replays these shapes; the unit tests feed them
# to the translator as they are.
RECORDED = {
    'not-logged-in': r'''{"type":"system","subtype":"init","cwd":"/private/tmp/claude-proxy-x1y2","session_id":"eafa6b10-7849-442d-beb9-9b5e3342d723","tools":[],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"none","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"b9753bec-3e98-48a3-924b-5654a7130a3f","memory_paths":{"auto":"/Users/me/.claude/projects/-private-tmp-claude-proxy-x1y2/memory/"},"fast_mode_state":"off"}
{"type":"assistant","message":{"id":"c59470cf-2b45-4cd8-8652-e483d2c51a97","container":null,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,"speed":null},"content":[{"type":"text","text":"Not logged in · Please run /login"}],"context_management":null},"parent_tool_use_id":null,"session_id":"eafa6b10-7849-442d-beb9-9b5e3342d723","uuid":"a928a365-1e1b-4cea-bc3e-d9c1bb9c9350","error":"authentication_failed"}
{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"duration_ms":142,"duration_api_ms":0,"num_turns":1,"result":"Not logged in · Please run /login","stop_reason":"stop_sequence","session_id":"eafa6b10-7849-442d-beb9-9b5e3342d723","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"45d5670e-7cd0-4b8d-8ab3-48d6707209fe"}''',
    'rate-limited-429-retrying': r'''{"type":"system","subtype":"init","cwd":"/private/tmp/claude-proxy-x1y2","session_id":"d6c2adec-100e-4b1c-99e4-3bb3aa968c70","tools":[],"mcp_servers":[],"model":"claude-sonnet-5","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"f523dc08-6c77-4f2c-a33e-7c3dc899b156","memory_paths":{"auto":"/Users/me/.claude/projects/-private-tmp-claude-proxy-x1y2/memory/"},"fast_mode_state":"off"}
{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":1000,"error_status":429,"error":"rate_limit","session_id":"d6c2adec-100e-4b1c-99e4-3bb3aa968c70","uuid":"a0384471-24a0-41b4-be6a-510e5bcca6e1"}
{"type":"system","subtype":"api_retry","attempt":2,"max_retries":10,"retry_delay_ms":1248.351721624543,"error_status":429,"error":"rate_limit","session_id":"d6c2adec-100e-4b1c-99e4-3bb3aa968c70","uuid":"7626c972-90a6-4923-8afd-92333f077f96"}
{"type":"system","subtype":"api_retry","attempt":3,"max_retries":10,"retry_delay_ms":2357.2234127234397,"error_status":429,"error":"rate_limit","session_id":"d6c2adec-100e-4b1c-99e4-3bb3aa968c70","uuid":"da9835e1-ff98-4d95-a9ac-3208d9f40c78"}''',
    'stream-json-input-image': r'''{"type":"system","subtype":"init","cwd":"/private/tmp/claude-proxy-x1y2","session_id":"5cae85ab-c332-4c6c-a0e0-34d1e0ee80ae","tools":[],"mcp_servers":[],"model":"claude-sonnet-5","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"63ae1d0d-d5ac-4be4-bd1c-15f39a130bb3","memory_paths":{"auto":"/Users/me/.claude/projects/-private-tmp-claude-proxy-x1y2/memory/"},"fast_mode_state":"off"}
{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-5","content":[{"type":"text","text":"Hello from fake (claude-sonnet-5, 1 msgs) "}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"5cae85ab-c332-4c6c-a0e0-34d1e0ee80ae","uuid":"1345fa62-47c1-43ee-9d99-33909017b40f"}
{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":89,"duration_api_ms":33,"ttft_ms":81,"ttft_stream_ms":79,"time_to_request_ms":65,"num_turns":1,"result":"Hello from fake (claude-sonnet-5, 1 msgs) ","stop_reason":"end_turn","session_id":"5cae85ab-c332-4c6c-a0e0-34d1e0ee80ae","total_cost_usd":0.000135,"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":7,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-sonnet-5":{"inputTokens":10,"outputTokens":7,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.000135,"contextWindow":200000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"d58fa4e5-1cd0-4d42-9e15-a5409030b9b5"}''',
    'stream-no-partial-success': r'''{"type":"system","subtype":"init","cwd":"/private/tmp/claude-proxy-x1y2","session_id":"d9912de3-cf70-4d85-84f6-15f3a807865a","tools":[],"mcp_servers":[],"model":"claude-sonnet-5","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"26095772-33d0-497b-baf9-4fcd64092c9c","memory_paths":{"auto":"/Users/me/.claude/projects/-private-tmp-claude-proxy-x1y2/memory/"},"fast_mode_state":"off"}
{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-5","content":[{"type":"text","text":"Hello from fake (claude-sonnet-5, 1 msgs) "}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"d9912de3-cf70-4d85-84f6-15f3a807865a","uuid":"922e2aee-b39f-4023-9921-46b7c6f2b864"}
{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":178,"duration_api_ms":33,"ttft_ms":171,"ttft_stream_ms":169,"time_to_request_ms":152,"num_turns":1,"result":"Hello from fake (claude-sonnet-5, 1 msgs) ","stop_reason":"end_turn","session_id":"d9912de3-cf70-4d85-84f6-15f3a807865a","total_cost_usd":0.000135,"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":7,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-sonnet-5":{"inputTokens":10,"outputTokens":7,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.000135,"contextWindow":200000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"e038e563-0a35-428b-953b-566a49c336f5"}''',
    'stream-partial-success': r'''{"type":"system","subtype":"init","cwd":"/private/tmp/claude-proxy-x1y2","session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","tools":[],"mcp_servers":[],"model":"claude-sonnet-5","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"a770f59a-4b7b-4832-9867-74487419ecf4","memory_paths":{"auto":"/Users/me/.claude/projects/-private-tmp-claude-proxy-x1y2/memory/"},"fast_mode_state":"off"}
{"type":"system","subtype":"status","status":"requesting","uuid":"d3aba5b9-53cb-4e36-955f-803527ec1f5f","session_id":"cdab484a-f603-4e28-b071-e559ecb1585f"}
{"type":"stream_event","event":{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1}}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"adc5feb6-ea80-405b-bc80-d0cd320e987a","ttft_ms":18}
{"type":"stream_event","event":{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"494f3efb-e755-4fcd-a994-d6e44abadff8"}
{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello "}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"a4622649-a5fd-4add-ac2d-289bf527dc40"}
{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"from "}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"1c68bd43-eedc-4444-9eed-02a1dda90395"}
{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"fake "}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"e549ea69-9a46-4754-b4f5-2fa52a5df389"}
{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"(claude-sonnet-5, "}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"881a44af-62df-4b8a-a215-27467a23ef93"}
{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"1 "}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"d87aef4b-305c-48b8-8a77-67cb12670c7e"}
{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"msgs) "}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"eb2b442a-0e9b-4526-8a5c-f7d94fd62b4f"}
{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-5","content":[{"type":"text","text":"Hello from fake (claude-sonnet-5, 1 msgs) "}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","uuid":"687cc207-f26f-49db-9e67-bad688c4ac52"}
{"type":"stream_event","event":{"type":"content_block_stop","index":0},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"e77032c0-56f0-41fe-89c9-1e4d06471a7f"}
{"type":"stream_event","event":{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":7}},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"77372984-2ffc-4ae2-81a1-baf8042c009f"}
{"type":"stream_event","event":{"type":"message_stop"},"session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","parent_tool_use_id":null,"uuid":"d3e31a22-4c16-4787-a874-61fd4a9f9b97"}
{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":181,"duration_api_ms":34,"ttft_ms":169,"ttft_stream_ms":166,"time_to_request_ms":149,"num_turns":1,"result":"Hello from fake (claude-sonnet-5, 1 msgs) ","stop_reason":"end_turn","session_id":"cdab484a-f603-4e28-b071-e559ecb1585f","total_cost_usd":0.000135,"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":7,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-sonnet-5":{"inputTokens":10,"outputTokens":7,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.000135,"contextWindow":200000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"64d095af-e66d-4546-9006-051dc8c10d1c"}''',
    'upstream-400': r'''{"type":"system","subtype":"init","cwd":"/private/tmp/claude-proxy-x1y2","session_id":"f03a7136-c942-4efd-bb98-697a36f45e9b","tools":[],"mcp_servers":[],"model":"claude-sonnet-5","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"5f9d7203-e1a5-4538-97b4-597a546a8eb7","memory_paths":{"auto":"/Users/me/.claude/projects/-private-tmp-claude-proxy-x1y2/memory/"},"fast_mode_state":"off"}
{"type":"assistant","message":{"id":"83e18d7e-8984-4afe-be36-e3946be59a40","container":null,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,"speed":null},"content":[{"type":"text","text":"API Error: 400 fake status 400"}],"context_management":null},"parent_tool_use_id":null,"session_id":"f03a7136-c942-4efd-bb98-697a36f45e9b","uuid":"3395a9de-44e1-40d7-84e8-9010b8dcf3cf","error":"unknown"}
{"type":"result","subtype":"success","is_error":true,"api_error_status":400,"duration_ms":193,"duration_api_ms":0,"num_turns":1,"result":"API Error: 400 fake status 400","stop_reason":"stop_sequence","session_id":"f03a7136-c942-4efd-bb98-697a36f45e9b","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"665e09ce-5aee-4f4f-8d38-272fb41a6cf5"}''',
    'upstream-401-retrying': r'''{"type":"system","subtype":"init","cwd":"/private/tmp/claude-proxy-x1y2","session_id":"2f3de8ce-8f58-46b4-a81c-43e1fd0926f1","tools":[],"mcp_servers":[],"model":"claude-sonnet-5","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"96ab17c1-4dda-48fa-aa0c-4b91d1a9e73f","memory_paths":{"auto":"/Users/me/.claude/projects/-private-tmp-claude-proxy-x1y2/memory/"},"fast_mode_state":"off"}
{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":1000,"error_status":401,"error":"authentication_failed","session_id":"2f3de8ce-8f58-46b4-a81c-43e1fd0926f1","uuid":"7340d536-db4e-4a8a-b870-21a0c779d923"}
{"type":"system","subtype":"api_retry","attempt":2,"max_retries":10,"retry_delay_ms":1017.5974494257207,"error_status":401,"error":"authentication_failed","session_id":"2f3de8ce-8f58-46b4-a81c-43e1fd0926f1","uuid":"d43d114b-2ba6-40d3-9cf2-6426a17b8ccd"}''',
}


def recorded_events(name: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in RECORDED[name].splitlines() if line.strip()]


# The fake `claude`. It reads its stdin message first (as the real CLI does with
# --input-format stream-json), then acts on the last [[fake:NAME]] in the
# prompt: NAME is a built-in behaviour below or a script file NAME.json that a
# test wrote into $FAKE_CLAUDE_SCRIPTS. Every event it prints is a recorded
# event with only its text, model, stop reason or usage changed.
FAKE_CLAUDE = r'''
import copy, json, os, re, subprocess, sys, time

ARGV = sys.argv[1:]
HERE = os.path.dirname(os.path.abspath(__file__))
if "--version" in ARGV:
    print("2.1.197 (Claude Code)")
    sys.exit(0)

with open(os.path.join(HERE, "recorded.json")) as f:
    RECORDED = {name: [json.loads(line) for line in text.splitlines() if line.strip()]
                for name, text in json.load(f).items()}
ALIASES = {"opus": "claude-opus-4-8", "sonnet": "claude-sonnet-5",
           "haiku": "claude-haiku-4-5-20251001", "fable": "claude-fable-5"}
BUILTIN = {
    "ok": {},
    "slow": {"delay": 0.25, "grandchild": True,
             "text": ["one ", "two ", "three ", "four ", "five ", "six ", "seven ", "eight"]},
    "hang": {"hang_before": True, "grandchild": True},
    "crash": {"text": [], "crash": 3, "stderr": "fake crash: boom"},
    "crash-midstream": {"text": ["partial ", "answer "], "crash": 3, "stderr": "fake crash: midway"},
    "garbage": {"garbage": True},
}


def flag(name):
    if name not in ARGV:
        return None
    i = ARGV.index(name)
    return ARGV[i + 1] if i + 1 < len(ARGV) else ""


record = {"pid": os.getpid(), "argv": ARGV, "cwd": os.getcwd(), "env": dict(os.environ),
          "spawned": time.time()}


def save(**fields):
    record.update(fields)
    path = os.path.join(os.environ["FAKE_CLAUDE_LOG"], "%d.json" % os.getpid())
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def emit(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def texts(message):
    content = message["message"]["content"]
    if isinstance(content, str):
        return [content]
    return [block.get("text", "") for block in content if block.get("type") == "text"]


save()
raw = sys.stdin.read()  # the proxy writes one message line and closes stdin
messages = [json.loads(line) for line in raw.splitlines() if line.strip()]
prompt = "".join(t for m in messages for t in texts(m))
names = re.findall(r"\[\[fake:([\w.-]+)\]\]", prompt)
mode = names[-1] if names else "ok"
save(stdin=raw, messages=messages, mode=mode, received=time.time())
model = ALIASES.get(flag("--model"), flag("--model"))
session = "5e55f00d-0000-4000-8000-%012d" % os.getpid()


def stamp(event):
    event = copy.deepcopy(event)
    if "session_id" in event:
        event["session_id"] = session
    return event


def retry_forever(name, status=None):
    events = RECORDED[name]
    for event in events:
        emit(stamp(event))
    retry = stamp(events[-1])
    if status:
        retry.update(error_status=status, error="unknown")
    while True:
        time.sleep(0.2)
        retry["attempt"] = min(retry["attempt"] + 1, retry["max_retries"])
        emit(retry)


if mode in ("not-logged-in", "upstream-400"):
    for event in RECORDED[mode]:
        emit(stamp(event))
    sys.exit(1)
if mode in ("rate-limited-429-retrying", "upstream-401-retrying"):
    retry_forever(mode)
if mode == "overloaded-529-retrying":
    retry_forever("rate-limited-429-retrying", status=529)

spec = dict(BUILTIN.get(mode, {}))
script = os.path.join(os.environ.get("FAKE_CLAUDE_SCRIPTS", HERE), mode + ".json")
if mode not in BUILTIN and os.path.exists(script):
    with open(script) as f:
        spec = json.load(f)
partial = "--include-partial-messages" in ARGV
t = {e["event"]["type"] if e["type"] == "stream_event" else e.get("subtype", e["type"]) if e["type"] == "system" else e["type"]: e
     for e in RECORDED["stream-partial-success"]}
text = spec.get("text")
if text is None:
    text = ["Hello ", "from ", "fake ", "(%s, " % model, "%d " % len(messages), "msgs) "]
stop_reason = spec.get("stop_reason", "end_turn")

if spec.get("grandchild"):
    child = subprocess.Popen(["sleep", "300"])
    save(grandchild=child.pid)
init = stamp(t["init"])
init["model"] = model
init["cwd"] = os.getcwd()
emit(init)
if spec.get("garbage"):
    sys.stdout.write("not json at all\n[1, 2]\n\n")
if spec.get("hang_before"):
    time.sleep(3600)
emit(stamp(t["status"]))
if partial:
    start = stamp(t["message_start"])
    start["event"]["message"]["model"] = model
    emit(start)
    emit(stamp(t["content_block_start"]))
for piece in text:
    if spec.get("delay"):
        time.sleep(spec["delay"])
    if partial:
        delta = stamp(t["content_block_delta"])
        delta["event"]["delta"]["text"] = piece
        emit(delta)
    if spec.get("garbage"):
        sys.stdout.write("  \n")
if spec.get("crash") is not None:
    sys.stderr.write(spec.get("stderr", ""))
    sys.exit(spec["crash"])
assistant = stamp(t["assistant"])
assistant["message"]["model"] = model
assistant["message"]["content"] = [{"type": "text", "text": "".join(text)}]
emit(assistant)
usage = dict(t["result"]["usage"], **spec.get("usage", {}))
if partial:
    emit(stamp(t["content_block_stop"]))
    message_delta = stamp(t["message_delta"])
    message_delta["event"]["delta"]["stop_reason"] = stop_reason
    message_delta["event"]["usage"]["output_tokens"] = usage["output_tokens"]
    emit(message_delta)
    emit(stamp(t["message_stop"]))
result = stamp(t["result"])
result.update(result="".join(text), stop_reason=stop_reason, usage=usage)
emit(result)
save(finished=time.time())
'''


class FakeClaude:
    """The fake CLI on disk, its scripts, and what each run of it recorded."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fake-claude-")
        self.path = os.path.join(self.dir, "claude")
        self.log_dir = os.path.join(self.dir, "runs")
        self.scripts_dir = os.path.join(self.dir, "scripts")
        os.mkdir(self.log_dir)
        os.mkdir(self.scripts_dir)
        with open(self.path, "w") as f:
            f.write("#!%s\n%s" % (sys.executable, FAKE_CLAUDE))
        os.chmod(self.path, 0o755)
        with open(os.path.join(self.dir, "recorded.json"), "w") as f:
            json.dump(RECORDED, f)

    def env(self) -> Dict[str, str]:
        return {"FAKE_CLAUDE_LOG": self.log_dir, "FAKE_CLAUDE_SCRIPTS": self.scripts_dir}

    def script(self, name: str, **spec: Any) -> str:
        """Write a behaviour the fake takes for prompts holding [[fake:NAME]]."""
        with open(os.path.join(self.scripts_dir, name + ".json"), "w") as f:
            json.dump(spec, f)
        return "[[fake:%s]]" % name

    def runs(self) -> List[Dict[str, Any]]:
        found = []
        for name in os.listdir(self.log_dir):
            if name.endswith(".json"):
                with open(os.path.join(self.log_dir, name)) as f:
                    found.append(json.load(f))
        return found

    def run_for(self, marker: str, timeout: float = 10.0, field: str = "stdin") -> Dict[str, Any]:
        """The run whose stdin held `marker`, once it has recorded `field`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in self.runs():
                if marker in run.get("stdin", "") and field in run:
                    return run
            time.sleep(0.02)
        raise AssertionError("no fake claude run received %r" % marker)

    def clear(self) -> None:
        for name in os.listdir(self.log_dir):
            os.unlink(os.path.join(self.log_dir, name))


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once no process (not even a zombie) has this pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if is_zombie_of_other(pid):
            return True
        time.sleep(0.02)
    return False


def is_zombie_of_other(pid: int) -> bool:
    """A zombie that is not our child is init's to reap; for us it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] == "Z" and int(fields[1]) != os.getpid()


FAKE: FakeClaude


def setUpModule() -> None:
    global FAKE
    FAKE = FakeClaude()
    os.environ.update(FAKE.env())
    # A key in the proxy's environment must never reach the child (unless allowed).
    os.environ["ANTHROPIC_API_KEY"] = "sk-ant-test-must-not-leak"
    os.environ["ANTHROPIC_AUTH_TOKEN"] = "token-must-not-leak"
    logging.getLogger("claude_max_proxy").setLevel(logging.CRITICAL)


def tearDownModule() -> None:
    shutil.rmtree(FAKE.dir, ignore_errors=True)


class RunningServer:
    """A ProxyServer on a free loopback port, serving in a background thread."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        settings.setdefault("claude_bin", FAKE.path)
        settings.setdefault("pool_size", 0)  # each request its own new process, unless a test asks
        self.server = proxy.ProxyServer(proxy.Config(**settings))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        self.server.shutdown_gracefully()
        self.thread.join(10)
        self.server.server_close()


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def frames(self) -> List[str]:
        """The data: payloads of an SSE body, in order."""
        return [line[len("data: "):] for line in self.body.decode("utf-8").split("\n")
                if line.startswith("data: ")]

    def chunks(self) -> List[Dict[str, Any]]:
        frames = self.frames()
        return [json.loads(f) for f in frames if f != "[DONE]"]


class ProxyTest(unittest.TestCase):
    """Base: one server per class, settings in `settings`, and HTTP helpers."""

    settings: Dict[str, Any] = {"retry_budget": 0.6, "idle_timeout": 2.0, "timeout": 30.0}

    @classmethod
    def setUpClass(cls) -> None:
        cls.running = RunningServer(**cls.settings)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.running.stop()

    def setUp(self) -> None:
        self.config = self.running.server.config
        self.saved_config = dict(vars(self.config))

    def tearDown(self) -> None:
        vars(self.config).update(self.saved_config)

    def connect(self, timeout: float = 20.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None,
                headers: Optional[Dict[str, str]] = None,
                conn: Optional[http.client.HTTPConnection] = None) -> Response:
        own = conn is None
        conn = conn or self.connect()
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            all_headers = {"Content-Type": "application/json"}
            all_headers.update(headers or {})
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            if own:
                conn.close()

    def chat(self, *messages: Any, **fields: Any) -> Response:
        body = {"model": "claude-sonnet-4", "messages": list(messages)}
        body.update(fields)
        return self.request("POST", "/v1/chat/completions", body)

    def say(self, text: str, **fields: Any) -> Response:
        return self.chat({"role": "user", "content": text}, **fields)

    def assertError(self, response: Response, status: int, type_: str,
                    code: Optional[str] = None, param: Optional[str] = None) -> Dict[str, Any]:
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        error = response.json()["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual(error["type"], type_)
        self.assertTrue(error["message"])
        if code is not None:
            self.assertEqual(error["code"], code)
        if param is not None:
            self.assertEqual(error["param"], param)
        return error


def marker() -> str:
    """A unique word to find this test's fake run by its stdin."""
    return "m%s" % os.urandom(6).hex()


# ---------------------------------------------------------------------------
# Pure translation, no process
# ---------------------------------------------------------------------------

def config(**settings: Any) -> proxy.Config:
    return proxy.Config(**settings)


def user(text: str) -> Dict[str, Any]:
    return {"role": "user", "content": text}


class ModelTest(unittest.TestCase):
    def test_table_ids_aliases_and_prefixes_map_to_cli_aliases(self) -> None:
        for name, alias in [("claude-opus-4", "opus"), ("claude-sonnet-4", "sonnet"),
                            ("claude-haiku-4", "haiku"), ("opus", "opus"), ("HAIKU", "haiku"),
                            ("openai/claude-opus-4", "opus"), ("anthropic/claude-sonnet-4", "sonnet"),
                            ("fable", "fable")]:
            self.assertEqual(proxy.resolve_model(name, "claude-sonnet-4"), alias, name)

    def test_full_claude_ids_pass_through_unchanged(self) -> None:
        self.assertEqual(proxy.resolve_model("claude-sonnet-4-5-20250929", "x"),
                         "claude-sonnet-4-5-20250929")
        self.assertEqual(proxy.resolve_model("anthropic/claude-opus-4-1", "x"), "claude-opus-4-1")

    def test_empty_model_takes_the_default(self) -> None:
        self.assertEqual(proxy.resolve_model("", "claude-haiku-4"), "haiku")

    def test_unknown_model_is_a_400_naming_the_choices(self) -> None:
        with self.assertRaises(proxy.ProxyError) as caught:
            proxy.resolve_model("gpt-4o", "claude-sonnet-4")
        error = caught.exception
        self.assertEqual((error.status, error.code, error.param), (400, "model_not_found", "model"))
        self.assertIn("claude-opus-4", error.message)

    def test_models_listing_follows_the_table(self) -> None:
        self.assertEqual(proxy.find_model("claude-opus-4")["id"], "claude-opus-4")
        self.assertIsNone(proxy.find_model("opus"))


class RequestTranslationTest(unittest.TestCase):
    def parse(self, body: Any) -> proxy.ChatRequest:
        return proxy.parse_chat_request(body, config())

    def rejects(self, body: Any, param: Optional[str]) -> proxy.ProxyError:
        with self.assertRaises(proxy.ProxyError) as caught:
            self.parse(body)
        self.assertEqual(caught.exception.status, 400)
        self.assertEqual(caught.exception.param, param)
        return caught.exception

    def test_validation_names_the_bad_param(self) -> None:
        self.rejects([], None)
        self.rejects({"model": 5, "messages": [user("x")]}, "model")
        self.rejects({"messages": []}, "messages")
        self.rejects({"messages": "hi"}, "messages")
        self.rejects({"messages": [user("x"), "hi"]}, "messages[1]")
        self.rejects({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role")
        self.rejects({"messages": [{"role": "user", "content": 5}]}, "messages[0].content")
        self.rejects({"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
                     "messages[0].content[0].type")
        self.rejects({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
                     "messages[0].content[0].text")
        self.rejects({"messages": [user("x")], "stream": "yes"}, "stream")
        self.rejects({"messages": [{"role": "system", "content": "only rules"}]}, "messages")

    def test_n_above_one_is_refused_rather_than_answered_once(self) -> None:
        error = self.rejects({"messages": [user("x")], "n": 2}, "n")
        self.assertIn("n=1", error.message)

    def test_unknown_and_ignored_fields_are_accepted(self) -> None:
        request = self.parse({"messages": [user("hi")], "temperature": 0.2, "seed": 1,
                              "user": "u-1", "some_future_field": {"x": 1}})
        self.assertEqual(request.content, [{"type": "text", "text": "hi"}])

    def test_system_and_developer_messages_join_in_order(self) -> None:
        request = self.parse({"messages": [{"role": "system", "content": "Be terse."}, user("hi"),
                                           {"role": "developer", "content": [
                                               {"type": "text", "text": "Use "},
                                               {"type": "text", "text": "French."}]}]})
        self.assertEqual(request.system_prompt, "Be terse.\n\nUse French.")

    def test_no_system_message_gives_the_neutral_prompt(self) -> None:
        self.assertEqual(self.parse({"messages": [user("hi")]}).system_prompt,
                         proxy.DEFAULT_SYSTEM_PROMPT)

    def test_history_becomes_a_transcript_with_the_last_user_message_last(self) -> None:
        request = self.parse({"messages": [
            {"role": "system", "content": "SYSTEM-RULES"}, user("first question"),
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "second "},
                                         {"type": "text", "text": "question"}]}]})
        self.assertEqual(len(request.content), 1)
        text = request.content[0]["text"]
        self.assertIn("<user>\nfirst question\n</user>", text)
        self.assertIn("<assistant>\nfirst answer\n</assistant>", text)
        self.assertTrue(text.endswith("</conversation>\n\nsecond question"), text)
        self.assertLess(text.index("first question"), text.index("first answer"))
        self.assertNotIn("SYSTEM-RULES", text)

    def test_argv_turns_tools_off_and_keeps_the_prompt_out(self) -> None:
        request = self.parse({"model": "claude-opus-4", "messages": [
            {"role": "system", "content": "Rules"}, user("secret prompt text")]})
        argv = proxy.cli_argv("/bin/claude", request)
        self.assertEqual(argv[:2], ["/bin/claude", "-p"])
        self.assertEqual(argv[argv.index("--tools") + 1], "")
        self.assertEqual(argv[argv.index("--model") + 1], "opus")
        self.assertEqual(argv[argv.index("--system-prompt") + 1], "Rules")
        self.assertEqual(argv[argv.index("--input-format") + 1], "stream-json")
        self.assertEqual(argv[argv.index("--setting-sources") + 1], "")
        self.assertIn("--no-session-persistence", argv)
        self.assertIn("--strict-mcp-config", argv)
        self.assertNotIn("--bare", argv)  # --bare ignores the subscription login
        self.assertFalse(any("secret prompt" in arg for arg in argv))
        message = json.loads(proxy.stdin_message(request))
        self.assertEqual(message["type"], "user")
        self.assertEqual(message["message"]["content"][0]["text"], "secret prompt text")

    def test_env_strips_api_keys_unless_allowed(self) -> None:
        base = {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_AUTH_TOKEN": "t", "HOME": "/h", "CLAUDECODE": "1"}
        env = proxy.cli_env(config(), base)
        self.assertNotIn("ANTHROPIC_API_KEY", env)
        self.assertNotIn("ANTHROPIC_AUTH_TOKEN", env)
        self.assertNotIn("CLAUDECODE", env)
        self.assertEqual(env["HOME"], "/h")
        self.assertEqual(env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1")
        self.assertEqual(proxy.cli_env(config(allow_api_key=True), base)["ANTHROPIC_API_KEY"], "k")


class ResponseTranslationTest(unittest.TestCase):
    def feed_all(self, name: str, reply: Optional[proxy.Reply] = None) -> Tuple[proxy.Reply, str]:
        reply = reply or proxy.Reply(retry_budget=20)
        text = ""
        for event in recorded_events(name):
            text += "".join(piece for kind, piece in reply.feed(event, now=100.0) if kind == "content")
        return reply, text

    def test_streamed_deltas_give_the_text_once(self) -> None:
        reply, text = self.feed_all("stream-partial-success")
        self.assertEqual(text, "Hello from fake (claude-sonnet-5, 1 msgs) ")
        self.assertTrue(reply.done)
        self.assertEqual(reply.stop_reason, "end_turn")
        self.assertEqual(proxy.usage_from_cli(reply.usage)["completion_tokens"], 7)

    def test_without_partial_messages_the_assistant_text_is_used(self) -> None:
        reply, text = self.feed_all("stream-no-partial-success")
        self.assertEqual(text, "Hello from fake (claude-sonnet-5, 1 msgs) ")
        self.assertTrue(reply.done)

    def test_not_logged_in_is_a_401_even_though_subtype_says_success(self) -> None:
        with self.assertRaises(proxy.ProxyError) as caught:
            self.feed_all("not-logged-in")
        self.assertEqual(caught.exception.status, 401)
        self.assertIn("log in", caught.exception.message)

    def test_upstream_400_is_a_400_not_an_answer(self) -> None:
        with self.assertRaises(proxy.ProxyError) as caught:
            self.feed_all("upstream-400")
        self.assertEqual(caught.exception.status, 400)
        self.assertIn("fake status 400", caught.exception.message)

    def test_rate_limit_retries_set_a_deadline_within_the_budget(self) -> None:
        reply, _ = self.feed_all("rate-limited-429-retrying", proxy.Reply(retry_budget=20))
        when, error = reply.retry_deadline()
        self.assertEqual(when, 120.0)
        self.assertEqual(error.status, 429)
        self.assertIn("Retry-After", error.headers)

    def test_authentication_retries_fail_at_once(self) -> None:
        with self.assertRaises(proxy.ProxyError) as caught:
            self.feed_all("upstream-401-retrying")
        self.assertEqual(caught.exception.status, 401)

    def test_output_limit_after_text_is_finish_length_not_an_error(self) -> None:
        # After three automatic continuations the CLI gives up with a synthetic
        # assistant line (error max_output_tokens) and an is_error result.
        events = recorded_events("not-logged-in")
        events[1]["error"] = "max_output_tokens"
        events[2]["result"] = "API Error: Claude's response exceeded the 64000 output token maximum."
        delta = recorded_events("stream-partial-success")[4]
        reply = proxy.Reply(retry_budget=20)
        pieces = [reply.feed(e) for e in [events[0], delta, events[1], events[2]]]
        self.assertEqual(pieces[1], [("content", "Hello ")])
        self.assertEqual(pieces[3], [])
        self.assertTrue(reply.done)
        self.assertEqual(proxy.finish_reason(reply.stop_reason), "length")

    def test_usage_counts_cache_reads_and_writes_as_prompt(self) -> None:
        usage = proxy.usage_from_cli({"input_tokens": 3, "cache_read_input_tokens": 100,
                                      "cache_creation_input_tokens": 20, "output_tokens": 9})
        self.assertEqual(usage, {"prompt_tokens": 123, "completion_tokens": 9, "total_tokens": 132,
                                 "prompt_tokens_details": {"cached_tokens": 100}})

    def test_finish_reasons(self) -> None:
        self.assertEqual(proxy.finish_reason("end_turn"), "stop")
        self.assertEqual(proxy.finish_reason("stop_sequence"), "stop")
        self.assertEqual(proxy.finish_reason("max_tokens"), "length")
        self.assertEqual(proxy.finish_reason(None), "stop")

    def test_upstream_statuses_map_to_openai_errors(self) -> None:
        self.assertEqual(proxy.upstream_error(529, "x").status, 503)
        self.assertEqual(proxy.upstream_error(500, "x").type, "server_error")
        self.assertEqual(proxy.upstream_error(403, "x").type, "permission_error")
        self.assertEqual(proxy.upstream_error(None, "x").status, 502)


# ---------------------------------------------------------------------------
# Over HTTP, against the fake CLI
# ---------------------------------------------------------------------------

class RoutesTest(ProxyTest):
    def test_health_reports_the_cli_and_its_version(self) -> None:
        response = self.request("GET", "/health")
        self.assertEqual(response.status, 200)
        health = response.json()
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["claude"], {"found": True, "path": FAKE.path,
                                            "version": "2.1.197 (Claude Code)"})
        self.assertEqual(health["version"], proxy.__version__)

    def test_models_list_and_one_model(self) -> None:
        listing = self.request("GET", "/v1/models").json()
        self.assertEqual(listing["object"], "list")
        self.assertEqual([m["id"] for m in listing["data"]], [m for m, _ in proxy.MODELS])
        for model in listing["data"]:
            self.assertEqual(set(model), {"id", "object", "created", "owned_by"})
            self.assertEqual(model["object"], "model")
        one = self.request("GET", "/v1/models/claude-opus-4")
        self.assertEqual(one.status, 200)
        self.assertEqual(one.json()["id"], "claude-opus-4")
        self.assertError(self.request("GET", "/v1/models/gpt-5"), 404, "not_found_error",
                         "model_not_found")

    def test_unknown_path_is_404_and_wrong_method_405(self) -> None:
        self.assertError(self.request("GET", "/v1/nothing-here"), 404, "not_found_error")
        response = self.request("GET", "/v1/chat/completions")
        self.assertError(response, 405, "invalid_request_error", "method_not_allowed")
        self.assertEqual(response.headers["Allow"], "POST")
        self.assertError(self.request("DELETE", "/v1/models"), 405, "invalid_request_error")

    def test_options_without_cors_is_not_allowed(self) -> None:
        response = self.request("OPTIONS", "/v1/chat/completions")
        self.assertEqual(response.status, 405)
        self.assertIsNone(response.headers["Access-Control-Allow-Origin"])

    def test_cors_preflight_and_headers_when_enabled(self) -> None:
        self.config.cors = "http://localhost:8080"
        self.config.api_key = "k"
        preflight = self.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        self.assertEqual(preflight.status, 204)
        self.assertEqual(preflight.headers["Access-Control-Allow-Origin"], "http://localhost:8080")
        self.assertIn("POST", preflight.headers["Access-Control-Allow-Methods"])
        self.assertIn("authorization", preflight.headers["Access-Control-Allow-Headers"])
        models = self.request("GET", "/v1/models", headers={"Authorization": "Bearer k"})
        self.assertEqual(models.headers["Access-Control-Allow-Origin"], "http://localhost:8080")

    def test_api_key_is_required_on_v1_when_set(self) -> None:
        self.config.api_key = "s3cret"
        self.assertError(self.request("GET", "/v1/models"), 401, "authentication_error",
                         "invalid_api_key")
        self.assertError(self.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"}),
                         401, "authentication_error")
        self.assertError(self.say("hi"), 401, "authentication_error")
        ok = self.request("GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(ok.status, 200)
        self.assertEqual(self.request("GET", "/health").status, 200)

    def test_bad_bodies_get_400s_with_param(self) -> None:
        error = self.assertError(self.request("POST", "/v1/chat/completions", b"{not json"), 400,
                                 "invalid_request_error", "invalid_json")
        self.assertIn("JSON", error["message"])
        self.assertError(self.request("POST", "/v1/chat/completions", [1, 2]), 400,
                         "invalid_request_error")
        self.assertError(self.request("POST", "/v1/chat/completions", {"model": "claude-opus-4"}),
                         400, "invalid_request_error", param="messages")
        self.assertError(self.say("hi", model="gpt-4o"), 400, "invalid_request_error",
                         "model_not_found", "model")
        self.assertError(self.request("POST", "/v1/chat/completions", b"\xff\xfe"), 400,
                         "invalid_request_error", "invalid_json")

    def test_body_over_the_limit_is_413(self) -> None:
        self.config.max_body = 1000
        self.assertError(self.say("x" * 2000), 413, "invalid_request_error", "request_too_large")
        self.assertEqual(self.say("small").status, 200)

    def test_chunked_request_bodies_are_read(self) -> None:
        conn = self.connect()
        body = json.dumps({"model": "claude-haiku-4", "messages": [user("chunked")]}).encode()
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), 10):
            piece = body[i:i + 10]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        self.assertEqual(response.status, 200, response.read())
        conn.close()

    def test_keep_alive_serves_several_requests_on_one_connection(self) -> None:
        conn = self.connect()
        try:
            for _ in range(3):
                response = self.request("POST", "/v1/chat/completions",
                                        {"messages": [user("again")]}, conn=conn)
                self.assertEqual(response.status, 200)
            self.assertEqual(self.request("GET", "/v1/models", conn=conn).status, 200)
        finally:
            conn.close()


class CompletionTest(ProxyTest):
    def test_non_stream_answer_has_the_exact_openai_shape(self) -> None:
        response = self.say("hello " + marker(), model="claude-opus-4")
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        body = response.json()
        self.assertRegex(body["id"], r"^chatcmpl-[0-9a-f]{24}$")
        self.assertEqual(body["object"], "chat.completion")
        self.assertIsInstance(body["created"], int)
        self.assertLessEqual(abs(body["created"] - time.time()), 60)
        self.assertEqual(body["model"], "claude-opus-4")
        self.assertEqual(len(body["choices"]), 1)
        choice = body["choices"][0]
        self.assertEqual(choice["index"], 0)
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "Hello from fake (claude-opus-4-8, 1 msgs) ")
        self.assertEqual(body["usage"], {"prompt_tokens": 10, "completion_tokens": 7,
                                         "total_tokens": 17,
                                         "prompt_tokens_details": {"cached_tokens": 0}})

    def test_what_the_cli_receives(self) -> None:
        tag = marker()
        response = self.chat({"role": "system", "content": "You are terse."},
                             user("what is 2+2? " + tag), model="openai/claude-opus-4")
        self.assertEqual(response.status, 200)
        run = FAKE.run_for(tag)
        argv = run["argv"]
        self.assertEqual(argv[argv.index("--model") + 1], "opus")
        self.assertEqual(argv[argv.index("--system-prompt") + 1], "You are terse.")
        self.assertEqual(argv[argv.index("--tools") + 1], "")
        self.assertEqual(argv[argv.index("--output-format") + 1], "stream-json")
        self.assertFalse(any(tag in arg for arg in argv), "the prompt must not be in argv")
        self.assertEqual(run["messages"][0]["message"]["content"],
                         [{"type": "text", "text": "what is 2+2? " + tag}])
        self.assertNotIn("ANTHROPIC_API_KEY", run["env"])
        self.assertNotIn("ANTHROPIC_AUTH_TOKEN", run["env"])
        self.assertEqual(run["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1")
        self.assertTrue(os.path.basename(run["cwd"]).startswith("claude-proxy-"))
        self.assertNotEqual(os.path.realpath(run["cwd"]), os.path.realpath(os.getcwd()))
        self.assertTrue(wait_until(lambda: not os.path.exists(run["cwd"])),
                        "the throwaway directory must be removed")
        self.assertTrue(pid_gone(run["pid"]))

    def test_allow_api_key_passes_the_key(self) -> None:
        self.config.allow_api_key = True
        tag = marker()
        self.assertEqual(self.say(tag).status, 200)
        self.assertEqual(FAKE.run_for(tag)["env"]["ANTHROPIC_API_KEY"], "sk-ant-test-must-not-leak")

    def test_long_conversations_go_through_stdin(self) -> None:
        tag = marker()
        history = []
        for i in range(300):
            history += [user("question %d %s" % (i, "x" * 1000)),
                        {"role": "assistant", "content": "answer %d" % i}]
        response = self.chat(*history, user("final " + tag))
        self.assertEqual(response.status, 200, response.body)
        run = FAKE.run_for(tag)
        self.assertGreater(len(run["stdin"]), 300000)
        self.assertTrue(run["messages"][0]["message"]["content"][0]["text"].endswith("final " + tag))

    def test_usage_counts_cached_prompt_tokens(self) -> None:
        cue = FAKE.script("cached", usage={"input_tokens": 5, "cache_read_input_tokens": 1000,
                                           "cache_creation_input_tokens": 50, "output_tokens": 12})
        usage = self.say(cue).json()["usage"]
        self.assertEqual(usage, {"prompt_tokens": 1055, "completion_tokens": 12,
                                 "total_tokens": 1067,
                                 "prompt_tokens_details": {"cached_tokens": 1000}})

    def test_max_tokens_stop_is_finish_reason_length(self) -> None:
        cue = FAKE.script("cut-off", text=["It was a dark "], stop_reason="max_tokens")
        self.assertEqual(self.say(cue).json()["choices"][0]["finish_reason"], "length")

    def test_non_json_lines_from_the_cli_are_ignored(self) -> None:
        response = self.say("[[fake:garbage]]")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.json()["choices"][0]["message"]["content"].startswith("Hello"))

    def test_empty_model_uses_the_default(self) -> None:
        self.config.default_model = "claude-haiku-4"
        tag = marker()
        response = self.say(tag, model="")
        self.assertEqual(response.json()["model"], "claude-haiku-4")
        argv = FAKE.run_for(tag)["argv"]
        self.assertEqual(argv[argv.index("--model") + 1], "haiku")


def wait_until(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


class StreamTest(ProxyTest):
    def stream(self, text: str, **fields: Any) -> Response:
        return self.say(text, stream=True, **fields)

    def test_stream_frames_follow_openai(self) -> None:
        response = self.stream("hi")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["Content-Type"].startswith("text/event-stream"))
        self.assertEqual(response.headers["Transfer-Encoding"], "chunked")
        frames = response.frames()
        self.assertEqual(frames[-1], "[DONE]")
        chunks = response.chunks()
        self.assertEqual(len({(c["id"], c["created"], c["model"]) for c in chunks}), 1)
        for chunk in chunks:
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertNotIn("usage", chunk)
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": "Hello "})
        deltas = [c["choices"][0]["delta"] for c in chunks]
        self.assertEqual([d for d in deltas[1:-1] if "role" in d], [])
        self.assertEqual("".join(d.get("content", "") for d in deltas),
                         "Hello from fake (claude-sonnet-5, 1 msgs) ")
        self.assertEqual(len(chunks), 7)  # one per CLI text delta, then the finish
        self.assertEqual(chunks[-1]["choices"][0], {"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": "stop"})
        self.assertTrue(all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]))

    def test_include_usage_adds_a_usage_chunk(self) -> None:
        chunks = self.stream("hi", stream_options={"include_usage": True}).chunks()
        for chunk in chunks[:-1]:
            self.assertIn("usage", chunk)
            self.assertIsNone(chunk["usage"])
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["total_tokens"], 17)
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")

    def test_frames_are_flushed_as_the_cli_prints_them(self) -> None:
        tag = marker()
        sock = open_stream(self.running.port, "[[fake:slow]] " + tag)
        try:
            self.assertNotIn("finished", FAKE.run_for(tag),
                             "the first frame came only after the CLI finished")
            received = b""
            while b"[DONE]" not in received:
                data = sock.recv(65536)
                self.assertTrue(data, "stream ended without [DONE]")
                received += data
            self.assertIn(b"eight", received)
        finally:
            sock.close()

    def test_empty_answer_still_streams_role_and_finish(self) -> None:
        cue = FAKE.script("empty", text=[])
        chunks = self.stream(cue).chunks()
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    def test_error_before_any_text_is_a_plain_http_error(self) -> None:
        self.assertError(self.stream("[[fake:not-logged-in]]"), 401, "authentication_error")

    def test_error_after_the_stream_started_is_an_error_frame_then_done(self) -> None:
        response = self.stream("[[fake:crash-midstream]]")
        self.assertEqual(response.status, 200)
        frames = response.frames()
        self.assertEqual(frames[-1], "[DONE]")
        error = json.loads(frames[-2])["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual(error["code"], "cli_failed")
        self.assertIn("midway", error["message"])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in response.chunks()
                       if "choices" in c)
        self.assertEqual(text, "partial answer ")


class CliFailureTest(ProxyTest):
    def test_not_logged_in_is_401_with_login_help(self) -> None:
        error = self.assertError(self.say("[[fake:not-logged-in]]"), 401, "authentication_error")
        self.assertIn("/login", error["message"])

    def test_upstream_400_is_400(self) -> None:
        error = self.assertError(self.say("[[fake:upstream-400]]"), 400, "invalid_request_error")
        self.assertIn("fake status 400", error["message"])

    def test_authentication_retries_fail_fast_and_kill_the_child(self) -> None:
        tag = marker()
        started = time.monotonic()
        self.assertError(self.say("[[fake:upstream-401-retrying]] " + tag), 401,
                         "authentication_error")
        self.assertLess(time.monotonic() - started, 5, "must not wait out the CLI's retries")
        self.assertTrue(pid_gone(FAKE.run_for(tag)["pid"]))

    def test_rate_limit_retries_beyond_the_budget_are_429_with_retry_after(self) -> None:
        tag = marker()
        response = self.say("[[fake:rate-limited-429-retrying]] " + tag)
        self.assertError(response, 429, "rate_limit_error", "rate_limit_exceeded")
        self.assertTrue(response.headers["Retry-After"].isdigit())
        self.assertTrue(pid_gone(FAKE.run_for(tag)["pid"]))

    def test_overload_retries_beyond_the_budget_are_503(self) -> None:
        response = self.say("[[fake:overloaded-529-retrying]]")
        self.assertError(response, 503, "server_error", "overloaded")
        self.assertIsNotNone(response.headers["Retry-After"])

    def test_exit_without_result_is_502_with_stderr(self) -> None:
        error = self.assertError(self.say("[[fake:crash]]"), 502, "server_error", "cli_failed")
        self.assertIn("fake crash: boom", error["message"])
        self.assertIn("code 3", error["message"])

    def test_silent_cli_hits_the_idle_timeout(self) -> None:
        self.config.idle_timeout = 0.5
        tag = marker()
        error = self.assertError(self.say("[[fake:hang]] " + tag), 504, "server_error", "idle_timeout")
        self.assertIn("--idle-timeout", error["message"])
        run = FAKE.run_for(tag, field="grandchild")
        self.assertTrue(pid_gone(run["pid"]))
        self.assertTrue(pid_gone(run["grandchild"]), "the child's own children must die too")

    def test_total_timeout_is_504(self) -> None:
        self.config.timeout = 0.6
        error = self.assertError(self.say("[[fake:slow]]"), 504, "server_error", "timeout")
        self.assertIn("--timeout", error["message"])

    def test_missing_cli_is_503_with_install_help_and_health_says_so(self) -> None:
        self.config.claude_bin = "/nonexistent/claude"
        error = self.assertError(self.say("hi"), 503, "server_error", "claude_not_found")
        self.assertIn("npm install -g @anthropic-ai/claude-code", error["message"])
        health = self.request("GET", "/health").json()
        self.assertEqual(health["status"], "degraded")
        self.assertFalse(health["claude"]["found"])


def open_stream(port: int, text: str) -> socket.socket:
    """Start a streaming request on a raw socket and return it once the first frame is in."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps({"messages": [user(text)], "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"data:" not in received:
        data = sock.recv(4096)
        if not data:
            raise AssertionError("stream closed early: %r" % received)
        received += data
    return sock


def post_chat(port: int, body: Dict[str, Any]) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        conn.close()


class ProcessLifecycleTest(ProxyTest):
    def test_client_disconnect_mid_stream_kills_the_child_at_once(self) -> None:
        tag = marker()
        sock = open_stream(self.running.port, "[[fake:slow]] " + tag)
        run = FAKE.run_for(tag, field="grandchild")
        sock.close()
        self.assertTrue(pid_gone(run["pid"], timeout=1.5), "child outlived its client")
        self.assertTrue(pid_gone(run["grandchild"], timeout=1.5))
        self.assertNotIn("finished", FAKE.run_for(tag))
        self.assertTrue(wait_until(lambda: self.running.server.active_children() == []))

    def test_client_disconnect_while_waiting_for_a_non_stream_answer_kills_the_child(self) -> None:
        tag = marker()
        sock = socket.create_connection(("127.0.0.1", self.running.port), timeout=10)
        body = json.dumps({"messages": [user("[[fake:hang]] " + tag)]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        run = FAKE.run_for(tag, field="grandchild")
        sock.close()
        self.assertTrue(pid_gone(run["pid"], timeout=1.5))
        self.assertTrue(pid_gone(run["grandchild"], timeout=1.5))

    def test_requests_beyond_max_concurrent_wait_then_get_429(self) -> None:
        running = RunningServer(max_concurrent=1, queue_timeout=0.3)
        try:
            tag = marker()
            holder = open_stream(running.port, "[[fake:slow]] " + tag)
            response = post_chat(running.port, {"messages": [user("second")]})
            self.assertError(response, 429, "rate_limit_error", "too_many_requests")
            self.assertEqual(response.headers["Retry-After"], "5")
            self.assertEqual(len(running.server.active_children()), 1)
            holder.close()
            self.assertTrue(pid_gone(FAKE.run_for(tag)["pid"]))
            running.server.config.queue_timeout = 5
            self.assertEqual(post_chat(running.port, {"messages": [user("third")]}).status, 200)
        finally:
            running.stop()

    def test_concurrent_requests_each_get_their_own_answer(self) -> None:
        results: Dict[int, Any] = {}

        def ask(i: int) -> None:
            cue = FAKE.script("answer-%d" % i, text=["answer ", "number ", str(i)])
            results[i] = self.say(cue, stream=(i % 2 == 0))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for i, response in results.items():
            self.assertEqual(response.status, 200)
            if i % 2 == 0:
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in response.chunks())
            else:
                text = response.json()["choices"][0]["message"]["content"]
            self.assertEqual(text, "answer number %d" % i)
        self.assertEqual(len(results), 8)

    def test_access_log_has_one_line_per_request_without_the_prompt(self) -> None:
        logger = logging.getLogger("claude_max_proxy")
        with self.assertLogs(logger, level="INFO") as logs:
            self.say("very private prompt words")
            self.request("GET", "/v1/models")
            # the line is written just after the response went out
            wait_until(lambda: sum("/v1/" in line for line in logs.output) == 2)
        chat = [line for line in logs.output if "/v1/chat/completions" in line]
        self.assertEqual(len(chat), 1)
        self.assertRegex(chat[0], r"req_[0-9a-f]+ POST /v1/chat/completions 200 model=claude-sonnet-4 "
                                  r"prompt_tokens=10 completion_tokens=7 \d+ms")
        self.assertFalse(any("private prompt" in line for line in logs.output))


class Daemon:
    """claude_max_proxy.py in a process of its own, as users run it; its log goes to a file."""

    def __init__(self, *flags: str) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="claude-proxy-log-")
        with os.fdopen(fd, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "claude_max_proxy.py"), "--port", "0"] + list(flags),
                stdin=subprocess.DEVNULL, stderr=log)
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path) as f:
                text = f.read()
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", text)
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.close()
        raise AssertionError("the proxy did not start listening: %s" % text)

    def health(self) -> Dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> int:
        """SIGTERM, as launchd or Ctrl-C sends it; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(10)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if os.path.exists(self.log_path):
            os.unlink(self.log_path)


class ShutdownTest(unittest.TestCase):
    def test_in_process_shutdown_kills_every_child(self) -> None:
        running = RunningServer()
        tag = marker()
        sock = open_stream(running.port, "[[fake:slow]] " + tag)
        run = FAKE.run_for(tag, field="grandchild")
        running.stop()
        self.assertFalse(running.thread.is_alive())
        self.assertTrue(pid_gone(run["pid"]))
        self.assertTrue(pid_gone(run["grandchild"]))
        sock.close()

    def test_sigterm_stops_the_daemon_with_exit_0_and_no_child_left(self) -> None:
        # fable: a model no other server here warms, so its pre-started processes are the daemon's
        daemon = Daemon("--claude-bin", FAKE.path, "--pool-size", "2", "--default-model", "claude-fable")
        try:
            tag = marker()
            sock = open_stream(daemon.port, "[[fake:slow]] " + tag)
            run = FAKE.run_for(tag, field="grandchild")
            warm = warm_for(proxy.DEFAULT_SYSTEM_PROMPT, "fable")
            self.assertEqual(daemon.stop(), 0)
            for pid in (run["pid"], run["grandchild"], warm["pid"]):
                self.assertTrue(pid_gone(pid))
            self.assertEqual(waiting_runs("fable"), [])
            sock.close()
        finally:
            daemon.close()


def system(text: str) -> Dict[str, Any]:
    return {"role": "system", "content": text}


def argv_value(run: Dict[str, Any], flag: str) -> str:
    return run["argv"][run["argv"].index(flag) + 1]


def running(pid: int) -> bool:
    """True while this pid is a fake claude that has not exited.

    A zombie's command line reads empty, and so does a gone pid's; a reused
    pid's names another program.
    """
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return FAKE.path.encode() in f.read()
    except OSError:
        return False


def waiting_runs(model: str) -> List[Dict[str, Any]]:
    """Fake claude processes for this --model that are alive and still wait for their message."""
    return [run for run in FAKE.runs()
            if "stdin" not in run and argv_value(run, "--model") == model and running(run["pid"])]


def warm_for(prompt: str, model: str = "sonnet", timeout: float = 10.0) -> Dict[str, Any]:
    """The waiting fake process started with this --system-prompt and --model, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in waiting_runs(model):
            if argv_value(run, "--system-prompt") == prompt:
                return run
        time.sleep(0.02)
    raise AssertionError("no pre-started process for %r" % prompt)


# A test's own server gets a default model the class server never uses, so the
# processes it starts are told apart from the class server's by their --model.
OWN_MODEL = "haiku"


def own_server(**settings: Any) -> RunningServer:
    return RunningServer(default_model="claude-haiku-4", **settings)


class WarmPoolTest(ProxyTest):
    """Processes started ahead of time; the fake records when each was started and when it was asked."""

    settings = dict(ProxyTest.settings, pool_size=2, pool_ttl=300.0)

    def pool(self, running_server: Optional[RunningServer] = None) -> Dict[str, int]:
        return (running_server or self.running).server.health()["pool"]

    def test_a_repeated_key_is_served_by_a_process_started_before_the_request(self) -> None:
        prompt = "You are pool test " + marker()
        self.assertEqual(self.chat(system(prompt), user("first")).status, 200)
        warm = warm_for(prompt)
        self.assertTrue(wait_until(lambda: self.running.server.active_children() == []),
                        "a waiting process must not count as a running request")
        before = self.pool()
        asked_at = time.time()
        tag = marker()
        response = self.chat(system(prompt), user("second " + tag))
        self.assertEqual(response.status, 200, response.body)
        self.assertIn("Hello from fake", response.json()["choices"][0]["message"]["content"])
        run = FAKE.run_for(tag, field="finished")
        self.assertEqual(run["pid"], warm["pid"])
        self.assertLess(run["spawned"], asked_at)
        self.assertGreaterEqual(run["received"], asked_at)
        self.assertEqual(self.pool()["hits"], before["hits"] + 1)
        self.assertEqual(self.pool()["misses"], before["misses"])
        self.assertTrue(run["cwd"].startswith(tempfile.gettempdir()))
        self.assertTrue(wait_until(lambda: not os.path.exists(run["cwd"])),
                        "a warm process's directory is thrown away like a cold one's")
        self.assertTrue(pid_gone(run["pid"]))
        self.assertNotEqual(warm_for(prompt)["pid"], run["pid"], "a replacement, never a reuse")

    def test_different_keys_do_not_share_processes(self) -> None:
        prompt = "You are pool test " + marker()
        self.chat(system(prompt), user("first"))
        warm = warm_for(prompt)
        other_prompt, other_model = marker(), marker()
        self.chat(system(other_prompt), user(other_prompt))
        self.assertTrue(running(warm["pid"]))
        self.assertNotIn("stdin", [run for run in FAKE.runs() if run["pid"] == warm["pid"]][0],
                         "another system prompt must not take this process")
        self.chat(system(prompt), user(other_model), model="claude-opus-4")
        for tag, wanted_prompt, wanted_model in ((other_prompt, other_prompt, "sonnet"),
                                                 (other_model, prompt, "opus")):
            run = FAKE.run_for(tag)
            self.assertNotEqual(run["pid"], warm["pid"])
            self.assertEqual(argv_value(run, "--system-prompt"), wanted_prompt)
            self.assertEqual(argv_value(run, "--model"), wanted_model)

    def test_a_warm_process_that_died_is_skipped_and_the_request_starts_cold(self) -> None:
        prompt = "You are pool test " + marker()
        self.chat(system(prompt), user("first"))
        warm = warm_for(prompt)
        os.kill(warm["pid"], signal.SIGKILL)
        self.assertTrue(wait_until(lambda: not running(warm["pid"])))
        before = self.pool()
        asked_at = time.time()
        tag = marker()
        response = self.chat(system(prompt), user(tag))
        self.assertEqual(response.status, 200, response.body)
        run = FAKE.run_for(tag)
        self.assertNotEqual(run["pid"], warm["pid"])
        self.assertGreaterEqual(run["spawned"], asked_at)
        self.assertEqual(self.pool()["misses"], before["misses"] + 1)
        self.assertTrue(pid_gone(warm["pid"]), "the dead process must be reaped, not left a zombie")

    def test_health_reports_the_pool(self) -> None:
        pool = self.request("GET", "/health").json()["pool"]
        self.assertEqual(set(pool), {"size", "max", "hits", "misses"})
        self.assertEqual(pool["max"], 2)
        self.assertLessEqual(pool["size"], 2)

    def test_the_default_model_and_prompt_are_warmed_at_start(self) -> None:
        running_server = own_server(pool_size=1)
        try:
            warm = warm_for(proxy.DEFAULT_SYSTEM_PROMPT, OWN_MODEL)
            tag = marker()
            self.assertEqual(post_chat(running_server.port, {"messages": [user(tag)]}).status, 200)
            self.assertEqual(FAKE.run_for(tag)["pid"], warm["pid"])
            self.assertEqual(self.pool(running_server)["hits"], 1)
        finally:
            running_server.stop()

    def test_the_pool_never_holds_more_than_its_size_and_evicts_the_least_recently_used(self) -> None:
        running_server = own_server(pool_size=2)
        try:
            prompts = ["You are pool test %d %s" % (i, marker()) for i in range(5)]
            for prompt in prompts:
                post_chat(running_server.port, {"messages": [system(prompt), user("hi")]})
                warm_for(prompt, OWN_MODEL)
                self.assertLessEqual(len(waiting_runs(OWN_MODEL)), 2)
                self.assertLessEqual(self.pool(running_server)["size"], 2)
            self.assertTrue(wait_until(lambda: len(waiting_runs(OWN_MODEL)) == 2))
            self.assertEqual(sorted(argv_value(run, "--system-prompt") for run in waiting_runs(OWN_MODEL)),
                             sorted(prompts[-2:]))
        finally:
            running_server.stop()

    def test_an_idle_warm_process_is_retired_after_the_ttl(self) -> None:
        running_server = own_server(pool_size=2, pool_ttl=0.5)
        try:
            prompt = "You are pool test " + marker()
            post_chat(running_server.port, {"messages": [system(prompt), user("hi")]})
            warm = warm_for(prompt, OWN_MODEL)
            self.assertTrue(pid_gone(warm["pid"]), "an idle process outlived --pool-ttl")
            self.assertTrue(wait_until(lambda: self.pool(running_server)["size"] == 0))
            time.sleep(1.0)  # two more TTLs: an unused key must not be warmed again
            self.assertEqual(waiting_runs(OWN_MODEL), [])
            self.assertEqual(len([run for run in FAKE.runs()
                                  if argv_value(run, "--system-prompt") == prompt]), 2,
                             "only the request's own process and the one replacement")
        finally:
            running_server.stop()

    def test_the_idle_timeout_counts_from_the_request_not_from_the_spawn(self) -> None:
        running_server = own_server(pool_size=1, idle_timeout=0.5)
        try:
            prompt = "You are pool test " + marker()
            post_chat(running_server.port, {"messages": [system(prompt), user("hi")]})
            warm = warm_for(prompt, OWN_MODEL)
            time.sleep(1.0)  # twice the idle timeout, spent waiting on stdin
            tag = marker()
            response = post_chat(running_server.port, {"messages": [system(prompt), user(tag)]})
            self.assertEqual(response.status, 200, response.body)
            self.assertEqual(FAKE.run_for(tag)["pid"], warm["pid"])
        finally:
            running_server.stop()

    def test_no_warm_process_outlives_the_server(self) -> None:
        running_server = own_server(pool_size=2)
        prompt = "You are pool test " + marker()
        post_chat(running_server.port, {"messages": [system(prompt), user("hi")]})
        warm_for(prompt, OWN_MODEL)
        warm_for(proxy.DEFAULT_SYSTEM_PROMPT, OWN_MODEL)
        pids = [run["pid"] for run in waiting_runs(OWN_MODEL)]
        self.assertEqual(len(pids), 2)
        running_server.stop()
        for pid in pids:
            self.assertTrue(pid_gone(pid))
        self.assertEqual(running_server.server.health()["pool"]["size"], 0)


class ConfigurationTest(unittest.TestCase):
    def test_flags_take_defaults_from_the_environment(self) -> None:
        saved = dict(os.environ)
        try:
            os.environ.update({"CLAUDE_PROXY_PORT": "4567", "CLAUDE_BIN": "/x/claude",
                               "CLAUDE_PROXY_ALLOW_API_KEY": "1"})
            cfg = proxy.parse_config([])
            self.assertEqual((cfg.port, cfg.claude_bin, cfg.allow_api_key), (4567, "/x/claude", True))
            self.assertEqual(proxy.parse_config(["--port", "9"]).port, 9)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def test_help_documents_every_flag(self) -> None:
        text = proxy.build_arg_parser().format_help()
        for flag, env, _kind, _default, _help in proxy.OPTIONS:
            self.assertIn(flag, text)
            self.assertIn(env, text)

    def test_readme_documents_every_flag_model_and_the_test_command(self) -> None:
        with open(os.path.join(HERE, "README.md")) as f:
            readme = f.read()
        for flag, env, _kind, _default, _help in proxy.OPTIONS:
            self.assertIn("`%s`" % flag, readme)
            self.assertIn("`%s`" % env, readme)
        for model_id, alias in proxy.MODELS:
            self.assertIn("| `%s` | `%s` |" % (model_id, alias), readme)
        self.assertIn("python3 test_proxy.py", readme)
        self.assertIn("python3 claude_max_proxy.py --port 3456", readme)

    def test_public_bind_without_key_warns_loudly(self) -> None:
        self.assertTrue(any("!!!" in w for w in proxy.startup_warnings(config(host="0.0.0.0"))))
        self.assertFalse(any("!!!" in w for w in proxy.startup_warnings(
            config(host="0.0.0.0", api_key="k"))))
        self.assertFalse(any("!!!" in w for w in proxy.startup_warnings(config())))

    def test_api_key_in_environment_is_reported(self) -> None:
        warnings_ = proxy.startup_warnings(config(claude_bin=FAKE.path))
        self.assertTrue(any("ANTHROPIC_API_KEY" in w and "removed" in w for w in warnings_))

    def test_launch_agent_plist_is_valid_and_runs_system_python(self) -> None:
        with open(os.path.join(HERE, "com.claude-max-api.plist"), "rb") as f:
            plist = plistlib.load(f)
        self.assertEqual(plist["Label"], "com.claude-max-api")
        self.assertEqual(plist["ProgramArguments"][0], "/usr/bin/python3")
        self.assertTrue(plist["ProgramArguments"][1].endswith("claude_max_proxy.py"))
        self.assertTrue(plist["RunAtLoad"])
        self.assertTrue(plist["KeepAlive"])
        path = plist["EnvironmentVariables"]["PATH"].split(":")
        for wanted in ("/.local/bin", "/opt/homebrew/bin", "/usr/local/bin", "/.claude/local"):
            self.assertTrue(any(p.endswith(wanted) for p in path), wanted)
        self.assertIn("Library/Logs", plist["StandardErrorPath"])


# ---------------------------------------------------------------------------
# The official openai SDK (installed by .ci/run; skipped elsewhere when absent)
# ---------------------------------------------------------------------------

try:
    import openai
except ImportError:
    openai = None  # type: ignore[assignment]


@unittest.skipIf(openai is None and not IN_CI, "the openai package is not installed")
class OpenAISdkTest(ProxyTest):
    def client(self) -> Any:
        return openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.running.port,
                             api_key="not-needed", max_retries=0)

    def test_sdk_parses_a_completion_without_warnings(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            completion = self.client().chat.completions.create(
                model="claude-opus-4", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(completion.choices[0].message.content,
                         "Hello from fake (claude-opus-4-8, 1 msgs) ")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.usage.total_tokens, 17)
        self.assertEqual(completion.usage.prompt_tokens_details.cached_tokens, 0)
        self.assertEqual([str(w.message) for w in caught], [])

    def test_sdk_streams_with_usage(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stream = self.client().chat.completions.create(
                model="claude-sonnet-4", messages=[{"role": "user", "content": "hi"}],
                stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "Hello from fake (claude-sonnet-5, 1 msgs) ")
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop")
        self.assertEqual(chunks[-1].usage.completion_tokens, 7)
        self.assertEqual([str(w.message) for w in caught], [])

    def test_sdk_raises_its_own_exception_for_each_error(self) -> None:
        client = self.client()
        with self.assertRaises(openai.AuthenticationError) as auth:
            client.chat.completions.create(model="claude-opus-4", messages=[
                {"role": "user", "content": "[[fake:not-logged-in]]"}])
        self.assertIn("/login", auth.exception.message)
        with self.assertRaises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(bad.exception.code, "model_not_found")
        with self.assertRaises(openai.RateLimitError):
            client.chat.completions.create(model="claude-opus-4", messages=[
                {"role": "user", "content": "[[fake:rate-limited-429-retrying]]"}])
        with self.assertRaises(openai.NotFoundError):
            client.models.retrieve("gpt-5")

    def test_sdk_sees_an_error_frame_mid_stream_as_an_api_error(self) -> None:
        stream = self.client().chat.completions.create(
            model="claude-opus-4", messages=[{"role": "user", "content": "[[fake:crash-midstream]]"}],
            stream=True)
        with self.assertRaises(openai.APIError) as caught:
            for _ in stream:
                pass
        self.assertIn("midway", str(caught.exception))

    def test_sdk_lists_models(self) -> None:
        ids = [model.id for model in self.client().models.list()]
        self.assertEqual(ids, [m for m, _ in proxy.MODELS])


# ---------------------------------------------------------------------------
# End to end: the real `claude` CLI against a local fake of the Anthropic API
# ---------------------------------------------------------------------------

UPSTREAM_REPLY = "Hello from the fake upstream."


class FakeAnthropicHandler(BaseHTTPRequestHandler):
    """POST /v1/messages as the Anthropic API streams it; every request is kept.

    The last user text steers it: HTTPERRnnn answers with that status, THINK adds
    a thinking block, MAXTOK stops with max_tokens. A request that offers the
    CLI's StructuredOutput tool (--json-schema) gets a call to it.
    """

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_json(200, {})

    def do_GET(self) -> None:
        self.send_json(200, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path.split("?")[0] != "/v1/messages":
            return self.send_json(200, {"input_tokens": 10})
        self.server.requests.append(body)
        text = last_user_text(body)
        failure = re.search(r"HTTPERR(\d{3})", text)
        if failure:
            status = int(failure.group(1))
            return self.send_json(status, {"type": "error", "error": {
                "type": "rate_limit_error" if status == 429 else "api_error",
                "message": "fake error %d" % status}})
        self.stream_reply(body, text)

    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def stream_reply(self, body: Dict[str, Any], text: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(payload: Dict[str, Any]) -> None:
            self.wfile.write(("event: %s\ndata: %s\n\n" % (payload["type"], json.dumps(payload))).encode())
            self.wfile.flush()

        usage = {"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        event({"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
        blocks: List[Tuple[str, Any]] = []
        if "THINK" in text:
            blocks.append(("thinking", "Let me think about this."))
        tools = [t.get("name") for t in body.get("tools") or []]
        if "StructuredOutput" in tools:
            blocks.append(("tool_use", {"a": 1}))
        else:
            blocks.append(("text", UPSTREAM_REPLY))
        for index, (kind, value) in enumerate(blocks):
            if kind == "thinking":
                start: Dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": value},
                          {"type": "signature_delta", "signature": "sig"}]
            elif kind == "tool_use":
                start = {"type": "tool_use", "id": "toolu_fake", "name": "StructuredOutput", "input": {}}
                deltas = [{"type": "input_json_delta", "partial_json": json.dumps(value)}]
            else:
                start = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": value[i:i + 8]} for i in range(0, len(value), 8)]
            event({"type": "content_block_start", "index": index, "content_block": start})
            for delta in deltas:
                event({"type": "content_block_delta", "index": index, "delta": delta})
            event({"type": "content_block_stop", "index": index})
        stop = "tool_use" if "StructuredOutput" in tools else "max_tokens" if "MAXTOK" in text else "end_turn"
        event({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
               "usage": dict(usage, output_tokens=7)})
        event({"type": "message_stop"})


def last_user_text(body: Dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(b.get("text", "") for b in content if b.get("type") == "text")
    return ""


def real_claude() -> Optional[str]:
    return shutil.which("claude")


class FakeUpstream:
    """FakeAnthropicHandler on a free loopback port, and os.environ pointing the real CLI at it.

    The CLI gets a dummy API key and an empty HOME: no login, no network.
    """

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAnthropicHandler)
        self.server.daemon_threads = True
        self.requests: List[Dict[str, Any]] = []
        self.server.requests = self.requests
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.home = tempfile.mkdtemp(prefix="claude-home-")
        self.saved_env = dict(os.environ)
        os.environ.update({"HOME": self.home, "ANTHROPIC_API_KEY": "sk-ant-dummy",
                           "ANTHROPIC_BASE_URL": "http://127.0.0.1:%d" % self.server.server_port})
        os.environ.pop("ANTHROPIC_AUTH_TOKEN", None)

    def stop(self) -> None:
        os.environ.clear()
        os.environ.update(self.saved_env)
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.home, ignore_errors=True)


@unittest.skipIf(real_claude() is None and not IN_CI, "the real claude CLI is not installed")
class EndToEndTest(ProxyTest):
    """The proxy driving the real CLI, which talks to FakeAnthropicHandler."""

    settings = {"retry_budget": 1.5, "idle_timeout": 60.0, "timeout": 90.0}

    @classmethod
    def setUpClass(cls) -> None:
        claude = real_claude()
        if claude is None:
            raise AssertionError("CI must have the real claude CLI (npm install -g @anthropic-ai/claude-code)")
        cls.upstream = FakeUpstream()
        cls.settings = dict(cls.settings, claude_bin=claude, allow_api_key=True)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        cls.upstream.stop()

    def upstream_request_for(self, tag: str) -> Dict[str, Any]:
        for body in self.upstream.requests:
            if tag in json.dumps(body):
                return body
        raise AssertionError("no upstream request held %r" % tag)

    def test_answer_and_what_reached_anthropic(self) -> None:
        tag = marker()
        response = self.chat({"role": "system", "content": "You are terse."},
                             user("hello there " + tag), model="claude-sonnet-4")
        self.assertEqual(response.status, 200, response.body)
        body = response.json()
        self.assertEqual(body["choices"][0]["message"]["content"], UPSTREAM_REPLY)
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual(body["usage"]["prompt_tokens"], 12)
        self.assertEqual(body["usage"]["completion_tokens"], 7)
        sent = self.upstream_request_for(tag)
        self.assertEqual(sent["model"], "claude-sonnet-5", "the alias must resolve to the newest model")
        self.assertEqual(sent["tools"], [], "Claude Code's own tools must be off")
        self.assertIn("You are terse.", [block["text"] for block in sent["system"]])
        self.assertIn("hello there " + tag, last_user_text(sent))

    def test_streaming_through_the_real_cli(self) -> None:
        response = self.say("stream please", stream=True, stream_options={"include_usage": True})
        self.assertEqual(response.status, 200, response.body)
        chunks = response.chunks()
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        self.assertEqual(text, UPSTREAM_REPLY)
        self.assertGreater(len(chunks), 4, "text must arrive as several deltas")
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 7)
        self.assertEqual(response.frames()[-1], "[DONE]")

    def test_history_reaches_anthropic_as_one_transcript(self) -> None:
        tag = marker()
        response = self.chat(user("first " + tag), {"role": "assistant", "content": "reply one"},
                             user("second " + tag))
        self.assertEqual(response.status, 200, response.body)
        sent_text = last_user_text(self.upstream_request_for(tag))
        self.assertLess(sent_text.index("first " + tag), sent_text.index("reply one"))
        self.assertLess(sent_text.index("reply one"), sent_text.index("second " + tag))

    def test_upstream_400_becomes_400(self) -> None:
        error = self.assertError(self.say("HTTPERR400"), 400, "invalid_request_error")
        self.assertIn("400", error["message"])

    def test_upstream_401_fails_fast_as_401(self) -> None:
        started = time.monotonic()
        self.assertError(self.say("HTTPERR401"), 401, "authentication_error")
        self.assertLess(time.monotonic() - started, 20)

    def test_upstream_429_becomes_429_after_the_retry_budget(self) -> None:
        response = self.say("HTTPERR429")
        self.assertError(response, 429, "rate_limit_error")
        self.assertIsNotNone(response.headers["Retry-After"])

    def test_pre_started_clis_answer_requests(self) -> None:
        running_server = RunningServer(**dict(self.settings, pool_size=1))

        def pool() -> Dict[str, int]:
            return running_server.server.health()["pool"]

        try:
            for _ in range(2):
                self.assertTrue(wait_until(lambda: pool()["size"] == 1, timeout=30))
                tag = marker()
                response = post_chat(running_server.port, {"messages": [user("warm " + tag)]})
                self.assertEqual(response.status, 200, response.body)
                self.assertEqual(response.json()["choices"][0]["message"]["content"], UPSTREAM_REPLY)
                self.assertIn("warm " + tag, last_user_text(self.upstream_request_for(tag)))
            self.assertEqual((pool()["hits"], pool()["misses"]), (2, 0))
        finally:
            running_server.stop()

    def test_without_a_login_the_client_is_told_to_log_in(self) -> None:
        self.config.allow_api_key = False  # the key is stripped; the empty HOME holds no login
        error = self.assertError(self.say("hi"), 401, "authentication_error")
        self.assertIn("log in", error["message"])


# ---------------------------------------------------------------------------
# Benchmark: `python3 test_proxy.py bench` (never part of the test run)
# ---------------------------------------------------------------------------

BENCH_BODY = {"model": "claude-sonnet-4", "stream": True,
              "messages": [system("You are a benchmark."), user("Say hello.")]}


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ms(values: List[float]) -> str:
    """p50 / p95 of durations in seconds, in milliseconds."""
    return "%.1f / %.1f ms" % (percentile(values, 0.5) * 1000, percentile(values, 0.95) * 1000)


def stream_once(port: int, body: Dict[str, Any]) -> Tuple[float, float, bool]:
    """One streamed completion: (seconds to the first frame, seconds in all, answered in full)."""
    started = time.perf_counter()
    first = float("nan")
    last = b""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        for line in iter(response.readline, b""):
            if line.startswith(b"data: ") and first != first:
                first = time.perf_counter() - started
            last = line.strip() or last
        return first, time.perf_counter() - started, response.status == 200 and last == b"data: [DONE]"
    except (OSError, http.client.HTTPException):
        return first, time.perf_counter() - started, False
    finally:
        conn.close()


def direct_once(claude: str, body: Dict[str, Any]) -> Tuple[float, float, bool]:
    """The same request run by hand, with the argv, env and stdin the proxy would give the CLI."""
    config = proxy.Config()
    request = proxy.parse_chat_request(body, config)
    started = time.perf_counter()
    first = total = float("nan")
    child = subprocess.Popen(proxy.cli_argv(claude, request), env=proxy.cli_env(config),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    child.stdin.write(proxy.stdin_message(request))
    child.stdin.close()
    # The events the proxy's first frame and its [DONE] follow: the first text and the result.
    for line in child.stdout:
        if b'"content_block_delta"' in line and first != first:
            first = time.perf_counter() - started
        if line.startswith(b'{"type": "result"'):
            total = time.perf_counter() - started
    child.stdout.close()
    return first, total, child.wait() == 0


def wait_for_warm(daemon: Daemon, pause: float) -> None:
    """Let the pool refill and its new process finish starting, as an agent's pause between calls would."""
    def full() -> bool:
        pool = daemon.health()["pool"]
        return pool["size"] == pool["max"]

    wait_until(full, timeout=30)
    time.sleep(pause)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def children_rss_mb(pid: int) -> float:
    children = set()
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                children.update(int(child) for child in f.read().split())
        except OSError:
            pass  # a thread that ended meanwhile
    return sum(rss_mb(child) for child in children)


def bench_overhead(rows: List[Tuple[str, str]], runs: int = 200) -> None:
    """Section 1: the fake CLI by hand vs through the proxy, interleaved so load drifts hit both."""
    cold = Daemon("--claude-bin", FAKE.path, "--pool-size", "0")
    warm = Daemon("--claude-bin", FAKE.path, "--pool-size", "2")
    results: Dict[str, List[Tuple[float, float, bool]]] = {"direct": [], "cold": [], "warm": []}
    try:
        for _ in range(runs):
            results["direct"].append(direct_once(FAKE.path, BENCH_BODY))
            results["cold"].append(stream_once(cold.port, BENCH_BODY))
        for _ in range(runs):  # apart: a replacement starting would slow the others down
            wait_for_warm(warm, 0.1)
            results["warm"].append(stream_once(warm.port, BENCH_BODY))
        hits = warm.health()["pool"]["hits"]
    finally:
        cold.stop()
        warm.stop()
    first = {name: [r[0] for r in rs] for name, rs in results.items()}
    total = {name: [r[1] for r in rs] for name, rs in results.items()}
    errors = sum(not r[2] for rs in results.values() for r in rs)
    rows.append(("1. fake CLI run directly: first token p50 / p95", ms(first["direct"])))
    rows.append(("1. fake CLI run directly: total p50 / p95", ms(total["direct"])))
    rows.append(("1. through the proxy, pool off: first byte p50 / p95", ms(first["cold"])))
    rows.append(("1. through the proxy, pool off: total p50 / p95", ms(total["cold"])))
    for label, values in (("first byte", first), ("total", total)):
        extra = [proxied - direct for proxied, direct in zip(values["cold"], values["direct"])]
        rows.append(("1. **proxy overhead**, %s: p50 / p95 of (pool off minus direct), paired" % label,
                     "%+.1f / %+.1f ms" % (percentile(extra, 0.5) * 1000, percentile(extra, 0.95) * 1000)))
    rows.append(("1. through the proxy, pool on: first byte p50 / p95",
                 "%s (%d of %d warm)" % (ms(first["warm"]), hits, runs)))
    rows.append(("1. runs / errors", "%d x 3 / %d" % (runs, errors)))


def bench_real_cli(rows: List[Tuple[str, str]], runs: int = 20) -> None:
    """Section 2: the real CLI's first token, cold vs from the pool, on the fake upstream."""
    claude = real_claude()
    if claude is None:
        rows.append(("2. real claude", "not installed; skipped"))
        return
    upstream = FakeUpstream()
    try:
        flags = ["--claude-bin", claude, "--allow-api-key"]
        cold = Daemon(*(flags + ["--pool-size", "0"]))
        try:
            cold_first = [stream_once(cold.port, BENCH_BODY)[0] for _ in range(runs)]
        finally:
            cold.stop()
        warm = Daemon(*(flags + ["--pool-size", "2"]))
        try:
            stream_once(warm.port, BENCH_BODY)  # the first request for a key always starts cold
            warm_first = []
            for _ in range(runs):
                wait_for_warm(warm, 1.5)
                warm_first.append(stream_once(warm.port, BENCH_BODY)[0])
            pool = warm.health()["pool"]
            wait_for_warm(warm, 1.5)
            idle_pool_rss = children_rss_mb(warm.process.pid)
        finally:
            warm.stop()
    finally:
        upstream.stop()
    rows.append(("2. real claude %s, cold (pool 0): first token p50 / p95" % claude_version_of(claude),
                 ms(cold_first)))
    rows.append(("2. real claude, warm (pool 2): first token p50 / p95",
                 "%s (%d hits, %d misses)" % (ms(warm_first), pool["hits"], pool["misses"] - 1)))
    rows.append(("2. **warm / cold** first token p50", "1 / %.1f" % (
        percentile(cold_first, 0.5) / percentile(warm_first, 0.5))))
    rows.append(("2. RSS of the 2 idle pre-started real CLIs", "%.0f MB" % idle_pool_rss))


def claude_version_of(claude: str) -> str:
    return (proxy.claude_version(claude) or "?").split()[0]


def bench_load(rows: List[Tuple[str, str]], clients: int = 64, each: int = 5) -> None:
    """Sections 3 and 4: many streaming clients at once, and the proxy's own memory."""
    daemon = Daemon("--claude-bin", FAKE.path, "--max-concurrent", str(clients))
    results: List[Tuple[float, float, bool]] = []
    peak = [0.0]
    done = threading.Event()

    def client() -> None:
        for _ in range(each):
            results.append(stream_once(daemon.port, BENCH_BODY))

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_mb(daemon.process.pid))

    try:
        wait_for_warm(daemon, 0.5)
        idle = rss_mb(daemon.process.pid)
        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        high_water = rss_mb(daemon.process.pid, "VmHWM")
    finally:
        daemon.stop()
    errors = sum(not ok for _first, _total, ok in results) + clients * each - len(results)
    rows.append(("3. %d concurrent streaming clients x %d requests (fake CLI): requests/s"
                 % (clients, each), "%.0f" % (len(results) / elapsed)))
    rows.append(("3. errors", "%d of %d" % (errors, clients * each)))
    rows.append(("3. first byte p50 / p95", ms([first for first, _total, _ok in results])))
    rows.append(("4. proxy RSS idle (pool processes excluded)", "%.1f MB" % idle))
    rows.append(("4. proxy RSS under that load: sampled max / high-water mark",
                 "%.1f MB / %.1f MB" % (peak[0], high_water)))


def bench() -> int:
    """Print the performance table README shows; about two minutes on 2 cores."""
    setUpModule()
    rows: List[Tuple[str, str]] = []
    try:
        bench_overhead(rows)
        bench_real_cli(rows)
        bench_load(rows)
    finally:
        tearDownModule()
    print("Machine: %d CPUs, %s, Python %s, %s" % (
        os.cpu_count() or 0, platform.platform(terse=True), platform.python_version(),
        "claude " + claude_version_of(real_claude()) if real_claude() else "no real claude"))
    print()
    print("| measure | result |")
    print("|---|---|")
    for measure, result in rows:
        print("| %s | %s |" % (measure, result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["bench"]:
        sys.exit(bench())
    unittest.main()
