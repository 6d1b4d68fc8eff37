"""`[finetune] matmul_dtype = "bfloat16"` (`finetune --matmul-dtype bfloat16`, issue 22): the frozen prior's pass and the
policy gradient's products under bf16 autocast, everything else float32.

Checked in the loop (`train_step`): the sampled trajectories, rewards and residual log-probabilities are the float32
run's bit for bit; the prior's log-probabilities and the gradient move by bf16 rounding only (close, not equal); the
parameters and their gradients stay float32. The CLI records the choice in the checkpoint and refuses other dtypes.

`[pretrain] matmul_dtype` (`pretrain --matmul-dtype bfloat16`): the estimator's network products under bf16 autocast;
the loss and gradient move by bf16 rounding only, and `--resume` keeps the run's own choice.
"""

from __future__ import annotations

import pytest
import torch

from rtbcli import finetune as finetune_module
from rtbcli.checkpoint import load_checkpoint
from rtbcli.distributed import Dist
from test_cli import assert_one_line_error, error_line

pytestmark = pytest.mark.usefixtures("one_thread")


def one_step(prior, preset, tmp_path, name):
    run = finetune_module.setup(load_checkpoint(prior), preset, "tiny", "rtb", tmp_path / f"{name}.safetensors")
    st = finetune_module.train_step(run, Dist())
    grads = [p.grad.detach().clone() for p in run.policy.parameters()]
    return st, [st.traj.clone(), st.batch.log_r.clone(), st.batch.step_lpf.clone(), st.batch.step_lpp.clone()], grads, run


def assert_bf16_rounding_only(g32: list[torch.Tensor], g16: list[torch.Tensor], sampler) -> None:
    """The bf16 step's gradient is the float32 step's up to bf16 rounding, and not equal to it (the products ran in
    bf16); the sampler's parameters and gradients stay float32."""
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in sampler.parameters())
    flat32, flat16 = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    assert not torch.equal(flat32, flat16)
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.999
    assert (flat16.norm() / flat32.norm() - 1).abs() < 0.01


def test_bf16_products_move_the_prior_pass_and_the_gradient_by_rounding_only(tmp_path, tiny_prior, tiny_preset):
    exact = one_step(tiny_prior, tiny_preset, tmp_path, "f32")
    bf16 = one_step(tiny_prior, tiny_preset.updated("finetune", matmul_dtype="bfloat16"), tmp_path, "bf16")
    (_, (traj, log_r, lpf, lpp), g32, _), (_, (traj_b, log_r_b, lpf_b, lpp_b), g16, run) = exact, bf16
    assert torch.equal(traj, traj_b) and torch.equal(log_r, log_r_b) and torch.equal(lpf, lpf_b)  # sampling stays float32
    assert lpp_b.dtype == torch.float32 and not torch.equal(lpp, lpp_b)  # the prior's pass ran in bf16 ...
    assert (lpp - lpp_b).abs().max() < 0.05 * lpp.abs().max()  # ... to bf16's rounding
    assert_bf16_rounding_only(g32, g16, run.policy)


def test_replay_steps_run_under_bf16_products(tmp_path, tiny_prior, tiny_preset):
    preset = tiny_preset.updated("finetune", matmul_dtype="bfloat16", replay=True, buffer_size=64)
    run = finetune_module.setup(load_checkpoint(tiny_prior), preset, "tiny", "rtb", tmp_path / "r.safetensors")
    stats = [finetune_module.train_step(run, Dist()) for _ in range(4)]
    assert [s.replayed for s in stats] == [False, True, False, True]
    assert all(torch.isfinite(s.loss) for s in stats)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in run.policy.parameters())


def test_the_cli_records_the_choice_and_refuses_other_dtypes(tmp_path, capsys, tiny_prior, tiny_preset_file):
    from rtbcli.cli import run as cli_run

    out = tmp_path / "b.safetensors"
    code = cli_run(["finetune", "--preset", str(tiny_preset_file), "--prior", str(tiny_prior), "--matmul-dtype", "bfloat16",
                    "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out).preset.finetune.matmul_dtype == "bfloat16"
    bad = tmp_path / "x.safetensors"
    code, err = error_line(capsys, "finetune", "--prior", tiny_prior, "--matmul-dtype", "float16", "--out", bad)
    assert_one_line_error(code, err, "--matmul-dtype")
    assert not bad.exists()


def pretrain_step(preset, tmp_path, name, estimator):
    from rtbcli import pretrain as pretrain_module

    p = preset.updated("pretrain", batch_size=64, estimator=estimator)
    run = pretrain_module.setup(p, "tiny", tmp_path / f"{name}.safetensors", seed=2)
    loss = pretrain_module.train_step(run, Dist())
    return loss, [p.grad.detach().clone() for p in run.sampler.parameters()], run


@pytest.mark.parametrize("estimator", ["pairs", "trajectory"])
def test_bf16_pretraining_moves_the_gradient_by_rounding_only(tmp_path, tiny_preset, estimator):
    """`[pretrain] matmul_dtype = "bfloat16"`: the same draws, the loss and gradient within bf16 rounding of the float32
    step's (not equal to them: the products ran in bf16), parameters and gradients float32."""
    loss32, g32, _ = pretrain_step(tiny_preset, tmp_path, "f32", estimator)
    loss16, g16, run = pretrain_step(tiny_preset.updated("pretrain", matmul_dtype="bfloat16"), tmp_path, "bf16", estimator)
    assert loss16.dtype == torch.float32 and (loss16 - loss32).abs() < 0.01 * loss32.abs()
    assert_bf16_rounding_only(g32, g16, run.sampler)


def test_pretrain_cli_records_the_choice_and_refuses_it_on_resume(tmp_path, capsys, tiny_preset_file):
    from rtbcli.cli import run as cli_run

    out = tmp_path / "p.safetensors"
    code = cli_run(["pretrain", "--preset", str(tiny_preset_file), "--steps", "3", "--matmul-dtype", "bfloat16", "--out", str(out),
                    "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out).preset.pretrain.matmul_dtype == "bfloat16"
    code, err = error_line(
        capsys, "pretrain", "--resume", out, "--steps", "5", "--matmul-dtype", "float32", "--out", tmp_path / "r.safetensors"
    )
    assert_one_line_error(code, err, "--resume")
    bad = tmp_path / "x.safetensors"
    code, err = error_line(capsys, "pretrain", "--preset", tiny_preset_file, "--matmul-dtype", "float16", "--out", bad)
    assert_one_line_error(code, err, "--matmul-dtype")
    assert not bad.exists()
