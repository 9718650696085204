"""Session store: id validation, bit-exact round trips (plain and encrypted), clear errors for a wrong password, a
tampered or truncated file, another model and a future format; nothing overwritten on failure; a kill -9 during a
save leaves the previous state loadable; `memlm memory` over the store.

Notation: T tokens fed into a state.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import memlm
from memlm.cli.main import main
from memlm.errors import UserError
from memlm.inference.session import Session, state_hash
from memlm.inference.store import (
    MAGIC,
    SessionStore,
    decrypt_bytes,
    encrypt_bytes,
    read_envelope_header,
    validate_session_id,
)
from memlm.models.state import HEADER_KEY, ModelState

pytest.importorskip("cryptography")

FAST_KDF = 2 ** 10  # tests derive many keys; the default (2^15) is for real use


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return memlm.build_model("transformer-debug").eval()


@pytest.fixture(scope="module")
def tok():
    return memlm.load_tokenizer("byte")


def fed_state(model, T: int = 37, seed: int = 1) -> ModelState:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, T), generator=g)
    with torch.no_grad():
        _, st = model(ids)
    return st


def assert_states_equal(a: ModelState, b: ModelState) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].cpu(), sb[k].cpu()), k


# ------------------------------------------------------------------------------------------------ ids


@pytest.mark.parametrize("sid", ["a", "chat-1", "A_b-C", "x" * 64])
def test_valid_ids(sid):
    assert validate_session_id(sid) == sid


@pytest.mark.parametrize("sid", ["", "../x", "..", "%2e%2e", "/etc/passwd", "a/b", "a\\b", "a.b", "x" * 65, "é",
                                 "a b", "a\x00", None, 5])
def test_invalid_ids_rejected(sid, tmp_path):
    with pytest.raises(UserError, match="invalid"):
        validate_session_id(sid)
    with pytest.raises(UserError):
        SessionStore(tmp_path).session_dir(sid)
    assert list(tmp_path.iterdir()) == []


def test_symlinked_session_folder_refused(tmp_path, model):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = SessionStore(tmp_path / "store")
    store.root.mkdir()
    (store.root / "evil").symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        store.save("evil", fed_state(model))
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("password", [None, "correct horse"])
def test_round_trip_bit_exact(tmp_path, model, password):
    store = SessionStore(tmp_path, password=password, kdf_n=FAST_KDF)
    st = fed_state(model)
    cms = {"blocks.0.mlp.levels.0.w_in.weight": torch.randn(3, 4)}
    transcript = [{"turn": 1, "role": "user", "content": "secret fact: the key is under the mat"},
                  {"turn": 1, "role": "assistant", "content": "noted ✓"}]
    store.save("s1", st, extra_header={"turns": 1, "mode": "persistent"}, cms=cms, transcript=transcript)
    loaded = store.load("s1", model=model)
    assert_states_equal(loaded.state, st)
    assert torch.equal(loaded.cms["blocks.0.mlp.levels.0.w_in.weight"], cms["blocks.0.mlp.levels.0.w_in.weight"])
    assert loaded.transcript == transcript
    h = loaded.header
    assert h["turns"] == 1 and h["session_id"] == "s1" and h["config_hash"] == model._config_hash
    assert h["tokens_seen"] == 37 and h["format_version"] == 1 and h["created"] <= h["updated"]
    assert loaded.encrypted == (password is not None)
    files = sorted(p.name for p in (tmp_path / "s1").iterdir())
    assert (tmp_path / "s1").stat().st_mode & 0o777 == 0o700  # owner only
    assert all((tmp_path / "s1" / f).stat().st_mode & 0o777 == 0o600 for f in files)
    if password is None:
        assert files == ["state.safetensors", "transcript.jsonl"]
        # the plain store file is an ordinary ModelState file
        assert_states_equal(ModelState.load(tmp_path / "s1" / "state.safetensors", model=model), st)
    else:
        assert files == ["state.safetensors.enc", "transcript.jsonl.enc"]
        for f in files:
            data = (tmp_path / "s1" / f).read_bytes()
            assert data.startswith(MAGIC) and b"secret fact" not in data and b"layers.0" not in data


def test_fresh_salt_and_nonce_every_save(tmp_path, model):
    store = SessionStore(tmp_path, password="pw", kdf_n=FAST_KDF)
    st = fed_state(model)
    seen = set()
    for _ in range(3):
        store.save("s", st)
        h, _ = read_envelope_header((tmp_path / "s" / "state.safetensors.enc").read_bytes(), "f")
        seen.add((h["kdf"]["salt"], h["nonce"]))
    assert len(seen) == 3 and len({s for s, _ in seen}) == 3 and len({n for _, n in seen}) == 3


def test_upgrading_a_plain_session_to_encrypted_removes_the_plaintext(tmp_path, model):
    st = fed_state(model)
    SessionStore(tmp_path).save("s", st, transcript=[{"role": "user", "content": "x"}])
    SessionStore(tmp_path, password="pw", kdf_n=FAST_KDF).save("s", st, transcript=[{"role": "user", "content": "x"}])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["state.safetensors.enc", "transcript.jsonl.enc"]


# ------------------------------------------------------------------------------------------------ clear errors


def _enc_store(tmp_path, model, password="right"):
    store = SessionStore(tmp_path, password=password, kdf_n=FAST_KDF)
    store.save("s", fed_state(model), transcript=[{"role": "user", "content": "hello"}])
    return store, tmp_path / "s" / "state.safetensors.enc"


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_wrong_password_is_clear_and_overwrites_nothing(tmp_path, model, tok):
    _, path = _enc_store(tmp_path, model)
    before = _snapshot(path.parent)
    with pytest.raises(UserError, match="wrong password"):
        SessionStore(tmp_path, password="wrong", kdf_n=FAST_KDF).load("s", model=model)
    with pytest.raises(UserError, match="wrong password"):  # a persistent session never starts, so never saves
        Session(model, tok, mode="persistent", store=SessionStore(tmp_path, password="wrong", kdf_n=FAST_KDF),
                session_id="s")
    with pytest.raises(UserError, match="encrypted: give --password"):
        SessionStore(tmp_path).load("s", model=model)
    assert _snapshot(path.parent) == before


@pytest.mark.parametrize("where", ["ciphertext", "tag", "header"])
def test_tampered_file_is_refused(tmp_path, model, where):
    _, path = _enc_store(tmp_path, model)
    data = bytearray(path.read_bytes())
    _, off = read_envelope_header(bytes(data), "f")
    i = {"ciphertext": off + 10, "tag": len(data) - 1, "header": off - 3}[where]
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        SessionStore(tmp_path, password="right", kdf_n=FAST_KDF).load("s", model=model)
    assert "modified" in str(e.value) or "corrupt" in str(e.value)


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("keep", [0, 5, 12, 100, -1])
def test_truncated_file_is_refused(tmp_path, model, encrypted, keep):
    store = SessionStore(tmp_path, password="pw" if encrypted else None, kdf_n=FAST_KDF)
    store.save("s", fed_state(model))
    path = tmp_path / "s" / ("state.safetensors.enc" if encrypted else "state.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(UserError, match="truncated|corrupt|modified|not a"):
        store.load("s", model=model)


@pytest.mark.parametrize("encrypted", [False, True])
def test_state_for_another_model_is_refused(tmp_path, model, encrypted):
    store = SessionStore(tmp_path, password="pw" if encrypted else None, kdf_n=FAST_KDF)
    store.save("s", fed_state(model))
    other = memlm.build_model("deltanet-debug")
    with pytest.raises(UserError, match="another model"):
        store.load("s", model=other)
    if encrypted:  # named before any key is derived: even a wrong password gets the model message
        with pytest.raises(UserError, match="another model"):
            SessionStore(tmp_path, password="nope", kdf_n=FAST_KDF).load("s", model=other)


def test_future_format_versions_are_refused(tmp_path, model):
    st = fed_state(model)
    tensors = {k: v.contiguous() for k, v in st.state_dict().items()}
    from safetensors.torch import save as st_save

    header = st.header() | {"format_version": 99}
    blob = st_save(tensors, metadata={HEADER_KEY: json.dumps(header)})
    store = SessionStore(tmp_path)
    store.write_file("plain", blob)
    with pytest.raises(UserError, match="version 99 is newer"):
        store.load("plain", model=model)
    with pytest.raises(UserError, match="version 99 is newer"):
        store.load("plain")
    # an envelope from a future memlm
    env = bytearray(encrypt_bytes(st.to_bytes(), "pw", n=FAST_KDF))
    h, off = read_envelope_header(bytes(env), "f")
    h["envelope_version"] = 7
    hb = json.dumps(h).encode()
    env = MAGIC + len(hb).to_bytes(4, "little") + hb + bytes(env[off:])
    with pytest.raises(UserError, match="envelope version 7, newer"):
        decrypt_bytes(env, "pw", "f")


def test_hostile_kdf_parameters_are_refused(model):
    env = encrypt_bytes(b"x" * 10, "pw", n=FAST_KDF)
    h, off = read_envelope_header(env, "f")
    h["kdf"]["n"] = 2 ** 30  # would need 1 TiB of memory
    hb = json.dumps(h).encode()
    with pytest.raises(UserError, match="unsupported KDF"):
        decrypt_bytes(MAGIC + len(hb).to_bytes(4, "little") + hb + env[off:], "pw", "f")


def test_no_pickle_anywhere():
    import memlm.inference.session as s_mod
    import memlm.inference.store as store_mod

    for mod in (store_mod, s_mod):
        with open(mod.__file__, encoding="utf-8") as f:
            src = f.read()
        assert "pickle" not in src.replace("No pickle", "") and "torch.load" not in src


def test_empty_password_refused(tmp_path):
    with pytest.raises(UserError, match="empty password"):
        SessionStore(tmp_path, password="")


# ------------------------------------------------------------------------------------------------ kill -9


def test_kill_9_during_saves_leaves_a_loadable_state(tmp_path, model):
    """A child saves two alternating ~1 MB states in a loop; SIGKILL right after it announces a write; the session
    must then load and equal one of the two states (never a torn mix, never an unreadable file). The child also
    checks that importing memlm with its sessions and store pulled in none of the `serve` extras."""
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    store_dir = tmp_path / "store"
    child = textwrap.dedent(f"""
        import sys, torch, memlm
        torch.set_num_threads(1)
        from memlm.inference.session import state_hash
        from memlm.inference.store import SessionStore
        # core memlm, sessions and plain stores need none of the serve extras
        assert not {{"fastapi", "uvicorn", "httpx", "cryptography"}} & set(sys.modules), sys.modules.keys()
        model = memlm.load_model({str(model_dir)!r})
        store = SessionStore({str(store_dir)!r})
        states = []
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                states.append(model(torch.randint(0, 256, (1, 2000), generator=g))[1])
        store.save("k", states[0])
        print("ready", *[state_hash(s) for s in states], flush=True)
        i = 0
        while True:
            print("writing", i, flush=True)
            store.save("k", states[i % 2], extra_header={{"turns": i}})
            i += 1
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        ready, *hashes = p.stdout.readline().split()
        assert ready == "ready" and len(hashes) == 2
        for _ in range(5):  # let a few saves complete, then kill in the middle of the next one
            assert p.stdout.readline().startswith("writing")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    loaded = SessionStore(store_dir).load("k", model=model)
    assert state_hash(loaded.state) in hashes and loaded.state.pos.item() == 2000
    assert SessionStore(store_dir).ids() == ["k"]  # a leftover temporary file is not a session


# ------------------------------------------------------------------------------------------------ manage + CLI


def test_fork_reset_delete(tmp_path, model):
    store = SessionStore(tmp_path)
    st = fed_state(model)
    store.save("a", st, transcript=[{"role": "user", "content": "hi"}])
    store.fork("a", "b")
    assert store.ids() == ["a", "b"]
    assert_states_equal(store.load("b", model=model).state, st)
    with pytest.raises(UserError, match="already exists"):
        store.fork("a", "b")
    store.reset("a")
    assert not store.exists("a") and store.ids() == ["b"]
    store.delete("b")
    assert store.ids() == []
    with pytest.raises(UserError, match="not found"):
        store.delete("b")


def test_memory_cli_over_the_store(tmp_path, model, capsys):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    store = SessionStore(tmp_path / "store")
    st = fed_state(model)
    store.save("chat1", st, extra_header={"turns": 3}, transcript=[{"role": "user", "content": "hi"}])
    S = ["--store", str(tmp_path / "store")]
    assert main(["memory", "list", *S]) == 0
    out = capsys.readouterr().out
    assert "chat1" in out and " 3 " in out
    assert main(["memory", "show", "chat1", *S, "--model", str(model_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["session"] == "chat1" and shown["tokens_seen"] == [37] and shown["turns"] == 3
    assert [r["kind"] for r in shown["layers"]] == ["attention", "attention"] and shown["fits_model"]
    assert all(r["bytes"] > 0 and r["norms"] for r in shown["layers"])
    assert main(["memory", "fork", "chat1", "chat2", *S]) == 0
    exported = tmp_path / "out.safetensors"
    assert main(["memory", "export", "chat2", str(exported), *S]) == 0
    assert_states_equal(ModelState.load(exported, model=model), st)  # the export is a plain state file
    assert main(["memory", "import", str(exported), "chat3", *S, "--model", str(model_dir)]) == 0
    assert main(["memory", "import", str(exported), "chat3", *S]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert main(["memory", "reset", "chat3", *S]) == 0
    assert main(["memory", "delete", "chat2", *S]) == 0
    assert SessionStore(tmp_path / "store").ids() == ["chat1"]
    assert main(["memory", "delete", "../x", *S]) == 2
    assert "invalid" in capsys.readouterr().err
    # the older file-based usage keeps working
    assert main(["memory", "show", str(exported), "--model", str(model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_seen"] == [37]
    assert main(["memory", "show", "chat1", *S, "--model", "deltanet-debug"]) == 2
    assert "another model" in capsys.readouterr().err


def test_memory_cli_encrypted(tmp_path, model, capsys, monkeypatch):
    store = SessionStore(tmp_path, password="pw")
    store.save("e", fed_state(model), extra_header={"turns": 2})
    assert main(["memory", "show", "e", "--store", str(tmp_path)]) == 2
    assert "give --password" in capsys.readouterr().err
    monkeypatch.setenv("MEMLM_PASSWORD", "pw")
    assert main(["memory", "show", "e", "--store", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["encrypted"] is True
    monkeypatch.setenv("MEMLM_PASSWORD", "bad")
    assert main(["memory", "show", "e", "--store", str(tmp_path)]) == 2
    assert "wrong password" in capsys.readouterr().err
    assert main(["memory", "list", "--store", str(tmp_path)]) == 0  # listing needs no password
    assert "yes" in capsys.readouterr().out
