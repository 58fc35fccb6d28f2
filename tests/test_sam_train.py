"""Tiny-SAM training: inputs as the runtime's, learning, exact resume, evaluation and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from safetensors import safe_open

from star_edge.export.tiny_sam import TINY_SAM_CONFIG
from star_edge.sam.torch_backend import MaskDecoder
from star_edge.train.sam_data import SamScene, model_inputs, split_scenes
from star_edge.train.sam_eval import evaluate, export_sam, predict_masks
from star_edge.train.sam_train import SamTrainConfig, SamTrainer, main, mask_ious, prompt_losses


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes() -> list[SamScene]:
    return split_scenes(0, "val", 3)


def _config(**changes) -> SamTrainConfig:
    return SamTrainConfig(**{"batch_size": 2, "eval_every": 0, "log_every": 1, **changes})


def test_scenes_give_every_object_a_prompt_inside_its_mask(scenes):
    for scene in scenes:
        assert 1 <= len(scene.boxes) == len(scene.points) == len(scene.masks) <= 4
        for (x1, y1, x2, y2), (x, y), mask in zip(scene.boxes, scene.points, scene.masks):
            rows, cols = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max(), rows.max())
            assert mask[y, x]


def test_training_forward_chooses_the_masks_the_runtime_decodes(scenes):
    trainer = SamTrainer("unused", _config())
    trainer.step(scenes[:2])
    sam = trainer.sam.eval()
    config = trainer.sam_config
    pixels, prompts = model_inputs(scenes, config["image_size"], config["pixel_mean"], config["pixel_std"])
    decoder = MaskDecoder.from_module(sam)
    with torch.no_grad():
        features = sam.image_encoder(pixels)
        for index, (scene, scene_prompts) in enumerate(zip(scenes, prompts)):
            sparse, dense = sam.prompt_encoder(points=(scene_prompts.points, scene_prompts.point_labels),
                                               boxes=scene_prompts.boxes, masks=None)
            low_res, predicted_iou = sam.mask_decoder.predict_masks(
                features[index : index + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense)
            logits = sam.postprocess_masks(low_res, scene_prompts.input_size, scene_prompts.original_size)
            best = predicted_iou[:, 1:].argmax(dim=1) + 1
            trained_path = (logits[torch.arange(len(best)), best] > 0).numpy()
            runtime = predict_masks(decoder, scene)
            assert trained_path.shape == runtime.shape == scene.masks.shape
            assert np.mean(trained_path != runtime) < 1e-3


def test_loss_takes_the_best_multimask_output_and_the_iou_head_error():
    targets = torch.zeros(1, 8, 8)
    targets[0, 2:6, 2:6] = 1.0
    exact = targets[0] * 40.0 - 20.0
    logits = torch.stack([exact, -exact, exact, torch.zeros(8, 8)])[None]
    right_iou = torch.tensor([[1.0, 0.0, 1.0, 0.25]])
    ious = mask_ious(logits, targets, 0.0)
    np.testing.assert_allclose(ious.numpy(), [[1.0, 0.0, 1.0, 0.0]])
    with_best = prompt_losses(logits, ious, targets, 0.0, iou_loss_weight=1.0)
    without_best = prompt_losses(logits[:, [0, 1, 1, 3]], ious, targets, 0.0, iou_loss_weight=1.0)
    assert with_best.item() < 0.01 < without_best.item()
    iou_error = prompt_losses(logits, right_iou, targets, 0.0, 1.0) - with_best
    assert iou_error.item() == pytest.approx((0.25 ** 2) / 4)


def test_training_steps_reduce_the_loss_on_a_fixed_batch(scenes):
    trainer = SamTrainer("unused", _config(lr=1e-3))
    with torch.no_grad():
        before = trainer.losses(scenes[:2]).mean().item()
    for _ in range(6):
        trainer.step(scenes[:2])
    with torch.no_grad():
        after = trainer.losses(scenes[:2]).mean().item()
    assert after < 0.9 * before


class _Stopped(Exception):
    """Stands for a run killed after logging step 3, before its next checkpoint."""


def _stop_after_step_3(row: dict) -> None:
    if row["step"] == 3:
        raise _Stopped


def test_resume_continues_exactly(tmp_path):
    straight = SamTrainer(tmp_path / "straight", _config())
    straight.train(max_steps=4)
    stopped = SamTrainer(tmp_path / "stopped", _config(checkpoint_every=2))
    with pytest.raises(_Stopped):
        stopped.train(max_steps=4, on_log=_stop_after_step_3)
    resumed = SamTrainer(tmp_path / "stopped", _config())
    assert resumed.resume() and resumed.state.step == 2 and resumed.state.samples == 4
    resumed.train(max_steps=2)
    assert resumed.state.step == straight.state.step == 4
    for (name, a), (_, b) in zip(straight.sam.state_dict().items(), resumed.sam.state_dict().items()):
        assert torch.equal(a, b), name
    rows = (tmp_path / "stopped" / "log.csv").read_text().splitlines()
    assert rows[0] == "step,samples,lr,loss,samples_per_s,elapsed_s,mask_iou,eval_scenes"
    assert [row.split(",")[:2] for row in rows[1:]] == [["1", "2"], ["2", "4"], ["3", "6"], ["4", "8"]]


def test_a_run_stopped_before_its_first_checkpoint_starts_its_log_afresh(tmp_path):
    with pytest.raises(_Stopped):
        SamTrainer(tmp_path, _config()).train(max_steps=4, on_log=_stop_after_step_3)
    again = SamTrainer(tmp_path, _config())
    assert not again.resume()
    again.train(max_steps=2)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]


def test_evaluate_agrees_with_pycocotools_iou(tmp_path, scenes):
    trainer = SamTrainer(tmp_path, _config())
    trainer.step(scenes[:2])
    sam_dir = trainer.save() / "sam"
    result = evaluate(sam_dir, scenes)
    decoder = MaskDecoder.from_dir(sam_dir)
    reference = []
    for scene in scenes:
        predicted = predict_masks(decoder, scene)
        encoded = mask_utils.encode(np.asfortranarray(predicted.transpose(1, 2, 0).astype(np.uint8)))
        targets = mask_utils.encode(np.asfortranarray(scene.masks.transpose(1, 2, 0).astype(np.uint8)))
        pairwise = mask_utils.iou(encoded, targets, [0] * len(targets))
        reference.extend(np.diag(np.atleast_2d(pairwise)))
    assert result.prompts == len(reference) == sum(len(s.masks) for s in scenes)
    assert result.scenes == len(scenes)
    np.testing.assert_allclose(result.ious, reference, rtol=0, atol=1e-12)
    assert result.mask_iou == pytest.approx(float(np.mean(reference)), abs=1e-12)


@pytest.mark.parametrize("max_iou_loss, dtype", [(float("inf"), "F16"), (float("-inf"), "F32")])
def test_export_keeps_float16_only_within_the_iou_budget(tmp_path, scenes, max_iou_loss, dtype):
    trainer = SamTrainer(tmp_path / "run", _config())
    sam_dir = trainer.save() / "sam"
    report = export_sam(sam_dir, tmp_path / "sam", scenes[:1], max_iou_loss=max_iou_loss)
    assert report["dtype"] == {"F16": "float16", "F32": "float32"}[dtype]
    with safe_open(str(tmp_path / "sam" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {dtype}
    assert json.loads((tmp_path / "sam" / "config.json").read_text()) == TINY_SAM_CONFIG
    decoder = MaskDecoder.from_dir(tmp_path / "sam")
    masks = predict_masks(decoder, scenes[0])
    assert masks.shape == scenes[0].masks.shape and masks.dtype == bool


def test_a_save_killed_between_its_moves_resumes_from_the_previous_checkpoint(tmp_path):
    trainer = SamTrainer(tmp_path, _config())
    trainer.train(max_steps=2)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp" / "sam").mkdir(parents=True)  # the next save, half written
    resumed = SamTrainer(tmp_path, _config())
    assert resumed.resume() and resumed.state.step == 2
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3


def test_the_evaluation_of_the_step_time_runs_out_at_is_logged(tmp_path, scenes):
    trainer = SamTrainer(tmp_path, _config(eval_every=1, eval_count=1), eval_scenes=scenes[:1])
    trainer.train(max_steps=3, max_seconds=0.0)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert trainer.state.step == 1 and rows[-1].split(",")[0] == "1" and rows[-1].split(",")[-1] == "1"


def test_cli_trains_refuses_to_overwrite_resumes_and_exports(tmp_path, capsys):
    run = ["--run-dir", str(tmp_path / "run"), "--threads", "1", "--batch-size", "2", "--eval-count", "0",
           "--max-steps", "1"]
    main(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(run)
    assert refused.value.code == 2 and "pass --resume to continue it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main([*run, "--log-every", "0"])
    assert refused.value.code == 2 and "log_every 0 (at least 1)" in capsys.readouterr().err
    main([*run, "--resume"])
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 2 and state["state"]["samples"] == 4
    capsys.readouterr()
    main(["--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "sam"), "--test-count", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "run" / "export_report.json").read_text())
    assert report["scenes"] == 1 and report["dtype"] in ("float16", "float32")
    MaskDecoder.from_dir(tmp_path / "sam")
