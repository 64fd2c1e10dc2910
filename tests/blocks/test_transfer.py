"""Attention transfer for one block: the loss falls, only feature maps and gamma move, checkpoints resume exactly."""

import copy

import torch
from transformers import AutoModelForCausalLM

from blocks.convert import AttentionSettings, convert_layers
from blocks.stack import LayerStack
from blocks.transfer import BlockTrainer, TransferSettings, transfer_loss
from tests.conftest import tiny_llama_config


def make_stack(start=1, end=3, window=8):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=4)).eval()
    stack = LayerStack.from_model(model, start, end)
    convert_layers(stack.layers, model.config, AttentionSettings(window_size=window, window_kind="terrace",
                                                                  feature_dim=8))
    return model, stack


def batches(num, length=48, hidden=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, length, hidden, generator=gen), torch.arange(length).unsqueeze(0)) for _ in range(num)]


def test_stack_equals_the_model_layers():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=4)).eval()
    with torch.no_grad():
        ids = torch.randint(0, 128, (1, 20))
        states = model(ids, output_hidden_states=True).hidden_states  # states[l] = input to layer l (raw stream)
        out = LayerStack.from_model(model, 1, 3)(states[1], torch.arange(20).unsqueeze(0))
    torch.testing.assert_close(out, states[3], atol=1e-5, rtol=1e-5)


def test_transfer_reduces_loss_and_only_trains_feature_maps():
    model, stack = make_stack()
    frozen_before = {n: p.detach().clone() for n, p in stack.named_parameters()
                     if "feature_map" not in n and "window_logit" not in n}
    trainer = BlockTrainer(stack, TransferSettings(lr=1e-2, grad_accum=2))
    val = batches(2, seed=99)
    first = trainer.evaluate(val)["val_loss"]
    data = batches(8)
    for _ in range(5):
        for hidden, pos in data:
            trainer.train_micro_batch(hidden, pos)
    last = trainer.evaluate(val)["val_loss"]
    assert last < 0.7 * first, (first, last)
    for n, p in stack.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert trainer.optimizer_steps == 20
    assert set(trainer.trainable_state()) == {f"layers.{i}.{k}" for i in (1, 2)
                                              for k in ("feature_map_q.weight", "feature_map_k.weight",
                                                        "window_logit")}


def test_resume_from_state_dict_is_bitwise():
    data = batches(6)
    _, stack_a = make_stack()
    trainer_a = BlockTrainer(stack_a, TransferSettings(grad_accum=2))
    for hidden, pos in data:
        trainer_a.train_micro_batch(hidden, pos)

    _, stack_b = make_stack()
    trainer_b = BlockTrainer(stack_b, TransferSettings(grad_accum=2))
    for hidden, pos in data[:3]:  # killed after 3 micro-batches (mid accumulation), checkpoint taken at 2
        if trainer_b.micro_steps == 2:
            saved = copy.deepcopy(trainer_b.state_dict())
        trainer_b.train_micro_batch(hidden, pos)

    _, stack_c = make_stack()
    trainer_c = BlockTrainer(stack_c, TransferSettings(grad_accum=2))
    trainer_c.load_state_dict(saved)
    for hidden, pos in data[trainer_c.micro_steps:]:
        trainer_c.train_micro_batch(hidden, pos)
    for key, value in trainer_a.trainable_state().items():
        assert torch.equal(value, trainer_c.trainable_state()[key]), key


def test_transfer_loss_gradient_reaches_each_layer_only_from_its_own_loss():
    _, stack = make_stack()
    BlockTrainer(stack, TransferSettings())
    hidden, pos = batches(1)[0]
    loss, per_layer, _ = transfer_loss(stack, hidden, pos)
    assert len(per_layer) == 2 and all(v > 0 for v in per_layer)
    loss.backward()
    for layer in stack.layers:
        assert layer.self_attn.feature_map_q.weight.grad.abs().sum() > 0
