"""Server-sent events as the service sends them: `data: <json>` events separated by blank lines, ending with
`data: [DONE]`; an event carrying `error` is a failure after the response had started."""

from __future__ import annotations

import json
from typing import Any

from .errors import error_from_event

DONE = object()
"""Returned by SSEDecoder.feed for the final `data: [DONE]`."""


class SSEDecoder:
    """Fed one line at a time (without its newline); returns each complete event's JSON, DONE, or None."""

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> Any:
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return None
        if line or not self._data:
            return None  # comments (":"), other fields, or a blank line with no pending data
        data, self._data = "\n".join(self._data), []
        if data == "[DONE]":
            return DONE
        event = json.loads(data)
        if isinstance(event, dict) and isinstance(event.get("error"), dict):
            raise error_from_event(event)
        return event
