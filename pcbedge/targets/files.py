"""Profile files: reading the TOML, ``extends`` (a profile over another), then the checks of
:func:`pcbedge.targets.profile.parse_profile`."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from pcbedge.errors import TargetError
from pcbedge.targets.profile import NAME_RE, TargetProfile, _fail, parse_profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 gets the same parser from the tomli backport
    import tomli as tomllib


def _read_toml(path: Path, src: str) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TargetError(f"target profile {src} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"target profile {src} is not valid TOML: {e}",
                          fix="fix the syntax (https://toml.io)") from None


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: tables merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


def _resolve_extends(data: dict, path: Path, src: str, seen: tuple = ()) -> dict:
    """``extends = "NAME"``: the profile NAME.toml beside this one, else the shipped target
    NAME, with this file's fields over it (a module profile adds its [hardware] and budget to a
    shared recipe; a user's own profile changes one line of a shipped target)."""
    base_name = data.get("extends")
    if base_name is None:
        return data
    if not isinstance(base_name, str) or not NAME_RE.match(base_name):
        raise _fail(src, "extends", base_name,
                    "the name of a profile beside this file or of a shipped target")
    base_path = path.parent / f"{base_name}.toml"
    if not base_path.is_file():
        base_path = Path(__file__).parent / f"{base_name}.toml"
    if not base_path.is_file() or base_path.resolve() in seen:
        why = "extends itself" if base_path.resolve() in seen else "no such file"
        raise _fail(src, "extends", base_name,
                    f"a profile beside this file or a shipped target ({why})")
    base = _resolve_extends(_read_toml(base_path, str(base_path)), base_path, str(base_path),
                            (*seen, path.resolve()))
    base.pop("name", None)
    return _merge(base, {k: v for k, v in data.items() if k != "extends"})


def load_profile(path: str | Path) -> TargetProfile:
    """Read and validate one profile file; its ``name`` must equal the file's stem.
    ``extends = "NAME"`` takes every field of the profile NAME.toml beside it first."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise TargetError(f"target profile {src} not found", fix="pass a shipped target name "
                          "(pcbedge targets) or the path of a .toml profile")
    data = _resolve_extends(_read_toml(path, src), path, src)
    return parse_profile(data, src, stem=path.stem)
