"""Put the repository root first on sys.path and refuse a shadowing install of its packages."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bootstrap() -> Path:
    if str(ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(ROOT))
    for name in ("common", "projects", "data", "launchers"):
        mod = importlib.import_module(name)
        where = Path(getattr(mod, "__file__", "") or "").resolve()
        if ROOT not in where.parents:
            raise ImportError(f"package '{name}' is imported from {where}, not from this repository ({ROOT}); "
                              f"another installed package shadows it")
    return ROOT
