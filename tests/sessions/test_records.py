"""Session records (hkv.sessions.records): the record format and its errors, model identities,
session names."""

from __future__ import annotations

import numpy as np
import pytest

from hkv.sessions.records import CorruptSessionError, SessionError, SessionNameError, SessionRecord, check_name

from helpers.records import flip, identity, ids_of, keys_for, make_record


def test_record_round_trip_and_its_errors() -> None:
    record = make_record("chat", [5, 2**40, -3, 7, 1], kv_tokens=4)  # an id outside int32: stored as int64
    record.created, record.updated, record.last_used, record.commits = 1.5, 2.5, 3.5, 7
    data = record.to_bytes()
    back = SessionRecord.from_bytes("chat", data)
    assert back.token_ids.dtype == np.int64 and back.token_ids.tolist() == [5, 2**40, -3, 7, 1]
    assert (back.identity, back.layout, back.kv_tokens, back.kv_blocks, back.tail_tokens) == (
        record.identity, record.layout, 4, 1, 0
    )  # fmt: skip
    assert (back.created, back.updated, back.last_used, back.commits) == (1.5, 2.5, 3.5, 7)
    small = make_record("chat", ids_of(9), kv_tokens=9).to_bytes()
    assert len(small) < len(make_record("chat", ids_of(9) + 2**40, kv_tokens=9).to_bytes())  # int32 when it fits
    assert SessionRecord.from_bytes("chat", small).token_ids.tolist() == list(range(9))
    assert [bytes(k) for k in keys_for(ids_of(9), 2)] == make_record("x", ids_of(9), 9).key_digests()

    with pytest.raises(CorruptSessionError, match="'chat'.*checksum"):
        SessionRecord.from_bytes("chat", bytes(flip(10)(bytearray(data))))
    with pytest.raises(CorruptSessionError, match="'chat'.*checksum"):
        SessionRecord.from_bytes("chat", data[:-20])
    with pytest.raises(CorruptSessionError, match="truncated"):
        SessionRecord.from_bytes("chat", data[:5])
    with pytest.raises(CorruptSessionError, match="record is of session 'chat'"):
        SessionRecord.from_bytes("other", data)
    newer = make_record("chat", ids_of(4), 4)
    newer.version = 2
    with pytest.raises(SessionError, match="record version 2 is newer") as caught:
        SessionRecord.from_bytes("chat", newer.to_bytes())
    assert not isinstance(caught.value, CorruptSessionError)


def test_identity_differences_name_each_field() -> None:
    stored = identity()
    assert stored.differences(identity()) == []
    other = identity(bytes(16), num_layers=3)
    other.tokenizer = "ffff"
    lines = stored.differences(other)
    assert "num_layers: stored 2, this model 3" in lines
    assert "tokenizer: stored ab12, this model ffff" in lines
    assert any(line.startswith("fingerprint: stored 000102") for line in lines)
    other = identity()
    other.tokenizer = None  # unknown on one side: not a difference
    assert stored.differences(other) == []


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), ("a" * 129, "129 characters"), (".hidden", "starts with '.'"), ("a/b", "'/'"), ("../x", "'/'"),
     ("caf\u00e9", "'\u00e9'"), ("two words", "' '"), ("nul\x00", "'\\\\x00'"), (7, "must be a string")],
)  # fmt: skip
def test_bad_names_are_refused_with_the_reason(name, why) -> None:
    with pytest.raises(SessionNameError, match=why):
        check_name(name)


def test_good_names() -> None:
    for name in ("a", "chat-1.v2_x", "A" * 128, "-x", "_"):
        assert check_name(name) == name
