"""fetch_data.py (make data) without a network: the built-in manifest's shape, downloads from file:// URLs into
the data/external layout, checksum verification (published and recorded), zip members, resume, refusals."""
import hashlib
import io
import json
import urllib.request
import zipfile

import pytest

import fetch_data as fd


def test_builtin_manifest_is_complete_and_lands_where_the_loaders_look():
    entries = fd.load_manifest()
    names = {e["name"] for e in entries}
    assert {"spose", "unique_id", "triplets", "levels", "brain_data", "things_images", "coco_train2017",
            "imagenet_train", "clip", "dinov2", "resnet50"} <= names
    targets = {e["name"]: e["target"] for e in entries}
    # the names data.py and images.py read (DESIGN.md, "Real human data formats")
    assert targets["spose"] == "data/external/spose_embedding_66d_sorted.txt"
    assert targets["triplets"] == "data/external/THINGS_triplets.csv"
    assert targets["things_images"] == "data/external/THINGS"
    assert targets["coco_train2017"] == "data/external/coco/train2017"
    assert targets["dinov2"] == "data/weights/dinov2.safetensors"  # where backbones.py looks first
    for e in entries:
        assert e["url"].startswith(("https://", "http://")) and e["target"].startswith("data/")
    assert next(e for e in entries if e["name"] == "imagenet_train")["manual"]
    assert next(e for e in entries if e["name"] == "resnet50")["sha256"] == "11ad3fa6"  # torch hub's hash prefix
    assert {e["group"] for e in fd.select(entries, "human", "")} == {"human"}
    with pytest.raises(fd.FetchError, match="not in the manifest"):
        fd.select(entries, "", "nosuch")


@pytest.fixture
def remote(tmp_path):
    """Files a publisher would serve: a text file, a zip with a folder (and __MACOSX junk), a zip with one file."""
    src = tmp_path / "remote"
    src.mkdir()
    (src / "spose.txt").write_text("0.1 0.2\n0.3 0.4\n")
    with zipfile.ZipFile(src / "images.zip", "w") as z:
        for c in ["aardvark", "banana"]:
            for k in range(2):
                z.writestr(f"images/{c}/{c}_{k:02d}b.jpg", f"{c}{k}".encode())
        z.writestr("__MACOSX/images/._aardvark", b"junk")
        z.writestr("images/README", b"readme")
    with zipfile.ZipFile(src / "trip.zip", "w") as z:
        z.writestr("triplet_dataset/triplets.csv", "image1\timage2\timage3\tchoice\tsubject_id\n1\t2\t3\t1\t1\n")
        z.writestr("triplet_dataset/other.csv", "x")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    manifest = [
        dict(name="spose", group="human", url=(src / "spose.txt").as_uri(), target="data/external/spose.txt",
             sha256=sha(src / "spose.txt")),
        dict(name="things", group="images", url=(src / "images.zip").as_uri(), target="data/external/THINGS",
             kind="zip", member="images/"),
        dict(name="triplets", group="human", url=(src / "trip.zip").as_uri(),
             target="data/external/THINGS_triplets.csv",
             kind="zip", member="triplet_dataset/triplets.csv"),
        dict(name="imagenet", group="images", url="https://example.org/by-hand", target="data/external/imagenet/train",
             manual=True, note="needs an account"),
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return dict(src=src, manifest=str(path), root=tmp_path / "repo")


def test_fetch_layout_checksums_and_skip(remote, capsys):
    root = str(remote["root"])
    res = fd.main(["--manifest", remote["manifest"], "--root", root, "--only", "human,images"])
    assert res == dict(spose="fetched", things="fetched", triplets="fetched", imagenet="manual")
    ext = remote["root"] / "data" / "external"
    assert (ext / "spose.txt").read_text() == "0.1 0.2\n0.3 0.4\n"
    assert sorted(p.relative_to(ext / "THINGS").as_posix() for p in (ext / "THINGS").rglob("*") if p.is_file()) == \
        ["README", "aardvark/aardvark_00b.jpg", "aardvark/aardvark_01b.jpg", "banana/banana_00b.jpg",
         "banana/banana_01b.jpg"]
    assert (ext / "THINGS_triplets.csv").read_text().startswith("image1\timage2")
    assert not list(remote["root"].rglob("*.part")) and not list(remote["root"].rglob("*.zip"))
    sums = fd.read_sums(root)  # no published sha256 for the zips: theirs were recorded
    assert sums["data/external/THINGS.zip"] == hashlib.sha256((remote["src"] / "images.zip").read_bytes()).hexdigest()
    assert "data/external/spose.txt" not in sums  # a published checksum needs no record
    assert "by hand from https://example.org/by-hand" in capsys.readouterr().out

    def no_network(*a, **k):
        raise AssertionError("an existing target must not be downloaded again")
    assert fd.main(["--manifest", remote["manifest"], "--root", root], opener=no_network)["spose"] == "skipped"

    assert dict(fd.main(["--manifest", remote["manifest"], "--root", root, "--verify"]))["spose"] == "ok"
    (ext / "spose.txt").write_text("tampered\n")
    with pytest.raises(SystemExit):
        fd.main(["--manifest", remote["manifest"], "--root", root, "--verify"])


def test_checksum_mismatch_and_recorded_sums(remote, tmp_path):
    m = json.loads(open(remote["manifest"]).read())
    m[0]["sha256"] = "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="sha256 of .*spose.txt is [0-9a-f]{64}, expected 0{64}"):
        fd.main(["--manifest", str(bad), "--root", str(remote["root"]), "--name", "spose"])
    assert not list(remote["root"].rglob("spose.txt*"))  # neither the target nor the .part is left
    # a recorded checksum guards later downloads of a file without a published one
    e = fd.check_manifest([dict(m[2])])[0]
    root = str(remote["root"])
    fd.fetch(e, root)
    key = "data/external/THINGS_triplets.csv.zip"
    assert key in fd.read_sums(root)
    fd.record_sum(root, key, "f" * 64)
    with pytest.raises(fd.FetchError, match="recorded in data/SHA256SUMS"):
        fd.fetch(e, root, force=True)


def test_resume_with_range_and_refusals(remote, tmp_path):
    payload = (remote["src"] / "spose.txt").read_bytes()

    class Response(io.BytesIO):
        def __init__(self, body, status):
            super().__init__(body)
            self.status, self.headers = status, {"Content-Length": str(len(body))}

    seen = []

    def opener(req, timeout):
        rng = req.get_header("Range")
        seen.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        return Response(payload[start:], 206 if rng else 200)

    e = fd.check_manifest([json.loads(open(remote["manifest"]).read())[0]])[0]
    target = remote["root"] / e["target"]
    target.parent.mkdir(parents=True)
    (remote["root"] / (e["target"] + ".part")).write_bytes(payload[:5])  # an interrupted download
    assert fd.fetch(e, str(remote["root"]), opener=opener) == "fetched"
    assert seen == ["bytes=5-"] and target.read_bytes() == payload

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("images/../../escape.txt", b"x")
    e = fd.check_manifest([dict(name="evil", group="x", url=evil.as_uri(), target="data/external/E", kind="zip",
                                member="images/")])[0]
    with pytest.raises(fd.FetchError, match="outside"):
        fd.fetch(e, str(remote["root"]))
    assert not (remote["root"] / "data" / "escape.txt").exists()
    for bad, why in [(dict(name="a", group="g", url="u", target="/abs"), "relative"),
                     (dict(name="a", group="g", url="u", target="data/../../x"), "relative"),
                     (dict(name="a", group="g", url="u"), "missing"),
                     (dict(name="a", group="g", url="u", target="t", colour="red"), "unknown"),
                     (dict(name="a", group="g", url="u", target="t", sha256="xyz"), "not hex")]:
        with pytest.raises(fd.FetchError, match=why):
            fd.check_manifest([bad])
    with pytest.raises(fd.FetchError, match="download failed"):
        fd.download((tmp_path / "missing.bin").as_uri(), str(tmp_path / "m.part"), 5, urllib.request.urlopen)
