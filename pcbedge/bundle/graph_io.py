"""Reading and writing graphs of any size in a build: a graph whose weights pass
``EXTERNAL_DATA_BYTES`` keeps them in one side-car file ``<graph>.data`` (protobuf cannot hold
more than 2 GB, and a 2B model's decoder is 6 GB in FP32); a smaller one is one file. A side-car
left from an earlier write of the same graph is removed, so a bundle never ships a stale one.
"""
from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_BYTES = 1 << 30   # the exporter's threshold too


def side_car(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def has_external_data(path: Path) -> bool:
    return side_car(Path(path)).is_file()


def weight_bytes(model) -> int:
    """Bytes of the initializers' data held in ``model`` (raw or typed fields; those still on
    disk count by their external length)."""
    from onnx.external_data_helper import uses_external_data

    total = 0
    for t in model.graph.initializer:
        if uses_external_data(t):
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def save_graph(model, path: Path) -> bool:
    """Write ``model`` (weights loaded) to ``path``; returns whether its weights went to the
    side-car."""
    import onnx

    path = Path(path)
    external = weight_bytes(model) > EXTERNAL_DATA_BYTES
    side = side_car(path)
    side.unlink(missing_ok=True)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=side.name)
    else:
        onnx.save(model, str(path))
    return external


def shareable(folder: Path) -> None:
    """Files the exporters and quantizers wrote through private temporaries (external weight
    data comes out 0600) get the user's umask, like every other file pcbedge writes: a bundle
    is deployed and run by other accounts."""
    import os
    mask = os.umask(0)
    os.umask(mask)
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_nlink == 1:   # links: the export's
            os.chmod(p, 0o666 & ~mask)


class SideCarWriter:
    """A side-car file written in order, each tensor at an aligned offset (as the exporters
    write them); opened on the first tensor, so ``used`` says whether it exists."""

    ALIGN = 4096

    def __init__(self, path: Path):
        self.path, self.used, self._fh, self._pos = Path(path), False, None, 0

    def __enter__(self):
        return self

    def put(self, tensor, data) -> None:
        """Write ``data`` (a uint8 numpy array) and point ``tensor`` (a TensorProto) at it."""
        if self._fh is None:
            self._fh = open(self.path, "wb")
            self.used = True
        pad = -self._pos % self.ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._pos += pad
        where = self._pos
        self._fh.write(data.tobytes())
        self._pos += data.size
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        for k, v in (("location", self.path.name), ("offset", str(where)),
                     ("length", str(data.size))):
            e = tensor.external_data.add()
            e.key, e.value = k, v
        tensor.data_location = 1   # TensorProto.EXTERNAL

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.close()
