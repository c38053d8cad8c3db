"""Training end to end on the tiny configs: the loss falls, resumption, the feature cache, failures."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from minigpt4.build import build_model
from minigpt4.chat import load_chat
from minigpt4.config import PROJECT_ROOT as ROOT
from minigpt4.config import from_dict, read_yaml
from minigpt4.data import scenes
from minigpt4.model import MiniGPT4
from minigpt4.train import checkpoints
from minigpt4.train.config import RunConfig, TrainConfig
from minigpt4.train.features import cache_features
from minigpt4.train.loop import FINAL_WEIGHTS, METRICS, TrainingError, forward_backward, lr_at, train

pytest_plugins = ["train_helpers"]  # fixtures: tiny_data, tiny_config, tiny_model, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _mean(values):
    return sum(values) / len(values)


def _weights(path):
    return load_file(str(path))


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    # The paper's stage 1: 1e-6 → 1e-4 over 5000 steps, cosine to 8e-5 over 4 × 5000 steps.
    run = RunConfig(
        output_dir="x", batch_size=64, max_epoch=4, iters_per_epoch=5000,
        init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000,
    )  # fmt: skip
    assert lr_at(run, 0) == pytest.approx(1e-6)
    assert lr_at(run, 2500) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(run, 5000) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(run, 10000) == pytest.approx(9e-5)
    assert lr_at(run, 19999) == pytest.approx(8e-5, rel=1e-6)
    lrs = [lr_at(run, s) for s in range(5000, 20000, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs)), "the cosine only decreases"


def test_stage1_loss_falls_and_the_weights_load_into_the_chat_engine(tiny_config, tiny_cfg_path, tmp_path):
    cfg = tiny_config(1, tmp_path / "run")
    result = train(cfg)
    assert result.step == 20 and len(result.losses) == 20
    assert _mean(result.losses[-5:]) < _mean(result.losses[:5]) - 1.0, result.losses
    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 21))
    assert all(m["samples_per_s"] > 0 and m["lr"] > 0 for m in lines)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "run")] == [10, 20]

    weights = tmp_path / "run" / FINAL_WEIGHTS
    assert result.weights == weights
    chat = load_chat(
        tiny_cfg_path,
        device="cpu",
        overrides=[f"model.projection.checkpoint={weights}", "model.llm.random_init.initializer_range=0.3"],
    )
    trained = _weights(weights)
    assert torch.equal(chat.model.llama_proj.weight.detach(), trained["llama_proj.weight"])
    session = chat.new_session()
    chat.upload_image(session, scenes.render_scene(random.Random(0)).image)
    chat.add_question(session, "What is in the image?")
    assert isinstance(chat.answer(session, max_new_tokens=4, do_sample=False), str)


def test_stage2_loss_falls(tiny_config, tmp_path):
    result = train(tiny_config(2, tmp_path / "run"))
    assert result.step == 20
    assert _mean(result.losses[-5:]) < _mean(result.losses[:5]) - 0.5, result.losses


SHORT = (
    "run.max_epoch=1",
    "run.iters_per_epoch=6",
    "run.batch_size=4",
    "run.warmup_steps=2",
    "run.save_every=2",
)


def test_a_stopped_run_resumes_at_its_step_and_ends_with_the_same_weights(tiny_config, tmp_path):
    whole = train(tiny_config(1, tmp_path / "whole", *SHORT))
    cfg = tiny_config(1, tmp_path / "split", *SHORT)
    first = train(cfg, stop_after=3)
    assert first.step == 3 and first.weights is None
    assert first.checkpoint == checkpoints.step_dir(tmp_path / "split", 3)
    with pytest.raises(TrainingError, match="--resume auto"):
        train(cfg)
    rest = train(cfg, resume="auto")
    assert rest.step == 6 and len(rest.losses) == 3
    assert first.losses + rest.losses == whole.losses
    a, b = _weights(whole.weights), _weights(rest.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_truncated_newest_checkpoint_is_named_and_auto_resume_falls_back(tiny_config, tmp_path, caplog):
    whole = train(tiny_config(1, tmp_path / "whole", *SHORT))
    cfg = tiny_config(1, tmp_path / "split", *SHORT)
    train(cfg, stop_after=3)  # checkpoints at steps 2 and 3
    state = checkpoints.step_dir(tmp_path / "split", 3) / checkpoints.STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(checkpoints.CheckpointError, match=rf"{state}.*truncated or damaged"):
        train(cfg, resume=str(state.parent))
    with caplog.at_level("WARNING"):
        rest = train(cfg, resume="auto")
    assert any("step-000003" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert rest.step == 6 and len(rest.losses) == 4  # steps 3–6 again, from step 2
    a, b = _weights(whole.weights), _weights(rest.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl holds each step once: the replayed steps replaced the lines of the lost ones
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cached_features_train_exactly_like_images_and_never_read_the_tars(tiny_data, tiny_config, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "stage1", data / "stage1")
    cfg = tiny_config(1, tmp_path / "images", *SHORT, data=data)
    with_images = train(cfg)
    cache = tmp_path / "features"
    index = cache_features(cfg.data, cfg.model, cache, batch_size=16, part_size=32)
    assert index["records"] == 96 and index["parts"] == 3
    # Resumable: a lost part is recomputed, finished ones are kept.
    kept = (cache / "part-00000.npy").stat().st_mtime_ns
    (cache / "part-00001.json").unlink()
    assert cache_features(cfg.data, cfg.model, cache, batch_size=16, part_size=32) == index
    assert (cache / "part-00000.npy").stat().st_mtime_ns == kept and (cache / "part-00001.json").is_file()

    for shard in data.glob("stage1/*/*.tar"):
        shard.write_bytes(b"")  # training from the cache must not need the images any more
    with_cache = train(tiny_config(1, tmp_path / "cached", *SHORT, f"data.features={cache}", data=data))
    assert with_cache.corrupt == 0
    assert with_cache.losses == pytest.approx(with_images.losses, rel=1e-5)
    a, b = _weights(with_images.weights), _weights(with_cache.weights)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_cache_of_another_vision_model_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(1, tmp_path / "run", *SHORT)
    cache_features(cfg.data, cfg.model, tmp_path / "features", part_size=128)
    other = tiny_config(1, tmp_path / "run", *SHORT, f"data.features={tmp_path / 'features'}", "model.seed=1")
    with pytest.raises(ValueError, match="another vision model"):
        train(other)


def test_a_nan_loss_stops_the_run_naming_the_step_and_leaves_finite_checkpoints(
    tiny_config, tmp_path, monkeypatch
):
    forward, calls = MiniGPT4.forward, []

    def nan_on_third_step(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MiniGPT4, "forward", nan_on_third_step)
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan"):
        train(tiny_config(1, tmp_path / "run", *SHORT, "run.save_every=1"))
    saved = checkpoints.list_checkpoints(tmp_path / "run")
    assert [s for s, _ in saved] == [1, 2], "nothing after the last good step"
    assert all(torch.isfinite(t).all() for t in _weights(saved[-1][1] / checkpoints.WEIGHTS).values())


def test_an_update_that_blows_the_weights_up_stops_the_run(tiny_config, tmp_path):
    # lr 1e30 with weight decay: each update multiplies the weights by -5e28; the second overflows.
    cfg = tiny_config(
        1, tmp_path / "run", *SHORT, "run.save_every=1", "run.warmup_steps=0", "run.init_lr=1.0e+30"
    )
    with pytest.raises(TrainingError, match=r"step 2: the update made the weights NaN or inf"):
        train(cfg)
    saved = checkpoints.list_checkpoints(tmp_path / "run")
    assert [s for s, _ in saved] == [1]
    assert all(torch.isfinite(t).all() for t in _weights(saved[0][1] / checkpoints.WEIGHTS).values())


def test_weights_with_nan_are_never_written(tiny_model, tmp_path):
    with torch.no_grad():
        saved = tiny_model.llama_proj.bias[0].item()
        tiny_model.llama_proj.bias[0] = float("nan")
    try:
        with pytest.raises(checkpoints.CheckpointError, match="llama_proj.bias"):
            checkpoints.save_checkpoint(tmp_path / "step-000001", tiny_model, {"step": 1}, {})
    finally:
        with torch.no_grad():
            tiny_model.llama_proj.bias[0] = saved
    assert not any(tmp_path.iterdir())


def test_a_batch_with_no_supervised_token_is_an_error(tiny_model):
    batch = {
        "input_ids": torch.tensor([[1, 5, 6]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.full((1, 3), -100),
        "features": torch.zeros(0, tiny_model.n_image_tokens, tiny_model.feature_dim),
        "index": 0,
        "corrupt": 0,
    }
    with pytest.raises(TrainingError, match="step 7: .*no supervised token"):
        forward_backward(Accelerator(cpu=True), tiny_model, iter([batch]), accum=1, step=6)


def test_lora_weights_train_save_and_load_with_the_projection(tiny_config, tmp_path):
    lora = "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    cfg = tiny_config(1, tmp_path / "run", *SHORT, "run.iters_per_epoch=2", lora)
    result = train(cfg)
    saved = _weights(result.weights)
    lora_keys = [k for k in saved if "lora_B" in k]
    assert len(lora_keys) == 4 and any(saved[k].abs().sum() > 0 for k in lora_keys), "LoRA B starts at 0"
    cfg.model.projection.checkpoint = str(result.weights)
    reloaded = build_model(cfg.model, device="cpu").trainable_state_dict()
    assert reloaded.keys() == saved.keys() and all(torch.equal(reloaded[k], saved[k]) for k in saved)


def test_gradient_accumulation_matches_a_bigger_batch(tiny_config, tmp_path):
    big = train(tiny_config(1, tmp_path / "big", *SHORT, "run.iters_per_epoch=3"))
    accumulated = train(
        tiny_config(
            1,
            tmp_path / "acc",
            *SHORT,
            "run.iters_per_epoch=3",
            "run.batch_size=2",
            "run.grad_accum_steps=2",
        )
    )
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5)
    a, b = _weights(big.weights), _weights(accumulated.weights)
    # Summation order differs; Adam turns fp32 rounding into ~1e-6 weight differences.
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


@pytest.mark.parametrize("variant", ["minigpt4", "minigpt4_llama2"])
def test_paper_configs_hold_the_papers_settings(variant):
    def load(stage):
        path = ROOT / "train_configs" / f"{variant}_{stage}.yaml"
        return from_dict(TrainConfig, {"name": path.stem, **read_yaml(path)}, where=str(path))

    stage1, stage2 = load("stage1_pretrain"), load("stage2_finetune")
    assert (stage1.data.stage, stage1.data.format, stage1.data.max_text_tokens) == (1, "webdataset", 32)
    assert [(s.name, s.ratio) for s in stage1.data.sources] == [("laion", 115), ("cc_sbu", 14)]
    r = stage1.run
    assert (r.batch_size, r.max_epoch, r.iters_per_epoch, r.warmup_steps) == (64, 4, 5000, 5000)
    assert (r.warmup_lr, r.init_lr, r.min_lr, r.weight_decay) == (1e-6, 1e-4, 8e-5, 0.05)
    assert (stage2.data.stage, stage2.data.format, stage2.data.max_text_tokens) == (2, "cc_sbu_align", 160)
    r = stage2.run
    assert (r.batch_size, r.max_epoch, r.iters_per_epoch, r.warmup_steps) == (12, 5, 200, 200)
    assert (r.warmup_lr, r.init_lr, r.min_lr, r.weight_decay) == (1e-6, 3e-5, 1e-5, 0.05)
    assert stage2.model.projection.checkpoint == f"{stage1.run.output_dir}/projection.safetensors"
    assert (
        stage1.model.template == stage2.model.template == ("vicuna0" if variant == "minigpt4" else "llama2")
    )


def test_the_command_reports_bad_input_without_a_traceback(tiny_data, tmp_path, capsys):
    from minigpt4.train import loop as train_module

    sources = f"data.sources=[{{name: a, path: '{tiny_data}/stage1/shapes'}}]"
    args = [
        "--cfg-path",
        str(ROOT / "train_configs" / "tiny_stage1.yaml"),
        "--options",
        f"run.output_dir={tmp_path}",
        sources,
    ]
    assert train_module.main([*args, "data.bogus=1"]) == 1
    assert "unknown key data.bogus" in capsys.readouterr().err
    assert train_module.main([*args, "run.batch_size=3"]) == 1
    assert "run.batch_size × processes = 3 must be a multiple of data.streams = 2" in capsys.readouterr().err


def test_train_and_cache_features_take_options_device_and_threads_and_refuse_the_old_forms(capsys):
    import pytest  # noqa: PLC0415

    from minigpt4.train import features, loop

    for main in (loop.main, features.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--cfg-path", "tiny_stage1", "run.batch_size=4"])
        assert exit_info.value.code == 2
        assert (
            "config overrides are given with --options: --options run.batch_size=4" in capsys.readouterr().err
        )
        with pytest.raises(SystemExit):
            main(["--cfg-path", "tiny_stage1", "--device", "tpu"])
        assert "--device tpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        loop.main(["--cfg-path", "tiny_stage1", "--cpu"])
    assert "--cpu is now --device cpu" in capsys.readouterr().err
    for parser in (loop.build_parser(), features.build_parser()):
        shown = parser.format_help()
        assert "--options" in shown and "--device" in shown and "--threads" in shown
