"""prepare on tiny replicas of the releases as distributed: folders, zips, tars, parquet; presets; frame selection.

Each replica has the release's layout (SurgeNet sources' READMEs and loaders) with a few tiny frames, plus the
files a release ships beside its frames (masks, copies, test splits) that must not become frames.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data.data_media import tiny_jpeg, write_video
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.data import inputs as I
from surgenet_ssl.data.preparation import PrepareError, PrepareSettings, Selection, prepare_source
from surgenet_ssl.data.shards import iter_shard
from surgenet_ssl.data.video import sampling_step

REPO = Path(__file__).resolve().parents[2]


def put(root: Path, rel: str, value: int = 100) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(tiny_jpeg(value))  # PIL reads it whatever the extension says


def zip_tree(folder: Path, archive: Path, top: str | None = None) -> Path:
    """``folder`` zipped as its release is: members under ``top/`` (None: at the archive's root)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                zf.write(p, f"{top}/{rel}" if top else rel)
    return archive


def tar_tree(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tf.add(p, p.relative_to(folder).as_posix())
    return archive


def frames_of(out: Path) -> dict[str, dict]:
    m = json.loads((out / "manifest.json").read_text())
    return {k: json.loads(s["json"]) for sh in m["shards"] for k, s in iter_shard(out / sh["file"])}


def run_cli(tmp_path: Path, *overrides: str) -> tuple[int, Path]:
    """``python -m surgenet_ssl.prepare <overrides>`` in this process (the registry presets apply as on the CLI)."""
    from surgenet_ssl.prepare import run

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="prepare_test"):
        cfg = compose(
            config_name="prepare",
            overrides=[*overrides, f"paths.data_root={tmp_path / 'root'}", "progress=false", "workers=0"],
        )
    return run(cfg), Path(str(cfg.output))


# ------------------------------------------------------------------------------------------------ release replicas
def dsad(root: Path) -> Path:
    for organ, surgery in (("liver", "01"), ("stomach", "04")):
        d = f"{organ}/{surgery}"
        for i in range(2):
            put(root, f"{d}/image{i:02d}.png")
            put(root, f"{d}/mask{i:02d}.png")
            put(root, f"{d}/anno_1/mask{i:02d}.png")
            put(root, f"{d}/merged/image{i:02d}.png")  # a merged overlay named like a frame: still not one
        put(root, f"{d}/multilabel/mask00_{organ}.png")
    return root


def glenda(root: Path) -> Path:
    put(root, "DS/pathology/frames/v_1_s_2/f_1.jpg")
    put(root, "DS/pathology/frames/v_1_s_2/f_2.jpg")
    put(root, "DS/no_pathology/frames/v_7_s_0/f_5.jpg")
    put(root, "DS/pathology/annotations/v_1_s_2/f_1/endometriosis.png")
    return root


def psi_ava(root: Path) -> Path:
    for case in ("CASE001", "CASE002"):
        for i in range(2):
            put(root, f"keyframes/{case}/{i:05d}.jpg")
        for i in range(8):
            put(root, f"images_8_frames_per_second/{case}/{i:05d}.jpg")
    return root


def esad(root: Path) -> Path:
    put(root, "train/set1/obj/frame_1.jpg")
    put(root, "train/set2/obj/frame_9.jpg")
    put(root, "val/obj/frame_3.jpg")
    put(root, "test/obj/frame_1.jpg")
    put(root, "test_labels/obj/frame_1.jpg")
    (root / "train/set1/obj/frame_1.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    return root


def youtube(root: Path) -> Path:
    put(root, "Cholecystectomy/Batch1/abc_frame_3_Sample1.jpg")
    put(root, "Cholecystectomy/Batch1/xyz_frame_1_Sample1.jpg")
    put(root, "Cholecystectomy/Batch2/abc_frame_9_Sample2.jpg")
    put(root, "Hernia/Batch1/q-r_s_frame_12_Sample1.jpg")
    return root


YOUTUBE_KEYS = {"abc/frame_3_Sample1", "abc/frame_9_Sample2", "xyz/frame_1_Sample1", "q-r_s/frame_12_Sample1"}


# ----------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("form", ["folder", "zip", "zip_with_top_folder", "zip_in_folder"])
def test_dsad_takes_images_not_masks_zipped_or_not(tmp_path: Path, form: str) -> None:
    release = dsad(tmp_path / "DSAD")
    if form == "zip":
        release = zip_tree(release, tmp_path / "DSAD.zip")
    elif form == "zip_with_top_folder":
        release = zip_tree(release, tmp_path / "DSAD.zip", top="DSAD")
    elif form == "zip_in_folder":
        (tmp_path / "download").mkdir()
        zip_tree(release, tmp_path / "download" / "liver.zip")  # members at its root: read as download/liver/...
        release = tmp_path / "download"
    n, out = run_cli(tmp_path, "source=DSAD", f"input={release}")
    keys = set(frames_of(out))
    prefix = "liver/" if form == "zip_in_folder" else ""
    assert n == 4 and keys == {
        f"{prefix}{o}/{s}/image{i:02d}" for o, s in (("liver", "01"), ("stomach", "04")) for i in (0, 1)
    }
    stamps = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again, _ = run_cli(tmp_path, "source=dsad", f"input={release}")
    assert again == 4 and {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == stamps  # resumed


def test_presets_of_glenda_psi_ava_esad_keep_frames_only(tmp_path: Path) -> None:
    n, out = run_cli(tmp_path, "source=glenda", f"input={glenda(tmp_path / 'GLENDA')}")
    assert n == 3 and not any("annotations" in k for k in frames_of(out))
    n, out = run_cli(tmp_path, "source=PSI-AVA", f"input={zip_tree(psi_ava(tmp_path / 'p'), tmp_path / 'PSI-AVA.zip')}")
    assert n == 4 and {k.split("/")[0] for k in frames_of(out)} == {"keyframes"}
    n, out = run_cli(tmp_path, "source=esad", f"input={esad(tmp_path / 'ESAD')}")
    assert n == 3 and set(frames_of(out)) == {"train/set1/obj/frame_1", "train/set2/obj/frame_9", "val/obj/frame_3"}
    # The preset is a default: exclude=[] takes everything, include= narrows by hand.
    n, _ = run_cli(tmp_path, "source=esad", f"input={tmp_path / 'ESAD'}", "exclude=[]", f"output={tmp_path / 'all'}")
    assert n == 5


def test_heichole_full_videos_without_hd_copies_and_skill_clips(tmp_path: Path) -> None:
    rel = tmp_path / "HeiChole"
    write_video(rel / "Videos/Full/Hei-Chole1.mp4", frames=50, fps=25)
    write_video(rel / "Videos/Full/HD/Hei-Chole1.mp4", frames=50, fps=25)
    write_video(rel / "Videos/Skill/Hei-Chole1_Calot.mp4", frames=25, fps=25)
    (rel / "Annotations/Phase").mkdir(parents=True)
    (rel / "Annotations/Phase/Hei-Chole1_Annotation_Phase.csv").write_text("0,0\n1,0\n")
    n, out = run_cli(tmp_path, "source=heichole", f"input={rel}")
    assert n == 2 and set(frames_of(out)) == {"Videos/Full/Hei-Chole1/00000000", "Videos/Full/Hei-Chole1/00000025"}
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["sampling"] == "surgenet" and m["inputs"] == 1
    # Pointing at the kept folder itself works too (the include matches the input's own name).
    n, out2 = run_cli(tmp_path, "source=heichole", f"input={rel / 'Videos/Full'}", f"output={tmp_path / 'full'}")
    assert n == 2 and set(frames_of(out2)) == {"Hei-Chole1/00000000", "Hei-Chole1/00000025"}


@pytest.mark.parametrize("form", ["folder", "zip", "parquet"])
def test_youtube_frames_recover_their_video_from_the_name(tmp_path: Path, form: str) -> None:
    release = youtube(tmp_path / "yt")
    if form == "zip":
        release = zip_tree(release, tmp_path / "Cholecystectomy_and_more.zip")
    elif form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [
            {"bytes": p.read_bytes(), "path": p.relative_to(release).as_posix()} for p in sorted(release.rglob("*.jpg"))
        ]
        release = tmp_path / "hub" / "train-00000-of-00001.parquet"
        release.parent.mkdir()
        pq.write_table(pa.table({"image": pa.array(rows), "label": list(range(len(rows)))}), release, row_group_size=2)
    n, out = run_cli(tmp_path, "source=youtube", f"input={release}")
    frames = frames_of(out)
    assert n == 4 and set(frames) == YOUTUBE_KEYS
    assert frames["abc/frame_9_Sample2"]["video"] == "abc" and len({f["video"] for f in frames.values()}) == 3
    m = json.loads((out / "manifest.json").read_text())
    assert m["videos"] == 3  # abc's frames from Batch1 and Batch2 are one video


def test_hsdb_tar_of_frames_same_keys_as_the_folder_and_resumable(tmp_path: Path) -> None:
    folder = tmp_path / "hSDB-Chole"
    for v in ("R001", "R002"):
        for i in range(3):
            put(folder, f"{v}/{v}_{i:05d}.jpg", 20 * i)
    (folder / "R001" / "coco.json").write_text("{}")
    archive = tar_tree(folder, tmp_path / "hSDB-Chole.tar")
    s = settings()
    a = prepare_source(folder, tmp_path / "a", s, workers=0, progress=False)
    b = prepare_source(archive, tmp_path / "b", s, workers=2, progress=False)
    assert a.frames_total == b.frames_total == 6 and b.files_ignored == {".json": 1}
    assert frames_of(tmp_path / "a").keys() == frames_of(tmp_path / "b").keys()
    shas = lambda out: sorted(x["sha256"] for x in json.loads((out / "manifest.json").read_text())["shards"])  # noqa: E731
    assert shas(tmp_path / "a") == shas(tmp_path / "b")  # same bytes too
    again = prepare_source(archive, tmp_path / "b", s, workers=0, progress=False)
    assert again.units_done_before == 2 and again.units_done_now == 0 and again.frames_total == 6


def test_videos_inside_a_zip_are_decoded(tmp_path: Path) -> None:
    write_video(tmp_path / "c80" / "videos" / "video01.mp4", frames=50, fps=25)
    archive = zip_tree(tmp_path / "c80", tmp_path / "cholec80.zip", top="cholec80")
    s = prepare_source(archive, tmp_path / "out", settings(), workers=0, progress=False)
    assert s.frames_total == 2 and set(frames_of(tmp_path / "out")) == {
        "videos/video01/00000000",
        "videos/video01/00000025",
    }
    assert not list((tmp_path / "out").glob(".*.tmp"))  # the temporary copy is gone


def settings(**kw) -> PrepareSettings:
    return PrepareSettings(**({"source": "t", "fps": 1.0, "sampling": "surgenet"} | kw))


# -------------------------------------------------------------------------------------------- untrusted archives
def test_member_leaving_the_archive_is_refused_naming_archive_and_member(tmp_path: Path) -> None:
    for name in ("../evil.jpg", "/etc/evil.jpg", "C:/evil.jpg", "a/../../evil.jpg"):
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("ok/frame.jpg", tiny_jpeg(1))
            zf.writestr(name, tiny_jpeg(2))
        with pytest.raises(PrepareError, match=rf"bad\.zip: member '{name}' points outside the archive"):
            prepare_source(archive, tmp_path / "out", settings(), workers=0, progress=False)
        assert not (tmp_path / "out").exists()
    tf_path = tmp_path / "bad.tar"
    with tarfile.open(tf_path, "w") as tf:
        info = tarfile.TarInfo("../../x.jpg")
        data = tiny_jpeg(3)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(PrepareError, match=r"bad\.tar: member '\.\./\.\./x\.jpg' points outside"):
        prepare_source(tf_path, tmp_path / "out", settings(), workers=0, progress=False)


def test_oversized_links_and_corrupt_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("v/a.jpg", tiny_jpeg(1))
        zf.writestr("v/bomb.png", b"\0" * 200_000)  # compresses to a few hundred bytes
    monkeypatch.setattr(I, "MAX_IMAGE_BYTES", 100_000)
    with pytest.raises(PrepareError, match=r"big\.zip: member 'v/bomb\.png' declares 200,000 bytes, over the 100,000"):
        prepare_source(big, tmp_path / "out", settings(), workers=0, progress=False)
    monkeypatch.undo()
    # A tar's links are never followed (counted as ignored); a member whose bytes fail the zip's CRC is a corrupt
    # image named with its archive, the others are kept.
    links = tmp_path / "links.tar"
    with tarfile.open(links, "w") as tf:
        data = tiny_jpeg(5)
        info = tarfile.TarInfo("v/a.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("v/passwd.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    s = prepare_source(links, tmp_path / "links", settings(), workers=0, progress=False)
    assert s.frames_total == 1 and s.files_ignored == {".jpg (link/device)": 1}
    bad = tmp_path / "crc.zip"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("v/a.jpg", tiny_jpeg(1))
        zf.writestr("v/b.jpg", tiny_jpeg(2))
    raw = bytearray(bad.read_bytes())
    second = raw.find(b"v/b.jpg") + len("v/b.jpg") + 40  # inside b.jpg's data
    raw[second] ^= 0xFF
    bad.write_bytes(bytes(raw))
    s = prepare_source(bad, tmp_path / "crc", settings(), workers=0, progress=False)
    assert s.frames_total == 1 and s.images_corrupt == 1
    with pytest.raises(PrepareError, match=r"compressed tar.*gunzip -k"):
        shutil.copy(links, tmp_path / "x.tar.gz")
        prepare_source(tmp_path / "x.tar.gz", tmp_path / "gz", settings(), workers=0, progress=False)


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PrepareError, match=r"needs pyarrow: pip install 'surgenet-ssl\[parquet\]'"):
        prepare_source(tmp_path / "t.parquet", tmp_path / "out", settings(), workers=0, progress=False)


# ------------------------------------------------------------------------------------------------ frame selection
def authors_rule(fps: float, n: int) -> list[int]:
    """SurgeNet's extraction as written in their script: keep frame i when i % int(fps) == 0."""
    return [i for i in range(n) if i % int(fps) == 0]


@pytest.mark.parametrize("fps", [25, 29.97, 50, 59.94, 23.976])
def test_surgenet_sampling_equals_the_authors_rule_over_20_s(fps: float) -> None:
    n = round(20 * fps)
    step = sampling_step(fps, 1, "surgenet")
    assert list(range(0, n, step)) == authors_rule(fps, n)
    ours = len(range(0, n, sampling_step(fps, 1, "round")))
    assert (len(authors_rule(fps, n)), ours) == {
        25: (20, 20), 29.97: (21, 20), 50: (20, 20), 59.94: (21, 20), 23.976: (21, 20)
    }[fps]  # fmt: skip


def test_decoded_frames_follow_the_rule_at_each_frame_rate(tmp_path: Path) -> None:
    rates = {"r25": Fraction(25), "r2997": Fraction(30000, 1001), "r50": Fraction(50), "r5994": Fraction(60000, 1001)}
    for name, rate in rates.items():
        write_video(tmp_path / "in" / f"{name}.mp4", frames=60, fps=rate)
    for rule in ("surgenet", "round"):
        out = tmp_path / rule
        prepare_source(tmp_path / "in", out, settings(sampling=rule), workers=0, progress=False)
        got: dict[str, list[int]] = {}
        for f in frames_of(out).values():
            got.setdefault(f["video"], []).append(f["frame_index"])
        for name, rate in rates.items():
            step = int(rate) if rule == "surgenet" else round(rate)
            assert sorted(got[name]) == list(range(0, 60, step)), (rule, name)


def test_frame_list_keeps_only_the_listed_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_video(tmp_path / "in" / "video01.mp4", frames=50, fps=25)
    for i in range(4):
        put(tmp_path / "in", f"imgs/f{i}.jpg", 30 * i)
    listing = tmp_path / "list.txt"
    listing.write_text("# the authors' frames\nvideo01/00000007\nvideo01,31\nimgs/f2.jpg\nvideo01/999\nnot/there\n")
    with caplog.at_level("INFO"):
        s = prepare_source(
            tmp_path / "in", tmp_path / "out", settings(frame_list=str(listing)), workers=0, progress=False
        )
    frames = frames_of(tmp_path / "out")
    assert s.frames_total == 3 and set(frames) == {"video01/00000007", "video01/00000031", "imgs/f2"}
    assert "5 entries; 4 frames in 2 of 2 inputs match; 1 entries match no input" in caplog.text
    assert "1 frames of frame_list are past its end" in caplog.text
    listing.write_text("video01/00000007\n")
    with pytest.raises(PrepareError, match="frame_list_sha256"):
        prepare_source(tmp_path / "in", tmp_path / "out", settings(frame_list=str(listing)), workers=0, progress=False)


def test_include_exclude_patterns() -> None:
    sel = Selection(include=("image*.png", "keep/*"), exclude=("anno_*",))
    assert sel.keeps("a/b/image01.png") and not sel.keeps("a/b/mask01.png") and not sel.keeps("a/anno_2/image01.png")
    assert sel.keeps("keep/x.jpg") and not sel.keeps("other/keep/x.jpg")  # a pattern with '/' is the whole path
    assert Selection(include=("Full",)).keeps("Hei-Chole1.mp4", root_name="Full")
    assert not Selection(exclude=("HD",)).keeps("Full/HD/a.mp4") and Selection(exclude=("HD",)).keeps("Full/a.mp4")


def test_glenda_v15_zips_in_a_folder_or_given_one_by_one(tmp_path: Path) -> None:
    put(tmp_path / "f", "v_1_s_2/f_1.jpg")
    put(tmp_path / "f", "v_1_s_2/f_2.jpg")
    put(tmp_path / "a", "v_1_s_2/f_1/endometriosis.png")
    (tmp_path / "GLENDA").mkdir()
    frames = zip_tree(tmp_path / "f", tmp_path / "GLENDA" / "frames.zip")
    annots = zip_tree(tmp_path / "a", tmp_path / "GLENDA" / "annots.zip")
    n, out = run_cli(tmp_path, "source=glenda", f"input={tmp_path / 'GLENDA'}")
    assert n == 2 and set(frames_of(out)) == {"frames/v_1_s_2/f_1", "frames/v_1_s_2/f_2"}
    with pytest.raises(SystemExit):  # the annotations zip alone holds no frame: a clear error, no manifest
        run_cli(tmp_path, "source=glenda", f"input={annots}", f"output={tmp_path / 'a_only'}")
    assert not (tmp_path / "a_only" / "manifest.json").exists()
    n, out = run_cli(tmp_path, "source=glenda", f"input=[{frames},{annots}]", f"output={tmp_path / 'both'}")
    assert n == 2 and set(frames_of(out)) == {"v_1_s_2/f_1", "v_1_s_2/f_2"}
