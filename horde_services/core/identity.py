"""Who is speaking: public identities, signers, and the key files that hold their secrets.

Validators and miners are Bittensor hotkeys (sr25519, or ed25519 where an operator chose it),
loaded from btcli wallet files so operators keep using the keys they already registered.
Executors and clients are plain Ed25519 keys (pynacl) kept in Horde's own key files.

The canonical text form of an identity is ``"<key_type>:<64 lowercase hex>"``. It names the
signature scheme as well as the key: a 32-byte public key alone does not say whether it is an
sr25519 (Ristretto) or an ed25519 (Edwards) point, and guessing would let one key be checked
under the wrong scheme.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable

# `bittensor.sp_core` re-exports this binding (bittensor's own key primitives); importing it
# directly spares every CLI start and service the 0.6 s import of the whole bittensor SDK.
import bittensor_core as sp_core
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "KEY_FILE_VERSION",
    "KEY_TYPES",
    "SS58_FORMAT",
    "Ed25519Signer",
    "HotkeySigner",
    "Identity",
    "KeyFileError",
    "KeyFileKind",
    "KeyFileSigner",
    "KeyType",
    "Signer",
    "create_key_file",
    "load_key_file",
    "load_wallet_hotkey",
    "write_key_file",
]


def _log() -> Any:
    """The module's logger, with structlog imported on first use: a client that imports this
    module for its signer skips structlog's import (about 0.1 s, rich included)."""
    import structlog

    return structlog.get_logger(__name__)


KeyType = Literal["sr25519", "ed25519"]
KEY_TYPES: Final[tuple[KeyType, ...]] = ("sr25519", "ed25519")
KeyFileKind = Literal["ed25519", "hotkey"]

# Bittensor (and every generic Substrate chain) uses address format 42 ("5...").
SS58_FORMAT: Final = 42
KEY_FILE_VERSION: Final = 1
DEFAULT_WALLET_PATH: Final = "~/.bittensor/wallets"

_PUBLIC_KEY_LEN: Final = 32
_SEED_LEN: Final = 32
_SIGNATURE_LEN: Final = 64
_IDENTITY_RE: Final = re.compile(r"(sr25519|ed25519):([0-9a-f]{64})")
# bittensor_core's crypto type codes (the same numbers the chain's MultiSignature uses).
_CRYPTO_CODE: Final[dict[KeyType, int]] = {
    "ed25519": int(sp_core.CRYPTO_ED25519),
    "sr25519": int(sp_core.CRYPTO_SR25519),
}
_KEY_TYPE_OF_CODE: Final[dict[int, KeyType]] = {v: k for k, v in _CRYPTO_CODE.items()}
# Polkadot.js extensions sign ``<Bytes>m</Bytes>`` instead of ``m``; bittensor's verify accepts
# either. Horde signatures must cover exactly the bytes we were given (see Identity.verify).
_WRAP_PREFIX: Final = b"<Bytes>"
_WRAP_SUFFIX: Final = b"</Bytes>"


def _check_key_type(value: object) -> KeyType:
    if value == "sr25519":
        return "sr25519"
    if value == "ed25519":
        return "ed25519"
    raise ValueError(f"unknown key type {value!r}: expected one of {', '.join(KEY_TYPES)}")


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A public key together with the signature scheme it is used with."""

    key_type: KeyType
    public_key: bytes

    def __post_init__(self) -> None:
        _check_key_type(self.key_type)
        if not isinstance(self.public_key, bytes):
            raise TypeError(f"public_key must be bytes, not {type(self.public_key).__name__}")
        if len(self.public_key) != _PUBLIC_KEY_LEN:
            raise ValueError(
                f"public_key must be {_PUBLIC_KEY_LEN} bytes, got {len(self.public_key)}"
            )

    def __str__(self) -> str:
        return f"{self.key_type}:{self.public_key.hex()}"

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse the canonical ``"<key_type>:<64 lowercase hex>"`` form.

        Strict on purpose (no uppercase, no ``0x``, no whitespace): identity strings are used as
        keys in allow-lists and databases, so each identity must have exactly one spelling.
        """
        match = _IDENTITY_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"invalid identity {text!r}: expected '<sr25519|ed25519>:<64 lowercase hex>'"
            )
        return cls(_check_key_type(match.group(1)), bytes.fromhex(match.group(2)))

    @classmethod
    def from_ss58(cls, address: str, key_type: KeyType = "sr25519") -> Identity:
        """The identity behind an SS58 address.

        The address does not record the scheme (chain accounts are bare 32-byte ids), so the
        caller says which one; hotkeys are sr25519 unless the operator created an ed25519 one.
        Any network prefix is accepted; :attr:`ss58` always renders format 42.
        """
        try:
            public_key = bytes(sp_core.ss58_decode(address))
        except (ValueError, TypeError) as error:
            raise ValueError(f"invalid SS58 address {address!r}: {error}") from None
        return cls(_check_key_type(key_type), public_key)

    @cached_property
    def ss58(self) -> str:
        """SS58 address (format 42), as the chain and btcli show this key."""
        return str(sp_core.ss58_encode(self.public_key, SS58_FORMAT))

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's signature over exactly ``message``.

        Never raises for a bad, malformed or wrong-length signature: authentication code treats
        every failure the same way, and an exception path would be one more thing to get wrong.
        """
        if not isinstance(signature, bytes | bytearray | memoryview) or not isinstance(
            message, bytes | bytearray | memoryview
        ):
            return False
        signature = bytes(signature)
        message = bytes(message)
        if len(signature) != _SIGNATURE_LEN:
            return False
        if self.key_type == "ed25519":
            # pynacl is strict RFC 8032 verification of exactly these bytes.
            try:
                VerifyKey(self.public_key).verify(message, signature)
            except (BadSignatureError, ValueError, TypeError):
                return False
            return True
        return self._verify_sr25519(message, signature)

    def _verify_sr25519(self, message: bytes, signature: bytes) -> bool:
        try:
            if not bool(sp_core.verify(message, signature, self.ss58, _CRYPTO_CODE["sr25519"])):
                return False
            # bittensor also accepts a signature over ``<Bytes>message</Bytes>`` (what browser
            # extensions produce). Such a signature was made for some other purpose, so reject
            # it: a signature over the wrapped form verifies the wrapped form directly, while a
            # signature over the bare message does not.
            wrapped = _WRAP_PREFIX + message + _WRAP_SUFFIX
            return not bool(sp_core.verify(wrapped, signature, self.ss58, _CRYPTO_CODE["sr25519"]))
        except Exception:  # the Rust binding raises ValueError and friends; all mean "invalid"
            return False


# --------------------------------------------------------------------------------------------
# Signers
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Signer(Protocol):
    """Anything that signs as an :class:`Identity` (a key in memory, later maybe an HSM)."""

    @property
    def identity(self) -> Identity: ...

    def sign(self, message: bytes) -> bytes: ...


class Ed25519Signer:
    """An Ed25519 key held by pynacl: the key type of executors and clients."""

    def __init__(self, signing_key: SigningKey) -> None:
        self._key = signing_key
        self._identity = Identity("ed25519", bytes(signing_key.verify_key))

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        if not isinstance(seed, bytes) or len(seed) != _SEED_LEN:
            raise ValueError(f"an Ed25519 seed is {_SEED_LEN} bytes")
        return cls(SigningKey(seed))

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed (what a key file stores)."""
        return bytes(self._key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self._key.sign(bytes(message)).signature)

    def __repr__(self) -> str:  # never show secrets
        return f"Ed25519Signer({self._identity})"


class HotkeySigner:
    """A Bittensor hotkey (sr25519 or ed25519) held by a ``bittensor`` Keypair.

    Validators and miners sign with these so the identity they present is the hotkey they
    registered on chain. ``keypair`` is exposed because it is also what ``bittensor`` needs to
    sign extrinsics (see ``horde_services.core.chain.BittensorChain``).
    """

    def __init__(self, keypair: Any) -> None:
        code = int(keypair.crypto_type)
        if code not in _KEY_TYPE_OF_CODE:
            raise ValueError(f"unsupported bittensor crypto type {code}")
        self._keypair = keypair
        self._identity = Identity(_KEY_TYPE_OF_CODE[code], bytes(keypair.public_key))

    @classmethod
    def generate(cls, key_type: KeyType = "sr25519", *, words: int = 12) -> HotkeySigner:
        """A fresh hotkey from a new mnemonic (recoverable the way btcli keys are)."""
        mnemonic = str(sp_core.Keypair.generate_mnemonic(words))
        return cls.from_mnemonic(mnemonic, key_type)

    @classmethod
    def from_mnemonic(cls, mnemonic: str, key_type: KeyType = "sr25519") -> HotkeySigner:
        return cls(
            sp_core.Keypair.create_from_mnemonic(mnemonic, _CRYPTO_CODE[_check_key_type(key_type)])
        )

    @classmethod
    def from_seed(cls, seed: bytes, key_type: KeyType = "sr25519") -> HotkeySigner:
        if not isinstance(seed, bytes) or len(seed) != _SEED_LEN:
            raise ValueError(f"a hotkey seed is {_SEED_LEN} bytes")
        return cls(sp_core.Keypair.create_from_seed(seed, _CRYPTO_CODE[_check_key_type(key_type)]))

    @classmethod
    def from_uri(cls, uri: str, key_type: KeyType = "sr25519") -> HotkeySigner:
        """From a secret URI such as ``//Alice`` (dev keys) or ``<mnemonic>//hard/soft``."""
        return cls(sp_core.Keypair.create_from_uri(uri, _CRYPTO_CODE[_check_key_type(key_type)]))

    @classmethod
    def from_private_key(cls, private_key: bytes, key_type: KeyType = "sr25519") -> HotkeySigner:
        """From a raw private key (64-byte sr25519 secret, or a 32-byte ed25519 seed)."""
        return cls(
            sp_core.Keypair.create_from_private_key(
                "0x" + private_key.hex(), _CRYPTO_CODE[_check_key_type(key_type)]
            )
        )

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def keypair(self) -> Any:
        return self._keypair

    @property
    def ss58(self) -> str:
        return str(self._keypair.ss58_address)

    def sign(self, message: bytes) -> bytes:
        return bytes(self._keypair.sign(bytes(message)))

    def _secrets(self) -> dict[str, Any]:
        # The binding exposes a keypair's secrets only through btcli's keyfile serialisation.
        data = json.loads(bytes(sp_core.serialized_keypair_to_keyfile_data(self._keypair)))
        if not isinstance(data, dict):
            raise ValueError("bittensor returned a malformed keypair serialisation")
        return data

    def __repr__(self) -> str:  # never show secrets
        return f"HotkeySigner({self._identity}, ss58={self.ss58})"


KeyFileSigner: TypeAlias = Ed25519Signer | HotkeySigner


# --------------------------------------------------------------------------------------------
# Key files
# --------------------------------------------------------------------------------------------


class KeyFileError(ValueError):
    """A key file (Horde's or a btcli wallet's) is missing, unreadable or malformed."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"key file {self.path}: {problem}")


def _hex_field(data: dict[str, Any], name: str, path: Path, length: int) -> bytes:
    value = data.get(name)
    if not isinstance(value, str):
        raise KeyFileError(path, f"field {name!r} must be a hex string")
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise KeyFileError(path, f"field {name!r} is not valid hex") from None
    if len(raw) != length:
        raise KeyFileError(path, f"field {name!r} must be {length} bytes, got {len(raw)}")
    return raw


def _key_file_document(signer: KeyFileSigner) -> dict[str, Any]:
    identity = signer.identity
    doc: dict[str, Any] = {
        "version": KEY_FILE_VERSION,
        "kind": "ed25519" if isinstance(signer, Ed25519Signer) else "hotkey",
        "key_type": identity.key_type,
        "identity": str(identity),
        "ss58": identity.ss58,
    }
    if isinstance(signer, Ed25519Signer):
        doc["secret_seed"] = signer.seed.hex()
        return doc
    secrets = signer._secrets()
    # Prefer the mnemonic (what an operator can write down and re-import with btcli), then the
    # seed; a URI-derived sr25519 key has neither, only its expanded private key.
    if isinstance(secrets.get("secretPhrase"), str) and secrets["secretPhrase"]:
        doc["mnemonic"] = secrets["secretPhrase"]
    elif isinstance(secrets.get("secretSeed"), str) and secrets["secretSeed"]:
        doc["secret_seed"] = secrets["secretSeed"].removeprefix("0x")
    elif isinstance(secrets.get("privateKey"), str) and secrets["privateKey"]:
        doc["private_key"] = secrets["privateKey"].removeprefix("0x")
    else:
        raise ValueError(f"{signer!r} carries no exportable secret")
    return doc


def _fsync_dir(directory: Path) -> None:
    # Best effort: makes the rename durable on POSIX; some filesystems refuse O_RDONLY dirs.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_key_file(
    path: str | os.PathLike[str], signer: KeyFileSigner, *, overwrite: bool = False
) -> Path:
    """Write ``signer``'s secret to ``path`` as a version-1 Horde key file.

    The file is written to a temporary sibling with mode 0600 and moved into place, so a
    reader never sees a half-written key and the secret is never briefly world-readable.
    Without ``overwrite`` an existing file is never replaced: the final step is a hard link,
    which fails atomically if the name exists (no check-then-write race).
    """
    target = Path(path).expanduser()
    if not isinstance(signer, Ed25519Signer | HotkeySigner):
        raise TypeError(f"cannot write a key file for {type(signer).__name__}")
    payload = (json.dumps(_key_file_document(signer), indent=2) + "\n").encode()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if target.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing key file {target}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, 0o600)  # mkstemp already uses 0600; be explicit about the contract
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise FileExistsError(f"refusing to overwrite existing key file {target}") from None
            except OSError:
                # Filesystems without hard links: fall back to check-then-rename (racy only
                # against a concurrent writer of the same key file).
                if target.exists():
                    raise FileExistsError(
                        f"refusing to overwrite existing key file {target}"
                    ) from None
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    _log().info("key_file.written", path=str(target), identity=str(signer.identity))
    return target


def create_key_file(
    path: str | os.PathLike[str],
    kind: KeyFileKind = "ed25519",
    *,
    key_type: KeyType = "sr25519",
    overwrite: bool = False,
) -> KeyFileSigner:
    """Generate a new key of ``kind`` and write it to ``path``; returns its signer.

    ``key_type`` only applies to ``kind="hotkey"`` (an ``ed25519`` key file is always ed25519).
    """
    signer: KeyFileSigner
    if kind == "ed25519":
        signer = Ed25519Signer.generate()
    elif kind == "hotkey":
        signer = HotkeySigner.generate(key_type)
    else:
        raise ValueError(f"unknown key file kind {kind!r}: expected 'ed25519' or 'hotkey'")
    write_key_file(path, signer, overwrite=overwrite)
    return signer


def load_key_file(path: str | os.PathLike[str]) -> KeyFileSigner:
    """Load a Horde key file, checking the stored identity matches the secret."""
    source = Path(path).expanduser()
    try:
        info = source.stat()
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(source, "does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(source, "is a directory, not a key file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(source, f"cannot be read: {error}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Warn rather than refuse: secret mounts (e.g. Kubernetes) are often 0644 by default.
        _log().warning(
            "key_file.permissive_mode", path=str(source), mode=oct(stat.S_IMODE(info.st_mode))
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise KeyFileError(source, f"is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise KeyFileError(source, "must contain a JSON object")
    if data.get("version") != KEY_FILE_VERSION:
        raise KeyFileError(
            source, f"unsupported version {data.get('version')!r} (expected {KEY_FILE_VERSION})"
        )
    kind = data.get("kind")
    signer: KeyFileSigner
    if kind == "ed25519":
        signer = Ed25519Signer.from_seed(_hex_field(data, "secret_seed", source, _SEED_LEN))
    elif kind == "hotkey":
        try:
            key_type = _check_key_type(data.get("key_type"))
        except ValueError as error:
            raise KeyFileError(source, f"field 'key_type': {error}") from None
        signer = _hotkey_from_document(data, key_type, source)
    else:
        raise KeyFileError(source, f"field 'kind' must be 'ed25519' or 'hotkey', got {kind!r}")
    stored = data.get("identity")
    if stored is not None and stored != str(signer.identity):
        raise KeyFileError(
            source,
            f"field 'identity' is {stored!r} but the secret belongs to {signer.identity}",
        )
    return signer


def _hotkey_from_document(data: dict[str, Any], key_type: KeyType, path: Path) -> HotkeySigner:
    try:
        if "mnemonic" in data:
            mnemonic = data["mnemonic"]
            if not isinstance(mnemonic, str) or not mnemonic.strip():
                raise KeyFileError(path, "field 'mnemonic' must be a non-empty string")
            return HotkeySigner.from_mnemonic(mnemonic, key_type)
        if "secret_seed" in data:
            return HotkeySigner.from_seed(
                _hex_field(data, "secret_seed", path, _SEED_LEN), key_type
            )
        if "private_key" in data:
            length = 64 if key_type == "sr25519" else _SEED_LEN
            return HotkeySigner.from_private_key(
                _hex_field(data, "private_key", path, length), key_type
            )
    except KeyFileError:
        raise
    except Exception as error:  # the binding raises ValueError/custom errors for bad secrets
        raise KeyFileError(path, f"secret is invalid: {error}") from None
    raise KeyFileError(path, "has no secret: expected 'mnemonic', 'secret_seed' or 'private_key'")


def load_wallet_hotkey(
    wallet_name: str,
    hotkey_name: str,
    wallet_path: str | os.PathLike[str] = DEFAULT_WALLET_PATH,
    *,
    password: str | None = None,
) -> HotkeySigner:
    """Load a btcli wallet hotkey (``<wallet_path>/<wallet>/hotkeys/<hotkey>``).

    Reads through ``bittensor``'s own wallet/keyfile code so every format btcli writes is
    understood. Hotkeys are normally unencrypted; an encrypted one needs ``password`` (or the
    ``BT_PW_...`` environment variable btcli uses). This never prompts: it runs in daemons.
    """
    root = Path(wallet_path).expanduser()
    from bittensor.wallet import Wallet  # the SDK proper, only for btcli wallets

    wallet = Wallet(wallet_name, hotkey_name, path=str(root))
    keyfile = wallet.hotkey_file
    location = Path(keyfile.path)
    if not keyfile.exists_on_device():
        raise KeyFileError(location, f"hotkey {hotkey_name!r} of wallet {wallet_name!r} not found")
    try:
        if keyfile.is_encrypted() and password is None:
            password = sp_core.get_password_from_environment(keyfile.env_var_name())
            if not password:
                raise KeyFileError(
                    location,
                    f"hotkey is encrypted: pass password= or set {keyfile.env_var_name()}",
                )
        keypair = keyfile.get_keypair(password)
    except KeyFileError:
        raise
    except Exception as error:  # bad JSON, wrong password, unreadable: all name the file
        raise KeyFileError(location, f"cannot load hotkey: {error}") from None
    signer = HotkeySigner(keypair)
    _log().info("wallet_hotkey.loaded", path=str(location), identity=str(signer.identity))
    return signer
