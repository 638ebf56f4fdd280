"""Model cards for hf_qn runs, written with ``huggingface_hub`` (imported here, lazily, only).

A card carries YAML metadata with ``model-index`` results (one ``EvalResult`` per optimizer, so the Hub
shows the comparison), the optimizer and all its hyperparameters, the exact command that regenerates
it (at the top), the hardware, and the comparison table and plot from the same run.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_qn.optim.config import cpu_info, fast_bf16

__all__ = ["code_description", "hardware_description", "write_benchmark_card"]


def hardware_description() -> str:
    """The machine a result was measured on, for cards and benchmark results. On a CPU: its model and whether
    it multiplies bf16 natively (K-BFGS's ``matmul_dtype="auto"`` then takes bf16 products, which moves its
    step-time ratios and its numbers)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    model = cpu_info().get("model name") or platform.processor()
    bf16 = "native bf16" if fast_bf16(torch.device("cpu")) else "no native bf16"
    return (f"CPU {platform.machine()} {model} ({bf16}), {torch.get_num_threads()} threads of {os.cpu_count()} "
            f"cores, torch {torch.__version__}").replace("  ", " ")


def code_description() -> str:
    """Which hf_qn a result was measured with: its version, the directory it was imported from and, in a git
    checkout, the commit and whether hf_qn's files differ from it. Call it when the run starts: a script run from a
    copy of the repository imports the installed package (an editable install: the checkout's working tree) unless
    the copy comes first on ``sys.path`` (``PYTHONPATH``), and this says which one ran."""
    import hf_qn

    root = os.path.dirname(os.path.dirname(os.path.abspath(hf_qn.__file__)))
    text = f"hf_qn {hf_qn.__version__} from {root}"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "hf_qn")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an archive, an installed wheel)
        return text
    return f"{text} at {commit}" + (", with uncommitted changes to hf_qn/" if changed else "")


def _card_data(
    title: str, dataset: tuple[str, str], task: tuple[str, str], metric_name: str,
    results: Sequence[Mapping[str, Any]], base_model: str | None,
) -> Any:
    """The card's metadata: one ``EvalResult`` per optimizer."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = [
        EvalResult(
            task_type=task[0],
            task_name=task[1],
            dataset_type=dataset[1],
            dataset_name=dataset[0],
            metric_type=metric_name,
            metric_name=f"{metric_name} ({r['optimizer']})",
            metric_value=float(r["value"]),
        )
        for r in results
    ]
    return ModelCardData(
        library_name="hf_qn",
        license="apache-2.0",
        tags=["hf_qn", "optimizer", "quasi-newton", "k-bfgs", "ml-bfgs"],
        model_name=title,
        eval_results=eval_results or None,
        base_model=base_model,
    )


def write_benchmark_card(
    output_dir: str,
    title: str,
    command: str,
    dataset: tuple[str, str],
    task: tuple[str, str],
    metric_name: str,
    results: Sequence[Mapping[str, Any]],
    hyperparameters: Mapping[str, Any],
    table: str,
    plot: str | None = None,
    notes: str = "",
    base_model: str | None = None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
) -> str:
    """Write ``README.md`` (a Hub model card) into ``output_dir`` and return its path.

    Args:
        dataset: ``(name, type)`` of the data set. task: ``(type, name)`` of the task.
        results: one mapping per optimizer with ``optimizer`` and ``value`` (the metric).
        table: the markdown comparison table from the same run.
    """
    from huggingface_hub import ModelCard

    data = _card_data(title, dataset, task, metric_name, results, base_model)
    hp_lines = "\n".join(f"- `{k}`: `{v}`" for k, v in hyperparameters.items())
    body = f"""
# {title}

Regenerate this card:

```bash
{command}
```

Hardware: {hardware_description()}.

## Results (one run, same machine, same budget for every optimizer)

{table}

{f"![loss curves]({plot})" if plot else ""}

{notes}

## Hyperparameters

{hp_lines}

Written by `hf_qn.integrations.model_card.write_benchmark_card`; numbers come from the run above and
nothing else.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    if push_to_hub:
        if not hub_model_id:
            raise ValueError("push_to_hub=True needs hub_model_id")
        card.push_to_hub(hub_model_id)
    return path
