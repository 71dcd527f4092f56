"""Writing a benchmark's results: its JSON, and a markdown page with the script's description, the
command line and the table."""
from __future__ import annotations

import json
from typing import List, Optional


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
