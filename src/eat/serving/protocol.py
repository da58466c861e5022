"""The request and response format of the service, shared by the single-machine server and Ray Serve.

A request is a JSON object: ``{"text": "..."}``, ``{"text": "...", "text_pair": "..."}``, or
``{"texts": [...]}`` whose items are strings, ``[text, text_pair]`` lists or ``{"text": ..., "text_pair": ...}``
objects; an optional ``"id"`` (string or number) is echoed back. The answer is ``{"id": ..., "results": [...]}``,
one result per row in order; a row the model failed on has ``{"error": "..."}`` and the others are unaffected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FIELDS = ("id", "text", "text_pair", "texts")


class RequestError(ValueError):
    """A request the service refuses: ``status`` (4xx) and a message that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ParsedRequest:
    """A valid request: its id (or None) and its rows as (text, text_pair or None)."""

    id: Any
    rows: list[tuple[str, str | None]]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(422, f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(422, f"{where} is empty")
    return value


def _row(item: Any, where: str) -> tuple[str, str | None]:
    if isinstance(item, str):
        return _text(item, where), None
    if isinstance(item, list):
        if len(item) != 2:
            raise RequestError(422, f"{where} must be a text or a [text, text_pair] pair, got a list of {len(item)}")
        return _text(item[0], f"{where}[0]"), _text(item[1], f"{where}[1]")
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"text", "text_pair"})
        if unknown:
            raise RequestError(422, f"{where}: unknown field {unknown[0]!r} (a row has 'text' and optional "
                                    "'text_pair')")
        if "text" not in item:
            raise RequestError(422, f"{where}: missing field 'text'")
        pair = item.get("text_pair")
        return _text(item["text"], f"{where}.text"), None if pair is None else _text(pair, f"{where}.text_pair")
    raise RequestError(422, f"{where} must be a text, a [text, text_pair] pair or an object, "
                            f"got {type(item).__name__}")


def parse_request(body: bytes, *, max_rows: int, max_body_bytes: int) -> ParsedRequest:
    """Validate a request body. Raises RequestError: 413 (too long a body, too many rows), 400 (not JSON),
    422 (missing or wrong fields, empty text)."""
    if len(body) > max_body_bytes:
        raise RequestError(413, f"the body has {len(body)} bytes; at most {max_body_bytes} (--max-body-bytes)")
    if not body.strip():
        raise RequestError(400, "empty body: send a JSON object with 'text' or 'texts'")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError as error:
        raise RequestError(400, f"malformed JSON: the body is not UTF-8 ({error.reason} at byte {error.start})") \
            from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"malformed JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(payload, dict):
        raise RequestError(422, f"the body must be a JSON object with 'text' or 'texts', got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; a request has 'text' (and 'text_pair') or 'texts', "
                                "and optionally 'id'")
    request_id = payload.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int, float))):
        raise RequestError(422, f"'id' must be a string or a number, got {type(request_id).__name__}")
    if ("text" in payload) == ("texts" in payload):
        raise RequestError(422, "missing field: give 'text' (one row) or 'texts' (a list of rows), not both" if
                           "text" in payload else "missing field: give 'text' (one row) or 'texts' (a list of rows)")
    if "text" in payload:
        pair = payload.get("text_pair")
        rows = [(_text(payload["text"], "'text'"), None if pair is None else _text(pair, "'text_pair'"))]
    else:
        if "text_pair" in payload:
            raise RequestError(422, "'text_pair' goes with 'text'; in 'texts' give each row as [text, text_pair]")
        items = payload["texts"]
        if not isinstance(items, list):
            raise RequestError(422, f"'texts' must be a list, got {type(items).__name__}")
        if not items:
            raise RequestError(422, "'texts' is an empty list")
        if len(items) > max_rows:
            raise RequestError(413, f"'texts' has {len(items)} rows; at most {max_rows} per request "
                                    "(--max-rows-per-request)")
        rows = [_row(item, f"texts[{i}]") for i, item in enumerate(items)]
    return ParsedRequest(request_id, rows)


def encode_rows(parsed: ParsedRequest, encode) -> list[Any]:
    """Each row of a parsed request through ``encode(text, pair)`` (the predictor's tokenizer step); a row it refuses
    (empty after tokenizing, too long, ...) is a 422 naming the row. Shared by the single-machine and Ray servers."""
    rows = []
    for i, (text, pair) in enumerate(parsed.rows):
        try:
            rows.append(encode(text, pair))
        except ValueError as error:
            raise RequestError(422, f"row {i}: {error}") from None
    return rows


def wrong_kind_message(kind: str) -> str:
    """The 404 message for a request to the other model kind's route (``kind`` is this server's: classify or tag)."""
    return (f"this server's model is a {'tagging' if kind == 'tag' else 'sentence'} model: use POST /v1/{kind}")


def response_body(request_id: Any, answers: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body for a request's answers: 200 when at least one row was answered, 500 when
    every row failed (each failed row says why)."""
    status = 500 if all("error" in answer for answer in answers) else 200
    return status, {"id": request_id, "results": answers}


def parse_server_timing(header: str) -> dict[str, float]:
    """``"parse;dur=0.1, model;dur=2.5"`` -> {"parse": 0.1, "model": 2.5} (ms); entries without dur are skipped."""
    phases = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    phases[name] = float(value)
                except ValueError:
                    pass
    return phases


__all__ = ["ParsedRequest", "RequestError", "parse_request", "parse_server_timing", "response_body"]
