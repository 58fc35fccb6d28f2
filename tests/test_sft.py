"""SFT: answers in the model's frame, labels on answer tokens only, learning, exact resume."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from PIL import Image

from star_edge.answer import parse
from star_edge.errors import InvalidInputError
from star_edge.export.tiny_reasoner import write_tiny_reasoner
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.train.answer_text import format_answer
from star_edge.train.sft import (IGNORE_INDEX, SFTBatcher, SFTConfig, SFTTrainer, greedy_box_iou,
                                  learning_rate)


@dataclass
class Scene:
    image: np.ndarray
    query: str
    boxes: np.ndarray
    points: np.ndarray
    labels: list[str]
    trace: str


def scene(index: int) -> Scene:
    """One square of a random colour on grey; deterministic per index."""
    rng = np.random.default_rng(index)
    image = np.full((96, 128, 3), 128, dtype=np.uint8)
    x1, y1 = int(rng.integers(0, 80)), int(rng.integers(0, 50))
    x2, y2 = x1 + int(rng.integers(20, 48)), y1 + int(rng.integers(20, 46))
    red = bool(rng.integers(0, 2))
    image[y1:y2, x1:x2] = (220, 30, 30) if red else (30, 30, 220)
    label = "red square" if red else "blue square"
    return Scene(image, f"the {label}", np.array([[x1, y1, x2, y2]]),
                 np.array([[(x1 + x2) // 2, (y1 + y2) // 2]]), [label], f"I see a {label}.")


@pytest.fixture(scope="module")
def reasoner_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft") / "reasoner"
    section = write_tiny_reasoner(directory, seed=0, family="qwen3_vl")
    return directory, section


def _reasoner(reasoner_dir) -> TorchReasoner:
    directory, section = reasoner_dir
    return TorchReasoner.from_dir(directory, section, dtype=torch.float32)


def _trainer(reasoner_dir, config: SFTConfig, out_dir, source=scene) -> SFTTrainer:
    """An SFT trainer of the tiny reasoner on `source` (default: the synthetic scenes), no eval samples."""
    return SFTTrainer(_reasoner(reasoner_dir), reasoner_dir[0], source, [], config, out_dir)


@pytest.mark.parametrize("frame, input_size", [("grid1000", (256, 256)), ("pixels", (840, 840))])
def test_formatted_answers_parse_back_to_the_targets(frame, input_size):
    boxes = np.array([[10, 20, 300, 200], [0, 0, 639, 479]])
    points = np.array([[100, 120], [320, 240]])
    text = format_answer(boxes, points, ["cup", "table"], (640, 480), frame, input_size, trace="Two.")
    assert text.startswith("<think>Two.</think><answer>[{") and text.endswith("}]</answer>")
    answer = parse(text, image_size=(640, 480), input_size=input_size, frame=frame)
    step = 640 / (1000 if frame == "grid1000" else input_size[0])
    np.testing.assert_allclose([o.box for o in answer.objects], boxes, atol=step)
    np.testing.assert_allclose([o.point for o in answer.objects], points, atol=step)
    assert [o.label for o in answer.objects] == ["cup", "table"]
    no_target = format_answer(np.zeros((0, 4)), np.zeros((0, 2)), [], (640, 480), frame, input_size)
    assert parse(no_target, image_size=(640, 480), input_size=input_size, frame=frame).objects == []


def test_labels_cover_exactly_the_answer_and_the_end_token(reasoner_dir):
    reasoner = _reasoner(reasoner_dir)
    batcher = SFTBatcher(reasoner)
    encoded = [batcher.encode(scene(i)) for i in range(3)]
    batch = batcher.collate(encoded)
    tokenizer = reasoner.processor.tokenizer
    for row in range(3):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        text = tokenizer.decode(kept)
        assert text.startswith("<think>I see a") and text.endswith("</answer><|im_end|>")
        assert batch["attention_mask"][row].sum() == len(encoded[row]["input_ids"])
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_token).sum()) == 3 * 64
    assert batch["pixel_values"].shape[0] == 3 * 256


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = SFTConfig(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(60, config) == pytest.approx(0.55e-3)
    assert learning_rate(110, config) == pytest.approx(1e-4)
    assert learning_rate(500, config) == pytest.approx(1e-4)


def test_training_lowers_the_loss(reasoner_dir, tmp_path):
    reasoner = _reasoner(reasoner_dir)
    config = SFTConfig(batch_size=4, lr=3e-3, warmup_steps=2, total_steps=30, log_every=5,
                       checkpoint_every=1000, eval_every=0)
    trainer = SFTTrainer(reasoner, reasoner_dir[0], lambda i: scene(i % 4), [], config, tmp_path)
    rows: list[dict] = []
    trainer.train(on_log=rows.append)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert (tmp_path / "log.csv").read_text().startswith("step,samples,lr,loss")
    reloaded = TorchReasoner.from_dir(tmp_path / "checkpoint" / "reasoner", reasoner_dir[1])
    for name, tensor in reasoner.model.state_dict().items():
        torch.testing.assert_close(reloaded.model.state_dict()[name], tensor)


class _Stopped(Exception):
    """Raised from a log callback: the run stops as if killed there."""


def _stop_after_step_3(row: dict) -> None:
    if row["step"] == 3:
        raise _Stopped


def test_resume_continues_exactly(reasoner_dir, tmp_path):
    """A run stopped between checkpoints resumes at the last one: its weights end as a straight
    run's do, and its log keeps one row per step."""
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=6, log_every=1,
                       checkpoint_every=2, eval_every=0)
    straight = _trainer(reasoner_dir, config, tmp_path / "a")
    straight.train()
    first = _trainer(reasoner_dir, config, tmp_path / "b")
    with pytest.raises(_Stopped):  # after logging step 3, before its checkpoint
        first.train(on_log=_stop_after_step_3)
    second = _trainer(reasoner_dir, config, tmp_path / "b")
    assert second.resume() and second.state.step == 2
    second.train()
    assert second.state.step == straight.state.step == 6
    assert second.state.samples_seen == 12
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    logged, expected = _log_rows(tmp_path / "b"), _log_rows(tmp_path / "a")
    assert [row["step"] for row in logged] == [row["step"] for row in expected] == [str(i) for i in range(1, 7)]
    for row, reference in zip(logged, expected):
        assert float(row["loss"]) == pytest.approx(float(reference["loss"]), rel=1e-4)


def test_a_run_stopped_before_its_first_checkpoint_starts_its_log_afresh(reasoner_dir, tmp_path):
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=2, log_every=1,
                       checkpoint_every=1000, eval_every=0)
    _trainer(reasoner_dir, config, tmp_path).train()
    shutil.rmtree(tmp_path / "checkpoint")
    again = _trainer(reasoner_dir, config, tmp_path)
    assert not again.resume()
    again.train()
    assert [row["step"] for row in _log_rows(tmp_path)] == ["1", "2"]


def _log_rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_greedy_box_iou_scores_a_known_answer(tmp_path):
    target = scene(0)
    answer = format_answer(target.boxes, target.points, target.labels, (128, 96), "grid1000",
                           (256, 256), trace="Found it.")
    section = write_tiny_reasoner(tmp_path / "r", seed=0, family="qwen3_vl", scripted_answers=[answer])
    reasoner = TorchReasoner.from_dir(tmp_path / "r", section)
    exact = greedy_box_iou(reasoner, [target])
    assert exact["parsed"] == 1.0 and exact["box_iou"] > 0.9 and exact["acc50"] == 1.0
    other = scene(5)
    painted = np.zeros((2, 96, 128), dtype=bool)  # inclusive boxes painted as pixels
    for plane, (x1, y1, x2, y2) in zip(painted, (target.boxes[0], other.boxes[0])):
        plane[y1 : y2 + 1, x1 : x2 + 1] = True
    pixel_iou = (painted[0] & painted[1]).sum() / (painted[0] | painted[1]).sum()
    assert greedy_box_iou(reasoner, [other])["box_iou"] == pytest.approx(pixel_iou, abs=0.05)


def test_vision_tower_gets_its_own_learning_rate_and_decay(reasoner_dir, tmp_path):
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=4, log_every=1,
                       checkpoint_every=1000, eval_every=0, vision_lr_scale=0.1, vision_weight_decay=0.1)
    trainer = _trainer(reasoner_dir, config, tmp_path)
    language, vision = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(names[id(p)].startswith("model.visual.") for p in vision["params"])
    assert not any(names[id(p)].startswith("model.visual.") for p in language["params"])
    assert len(language["params"]) + len(vision["params"]) == len(names)
    trainer.train(max_steps=2)
    assert vision["lr"] == pytest.approx(0.1 * language["lr"]) and language["lr"] > 0
    assert vision["weight_decay"] == 0.1 and language["weight_decay"] == 0.0


def test_start_from_weights_continues_at_the_stream_position(reasoner_dir, tmp_path):
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=6, log_every=1,
                       checkpoint_every=1000, eval_every=0)
    first = _trainer(reasoner_dir, config, tmp_path / "a")
    first.train(max_steps=3)
    seen: list[int] = []
    later = _trainer(reasoner_dir, config, tmp_path / "b", lambda i: seen.append(i) or scene(i))
    later.start_from(tmp_path / "a" / "checkpoint" / "reasoner" / "model.safetensors", first.state)
    for name, tensor in first.model.state_dict().items():
        torch.testing.assert_close(later.model.state_dict()[name], tensor)
    later.train(max_steps=1)
    assert later.state.step == 4 and sorted(seen) == [6, 7]


def test_a_run_resumed_with_a_larger_batch_goes_on_where_its_samples_end(reasoner_dir, tmp_path):
    small = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=6, log_every=1,
                      checkpoint_every=1000, eval_every=0)
    first = _trainer(reasoner_dir, small, tmp_path)
    first.train(max_steps=3)
    seen: list[int] = []
    large = replace(small, batch_size=4)
    resumed = _trainer(reasoner_dir, large, tmp_path, lambda i: seen.append(i) or scene(i))
    assert resumed.resume() and resumed.state.samples_seen == 6
    resumed.train(max_steps=2)
    assert sorted(seen) == list(range(6, 14))
    assert resumed.state.step == 5 and resumed.state.samples_seen == 14


def _shapes(index: int):
    """A synthetic scene of 1-3 plain shapes (objects and their masks, for the naming loss)."""
    from star_edge.train.data.synthetic import SyntheticConfig, sample

    return sample(0, index, SyntheticConfig(size_range=(96, 128), stage="single", objects=(1, 3),
                                            item_probability=0.0))


NOUNS = ("circle", "diamond", "hexagon", "square", "star", "triangle")


def test_naming_loss_is_the_head_on_each_objects_pooled_image_tokens(reasoner_dir, tmp_path):
    from star_edge.train.object_pooling import object_features

    config = SFTConfig(batch_size=3, warmup_steps=1, eval_every=0, naming_weight=0.5, naming_classes=NOUNS)
    trainer = _trainer(reasoner_dir, config, tmp_path, source=_shapes)
    scenes = [_shapes(i) for i in range(3)]
    batch = trainer.batcher.collate([trainer.batcher.encode(s) for s in scenes])
    expected = []
    with torch.no_grad():
        for s in scenes:
            inputs = trainer.reasoner.hf_inputs(Image.fromarray(s.image), s.query)
            tokens = trainer.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            merged = tokens.pooler_output[0].numpy()
            side = int(round(len(merged) ** 0.5))
            pooled = object_features(merged.reshape(side, side, -1), s.instance_masks)
            expected.append(trainer.naming_head(torch.from_numpy(pooled)))
        targets = torch.tensor([NOUNS.index(obj.noun) for s in scenes for obj in s.objects])
        reference = torch.nn.functional.cross_entropy(torch.cat(expected), targets)
    assert batch["naming_weights"].shape == (len(targets), 3 * side * side)
    trainer.model.train()
    _, _, naming_loss = trainer._step(batch)
    assert naming_loss == pytest.approx(float(reference), rel=1e-4)
    with pytest.raises(ValueError, match=r"nouns \['circle'\] are not among the naming classes"):
        SFTBatcher(trainer.reasoner, naming_classes=[noun for noun in NOUNS if noun != "circle"]).encode(
            next(s for s in (_shapes(i) for i in range(20)) if any(o.noun == "circle" for o in s.objects)))


def test_a_run_with_the_naming_loss_resumes_exactly_and_only_with_it(reasoner_dir, tmp_path):
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=4, log_every=1, checkpoint_every=2,
                       eval_every=0, naming_weight=1.0, naming_classes=NOUNS)
    straight = _trainer(reasoner_dir, config, tmp_path / "a", source=_shapes)
    initial_head = {k: v.clone() for k, v in straight.naming_head.state_dict().items()}
    straight.train()
    first = _trainer(reasoner_dir, config, tmp_path / "b", source=_shapes)
    first.naming_head.load_state_dict(initial_head)
    with pytest.raises(_Stopped):
        first.train(on_log=_stop_after_step_3)
    second = _trainer(reasoner_dir, config, tmp_path / "b", source=_shapes)
    assert second.resume() and second.state.step == 2
    second.train()
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    for name, tensor in straight.naming_head.state_dict().items():
        torch.testing.assert_close(second.naming_head.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert all(float(row["naming_loss"]) > 0 for row in _log_rows(tmp_path / "b"))
    without = _trainer(reasoner_dir, replace(config, naming_weight=0.0, naming_classes=()), tmp_path / "b",
                       source=_shapes)
    with pytest.raises(InvalidInputError, match="was trained with the naming loss; resume it with it"):
        without.resume()
    with pytest.raises(InvalidInputError, match="naming_classes given"):
        _trainer(reasoner_dir, replace(config, naming_classes=()), tmp_path / "c", source=_shapes)


def test_a_save_killed_between_its_moves_resumes_from_the_newest_complete_checkpoint(reasoner_dir, tmp_path):
    """save() moves the old checkpoint aside, then the staged one in; a kill between the two used to
    leave no checkpoint, and the resumed run started over from step 0 with its log wiped."""
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=4, log_every=1,
                       checkpoint_every=1, eval_every=0)
    _trainer(reasoner_dir, config, tmp_path).train(max_steps=2)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.rename(tmp_path / "checkpoint.old")  # killed after the first move, the next save half written
    (tmp_path / "checkpoint.tmp" / "reasoner").mkdir(parents=True)
    resumed = _trainer(reasoner_dir, config, tmp_path)
    assert resumed.resume() and resumed.state.step == 2 and len(_log_rows(tmp_path)) == 2
    shutil.copytree(checkpoint, tmp_path / "checkpoint.tmp", dirs_exist_ok=True)  # the next save complete
    checkpoint.rename(tmp_path / "checkpoint.old")
    assert _trainer(reasoner_dir, config, tmp_path).resume() and not (tmp_path / "checkpoint.tmp").exists()


def test_a_resumed_run_takes_its_group_settings_from_its_config_not_the_checkpoint(reasoner_dir, tmp_path):
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=4, log_every=1,
                       checkpoint_every=1000, eval_every=0, vision_lr_scale=0.1, vision_weight_decay=0.1)
    _trainer(reasoner_dir, config, tmp_path).train(max_steps=1)
    changed = replace(config, vision_lr_scale=0.5, vision_weight_decay=0.0)
    resumed = _trainer(reasoner_dir, changed, tmp_path)
    assert resumed.resume()
    vision = resumed.optimizer.param_groups[1]
    assert (vision["lr_scale"], vision["weight_decay"]) == (0.5, 0.0)
    assert resumed.optimizer.state, "Adam's moments came back"
    with pytest.raises(InvalidInputError, match="the run is at step 0 of total_steps 4, max_steps -1"):
        _trainer(reasoner_dir, changed, tmp_path / "fresh").train(max_steps=-1)
    behind = _trainer(reasoner_dir, replace(changed, total_steps=1), tmp_path / "behind")
    behind.state.step = 2
    with pytest.raises(InvalidInputError, match="at step 2 of total_steps 1"):
        behind.train()


@pytest.mark.parametrize("field, value, message", [("log_every", 0, "log_every 0"), ("batch_size", 0, "batch_size"),
                                                   ("lr", 0.0, "lr 0.0"), ("amp_dtype", "float16", "gradient scaler")])
def test_sft_settings_out_of_range_are_refused(field, value, message):
    with pytest.raises(InvalidInputError, match=message):
        SFTConfig(**{field: value})


@pytest.mark.gpu
def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(reasoner_dir, tmp_path):
    config = SFTConfig(batch_size=2, lr=1e-3, warmup_steps=1, total_steps=4, log_every=1, checkpoint_every=1000,
                       eval_every=0, naming_weight=0.0)
    directory, section = reasoner_dir
    on_gpu = SFTTrainer(TorchReasoner.from_dir(directory, section, device="cuda", dtype=torch.float32), directory,
                        scene, [], config, tmp_path)
    on_gpu.train(max_steps=1)
    resumed = _trainer(reasoner_dir, config, tmp_path)
    assert resumed.resume() and resumed.state.step == 1
    assert all(value.device.type == "cpu" for state in resumed.optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))
