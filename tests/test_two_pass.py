"""The two-pass step in a plain Accelerate loop (`accelerate_step`) and TwoPassStep's own rules."""

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from reference import count_host_reads
from tiny_training import TinyData, TinyNet, decay_groups, flat, tiny_args

from hf_zsharp import two_pass
from hf_zsharp.optim import ZSharp
from hf_zsharp.trainer import ZSharpTrainer
from hf_zsharp.two_pass import TwoPassStep, accelerate_step, unwrap_sam_optimizer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerator state is process-wide: each test builds its own Accelerator from scratch."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_optimizer(model, fused=False):
    return ZSharp(decay_groups(model, 0.0), torch.optim.AdamW, lr=1e-2, fused=fused)


def accelerate_loop(model, steps, batch_size=8, accumulation=1, interval=1, scaler=None, fused=False):
    """An ordinary Accelerate loop with accelerate_step. Returns per step `record` (forward calls, whether
    Accelerate skipped it) and `params` (after it), and the logged `stats` of the whole loop."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    if scaler is not None:
        accelerator.scaler = scaler
    optimizer = make_optimizer(model, fused)
    model, optimizer = accelerator.prepare(model, optimizer)
    record, params, calls = [], [], model.calls
    for batch in TinyData().batches(batch_size)[: steps * accumulation]:
        with accelerator.accumulate(model):
            loss = accelerate_step(accelerator, model, optimizer, batch, interval=interval)
            assert not loss.requires_grad
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            record.append((model.calls - calls, optimizer.step_was_skipped))
            params.append(flat(model))
            calls = model.calls
    stats = two_pass._STEPS[optimizer].pop_stats()
    return SimpleNamespace(record=record, params=params, stats=stats)


def test_matches_a_plain_zsharp_loop():
    model, reference = TinyNet(), TinyNet()
    accelerate_loop(model, steps=4)
    opt = make_optimizer(reference)
    for batch in TinyData().batches(8)[:4]:

        def closure(batch=batch):
            loss = reference(**batch)["loss"]
            loss.backward()
            return loss

        opt.step(closure)
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=1e-6)


def test_gradient_accumulation_equals_the_larger_batch():
    big, small = TinyNet(), TinyNet()
    accelerate_loop(big, steps=3, batch_size=8)
    record = accelerate_loop(small, steps=3, batch_size=4, accumulation=2).record
    assert [calls for calls, _ in record] == [4, 4, 4]
    torch.testing.assert_close(flat(small), flat(big), rtol=0, atol=1e-6)


def test_interval_alternates_two_pass_and_plain_steps():
    record = accelerate_loop(TinyNet(), steps=5, interval=2).record
    assert [calls for calls, _ in record] == [2, 1, 2, 1, 2]


def poisoned_loop(call: int, **options):
    """Three steps of `accelerate_loop` whose forward call number `call` gives an infinite loss."""
    model = TinyNet()
    model.poison = {call}
    return accelerate_loop(model, steps=3, **options)


def test_grad_scaler_skips_a_step_with_non_finite_first_pass():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loop = poisoned_loop(3, scaler=scaler)
    assert loop.record == [(2, False), (1, True), (2, False)]
    assert scaler.get_scale() == 2.0**9
    assert loop.stats["sam_skipped_steps"] == 1


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_non_finite_second_pass_skips_the_step_and_is_counted(fused):
    loop = poisoned_loop(4, fused=fused)  # the second pass of step 1
    assert [calls for calls, _ in loop.record] == [2, 2, 2]
    assert torch.equal(loop.params[1], loop.params[0])
    assert torch.isfinite(loop.params[2]).all() and not torch.equal(loop.params[2], loop.params[1])
    assert loop.stats["sam_skipped_steps"] == 1


def test_grad_scaler_skip_of_a_non_finite_second_pass_is_counted_once():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loop = poisoned_loop(4, scaler=scaler)
    assert loop.record == [(2, False), (2, True), (2, False)]
    assert torch.equal(loop.params[1], loop.params[0])
    assert scaler.get_scale() == 2.0**9
    assert loop.stats["sam_skipped_steps"] == 1


def test_grad_scaler_skip_of_a_first_pass_does_not_skip_the_next_plain_step():
    model = TinyNet()
    model.poison = {1}  # step 0 (two-pass) overflows; step 1 is a plain step (interval 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loop = accelerate_loop(model, steps=2, interval=2, scaler=scaler)
    assert loop.record == [(1, True), (1, False)]
    assert torch.equal(loop.params[0], flat(TinyNet()))
    assert not torch.equal(loop.params[1], loop.params[0])
    assert loop.stats["sam_skipped_steps"] == 1


@pytest.mark.parametrize(("fused", "per_step"), [(True, 1), (False, 2)], ids=["fused", "foreach"])
def test_host_reads_per_two_pass_step(fused, per_step, monkeypatch):
    """One host read per step (the ascent's); the second pass's check adds one unless the base is fused."""
    reads = count_host_reads(monkeypatch)
    accelerate_loop(TinyNet(), steps=3, fused=fused)
    assert len(reads) == 3 * per_step + 2  # + reading the skip count and the loss increase once, for the logs


def test_an_error_in_the_second_pass_leaves_the_weights_and_rng_restored():
    model = TinyNet(dropout=0.5)
    twin = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    before = flat(model)
    batch = TinyData().batches(8)[0]
    passes = []

    def compute_loss(model, batch):
        passes.append(1)
        if len(passes) == 2:
            raise RuntimeError("boom")
        return model(**batch)["loss"]

    start = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        accelerate_step(accelerator, model, optimizer, batch, compute_loss)
    after = torch.get_rng_state()
    assert torch.equal(flat(model), before)
    # The RNG is where the first pass alone leaves it.
    torch.set_rng_state(start)
    twin(**batch)
    assert torch.equal(after, torch.get_rng_state())
    # Nothing is left pending: the next step is a normal two-pass step.
    passes.clear()
    calls = model.calls
    accelerate_step(accelerator, model, optimizer, batch)
    assert model.calls - calls == 2


def test_perturb_cannot_change_within_an_optimizer_step():
    model = TinyNet()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    step = TwoPassStep(accelerator, model, optimizer)
    batch = TinyData().batches(4)[0]

    def forward_backward():
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        return loss.detach()

    with accelerator.accumulate(model):
        step(forward_backward, perturb=True)
    with accelerator.accumulate(model), pytest.raises(RuntimeError, match="perturb changed"):
        step(forward_backward, perturb=False)


def test_statistics_are_averaged_then_reset():
    model = TinyNet()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    step = TwoPassStep(accelerator, model, optimizer)
    seen = []
    for batch in TinyData().batches(8)[:2]:
        step(lambda b=batch: _backward(accelerator, model, b))
        seen.append(dict(optimizer.optimizer.ascent_stats))
        optimizer.step()
        optimizer.zero_grad()
    stats = step.pop_stats()
    assert stats["sam_perturbation_norm"] == pytest.approx(
        (seen[0]["perturbation_norm"] + seen[1]["perturbation_norm"]) / 2
    )
    assert stats["sam_kept_fraction"] == pytest.approx(seen[0]["kept_fraction"])
    assert stats["sam_skipped_steps"] == 0
    assert step.pop_stats() == {}


def _backward(accelerator, model, batch):
    loss = model(**batch)["loss"]
    accelerator.backward(loss)
    return loss.detach()


def test_a_plain_optimizer_and_bad_interval_are_refused():
    model = TinyNet()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="needs an hf_zsharp optimizer"):
        unwrap_sam_optimizer(optimizer)
    with pytest.raises(TypeError, match="needs an hf_zsharp optimizer"):
        accelerate_step(accelerator, model, optimizer, TinyData().batches(8)[0])
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        accelerate_step(accelerator, model, optimizer, {}, interval=0)


def test_the_no_trainer_script_trains_on_digits():
    path = Path(__file__).parents[1] / "scripts" / "train_no_trainer.py"
    spec = importlib.util.spec_from_file_location("train_no_trainer", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(
        ["--max_steps", "2", "--batch_size", "8", "--gradient_accumulation_steps", "2", "--sam_interval", "2"]
    )
    assert result["steps"] == 2 and 0.0 <= result["eval_accuracy"] <= 1.0
    with pytest.raises(SystemExit):
        script.parse_args(["--sam", "adam"])


def test_trainer_resumes_the_random_mask_identically(tmp_path):
    """mask="random" draws from the optimizer's own generator: its state is checkpointed and resumed."""
    run = {"sam_mask": "random", "max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    straight = TinyNet()
    ZSharpTrainer(
        model=straight, args=tiny_args(str(tmp_path / "out"), **run), train_dataset=TinyData()
    ).train()
    resumed = TinyNet()
    trainer = ZSharpTrainer(
        model=resumed, args=tiny_args(str(tmp_path / "out"), **run), train_dataset=TinyData()
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    torch.testing.assert_close(flat(resumed), flat(straight), rtol=0, atol=0)


def test_the_loss_increase_is_the_batch_mean_with_or_without_accumulation():
    logged = accelerate_loop(TinyNet(), steps=3, batch_size=8).stats
    assert tuple(logged) == two_pass.LOGGED_STATISTICS  # every logged name, in the exported order
    whole = logged["sam_loss_increase"]
    halves = accelerate_loop(TinyNet(), steps=3, batch_size=4, accumulation=2).stats["sam_loss_increase"]
    assert whole > 0
    # Equal halves: their mean loss is the whole batch's, up to a few float32 ulps of losses near 1.
    assert halves == pytest.approx(whole, abs=1e-6)
