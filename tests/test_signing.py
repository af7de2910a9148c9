"""Signed bundles (pcbedge.bundle.signing): keys, signing at build time, verification given
per bundle (--verify) or made mandatory on a device (PCBEDGE_VERIFY_KEY, [security]
require_signature), and the tampered-and-rehashed bundle it exists to refuse (issue 20)."""
from __future__ import annotations

import base64
import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcbedge.bundle import signing
from pcbedge.bundle.manifest import list_files, read_manifest, verify_files
from pcbedge.bundle.signing import (VERIFY_KEY_ENV, check_signed, generate_keys,
                                    load_signing_key, load_verify_key, sign_bundle, trusting)
from pcbedge.cli import cli
from pcbedge.errors import BundleError, DependencyError, OutputError, TargetError
from pcbedge.testing import tiny_bundle, write_pair_images

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("cryptography", reason="signing needs the [sign] extra")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture
def signed(export, keys, tmp_path) -> Path:
    b = Path(shutil.copytree(export, tmp_path / "signed"))
    sign_bundle(b, keys[0])
    return b


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(VERIFY_KEY_ENV, raising=False)


def swap_vision_and_rehash(bundle: Path) -> None:
    """The attack: a vision graph whose convolution weights are all zero (every region scores
    the same, so the answer no longer depends on the board), its hash written into the
    manifest."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper
    model = onnx.load(str(bundle / "vision.onnx"))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0, t.name))
    onnx.save(model, str(bundle / "vision.onnx"))
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = list_files(bundle)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


# --- keys ---------------------------------------------------------------------------------

def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    private, public = generate_keys(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_signing_key(private).key_id == load_verify_key(public).key_id
    with pytest.raises(OutputError, match="already holds sign_key.pem"):
        generate_keys(tmp_path / "k")
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["sign_key.pem",
                                                                  "verify_key.pem"]


def test_keygen_command(tmp_path):
    result = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert "sign_key.pem" in result.output and "verify_key.pem" in result.output
    again = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "k")])
    assert again.exit_code == OutputError.exit_code


def test_bad_key_files_are_named(keys, tmp_path, monkeypatch):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    private, public = keys
    with pytest.raises(BundleError, match="nope.pem .*not found"):
        load_verify_key(tmp_path / "nope.pem")
    with pytest.raises(BundleError, match="is a private key"):
        load_verify_key(private)
    with pytest.raises(BundleError, match="is a public key"):
        load_signing_key(public)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(BundleError, match="junk.pem .*not a readable PEM public key"):
        load_verify_key(tmp_path / "junk.pem")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(BundleError, match="not an Ed25519 key"):
        load_verify_key(tmp_path / "ec.pem")
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "enc.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret")))
    monkeypatch.delenv(signing.PASSPHRASE_ENV, raising=False)
    with pytest.raises(BundleError, match="is encrypted and PCBEDGE_SIGN_PASSPHRASE"):
        load_signing_key(tmp_path / "enc.pem")
    monkeypatch.setenv(signing.PASSPHRASE_ENV, "wrong")
    with pytest.raises(BundleError, match="not a readable PEM private key"):
        load_signing_key(tmp_path / "enc.pem")
    monkeypatch.setenv(signing.PASSPHRASE_ENV, "s3cret")
    assert load_signing_key(tmp_path / "enc.pem").key_id


def test_missing_cryptography_is_a_dependency_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cryptography", None)
    monkeypatch.setitem(sys.modules, "cryptography.exceptions", None)
    with pytest.raises(DependencyError, match=r"(?s)cryptography.*pcbedge\[sign\]"):
        generate_keys(tmp_path / "k")


# --- signing and verifying ----------------------------------------------------------------

def test_signature_covers_the_manifest_and_is_not_listed_in_it(signed, keys):
    rec = check_signed(signed, keys[1])
    assert rec["scheme"] == "ed25519" and rec["key_id"] == load_verify_key(keys[1]).key_id
    m = read_manifest(signed)
    assert "manifest.sig" not in m["files"] and "manifest.sig" not in list_files(signed)
    verify_files(signed, m)     # an unlisted signature is fine


def test_tampered_and_rehashed_bundle_runs_unverified_but_not_verified(
        signed, keys, tmp_path, no_env, monkeypatch):
    """The issue's attack: every hash matches, so only the signature can tell."""
    from pcbedge.runtime import load_runner
    swap_vision_and_rehash(signed)
    verify_files(signed, read_manifest(signed))           # the hashes agree
    test, temp = write_pair_images(tmp_path)
    assert load_runner(signed).ask(test, temp, "where are the defects?")["answer"]   # unverified
    with pytest.raises(BundleError, match="manifest.json changed after it was signed"):
        check_signed(signed, keys[1])
    with trusting(keys[1], signed), pytest.raises(BundleError,
                                                  match="not signed by the trusted key"):
        load_runner(signed)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(keys[1]))
    with pytest.raises(BundleError, match="not signed by the trusted key"):
        load_runner(signed)


def test_a_signed_bundle_runs_under_each_way_of_trusting(signed, keys, tmp_path, no_env,
                                                         monkeypatch):
    from pcbedge.runtime import load_runner
    with trusting(keys[1], signed):
        assert load_runner(signed).sessions
    with trusting(keys[1]):     # every bundle in the block
        assert load_runner(signed).sessions
    monkeypatch.setenv(VERIFY_KEY_ENV, str(keys[1]))
    assert load_runner(signed).sessions
    test, temp = write_pair_images(tmp_path)
    result = CliRunner().invoke(cli, ["ask", str(signed), "--image", str(test), "--template",
                                      str(temp), "--verify", str(keys[1]), "where?"])
    assert result.exit_code == 0, result.output


def test_wrong_key_forged_and_malformed_signatures(signed, keys, other_keys, no_env):
    with pytest.raises(BundleError, match="signed by another key"):
        check_signed(signed, other_keys[1])
    sig_path = signed / "manifest.sig"
    rec = json.loads(sig_path.read_text())
    raw = bytearray(base64.b64decode(rec["signature"]))
    raw[0] ^= 1
    sig_path.write_text(json.dumps({**rec, "signature": base64.b64encode(raw).decode()}))
    with pytest.raises(BundleError, match="forged or corrupt"):
        check_signed(signed, keys[1])
    for bad in ("{", json.dumps({**rec, "scheme": "rsa"}), json.dumps({**rec, "signature": "!"})):
        sig_path.write_text(bad)
        with pytest.raises(BundleError, match="is not a pcbedge ed25519 signature"):
            check_signed(signed, keys[1])
    sig_path.unlink()
    with pytest.raises(BundleError, match="not signed by the trusted key.*no manifest.sig"):
        check_signed(signed, keys[1])


def test_verification_is_scoped_to_the_bundle_it_was_given_for(signed, export, keys, no_env):
    """bench --verify checks the bundle, not its unsigned FP32 reference."""
    from pcbedge.runtime import load_runner
    with trusting(keys[1], signed):
        assert load_runner(export).sessions


def test_the_device_setting_covers_runners_that_read_the_manifest_themselves(
        signed, export, keys, monkeypatch, tmp_path):
    """open_sessions checks the trust again for a manifest it did not read (a family whose
    runner reads the manifest and calls open_sessions itself, as tests/toyfamily does)."""
    from pcbedge.runtime.sessions import open_sessions
    monkeypatch.setenv(VERIFY_KEY_ENV, str(keys[1]))
    m = read_manifest(export)
    with pytest.raises(BundleError, match="no manifest.sig"):
        open_sessions(export, m)
    assert open_sessions(signed, read_manifest(signed)).sessions
    m = read_manifest(signed)
    m["input_size"] = 96        # in memory, not what was signed
    with pytest.raises(BundleError, match="is not its signed manifest.json"):
        open_sessions(signed, m)
    stage = Path(shutil.copytree(export, tmp_path / "stage"))
    (stage / "manifest.json").unlink()     # a staged bundle: its manifest is the caller's
    assert open_sessions(stage, read_manifest(export)).sessions


def test_env_key_that_is_missing_fails_closed(export, monkeypatch, tmp_path):
    from pcbedge.runtime import load_runner
    monkeypatch.setenv(VERIFY_KEY_ENV, str(tmp_path / "gone.pem"))
    with pytest.raises(BundleError, match="gone.pem .*PCBEDGE_VERIFY_KEY.*not found"):
        load_runner(export)


# --- build --sign and [security] require_signature ----------------------------------------

def secure_profile(tmp_path: Path) -> Path:
    text = (REPO / "pcbedge/targets/x86-cuda.toml").read_text().replace(
        'name = "x86-cuda"', 'name = "my-cuda"')
    path = tmp_path / "my-cuda.toml"
    path.write_text(text + "\n[security]\nrequire_signature = true\n")
    return path


def test_build_sign_writes_the_signature_inside_the_published_bundle(export, keys, tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(cli, ["build", "--target", "x86-cuda", "--export", str(export),
                                      "--out", str(out), "--sign", str(keys[0])])
    assert result.exit_code == 0, result.output
    assert check_signed(out, keys[1])["manifest_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]     # no staging left


def test_build_refuses_a_bad_key_before_any_work(export, tmp_path):
    from pcbedge.recipes.build import build_bundle
    with pytest.raises(BundleError, match="nope.pem .*not found"):
        build_bundle("x86-cuda", export, tmp_path / "b", sign_key=tmp_path / "nope.pem",
                     progress=False)
    assert not (tmp_path / "b").exists()


def test_require_signature_profile(export, keys, tmp_path, no_env):
    from pcbedge.recipes.build import build_bundle
    from pcbedge.runtime import load_runner
    profile = secure_profile(tmp_path)
    with pytest.raises(TargetError, match="requires signed bundles"):
        build_bundle(profile, export, tmp_path / "b", progress=False)
    out = build_bundle(profile, export, tmp_path / "b", sign_key=keys[0], progress=False)
    assert read_manifest(out)["target"]["security"] == {"require_signature": True}
    cpu = {"providers": ["CPUExecutionProvider"]}   # x86-cuda's graphs, on this CPU
    with pytest.raises(BundleError, match="must be verified.*no trusted key is set"):
        load_runner(out, **cpu)
    with trusting(keys[1], out):
        assert load_runner(out, **cpu).sessions
    (out / "manifest.sig").unlink()
    with trusting(keys[1], out), pytest.raises(BundleError, match="no manifest.sig"):
        load_runner(out, **cpu)


def test_sign_command_signs_an_existing_bundle_only_when_intact(export, keys, tmp_path):
    b = Path(shutil.copytree(export, tmp_path / "b"))
    result = CliRunner().invoke(cli, ["sign", str(b), "--key", str(keys[0])])
    assert result.exit_code == 0, result.output
    check_signed(b, keys[1])
    (b / "manifest.sig").unlink()
    with open(b / "vision.onnx", "ab") as f:
        f.write(b"\0")
    result = CliRunner().invoke(cli, ["sign", str(b), "--key", str(keys[0])])
    assert result.exit_code == BundleError.exit_code and "sha256" in result.output
    assert not (b / "manifest.sig").exists()


def test_verify_without_a_bundle_is_a_usage_error(keys, tmp_path):
    test, temp = write_pair_images(tmp_path)
    result = CliRunner().invoke(cli, ["ask", "--model", str(tmp_path), "--image", str(test),
                                      "--template", str(temp), "--verify", str(keys[1]), "q?"])
    assert result.exit_code == 2 and "--verify" in result.output
