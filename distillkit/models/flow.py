"""Flow-matching denoisers (SD3-, Wan- and Flux-style transformers with ``FlowMatchEulerDiscreteScheduler``): the
noise path, the model's velocity, and Euler sampling on the scheduler's own sigma grid (for Flux, the grid
FluxPipeline asks for: ``linspace(1, 1/n, n)`` shifted by ``mu`` of the image's token count).

A flow-matching model predicts the velocity ``v = eps - x0`` of the straight path
``x_sigma = (1 - sigma) x0 + sigma eps`` (``sigma`` from 1, pure noise, to 0, the sample); the transformer is fed
the timestep ``sigma * num_train_timesteps``. ``FlowMatchEulerDiscreteScheduler.step`` is one Euler step
``x <- x + (sigma_next - sigma) v`` on the grid ``set_timesteps(n)`` makes (shift included); :func:`flow_sigmas`
asks the scheduler for that grid, so :func:`euler_sample` and a plain diffusers loop with the saved scheduler give
the same samples.

Deterministic multistep consistency sampling (re-noise the predicted ``x0`` with the model's own implied noise)
is the same Euler step: ``(1 - s') x0 + s' eps = x + (s' - s) v``; consistency students therefore sample with the
Euler scheduler too.
"""

from __future__ import annotations

from typing import Any

from distillkit.models.diffusion import denoise


def flow_sigmas(scheduler: Any, steps: int, *, flux: bool = False, mu: float | None = None) -> list[float]:
    """The ``steps + 1`` sigmas (the last 0) of a ``steps``-step run, exactly as ``scheduler.set_timesteps`` makes
    them (on a copy, so the caller's scheduler is not changed). ``flux``: as FluxPipeline asks for them, from the
    grid ``linspace(1, 1/steps, steps)`` with the resolution-dependent shift ``mu`` (:func:`flux_mu`)."""
    import numpy as np

    sch = type(scheduler).from_config(scheduler.config)
    if flux:
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        sch.set_timesteps(steps)
    return [float(s) for s in sch.sigmas]


def flux_mu(scheduler: Any, image_seq_len: int) -> float:
    """FluxPipeline's ``calculate_shift``: ``mu`` linear in the number of packed image tokens, from the scheduler's
    ``base_image_seq_len``/``max_image_seq_len`` and ``base_shift``/``max_shift`` (tested equal to diffusers' own;
    written here because importing the Flux pipeline module loads transformers' image processors)."""
    cfg = scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def per_sample(t: Any, x: Any) -> Any:
    """``t`` [B] viewed to broadcast over the samples ``x`` [B, ...] (images [B, C, H, W] or videos [B, C, F, H, W])."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def shift_sigma(scheduler: Any, u: Any) -> Any:
    """The scheduler's static shift ``shift * u / (1 + (shift - 1) u)`` of sigmas ``u`` in [0, 1] (a tensor)."""
    shift = float(getattr(scheduler.config, "shift", 1.0))
    return shift * u / (1 + (shift - 1) * u)


class FlowSchedule:
    """The straight noise path and its velocity arithmetic; sigmas are float tensors [B] (viewed to broadcast over
    the samples, [B, 1, 1, 1] for images and [B, 1, 1, 1, 1] for videos).

    A Flux teacher's schedule (``flux=True``) takes FluxPipeline's sigma grid with its shift ``mu`` (None without
    ``use_dynamic_shifting``), and ``guidance`` is the embedded guidance scale its transformer is fed (None for one
    without ``guidance_embeds``); :func:`flow_schedule` builds the schedule a loaded model samples with."""

    def __init__(self, scheduler: Any, *, flux: bool = False, mu: float | None = None, guidance: float | None = None):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.flux, self.mu, self.guidance = flux, mu, guidance

    def shift(self, u: Any) -> Any:
        """Sigmas ``u`` in [0, 1] (a tensor) shifted as the scheduler shifts its grid: the resolution-dependent
        ``time_shift(mu)`` of a dynamic-shifting scheduler, else the static shift."""
        if self.scheduler.config.get("use_dynamic_shifting", False) and self.mu is not None:
            return self.scheduler.time_shift(self.mu, 1.0, u)
        return shift_sigma(self.scheduler, u)

    @staticmethod
    def _v(sigma: Any, x: Any) -> Any:
        return per_sample(sigma.float(), x).to(x)

    def timestep(self, sigma: Any) -> Any:
        """What the transformer is fed: ``sigma * num_train_timesteps`` [B], as the pipelines do."""
        return sigma.float() * self.num_train_timesteps

    def add_noise(self, x0: Any, noise: Any, sigma: Any) -> Any:
        s = self._v(sigma, x0)
        return (1 - s) * x0 + s * noise

    def x0_eps(self, v: Any, x: Any, sigma: Any) -> tuple[Any, Any]:
        """(x0, eps) implied by the velocity ``v`` at ``x``, ``sigma``."""
        s = self._v(sigma, x)
        return x - s * v, x + (1 - s) * v

    def euler(self, x: Any, v: Any, sigma: Any, sigma_next: Any) -> Any:
        return x + (self._v(sigma_next, x) - self._v(sigma, x)) * v

    def sigmas(self, steps: int) -> list[float]:
        return flow_sigmas(self.scheduler, steps, flux=self.flux, mu=self.mu)


def flow_schedule(dm: Any, guidance: float | None = None, scheduler: Any = None) -> FlowSchedule:
    """The :class:`FlowSchedule` the loaded flow model ``dm`` samples with (``scheduler``: another one, e.g. a
    student's, on the same latents); ``guidance`` is used only by a guidance-distilled Flux transformer."""
    scheduler = scheduler if scheduler is not None else dm.scheduler
    if not dm.flux:
        return FlowSchedule(scheduler)
    _, h, w = dm.sample_shape
    embeds = bool(dm.model.config.guidance_embeds)
    return FlowSchedule(
        scheduler, flux=True, mu=flux_mu(scheduler, (h // 2) * (w // 2)), guidance=guidance if embeds else None
    )


def velocity(model: Any, schedule: FlowSchedule, x: Any, sigma: Any, labels: Any = None) -> Any:
    """The model's velocity [B, C, H, W] (video: [B, C, F, H, W]) at ``x`` and sigmas ``sigma`` [B]."""
    return denoise(model, x, schedule.timestep(sigma.to(x.device)), labels, guidance=schedule.guidance)


def euler_sample(
    model: Any, schedule: FlowSchedule, noise: Any, steps: int | list[float], labels: Any = None, start: int = 0
) -> Any:
    """Euler on the scheduler's ``steps``-step grid (or on the given sigmas) from ``noise`` [B, C, H, W]; returns
    x0. ``start`` skips the first grid steps (``noise`` is then the state at ``sigmas[start]``)."""
    import torch

    sigmas = schedule.sigmas(steps) if isinstance(steps, int) else list(steps)
    x = noise
    b = x.shape[0]
    for j in range(start, len(sigmas) - 1):
        s = torch.full((b,), sigmas[j], device=x.device)
        v = velocity(model, schedule, x, s, labels)
        x = schedule.euler(x, v, s, torch.full((b,), sigmas[j + 1], device=x.device))
    return x
