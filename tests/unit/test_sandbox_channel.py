"""The sandbox channel's MACs: a line or an outcome counts only as the key's holder sent it."""

from __future__ import annotations

from kquant_job.sandbox.channel import (
    new_key,
    open_line,
    open_outcome,
    sign_line,
    sign_outcome,
)


def test_signed_lines_and_outcomes_open_with_their_key_only() -> None:
    key, other = new_key(), new_key()
    assert key != other and len(key) == 32
    line = '{"message":"convert: start","tab":"a\\tb"}'  # a tab inside a JSON string is escaped
    assert open_line(key, sign_line(key, line)) == line
    assert open_line(other, sign_line(key, line)) is None
    assert open_line(key, line) is None
    tampered = sign_line(key, line).replace("convert", "publish")
    assert open_line(key, tampered) is None
    payload = b'{"ok": {"models": []}}'
    assert open_outcome(key, sign_outcome(key, payload)) == payload
    assert open_outcome(other, sign_outcome(key, payload)) is None
    assert open_outcome(key, payload) is None
    assert open_outcome(key, b"x" + sign_outcome(key, payload)) is None
