"""Writing a benchmark's results: its JSON, and a markdown page with the script's description, the
command line and the table; :func:`cpu_description` names the CPU a run timed."""
from __future__ import annotations

import json
from typing import List, Optional

import torch


def cpu_fields() -> dict:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def cpu_description() -> str:
    """``"<model name>, family F model M, <torch's CPU kernel level>"`` from ``/proc/cpuinfo`` (Linux; the
    torch part only elsewhere): CPUs of one model name can differ (e.g. "AMD EPYC" for Zen 3 and Zen 4)."""
    fields = cpu_fields()
    parts = [fields.get("model name")]
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    parts.append(torch.backends.cpu.get_cpu_capability())
    return ", ".join(p for p in parts if p)


def write_results(results: dict, table: List[str], doc: str, setting: str, json_path: Optional[str] = None,
                  markdown_path: Optional[str] = None) -> None:
    """``results`` as JSON to ``json_path``; to ``markdown_path`` the first line of ``doc`` as the title,
    its text after the usage block, ``command: setting`` and the ``table`` lines."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write("\n".join([f"# {doc.splitlines()[0]}", "", doc.split("\n\n", 2)[2].strip(), "",
                               f"`{results['meta']['command']}`: {setting}", "", *table, ""]))
