"""Bundles that are edited, swapped or unsigned, and thread counts past the machine (issue 20):
the strict manifest schema, the graph I/O check at session open, signatures, thread bounds."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from badinputs.harness import Call, Env, Q, ask, case
from badinputs.cases_core import build, edit_manifest, tampered

from pcbedge.bundle.signing import VERIFY_KEY_ENV, generate_keys, sign_bundle


def field(edit: Callable[[dict], None], names: tuple[str, ...],
          src: str = "export") -> Callable[[Env], Call]:
    """A case: ``ask`` with a copy of the export (or built bundle) whose manifest ``edit``
    changed; the hashes stay right, only the schema can refuse it."""
    return tampered(lambda b, env: edit_manifest(b, edit), names, src=src)


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        m[last] = value
    return edit


# --- the schema: types, ranges, required fields -------------------------------------------

case("ask-bundle-input-size-zero", "BundleError", field(
    _set("input_size", 0), ("'input_size' = 0", "from 16 to 4096")))
case("ask-bundle-input-size-negative", "BundleError", field(
    _set("input_size", -128), ("'input_size' = -128", "from 16 to 4096")))
case("ask-bundle-input-size-string", "BundleError", field(
    _set("input_size", "640"), ("'input_size' = '640'", "an integer")))
case("ask-bundle-input-size-huge", "BundleError", field(
    _set("input_size", 100000), ("'input_size' = 100000", "4096")))
case("ask-bundle-input-size-off-stride", "BundleError", field(
    _set("input_size", 100), ("'input_size' = 100", "a multiple of 32")))
case("ask-bundle-arch-list", "BundleError", field(
    _set("target.arch", ["x86_64"]), ("'target.arch' = ['x86_64']", "a non-empty string"),
    src="built"))
case("ask-bundle-arch-deleted", "BundleError", field(
    lambda m: m["target"].pop("arch"), ("'target.arch' is missing",), src="built"))
case("ask-bundle-target-deleted", "BundleError", field(
    lambda m: m.pop("target"), ("'target' is missing", "built for a target"), src="built"))
case("ask-bundle-grammar-empty", "BundleError", field(
    _set("answer.grammar", {}), ("'answer.grammar.kind' is missing", "pcbvlm-pointer-v3")))
case("ask-bundle-threads-huge", "BundleError", field(
    _set("runtime.threads", 100000), ("'runtime.threads' = 100000", "from 1 to 256"),
    src="built"))
case("ask-bundle-max-text-len-zero", "BundleError", field(
    _set("max_text_len", 0), ("'max_text_len' = 0", "from 1 to")))
case("ask-bundle-max-text-len-no-room", "BundleError", field(
    _set("max_text_len", 49), ("'max_text_len' = 49", "at least 51")))
case("ask-bundle-runtime-unknown-key", "BundleError", field(
    _set("runtime.thread", 2), ("'runtime.thread' is not a known field", "threads")))
case("ask-bundle-schema-version-zero", "BundleError", field(
    _set("schema_version", 0), ("schema_version 0", "older than version 1", "export and build")))
case("ask-bundle-future-pcbedge", "BundleError", field(
    _set("tools.pcbedge", "99.0.0"), ("pcbedge 99.0.0", "tools.pcbedge", "upgrade pcbedge")))


@case("ask-bundle-step-graph-as-prefill", "BundleError")
def _(env: Env) -> Call:
    """The step graph copied over the prefill graph, its hash updated in the manifest."""
    def swap(b: Path, env: Env) -> None:
        shutil.copyfile(b / "decoder_step.onnx", b / "decoder_prefill.onnx")
        edit_manifest(b, lambda m: None, rehash=True)
    return tampered(swap, ("decoder_prefill.onnx", "not its 'decoder_prefill' graph",
                           "input_ids"))(env)


# --- thread counts ------------------------------------------------------------------------

case("ask-threads-1000", "TargetError", lambda env: Call(
    ask(env, *env.pair(), Q, "--threads", "1000"),
    ("threads=1000", f"{len(os.sched_getaffinity(0))} CPU core(s)", "--threads")))


@case("bench-threads-1000", "TargetError")
def _(env: Env) -> Call:
    out = env.tmp / "bench-out"
    return Call(["bench", str(env.export), "--threads", "1000", "--out", str(out)],
                ("threads=1000", "CPU core(s)"), absent=(out,))


# --- signatures ---------------------------------------------------------------------------

def keys(env: Env, name: str = "keys") -> tuple[Path, Path]:
    return generate_keys(env.tmp / name)


def signed_copy(env: Env, private: Path) -> Path:
    b = env.bundle_copy(env.built)
    sign_bundle(b, private)
    return b


@case("ask-unsigned-bundle-verification-mandatory", "BundleError")
def _(env: Env) -> Call:
    _, public = keys(env)
    os.environ[VERIFY_KEY_ENV] = str(public)    # the device setting (CliRunner: this process)
    env.defer(lambda: os.environ.pop(VERIFY_KEY_ENV, None))
    return Call(ask(env, *env.pair(), bundle=env.built),
                ("not signed by the trusted key", "no manifest.sig", VERIFY_KEY_ENV))


@case("ask-tampered-rehashed-verify", "BundleError")
def _(env: Env) -> Call:
    """A signed bundle's vision graph replaced (here by the export's FP32 one) and its hash
    updated in the manifest: every hash matches, the signature does not."""
    private, public = keys(env)
    b = signed_copy(env, private)
    shutil.copyfile(env.export / "vision.onnx", b / "vision.onnx")
    edit_manifest(b, lambda m: None, rehash=True)
    return Call(ask(env, *env.pair(), Q, "--verify", public, bundle=b),
                ("not signed by the trusted key", "manifest.json changed after it was signed"))


@case("ask-wrong-public-key", "BundleError")
def _(env: Env) -> Call:
    private, _ = keys(env)
    _, other = keys(env, "other-keys")
    b = signed_copy(env, private)
    return Call(ask(env, *env.pair(), Q, "--verify", other, bundle=b),
                ("not signed by the trusted key", "signed by another key"))


@case("ask-verify-with-private-key", "BundleError")
def _(env: Env) -> Call:
    private, _ = keys(env)
    return Call(ask(env, *env.pair(), Q, "--verify", private, bundle=signed_copy(env, private)),
                ("sign_key.pem", "is a private key", "verify_key.pem"))


@case("bench-unsigned-bundle-verify", "BundleError")
def _(env: Env) -> Call:
    _, public = keys(env)
    out = env.tmp / "bench-out"
    return Call(["bench", str(env.built), "--verify", str(public), "--out", str(out)],
                ("not signed by the trusted key", "no manifest.sig"), absent=(out,))


@case("build-sign-key-missing", "BundleError")
def _(env: Env) -> Call:
    out = env.tmp / "out"
    return Call(build(env, "--sign", str(env.tmp / "nope.pem")), ("nope.pem", "not found"),
                absent=(out,))


@case("build-require-signature-unsigned", "TargetError")
def _(env: Env) -> Call:
    from badinputs.cases_core import profile
    path = profile(env, lambda t: t + "\n[security]\nrequire_signature = true\n")
    out = env.tmp / "out"
    return Call(build(env, target=path), ("requires signed bundles", "--sign"), absent=(out,))
