"""3D reconstruction: accumulate (B, K), mstep (τ², MAP, RED, CW-RED), refine (E-step)."""
