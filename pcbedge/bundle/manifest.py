"""The bundle manifest: the one file a runtime reads to know what a bundle holds.

Torch-free (the ONNX runner imports this module on device). ``onnx`` is used, when installed,
to check that no graph points its external data outside the bundle.
See docs/export.md for every field.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path, PurePosixPath

from pcbedge import __version__
from pcbedge.errors import BundleError
from pcbedge.bundle.atomic import PARTIAL_SUFFIX, atomic_write_json
from pcbedge.bundle.schema import Violation, validate_manifest

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MIN_SCHEMA_VERSION = 1   # the oldest manifest this pcbedge reads
KIND = "pcbedge-bundle"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"   # pcbedge.bundle.signing: signs manifest.json, so never listed in it
REQUIRED_FIELDS = (
    "schema_version", "kind", "family", "graphs", "kv_cache", "visual_tokens", "token_scores",
    "num_regions", "input_size", "preprocess", "tokenizer", "max_question_tokens",
    "max_text_len", "answer", "precision", "pruning", "runtime", "tools", "source_model",
    "files",
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def list_files(bundle_dir: str | Path) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "bytes"}}`` for every file but the manifest."""
    root = Path(bundle_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST, MANIFEST + PARTIAL_SUFFIX, SIGNATURE,
                                       SIGNATURE + PARTIAL_SUFFIX):
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_manifest(bundle_dir: str | Path, manifest: dict, *, partial: bool = False) -> Path:
    """Write ``manifest.json`` atomically (``partial``: as ``manifest.json.partial``, which
    :func:`pcbedge.bundle.atomic.publish` reveals as the last step of an export)."""
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise BundleError(f"manifest lacks the fields {missing}",
                          fix="build the manifest with pcbedge.export (this is a bug otherwise)")
    path = Path(bundle_dir) / (MANIFEST + (PARTIAL_SUFFIX if partial else ""))
    atomic_write_json(path, manifest)
    return path


def read_manifest(bundle_dir: str | Path) -> dict:
    """Read and validate a bundle's manifest; every problem is a BundleError with a fix."""
    return read_manifest_bytes(bundle_dir)[0]


def read_manifest_json(path: str | Path) -> dict:
    """``path/manifest.json`` as plain JSON ({} for a model folder): gate limits and reference
    are read before any runner is built. The runner itself validates and hash-checks it."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        return {}
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{f} is not valid JSON: {e}", fix="export or build it again") from None
    return m if isinstance(m, dict) else {}


def read_manifest_bytes(bundle_dir: str | Path) -> tuple[dict, bytes]:
    """The validated manifest and the exact bytes it was parsed from (what a signature signs:
    :mod:`pcbedge.bundle.signing` verifies these very bytes, never a second read)."""
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not path.is_file():
        interrupted = (root / (MANIFEST + PARTIAL_SUFFIX)).exists() or any(root.glob("*.onnx"))
        why = ("it holds graphs but no manifest: the export or build was interrupted"
               if root.is_dir() and interrupted else
               "folder not found" if not root.is_dir() else "no manifest.json")
        raise BundleError(f"bundle {root} is incomplete ({why})",
                          fix="export it again (pcbedge export) or pass a complete bundle")
    try:
        data = path.read_bytes()
        m = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}",
                          fix="the bundle is corrupt; export it again") from None
    check_manifest(m, root)
    return m, data


def check_manifest(m, root: str | Path) -> None:
    """Validate a parsed manifest (kind, versions, required fields, the schema of every core
    field, the rules between fields); ``root`` names the bundle in messages."""
    path = Path(root) / MANIFEST
    if not isinstance(m, dict):
        raise BundleError(f"{path} holds a {type(m).__name__}, not a JSON object",
                          fix="the bundle is corrupt; export it again")
    if m.get("kind") != KIND:
        raise BundleError(f"{path} has kind {m.get('kind')!r}, not {KIND!r}",
                          fix="pass a pcbedge bundle folder")
    check_versions(m, root)
    missing = [k for k in REQUIRED_FIELDS if k not in m]
    if missing:
        raise BundleError(f"{path} lacks the fields {missing}",
                          fix="the bundle is incomplete or corrupt; export it again")
    try:
        validate_manifest(m)
    except Violation as v:
        raise schema_error(root, v) from None


def check_versions(m: dict, root: str | Path) -> None:
    """Refuse a manifest older than this pcbedge reads, or made by a newer schema or pcbedge
    (a newer tool may write fields or graphs this one would misread)."""
    version = m.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{Path(root) / MANIFEST} has schema_version {version!r}, not an "
                          "integer", fix="the bundle is corrupt; export it again")
    if version > SCHEMA_VERSION:
        raise BundleError(f"bundle {root} has manifest schema_version {version}, newer than "
                          f"version {SCHEMA_VERSION} that this pcbedge supports",
                          fix="upgrade pcbedge (pip install -U pcbedge)")
    if version < MIN_SCHEMA_VERSION:
        raise BundleError(f"bundle {root} has manifest schema_version {version}, older than "
                          f"version {MIN_SCHEMA_VERSION}, the oldest this pcbedge "
                          f"{__version__} reads",
                          fix="export and build the bundle again with this pcbedge")
    tools = m.get("tools")
    made_by = tools.get("pcbedge") if isinstance(tools, dict) else None
    if made_by is None:
        return
    if not isinstance(made_by, str) or not re.match(r"\d+(\.\d+)*", made_by):
        raise BundleError(f"bundle {root}: manifest field 'tools.pcbedge' = {made_by!r} is not "
                          "a version", fix="the manifest was edited or is corrupt: export or "
                                           "build the bundle again with this pcbedge")
    if _release(made_by) > _release(__version__):
        raise BundleError(f"bundle {root} was made by pcbedge {made_by} (manifest field "
                          f"tools.pcbedge), newer than this pcbedge {__version__}",
                          fix="upgrade pcbedge (pip install -U pcbedge) on this machine")


def _release(version: str) -> tuple[int, int]:
    """(major, minor): a newer patch release reads the same manifests, so only these count
    ("0+source", a source checkout, is 0.0)."""
    parts = [int(p) for p in re.match(r"\d+(\.\d+)*", version).group(0).split(".")]
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def schema_error(root: str | Path, v: Violation) -> BundleError:
    """The BundleError of a schema violation: the field's JSON path, the value, what is valid."""
    value = repr(v.value)
    value = value if len(value) <= 80 else value[:77] + "..."
    fix = ("the manifest was edited or is corrupt: export or build the bundle again with this "
           "pcbedge (docs/export.md lists every field)")
    if v.problem == "missing":
        return BundleError(f"bundle {root}: manifest field '{v.path}' is missing; expected "
                           f"{v.expected}", fix=fix)
    if v.problem == "unknown":
        return BundleError(f"bundle {root}: manifest field '{v.path}' is not a known field; "
                           f"expected {v.expected}", fix=fix)
    return BundleError(f"bundle {root}: manifest field '{v.path}' = {value} is not valid; "
                       f"expected {v.expected}", fix=fix)


def safe_path(root: Path, rel: str, what: str = "file") -> Path:
    """``root / rel`` if ``rel`` is a plain relative path that stays inside ``root``."""
    p = PurePosixPath(rel)
    if (not rel or p.is_absolute() or Path(rel).is_absolute() or ".." in p.parts
            or "\\" in rel or ":" in rel):
        raise BundleError(f"bundle {what} path {rel!r} escapes the bundle folder",
                          fix="refusing an unsafe bundle; use one made by pcbedge")
    full = (root / rel).resolve()
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"bundle {what} path {rel!r} resolves outside the bundle ({full})",
                          fix="refusing an unsafe bundle; use one made by pcbedge")
    return full


def referenced_files(manifest: dict) -> list[str]:
    """Files the manifest tells a runtime to load (graphs, tokenizer, assets such as a chat
    template)."""
    refs = [g["file"] for g in manifest["graphs"].values()]
    assets = manifest.get("assets") or {}
    if not isinstance(assets, dict) or not all(isinstance(v, str) for v in assets.values()):
        raise BundleError("the manifest's assets are not a {name: file} table",
                          fix="the bundle is corrupt; export it again")
    return refs + [manifest["tokenizer"], *assets.values()]


def verify_files(bundle_dir: str | Path, manifest: dict) -> None:
    """Check every listed file's sha256 and size, that everything a runtime loads is listed,
    and that no path nor ONNX external-data location escapes the bundle."""
    root = Path(bundle_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"manifest of {root} lists no files", fix="export the bundle again")
    for rel in referenced_files(manifest):
        safe_path(root, rel)
        if rel not in files:
            raise BundleError(f"{rel} is used by the bundle {root} but has no hash in the manifest",
                              fix="refusing an unverifiable bundle; export it again")
    for rel, entry in files.items():
        path = safe_path(root, rel)
        if not path.is_file():
            raise BundleError(f"bundle {root} lacks {rel} (listed in its manifest)",
                              fix="copy the whole bundle folder, or export it again")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{rel} in bundle {root} does not match its sha256 in the manifest "
                              "(modified, truncated or corrupt)",
                              fix="copy the bundle again from its source, or export it again")
    for rel in files:
        if rel.endswith(".onnx"):
            check_external_data(root, rel, files)


def check_external_data(root: Path, rel: str, files: dict) -> None:
    """Refuse an ONNX graph whose external-data location is absolute or leaves the bundle."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError:  # a device may ship onnxruntime without onnx; ORT checks this itself
        log.debug("onnx not installed: external-data locations of %s not checked here", rel)
        return
    try:
        model = onnx.load(str(root / rel), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise BundleError(f"{rel} in bundle {root} is not a readable ONNX graph: {e}",
                          fix="export the bundle again") from None
    graph_dir = PurePosixPath(rel).parent
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        what = f"external data of {rel} (tensor {t.name!r})"
        if not loc or PurePosixPath(loc).is_absolute() or Path(loc).is_absolute():
            raise BundleError(f"{what} has the location {loc!r}, not a path inside the bundle",
                              fix="refusing an unsafe bundle; use one made by pcbedge")
        target = (graph_dir / loc).as_posix()
        safe_path(root, target, what=what)
        if target not in files:
            raise BundleError(f"{what} is {loc!r}, which has no hash in the manifest",
                              fix="refusing an unverifiable bundle; export it again")
