"""The bench's FP32 reference: which folder it is, and that it is the same model as the bundle.

Drift is only meaningful against the FP32 export of the model the bundle was built from. Every
export records the sha256 of its source weights (manifest ``source_model.sha256``) and a build
copies that block, so two folders of one model carry one hash; a model folder's hash is that of
its weights file. Checked before anything is timed (docs/bench.md, "Drift").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pcbedge.benchmarks.environment import manifest_sha256
from pcbedge.bundle.manifest import read_manifest_json
from pcbedge.export.precision import graph_precision
from pcbedge.errors import BundleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceModel:
    """Where a bundle or model folder came from, as far as its files say."""

    folder: Path
    name: str | None       # the source model folder's name
    family: str | None
    sha256: str | None     # sha256 of the source weights; None when nothing records it
    precision: dict | None  # the bundle's graph precisions; None for a model folder

    def describe(self) -> str:
        sha = f"weights sha256 {self.sha256[:12]}..." if self.sha256 else "no weights hash"
        return f"model {self.name or '?'!r} ({self.family or 'unknown family'}, {sha})"


def source_of(folder: Path, manifest: dict | None = None) -> SourceModel:
    """The source model of a bundle (its manifest's ``source_model``) or of a model folder (its
    weights, hashed: one file or its shards); all None for a folder that is neither."""
    manifest = read_manifest_json(folder) if manifest is None else manifest
    if manifest:
        src = manifest.get("source_model")
        src = src if isinstance(src, dict) else {}
        sha = src.get("sha256") if isinstance(src.get("sha256"), str) else None
        precision = manifest.get("precision")
        return SourceModel(folder, src.get("name"), manifest.get("family"), sha or None,
                           precision if isinstance(precision, dict) else {})
    if not (folder / "config.json").is_file():
        return SourceModel(folder, None, None, None, None)
    from pcbedge.families import detect_family
    family = detect_family(folder)   # an unknown family fails here as it would at load
    from pcbedge.errors import ModelError
    from pcbedge.checkpoint import weights_sha256
    try:
        sha = weights_sha256(folder, family.weights_file)
    except ModelError:
        sha = None          # no weights to hash: the runner's own load reports what is missing
    return SourceModel(folder, folder.resolve().name, family.name, sha, None)


def resolve_reference(bundle: Path, manifest: dict, reference) -> tuple[Path | None, str]:
    """(FP32 reference folder or None, how it was chosen / why there is none). ``reference``
    is a folder, None (the one the bundle's manifest names) or False (none: drift not run)."""
    if reference is False:
        return None, ("no reference asked for (--no-reference): drift not measured, the drift "
                      "gates skipped")
    if reference is not None:
        p = Path(reference)
        if not p.exists():
            raise BundleError(f"reference {p} not found",
                              fix="pass the FP32 export folder (pcbedge export) as --reference")
        return p, f"given: {p}"
    ref = manifest.get("reference")
    # "export_dir" is what pcbedge build writes; "path" is accepted as its synonym.
    named = (ref.get("path") or ref.get("export_dir")) if isinstance(ref, dict) else None
    if not named:
        return None, "the bundle's manifest names no FP32 reference and none was given"
    p = Path(named)
    if not p.is_absolute() and not p.exists() and (bundle / p).exists():
        p = bundle / p
    if not p.exists():
        return None, f"the manifest's reference {named} does not exist on this machine"
    want, have = ref.get("manifest_sha256"), manifest_sha256(p)
    if want and have and want != have:
        raise BundleError(f"the reference {p} named by {bundle}/manifest.json has manifest sha256 "
                          f"{have[:12]}..., not the {want[:12]}... the bundle was built from",
                          fix="pass the right FP32 export with --reference, or rebuild the bundle")
    return p, f"manifest: {p}"


def _built_from(manifest: dict) -> str:
    ref = manifest.get("reference")
    named = (ref.get("export_dir") or ref.get("path")) if isinstance(ref, dict) else None
    return f" ({named}, named by the bundle's manifest)" if named else ""


def check_reference(bundle: Path, manifest: dict, ref_path: Path | None, *,
                    warn: bool = True) -> dict | None:
    """The report's ``drift.reference_check``: BundleError when ``ref_path`` is not an FP32
    export, or not of the bundle's model; ``status`` "unverified" (and a warning) when neither
    hash nor manifest can tell, as for a hand-made folder without ``source_model.sha256``."""
    if ref_path is None:
        return None
    if Path(ref_path).resolve() == Path(bundle).resolve():
        return {"status": "same_folder", "note": "the bundle is its own reference"}
    ref_manifest = read_manifest_json(ref_path)
    ref = source_of(Path(ref_path), ref_manifest)
    floats = graph_precision(ref_manifest)   # an fp16 export is a float reference too
    not_fp32 = {k: v for k, v in (ref.precision or {}).items() if v != floats}
    if not_fp32 or floats == "bf16":
        raise BundleError(f"reference {ref_path} is not an FP32 export (precision "
                          f"{not_fp32 or ref.precision}): "
                          "drift against it would not measure what the bundle lost",
                          fix="pass the FP32 export the bundle was built from"
                              f"{_built_from(manifest)} as --reference")
    own = source_of(Path(bundle), manifest)
    block = {"bundle_source": own.describe(), "reference_source": ref.describe(),
             "bundle_source_sha256": own.sha256, "reference_source_sha256": ref.sha256}
    built_from = (manifest.get("reference") or {}).get("manifest_sha256") \
        if isinstance(manifest.get("reference"), dict) else None
    if built_from and built_from == manifest_sha256(ref_path):
        return {**block, "status": "verified",
                "note": "the export the bundle was built from (manifest sha256)"}
    if own.sha256 and ref.sha256:
        if own.sha256 != ref.sha256:
            raise BundleError(_other_model(bundle, own, ref_path, ref),
                              fix="pass the FP32 export the bundle was built from"
                                  f"{_built_from(manifest)} as --reference, or export that "
                                  "model again (pcbedge export) and pass the export")
        return {**block, "status": "verified", "note": "same source weights (sha256)"}
    if own.family and ref.family and own.family != ref.family:
        raise BundleError(_other_model(bundle, own, ref_path, ref),
                          fix=f"pass the FP32 export the bundle was built from"
                              f"{_built_from(manifest)} as --reference")
    missing = " and ".join(str(s.folder) for s in (own, ref) if not s.sha256)
    note = (f"cannot verify that {ref_path} is the bundle's model: {missing} record(s) no "
            "source weights hash (manifest source_model.sha256); drift is measured anyway")
    log.warning(note)
    if warn:
        import click
        click.echo(f"warning: {note}; export and build again to record it", err=True)
    return {**block, "status": "unverified", "note": note}


def _other_model(bundle: Path, own, ref_path: Path, ref) -> str:
    return (f"reference {ref_path} comes from {ref.describe()}, but bundle {bundle} from "
            f"{own.describe()}: drift against it would compare two different models")

