"""Print where the demo's outputs are (run by `make demo` after `dvc repro`)."""

from __future__ import annotations

import sys
from pathlib import Path

from wpcrack.config import load_config


def main(params: str = "params.yaml", dataset: str = "synthetic") -> int:
    cfg = load_config(params, dataset=dataset)
    reports = Path(cfg.paths.reports)
    for table in (reports / dataset / "comparison.md", reports / dataset / "ablation.md",
                  reports / "benchmark" / f"{dataset}.md"):
        if table.is_file():
            print(f"\n=== {table}\n{table.read_text()}")
    print("Where to look:")
    print(f"  tables     {reports / dataset}/ablation.md, comparison.md")
    print(f"  benchmark  {reports / 'benchmark' / dataset}.md (.json)")
    print(f"  figures    {Path(cfg.paths.results) / dataset}/<variant>/figure.png, curves.png (PR + training curves, offline)")
    print("  metrics    dvc metrics show   |   plots: dvc plots show --json")
    print("  MLflow     .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000")
    print("             then open http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
