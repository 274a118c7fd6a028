"""Footage: synthetic scenes, detectors, video sampling, ingest into an index, camera/time filters and
track grouping in the CLI and the API, and the one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbps.cli import main
from tbps.errors import TBPSError
from tbps.footage import detect
from tbps.footage.evaluate import box_iou, detection_ap
from tbps.footage.ingest import find_sources, sample_video
from tbps.footage.scenes import load_annotations, render_frame

from tiny_footage import CAMERAS, build_tiny_footage_index, make_scenes
from tiny_models import RunsCode


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    root = tmp_path_factory.mktemp("footage")
    index, scenes = build_tiny_footage_index(root)
    return index, scenes, root


# ----------------------------------------------------------------------------- scenes

def test_scene_boxes_are_what_was_drawn(tmp_path):
    """Every pixel a person changed lies in some box, and each fully visible person's box is tight:
    its four edges each touch a changed pixel. Checked against a re-render without the people."""
    from tbps.data import synth
    from tbps.footage import scenes as sc

    people = sc.test_identities(60, 3)
    looks = {pid: synth.draw_looks(np.random.default_rng([3, 2, pid])) for pid in people}
    pids = sorted(people)
    tracks = sc._plan_tracks(np.random.default_rng(0), pids, 6, 3, 256, 192, 0)
    background = synth.make_backgrounds(np.random.default_rng(1), 192, 128, 1)[0]
    checked = 0
    for frame in range(6):
        drawn, notes = render_frame(background, tracks, frame, people, looks)
        empty, none = render_frame(background, tracks, frame, people, looks, draw_people=False)
        assert none == []
        changed = np.any(np.asarray(drawn) != np.asarray(empty), axis=2)
        inside = np.zeros_like(changed)
        for note in notes:
            x0, y0, x1, y1 = note["box"]
            inside[y0:y1, x0:x1] = True
        assert not (changed & ~inside).any()
        for note in notes:
            x0, y0, x1, y1 = note["box"]
            if note["visible"] == 1.0:
                region = changed[y0:y1, x0:x1]
                assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
                checked += 1
    assert checked >= 4


def test_scenes_folder_layout_and_annotations(tmp_path):
    make_scenes(tmp_path, frames=3)
    data = load_annotations(tmp_path)
    assert data["cameras"] == list(CAMERAS) and len(data["frames"]) == 6
    assert all((tmp_path / r["image"]).is_file() for r in data["frames"])
    assert all((tmp_path / "videos" / f"{c}.mp4").is_file() for c in CAMERAS)
    shown = {p["pid"] for r in data["frames"] for p in r["people"]}
    assert shown == {int(pid) for pid in data["identities"]}
    assert all(len(e["captions"]) == 2 for e in data["identities"].values())
    # the people are the test split of `tbps synth --ids 60 --seed 3`: ids 49..60
    assert min(shown) > 48 and max(shown) <= 60


# ----------------------------------------------------------------------------- video sampling

def test_video_sampling_rate_and_times(tmp_path):
    make_scenes(tmp_path, frames=6)  # 2 fps video of 6 frames: 0, 0.5, ..., 2.5 s
    path = tmp_path / "videos" / "cam01.mp4"
    every = list(sample_video(path))
    assert [n for n, _, _ in every] == list(range(6))
    assert [t for _, t, _ in every] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    one_per_second = list(sample_video(path, sample_fps=1.0))
    assert [n for n, _, _ in one_per_second] == [0, 2, 4]
    # the decoded frame is the frame that was written (H.264 at high quality: small error)
    written = np.asarray(Image.open(tmp_path / "frames" / "cam01" / "000004.jpg"), dtype=np.float32)
    decoded = np.asarray(one_per_second[2][2], dtype=np.float32)
    assert decoded.shape == written.shape and np.abs(decoded - written).mean() < 6.0


def test_corrupt_video_is_one_line_error_and_counted_when_indexing(tmp_path, footage, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(TBPSError) as err:
        list(sample_video(bad))
    assert str(bad) in str(err.value) and "unreadable video" in str(err.value) and "\n" not in str(err.value)
    # in a folder with a good video it is skipped and counted; alone it stops the run in one line
    _, scenes, root = footage
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(scenes / "videos" / "cam01.mp4", folder / "cam01.mp4")
    shutil.copy(bad, folder / "cam02.mp4")
    assert main(["index", "--checkpoint", str(root / "model.pt"), "--footage", str(folder), "--out",
                 str(tmp_path / "index"), "--detector", f"boxes:{scenes / 'annotations.json'}", "--device", "cpu",
                 "--workers", "0", "--quiet"]) == 0
    assert "skipped 1 unreadable source(s)" in capsys.readouterr().out
    assert main(["index", "--checkpoint", str(root / "model.pt"), "--footage", str(bad), "--out",
                 str(tmp_path / "index2"), "--device", "cpu", "--quiet"]) == 1
    err_line = capsys.readouterr().err.strip()
    assert err_line.startswith("tbps: error: ") and "no readable footage" in err_line and "\n" not in err_line


# ----------------------------------------------------------------------------- sources and manifest

def test_cameras_from_layout_and_manifest(tmp_path):
    make_scenes(tmp_path, frames=2)
    sources = find_sources(tmp_path / "frames")  # footage.json there: cameras and start times
    assert [(s.camera, s.kind, s.fps) for s in sources] == [("cam01", "frames", 2.0), ("cam02", "frames", 2.0)]
    assert sources[1].start - sources[0].start == 600.0
    (tmp_path / "frames" / "footage.json").unlink()
    sources = find_sources(tmp_path / "frames", frame_rate=5.0)
    assert [(s.camera, s.start, s.fps) for s in sources] == [("cam01", None, 5.0), ("cam02", None, 5.0)]
    assert [s.camera for s in find_sources(tmp_path / "videos" / "cam02.mp4")] == ["cam02"]


def test_missing_manifest_entry_is_one_line_error(tmp_path):
    make_scenes(tmp_path, frames=2, videos=False)
    manifest = tmp_path / "frames" / "footage.json"
    data = json.loads(manifest.read_text())
    del data["sources"]["cam02"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(TBPSError, match=r"footage.json: no entry for 'cam02'") as err:
        find_sources(tmp_path / "frames")
    assert "\n" not in str(err.value)
    data["sources"]["cam02"] = {"camera": "gate", "start": "yesterday"}
    manifest.write_text(json.dumps(data))
    with pytest.raises(TBPSError, match="'start': 'yesterday' is not a time"):
        find_sources(tmp_path / "frames")


# ----------------------------------------------------------------------------- index, search, filters

def test_footage_index_rows_carry_camera_time_box(footage):
    from tbps.search.index import GalleryIndex

    index, scenes, _ = footage
    gallery = GalleryIndex(index)
    data = load_annotations(scenes)
    truth = sum(1 for r in data["frames"] for p in r["people"] if not p["ignore"])
    assert gallery.size == truth and len(gallery.metadata) == truth
    for path, meta in zip(gallery.paths, gallery.metadata):
        x0, y0, x1, y1 = meta["box"]
        assert Image.open(path).size == (x1 - x0, y1 - y0)
        assert meta["camera"] in CAMERAS and meta["absolute_time"]
        frame = next(r for r in data["frames"] if r["camera"] == meta["camera"] and r["index"] == meta["frame_number"])
        assert any(box_iou(meta["box"], p["box"]) == 1.0 for p in frame["people"])


def test_ingest_resumes_and_appends(tmp_path, footage):
    _, scenes, root = footage
    from tbps.footage.detect import BoxesDetector
    from tbps.footage.ingest import build_footage_index

    detector = BoxesDetector(scenes / "annotations.json")
    partial = tmp_path / "partial"
    shutil.copytree(scenes / "frames" / "cam01", partial / "cam01")
    options = dict(progress=False, batch_size=8, device="cpu", num_workers=0)
    first = build_footage_index(root / "model.pt", partial, tmp_path / "index", detector, **options)
    shutil.copytree(scenes / "frames" / "cam02", partial / "cam02")
    second = build_footage_index(root / "model.pt", partial, tmp_path / "index", detector, **options)
    assert first["already_ingested"] == 0 and second["already_ingested"] == 1
    assert second["added"] > 0 and second["total"] == first["total"] + second["added"]
    again = build_footage_index(root / "model.pt", partial, tmp_path / "index", detector, **options)
    assert again["added"] == 0 and again["total"] == second["total"]


def _search_json(index: Path, capsys, *options: str) -> list[dict]:
    code = main(["search", "--index", str(index), "--device", "cpu", "--json", "--top-k", "50", *options,
                 "a woman in a red coat"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_camera_and_time_filters_in_cli(footage, capsys):
    index, _, _ = footage
    everything = _search_json(index, capsys)
    assert {r["camera"] for r in everything} == set(CAMERAS)
    assert all(set(r) >= {"rank", "path", "score", "camera", "time", "box"} for r in everything)
    only = _search_json(index, capsys, "--camera", "cam02")
    assert only and {r["camera"] for r in only} == {"cam02"}
    assert len(only) == sum(r["camera"] == "cam02" for r in everything)
    # cam01 starts 08:00:00 (2 fps, 6 frames: up to 08:00:02.5); cam02 starts 08:10:00
    window = _search_json(index, capsys, "--time-from", "2026-01-05T08:00:01", "--time-to", "2026-01-05T08:05:00")
    assert window and all(r["camera"] == "cam01" and r["time"] >= 1767600001.0 for r in window)
    assert len(window) == sum(r["camera"] == "cam01" and r["time"] >= 1767600001.0 for r in everything)
    scores = {r["path"]: r["score"] for r in everything}
    assert all(scores[r["path"]] == pytest.approx(r["score"], abs=1e-5) for r in only)


@pytest.mark.parametrize("options, message", [
    (["--time-from", "2026-01-05T09:00:00", "--time-to", "2026-01-05T08:00:00"], "inverted time range"),
    (["--camera", "cam09"], "camera 'cam09' is not in the index (cameras: cam01, cam02)"),
    (["--time-from", "noon"], "time-from: 'noon' is not a time"),
])
def test_bad_filters_are_one_line_errors_in_cli(footage, capsys, options, message):
    index, _, _ = footage
    assert main(["search", "--index", str(index), "--device", "cpu", *options, "a man"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tbps: error: ") and message in err and err.count("\n") == 1


def test_filters_on_an_index_of_crops_are_refused(tmp_path, capsys):
    from tiny_gallery import build_tiny_index

    index = build_tiny_index(tmp_path)
    assert main(["search", "--index", str(index), "--device", "cpu", "--camera", "cam01", "a man"]) == 1
    assert "need an index of footage" in capsys.readouterr().err


def test_group_tracks_gives_one_hit_per_track(footage):
    from tbps.search.searcher import Searcher

    index, _, _ = footage
    searcher = Searcher(index, device="cpu")
    plain = searcher.search(["a man in a blue shirt"], top_k=searcher.size)[0]
    grouped = searcher.search(["a man in a blue shirt"], top_k=searcher.size, group_tracks=True)[0]
    tracks = [r["track"] for r in grouped]
    assert len(tracks) == len(set(tracks)) == len({r["track"] for r in plain}) < len(plain)
    # each track is represented by its best-scoring crop, in the plain ranking's order
    best = {}
    for r in plain:
        best.setdefault(r["track"], r["index"])
    assert [r["index"] for r in grouped] == [best[t] for t in dict.fromkeys(r["track"] for r in plain)]


def test_tracks_follow_one_person(footage):
    """A track links crops of one camera in consecutive frames, and (in these scenes) one identity."""
    from tbps.footage.evaluate import crop_identities
    from tbps.search.index import GalleryIndex

    index, scenes, _ = footage
    gallery = GalleryIndex(index)
    owners = crop_identities(gallery.metadata, scenes)
    by_track: dict[str, set] = {}
    for meta, pid in zip(gallery.metadata, owners):
        by_track.setdefault(meta["track"], set()).add(pid)
    assert all(None not in pids for pids in by_track.values())
    pure = sum(len(pids) == 1 for pids in by_track.values())
    assert pure >= 0.8 * len(by_track)


# ----------------------------------------------------------------------------- API

@pytest.fixture(scope="module")
def client(footage):
    from fastapi.testclient import TestClient

    from tbps.search.searcher import Searcher
    from tbps.serve import create_app

    return TestClient(create_app(Searcher(footage[0], device="cpu")), base_url="http://127.0.0.1:8000")


def test_api_filters_and_frame(client):
    health = client.get("/healthz").json()
    assert health["cameras"] == list(CAMERAS)
    everything = client.get("/api/search", params={"q": "a man", "k": 100}).json()["results"]
    only = client.get("/api/search", params={"q": "a man", "k": 100, "camera": "cam01"}).json()["results"]
    assert only and {r["camera"] for r in only} == {"cam01"} and len(only) < len(everything)
    late = client.get("/api/search", params={"q": "a man", "k": 100, "from": "2026-01-05T08:10:00Z"}).json()["results"]
    assert late and all(r["camera"] == "cam02" for r in late)
    grouped = client.get("/api/search", params={"q": "a man", "k": 100, "group": "on"}).json()["results"]
    assert len({r["track"] for r in grouped}) == len(grouped) < len(everything)
    hit = only[0]
    assert hit["frame_url"] == hit["url"].replace("/images/", "/frames/")
    response = client.get(hit["frame_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    import io

    frame = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)
    assert frame.shape[:2] == (192, 256)
    x0, y0, x1, y1 = hit["box"]
    edge = frame[y0 + 1:y1 - 1, x0]  # the left side of the drawn box is red
    assert (edge[:, 0] > 180).mean() > 0.9 and (edge[:, 1] < 80).mean() > 0.9


@pytest.mark.parametrize("params, message", [
    ({"from": "2026-01-05T09:00:00", "to": "2026-01-05T08:00:00"}, "inverted time range"),
    ({"camera": "cam09"}, "camera 'cam09' is not in the index"),
    ({"from": "noon"}, "'noon' is not a time"),
    ({"group": "yes"}, "'group' must be 'on' or 'off'"),
    ({"to": "1" * 41}, "parameter 'to' must be a time"),
])
def test_api_bad_filters_are_400(client, params, message):
    response = client.get("/api/search", params={"q": "a man", **params})
    assert response.status_code == 400 and message in response.json()["error"]


def test_frame_swapped_for_a_link_outside_the_footage_is_404(tmp_path):
    """A frame replaced by a symlink to an image elsewhere after indexing is not served."""
    from fastapi.testclient import TestClient

    from tbps.search.searcher import Searcher
    from tbps.serve import create_app

    index, _ = build_tiny_footage_index(tmp_path)
    searcher = Searcher(index, device="cpu")
    client = TestClient(create_app(searcher), base_url="http://127.0.0.1:8000")
    assert client.get("/frames/0").status_code == 200
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8), (0, 255, 0)).save(outside)
    frame = Path(searcher.frame_path(0))
    frame.unlink()
    frame.symlink_to(outside)
    response = client.get("/frames/0")
    assert response.status_code == 404 and "not a regular file inside its footage folder" in response.json()["error"]


def test_frame_of_a_plain_image_is_404(tmp_path):
    from fastapi.testclient import TestClient

    from tbps.search.searcher import Searcher
    from tbps.serve import create_app
    from tiny_gallery import build_tiny_index

    client = TestClient(create_app(Searcher(build_tiny_index(tmp_path), device="cpu")), base_url="http://127.0.0.1:8000")
    response = client.get("/frames/0")
    assert response.status_code == 404 and "not a crop of footage" in response.json()["error"]
    assert "cameras" not in client.get("/healthz").json()


# ----------------------------------------------------------------------------- detectors

def test_detection_ap_against_direct_computation():
    truths = [[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10]]]
    detections = [[([0, 0, 10, 10], 0.9), ([50, 50, 60, 60], 0.8), ([20, 20, 30, 31], 0.4)],
                  [([1, 0, 10, 10], 0.7), ([0, 0, 10, 10], 0.6)]]
    # by score: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP (truth already matched), 0.4 TP; 3 truths
    # precision 1, 1/2, 2/3, 2/4, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1
    # AP = 1/3 * 1 + 1/3 * max(2/3, 1/2, 3/5) + 1/3 * 3/5
    expected = 100 * (1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 5)
    assert detection_ap(detections, truths) == pytest.approx(expected)
    # a detection on an ignored (hidden) person is neither right nor wrong
    ignored = [[[50, 50, 60, 60]], []]
    expected_ignored = 100 * (1 / 3 * 1 + 1 / 3 * 1 + 1 / 3 * 3 / 4)
    assert detection_ap(detections, truths, ignored) == pytest.approx(expected_ignored)
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)


def test_hog_detector_finds_drawn_people(tmp_path):
    make_scenes(tmp_path, frames=2, videos=False)
    from tbps.footage.evaluate import detector_ap

    result = detector_ap(detect.HOGDetector(), tmp_path)
    assert result["frames"] == 4 and result["truths"] > 0 and 0.0 <= result["AP50"] <= 100.0
    assert result["recall"] > 0  # OpenCV's INRIA-trained people detector sees the synthetic people


def _save_random(arch: str, path: Path, num_classes: int, **kwargs) -> torch.nn.Module:
    import torchvision.models.detection as detection

    torch.manual_seed(0)
    model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    torch.save(model.state_dict(), path)
    return model


@pytest.mark.parametrize("arch", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_torchvision_detector_loads_a_weight_file(tmp_path, arch):
    model = _save_random(arch, tmp_path / "person.pth", num_classes=2)
    detector = detect.build_detector(arch, str(tmp_path / "person.pth"), min_score=0.0)
    assert detector.num_classes == 2
    loaded = detector.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    found = detector(Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)),
                     detect.FrameRef("cam", 0))
    assert all(isinstance(d, detect.Detection) and 0 <= d.score <= 1 and d.box[2] >= d.box[0] for d in found)


def test_torchvision_detector_uses_the_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"
    assert detect.torchvision_cache_file("ssdlite320_mobilenet_v3_large") == expected
    with pytest.raises(TBPSError, match="no weight file for detector ssdlite320_mobilenet_v3_large.*nothing is downloaded"):
        detect.build_detector("ssdlite320_mobilenet_v3_large")
    expected.parent.mkdir(parents=True)
    _save_random("ssdlite320_mobilenet_v3_large", expected, num_classes=91)
    detector = detect.build_detector("ssdlite320_mobilenet_v3_large")
    assert detector.num_classes == 91 and detector.person_label == 1 and detector.path == expected


def test_torchvision_detector_refuses_other_files(tmp_path):
    _save_random("ssdlite320_mobilenet_v3_large", tmp_path / "ssd.pth", num_classes=2)
    with pytest.raises(TBPSError, match=r"ssd.pth: not fasterrcnn_mobilenet_v3_large_320_fpn weights"):
        detect.build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", str(tmp_path / "ssd.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a weight file")
    with pytest.raises(TBPSError, match="junk.pth: cannot read a torchvision weight file"):
        detect.build_detector("ssdlite320_mobilenet_v3_large", str(tmp_path / "junk.pth"))
    marker = tmp_path / "ran"
    torch.save({"x": RunsCode(str(marker))}, tmp_path / "evil.pth")  # unpickling it would create marker
    with pytest.raises(TBPSError, match="evil.pth: refused: .* could run code"):
        detect.build_detector("ssdlite320_mobilenet_v3_large", str(tmp_path / "evil.pth"))
    assert not marker.exists()
    with pytest.raises(TBPSError, match="detector 'yolo'"):
        detect.build_detector("yolo")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn"])
def test_resnet50_detectors_load_a_weight_file(tmp_path, arch):
    _save_random(arch, tmp_path / "w.pth", num_classes=3)
    detector = detect.build_detector(arch, str(tmp_path / "w.pth"), min_score=0.0)
    assert detector.num_classes == 3


def test_track_affinity_against_direct_computation():
    from tbps.footage.ingest import track_affinity

    person = [100, 50, 140, 250]  # 200 pixels tall
    assert track_affinity(person, person) == 1.0
    # 60 px sideways = 0.3 heights: no overlap left for IoU, but half the 0.6-height gate
    assert box_iou(person, [160, 50, 200, 250]) == 0.0
    assert track_affinity(person, [160, 50, 200, 250]) == pytest.approx(1 - 0.3 / 0.6)
    assert track_affinity(person, [230, 50, 270, 250]) == 0.0  # 0.65 heights away
    assert track_affinity(person, [100, 80, 140, 280]) == pytest.approx(1 - 0.15 / 0.25)
    assert track_affinity(person, [100, 50, 140, 120]) == 0.0  # a third of the height: someone else


def test_trained_hog_detector_learns_the_scenes(tmp_path, capsys):
    """Trained on two small scene sets, it detects people in a third (other seed: other people and
    backgrounds) at least as well as chance allows, and loads back through --detector hog:FILE."""
    from tbps.footage.evaluate import detector_ap
    from tbps.footage.scenes import generate_scenes

    for seed in (5, 6):
        generate_scenes(tmp_path / f"train{seed}", num_ids=60, cameras=2, frames_per_camera=4, height=192, width=256,
                        seed=seed, videos=False, progress=False)
    assert main(["train-detector", "--scenes", str(tmp_path / "train5"), str(tmp_path / "train6"),
                 "--out", str(tmp_path / "hog.npz")]) == 0
    assert "hog:" in capsys.readouterr().out
    detector = detect.build_detector(f"hog:{tmp_path / 'hog.npz'}")
    make_scenes(tmp_path / "held-out", frames=3, videos=False)
    result = detector_ap(detector, tmp_path / "held-out")
    assert result["recall"] > 30.0 and result["AP50"] > 10.0
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(TBPSError, match="bad.npz: not a trained HOG detector file"):
        detect.build_detector(f"hog:{tmp_path / 'bad.npz'}")
    with pytest.raises(TBPSError, match="missing.npz: trained HOG detector file not found"):
        detect.build_detector(f"hog:{tmp_path / 'missing.npz'}")


def test_synth_scenes_command(tmp_path, capsys):
    assert main(["synth", "--scenes", "--out", str(tmp_path), "--ids", "60", "--cameras", "2", "--frames", "2",
                 "--scene-width", "256", "--scene-height", "192", "--no-videos", "--quiet"]) == 0
    assert "wrote 4 frames of 2 cameras" in capsys.readouterr().out
    assert not (tmp_path / "videos").exists() and len(load_annotations(tmp_path)["frames"]) == 4
    assert main(["synth", "--scenes", "--out", str(tmp_path), "--scene-width", "255"]) == 1
    assert "even sizes" in capsys.readouterr().err


def test_one_writer_per_footage_index(tmp_path, footage):
    from tbps.footage.detect import BoxesDetector
    from tbps.footage.ingest import build_footage_index
    from tbps.search.index import _writer_lock

    _, scenes, root = footage
    with _writer_lock(tmp_path / "index"):
        with pytest.raises(TBPSError, match="another tbps index is writing to this index"):
            build_footage_index(root / "model.pt", scenes / "frames", tmp_path / "index",
                                BoxesDetector(scenes / "annotations.json"), progress=False, device="cpu")


def test_unreadable_frames_are_skipped_and_counted(tmp_path, footage, capsys):
    _, scenes, root = footage
    folder = tmp_path / "footage" / "cam01"
    shutil.copytree(scenes / "frames" / "cam01", folder)
    (folder / "000002.jpg").write_bytes(b"\xff\xd8 truncated")
    assert main(["index", "--checkpoint", str(root / "model.pt"), "--footage", str(tmp_path / "footage"), "--out",
                 str(tmp_path / "index"), "--detector", f"boxes:{scenes / 'annotations.json'}", "--device", "cpu",
                 "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "5 sampled frames" in out and "1 unreadable frame(s)" in out


@pytest.mark.slow
def test_demo_scenes_with_a_given_checkpoint(tmp_path, footage, capsys):
    """`tbps demo --scenes --checkpoint`: footage, detector, index under --out, searches, metrics."""
    _, _, root = footage
    assert main(["demo", "--scenes", "--checkpoint", str(root / "model.pt"), "--out", str(tmp_path / "demo"),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "text -> person in footage" in out and "R@10" in out
    metrics = json.loads((tmp_path / "demo" / "footage_metrics.json").read_text())
    assert set(metrics) == {"plain", "grouped"} and metrics["plain"]["queries"] > 0
    assert (tmp_path / "demo" / "footage_index" / "manifest.json").is_file()


def test_index_inside_the_footage_folder_is_refused(footage, capsys):
    _, scenes, root = footage
    assert main(["index", "--checkpoint", str(root / "model.pt"), "--footage", str(scenes / "frames"), "--out",
                 str(scenes / "frames" / "index"), "--device", "cpu", "--quiet"]) == 1
    assert "is inside the footage folder" in capsys.readouterr().err
    assert not (scenes / "frames" / "index").exists()
