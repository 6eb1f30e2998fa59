"""Keep the learnable log logit scale at or below ln(max_logit_scale) after every optimizer step.

OpenAI's CLIP clamps the parameter in place after each step (`logit_scale.data.clamp_(0, ln 100)`):
the value never passes the bound, yet its gradient acts at the bound, so the scale can come back
down. CLIP.forward clamps the value with a straight-through gradient (models/clip.py); this clamps
the parameter itself, so that it does not drift past the bound (where every step that wants a larger
scale would push it further and a later decrease would first have to undo them all).

The parameter the optimizer updates is DeepSpeed's fp32 master, not the module's tensor: under
ZeRO-3 the module holds an empty placeholder, and under ZeRO-1/2 bf16 the module's copy is
overwritten from the master at the next step. So the master is clamped; the module's low-precision
copy may stay one step above the bound, which the forward clamp covers.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def clamp_logit_scale_(engine) -> None:
    """Clamp the optimizer's copy of `engine.module.model.logit_scale`; call on every rank after engine.step()."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                 safe_set_local_fp32_param)
    model = engine.module.model
    p, bound = model.logit_scale, model.max_log_scale
    if hasattr(p, "ds_id"):                       # ZeRO-3: each rank clamps its own partition, no collective
        local = safe_get_local_fp32_param(p)
        if local is not None and local.numel():
            local.clamp_(max=bound)               # a view of the fp32 partition ...
            if local.numel() == p.ds_tensor.numel():
                safe_set_local_fp32_param(p, local)   # ... or a copy when the optimizer is offloaded
    elif hasattr(p, "_hp_mapping"):               # ZeRO-1/2, bf16 optimizer: reassembled (a collective)
        full = safe_get_full_fp32_param(p)
        safe_set_full_fp32_param(p, full.clamp(max=bound))
        p.data.clamp_(max=bound)
    else:                                         # fp32 without ZeRO partitioning: the param is the master
        p.data.clamp_(max=bound)
