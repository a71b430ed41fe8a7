"""Identities, signers, Horde key files and btcli wallet hotkeys."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from bittensor.sp_core import CRYPTO_ED25519, CRYPTO_SR25519, Keypair
from bittensor.wallet import Wallet
from hypothesis import given
from hypothesis import strategies as st

from horde_services.core.identity import (
    Ed25519Signer,
    HotkeySigner,
    Identity,
    KeyFileError,
    KeyType,
    Signer,
    create_key_file,
    load_key_file,
    load_wallet_hotkey,
    write_key_file,
)

# //Alice, the well-known Substrate dev key: an independent SS58 test vector.
ALICE_PUBLIC = bytes.fromhex("d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d")
ALICE_SS58 = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"

MESSAGE = b"horde/v1 Ping ts=1700000000 nonce=abc callee=ed25519:00"


def all_signers() -> list[Signer]:
    return [
        Ed25519Signer.generate(),
        HotkeySigner.generate("sr25519"),
        HotkeySigner.generate("ed25519"),
    ]


@pytest.fixture(params=["ed25519-nacl", "sr25519-hotkey", "ed25519-hotkey"])
def signer(request: pytest.FixtureRequest) -> Signer:
    if request.param == "ed25519-nacl":
        return Ed25519Signer.generate()
    return HotkeySigner.generate("sr25519" if request.param == "sr25519-hotkey" else "ed25519")


# ---- identity ----------------------------------------------------------------------------


def test_sign_and_verify(signer: Signer) -> None:
    signature = signer.sign(MESSAGE)
    assert len(signature) == 64
    assert signer.identity.verify(MESSAGE, signature)
    assert isinstance(signer, Signer)


def test_tampered_signature_message_or_key_is_rejected(signer: Signer) -> None:
    signature = signer.sign(MESSAGE)
    flipped = bytes([signature[0] ^ 0x01]) + signature[1:]
    assert not signer.identity.verify(MESSAGE, flipped)
    assert not signer.identity.verify(MESSAGE + b"!", signature)
    other: Signer = (
        Ed25519Signer.generate()
        if signer.identity.key_type == "ed25519"
        else HotkeySigner.generate("sr25519")
    )
    assert not other.identity.verify(MESSAGE, signature)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 63, b"\x00" * 65, b"\xff" * 64, "not bytes"])
def test_malformed_signatures_return_false_never_raise(signer: Signer, bad: object) -> None:
    assert signer.identity.verify(MESSAGE, bad) is False  # type: ignore[arg-type]


def test_scheme_is_part_of_the_identity() -> None:
    # The same 32 bytes under the other scheme must not verify.
    hotkey = HotkeySigner.generate("sr25519")
    signature = hotkey.sign(MESSAGE)
    as_ed = Identity("ed25519", hotkey.identity.public_key)
    assert not as_ed.verify(MESSAGE, signature)
    assert str(as_ed) != str(hotkey.identity)


def test_sr25519_rejects_browser_extension_wrapped_signatures() -> None:
    # bittensor's verify also accepts a signature over "<Bytes>m</Bytes>"; Horde must not.
    hotkey = HotkeySigner.generate("sr25519")
    wrapped = hotkey.sign(b"<Bytes>" + MESSAGE + b"</Bytes>")
    assert Keypair(public_key=hotkey.identity.public_key, crypto_type=CRYPTO_SR25519).verify(
        MESSAGE, wrapped
    )
    assert not hotkey.identity.verify(MESSAGE, wrapped)


def test_ss58_matches_known_vector_and_bittensor() -> None:
    alice = Identity("sr25519", ALICE_PUBLIC)
    assert alice.ss58 == ALICE_SS58
    assert Identity.from_ss58(ALICE_SS58) == alice
    assert Identity.from_ss58(ALICE_SS58, "ed25519").key_type == "ed25519"
    dev = HotkeySigner.from_uri("//Alice")
    assert dev.identity == alice and dev.ss58 == ALICE_SS58


@pytest.mark.parametrize("bad", ["", "xyz", ALICE_SS58[:-1] + "Z"])
def test_from_ss58_rejects_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid SS58"):
        Identity.from_ss58(bad)


@given(key_type=st.sampled_from(["sr25519", "ed25519"]), key=st.binary(min_size=32, max_size=32))
def test_str_parse_round_trip(key_type: KeyType, key: bytes) -> None:
    identity = Identity(key_type, key)
    text = str(identity)
    assert text == f"{key_type}:{key.hex()}"
    assert Identity.parse(text) == identity
    assert hash(Identity.parse(text)) == hash(identity)
    assert Identity.from_ss58(identity.ss58, key_type) == identity


@given(text=st.text(max_size=80))
def test_parse_rejects_garbage(text: str) -> None:
    try:
        identity = Identity.parse(text)
    except ValueError:
        return
    assert str(identity) == text  # anything accepted must be canonical


@pytest.mark.parametrize(
    "bad",
    [
        "sr25519:" + "AB" * 32,  # uppercase: not canonical
        "sr25519:0x" + "ab" * 31,
        "ecdsa:" + "ab" * 32,
        "sr25519:" + "ab" * 31,
        " sr25519:" + "ab" * 32,
        "sr25519" + "ab" * 32,
    ],
)
def test_parse_is_strict(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid identity"):
        Identity.parse(bad)


def test_identity_validates_fields() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Identity("sr25519", b"\x00" * 31)
    with pytest.raises(ValueError, match="unknown key type"):
        Identity("ecdsa", b"\x00" * 32)  # type: ignore[arg-type]


def test_ed25519_signer_and_hotkey_ed25519_agree_on_seed() -> None:
    seed = bytes(range(32))
    nacl_signer = Ed25519Signer.from_seed(seed)
    hotkey = HotkeySigner.from_seed(seed, "ed25519")
    assert nacl_signer.identity == hotkey.identity
    assert hotkey.identity.verify(MESSAGE, nacl_signer.sign(MESSAGE))
    assert "00010203" not in repr(nacl_signer)  # no secrets in reprs


# ---- key files ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", all_signers(), ids=["ed25519", "hotkey-sr25519", "hotkey-ed25519"])
def test_key_file_round_trip(tmp_path: Path, make: Signer) -> None:
    assert isinstance(make, Ed25519Signer | HotkeySigner)
    path = tmp_path / "keys" / "node.key"
    write_key_file(path, make)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_key_file(path)
    assert type(loaded) is type(make)
    assert loaded.identity == make.identity
    assert make.identity.verify(MESSAGE, loaded.sign(MESSAGE))

    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["identity"] == str(make.identity)
    assert doc["ss58"] == make.identity.ss58
    assert doc["key_type"] == make.identity.key_type
    if isinstance(make, Ed25519Signer):
        assert doc["kind"] == "ed25519" and len(bytes.fromhex(doc["secret_seed"])) == 32
    else:
        assert doc["kind"] == "hotkey" and len(doc["mnemonic"].split()) == 12
    assert not list(tmp_path.glob("keys/.*.tmp"))  # no temp files left behind


def test_hotkey_key_file_from_seed_and_uri(tmp_path: Path) -> None:
    by_seed = HotkeySigner.from_seed(b"\x07" * 32, "sr25519")
    write_key_file(tmp_path / "seed.key", by_seed)
    assert "secret_seed" in json.loads((tmp_path / "seed.key").read_text())
    assert load_key_file(tmp_path / "seed.key").identity == by_seed.identity

    by_uri = HotkeySigner.from_uri("//Bob")  # hard-derived: only the expanded key exists
    write_key_file(tmp_path / "uri.key", by_uri)
    assert "private_key" in json.loads((tmp_path / "uri.key").read_text())
    assert load_key_file(tmp_path / "uri.key").identity == by_uri.identity


def test_key_file_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = create_key_file(path)
    second = Ed25519Signer.generate()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_key_file(path, second)
    assert load_key_file(path).identity == first.identity
    write_key_file(path, second, overwrite=True)
    assert load_key_file(path).identity == second.identity
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_create_key_file_hotkey(tmp_path: Path) -> None:
    signer = create_key_file(tmp_path / "v.key", "hotkey", key_type="ed25519")
    assert isinstance(signer, HotkeySigner) and signer.identity.key_type == "ed25519"
    assert load_key_file(tmp_path / "v.key").identity == signer.identity


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    os.chmod(path, 0o600)
    return path


GOOD_SEED = "11" * 32


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"version": 2, "kind": "ed25519"}', "unsupported version 2"),
        ('{"version": 1, "kind": "rsa"}', "field 'kind'"),
        ('{"version": 1, "kind": "ed25519"}', "field 'secret_seed' must be a hex string"),
        ('{"version": 1, "kind": "ed25519", "secret_seed": "zz"}', "not valid hex"),
        ('{"version": 1, "kind": "ed25519", "secret_seed": "abcd"}', "must be 32 bytes"),
        ('{"version": 1, "kind": "hotkey", "key_type": "dsa"}', "field 'key_type'"),
        ('{"version": 1, "kind": "hotkey", "key_type": "sr25519"}', "has no secret"),
        (
            '{"version": 1, "kind": "hotkey", "key_type": "sr25519", "mnemonic": "a b c"}',
            "secret is invalid",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "kind": "ed25519",
                    "secret_seed": GOOD_SEED,
                    "identity": "ed25519:" + "00" * 32,
                }
            ),
            "field 'identity'",
        ),
    ],
)
def test_malformed_key_file_errors_name_path_and_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = _write(tmp_path / "bad.key", content)
    with pytest.raises(KeyFileError, match=problem) as caught:
        load_key_file(path)
    assert str(path) in str(caught.value)
    assert caught.value.path == path


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist") as caught:
        load_key_file(tmp_path / "nope.key")
    assert "nope.key" in str(caught.value)


# ---- btcli wallets -----------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["sr25519", "ed25519"])
def test_load_wallet_hotkey_written_by_bittensor(tmp_path: Path, key_type: KeyType) -> None:
    # bittensor creates wallets offline exactly as btcli does (`btcli wallet new_hotkey`).
    code = CRYPTO_SR25519 if key_type == "sr25519" else CRYPTO_ED25519
    wallet = Wallet("validator", "hk", path=str(tmp_path))
    wallet.create_new_hotkey(suppress=True, crypto_type=code)
    on_disk = json.loads((tmp_path / "validator" / "hotkeys" / "hk").read_text())
    assert {"secretPhrase", "secretSeed", "publicKey", "ss58Address"} <= set(on_disk)

    signer = load_wallet_hotkey("validator", "hk", tmp_path)
    assert signer.identity.key_type == key_type
    assert signer.ss58 == on_disk["ss58Address"] == signer.identity.ss58
    assert signer.identity.public_key.hex() == on_disk["publicKey"].removeprefix("0x")
    assert signer.identity.verify(MESSAGE, signer.sign(MESSAGE))

    # Exporting the wallet hotkey to a Horde key file keeps its mnemonic.
    write_key_file(tmp_path / "exported.key", signer)
    exported = json.loads((tmp_path / "exported.key").read_text())
    assert exported["mnemonic"] == on_disk["secretPhrase"]


def test_load_hand_written_legacy_btcli_hotkey(tmp_path: Path) -> None:
    # Older btcli versions wrote no "cryptoType" field: such files are sr25519.
    mnemonic = Keypair.generate_mnemonic(12)
    keypair = Keypair.create_from_mnemonic(mnemonic, CRYPTO_SR25519)
    hotkeys = tmp_path / "cold" / "hotkeys"
    hotkeys.mkdir(parents=True)
    (hotkeys / "default").write_text(
        json.dumps(
            {
                "accountId": "0x" + bytes(keypair.public_key).hex(),
                "publicKey": "0x" + bytes(keypair.public_key).hex(),
                "secretPhrase": mnemonic,
                "secretSeed": None,
                "ss58Address": keypair.ss58_address,
            }
        )
    )
    signer = load_wallet_hotkey("cold", "default", str(tmp_path))
    assert signer.identity == Identity("sr25519", bytes(keypair.public_key))


def test_load_wallet_hotkey_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found") as caught:
        load_wallet_hotkey("nope", "hk", tmp_path)
    assert str(tmp_path / "nope" / "hotkeys" / "hk") in str(caught.value)

    (tmp_path / "w" / "hotkeys").mkdir(parents=True)
    (tmp_path / "w" / "hotkeys" / "hk").write_text("{broken")
    with pytest.raises(KeyFileError, match="cannot load hotkey"):
        load_wallet_hotkey("w", "hk", tmp_path)


def test_encrypted_wallet_hotkey_needs_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = Wallet("enc", "hk", path=str(tmp_path))
    wallet.create_new_hotkey(suppress=True, use_password=True, hotkey_password="s3cret-pass")
    for name in list(os.environ):
        if name.startswith("BT_PW_"):
            monkeypatch.delenv(name)
    with pytest.raises(KeyFileError, match="encrypted"):
        load_wallet_hotkey("enc", "hk", tmp_path)
    signer = load_wallet_hotkey("enc", "hk", tmp_path, password="s3cret-pass")
    assert signer.ss58 == wallet.hotkeypub.ss58_address
