"""What every fault test asserts of a refused request: a 4xx whose body is exactly the OpenAI error shape."""

from __future__ import annotations

ERROR_KEYS = {"message", "type", "param", "code"}


def openai_error(body: object) -> dict | None:
    """The `error` object of a body in the OpenAI shape, or None if the body is not in that shape."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return None
    err = body["error"]
    if set(err) != ERROR_KEYS or not isinstance(err["message"], str) or not err["message"]:
        return None
    if not isinstance(err["type"], str) or not all(
        err[k] is None or isinstance(err[k], str) for k in ("param", "code")
    ):
        return None
    return err


def assert_clean_4xx(response, status: int | None = None) -> dict:
    """`response` (httpx or schemathesis) is a 4xx (or exactly `status`) in the OpenAI error shape; returns the
    error."""
    code = response.status_code
    assert 400 <= code < 500, f"{code}: {response.text[:500]}"
    if status is not None:
        assert code == status, f"expected {status}, got {code}: {response.text[:500]}"
    content_type = response.headers.get("content-type", "")
    if isinstance(content_type, list):  # schemathesis' Response keeps every value of a header
        content_type = ",".join(content_type)
    assert content_type.startswith("application/json"), response.headers
    err = openai_error(response.json())
    assert err is not None, f"not the OpenAI error shape: {response.text[:500]}"
    return err
