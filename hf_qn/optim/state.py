"""The optimizer state layout of hf_qn (format 2): every key name, and the converter from format 1.

``optimizer.state_dict()`` is torch's ``{"state", "param_groups"}`` plus one entry ``"hf_qn"`` with the
optimizer-wide state. Tensors and primitives only (``torch.load(weights_only=True)`` reads it); every
counter is a 0-dim int64 tensor. ``tests/optim/test_state_layout.py`` pins the whole structure.

K-BFGS (``KBFGS``, ``KBFGSL``)::

    "hf_qn": {"format": 2, "optimizer": "KBFGS", "output_side": "dense" | "lbfgs" | "kfac" | "none",
              "schedule": {"step", "refresh_next"},
              "steps_skipped_nonfinite",
              "growth_guard": {"ref_step_sizes" (one per layer), "steps_clipped"},
              "loss_guard": {"loss_avg" (once a loss is accepted), "loss_checks", "steps_rejected"},
              "backoff": {"factor"}}
    state[layer weight] = {
        "input": {"A", "H_a", "batches", "inverse_countdown" (Cholesky inverse only)},
        "output": {"H_g"} (dense BFGS) | {"S", "Y", "SY", "YY", "count", "head"} (L-BFGS)
                  | {"G", "H_g", "batches"} (K-FAC's output factor, output_side="kfac")
                  | {} (output_side="none", and a one-sided layer of any kind),
        (a factor wider than max_block_dim, "A", "H_a", "G" or "H_g", is (blocks, size, size): its diagonal blocks;
         the layout then records [name, d_out, d_in, "blocks", output blocks, input blocks])
        "momentum_buffer": ĝ (d_out x d_in),
        "pair": {"s_avg", "y_avg", "h_prev", "g_prev", "has_prev"},
        "counters": {"pairs_accepted", "pairs_skipped", "powell_damped", "lm_damped", "input_updates_skipped"},
        "graft": {"exp_avg_sq" (d_out x d_in), "steps", "direction_sq" (d_out x d_in, direction_rms only)}
                 (graft="adam" only)}
    state[fallback parameter] = torch.optim.AdamW's {"step", "exp_avg", "exp_avg_sq"} | SGD's {"momentum_buffer"}

mL-BFGS (``MLBFGS``)::

    "hf_qn": {"format": 2, "optimizer": "MLBFGS", "step", "steps_skipped_nonfinite"}
    state[every parameter] = {"param_avg", "grad_avg", "param_avg_prev", "grad_avg_prev", "momentum_buffer",
                              "exp_avg_sq" (normalize="adam")}
    state[first parameter of a block] also has "block": {
        "history": {"S", "Y", "SY", "YY", "count", "head"}, "has_prev",
        "counters": {"pairs_accepted", "pairs_skipped", "pairs_damped"}}

Format 1 (flat per-parameter keys, optimizer-wide values on the first layer or block) is converted on load
by :func:`convert_kbfgs_v1` and :func:`convert_mlbfgs_v1`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "HF_QN",
    "KBFGS_LAYER_COUNTERS",
    "MLBFGS_BLOCK_COUNTERS",
    "MLBFGS_PARAM_KEYS",
    "convert_kbfgs_v1",
    "convert_mlbfgs_v1",
    "is_v1",
    "iter_tensors",
]

FORMAT = 2
#: the state-dict entry holding the optimizer-wide state.
HF_QN = "hf_qn"

KBFGS_LAYER_COUNTERS = ("pairs_accepted", "pairs_skipped", "powell_damped", "lm_damped", "input_updates_skipped")
KBFGS_LAYER_KEYS = ("input", "output", "momentum_buffer", "pair", "counters")
MLBFGS_BLOCK_COUNTERS = ("pairs_accepted", "pairs_skipped", "pairs_damped")
MLBFGS_PARAM_KEYS = ("param_avg", "grad_avg", "param_avg_prev", "grad_avg_prev", "momentum_buffer")
HISTORY_KEYS = ("S", "Y", "SY", "YY", "count", "head")


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``("input/A", tensor)``, ... for every tensor in a nested state dict (paths joined by ``/``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


#: hyperparameters renamed in format 2, as param-group keys: K-BFGS's (its K-BFGS groups), mL-BFGS's.
KBFGS_RENAMED = {"momentum": "grad_decay", "weight_decay": "l2", "stat_decay": "factor_decay"}
MLBFGS_RENAMED = {"param_beta": "param_decay", "grad_beta": "grad_decay", "pair_momentum": "pair_decay",
                  "damping": "min_mix"}


def is_v1(state_dict: dict[str, Any]) -> bool:
    """A state dict written by hf_qn before format 2 (no ``"hf_qn"`` entry; hf_qn's flat keys or old names)."""
    if HF_QN in state_dict:
        return False
    if any("qn_step" in st or "mlbfgs_step" in st for st in state_dict.get("state", {}).values()):
        return True
    return any("stat_decay" in g or "param_beta" in g for g in state_dict.get("param_groups", []))


def _rename_groups(
    groups: list[dict[str, Any]], renamed: dict[str, str], only_role: str | None
) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        if only_role is None or g.get("role") == only_role:
            g = {renamed.get(k, k): v for k, v in g.items()}
        out.append(g)
    return out


def _int(v: Any) -> torch.Tensor:
    return torch.tensor(int(v), dtype=torch.int64)


def convert_kbfgs_v1(state_dict: dict[str, Any], layer_ids: list[Any], output_side: str) -> dict[str, Any]:
    """Format 1 -> 2 for K-BFGS. ``layer_ids``: the saved ids of the adapted layers' weights, in layer order
    (the first held the optimizer-wide values); ``output_side``: the loading optimizer's, for a state saved
    before its first step (otherwise the saved factors say which it is)."""
    old = copy.copy(state_dict["state"])
    first = old.get(layer_ids[0], {}) if layer_ids else {}
    new_state = {pid: st for pid, st in old.items() if pid not in set(layer_ids)}
    refs = []
    for pid in layer_ids:
        st = old.get(pid)
        if not st:
            refs.append(0.0)
            continue
        refs.append(float(st["ref_step_size"]) if "ref_step_size" in st else 0.0)
        batches = st["input_batches"] if "input_batches" in st else _int(bool(st.get("first_stats", False)))
        inp = {"A": st["A"], "H_a": st["H_a"], "batches": batches}
        if "inverse_countdown" in st:
            inp["inverse_countdown"] = st["inverse_countdown"]
        output = {"H_g": st["H_g"]} if "H_g" in st else {k: st[f"Hg_{k}"] for k in HISTORY_KEYS}
        new_state[pid] = {
            "input": inp,
            "output": output,
            "momentum_buffer": st["momentum_buffer"],
            "pair": {k: st[k] for k in ("s_avg", "y_avg", "h_prev", "g_prev", "has_prev")},
            "counters": {k: st[k] if k in st else _int(0) for k in KBFGS_LAYER_COUNTERS},
        }
    loss_guard = {k: first[k] if k in first else _int(0) for k in ("loss_checks", "steps_rejected")}
    if "loss_avg" in first:
        loss_guard["loss_avg"] = first["loss_avg"]
    saved = [old[pid] for pid in layer_ids if old.get(pid)]
    if saved:
        output_side = "dense" if "H_g" in saved[0] else "lbfgs"
    hf_qn = {
        "format": FORMAT,
        "optimizer": "KBFGS",
        "output_side": output_side,
        "schedule": {
            "step": first["qn_step"] if "qn_step" in first else _int(0),
            "refresh_next": first["refresh_next"] if "refresh_next" in first else torch.tensor(False),
        },
        "steps_skipped_nonfinite": first["steps_skipped_nonfinite"] if "steps_skipped_nonfinite" in first else _int(0),
        "growth_guard": {
            "ref_step_sizes": torch.tensor(refs, dtype=torch.float32),
            "steps_clipped": first["steps_clipped"] if "steps_clipped" in first else _int(0),
        },
        "loss_guard": loss_guard,
        "backoff": {"factor": first.get("step_backoff", torch.tensor(1.0, dtype=torch.float32))},
    }
    groups = _rename_groups(state_dict["param_groups"], KBFGS_RENAMED, "qn")
    return {**state_dict, "param_groups": groups, "state": new_state, HF_QN: hf_qn}


def convert_mlbfgs_v1(state_dict: dict[str, Any], anchor_id: Any) -> dict[str, Any]:
    """Format 1 -> 2 for mL-BFGS. ``anchor_id``: the saved id of the first block's first parameter (it held
    the optimizer-wide step count)."""
    new_state = {}
    for pid, st in state_dict["state"].items():
        st = dict(st)
        if "hist_S" in st:
            st["block"] = {
                "history": {k: st.pop(f"hist_{k}") for k in HISTORY_KEYS},
                "has_prev": st.pop("has_prev"),
                "counters": {k: st.pop(k) for k in MLBFGS_BLOCK_COUNTERS},
            }
        for k in ("mlbfgs_step", "steps_skipped_nonfinite"):
            st.pop(k, None)
        new_state[pid] = st
    anchor = state_dict["state"].get(anchor_id, {})
    hf_qn = {
        "format": FORMAT,
        "optimizer": "MLBFGS",
        "step": anchor["mlbfgs_step"] if "mlbfgs_step" in anchor else _int(0),
        "steps_skipped_nonfinite": anchor.get("steps_skipped_nonfinite", _int(0)),
    }
    groups = _rename_groups(state_dict["param_groups"], MLBFGS_RENAMED, None)
    return {**state_dict, "param_groups": groups, "state": new_state, HF_QN: hf_qn}
