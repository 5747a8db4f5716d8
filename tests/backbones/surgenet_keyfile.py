"""Parse the published SurgeNet key files (../shared/surgenet_keys/*.txt): lines ``name (d0, d1, ...)``."""

from __future__ import annotations

from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
# The key files live in ../shared beside the repository (or in shared/ inside a checkout that carries it).
_CANDIDATES = (_REPO / "shared" / "surgenet_keys", _REPO.parent / "shared" / "surgenet_keys")


def surgenet_keys(backbone: str, with_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Ordered {name: shape} of the published backbone; ``head.*`` lines only with ``with_head``.

    Raises (never skips) when the key file is missing: these files are the specification under test.
    """
    paths = [d / f"{backbone}.txt" for d in _CANDIDATES]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"Published key file missing; looked for {[str(p) for p in paths]}.")
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
