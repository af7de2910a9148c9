"""Signed bundles: an Ed25519 signature over ``manifest.json``, with the keys outside the bundle.

The manifest lists the sha256 of every file of the bundle, so signing its exact bytes covers
the graphs, the tokenizer and the assets too: a graph swapped and its hash updated in the
manifest ("tampered and rehashed") breaks the signature. The signature is ``manifest.sig``
beside the manifest (it signs the manifest, so the manifest cannot list it):

    {"scheme": "ed25519", "key_id": "<16 hex>", "signed_file": "manifest.json",
     "manifest_sha256": "<hex>", "signature": "<base64 of 64 bytes>"}

over ``CONTEXT + manifest bytes`` (the context keeps a pcbedge key from vouching for anything
else it might be asked to sign). Keys are PEM files made by ``pcbedge keygen`` (or openssl
``genpkey -algorithm ed25519``); an encrypted private key reads its passphrase from
``PCBEDGE_SIGN_PASSPHRASE``.

Who must verify: a key given for one bundle (``ask --verify``, :func:`trusting`), and every
bundle this process opens once ``PCBEDGE_VERIFY_KEY=/path/verify_key.pem`` is set (the device
setting). A bundle built for a target whose profile says ``[security] require_signature =
true`` also refuses to run without a trusted key (a guard against mistakes, not attackers: the
environment variable is what an attacker who can write the bundle cannot change).

``cryptography`` (the ``[sign]`` extra) is imported only to sign or verify.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pcbedge.bundle.manifest import MANIFEST, SIGNATURE
from pcbedge.errors import BundleError, DependencyError, OutputError

SCHEME = "ed25519"
CONTEXT = b"pcbedge-manifest-v1\0"
VERIFY_KEY_ENV = "PCBEDGE_VERIFY_KEY"
PASSPHRASE_ENV = "PCBEDGE_SIGN_PASSPHRASE"
PRIVATE_NAME, PUBLIC_NAME = "sign_key.pem", "verify_key.pem"
NOT_TRUSTED = "is not signed by the trusted key"
_SIG_KEYS = ("scheme", "key_id", "signed_file", "manifest_sha256", "signature")


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise DependencyError("signing or verifying a bundle needs the cryptography package, "
                              "which is not installed",
                              fix="pip install 'pcbedge[sign]'") from None
    return serialization, ed25519, InvalidSignature


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key and where it came from."""

    key: Any
    path: Path
    key_id: str


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key, where it came from (a path, or the environment variable)."""

    key: Any
    source: str
    key_id: str


def key_id_of(public_key) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- keys ---------------------------------------------------------------------------------

def generate_keys(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new key pair into ``out_dir``: ``sign_key.pem`` (private, mode 0600: keep it on
    the build machine) and ``verify_key.pem`` (public: copy it to the devices). Refuses to
    replace existing key files (a lost private key cannot be recovered)."""
    from pcbedge.bundle.atomic import atomic_path, atomic_write_bytes

    serialization, ed25519, _ = _crypto()
    out_dir = Path(out_dir)
    private, public = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder", fix="pass a folder for the keys")
    existing = [p.name for p in (private, public) if p.exists()]
    if existing:
        raise OutputError(f"{out_dir} already holds {', '.join(existing)}",
                          fix="choose another --out folder; pcbedge never replaces a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with atomic_path(private) as tmp:
        os.chmod(tmp, 0o600)   # before the secret is written, so it is never world-readable
        tmp.write_bytes(pem)
    atomic_write_bytes(public, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _read_pem(path: Path, what: str, source: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{what} {path} ({source}) not found",
                          fix=f"pass the {PRIVATE_NAME if 'signing' in what else PUBLIC_NAME} "
                              "written by pcbedge keygen") from None
    except OSError as e:
        raise BundleError(f"{what} {path} ({source}) cannot be read: {e.strerror or e}",
                          fix="check the path and its permissions") from None


def load_signing_key(path: str | Path) -> SigningKey:
    """The Ed25519 private key of a PEM file (``--sign``)."""
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    data = _read_pem(path, "signing key", "--sign")
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise BundleError(f"signing key {path} is a public key",
                          fix=f"--sign takes the private key ({PRIVATE_NAME}); the public "
                              f"key ({PUBLIC_NAME}) goes to the devices")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(
            data, password=passphrase.encode() if passphrase else None)
    except TypeError:   # encrypted without a passphrase, or a passphrase for a plain key
        raise BundleError(f"signing key {path} is encrypted and {PASSPHRASE_ENV} is not set"
                          if not passphrase else f"signing key {path} is not encrypted, but "
                          f"{PASSPHRASE_ENV} is set",
                          fix=f"set {PASSPHRASE_ENV} to the key's passphrase" if not passphrase
                          else f"unset {PASSPHRASE_ENV}") from None
    except ValueError as e:
        raise BundleError(f"signing key {path} is not a readable PEM private key ({e})",
                          fix=f"pass the {PRIVATE_NAME} written by pcbedge keygen (a wrong "
                              f"{PASSPHRASE_ENV} reads as this too)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"signing key {path} is a {type(key).__name__}, not an Ed25519 key",
                          fix="make one with pcbedge keygen (or openssl genpkey -algorithm "
                              "ed25519)")
    return SigningKey(key, path, key_id_of(key.public_key()))


def load_verify_key(path: str | Path, source: str = "--verify") -> VerifyKey:
    """The Ed25519 public key of a PEM file (``--verify`` or ``PCBEDGE_VERIFY_KEY``)."""
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    data = _read_pem(path, "verify key", source)
    if b"PRIVATE KEY" in data:
        raise BundleError(f"verify key {path} ({source}) is a private key",
                          fix=f"pass the public key ({PUBLIC_NAME}); never copy the private "
                              "key to a device")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise BundleError(f"verify key {path} ({source}) is not a readable PEM public key ({e})",
                          fix=f"pass the {PUBLIC_NAME} written by pcbedge keygen") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"verify key {path} ({source}) is a {type(key).__name__}, not an "
                          "Ed25519 key", fix=f"pass the {PUBLIC_NAME} written by pcbedge keygen")
    return VerifyKey(key, f"{path}, from {source}", key_id_of(key))


# --- signing ------------------------------------------------------------------------------

def signature_record(manifest_bytes: bytes, key: SigningKey) -> dict:
    """The ``manifest.sig`` content for these exact manifest bytes."""
    sig = key.key.sign(CONTEXT + manifest_bytes)
    return {"scheme": SCHEME, "key_id": key.key_id, "signed_file": MANIFEST,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "signature": base64.b64encode(sig).decode("ascii")}


def write_signature(folder: str | Path, manifest_bytes: bytes, key: SigningKey) -> Path:
    """Write ``folder/manifest.sig`` (atomically) for ``manifest_bytes``. A build calls it in
    its staging folder, so the signature is in place before the manifest is revealed."""
    from pcbedge.bundle.atomic import atomic_write_json
    path = Path(folder) / SIGNATURE
    atomic_write_json(path, signature_record(manifest_bytes, key))
    return path


def sign_bundle(bundle_dir: str | Path, key: SigningKey | str | Path) -> Path:
    """Sign an existing bundle (an export, or one built elsewhere): its manifest is validated
    and every file checked against its hash first, so only an intact bundle gets signed."""
    from pcbedge.bundle.manifest import read_manifest_bytes, verify_files
    key = key if isinstance(key, SigningKey) else load_signing_key(key)
    manifest, data = read_manifest_bytes(bundle_dir)
    verify_files(bundle_dir, manifest)
    return write_signature(bundle_dir, data, key)


# --- verifying ----------------------------------------------------------------------------

def read_signature(bundle_dir: Path, key: VerifyKey) -> dict:
    """``manifest.sig`` of a bundle; BundleError (not trusted by ``key``) when absent or
    malformed."""
    path = bundle_dir / SIGNATURE
    trusted = f"{NOT_TRUSTED} ({key.key_id} in {key.source})"
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir} {trusted}: it has no {SIGNATURE}",
                          fix="sign it (pcbedge build --sign KEY, or pcbedge sign), or run a "
                              "bundle signed with the trusted key")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(rec, dict) and set(_SIG_KEYS) <= set(rec) and rec["scheme"] == SCHEME
              and rec["signed_file"] == MANIFEST and isinstance(rec["signature"], str))
        sig = base64.b64decode(rec["signature"], validate=True) if ok else b""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, binascii.Error):
        ok, sig = False, b""
    if not ok or len(sig) != 64:
        raise BundleError(f"bundle {bundle_dir} {trusted}: its {SIGNATURE} is not a pcbedge "
                          f"{SCHEME} signature of {MANIFEST}",
                          fix="sign the bundle again with the trusted key")
    return {**rec, "signature": sig}


def verify_signature(bundle_dir: str | Path, manifest_bytes: bytes, key: VerifyKey) -> dict:
    """Check ``manifest.sig`` against ``manifest_bytes`` (the bytes the caller parsed) and the
    trusted ``key``; its record, or BundleError saying why the bundle is not trusted."""
    _, _, InvalidSignature = _crypto()
    bundle_dir = Path(bundle_dir)
    rec = read_signature(bundle_dir, key)
    try:
        key.key.verify(rec["signature"], CONTEXT + manifest_bytes)
        return rec
    except InvalidSignature:
        pass
    if rec["key_id"] != key.key_id:
        why = f"it is signed by another key, {rec['key_id']}"
    elif rec["manifest_sha256"] != hashlib.sha256(manifest_bytes).hexdigest():
        why = f"its {MANIFEST} changed after it was signed"
    else:
        why = "the signature does not verify: it is forged or corrupt"
    raise BundleError(f"bundle {bundle_dir} {NOT_TRUSTED} ({key.key_id} in {key.source}): "
                      f"{why}",
                      fix="run the bundle as signed by its builder (copy it again from the "
                          "source), or build and sign it again with the trusted key")


def check_signed(bundle_dir: str | Path, key: VerifyKey | str | Path) -> dict:
    """Early check of a bundle's signature (its files are checked when it opens); the
    signature record, or BundleError."""
    from pcbedge.bundle.manifest import read_manifest_bytes
    key = key if isinstance(key, VerifyKey) else load_verify_key(key)
    _, data = read_manifest_bytes(bundle_dir)
    return verify_signature(bundle_dir, data, key)


def is_signed(bundle_dir: str | Path) -> bool:
    return (Path(bundle_dir) / SIGNATURE).is_file()


# --- who must verify ----------------------------------------------------------------------

# (bundle folder or None for every bundle, key) given by the caller, innermost last
_GIVEN: contextvars.ContextVar[tuple] = contextvars.ContextVar("pcbedge_trusted_keys",
                                                               default=())


@contextlib.contextmanager
def trusting(key: VerifyKey | str | Path | None, bundle: str | Path | None = None
             ) -> Iterator[VerifyKey | None]:
    """Within the block, ``bundle`` (every bundle when None) opens only if signed by ``key``
    (a VerifyKey or a PEM path; None: no change). ``ask --verify KEY`` wraps its loading."""
    if key is None:
        yield None
        return
    key = key if isinstance(key, VerifyKey) else load_verify_key(key)
    scope = Path(bundle).resolve() if bundle is not None else None
    token = _GIVEN.set(_GIVEN.get() + ((scope, key),))
    try:
        yield key
    finally:
        _GIVEN.reset(token)


def requires_signature(manifest: dict) -> bool:
    """The bundle's target profile said ``[security] require_signature = true``."""
    target = manifest.get("target")
    security = target.get("security") if isinstance(target, dict) else None
    return isinstance(security, dict) and security.get("require_signature") is True


def trusted_keys(bundle_dir: str | Path, manifest: dict) -> tuple[VerifyKey, ...]:
    """The keys ``bundle_dir`` must be signed with: those given for it (:func:`trusting`) and
    the device's (``PCBEDGE_VERIFY_KEY``). BundleError when its target requires a signature
    and no key is set; ``()`` when nothing requires one."""
    where = Path(bundle_dir).resolve()
    keys = [k for scope, k in _GIVEN.get() if scope is None or scope == where]
    env = os.environ.get(VERIFY_KEY_ENV, "").strip()
    if env:
        keys.append(load_verify_key(env, source=VERIFY_KEY_ENV))
    if not keys and requires_signature(manifest):
        raise BundleError(f"bundle {bundle_dir} must be verified (its target profile says "
                          "[security] require_signature = true), but no trusted key is set",
                          fix=f"pass --verify {PUBLIC_NAME}, or set {VERIFY_KEY_ENV}="
                              f"/path/to/{PUBLIC_NAME} on this device")
    unique = {k.key_id: k for k in keys}
    return tuple(unique.values())


def check_trust(bundle_dir: str | Path, manifest_bytes: bytes, manifest: dict) -> bool:
    """Verify the signature of the manifest ``manifest_bytes`` (parsed as ``manifest``) with
    every key :func:`trusted_keys` names; True when at least one was checked."""
    keys = trusted_keys(bundle_dir, manifest)
    for key in keys:
        verify_signature(bundle_dir, manifest_bytes, key)
    return bool(keys)
