"""The per-particle pose table of the auto-decoding stage, with per-row Adam.

Each particle has a rotation (RELION A, stored as a (N, 3, 3) matrix buffer) and
an in-plane translation (N, 2) in working-box pixels (the content shift: RELION
origin_A = -t * apix_work). A step optimises, for the rows of one batch only, an
axis-angle perturbation ``delta`` (B, 3) (zero at each step) and a shift
increment, then folds the perturbation into the stored matrix and resets it:

    A_new = so3_exp(delta) @ A        (left multiplication: delta is in the *image* frame)

Why the image frame: the components of delta then have a fixed meaning for every
particle (delta_z = in-plane rotation, delta_x/y = tilts of the viewing
direction), which have very different curvatures of the loss; Adam's per-axis
second-moment scaling adapts to exactly that anisotropy. With right
multiplication (volume frame) the three axes mix differently for each particle.

Adam state (first/second moments and the step count) is kept per row and only the
rows of the batch are read and written, so rows that are not in the batch never
move (plain Adam on an (N, 3) parameter would keep moving them through momentum).
Bias correction uses each row's own step count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_relion.geometry.rotations import so3_exp


def orthonormalise(R: Tensor) -> Tensor:
    """Nearest-by-Gram-Schmidt rotation from the first two rows (removes float drift)."""
    b1 = torch.nn.functional.normalize(R[..., 0, :], dim=-1)
    a2 = R[..., 1, :]
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack([b1, b2, torch.cross(b1, b2, dim=-1)], -2)


class PoseTable:
    """Rotations (N, 3, 3), shifts (N, 2) and per-row Adam state (no nn.Module: plain tensors)."""

    def __init__(self, n: int, device=None, lr_rot: float = 0.05, lr_shift: float = 0.05,
                 betas=(0.9, 0.9), eps: float = 1e-8, max_shift: float | None = None):
        self.rotations = torch.eye(3, device=device).repeat(n, 1, 1)
        self.shifts = torch.zeros(n, 2, device=device)
        self.m = torch.zeros(n, 5, device=device)
        self.v = torch.zeros(n, 5, device=device)
        self.steps = torch.zeros(n, dtype=torch.int64, device=device)
        self.lr_rot, self.lr_shift = float(lr_rot), float(lr_shift)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.max_shift = max_shift

    def __len__(self) -> int:
        return self.rotations.shape[0]

    def set(self, rotations: Tensor, shifts: Tensor) -> None:
        """Initialise all rows (e.g. from the winning heads) and clear the Adam state."""
        self.rotations = orthonormalise(rotations.to(self.rotations))
        self.shifts = shifts.to(self.shifts).clone()
        self.m.zero_()
        self.v.zero_()
        self.steps.zero_()

    def perturbation(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Zero leaf tensors (delta (B, 3), dshift (B, 2)) to differentiate through."""
        B = idx.shape[0]
        delta = torch.zeros(B, 3, device=self.rotations.device, requires_grad=True)
        dshift = torch.zeros(B, 2, device=self.rotations.device, requires_grad=True)
        return delta, dshift

    def poses(self, idx: Tensor, delta: Tensor | None = None, dshift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rotations so3_exp(delta) @ A[idx] and shifts t[idx] + dshift."""
        R = self.rotations[idx]
        t = self.shifts[idx]
        if delta is not None:
            R = so3_exp(delta) @ R
        if dshift is not None:
            t = t + dshift
        return R, t

    @torch.no_grad()
    def step(self, idx: Tensor, grad_delta: Tensor, grad_shift: Tensor) -> None:
        """One Adam step on rows ``idx`` (unique) given the gradients of the perturbation."""
        b1, b2 = self.betas
        g = torch.cat([grad_delta, grad_shift], 1).to(self.m)
        m = self.m[idx].mul_(b1).add_(g, alpha=1 - b1)
        v = self.v[idx].mul_(b2).addcmul_(g, g, value=1 - b2)
        k = self.steps[idx] + 1
        self.m[idx] = m
        self.v[idx] = v
        self.steps[idx] = k
        kf = k.to(m.dtype)[:, None]
        mhat = m / (1 - b1**kf)
        vhat = v / (1 - b2**kf)
        upd = mhat / (vhat.sqrt() + self.eps)
        delta = -self.lr_rot * upd[:, :3]
        self.rotations[idx] = orthonormalise(so3_exp(delta) @ self.rotations[idx])
        t = self.shifts[idx] - self.lr_shift * upd[:, 3:]
        if self.max_shift is not None:
            t = t.clamp(-self.max_shift, self.max_shift)
        self.shifts[idx] = t

    def state_dict(self) -> dict:
        return {"rotations": self.rotations.cpu(), "shifts": self.shifts.cpu(), "m": self.m.cpu(), "v": self.v.cpu(),
                "steps": self.steps.cpu(), "lr_rot": self.lr_rot, "lr_shift": self.lr_shift,
                "betas": list(self.betas), "eps": self.eps, "max_shift": self.max_shift}

    def load_state_dict(self, d: dict) -> None:
        dev = self.rotations.device
        for k in ("rotations", "shifts", "m", "v", "steps"):
            setattr(self, k, d[k].to(dev))
        self.lr_rot, self.lr_shift = d["lr_rot"], d["lr_shift"]
        self.betas = tuple(d["betas"])
        self.eps, self.max_shift = d["eps"], d["max_shift"]
