"""FlowProcess: the flow-matching math by hand, against diffusers' scheduler and training script,
and the errors that keep VP and flow parts apart."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.models import add_lora
from acpo_lightning.processes import FlowProcess, VPProcess

N = 1000


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3 / SD3.5's training scheduler: a fixed shift of 3."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's: sigmas shifted by resolution (``use_dynamic_shifting``)."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip


# ---------------------------------------------------------------- hand-computed values
def test_add_noise_target_and_x0_by_hand() -> None:
    process = FlowProcess(sd3_scheduler())
    x0, eps, t = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([250.0])
    # sigma 0.25: x_t = 0.75 * 2 + 0.25 * (-1); v = eps - x0; x0 = x_t - 0.25 * v
    x_t = process.add_noise(x0, eps, t)
    assert x_t.item() == pytest.approx(1.25)
    v = process.target(x0, eps, t)
    assert v.item() == pytest.approx(-3.0)
    assert process.predicted_original(x_t, v, t).item() == pytest.approx(2.0)


def test_per_sample_sigmas_broadcast_over_the_sample() -> None:
    process = FlowProcess(sd3_scheduler())
    x0, eps = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    x_t = process.add_noise(x0, eps, torch.tensor([0.0, 1000.0]))
    assert torch.equal(x_t[0], torch.ones(3, 2, 2)) and torch.equal(x_t[1], torch.zeros(3, 2, 2))
    assert process.sigmas(torch.tensor([0, 400, 1000])).tolist() == pytest.approx([0.0, 0.4, 1.0])


def test_gate_is_a_bound_on_sigma() -> None:
    process = FlowProcess(sd3_scheduler(), sigma_max=0.4)
    assert process.gate(torch.tensor([0.0, 399.9, 400.0, 400.5, 1000.0])).tolist() == [
        True, True, True, False, False,
    ]  # fmt: skip


def test_perceptual_times_lie_in_the_sigma_window_and_come_first() -> None:
    process = FlowProcess(sd3_scheduler(), sigma_min=0.1, sigma_max=0.3)
    times, count = process.sample_times(8, 0.5, torch.Generator().manual_seed(0))
    assert count == 4 and times.shape == (8,)
    assert bool(((times[:4] >= 100.0) & (times[:4] <= 300.0)).all())
    assert bool(process.gate(times[:4]).all())


# ---------------------------------------------------------------- against diffusers
def test_add_noise_equals_the_schedulers_scale_noise() -> None:
    scheduler, process = sd3_scheduler(), FlowProcess(sd3_scheduler())
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    times = scheduler.timesteps[torch.tensor([0, 123, 640, 999])]
    expected = scheduler.scale_noise(x0, times, eps)
    torch.testing.assert_close(process.add_noise(x0, eps, times), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weighting", ["logit_normal", "uniform", "mode"])
def test_training_times_follow_the_sd3_script(weighting: str) -> None:
    """diffusers' train_dreambooth_lora_sd3.py: u from the density, index floor(u * N) into the
    scheduler's timesteps; the sigma is the scheduler's sigma of that timestep."""
    scheduler = sd3_scheduler()
    process = FlowProcess(sd3_scheduler(), weighting=weighting)
    times, count = process.sample_times(64, 0.0, torch.Generator().manual_seed(7))
    u = compute_density_for_timestep_sampling(
        weighting, 64, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(7)
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    assert count == 0
    assert torch.equal(times, scheduler.timesteps[indices])
    torch.testing.assert_close(process.sigmas(times), scheduler.sigmas[indices], rtol=0, atol=1e-7)


def test_dynamic_shift_table_equals_set_timesteps_with_mu() -> None:
    seq_len = 1024
    process = FlowProcess(flux_scheduler(), image_seq_len=seq_len)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    reference = flux_scheduler()
    reference.set_timesteps(N, mu=mu)
    torch.testing.assert_close(
        process.sigmas(process.train_times), reference.sigmas[:N], rtol=0, atol=1e-6
    )
    # the shift is real: sigma 0.5 of the unshifted table moves up
    assert process.sigmas(process.train_times)[N // 2] > 0.6


def test_x0_estimate_is_the_euler_step_to_sigma_zero() -> None:
    """FlowMatchEulerDiscreteScheduler.step is x + (s' - s) v = (1 - s') x0_hat + s' eps_hat, with
    x0_hat = x - s v (our estimate) and eps_hat = x + (1 - s) v: at every step of a schedule."""
    process = FlowProcess(sd3_scheduler())
    scheduler = sd3_scheduler()
    scheduler.set_timesteps(6)
    torch.manual_seed(1)
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for i, t in enumerate(scheduler.timesteps):
        stepped = scheduler.step(v, t, x, return_dict=False)[0]
        x0_hat = process.predicted_original(x, v, t.expand(2))
        s_next = float(scheduler.sigmas[i + 1])
        eps_hat = x + (1 - float(t) / N) * v
        torch.testing.assert_close(
            stepped, (1 - s_next) * x0_hat + s_next * eps_hat, rtol=0, atol=1e-5
        )
    # the last step lands on sigma 0: it returns the x0 estimate itself
    assert float(scheduler.sigmas[-1]) == 0.0
    torch.testing.assert_close(stepped, x0_hat, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- errors
def test_flow_process_refuses_a_vp_scheduler() -> None:
    with pytest.raises(ValueError, match=r"FlowProcess needs a flow-matching .* DDPMScheduler"):
        FlowProcess(DDPMScheduler())


def test_vp_process_refuses_a_flow_scheduler() -> None:
    with pytest.raises(
        ValueError, match=r"FlowMatchEulerDiscreteScheduler.*use process: .*FlowProcess"
    ):
        VPProcess(sd3_scheduler())


def test_dynamic_shifting_needs_image_seq_len() -> None:
    with pytest.raises(ValueError, match="image_seq_len"):
        FlowProcess(flux_scheduler())


def _unet_module(**kwargs) -> ACPOModule:
    return ACPOModule(
        unet=add_lora(T.tiny_unet(sample_size=16), rank=4), quality_head=T.TinyQualityHead(),
        vae=T.tiny_vae(), text_encoder=T.tiny_text_encoder(), tokenizer=T.tiny_tokenizer(),
        **kwargs,
    )  # fmt: skip


def test_tau_beside_a_flow_noise_scheduler_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tau gate VP timesteps.*sigma_max"):
        _unet_module(noise_scheduler=sd3_scheduler(), tau=300)


def test_a_vp_denoiser_refuses_a_flow_process() -> None:
    with pytest.raises(ValueError, match="trained as a vp model, but the process is FlowProcess"):
        _unet_module(process=FlowProcess(sd3_scheduler()))


def test_a_flow_denoiser_refuses_a_vp_scheduler() -> None:
    from acpo_lightning.denoisers.sd3 import SD3Denoiser
    from acpo_lightning.tiny import sd3 as tiny

    denoiser = SD3Denoiser(
        add_lora(tiny.tiny_sd3_transformer(num_layers=1), rank=2), tiny.tiny_sd3_clip_encoder(),
        T.tiny_tokenizer(), tiny.tiny_sd3_clip_encoder_2(), T.tiny_tokenizer(),
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"SD3Transformer2DModel was trained as a flow model.*DDPMScheduler"
    ):
        ACPOModule(
            denoiser=denoiser, quality_head=T.TinyQualityHead(), vae=tiny.tiny_sd3_vae(),
            noise_scheduler=T.tiny_scheduler(),
        )  # fmt: skip
