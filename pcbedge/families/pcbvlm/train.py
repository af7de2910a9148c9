"""The ``train`` role: ``pcbedge finetune`` of the reference PCB VLM (model/train.py)."""
from __future__ import annotations


def finetune(data_dir, out_dir, **kwargs):
    """Train from scratch (or continue, ``init_from=``) on a DeepPCB-layout trainval split;
    ``kwargs`` are :class:`FinetuneConfig` fields."""
    from pcbedge.families.pcbvlm.model.train import FinetuneConfig, finetune as _finetune
    return _finetune(data_dir, out_dir, FinetuneConfig(**kwargs))
