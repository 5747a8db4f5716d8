"""Parse the published SurgeNet key files (tests/backbones/surgenet_keys/*.txt): lines ``name (d0, d1, ...)``.

The files are facts about the three published backbones (parameter names and shapes), carried by the repository
so that a bare clone tests against them.
"""

from __future__ import annotations

from pathlib import Path

KEY_DIR = Path(__file__).resolve().parent / "surgenet_keys"


def surgenet_keys(backbone: str, with_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Ordered {name: shape} of the published backbone; ``head.*`` lines only with ``with_head``.

    Raises (never skips) when the key file is missing: these files are the specification under test.
    """
    path = KEY_DIR / f"{backbone}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"Published key file missing: {path}.")
    out: dict[str, tuple[int, ...]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        if name.startswith("head.") and not with_head:
            continue
        out[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return out
