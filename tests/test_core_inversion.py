"""The inversion's math on plain tensors: the Euler (DDIM) step and its
inverse in the sigma parameterisation, the null-text schedule of the paper, the
checks an editor runs on an inversion."""

import math

import pytest
import torch

from attnseg.errors import AttnSegError
from attnseg.inversion import (NULL_TEXT_EPSILON, Inversion, check_epsilon, check_iterations, check_method,
                               euler_step, inversion_step, null_text_lr, null_text_tolerance,
                               variance_preserving_mse)

DATA_STD = 0.7


def gaussian_denoiser(x, sigma):
    """The exact denoiser of data ~ N(0, DATA_STD^2): its probability-flow ODE is known."""
    return x * DATA_STD ** 2 / (DATA_STD ** 2 + sigma ** 2)


def sigmas(steps, rho=7.0):
    """Karras et al.'s spacing from 14.6 to 0.03, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    top, bottom = 14.6 ** (1 / rho), 0.03 ** (1 / rho)
    return torch.cat([(top + ramp * (bottom - top)) ** rho, torch.zeros(1, dtype=torch.float64)])


def round_trip(x0, steps):
    schedule = sigmas(steps)
    x = x0
    for i in range(steps - 1, -1, -1):
        x = inversion_step(x, gaussian_denoiser(x, schedule[i]), schedule[i + 1], schedule[i])
    noise = x
    for i in range(steps):
        x = euler_step(x, gaussian_denoiser(x, schedule[i]), schedule[i], schedule[i + 1])
    return noise, x


def test_inverting_then_sampling_returns_the_data_and_converges_with_the_steps():
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * DATA_STD
    _, coarse = round_trip(x0, 20)
    noise, fine = round_trip(x0, 400)
    # the ODE maps x0 to x0 * sqrt(DATA_STD^2 + sigma_max^2) / DATA_STD
    exact = x0 * math.sqrt(DATA_STD ** 2 + 14.6 ** 2) / DATA_STD
    assert float((noise - exact).abs().max()) / float(exact.abs().max()) < 0.05
    coarse_error, fine_error = float((coarse - x0).abs().max()), float((fine - x0).abs().max())
    assert fine_error < coarse_error / 5 and fine_error < 0.1  # first order: error ~ 1 / steps


def test_the_null_text_schedule_is_the_papers_at_50_steps_and_scales_with_the_steps():
    assert null_text_lr(0, 50) == pytest.approx(1e-2)
    assert null_text_lr(49, 50) == pytest.approx(1e-2 * (1 - 49 / 100))
    assert null_text_tolerance(0, 50) == pytest.approx(NULL_TEXT_EPSILON)
    assert null_text_tolerance(49, 50) == pytest.approx(1e-5 + 49 * 2e-5)
    # 25 steps: step i is the paper's step 2i
    assert null_text_tolerance(10, 25) == pytest.approx(null_text_tolerance(20, 50))
    assert null_text_lr(10, 25) == pytest.approx(null_text_lr(20, 50))
    assert null_text_tolerance(3, 50, epsilon=0.0) == pytest.approx(3 * 2e-5)


def test_the_loss_is_on_the_variance_preserving_scale():
    a, b = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert float(variance_preserving_mse(a, b, 0.0)) == pytest.approx(1.0)
    assert float(variance_preserving_mse(a * 3, b, 2.0)) == pytest.approx(9 / 5)


def test_bad_settings_name_their_input():
    with pytest.raises(AttnSegError, match="null_text_iterations: 0"):
        check_iterations(0, "null-text")
    assert check_iterations(0, "DDIM") == 0  # only null-text optimises
    with pytest.raises(AttnSegError, match="method: 'EDICT' is not one of null-text, negative-prompt, DDIM"):
        check_method("EDICT")
    with pytest.raises(AttnSegError, match="early_stop_epsilon"):
        check_epsilon(float("nan"))


def inversion(**overrides):
    values = dict(method="null-text", model_id="SD15 (a)", latent_shape=(4, 16, 16), prompt="a red circle",
                  sigmas=torch.linspace(14.6, 0, 21), scheduler="normal", steps=20, cfg=5.0,
                  noise=torch.zeros(1, 4, 16, 16), null_embeddings=torch.zeros(20, 77, 768))
    values.update(overrides)
    return Inversion(**values)


@pytest.mark.parametrize("change, message", [
    (dict(model_id="SD15 (b)"), "inversion: made with another model"),
    (dict(latent_shape=(4, 16, 24)), "inversion: made from a 4x16x16 latent, but latent_image is 4x16x24"),
    (dict(prompt="a blue square"), "source_prompt: the inversion was made with the prompt 'a red circle'"),
    (dict(steps=10), "steps: 10, but the inversion has 20 steps"),
    (dict(scheduler="karras"), "scheduler: 'karras', but the inversion ran on the 'normal' schedule"),
    (dict(cfg=7.5), "cfg: 7.5, but the inversion was made for cfg 5"),
])
def test_an_editor_that_cannot_reconstruct_the_inversion_is_refused_by_input(change, message):
    edit = dict(model_id="SD15 (a)", latent_shape=(4, 16, 16), prompt="a red circle", steps=20, cfg=5.0,
                scheduler="normal")
    inversion().check_edit(**edit)  # the matching edit passes
    edit.update(change)
    with pytest.raises(AttnSegError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inversion().check_edit(**edit)


def test_what_an_inversion_of_50_sd15_steps_holds():
    held = inversion(steps=50, null_embeddings=torch.zeros(50, 77, 768), noise=torch.zeros(1, 4, 64, 64),
                     sigmas=torch.zeros(51))
    assert held.nbytes == 50 * 77 * 768 * 4 + 4 * 64 * 64 * 4 + 51 * 4  # 11.8 MB of embeddings
    assert "holds 11.3" in held.describe()
    assert inversion(method="DDIM", null_embeddings=None).nbytes < 20_000
