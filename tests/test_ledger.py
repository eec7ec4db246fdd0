import json
import re
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.canonical import canonical_json, sha256_hex
from protocols.errors import ConfigError, LedgerTampered
from protocols.ledger import (GENESIS, Ledger, generate_signing_key, load_public_key, load_signing_key,
                              public_key_pem, read_events, verify_ledger)

ACTOR = "site-a"


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def write_ledger(path, key):
    """Five lines: three events, a checkpoint (line 4) and one more event."""
    ledger = Ledger(path, ACTOR, key)
    ledger.append("run_started", {"run_id": "r1", "sites": ["site-a", "site-b"]})
    ledger.append("round", {"round": 1, "note": "alpha"})
    ledger.append("round", {"round": 2, "note": "bravo"})
    ledger.checkpoint({"round": 2})
    ledger.append("round", {"round": 3, "note": "charlie"})
    return ledger


def lines_of(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def flip_after(line, marker):
    """Change the first character after ``marker`` to another one that keeps the line valid JSON."""
    at = line.index(marker) + len(marker)
    return line[:at] + ("0" if line[at] != "0" else "1") + line[at + 1:]


def rehash(event):
    event["hash"] = sha256_hex(canonical_json({k: v for k, v in event.items() if k != "hash"}))
    return event


def test_append_checkpoint_reopen_and_verify(tmp_path, key):
    path = tmp_path / "audit" / "ledger.jsonl"
    ledger = write_ledger(path, key)
    events = read_events(path)
    assert [e["seq"] for e in events] == [0, 1, 2, 3, 4]
    assert events[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(events, events[1:]))
    assert ledger.head == (4, events[-1]["hash"])
    checkpoint = events[3]
    assert checkpoint["kind"] == "checkpoint"
    assert checkpoint["payload"]["round"] == 2
    assert (checkpoint["payload"]["signed_seq"], checkpoint["payload"]["signed_hash"]) == (2, events[2]["hash"])
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines_of(path))

    reopened = Ledger(path, ACTOR, key)
    assert reopened.head == ledger.head
    event = reopened.append("round", {"round": 4, "shape": (2, 3)})
    assert (event["seq"], event["prev_hash"]) == (5, events[-1]["hash"])
    assert read_events(path)[-1] == event  # the returned event is exactly what a reader parses back
    reopened.checkpoint({"round": 4})

    report = verify_ledger(path, public_key_pem(key), actor=ACTOR)
    assert (report.path, report.events, report.checkpoints) == (path, 7, 2)
    assert (report.head_seq, report.head_hash) == reopened.head


def test_empty_and_new_ledgers(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    assert Ledger(path, ACTOR, key).head == (-1, GENESIS)
    assert not path.exists()
    path.write_bytes(b"")
    report = verify_ledger(path, public_key_pem(key))
    assert (report.events, report.checkpoints, report.head_seq, report.head_hash) == (0, 0, -1, GENESIS)


def test_bad_arguments_are_config_errors(tmp_path, key):
    ledger = Ledger(tmp_path / "ledger.jsonl", ACTOR, key)
    with pytest.raises(ConfigError, match="JSON"):
        ledger.append("round", {"loss": float("nan")})
    with pytest.raises(ConfigError, match="dict"):
        ledger.append("round", [1, 2])
    with pytest.raises(ConfigError, match="checkpoint"):
        ledger.append("checkpoint", {})
    with pytest.raises(ConfigError, match="signature"):
        ledger.checkpoint({"signature": "x"})
    with pytest.raises(ConfigError, match="actor"):
        Ledger(tmp_path / "other.jsonl", "", key)
    with pytest.raises(ConfigError, match="PEM"):
        verify_ledger(tmp_path / "ledger.jsonl", "not a key")
    assert ledger.head == (-1, GENESIS)


@pytest.mark.parametrize("marker", ['"note":"', '"hash":"', '"prev_hash":"', '"seq":', '"time":"', '"actor":"',
                                    '"kind":"'], ids=["payload", "hash", "prev_hash", "seq", "time", "actor", "kind"])
def test_a_flipped_character_in_a_middle_line_names_that_line(tmp_path, key, marker):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    lines = lines_of(path)
    lines[2] = flip_after(lines[2], marker)
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerTampered, match=r"line 3: "):
        verify_ledger(path, public_key_pem(key))


def test_any_single_flipped_byte_fails_at_its_own_line(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    pem = public_key_pem(key)
    original = path.read_bytes()
    starts = [0] + [i + 1 for i, byte in enumerate(original) if byte == ord("\n")][:-1]
    for offset in range(len(original)):
        number = sum(start <= offset for start in starts)
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        path.write_bytes(bytes(tampered))
        with pytest.raises(LedgerTampered, match=rf"line {number}: ") as raised:
            verify_ledger(path, pem)
        assert str(path) in str(raised.value)


@pytest.mark.parametrize("deleted", [0, 2, 3])
def test_a_deleted_line_fails_at_the_line_after_it(tmp_path, key, deleted):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    lines = lines_of(path)
    del lines[deleted]
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerTampered, match=rf"line {deleted + 1}: seq {deleted + 1} where {deleted} was expected"):
        verify_ledger(path, public_key_pem(key))


def test_swapped_lines_fail_at_the_first_of_them(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    lines = lines_of(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerTampered, match=r"line 2: seq 2 where 1 was expected"):
        verify_ledger(path, public_key_pem(key))


def test_a_checkpoint_signed_with_another_key_fails_at_the_checkpoint(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, Ed25519PrivateKey.generate())
    with pytest.raises(LedgerTampered, match=r"line 4: checkpoint signature does not verify"):
        verify_ledger(path, public_key_pem(key))


def test_rewriting_the_chain_without_the_key_fails_at_the_checkpoint(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    events = read_events(path)
    events[1]["payload"]["note"] = "forged"
    prev = GENESIS
    for event in events:
        event["prev_hash"] = prev
        if event["kind"] == "checkpoint":
            event["payload"]["signed_hash"] = prev
        prev = rehash(event)["hash"]
    path.write_text("".join(canonical_json(e) + "\n" for e in events), encoding="utf-8")
    Ledger(path, ACTOR, key)  # a well-formed chain: only the signature gives the rewrite away
    with pytest.raises(LedgerTampered, match=r"line 4: checkpoint signature"):
        verify_ledger(path, public_key_pem(key))


def test_a_checkpoint_that_signs_another_head_fails(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    events = read_events(path)
    events[3]["payload"]["signed_seq"] = 1
    rehash(events[3])
    events[4]["prev_hash"] = events[3]["hash"]
    rehash(events[4])
    path.write_text("".join(canonical_json(e) + "\n" for e in events), encoding="utf-8")
    with pytest.raises(LedgerTampered, match=r"line 4: checkpoint signs head"):
        verify_ledger(path, public_key_pem(key))
    with pytest.raises(LedgerTampered, match=r"line 4: checkpoint signs head"):
        Ledger(path, ACTOR, key)


def test_another_actor_fails(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    with pytest.raises(LedgerTampered, match=r"line 1: actor 'site-a' is not 'site-b'"):
        verify_ledger(path, public_key_pem(key), actor="site-b")
    with pytest.raises(LedgerTampered, match=r"line 1: actor"):
        Ledger(path, "site-b", key)


@pytest.mark.parametrize("tail", ['{"actor":"site-a","hash":"ab', None, '{"actor":"site-a"\n'],
                         ids=["partial", "complete-without-newline", "partial-with-newline"])
def test_a_torn_last_line_is_reported_never_dropped(tmp_path, key, tail):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    if tail is None:
        path.write_bytes(path.read_bytes()[:-1])
        number = 5
    else:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(tail)
        number = 6
    before = path.read_bytes()
    with pytest.raises(LedgerTampered, match=rf"line {number}: the last line is torn"):
        Ledger(path, ACTOR, key)
    with pytest.raises(LedgerTampered, match=rf"line {number}: the last line is torn"):
        verify_ledger(path, public_key_pem(key))
    with pytest.raises(LedgerTampered, match=rf"line {number}: the last line is torn"):
        read_events(path)
    assert path.read_bytes() == before


def test_an_earlier_failure_is_reported_before_a_torn_last_line(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    lines = lines_of(path)
    lines[1] = flip_after(lines[1], '"note":"')
    path.write_text("".join(lines) + '{"actor"', encoding="utf-8")
    with pytest.raises(LedgerTampered, match=r"line 2: hash does not match"):
        verify_ledger(path, public_key_pem(key))


def test_a_non_canonical_line_fails(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key)
    lines = lines_of(path)
    lines[1] = json.dumps(json.loads(lines[1]), sort_keys=True) + "\n"  # same content, with spaces
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerTampered, match=r"line 2: not in canonical JSON"):
        verify_ledger(path, public_key_pem(key))


def test_a_missing_ledger_is_missing_evidence(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    with pytest.raises(LedgerTampered, match="missing evidence") as raised:
        verify_ledger(path, public_key_pem(key))
    assert str(path) in str(raised.value)


def test_key_files(tmp_path):
    path = tmp_path / "keys" / "site-a.pem"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    loaded = load_signing_key(path)
    assert public_key_pem(loaded) == public_key_pem(key)
    assert public_key_pem(key).startswith("-----BEGIN PUBLIC KEY-----")
    load_public_key(public_key_pem(key)).verify(loaded.sign(b"head"), b"head")

    before = path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_signing_key(path)
    assert path.read_bytes() == before

    missing = tmp_path / "keys" / "nobody.pem"
    with pytest.raises(ConfigError, match=rf"{re.escape(str(missing))}: signing key file is missing"):
        load_signing_key(missing)
    garbage = tmp_path / "keys" / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match="garbage.pem: not an unencrypted PEM private key"):
        load_signing_key(garbage)
