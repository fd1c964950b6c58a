"""Projection (Fourier central slice), back-projection (slice insertion) and image shifts.

Recipe (the RELION model, see ``core.rotations``): for a volume ``V[z, y, x]`` and rotation A,

1. zero-pad V to ``N = pad · d`` (centre ``d // 2`` → ``N // 2``), divide by the trilinear
   gridding kernel ``sinc²(x / N) sinc²(y / N) sinc²(z / N)`` and take ``fft3c``;
2. sample that transform at ``(N / d) · Aᵀ (kx, ky, 0)`` for the image frequencies ``k``
   (Fourier pixels of the d-grid, centred) by trilinear interpolation, zero beyond ``d // 2``;
3. ``ifft2c`` gives the projection ``I(x, y) = ∫ V(Aᵀ (x, y, z)) dz``.

Back-projection is the adjoint of step 2: each image's centred transform is scattered
trilinearly into a numerator ``B`` and its weights (CTF² when a CTF is given) into ``K``;
``reconstruct`` returns ``ifft3c(B / K)`` cropped to ``d``. Shifts follow RELION: an observed
particle shifted by its origin offset (``rlnOriginX/YAngst``) gives the reference projection, so
the simulator writes ``image = shift_images(projection, -origin)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cryoprior.core.fft import fft2c, fft3c, ifft2c


def _image_freqs(box: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred image frequencies (ky, kx) in Fourier pixels and the mask |k| <= box // 2."""
    f = torch.arange(box, device=device, dtype=dtype) - box // 2
    ky, kx = torch.meshgrid(f, f, indexing="ij")
    inside = (kx * kx + ky * ky) <= (box // 2) ** 2
    return ky, kx, inside


def slice_coordinates(rotations: torch.Tensor, box: int, pad: float = 2.0) -> torch.Tensor:
    """3D frequency coordinates ``(pad) · Aᵀ (kx, ky, 0)`` of each image pixel, as (x, y, z).

    rotations: ``(..., 3, 3)``. Returns ``(..., box, box, 3)`` in padded Fourier pixels (0 = DC).
    """
    ky, kx, _ = _image_freqs(box, rotations.device, rotations.dtype)
    # v_i = sum_j A[j, i] k_j with k = (kx, ky, 0): columns of A weighted by kx and ky
    a = rotations[..., None, None, :, :]  # (..., 1, 1, 3, 3)
    v = a[..., 0, :] * kx[..., None] + a[..., 1, :] * ky[..., None]  # (..., box, box, 3)
    return v * pad


def gridding_kernel(
    box: int, box_pad: int, ndim: int = 3, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Real-space attenuation of trilinear interpolation on an ``box_pad`` grid, cropped to ``box``.

    ``prod_i sinc²(x_i / box_pad)`` with x_i the offset from the centre. ``(box,) * ndim``.
    """
    r = (torch.arange(box, device=device, dtype=dtype) - box // 2) / box_pad
    s = torch.sinc(r) ** 2
    out = s
    for _ in range(ndim - 1):
        out = out[..., None] * s
    return out


def _pad_volume(volume: torch.Tensor, box_pad: int) -> torch.Tensor:
    d = volume.shape[-1]
    lo = box_pad // 2 - d // 2
    out = volume.new_zeros((*volume.shape[:-3], box_pad, box_pad, box_pad))
    out[..., lo : lo + d, lo : lo + d, lo : lo + d] = volume
    return out


def _crop_volume(volume: torch.Tensor, box: int) -> torch.Tensor:
    n = volume.shape[-1]
    lo = n // 2 - box // 2
    return volume[..., lo : lo + box, lo : lo + box, lo : lo + box]


def volume_fourier(volume: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Prepare a volume ``(d, d, d)`` for projection: gridding-corrected, padded, ``fft3c``.

    Returns the complex transform ``(pad·d, pad·d, pad·d)``; pass it to :func:`project_fourier`
    to project many batches without repeating the 3D FFT.
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"expected a cubic volume (d, d, d), got shape {tuple(volume.shape)}")
    d = volume.shape[-1]
    n = pad * d
    corrected = volume / gridding_kernel(d, n, 3, volume.device, volume.dtype)
    return fft3c(_pad_volume(corrected, n))


def _grid_sample_complex(vol_ft: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a complex ``(N, N, N)`` grid at coords ``(..., 3)`` (x, y, z, 0 = DC)."""
    n = vol_ft.shape[-1]
    batch_shape = coords.shape[:-1]
    grid = (coords + n // 2) * (2.0 / (n - 1)) - 1.0  # align_corners=True normalisation
    grid = grid.reshape(1, -1, 1, 1, 3).to(vol_ft.real.dtype)  # (1, M, 1, 1, 3)
    channels = torch.stack([vol_ft.real, vol_ft.imag])[None]  # (1, 2, N, N, N)
    out = F.grid_sample(channels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out[0, :, :, 0, 0]  # (2, M)
    return torch.complex(out[0], out[1]).reshape(batch_shape)


def project_fourier(vol_ft: torch.Tensor, rotations: torch.Tensor, box: int) -> torch.Tensor:
    """Central slices of a prepared transform (:func:`volume_fourier`) → centred 2D transforms.

    vol_ft: ``(N, N, N)`` complex; rotations: ``(..., 3, 3)``. Returns ``(..., box, box)`` complex,
    zero beyond radius ``box // 2``.
    """
    n = vol_ft.shape[-1]
    coords = slice_coordinates(rotations.to(vol_ft.real.dtype), box, n / box)
    sl = _grid_sample_complex(vol_ft, coords)
    _, _, inside = _image_freqs(box, vol_ft.device, vol_ft.real.dtype)
    return sl * inside


def project(volume: torch.Tensor, rotations: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Project a volume ``(d, d, d)`` at rotations ``(..., 3, 3)`` → images ``(..., d, d)``.

    ``I(x, y) = ∫ V(Aᵀ (x, y, z)) dz`` (RELION convention), computed by the Fourier slice theorem.
    """
    d = volume.shape[-1]
    vol_ft = volume_fourier(volume, pad)
    return ifft2c(project_fourier(vol_ft, rotations, d)).real


def shift_phase(
    shifts_px: torch.Tensor, size: int, box: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fourier phase that translates a ``box`` image by ``shifts_px`` ``(..., 2)`` = (dx, dy) pixels,
    on its central ``size × size`` frequencies (a Fourier crop when ``size < box``; default
    ``box = size``). Returns ``(..., size, size)``, complex of the real ``dtype``.

    Multiplying ``fft2c(image)`` by it moves content at (x, y) to (x + dx, y + dy).
    """
    box = size if box is None else box
    f = torch.arange(size, device=shifts_px.device, dtype=dtype) - size // 2
    dx = shifts_px[..., 0, None].to(dtype)
    dy = shifts_px[..., 1, None].to(dtype)
    # separable: exp(-2πi kx dx / box) · exp(-2πi ky dy / box), 2·size exponentials per image
    px = torch.exp(-2j * torch.pi * f * dx / box)  # (..., size) over kx
    py = torch.exp(-2j * torch.pi * f * dy / box)  # (..., size) over ky
    return py[..., :, None] * px[..., None, :]


def shift_images(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate images ``(..., d, d)`` by ``shifts_px`` ``(..., 2)`` = (dx, dy) pixels.

    Content at (x, y) moves to (x + dx, y + dy) (periodic, sub-pixel by Fourier phase).
    """
    phase = shift_phase(shifts_px, images.shape[-1], dtype=images.real.dtype)
    return ifft2c(fft2c(images) * phase).real


def _hermitian_half(box: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One of each Hermitian pair of the inserted image frequencies (``|k| <= box // 2``):
    ``kx > 0``, or ``kx = 0`` and ``ky > 0``; plus DC and, for even boxes, the Nyquist samples
    (``kx`` or ``ky = -box // 2``, whose mirror is not on the grid) at half weight. Returns ``(ky, kx, keep,
    scale)`` with ``scale`` 0.5 for the half-weight samples, 1 otherwise."""
    ky, kx, inside = _image_freqs(box, device, dtype)
    unpaired = (kx == 0) & (ky == 0)
    if box % 2 == 0:  # odd boxes hold both ±box // 2
        unpaired = unpaired | (kx == -(box // 2)) | (ky == -(box // 2))
    keep = inside & ((kx > 0) | ((kx == 0) & (ky > 0)) | unpaired)
    scale = torch.where(unpaired, 0.5, 1.0).to(dtype)
    return ky, kx, keep, scale


def mirror_grid(x: torch.Tensor) -> torch.Tensor:
    """``x(−k)`` on the centred ``(N, N, N)`` grid (zero frequency at ``N // 2``). N odd: a flip;
    N even: index ``i`` ↦ ``N − i``, and index 0, the unpaired ``−N/2``, maps to itself."""
    flipped = torch.flip(x, (-3, -2, -1))
    return flipped if x.shape[-1] % 2 else torch.roll(flipped, (1, 1, 1), (-3, -2, -1))


def complete_hermitian(data: torch.Tensor, weight: torch.Tensor) -> None:
    """After insertions with ``half=True``: add each voxel's Hermitian mirror, in place
    (``B += conj(B(−k))``, ``K += K(−k)``), which gives the full insertion of every image."""
    data += mirror_grid(data).conj()
    weight += mirror_grid(weight)


def insert_slices(
    slices: torch.Tensor,
    rotations: torch.Tensor,
    weights: torch.Tensor | None = None,
    pad: int = 2,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    half: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter centred 2D transforms into a padded 3D Fourier grid (adjoint of slicing).

    slices: ``(b, d, d)`` complex (already multiplied by the CTF for a Wiener-type
    reconstruction); rotations: ``(b, 3, 3)``; weights: ``(b, d, d)`` real (CTF², default 1).
    Accumulates into ``out = (B, K)`` when given (in place), else into new grids.
    ``half``: for Hermitian slices (transforms of real images times real, symmetric CTFs and
    weights), insert only one of each pair ``±k`` (as RELION inserts the half-complex image);
    call :func:`complete_hermitian` once after the last insertion. Half the work; the completed
    grids equal the full insertion's Hermitian part (they differ only where the unpaired Nyquist
    samples land, at ``|k| >= N/2 − √3``).
    Returns ``(B (N, N, N) complex, K (N, N, N) real)`` with ``N = pad · d``.
    """
    if slices.ndim != 3 or rotations.shape != (slices.shape[0], 3, 3):
        raise ValueError(
            f"expected slices (b, d, d) and rotations (b, 3, 3), got {tuple(slices.shape)} and "
            f"{tuple(rotations.shape)}"
        )
    b, d, _ = slices.shape
    n = pad * d
    rdtype = slices.real.dtype
    if out is None:
        data = torch.zeros(n * n * n, dtype=slices.dtype, device=slices.device)
        weight = torch.zeros(n * n * n, dtype=rdtype, device=slices.device)
    else:
        data, weight = out[0].view(-1), out[1].view(-1)
    if half:
        ky, kx, keep, scale = _hermitian_half(d, slices.device, rdtype)
        scale = scale[keep]
    else:
        ky, kx, keep = _image_freqs(d, slices.device, rdtype)
        scale = None
    vals = slices[:, keep]  # (b, m)
    wts = weights[:, keep].to(rdtype) if weights is not None else torch.ones(vals.shape, dtype=rdtype, device=vals.device)
    if scale is not None:
        vals, wts = vals * scale, wts * scale
    # 3D coordinates pad · Aᵀ (kx, ky, 0) (see slice_coordinates) of the kept pixels, as (x, y, z)
    k2 = torch.stack((kx[keep], ky[keep]), dim=-1) * pad  # (m, 2)
    coords = torch.matmul(k2, rotations.to(rdtype)[:, :2, :]) + n // 2  # (b, m, 3)
    base = coords.floor()
    frac = coords - base
    itype = torch.int32 if n**3 < 2**31 else torch.int64
    base = base.to(itype)
    hi = base + 1
    w_hi = frac * (hi < n)  # an upper corner off the grid gets weight 0 (its clamped index is harmless)
    hi = hi.clamp(max=n - 1)
    # the 8 trilinear corners, separably: flat index z·n² + y·n + x and weight w_z·w_y·w_x
    idx = torch.stack((base, hi), dim=-2) * torch.tensor([1, n, n * n], dtype=itype, device=base.device)  # (b, m, 2, 3)
    wl = torch.stack((1 - frac, w_hi), dim=-2)
    flat = ((idx[..., :, None, 2] + idx[..., None, :, 1])[..., None] + idx[..., None, None, :, 0]).reshape(-1)
    w = ((wl[..., :, None, 2] * wl[..., None, :, 1])[..., None] * wl[..., None, None, :, 0]).reshape(*vals.shape, 8)
    wv = (wts[..., None] * w).reshape(-1)
    size = n * n * n
    if flat.numel() >= size // 4 and flat.device.type == "cpu":
        # dense enough: one pass of bincount (float64 sums) beats index_add_'s scattered writes
        weight += torch.bincount(flat, weights=wv, minlength=size).to(weight.dtype)
        for part, values in ((data.real, vals.real), (data.imag, vals.imag)):
            part.add_(torch.bincount(flat, weights=(values[..., None] * w).reshape(-1), minlength=size).to(part.dtype))
    else:
        flat = flat.long()
        data.index_add_(0, flat, (vals[..., None] * w).reshape(-1).to(data.dtype))
        weight.index_add_(0, flat, wv)
    return data.view(n, n, n), weight.view(n, n, n)


def fourier_to_volume(vol_ft: torch.Tensor, box: int, gridding_correct: bool = True) -> torch.Tensor:
    """Padded centred 3D transform ``(N, N, N)`` → real-space volume cropped to ``(box,)*3``.

    With ``gridding_correct`` the trilinear insertion kernel's real-space attenuation
    (:func:`gridding_kernel`) is divided out, as RELION's ``griddingCorrect`` does.
    """
    n = vol_ft.shape[-1]
    lo = n // 2 - box // 2
    vol = vol_ft
    for dim in (-3, -2, -1):  # = _crop_volume(ifft3c(vol_ft)): one axis at a time, cropped as soon as done
        vol = torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(vol, dim=dim), dim=dim), dim=dim)
        vol = vol.narrow(dim, lo, box)
    vol = vol.real
    if gridding_correct:
        vol = vol / gridding_kernel(box, n, 3, vol.device, vol.dtype)
    return vol


def reconstruct(
    images: torch.Tensor,
    rotations: torch.Tensor,
    ctf: torch.Tensor | None = None,
    shifts_px: torch.Tensor | None = None,
    pad: int = 2,
    wiener_constant: float = 1e-3,
    batch_size: int = 512,
) -> torch.Tensor:
    """Direct Fourier reconstruction from images at known poses.

    images ``(b, d, d)``, rotations ``(b, 3, 3)``, ctf ``(b, d, d)`` (centred layout, see
    ``core.ctf``) or None, shifts_px ``(b, 2)``: the particle origin offsets (RELION
    ``rlnOriginX/Y`` in pixels), undone before insertion. The volume is
    ``ifft3c(Σ CTF·Î / (Σ CTF² + c))`` with ``c = wiener_constant · mean(K > 0)``.
    Returns ``(d, d, d)``.
    """
    b, d, _ = images.shape
    n = pad * d
    rdtype = images.dtype
    cdtype = torch.complex64 if rdtype == torch.float32 else torch.complex128
    acc = (
        torch.zeros(n, n, n, dtype=cdtype, device=images.device),
        torch.zeros(n, n, n, dtype=rdtype, device=images.device),
    )
    for start in range(0, b, batch_size):
        sl = slice(start, start + batch_size)
        img = images[sl]
        if shifts_px is not None:
            img = shift_images(img, shifts_px[sl])
        f = fft2c(img)
        w = None
        if ctf is not None:
            f = f * ctf[sl]
            w = ctf[sl] ** 2
        insert_slices(f, rotations[sl].to(rdtype), w, pad, out=acc)
    data, weight = acc
    c = wiener_constant * weight[weight > 0].mean() if (weight > 0).any() else 1.0
    return fourier_to_volume(data / (weight + c), d)
