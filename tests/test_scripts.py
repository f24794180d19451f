"""The scripts' command lines: flags, clear refusals, exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]


def test_train_meta_names_missing_features(tmp_path):  # sae and meta landed (tests/test_sae.py, tests/test_meta.py)
    with pytest.raises(SystemExit, match="nope.h5 not found"):
        train.main(["--stage", "meta", "--features", str(tmp_path / "nope.h5")])


def test_train_rejects_unknown_stage_and_flags():
    with pytest.raises(SystemExit, match="expected one of"):
        train.main(["--stage", "warp9"])
    with pytest.raises(SystemExit):
        train.parse(["--stag", "sae"])


def test_extract_names_missing_images_and_unknown_flag(tmp_path):
    """Real datasets (tests/test_extract.py) need their images: a missing folder is named, fast, with no output."""
    r = subprocess.run([sys.executable, "extract.py", "--dataset", "things", "--data", str(tmp_path), "--weights",
                        "random", "--out", str(tmp_path / "f.h5")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and f"{tmp_path}/THINGS: folder not found" in r.stderr
    assert not (tmp_path / "f.h5").exists()
    r = subprocess.run([sys.executable, "extract.py", "--no-such-flag", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_make_train_names_missing_features(tmp_path):
    """make train BACKBONE=x on a machine without x's features says which file to put where (exit 2)."""
    r = subprocess.run(["make", "-s", "train", "BACKBONE=nosuchnet", f"TRAIN={tmp_path}/runs"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "missing data/features/nosuchnet/coco.h5" in r.stdout and "extract.py --dataset coco" in r.stdout


def _help(argv, capsys):
    import evaluate  # noqa: F401  (flag tests below import the scripts as modules)
    with pytest.raises(SystemExit) as e:
        train.parse(argv + ["--help"])
    assert e.value.code == 0
    return {tok.split()[0] for tok in capsys.readouterr().out.split("\n  ") if tok.startswith("--")}


def test_one_parser_per_stage_with_the_same_names(capsys):
    """train.py --stage X --help lists that stage's flags only; one idea, one name in every stage."""
    sae, meta, warp = (_help(["--stage", s], capsys) for s in ("sae", "meta", "warp"))
    for flags in (sae, meta, warp):
        assert {"--lr", "--batch", "--device", "--threads", "--progress,", "--config", "--out", "--seed"} <= flags
    assert "--epochs" in sae and "--steps" not in sae and "--d-model" not in sae and "--n-latents" in sae
    assert {"--steps", "--resume,", "--d-model"} <= meta and "--n-latents" not in meta and "--targets" not in meta
    assert {"--steps", "--subjects", "--rois", "--eval-every", "--patience"} <= warp and "--codes" not in warp
    old = {"--sae-lr", "--warp-lr", "--rows-per-step", "--warp-batch", "--warp-steps", "--warp-threads", "--subject",
           "--roi", "--behav-threads", "--batch-size"}
    assert not old & (sae | meta | warp)
    with pytest.raises(SystemExit):  # no old aliases
        train.parse(["--stage", "sae", "--sae-lr", "0.1"])
    import evaluate
    assert {"threads", "subjects", "rois",
            "progress"} <= set(evaluate.defaults) and "behav_threads" not in evaluate.defaults


def test_config_file_sets_a_stage_and_flags_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sae]\nk = 5\nlr = 1\nbatch = 64\n[meta]\nsteps = 7\nd-model = 16\n[evaluate]\nn_perm = 3\n')
    c = train.parse(["--stage", "sae", "--config", str(cfg), "--batch", "32"])
    assert (c["k"], c["lr"], c["batch"], c["config"]) == (5, 1.0, 32, str(cfg))  # int 1 read as the float default
    assert isinstance(c["lr"], float) and c["epochs"] == train.defaults_sae["epochs"]
    c = train.parse(["--stage", "meta", "--config", str(cfg)])
    assert (c["steps"], c["d_model"], c["batch"]) == (7, 16, train.defaults_meta["batch"])  # [sae] not applied
    import evaluate
    assert evaluate.parse(["--task", "fmri", "--config", str(cfg)])["n_perm"] == 3


@pytest.mark.parametrize("text, why", [
    ("[sae]\nkk = 5\n", "c.toml: unknown key 'kk' in \\[sae\\]"),
    ("[meta]\nn_latents = '4x'\n", "c.toml: unknown key 'n_latents' in \\[meta\\]"),  # another stage's flag
    ("[train]\nk = 5\n", "c.toml: unknown table \\[train\\]"),
    ("k = 5\n", "c.toml: key 'k' outside a table"),
    ("[sae]\nk = '5'\n", "c.toml: key '\\[sae\\] k' = '5'; expected a value of type int"),
    ("[sae]\nencode = 1\n", "c.toml: key '\\[sae\\] encode' = 1; expected a value of type bool"),
    ("[sae\n", "c.toml: not valid TOML"),
])
def test_config_file_errors_name_the_file_and_the_key(tmp_path, capsys, text, why):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(SystemExit) as e:
        train.parse(["--stage", "sae", "--config", str(tmp_path / "c.toml")])
    assert e.value.code == 2
    import re
    assert re.search(why, capsys.readouterr().err)


def test_demo_config_holds_the_demo_runs():
    """configs/demo.toml is the one place the demo's SAE and meta settings are spelled (Makefile, tests)."""
    c = train.parse(["--stage", "meta", "--config", str(ROOT / "configs" / "demo.toml")])
    assert (c["steps"], c["length"], c["batch"], c["d_model"], c["input_pca"], c["min_nonzero"]) == (600, 32, 32, 64,
                                                                                                     0.95, 40)
    s = train.parse(["--stage", "sae", "--config", str(ROOT / "configs" / "demo.toml")])
    assert (s["n_latents"], s["k"], s["epochs"], s["batch"], s["min_nonzero"]) == ("auto", 0, 0, 256, 40)  # the rule
    make = (ROOT / "Makefile").read_text()
    assert make.count("--config $(CONFIG)") == 2 and "--steps" not in make and "--min-nonzero 40" not in make


def test_real_defaults_and_missing_data_folder(tmp_path, monkeypatch):
    """Defaults point at real data (data/external, data/features/<backbone>/...), never at the world: on a
    machine without data/external, --task fmri names the missing folder."""
    import evaluate
    for d in (evaluate.defaults, train.defaults_sae, train.defaults_meta, train.defaults_warp):
        assert not any("world" in str(v) for v in d.values()), d
    assert evaluate.defaults["data"] == train.defaults_warp["data"] == "data/external"
    assert evaluate.defaults["features"] == "data/features/clip/things.h5"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--data data/external: folder not found"):
        evaluate.main(["--task", "fmri"])


def test_extract_world_flags_only_for_the_synthetic_dataset(capsys):
    import extract
    for argv, flag in ((["--dataset", "things", "--d", "512"], "--d"), (["--dataset", "coco", "--size", "full"],
                                                                        "--size"),
                       (["--dataset", "folder", "--n-concepts", "30", "--seed", "1"], "--n-concepts")):
        with pytest.raises(SystemExit) as e:
            extract.parse(argv)
        assert e.value.code == 2
        assert f"{flag} is a setting of the synthetic world; it takes --dataset synthetic" in capsys.readouterr().err
    a = extract.parse(["--dataset", "synthetic", "--d", "32"])
    assert (a.d, a.size) == (32, "small")
    a = extract.parse(["--dataset", "things", "--seed", "3"])  # --seed also seeds --weights random
    assert (a.d, a.size, a.seed) == (None, "small", 3)
