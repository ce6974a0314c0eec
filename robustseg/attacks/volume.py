"""Attacks on whole volumes: the papers' independent tiles, or white-box through sliding-window inference.

``mode="tiles"`` is the papers' protocol (Hanif et al.; Malik et al.): ROI tiles at stride ROI, attacked in
mini-batches and stitched back. But scoring runs MONAI ``sliding_window_inference`` with overlapping, blended
windows, so a tile attack optimises something other than what is scored. ``mode="pipeline"`` attacks a model
that *is* that sliding-window inference (:class:`SlidingWindowModel`): every attack works unchanged, and
white-box means white-box. ``memory_bounded=True`` gives the same gradient with the memory of one window batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from robustseg.attacks.base import Attack, check_unit_range, eval_mode, output_classes
from robustseg.attacks.targets import check_target

MODES = ("pipeline", "tiles")
SIGMA_SCALE = 0.125  # MONAI's default Gaussian blending width; scoring must use the same


def _roi(roi_size: Sequence[int] | int) -> tuple[int, int, int]:
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be a positive int or three of them, got {roi_size!r}")
    return roi  # type: ignore[return-value]


def _scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's ``_get_scan_interval`` (private there): stride ``int(roi * (1 - overlap))``, at least 1."""
    return tuple(r if r == n else max(int(r * (1 - overlap)), 1) for n, r in zip(image_size, roi))


def _pad_to_roi(x: Tensor, roi: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Zero-pad ``(B, C, D, H, W)`` symmetrically up to ``roi`` where smaller, as ``sliding_window_inference``."""
    pad: list[int] = []
    for k in range(4, 1, -1):  # F.pad order: W, H, D
        diff = max(roi[k - 2] - x.shape[k], 0)
        pad.extend([diff // 2, diff - diff // 2])
    return (F.pad(x, pad) if any(pad) else x), pad


def _unpad(x: Tensor, pad: list[int], size: Sequence[int]) -> Tensor:
    """Crop the padding of :func:`_pad_to_roi` back off: ``(B, C, D', H', W')`` -> ``(B, C, *size)``."""
    starts = [pad[4], pad[2], pad[0]]  # D, H, W
    return x[(slice(None), slice(None), *(slice(s, s + n) for s, n in zip(starts, size)))]


class _MemoryBoundedWindows(torch.autograd.Function):
    """Blended sliding-window logits whose backward re-runs one window batch at a time (see SlidingWindowModel)."""

    @staticmethod
    def forward(ctx, x: Tensor, window_model: SlidingWindowModel) -> Tensor:  # type: ignore[override]
        ctx.window_model = window_model
        ctx.save_for_backward(x)
        with torch.no_grad():
            return window_model.infer(x)

    @staticmethod
    def backward(ctx, grad_logits: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return ctx.window_model.window_vjp(x, grad_logits), None


class SlidingWindowModel(nn.Module):
    """``model`` evaluated by MONAI ``sliding_window_inference``, as an ``nn.Module`` an attack can differentiate.

    With ``memory_bounded=True`` the forward runs without a graph, and the backward takes the gradient of the
    loss with respect to the whole blended logit volume ``g`` and re-runs each window batch with a graph,
    back-propagating its share ``g[window] * w / sum_w'(w')`` - the blending weights ``w`` (MONAI's importance
    map) divided by their sum over the overlapping windows, exactly as the blending weighted each window. The
    gradient is the same as differentiating through ``sliding_window_inference``; the memory is one window batch.

    Built per call by :func:`attack_volume`; it takes the wrapped model's train/eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        roi_size: Sequence[int] | int,
        *,
        overlap: float = 0.5,
        sw_batch_size: int = 2,
        blend_mode: str = "gaussian",
        memory_bounded: bool = False,
        roi_weight_map: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.roi = _roi(roi_size)
        self.overlap, self.sw_batch_size, self.blend_mode = overlap, sw_batch_size, blend_mode
        self.roi_weight_map = roi_weight_map  # (rd, rh, rw) blending weights replacing MONAI's map, e.g. nnU-Net's
        self.memory_bounded = memory_bounded
        self.train(model.training)  # so that restoring this wrapper's mode restores the model's

    def infer(self, x: Tensor) -> Tensor:
        """Blended logits ``(B, K, D, H, W)`` of ``x`` ``(B, C, D, H, W)``: MONAI's own sliding window."""
        return sliding_window_inference(
            x,
            self.roi,
            self.sw_batch_size,
            self.model,
            overlap=self.overlap,
            mode=self.blend_mode,
            sigma_scale=SIGMA_SCALE,
            roi_weight_map=self.roi_weight_map,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_bounded:
            return _MemoryBoundedWindows.apply(x, self)
        return self.infer(x)

    def windows(self, image_size: Sequence[int], like: Tensor) -> tuple[list[tuple[slice, ...]], Tensor, Tensor]:
        """MONAI's window slices, importance map ``(1, 1, *roi)`` and summed weights ``(1, 1, *image_size)``,
        computed as ``sliding_window_inference`` computes them (same calls, device, dtype and order)."""
        slices = dense_patch_slices(image_size, self.roi, _scan_interval(image_size, self.roi, self.overlap))
        valid = get_valid_patch_size(image_size, self.roi)
        if self.roi_weight_map is not None and tuple(valid) == tuple(self.roi):  # as MONAI: the given map
            importance = self.roi_weight_map.to(device=like.device, dtype=like.dtype).reshape(1, 1, *self.roi)
        else:
            importance = compute_importance_map(
                valid, mode=self.blend_mode, sigma_scale=SIGMA_SCALE, device=like.device, dtype=like.dtype
            )[None, None]  # (1, 1, rd, rh, rw)
        count = torch.zeros(1, 1, *image_size, dtype=like.dtype, device=like.device)
        for window in slices:  # same accumulation order as MONAI, so the same float sums
            count[(slice(None), slice(None), *window)] += importance
        return slices, importance, count

    def window_vjp(self, x: Tensor, grad_logits: Tensor) -> Tensor:
        """``d<grad_logits, infer(x)>/dx`` ``(B, C, D, H, W)``, one graph of ``sw_batch_size`` windows at a time."""
        size = x.shape[2:]
        padded, pad = _pad_to_roi(x, self.roi)  # (B, C, D', H', W')
        grad_padded = F.pad(grad_logits, pad) if any(pad) else grad_logits  # (B, K, D', H', W')
        slices, importance, count = self.windows(padded.shape[2:], padded)
        grad_x = torch.zeros_like(padded)
        # MONAI's window order: all windows of image 0, then of image 1, ...
        order = [(b, w) for b in range(x.shape[0]) for w in slices]
        with torch.enable_grad():
            for first in range(0, len(order), self.sw_batch_size):
                batch = order[first : first + self.sw_batch_size]
                index = [(slice(b, b + 1), slice(None), *w) for b, w in batch]
                windows = torch.cat([padded[i] for i in index]).detach().requires_grad_(True)  # (n, C, *roi)
                logits = self.model(windows)  # (n, K, *roi)
                # upstream gradient over the summed blending weights, times this window's weights: (n, K, *roi)
                upstream = torch.cat([grad_padded[i] / count[(slice(None), slice(None), *i[2:])] for i in index])
                upstream = upstream * importance
                (grad_windows,) = torch.autograd.grad(logits, windows, upstream)
                for i, g in zip(index, grad_windows):
                    grad_x[i] += g[None]
        return _unpad(grad_x, pad, size)


def tile_starts(n: int, r: int) -> list[tuple[int, int, int]]:
    """``(start, keep_from, stop)`` of ROI tiles along an axis of length ``n >= r`` at stride ``r``.

    When ``r`` does not divide ``n`` the last tile is shifted back to end at ``n`` and keeps only the voxels the
    previous tile did not cover: every voxel is written by exactly one tile, every tile holds real data.
    """
    starts = list(range(0, n - r + 1, r))
    if starts[-1] + r < n:
        starts.append(n - r)
    return [(s, max(s, prev + r), s + r) for s, prev in zip(starts, [-r, *starts[:-1]])]


def _tiles(size: Sequence[int], roi: Sequence[int]) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(tile slices, kept region inside the tile) over the volume, in C order."""
    axes = [tile_starts(n, r) for n, r in zip(size, roi)]
    for picks in itertools.product(*axes):
        tile = tuple(slice(s, stop) for s, _, stop in picks)
        keep = tuple(slice(k - s, stop - s) for s, k, stop in picks)
        yield tile, keep


def project_l2(image: Tensor, adversarial: Tensor, eps: float) -> Tensor:
    """Project ``adversarial - image`` of one volume ``(1, C, D, H, W)`` onto the L2 ball of radius ``eps``.

    Shrinking towards ``image`` keeps a ``[0, 1]`` result in ``[0, 1]`` (the segment between two points of a box).
    """
    delta = adversarial - image
    norm = float(delta.norm())
    return image + delta * (eps / norm) if norm > eps else adversarial


def attack_tiles(
    attack: Attack,
    model: nn.Module,
    image: Tensor,
    label: Tensor,
    roi: tuple[int, int, int],
    sw_batch_size: int,
    target: Tensor | None,
) -> Tensor:
    """The papers' protocol: attack ROI tiles independently, ``sw_batch_size`` at a time, and stitch them.

    Budgets stay whole-volume budgets: L-inf is per voxel; an L2 attack runs each tile at the full radius and the
    stitched perturbation is projected onto the volume's L2 ball (for a linear loss this equals splitting the
    radius evenly between the tiles, and it also spends the budget the discarded tile overlaps would waste).
    A targeted attack gets ``target``, derived once from the whole volume.
    """
    size = image.shape[2:]
    grown = [max(n, r) for n, r in zip(size, roi)]  # a volume smaller than the ROI is zero-padded to it
    pad = [0, grown[2] - size[2], 0, grown[1] - size[1], 0, grown[0] - size[0]]
    image_p, label_p = F.pad(image, pad), F.pad(label, pad)
    target_p = F.pad(target, pad) if target is not None else None
    out = image_p.clone()
    tiles = list(_tiles(grown, roi))
    for first in range(0, len(tiles), sw_batch_size):
        batch = tiles[first : first + sw_batch_size]
        pick = [(slice(None), slice(None), *tile) for tile, _ in batch]
        xs = torch.cat([image_p[p] for p in pick])  # (n, C, *roi)
        ys = torch.cat([label_p[p] for p in pick])  # (n, 1, *roi)
        kwargs = {"target": torch.cat([target_p[p] for p in pick])} if target_p is not None else {}
        adversarial = attack(model, xs, ys, **kwargs)  # (n, C, *roi)
        for j, (tile, keep) in enumerate(batch):
            region = tuple(slice(t.start + k.start, t.start + k.stop) for t, k in zip(tile, keep))
            out[(slice(None), slice(None), *region)] = adversarial[(slice(j, j + 1), slice(None), *keep)]
    out = out[:, :, : size[0], : size[1], : size[2]]  # (1, C, D, H, W)
    if attack.threat_model == "l2":
        out = project_l2(image, out, attack.eps)  # type: ignore[attr-defined]
    return out


def volume_target(
    attack: Attack, model: nn.Module, image: Tensor, label: Tensor, roi: tuple[int, int, int], num_classes: int | None
) -> Tensor | None:
    """The target map ``(1, 1, D, H, W)`` of a targeted attack, derived once from the whole volume.

    ``num_classes`` defaults to the channels of the model's logits on one ROI tile (one gradient-free forward).
    """
    if not getattr(attack, "targeted", False):
        return None
    if num_classes is None:
        tile, _ = _pad_to_roi(image[:, :, : roi[0], : roi[1], : roi[2]], roi)  # (1, C, *roi)
        with eval_mode(model):
            num_classes = output_classes(model, tile)
    return attack.goal(model, image, label.long(), num_classes=num_classes)


def attack_volume(
    attack: Attack,
    model: nn.Module,
    image: Tensor,
    label: Tensor,
    *,
    mode: str = "pipeline",
    roi_size: Sequence[int] | int,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    memory_bounded: bool = False,
    blend_mode: str = "gaussian",
    target: Tensor | None = None,
    num_classes: int | None = None,
    roi_weight_map: Tensor | None = None,
) -> Tensor:
    """Adversarial version ``(1, C, D, H, W)`` of a whole volume ``image`` with labels ``label`` ``(1, 1, D, H, W)``.

    Args:
        mode: ``"pipeline"`` (white-box through the sliding-window inference that scores the volume) or
            ``"tiles"`` (the papers' independent ROI tiles at stride ROI).
        roi_size: window / tile size.
        overlap, blend_mode: the sliding-window settings of scoring (pipeline only).
        sw_batch_size: windows (pipeline) or tiles (tiles) per forward; keep >= 2 on CPU, where 3D
            convolutions of batch 1 take a slow path.
        memory_bounded: pipeline only: same gradient, memory of one window batch (:class:`SlidingWindowModel`).
        target: explicit target map ``(1, 1, D, H, W)`` for a targeted attack; by default the attack's rule derives
            it once from the whole volume, before any tiling.
        num_classes: the model's classes, for the target rule; by default read from one forward of one ROI tile.
        roi_weight_map: pipeline only: ``(rd, rh, rw)`` blending weights used instead of MONAI's map (as
            ``sliding_window_inference``'s argument), e.g. nnU-Net's Gaussian for an ``nnunet:`` model.

    Budgets are whole-volume budgets in both modes: in tiles mode an L2 attack's tiles share one ball (the stitched
    perturbation is projected onto it, :func:`attack_tiles`).
    """
    if mode not in MODES:
        raise ValueError(f"attack_volume: mode must be one of {MODES}, got {mode!r}")
    if image.ndim != 5 or label.shape != (image.shape[0], 1, *image.shape[2:]):
        raise ValueError(
            f"attack_volume: expected image (1, C, D, H, W) and label (1, 1, D, H, W), got {tuple(image.shape)} "
            f"and {tuple(label.shape)}"
        )
    if sw_batch_size < 1:
        raise ValueError(f"attack_volume: sw_batch_size must be >= 1, got {sw_batch_size}")
    roi = _roi(roi_size)
    check_unit_range(image, f"attack_volume({type(attack).__name__})")
    if target is None:
        target = volume_target(attack, model, image, label, roi, num_classes)
    else:
        check_target(target.long(), label.long(), f"attack_volume({type(attack).__name__})")
    if mode == "tiles":
        if image.shape[0] != 1:
            raise ValueError(f"attack_volume: tiles mode takes one volume (1, C, D, H, W), got {tuple(image.shape)}")
        return attack_tiles(attack, model, image, label, roi, sw_batch_size, target)
    window_model = SlidingWindowModel(
        model,
        roi,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        blend_mode=blend_mode,
        memory_bounded=memory_bounded,
        roi_weight_map=roi_weight_map,
    )
    return attack(window_model, image, label, **({"target": target} if target is not None else {}))
