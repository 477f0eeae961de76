"""Atomic checkpoints: a half-written folder never counts, stale ones are swept, re-saves swap."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_coach.runtime.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def small_model():
    model = nn.Linear(4, 3)
    mx.eval(model.parameters())
    return model


def test_save_load_round_trip_and_half_written_folders(tmp_path):
    model, opt = small_model(), optim.AdamW(learning_rate=0.1)
    opt.init(model.trainable_parameters())
    grads = {k: mx.ones_like(v) for k, v in model.trainable_parameters().items()}
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, {"model": "x"}, {"entries": []})
    # a crash while writing step 4 leaves only a hidden temporary folder
    (tmp_path / "checkpoints/.tmp-step-4-99999").mkdir()
    (tmp_path / "checkpoints/step-3").mkdir()  # no state.json: not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"]

    fresh, fresh_opt = small_model(), optim.AdamW(learning_rate=0.1)
    fresh_opt.init(fresh.trainable_parameters())
    state, cache = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state == {"step": 2} and cache == {"entries": []}
    for k, v in model.parameters().items():
        np.testing.assert_array_equal(np.array(v), np.array(fresh.parameters()[k]))
    assert int(fresh_opt.state["step"]) == int(opt.state["step"]) == 1
    np.testing.assert_array_equal(np.array(fresh_opt.state["weight"]["m"]), np.array(opt.state["weight"]["m"]))

    # the next save sweeps the stale temporary folder; re-saving a step replaces it whole
    save_checkpoint(tmp_path, 2, model, opt, {"step": 2, "again": True}, {"model": "x"})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-2", "step-3"]
    assert json.loads((tmp_path / "checkpoints/step-2/state.json").read_text())["again"] is True
    assert not (tmp_path / "checkpoints/step-2/cache.json").exists()
