"""Files a hostile or careless user hands the batch commands: a shard member that unpacks to
gigabytes, a torn output file, YAML alias bombs and broken `--options` values, an output path the
kernel refuses, a checkpoint folder replaced by a symlink. Each is refused or survived cleanly:
a clear message, no traceback, nothing lost, memory bounded."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import yaml
from PIL import Image

from minigpt4.commands.caption import main as caption_main
from minigpt4.config import from_dict, load_preset
from minigpt4.data.config import DataConfig
from minigpt4.data.stage1 import (
    DEFAULT_MAX_MEMBER_BYTES,
    CorruptSample,
    OversizedMember,
    sample_caption,
    sample_image_bytes,
    tar_samples,
)
from minigpt4.errors import ConfigError
from minigpt4.files import temporary_name
from minigpt4.images import jpeg_bytes
from minigpt4.train import checkpoints
from minigpt4.train.loop import train

pytest_plugins = ["train_helpers"]  # fixtures: tiny_config, tiny_model, one_thread

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "eval_configs" / "minigpt4_tiny_random.yaml")
HUGE = DEFAULT_MAX_MEMBER_BYTES + 2**20  # one MiB over the default cap


def _member(tar: tarfile.TarFile, name: str, data: bytes | None = None, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:  # `size` zero bytes, streamed: never held in memory here either
        info.size = size or 0
        tar.addfile(info, _Zeros(info.size))


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer) -> int:  # noqa: ANN001 (io's protocol)
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _gzip_shard(path: Path, huge_key: str = "000001") -> Path:
    """Four samples (jpg + json), the one named `huge_key` with a .jpg of `HUGE` zero bytes."""
    image = jpeg_bytes(Image.new("RGB", (224, 224), (200, 30, 30)))
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        for i in range(4):
            key = f"{i:06d}"
            if key == huge_key:
                _member(tar, f"{key}.jpg", size=HUGE)
            else:
                _member(tar, f"{key}.jpg", image)
            _member(tar, f"{key}.json", json.dumps({"caption": "a red square"}).encode())
    return path


def _raise(exc: Exception) -> bool:
    raise exc


# --- a shard member that unpacks to more than the cap ------------------------------------------


def test_a_member_over_the_cap_is_never_read_and_only_its_sample_is_refused(tmp_path: Path) -> None:
    shard = _gzip_shard(tmp_path / "shard-00000.tar")
    assert shard.stat().st_size < 2**20 < HUGE  # small on disk, huge unpacked
    tracemalloc.start()
    try:
        samples = list(tar_samples([str(shard)], _raise))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"reading the shard allocated {peak:,} bytes"
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002", "000003"]
    huge = samples[1]
    assert huge["jpg"] == OversizedMember(HUGE, DEFAULT_MAX_MEMBER_BYTES)
    with pytest.raises(CorruptSample, match=r"jpg member is 68,157,440 bytes, over the limit of 67,108,864"):
        sample_image_bytes(huge)
    assert sample_caption(huge) == "a red square"  # the other members of the sample are intact
    assert all(sample_image_bytes(samples[i])[:2] == b"\xff\xd8" for i in (0, 2, 3))


def test_the_cap_is_a_data_setting(tmp_path: Path) -> None:
    shard = _gzip_shard(tmp_path / "shard-00000.tar", huge_key="none")
    jpg_size = len(jpeg_bytes(Image.new("RGB", (224, 224), (200, 30, 30))))
    samples = list(tar_samples([str(shard)], _raise, max_member_bytes=jpg_size - 1))
    assert all(isinstance(s["jpg"], OversizedMember) for s in samples)
    assert all(isinstance(s["json"], bytes) for s in samples)


def test_training_skips_and_counts_the_oversized_sample(tiny_config, tmp_path: Path, one_thread) -> None:
    data = tmp_path / "shards"
    data.mkdir()
    _gzip_shard(data / "shard-00000.tar")
    cfg = tiny_config(
        1,
        tmp_path / "run",
        f"data.sources=[{{name: hostile, path: '{data}'}}]",
        "data.streams=1",
        "data.shuffle_buffer=1",
        "run.save_every=100",
    )
    result = train(cfg, stop_after=1)
    # A batch of 8 over the 4 samples of the shard holds the huge one twice: both skipped, counted.
    assert result.step == 1 and result.corrupt == 2


# --- caption's output file ---------------------------------------------------------------------


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(path)
        paths.append(path)
    return paths


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_caption_resumes_after_a_torn_last_line_without_gluing_records(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", 3)
    out = tmp_path / "captions.jsonl"
    args = ["--cfg-path", TINY, "--greedy", "--max-new-tokens", "4", "--out", str(out)]
    assert caption_main([str(p) for p in images[:2]] + args) == 0
    whole = out.read_bytes()
    out.write_bytes(whole[:-25])  # killed in the middle of writing the second record
    assert caption_main([str(p) for p in images] + args) == 0
    records = _records(out)  # every line parses: nothing was glued onto the fragment
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in images)


def test_caption_takes_a_file_once_whatever_its_spelling(tmp_path: Path, monkeypatch) -> None:
    (image,) = _images(tmp_path / "images", 1)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.png"
    link.symlink_to(image)
    out = tmp_path / "captions.jsonl"
    args = ["--cfg-path", TINY, "--greedy", "--max-new-tokens", "4", "--out", str(out)]
    assert caption_main([str(image), "images/img0.png", "./images/../images/img0.png", str(link), *args]) == 0
    assert [r["image"] for r in _records(out)] == [str(image)]
    assert caption_main(["images/img0.png", *args]) == 0  # already done, under another spelling
    assert len(_records(out)) == 1


def test_caption_refuses_an_out_the_kernel_will_not_write_before_loading(tmp_path: Path, capsys) -> None:
    (image,) = _images(tmp_path / "images", 1)
    target = Path("/sys/minigpt4-caption-test.jsonl")  # root passes os.access here; writing fails
    with pytest.raises(SystemExit) as exit_:
        caption_main([str(image), "--cfg-path", TINY, "--out", str(target)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {target}: cannot be written" in err and "Traceback" not in err
    assert not target.exists()


def test_caption_names_a_missing_file_before_loading_the_model(tmp_path: Path, capsys, monkeypatch) -> None:
    (image,) = _images(tmp_path / "images", 1)
    monkeypatch.setattr("minigpt4.commands.caption.chat_or_exit", lambda args: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_:
        caption_main([str(image), str(tmp_path / "nothere.jpg"), "--cfg-path", TINY])
    assert exit_.value.code == 2
    assert f"no such file or folder: {tmp_path / 'nothere.jpg'}" in capsys.readouterr().err


def test_caption_will_not_resume_an_out_made_with_another_prompt(tmp_path: Path, capsys) -> None:
    images = _images(tmp_path / "images", 2)
    out = tmp_path / "captions.jsonl"
    args = ["--cfg-path", TINY, "--greedy", "--max-new-tokens", "4", "--out", str(out)]
    assert caption_main([str(images[0]), *args]) == 0
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        caption_main([str(p) for p in images] + args + ["--prompt", "What colour is it?"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "holds captions made with --prompt 'Describe this image.'" in err and "What colour is it?" in err
    assert out.read_bytes() == before
    assert caption_main([str(p) for p in images] + args) == 0  # the same prompt continues it
    assert len(_records(out)) == 2


def test_checking_out_leaves_no_file_behind(tmp_path: Path) -> None:
    from minigpt4.commands.caption import check_out

    out = tmp_path / "new.jsonl"
    assert check_out(out) is None and not out.exists()


# --- YAML: alias bombs and broken override values ------------------------------------------------


def _alias_bomb(levels: int) -> str:
    """A flow list of `levels` anchors, each holding the one before nine times: 9**levels strings
    in full, a few hundred bytes as YAML."""
    anchors = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(anchors)}]"


@pytest.mark.parametrize("levels", [8, 9])
def test_a_yaml_alias_bomb_gives_a_short_error(tmp_path: Path, levels: int) -> None:
    preset = (ROOT / "eval_configs" / "minigpt4_tiny_random.yaml").read_text(encoding="utf-8")
    path = tmp_path / "bomb.yaml"
    path.write_text(f"{preset}\nname: {_alias_bomb(levels)}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_preset(path)
    message = str(error.value)
    assert len(message) < 1000 and "name must be str, got list [[" in message


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("model.seed=[", r"override 'model.seed=\[': the value is not valid YAML"),
        ("model.seed=*x", r"override 'model.seed=\*x': the value is not valid YAML \(found undefined alias"),
        ("model.seed=&a [*a]", "model.seed must be int, got list"),
    ],
)
def test_a_broken_override_value_is_a_config_error(override: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_preset(TINY, [override])


def test_a_broken_options_value_is_one_line_on_the_command_line(tmp_path: Path, capsys) -> None:
    (image,) = _images(tmp_path / "images", 1)
    for value in ("model.seed=[", "model.seed=*x", "model.seed=&a [*a]"):
        with pytest.raises(SystemExit) as exit_:
            caption_main([str(image), "--cfg-path", TINY, "--options", value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--options" in err and "Traceback" not in err


def test_a_self_referring_alias_in_a_list_field_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load("stage: 1\nformat: webdataset\nsources: &s [*s]\n")
    with pytest.raises(ConfigError):
        from_dict(DataConfig, data, where="x.yaml")


# --- a checkpoint folder replaced by a symlink ---------------------------------------------------


def test_saving_over_a_symlinked_checkpoint_replaces_the_link_and_spares_its_target(
    tiny_model, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    step = checkpoints.step_dir(tmp_path / "run", 2)
    step.parent.mkdir(parents=True)
    step.symlink_to(elsewhere, target_is_directory=True)
    temporary_name(step).symlink_to(elsewhere, target_is_directory=True)  # a stale temp folder too
    state = {"step": 2, "samples": 16, "corrupt": 0, "global_batch": 8, "optimizer": {}, "rng": {}}
    for _ in range(2):  # saved twice: the second save replaces a real folder
        checkpoints.save_checkpoint(step, tiny_model, state, {})
    assert step.is_dir() and not step.is_symlink()
    assert checkpoints.load_state(step)["step"] == 2
    assert (elsewhere / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]


def test_pruning_removes_a_symlinked_checkpoint_but_not_its_target(tiny_model, tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = {"step": 0, "samples": 0, "corrupt": 0, "global_batch": 8, "optimizer": {}, "rng": {}}
    for n in (1, 3):
        checkpoints.save_checkpoint(checkpoints.step_dir(run, n), tiny_model, {**state, "step": n}, {})
    target = tmp_path / "copy"
    shutil.copytree(checkpoints.step_dir(run, 1), target)
    old = checkpoints.step_dir(run, 0)
    old.symlink_to(target, target_is_directory=True)
    checkpoints.prune_checkpoints(run, keep=1)
    assert [n for n, _ in checkpoints.list_checkpoints(run)] == [3]
    assert (target / checkpoints.WEIGHTS).is_file()
    assert sorted(p.name for p in target.iterdir()) == sorted([checkpoints.STATE, checkpoints.WEIGHTS])
