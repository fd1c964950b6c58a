"""Pure, batched tensor functions (CPU and CUDA). No I/O, no globals.

Conventions, written once (see each module's docstring for the recipe):

- Arrays are indexed ``[..., z, y, x]`` for volumes and ``[..., y, x]`` for images, as mrcfile
  gives them; the real-space centre (origin of rotation) is index ``d // 2`` on every axis, as in
  RELION (for d = 64 and d = 65 alike the centre is 32).
- Centred Fourier transforms (``core.fft``) put the zero frequency at index ``d // 2`` too.
- Frequencies are in cycles per Å when a pixel size is given (``pixel_size_a``), else cycles/pixel.
- Rotations are RELION ZYZ Euler angles in degrees (``core.rotations``).
- SNR = var(clean image) / var(added noise), per image (``core.noise``).
"""
