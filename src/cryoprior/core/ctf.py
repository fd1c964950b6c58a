"""Contrast transfer function, RELION conventions (``CTF::getCTF``), and its application.

Defocus follows CTFFIND4: positive values are underfocus, ``defocus_u_a`` is the defocus along
the direction at ``defocus_angle_deg`` from the x axis (the last array axis) towards y (axis -2),
``defocus_v_a`` the perpendicular one. Recipe, with ``u`` the spatial frequency in 1/Å::

    defocus_avg = -(dU + dV) / 2;  defocus_dev = -(dU - dV) / 2
    df    = defocus_avg + defocus_dev * cos(2 (atan2(ky, kx) - azimuth))
    chi   = pi lambda df u^2 + (pi / 2) Cs lambda^3 u^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    CTF   = -sin(chi) * exp(-B u^2 / 4)

so ``CTF(0) = sin(atan(Q0 / sqrt(1 - Q0^2))) = Q0`` without a phase shift. The CTF lives on the
centred full Fourier grid of :mod:`cryoprior.core.fft` (zero frequency at index ``box // 2``).
"""

from __future__ import annotations

import math

import torch

from cryoprior.core.fft import fft2c, freq_grid_2d, ifft2c

Param = float | torch.Tensor


def electron_wavelength_a(voltage_kv: Param) -> Param:
    """Relativistic electron wavelength in Å: ``12.2643247 / sqrt(V (1 + 0.978466e-6 V))``, V in volts.

    300 kV → 0.019687 Å. A float in gives a float out; a tensor ``(...,)`` gives a tensor.
    """
    if isinstance(voltage_kv, torch.Tensor):
        v = voltage_kv * 1e3
        return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))
    if voltage_kv <= 0:
        raise ValueError(f"voltage_kv must be positive, got {voltage_kv}")
    v = float(voltage_kv) * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def _as_params(params: dict[str, Param], device, dtype) -> tuple[dict[str, torch.Tensor], tuple]:
    """Turn scalars/tensors into tensors on one device/dtype and broadcast them to a batch shape."""
    tensors = [p for p in params.values() if isinstance(p, torch.Tensor)]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    if dtype is None:
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        dtype = torch.float64 if torch.float64 in floats else torch.float32
    out = {k: torch.as_tensor(v, device=device, dtype=dtype) for k, v in params.items()}
    try:
        # broadcast_tensors, not broadcast_shapes: the latter imports torch._refs (sympy), ~1 s
        batch = torch.broadcast_tensors(*out.values())[0].shape
    except RuntimeError as err:
        shapes = {k: tuple(t.shape) for k, t in out.items()}
        raise ValueError(f"CTF parameters do not broadcast: {shapes}") from err
    return out, tuple(batch)


def ctf_2d(
    box: int,
    pixel_size_a: float,
    defocus_u_a: Param,
    defocus_v_a: Param,
    defocus_angle_deg: Param,
    voltage_kv: Param = 300.0,
    cs_mm: Param = 2.7,
    amplitude_contrast: Param = 0.1,
    phase_shift_deg: Param = 0.0,
    b_factor: Param = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RELION's CTF on the centred full ``(box, box)`` Fourier grid.

    Every physical parameter is a float or a tensor of shape ``(...,)`` (one value per particle);
    they broadcast together to the batch shape ``B``. Returns ``(*B, box, box)`` real, on
    ``device`` (default: that of the tensor parameters, else CPU) in ``dtype`` (default float32,
    float64 if any parameter is float64). ``b_factor`` in Å² (positive damps high frequencies).
    """
    if box < 1:
        raise ValueError(f"box must be positive, got {box}")
    if pixel_size_a <= 0:
        raise ValueError(f"pixel_size_a must be positive, got {pixel_size_a}")
    p, batch = _as_params(
        {
            "defocus_u_a": defocus_u_a,
            "defocus_v_a": defocus_v_a,
            "defocus_angle_deg": defocus_angle_deg,
            "voltage_kv": voltage_kv,
            "cs_mm": cs_mm,
            "amplitude_contrast": amplitude_contrast,
            "phase_shift_deg": phase_shift_deg,
            "b_factor": b_factor,
        },
        device,
        dtype,
    )
    q0 = p["amplitude_contrast"]
    if bool(((q0 < 0) | (q0 >= 1)).any()):
        raise ValueError("amplitude_contrast must lie in [0, 1)")
    # per-particle constants, (*B, 1, 1) so they broadcast over the grid
    p = {k: v.expand(batch)[..., None, None] for k, v in p.items()}
    lam = electron_wavelength_a(p["voltage_kv"])
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * (p["cs_mm"] * 1e7) * lam**3
    k3 = torch.atan(p["amplitude_contrast"] / torch.sqrt(1.0 - p["amplitude_contrast"] ** 2))
    k5 = torch.deg2rad(p["phase_shift_deg"])
    defocus_avg = -(p["defocus_u_a"] + p["defocus_v_a"]) * 0.5
    defocus_dev = -(p["defocus_u_a"] - p["defocus_v_a"]) * 0.5
    azimuth = torch.deg2rad(p["defocus_angle_deg"])

    ky, kx = freq_grid_2d(box, pixel_size_a, device=q0.device, dtype=q0.dtype)  # (box, box) 1/Å
    u2 = kx * kx + ky * ky
    angle = torch.atan2(ky, kx)
    deltaf = defocus_avg + defocus_dev * torch.cos(2.0 * (angle - azimuth))  # (*B, box, box)
    chi = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    ctf = -torch.sin(chi)
    return ctf * torch.exp(-p["b_factor"] * u2 / 4.0)


def _check_image_ctf(images: torch.Tensor, ctf: torch.Tensor) -> None:
    if images.dim() < 2 or ctf.dim() < 2 or images.shape[-2:] != ctf.shape[-2:]:
        raise ValueError(
            f"images and ctf must share the last two dims: images.shape = {tuple(images.shape)} "
            f"vs ctf.shape = {tuple(ctf.shape)}"
        )
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square, got shape {tuple(images.shape)}")


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply ``images`` ``(..., d, d)`` by ``ctf`` ``(..., d, d)`` in Fourier space; real out.

    Leading dims broadcast; the CTF is on the centred full grid (:func:`ctf_2d`).
    """
    _check_image_ctf(images, ctf)
    return ifft2c(fft2c(images) * ctf).real


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply by ``sign(ctf)`` in Fourier space (phase flipping). ``(..., d, d)`` → same."""
    _check_image_ctf(images, ctf)
    return ifft2c(fft2c(images) * torch.sign(ctf)).real


def wiener_ctf_correct(images: torch.Tensor, ctf: torch.Tensor, snr: Param) -> torch.Tensor:
    """Wiener CTF correction ``F · ctf / (ctf² + 1 / snr)``. ``(..., d, d)`` → same.

    ``snr`` is a float or a tensor ``(...,)`` (one value per image), the spectral SNR assumed flat.
    """
    _check_image_ctf(images, ctf)
    snr_t = torch.as_tensor(snr, device=images.device, dtype=ctf.dtype)
    if bool((snr_t <= 0).any()):
        raise ValueError("snr must be positive")
    snr_t = snr_t[..., None, None] if snr_t.dim() > 0 else snr_t
    return ifft2c(fft2c(images) * ctf / (ctf * ctf + 1.0 / snr_t)).real
