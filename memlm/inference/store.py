"""Session store: one directory per session id holding its memory state and transcript, optionally encrypted.

Layout (STORE defaults to ``$MEMLM_HOME/sessions``, else ``~/.memlm/sessions``)::

    STORE/<session id>/state.safetensors      memory state: safetensors + JSON header (see below)
    STORE/<session id>/transcript.jsonl       one JSON object per message
    STORE/<session id>/state.safetensors.enc  the same two files, encrypted (when the store has a password)
    STORE/<session id>/transcript.jsonl.enc

The state file is exactly a ``ModelState`` file (``ModelState.load`` / ``memlm generate --state`` read it) with
extra tensors ``cms.<parameter>`` (the session's online-learned CMS weight deltas) and extra header keys:
``session_id``, ``created``, ``updated``, ``turns``, ``mode``, ``learning``, ``controller`` (the decoding controller's
state), ``cms_buffer`` (conversation ids not yet learned from). The ModelState header already carries the format
version, the model config hash, layer kinds and tokens seen; loading refuses a future version or another model
with one clear line.

Encryption (when a password is given): every file is an envelope

    b"MEMLMENC" | u32 little-endian n | n bytes of JSON header | AES-256-GCM ciphertext ‖ 16-byte tag

with the key derived by scrypt (n = 2^15, r = 8, p = 1 by default; the parameters are in the header) from the
password and a random 16-byte salt, and a random 12-byte nonce. A new salt and nonces are drawn on every save (the
state and transcript of one save share the salt, never a nonce). Everything before the ciphertext is the AEAD's
associated data, so the header cannot be altered either. The clear header reveals only the envelope version, the
model config hash (so a wrong model is named before any key is derived) and the KDF parameters. A wrong password,
a modified byte or a truncated file fail authentication: a clear ``UserError``, and nothing is overwritten.

Writes are atomic (temporary file in the same folder, fsync, rename, fsync of the folder): a crash or a kill -9
during a save leaves the previous file complete. The state is written before the transcript; the state is the
authority (its ``turns`` counter says how many turns it has absorbed). No pickle anywhere: tensors are safetensors,
everything else JSON.

Session ids must match ``[A-Za-z0-9_-]{1,64}``, so no id can name a path outside the store.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from memlm.errors import UserError
from memlm.io import atomic_write_bytes

__all__ = [
    "DEFAULT_SCRYPT_N",
    "ENVELOPE_VERSION",
    "SESSION_ID_RE",
    "SessionStore",
    "StoredSession",
    "decrypt_bytes",
    "default_store_dir",
    "encrypt_bytes",
    "is_encrypted",
    "password_from_env",
    "validate_session_id",
]

SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
STATE_FILE = "state.safetensors"
TRANSCRIPT_FILE = "transcript.jsonl"
ENC_SUFFIX = ".enc"
MAGIC = b"MEMLMENC"
ENVELOPE_VERSION = 1
DEFAULT_SCRYPT_N = 2 ** 15  # ≈ 32 MiB and ~0.1 s per derivation: slows guessing, not chatting
_MAX_SCRYPT_N = 2 ** 20  # a crafted header must not make us allocate gigabytes
_MAX_HEADER = 1 << 16
PASSWORD_ENV = "MEMLM_PASSWORD"


def validate_session_id(session_id: Any, where: str = "session id") -> str:
    """Return ``session_id`` if it matches ``[A-Za-z0-9_-]{1,64}``; else raise UserError (names what was wrong)."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        shown = repr(session_id)[:80]
        raise UserError(f"{where} {shown} is invalid: use 1-64 characters from A-Z a-z 0-9 _ -")
    return session_id


def default_store_dir() -> Path:
    home = os.environ.get("MEMLM_HOME")
    return (Path(home) if home else Path.home() / ".memlm") / "sessions"


def password_from_env(password: str | None) -> str | None:
    """The password given, else $MEMLM_PASSWORD, else None (there is no default password)."""
    if password is None:
        password = os.environ.get(PASSWORD_ENV) or None
    if password is not None and not password:
        raise UserError("an empty password is not allowed")
    return password


# ------------------------------------------------------------------------------------------------ encryption


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: Any, what: str, where: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError):
        raise UserError(f"{where}: corrupt encrypted file (bad {what})") from None


def _crypto():
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError:
        raise UserError("encrypted sessions need the 'cryptography' package: pip install 'memlm[serve]'") from None
    return AESGCM, Scrypt, InvalidTag


class _KeyMaker:
    """Derives keys; remembers the last derivation so one save (or load) of two files runs scrypt once."""

    def __init__(self, password: str, n: int) -> None:
        self.password = password.encode("utf-8")
        self.n = n
        self._cache: tuple[tuple, bytes] | None = None

    def key(self, salt: bytes, n: int, r: int, p: int) -> bytes:
        ident = (salt, n, r, p)
        if self._cache is not None and self._cache[0] == ident:
            return self._cache[1]
        _, Scrypt, _ = _crypto()
        k = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(self.password)
        self._cache = (ident, k)
        return k

    def fresh_salt(self) -> bytes:
        return os.urandom(16)


def is_encrypted(data: bytes) -> bool:
    return data[:len(MAGIC)] == MAGIC


def encrypt_bytes(plain: bytes, password: str, *, meta: dict | None = None, n: int = DEFAULT_SCRYPT_N,
                  _keys: _KeyMaker | None = None, _salt: bytes | None = None) -> bytes:
    """Seal ``plain`` in an envelope (see the module docstring); ``meta`` is stored in the clear, authenticated."""
    AESGCM, _, _ = _crypto()
    keys = _keys or _KeyMaker(password, n)
    salt = _salt or keys.fresh_salt()
    nonce = os.urandom(12)
    header = {"envelope_version": ENVELOPE_VERSION, "cipher": "AES-256-GCM",
              "kdf": {"name": "scrypt", "n": keys.n, "r": 8, "p": 1, "salt": _b64(salt)},
              "nonce": _b64(nonce), "meta": meta or {}}
    hb = json.dumps(header, sort_keys=True).encode("utf-8")
    prefix = MAGIC + struct.pack("<I", len(hb)) + hb
    ct = AESGCM(keys.key(salt, keys.n, 8, 1)).encrypt(nonce, plain, prefix)
    return prefix + ct


def read_envelope_header(data: bytes, where: str) -> tuple[dict, int]:
    """(clear header, offset of the ciphertext) of an envelope; UserError when it is not one, or is cut short."""
    if not is_encrypted(data):
        raise UserError(f"{where}: not an encrypted memlm file")
    if len(data) < len(MAGIC) + 4:
        raise UserError(f"{where}: encrypted file is truncated")
    (n,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > _MAX_HEADER or start + n > len(data):
        raise UserError(f"{where}: encrypted file is truncated or corrupt (header length {n})")
    try:
        header = json.loads(data[start:start + n])
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{where}: encrypted file is corrupt (unreadable header)")
    version = header.get("envelope_version")
    if not isinstance(version, int):
        raise UserError(f"{where}: encrypted file is corrupt (no envelope version)")
    if version > ENVELOPE_VERSION:
        raise UserError(f"{where}: encrypted with envelope version {version}, newer than this memlm supports "
                        f"({ENVELOPE_VERSION}); upgrade memlm")
    return header, start + n


def decrypt_bytes(data: bytes, password: str | None, where: str = "file", *,
                  _keys: _KeyMaker | None = None) -> bytes:
    """Open an envelope. Wrong password, any modified byte or a truncated file → UserError (one line)."""
    header, off = read_envelope_header(data, where)
    if password is None and _keys is None:
        raise UserError(f"{where} is encrypted: give --password or set ${PASSWORD_ENV}")
    AESGCM, _, InvalidTag = _crypto()
    kdf = header.get("kdf") or {}
    try:
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: encrypted file is corrupt (bad KDF parameters)") from None
    if kdf.get("name") != "scrypt" or n < 2 or n & (n - 1) or n > _MAX_SCRYPT_N or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise UserError(f"{where}: encrypted file has unsupported KDF parameters {kdf}")
    if header.get("cipher") != "AES-256-GCM":
        raise UserError(f"{where}: unsupported cipher {header.get('cipher')!r}")
    salt = _unb64(kdf.get("salt"), "salt", where)
    nonce = _unb64(header.get("nonce"), "nonce", where)
    if len(nonce) != 12 or len(salt) < 8:
        raise UserError(f"{where}: encrypted file is corrupt (bad salt or nonce)")
    if len(data) - off < 16:
        raise UserError(f"{where}: encrypted file is truncated")
    keys = _keys or _KeyMaker(password, n)
    try:
        return AESGCM(keys.key(salt, n, r, p)).decrypt(nonce, data[off:], data[:off])
    except InvalidTag:
        raise UserError(f"{where}: cannot decrypt — wrong password, or the file was modified or truncated") from None


# ------------------------------------------------------------------------------------------------ store


@dataclass
class StoredSession:
    """A loaded session: ``header`` (the state file's JSON header), ``state`` (a ModelState when loaded against a
    model, else None), ``tensors`` (every tensor of the state file by name), ``cms`` (CMS deltas by parameter name),
    ``transcript`` (list of message dicts), ``encrypted``."""

    header: dict
    tensors: dict[str, Tensor]
    state: Any = None
    cms: dict[str, Tensor] = field(default_factory=dict)
    transcript: list[dict] = field(default_factory=list)
    encrypted: bool = False


class SessionStore:
    """One directory per session id under ``root``; see the module docstring for layout and encryption.

    ``password``: encrypt every save, and decrypt on load (None: plain files; $MEMLM_PASSWORD is read by the CLI,
    not here). Loading an encrypted session without a password is a clear error; a plain session loads with or
    without one (its next save is then encrypted).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, password: str | None = None,
                 kdf_n: int = DEFAULT_SCRYPT_N) -> None:
        self.root = Path(root) if root is not None else default_store_dir()
        if password is not None and not password:
            raise UserError("an empty password is not allowed")
        if kdf_n < 2 or kdf_n & (kdf_n - 1) or kdf_n > _MAX_SCRYPT_N:
            raise ValueError(f"kdf_n={kdf_n} must be a power of two ≤ 2^20")
        self.password = password
        self.kdf_n = kdf_n

    @property
    def encrypted(self) -> bool:
        return self.password is not None

    def __repr__(self) -> str:
        return f"SessionStore({str(self.root)!r}, encrypted={self.encrypted})"

    # ------------------------------------------------------------------------------------------ paths
    def session_dir(self, session_id: str) -> Path:
        """``root/<id>`` for a valid id (a UserError otherwise); a symlinked session folder is refused."""
        validate_session_id(session_id)
        d = self.root / session_id
        if d.is_symlink():
            raise UserError(f"session {session_id!r}: {d} is a symbolic link; refusing to follow it")
        return d

    def _files(self, session_id: str) -> tuple[Path, Path, bool] | None:
        """(state file, transcript file, encrypted?) of an existing session, else None."""
        d = self.session_dir(session_id)
        plain, enc = d / STATE_FILE, d / (STATE_FILE + ENC_SUFFIX)
        if enc.exists():
            return enc, d / (TRANSCRIPT_FILE + ENC_SUFFIX), True
        if plain.exists():
            return plain, d / TRANSCRIPT_FILE, False
        return None

    def exists(self, session_id: str) -> bool:
        return self._files(session_id) is not None

    def ids(self) -> list[str]:
        """Ids of the stored sessions (folders with a state file), sorted."""
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            if SESSION_ID_RE.fullmatch(d.name) and d.is_dir() and not d.is_symlink() and self.exists(d.name):
                out.append(d.name)
        return sorted(out)

    # ------------------------------------------------------------------------------------------- save
    def save(self, session_id: str, state, *, extra_header: dict | None = None,
             cms: dict[str, Tensor] | None = None, transcript: list[dict] | None = None) -> dict:
        """Write a session atomically: ``state`` (a ModelState) with ``cms`` deltas and ``extra_header``, then the
        ``transcript`` (None: leave the transcript file as it is). Returns the header written."""
        from safetensors.torch import save as st_save

        from memlm.models.state import HEADER_KEY

        d = self.session_dir(session_id)
        now = time.time()
        header = state.header() | (extra_header or {})
        if "created" not in header:  # the session normally passes its own; else keep the stored one
            header["created"] = (self._peek_header(session_id) or {}).get("created", now)
        header.update(session_id=session_id, updated=now)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.state_dict().items()}
        for name, t in (cms or {}).items():
            tensors[f"cms.{name}"] = t.detach().contiguous().cpu()
        blob = st_save(tensors, metadata={HEADER_KEY: json.dumps(header)})
        tx = None if transcript is None else "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in transcript)
        self._mkdir(d)
        if self.password is None:
            atomic_write_bytes(d / STATE_FILE, blob)
            if tx is not None:
                atomic_write_bytes(d / TRANSCRIPT_FILE, tx.encode("utf-8"))
            self._remove(d / (STATE_FILE + ENC_SUFFIX), d / (TRANSCRIPT_FILE + ENC_SUFFIX))
        else:
            keys = _KeyMaker(self.password, self.kdf_n)
            salt = keys.fresh_salt()  # one derivation per save; each file still gets its own random nonce
            meta = {"format_version": header.get("format_version"), "config_hash": header.get("config_hash")}
            atomic_write_bytes(d / (STATE_FILE + ENC_SUFFIX),
                               encrypt_bytes(blob, self.password, meta=meta, _keys=keys, _salt=salt))
            if tx is not None:
                atomic_write_bytes(d / (TRANSCRIPT_FILE + ENC_SUFFIX),
                                   encrypt_bytes(tx.encode("utf-8"), self.password, meta={"kind": "transcript"},
                                                 _keys=keys, _salt=salt))
            self._remove(d / STATE_FILE, d / TRANSCRIPT_FILE)  # no plaintext copy survives an upgrade
        return header

    def _mkdir(self, d: Path) -> None:
        """Create the store and a session folder readable by the owner only (files are 0600 already)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        d.mkdir(exist_ok=True, mode=0o700)

    @staticmethod
    def _remove(*paths: Path) -> None:
        for p in paths:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _peek_header(self, session_id: str) -> dict | None:
        """The stored header if it can be read cheaply (plain file), else None."""
        files = self._files(session_id)
        if files is None or files[2]:
            return None
        try:
            from memlm.models.state import ModelState

            return ModelState.read_header(files[0].read_bytes(), str(files[0]))
        except (UserError, OSError):
            return None

    # ------------------------------------------------------------------------------------------- load
    def read_bytes(self, session_id: str, *, model=None) -> tuple[bytes, bytes | None, bool]:
        """(plain state bytes, plain transcript bytes or None, encrypted?) — decrypting as needed.

        With ``model``, an encrypted file made for another model is refused before any key is derived."""
        files = self._files(session_id)
        if files is None:
            raise UserError(f"session {session_id!r} not found in {self.root}")
        state_path, tx_path, enc = files
        data = _read(state_path)
        tx = _read(tx_path) if tx_path.exists() else None
        if not enc:
            return data, tx, False
        header, _ = read_envelope_header(data, str(state_path))
        meta = header.get("meta") or {}
        fv = meta.get("format_version")
        from memlm.models.state import FORMAT_VERSION

        if isinstance(fv, int) and fv > FORMAT_VERSION:
            raise UserError(f"{state_path}: state format version {fv} is newer than this memlm supports "
                            f"({FORMAT_VERSION}); upgrade memlm")
        if model is not None and meta.get("config_hash") not in (None, model._config_hash):
            raise UserError(f"{state_path}: state was saved for another model (config hash {meta.get('config_hash')}, "
                            f"this model has {model._config_hash})")
        if self.password is None:
            raise UserError(f"session {session_id!r} is encrypted: give --password or set ${PASSWORD_ENV}")
        keys = _KeyMaker(self.password, self.kdf_n)
        plain = decrypt_bytes(data, self.password, str(state_path), _keys=keys)
        if tx is not None:
            tx = decrypt_bytes(tx, self.password, str(tx_path), _keys=keys)
        return plain, tx, True

    def load(self, session_id: str, *, model=None, device=None) -> StoredSession:
        """Read a session (validated against ``model`` when given: its ModelState is then in ``.state``)."""
        from safetensors.torch import load as st_load

        from memlm.models.state import ModelState

        plain, tx, enc = self.read_bytes(session_id, model=model)
        where = f"session {session_id!r}"
        header = ModelState.read_header(plain, where)
        state = None
        if model is not None:
            state = ModelState.from_bytes(plain, model=model, where=where, device=device)
        else:
            version = header.get("format_version")
            if not isinstance(version, int) or version > _state_format():
                raise UserError(f"{where}: state format version {version} is newer than this memlm supports "
                                f"({_state_format()}); upgrade memlm")
        try:
            tensors = st_load(plain)
        except Exception as e:  # noqa: BLE001 — safetensors raises several types on corrupt data
            raise UserError(f"{where}: corrupt state file ({e})") from None
        cms = {k[len("cms."):]: v for k, v in tensors.items() if k.startswith("cms.")}
        return StoredSession(header=header, tensors=tensors, state=state, cms=cms,
                             transcript=_parse_transcript(tx, where), encrypted=enc)

    def info(self, session_id: str, *, decrypt: bool = True) -> dict:
        """A summary readable without the password: id, encrypted, bytes, modified; plus the header when plain (or,
        with ``decrypt``, when the store's password opens it — one key derivation per encrypted session)."""
        from memlm.models.state import ModelState

        files = self._files(session_id)
        if files is None:
            raise UserError(f"session {session_id!r} not found in {self.root}")
        state_path, _, enc = files
        st = state_path.stat()
        out = {"id": session_id, "encrypted": enc, "bytes": st.st_size, "modified": st.st_mtime}
        if not enc or (decrypt and self.password is not None):
            try:
                data = _read(state_path)
                if enc:
                    data = decrypt_bytes(data, self.password, str(state_path), _keys=_KeyMaker(self.password, self.kdf_n))
                out["header"] = ModelState.read_header(data, str(state_path))
            except UserError as e:
                out["error"] = str(e)
        return out

    # --------------------------------------------------------------------------------------- manage
    def delete(self, session_id: str) -> None:
        d = self.session_dir(session_id)
        if not d.exists():
            raise UserError(f"session {session_id!r} not found in {self.root}")
        trash = d.with_name(f".{session_id}.deleting")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(d, trash)  # the id disappears at once; a crash mid-removal leaves only a hidden folder
        shutil.rmtree(trash, ignore_errors=True)

    def reset(self, session_id: str) -> None:
        """Forget a session's memory and transcript (the next load starts fresh)."""
        files = self._files(session_id)
        if files is None:
            raise UserError(f"session {session_id!r} not found in {self.root}")
        self._remove(files[0], files[1])

    def fork(self, src: str, dst: str) -> None:
        """Copy session ``src`` to a new id ``dst`` (byte copy: an encrypted session stays encrypted)."""
        s, d = self.session_dir(src), self.session_dir(dst)
        if not self.exists(src):
            raise UserError(f"session {src!r} not found in {self.root}")
        if d.exists():
            raise UserError(f"session {dst!r} already exists in {self.root}")
        tmp = d.with_name(f".{dst}.forking")
        if tmp.exists():
            shutil.rmtree(tmp)
        self._mkdir(tmp)
        for f in s.iterdir():
            if f.is_file() and not f.name.startswith("."):  # skip temporary files of an interrupted save
                atomic_write_bytes(tmp / f.name, f.read_bytes())
        os.replace(tmp, d)

    def write_file(self, session_id: str, plain_state: bytes, transcript: bytes | None = None) -> None:
        """Store already-serialised state bytes (and transcript) under ``session_id`` (import), encrypting when the
        store has a password."""
        d = self.session_dir(session_id)
        self._mkdir(d)
        if self.password is None:
            atomic_write_bytes(d / STATE_FILE, plain_state)
            if transcript is not None:
                atomic_write_bytes(d / TRANSCRIPT_FILE, transcript)
            self._remove(d / (STATE_FILE + ENC_SUFFIX), d / (TRANSCRIPT_FILE + ENC_SUFFIX))
            return
        from memlm.models.state import ModelState

        h = ModelState.read_header(plain_state, "state")
        keys = _KeyMaker(self.password, self.kdf_n)
        salt = keys.fresh_salt()
        meta = {"format_version": h.get("format_version"), "config_hash": h.get("config_hash")}
        atomic_write_bytes(d / (STATE_FILE + ENC_SUFFIX),
                           encrypt_bytes(plain_state, self.password, meta=meta, _keys=keys, _salt=salt))
        if transcript is not None:
            atomic_write_bytes(d / (TRANSCRIPT_FILE + ENC_SUFFIX),
                               encrypt_bytes(transcript, self.password, meta={"kind": "transcript"}, _keys=keys,
                                             _salt=salt))
        self._remove(d / STATE_FILE, d / TRANSCRIPT_FILE)


def _state_format() -> int:
    from memlm.models.state import FORMAT_VERSION

    return FORMAT_VERSION


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _parse_transcript(data: bytes | None, where: str) -> list[dict]:
    if not data:
        return []
    out = []
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except ValueError:
            raise UserError(f"{where}: transcript line {i} is not valid JSON") from None
        if isinstance(m, dict):
            out.append(m)
    return out
