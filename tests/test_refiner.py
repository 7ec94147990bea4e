"""The refinement module: identity at initialisation, one channel order, and it can learn."""

import torch

from magseg.engine.refiner_network import Refiner, refiner_input


def _probs(*shape):
    return torch.softmax(torch.randn(*shape) * 3, dim=1)


def test_untrained_refiner_returns_the_fine_prediction():
    fine, coarse = _probs(2, 5, 17, 23), _probs(2, 5, 17, 23)
    refined = Refiner(5, channels=8, context_stride=4)(fine, coarse).softmax(1)
    assert torch.allclose(refined, fine, atol=1e-5)


def test_channel_order_is_fine_then_coarse():
    fine, coarse = _probs(1, 3, 4, 4), _probs(1, 3, 4, 4)
    x = refiner_input(fine, coarse)
    assert torch.equal(x[:, :3], fine) and torch.equal(x[:, 3:], coarse)


def test_refiner_output_shape_for_odd_sizes_and_strides():
    for stride in (1, 2, 4, 8):
        out = Refiner(4, channels=8, context_stride=stride)(_probs(3, 4, 31, 45), _probs(3, 4, 31, 45))
        assert out.shape == (3, 4, 31, 45)


def test_refiner_learns_to_trust_the_coarse_map_where_the_fine_one_is_unsure():
    # Target = the coarse map's class (smooth: 8x8 blocks, as an upsampled coarse view is);
    # fine is noise. A few steps must cut the loss.
    torch.manual_seed(0)
    refiner = Refiner(3, channels=16, context_stride=2)
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    coarse_labels = torch.randint(0, 3, (8, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    coarse = torch.nn.functional.one_hot(coarse_labels, 3).permute(0, 3, 1, 2).float() * 0.8 + 0.2 / 3
    fine = _probs(8, 3, 32, 32)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(refiner(fine, coarse), coarse_labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    accuracy = (refiner(fine, coarse).argmax(1) == coarse_labels).float().mean()
    assert accuracy > 0.9  # the fine map alone is right a third of the time


def test_a_confident_fine_pixel_survives_a_smooth_correction():
    # One-pixel-wide "road" (class 1) that the fine map is sure of, inside a region where the
    # fine map hesitates and the correction favours class 0: the road stays, the region flips.
    refiner = Refiner(2, channels=4, context_stride=4)
    torch.nn.init.zeros_(refiner.context[-1].weight)
    with torch.no_grad():
        refiner.context[-1].bias.copy_(torch.tensor([1.0, -1.0]))  # +2 logits toward class 0
    fine = torch.full((1, 2, 16, 16), 0.5)
    fine[0, 0, :, 0], fine[0, 1, :, 0] = 0.5, 0.5
    fine[0, 0, :, 8], fine[0, 1, :, 8] = 0.01, 0.99  # the road, column 8
    labels = refiner(fine, fine).argmax(1)[0]
    assert (labels[:, 8] == 1).all() and (labels[:, :8] == 0).all()


def test_probs_is_the_softmax_of_the_logits():
    refiner = Refiner(5, channels=8, context_stride=4)
    torch.nn.init.normal_(refiner.context[-1].weight, std=2.0)  # a large correction
    fine, coarse = _probs(2, 5, 19, 21), _probs(2, 5, 19, 21)
    fine[0, :, 0, 0] = torch.tensor([1.0, 0, 0, 0, 0])  # exact zeros
    expected = refiner(fine, coarse).softmax(1)
    inputs = fine.clone(), coarse.clone()
    got = refiner.probs(fine, coarse)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(2, 19, 21), atol=1e-6)
    # probs works in place on its own buffers only: the engine reuses fine and coarse
    assert torch.equal(fine, inputs[0]) and torch.equal(coarse, inputs[1])


def test_probs_leaves_its_inputs_alone_at_full_resolution_too():
    refiner = Refiner(3, channels=4, context_stride=1)  # no upsampling: delta is full size
    torch.nn.init.normal_(refiner.context[-1].weight, std=1.0)
    fine, coarse = _probs(1, 3, 9, 7), _probs(1, 3, 9, 7)
    before = fine.clone()
    got = refiner.probs(fine, coarse)
    assert torch.equal(fine, before)
    assert torch.allclose(got, refiner(fine, coarse).softmax(1), atol=1e-5)


def test_untrained_refiner_returns_the_fine_prediction_exactly():
    # What the engine calls: bit for bit the fine map, whatever the gate and the coarse map.
    for stride in (1, 2, 4):
        fine, coarse = _probs(2, 5, 17, 23), _probs(2, 5, 17, 23)
        refiner = Refiner(5, channels=8, context_stride=stride)
        assert torch.equal(refiner.probs(fine, coarse), fine)


def test_the_gate_keeps_a_confident_fine_pixel_against_a_contrary_correction():
    # The correction pushes every pixel 5 logits toward class 0 (a "background" verdict
    # from the coarse view). A small object of class 1 that the fine map is sure of (0.97)
    # keeps its class; a pixel where the fine map hesitates (0.55) takes the correction.
    refiner = Refiner(2, channels=4, context_stride=4)
    with torch.no_grad():
        refiner.context[-1].bias.copy_(torch.tensor([2.5, -2.5]))
    fine = torch.full((1, 2, 16, 16), 0.5)
    fine[0, 1, 2:14, 2:14], fine[0, 0, 2:14, 2:14] = 0.55, 0.45  # unsure: class 1 by a hair
    fine[0, 1, 6:9, 6:9], fine[0, 0, 6:9, 6:9] = 0.97, 0.03  # a sure 3 px object
    coarse = torch.zeros_like(fine)
    coarse[:, 0] = 1.0
    labels = refiner.probs(fine, coarse).argmax(1)[0]
    assert (labels[6:9, 6:9] == 1).all()
    assert (labels[2:5, 2:5] == 0).all()
    gate = refiner.gate_map(fine, coarse)[0, 0]
    assert gate[7, 7] < 0.25 and gate[3, 3] > 0.9
    # Without the gate the same correction erases the object.
    bare = Refiner(2, channels=4, context_stride=4, gate=False)
    bare.load_state_dict({k: v for k, v in refiner.state_dict().items() if not k.startswith("gate.")})
    assert (bare.probs(fine, coarse).argmax(1)[0, 6:9, 6:9] == 0).all()


def test_probs_is_the_softmax_of_the_gated_logits():
    torch.manual_seed(1)
    refiner = Refiner(4, channels=8, context_stride=2)
    torch.nn.init.normal_(refiner.context[-1].weight, std=2.0)
    with torch.no_grad():
        refiner.gate.weight.copy_(torch.tensor([-0.3, 0.2, -0.1]))
    fine, coarse = _probs(2, 4, 15, 18), _probs(2, 4, 15, 18)
    assert torch.allclose(refiner.probs(fine, coarse), refiner(fine, coarse).softmax(1), atol=1e-5)


def test_a_checkpoint_without_gate_weights_loads_as_a_gateless_refiner(tmp_path, tiny_config):
    # A refiner trained before the gate existed: its config has no refiner.gate key and its
    # weights no gate.* entries. It loads as what it was (gate off); forcing the gate on
    # fails with a message that says what to set.
    import pytest

    from magseg.checkpoint import load_checkpoint, save_checkpoint
    from magseg.errors import CheckpointError
    from magseg.segmenter import Segmenter, create_segmenter_model

    config = tiny_config.override({"refiner.gate": False})
    refiner = Refiner(config.num_classes, config.refiner.channels, config.refiner.context_stride, gate=False)
    path = save_checkpoint(tmp_path / "old.ckpt", config, create_segmenter_model(config), refiner)
    raw = torch.load(path, weights_only=True)
    del raw["config"]["refiner"]["gate"]
    torch.save(raw, path)
    ckpt = load_checkpoint(path)
    assert ckpt.config.refiner.gate is False
    assert Segmenter.from_checkpoint(path).refiner.gate is None
    with pytest.raises(CheckpointError, match="refiner.gate=false"):
        Segmenter.from_checkpoint(path, ["refiner.gate=true"])


def test_inference_equals_training_arithmetic_for_sizes_the_stride_does_not_divide():
    # Inference (no autograd) enlarges the correction with magseg.engine.resample.enlarge and
    # takes the detail cue as 1 - sum min(p, q); training interpolates and takes 0.5 sum |p - q|.
    # Both put the cells' centres on the centres of the pixels they pooled, whatever the size.
    torch.manual_seed(2)
    for stride, (h, w) in [(8, (61, 45)), (4, (17, 23)), (3, (9, 10)), (8, (8, 16))]:
        refiner = Refiner(5, channels=8, context_stride=stride)
        torch.nn.init.normal_(refiner.context[-1].weight, std=2.0)
        with torch.no_grad():
            refiner.gate.weight.copy_(torch.tensor([-0.3, 0.2, -0.5]))
        fine, coarse = _probs(2, 5, h, w), _probs(2, 5, h, w)
        trained = refiner(fine, coarse).softmax(1)
        with torch.no_grad():
            inferred = refiner.probs(fine, coarse)
            weights = refiner.weights(fine, coarse)
        assert inferred.shape == (2, 5, h, w)
        assert torch.allclose(inferred, trained, atol=1e-5)
        assert torch.allclose(weights / weights.sum(1, keepdim=True), inferred, atol=1e-6)


def test_the_correction_is_enlarged_cell_centre_on_pixel_centre():
    # Stride 4 over 6 columns: 2 cells (pixels 0-3 and 4-5, the second partial); cell values
    # 0 and 1 land at pixel centres 1.5 and 5.5, so pixel x reads (x - 1.5) / 4, clamped.
    refiner = Refiner(2, channels=4, context_stride=4, gate=False)
    delta = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 2, 1, 2).contiguous()
    like = torch.zeros(1, 2, 3, 6)
    expected = torch.tensor([0.0, 0.0, 0.125, 0.375, 0.625, 0.875])
    with torch.no_grad():
        got = refiner._full_size(delta, like)
    assert got.shape == (1, 2, 3, 6)
    assert torch.allclose(got[0, 0], expected.expand(3, 6), atol=1e-7)
    assert torch.allclose(refiner._full_size(delta, like), got, atol=1e-7)  # the training path


def test_under_an_autocast_the_convolutions_run_in_its_dtype_and_the_correction_returns_float32():
    # The engine's bf16 runs the refiner's convolutions in bf16 (on a channels-last copy of
    # their input, where oneDNN's kernels are fast); what comes out is float32 again, within
    # bf16's few bits of the float32 correction, and per pixel shifted to a maximum of 0.
    # Inference in float32 on the CPU takes channels-last too; training keeps NCHW.
    torch.manual_seed(3)
    refiner = Refiner(5, channels=8, context_stride=4)
    for p in refiner.context.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fine, coarse = _probs(2, 5, 9, 11), _probs(2, 5, 9, 11)
    seen = []
    refiner.context[0].register_forward_hook(
        lambda module, args, out: seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype)))
    with torch.no_grad():
        exact = refiner._small(fine, coarse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = refiner._small(fine, coarse)
    with torch.enable_grad():
        trained = refiner._small(fine, coarse)
    assert seen == [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)]
    assert float((trained.detach() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    assert low.dtype == torch.float32 and low.is_contiguous() and low.shape == exact.shape
    assert torch.equal(low[:, 5:], exact[:, 5:])  # the pooled fine map, untouched
    assert torch.equal(low[:, :5].amax(dim=1), torch.zeros_like(low[:, 0]))
    scale = exact[:, :5].abs().max()
    assert float((low[:, :5] - exact[:, :5]).abs().max()) <= 0.05 * float(scale)
