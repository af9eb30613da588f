"""LPIPS perceptual distance from local weights only (never downloaded, never silently random).

LPIPS (Zhang et al. 2018) compares deep features of a pretrained ImageNet network (VGG16 or AlexNet)
through small learned linear heads. The ``lpips`` package (BSD-2) ships the linear heads inside its wheel
but takes the backbone from torchvision, which would download it: here the package builds the backbone
*randomly* (``pnet_rand=True``, no download) and cytosyn then loads the backbone's weights from a local
file — a torchvision ``vgg16``/``alexnet`` state dict (``features.<i>.*`` keys; ``classifier.*`` ignored)
or a whole LPIPS state dict (``net.slice<k>.<i>.*`` + ``lin<k>.model.1.weight``). Every backbone tensor
must be found, or loading is refused: random features would make LPIPS a meaningless loss.

:class:`LPIPSLoss` records which weights it used (:attr:`LPIPSLoss.record`: net, the sha256 of the
backbone weights and of the linear heads) so a run can say what its perceptual loss was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cytosyn.compat import import_torchvision
from cytosyn.fileio import sha256_file

LPIPSNet = Literal["vgg", "alex"]


class LPIPSWeightsError(RuntimeError):
    """LPIPS weights missing or not matching the backbone; the message says how to fix it."""


def _read_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"LPIPS weights {path}: expected a state dict, got {type(state).__name__}")
    return state


class LPIPSLoss(nn.Module):
    """``forward(a, b)`` → per-sample LPIPS distance ``(B,)`` of images in [−1, 1], computed in fp32.

    Frozen (no parameter requires grad; eval mode), but differentiable with respect to its inputs.
    """

    def __init__(self, weights: str | Path, net: LPIPSNet = "vgg"):
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise LPIPSWeightsError(
                f"LPIPS weights {path} do not exist: pass a local torchvision {net} state dict (ImageNet "
                f"weights, e.g. {'vgg16-397923af.pth' if net == 'vgg' else 'alexnet-owt-7be5be79.pth'}) or a "
                f"full LPIPS state dict; or set lpips: off explicitly (recorded) to train without it"
            )
        import_torchvision()
        import warnings

        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self._load_backbone(model, _read_state(path), path)
        self.model = model.eval().requires_grad_(False)
        heads = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
        self.record: dict[str, Any] = {
            "net": net,
            "backbone_weights": str(path),
            "backbone_sha256": sha256_file(path),
            "heads": f"lpips {getattr(lpips, '__version__', '0.1')} v0.1 {net} linear heads",
            "heads_sha256": hashlib.sha256(
                b"".join(heads[k].float().numpy().tobytes() for k in sorted(heads))
            ).hexdigest(),
        }

    @staticmethod
    def _load_backbone(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
        own = model.state_dict()
        backbone = [k for k in own if k.startswith("net.")]
        found: dict[str, Tensor] = {}
        if any(k.startswith("net.slice") for k in state):  # a full LPIPS state dict
            found = {k: v for k, v in state.items() if k in own}
        else:  # torchvision: features.<i>.<param> → net.slice<k>.<i>.<param>
            by_index = {k.split(".", 2)[2]: k for k in backbone}  # "<i>.<param>" → own key
            for key, value in state.items():
                if key.startswith("features.") and key[len("features.") :] in by_index:
                    found[by_index[key[len("features.") :]]] = value
        missing = [k for k in backbone if k not in found]
        wrong = [k for k, v in found.items() if tuple(v.shape) != tuple(own[k].shape)]
        if missing or wrong:
            raise LPIPSWeightsError(
                f"LPIPS weights {path} do not fit the backbone: missing {missing[:4]}{'…' if len(missing) > 4 else ''}"
                f", wrong shape {wrong[:4]}; expected a torchvision state dict of the same network"
            )
        model.load_state_dict(found, strict=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        with torch.autocast(device_type=a.device.type, enabled=False):
            return self.model(a.float(), b.float()).reshape(a.shape[0])
