"""`python -m surgenet_ssl.datasets`: published counts, totals and what is prepared under paths.data_root."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.data_media import write_source
from surgenet_ssl.datasets import main, report


def test_report_lists_published_counts_totals_and_found_data(tmp_path: Path) -> None:
    write_source(tmp_path, "heichole", videos=2, frames_per_video=7, shard_max=5)
    write_source(tmp_path, "my_own", videos=1, frames_per_video=3)
    text = "\n".join(report(tmp_path, ["cholec"], verify=True))
    assert "cholec: Cholec80 + HeiChole + hSDB-Chole - 250,655 published frames" in text
    assert "cholec80" in text and "179,164" in text and "MISSING: not prepared" in text
    assert "heichole" in text and "prepared: 14 frames, 4 shards" in text
    assert "prepared: 14 frames from 1/3 sources" in text
    assert "python -m surgenet_ssl.prepare source=cholec80 input=/path/to/Cholec80" in text
    assert f"{tmp_path / 'my_own'}: 3 frames" in text  # other prepared directories are shown too
    assert "verify: 0 damaged shards" in text
    shard = next((tmp_path / "heichole" / "shards").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "verify: 1 damaged shards" in "\n".join(report(tmp_path, ["cholec"], verify=True))


def test_report_totals_for_every_mixture(tmp_path: Path) -> None:
    text = "\n".join(report(tmp_path))
    for total in ("250,655", "377,287", "382,416", "1,997,987", "2,636,790", "263,679", "4,711,024"):
        assert f"{total} published frames" in text
    assert "(!)" not in text  # registry sums equal the published totals
    assert text.splitlines()[-1] == f"0 of 14 sources prepared under {tmp_path}"


def test_main_uses_paths_data_root_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([f"paths.data_root={tmp_path}", "mixture=rarp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"paths.data_root = {tmp_path}") and "rarp: ESAD + PSI-AVA + RARP-AvL" in out
    assert main(["mixture=nope"]) == 2


def test_verify_checks_user_sources_and_exits_1_on_damage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_source(tmp_path, "my_hospital", videos=1, frames_per_video=4)
    assert main([f"paths.data_root={tmp_path}", "mixture=cholec", "verify=true"]) == 0
    shard = next((tmp_path / "my_hospital" / "shards").glob("*.tar"))
    shard.write_bytes(shard.read_bytes() + b"appended junk")
    assert main([f"paths.data_root={tmp_path}", "mixture=cholec", "verify=true"]) == 1
    assert "my_hospital" in capsys.readouterr().out.split("verify: 1 damaged shards", 1)[1]


def test_report_compares_each_prepared_source_with_its_published_count(tmp_path: Path) -> None:
    from surgenet_ssl.datasets import compare_with_published

    write_source(tmp_path, "cholec80", videos=2, frames_per_video=5)
    text = "\n".join(report(tmp_path, ["cholec"]))
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("cholec80"))
    assert "prepared: 10 frames" in line and "-179,154 frames (-100.0%) vs the published 179,164" in line
    assert "the release has 80 videos, the papers used 76" in line  # why Cholec80 may differ, and the fix
    assert compare_with_published(53_427, 53_427) == "matches the published count"
    assert compare_with_published(18_100, 18_064) == "+36 frames (+0.2%) vs the published 18,064"
