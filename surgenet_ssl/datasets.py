"""``python -m surgenet_ssl.datasets [paths.data_root=DIR] [mixture=NAME] [verify=true]``

Prints every mixture with its sources, their published frame counts and totals, and what is prepared under
``paths.data_root`` (frames, shards, whether the count matches the published one, or why a source is missing
and how to prepare it). ``verify=true`` also
checks every shard's size and sha256 against the manifests (reads all data).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.data import shards as S
from surgenet_ssl.data.mixture import check_source_dir
from surgenet_ssl.data.sources import MIXTURES, SOURCES, mixture_published_frames


def _data_root(overrides: list[str]) -> Path:
    """paths.data_root as the training config resolves it (env SURGENET_DATA_ROOT, command-line overrides)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="datasets"):
        cfg = compose(config_name="prepare", overrides=overrides)
    return Path(str(cfg.paths.data_root)).expanduser()


def _status(name: str, root: Path, cache: dict[str, Any]) -> dict[str, Any]:
    if name not in cache:
        manifest, problem = check_source_dir(name, root / name)
        if manifest is not None:
            cache[name] = {
                "ok": True,
                "frames": int(manifest["frames"]),
                "shards": len(manifest["shards"]),
                "bytes": sum(int(s.get("bytes", 0)) for s in manifest["shards"]),
                "manifest": manifest,
                "skipped": len(manifest.get("skipped", {}).get("inputs", [])),
            }
        else:
            assert problem is not None
            cache[name] = {"ok": False, "problem": problem.problem, "hint": problem.hint}
    return cache[name]


def _verify(name: str, root: Path, manifest: dict[str, Any]) -> list[str]:
    bad = []
    for s in manifest["shards"]:
        path = root / name / s["file"]
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif path.stat().st_size != s["bytes"]:
            bad.append(f"{path}: {path.stat().st_size} bytes, manifest says {s['bytes']} (truncated?)")
        elif S.sha256_file(path) != s["sha256"]:
            bad.append(f"{path}: sha256 mismatch (corrupted)")
    return bad


def compare_with_published(prepared: int, published: int) -> str:
    """Whether a prepared source has the published number of frames, and by how much it differs."""
    if prepared == published:
        return "matches the published count"
    diff = prepared - published
    return f"{diff:+,} frames ({100 * diff / published:+.1f}%) vs the published {published:,}"


def report(root: Path, mixtures: list[str] | None = None, verify: bool = False) -> list[str]:
    """The report as lines (printed by main)."""
    lines = [f"paths.data_root = {root}" + ("" if root.is_dir() else "  (does not exist)"), ""]
    cache: dict[str, Any] = {}
    for mname in mixtures or list(MIXTURES):
        m = MIXTURES[mname]
        computed = mixture_published_frames(mname)
        check = "" if computed == m.published_frames else f"  (!) registry sum {computed:,}"
        lines.append(f"{mname}: {m.description} - {m.published_frames:,} published frames{check}")
        prepared = n_ready = 0
        for sname in m.sources:
            src, st = SOURCES[sname], _status(sname, root, cache)
            pub = f"{src.frames:>10,}"
            if st["ok"]:
                n_ready += 1
                prepared += st["frames"]
                found = f"prepared: {st['frames']:,} frames, {st['shards']} shards, {st['bytes'] / 1e9:.2f} GB"
                if st["skipped"]:
                    found += f", {st['skipped']} inputs skipped"
                found += f"; {compare_with_published(st['frames'], src.frames)}"
                if st["frames"] != src.frames and src.note:
                    found += f" ({src.note})"
            else:
                found = f"MISSING: {st['problem']}"
            lines.append(f"  {sname:<16}{pub}   {'public ' if src.public else 'private'}  {found}")
        frac = f" x fraction {m.fraction:g} = ~{int(prepared * m.fraction):,}" if m.fraction < 1 else ""
        lines.append(
            f"  {'total':<16}{computed:>10,}            prepared: {prepared:,} frames{frac} "
            f"from {n_ready}/{len(m.sources)} sources"
        )
        lines.append("")
    missing = [n for n, st in cache.items() if not st["ok"]]
    if missing:
        lines.append("To prepare a missing source:")
        for n in missing:
            lines.append(f"  {cache[n]['hint']}")
        lines.append("")
    others: list[Path] = []
    if root.is_dir():
        others = [p for p in sorted(root.iterdir()) if p.name not in SOURCES and (p / S.MANIFEST_NAME).is_file()]
        if others:
            lines.append("Other prepared directories (use with dataset=custom dataset.path=DIR):")
            for p in others:
                try:
                    mf = S.read_manifest(p)
                    lines.append(f"  {p}: {mf.get('frames', '?')} frames, {len(mf.get('shards', []))} shards")
                except S.ManifestError as e:
                    lines.append(f"  {p}: {e}")
            lines.append("")
    if verify:
        bad: list[str] = []
        for n, st in cache.items():
            if st["ok"]:
                bad += _verify(n, root, st["manifest"])
        for p in others:  # user-named sources are checked too
            try:
                bad += _verify(p.name, root, S.read_manifest(p))
            except S.ManifestError as e:
                bad.append(f"{p}: {e}")
        lines.append(f"verify: {len(bad)} damaged shards" + (":" if bad else " (all sizes and sha256 match)"))
        lines += [f"  {b}" for b in bad]
    ready = sum(1 for st in cache.values() if st["ok"])
    lines.append(f"{ready} of {len(cache)} sources prepared under {root}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mixtures: list[str] | None = None
    verify = False
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("mixture", "dataset"):
            if value not in MIXTURES:
                print(f"Unknown mixture {value!r}. Valid: {', '.join(MIXTURES)}", file=sys.stderr)
                return 2
            mixtures = [value]
        elif key == "verify":
            verify = value.lower() in ("1", "true", "yes")
        elif key.startswith("paths.") or key.startswith("+paths."):
            overrides.append(arg)
        elif key in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            print(f"Unknown argument {arg!r}. Use paths.data_root=DIR, mixture=NAME, verify=true.", file=sys.stderr)
            return 2
    lines = report(_data_root(overrides), mixtures, verify)
    for line in lines:
        print(line)
    # verify=true exits 1 when any shard is damaged, so scripts and CI can act on it
    return (
        1 if verify and any(line.startswith("verify: ") and not line.startswith("verify: 0 ") for line in lines) else 0
    )


if __name__ == "__main__":
    sys.exit(main())
