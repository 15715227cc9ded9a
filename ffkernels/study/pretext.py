"""Pretext tasks: an image transform picked by a label, the label being what the network must predict.

Images are tensors (N, C, H, W); every transform works on the whole batch at once (no per-image loop).

| task         | labels | label k means                                                            |
|--------------|--------|--------------------------------------------------------------------------|
| supervised   | C      | the image's class (no transform)                                         |
| rotation     | 4      | rotated k * 90 degrees counter-clockwise (torch.rot90 over H, W)         |
| flip         | 2      | 0 as is, 1 mirrored left-right                                           |
| flip-hv      | 4      | 0 as is, 1 mirrored left-right, 2 upside-down, 3 both                    |
| jigsaw       | 24     | 2x2 patches reordered: output patch i (row-major) = input patch JIGSAW_PERMUTATIONS[k][i] |
| hybrid       | (2)    | no label in the input: real images are FF's positives, hybrid images its negatives    |
| scff         | (2)    | no label: pairs of views; positive = two views of one image, negative = of two images |

``hybrid`` is unsupervised FF as in Hinton (2022): a negative mixes two different images through a smooth
random mask (``hybrid_masks``: random bits, blurred repeatedly with [1/4, 1/2, 1/4] along rows and columns,
cut at 0.5). It trains FF only; backprop has no counterpart (``PretextTask.kind == "contrast"``).

``scff`` is self-contrastive FF (Chen et al., arXiv 2409.11593; ``PretextTask.kind == "pairs"``, FF only): in a batch
of B images, two random shifts of up to ``max_shift`` pixels per image (zero fill), each view standardized per image
(zero mean, unit std over its pixels); positive i = view1(i) + view2(i), negative i = view1(i) + view2((i + k) mod B)
with one k drawn uniformly from [1, B - 1] per batch (``scff_pairs``). The sum is SCFF's first layer exactly: it
applies the same weights to the two halves of the concatenated pair and adds them. The partner may share the class;
nothing filters it, as in SCFF. The pairs depend on the batch, so the trainer builds them per batch.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

JIGSAW_GRID = 2
JIGSAW_PERMUTATIONS = torch.tensor(list(itertools.permutations(range(JIGSAW_GRID * JIGSAW_GRID))))


def _check_images(x: torch.Tensor, labels: torch.Tensor, num_labels: int, task: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"ffkernels: {task} needs images of shape (N, C, H, W), got {tuple(x.shape)}")
    if labels.shape != x.shape[:1]:
        raise ValueError(f"ffkernels: {task} needs one label per image: {x.shape[0]} images, labels "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"ffkernels: {task} labels must lie in [0, {num_labels}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _by_label(x: torch.Tensor, labels: torch.Tensor, ops: list) -> torch.Tensor:
    """``ops[k]`` applied to the images labelled k, one batched call per label value."""
    out = x.clone()
    for k, op in enumerate(ops):
        idx = (labels == k).nonzero().squeeze(1)
        if k and idx.numel():  # ops[0] is the identity
            out[idx] = op(x[idx])
    return out


def rotate(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotate image i by labels[i] * 90 degrees counter-clockwise. Images must be square."""
    _check_images(x, labels, 4, "rotation")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"ffkernels: rotation needs square images, got {x.shape[-2]}x{x.shape[-1]}")
    return _by_label(x, labels, [None] + [lambda t, k=k: torch.rot90(t, k, dims=(-2, -1)) for k in (1, 2, 3)])


def flip(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label 0: as is; 1: mirrored left-right."""
    _check_images(x, labels, 2, "flip")
    return _by_label(x, labels, [None, lambda t: t.flip(-1)])


def flip_hv(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label 0: as is; 1: mirrored left-right; 2: upside-down; 3: both."""
    _check_images(x, labels, 4, "flip-hv")
    return _by_label(x, labels, [None, lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.flip(-2, -1)])


def jigsaw(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cut each image into 2x2 patches and reorder them: output patch i = input patch JIGSAW_PERMUTATIONS[label][i]
    (patches numbered row-major). Height and width must be even."""
    _check_images(x, labels, len(JIGSAW_PERMUTATIONS), "jigsaw")
    n, c, h, w = x.shape
    g = JIGSAW_GRID
    if h % g or w % g:
        raise ValueError(f"ffkernels: jigsaw needs height and width divisible by {g}, got {h}x{w}")
    ph, pw = h // g, w // g
    patches = x.reshape(n, c, g, ph, g, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, ph, pw)
    order = JIGSAW_PERMUTATIONS.to(x.device)[labels.long()]                          # (n, 4)
    shuffled = patches[torch.arange(n, device=x.device).unsqueeze(1), order]         # (n, 4, c, ph, pw)
    return shuffled.reshape(n, g, g, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def hybrid_masks(n: int, height: int, width: int, blur_steps: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, height, width) masks of 0/1: random bits, blurred ``blur_steps`` times with [1/4, 1/2, 1/4] along
    rows then columns (edges replicated), thresholded at 0.5: large smooth regions, as Hinton (2022) describes."""
    if blur_steps < 1:
        raise ValueError(f"ffkernels: hybrid masks need blur_steps >= 1, got {blur_steps}")
    m = torch.randint(0, 2, (n, 1, height, width), generator=generator).float()
    k = torch.tensor([0.25, 0.5, 0.25])
    for _ in range(blur_steps):
        m = torch.nn.functional.conv2d(torch.nn.functional.pad(m, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3))
        m = torch.nn.functional.conv2d(torch.nn.functional.pad(m, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1))
    return (m > 0.5).float()


def partners(n: int, generator: torch.Generator) -> torch.Tensor:
    """For each of ``n >= 2`` items another one, drawn uniformly among the other n - 1."""
    if n < 2:
        raise ValueError(f"ffkernels: hybrid images need at least 2 images, got {n}")
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n


def make_hybrid_data(x: torch.Tensor, image_shape, blur_steps: int, generator: torch.Generator):
    """(x, hybrids) for flat inputs ``x`` (n, features): hybrid i = mask_i * image_i + (1 - mask_i) * image_j with
    j another image (``partners``) and mask_i from ``hybrid_masks`` (shared by the channels); returned flat."""
    images = x.reshape(len(x), *image_shape)
    masks = hybrid_masks(len(x), image_shape[-2], image_shape[-1], blur_steps, generator).to(x.device, x.dtype)
    other = images[partners(len(x), generator).to(x.device)]
    return x, (masks * images + (1 - masks) * other).reshape(len(x), -1)


def shift_images(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image (N, C, H, W) translated by its own integer (dy, dx), each uniform in [-max_shift, max_shift], the
    uncovered border filled with zeros (torchvision's RandomAffine(translate=...) on integer shifts)."""
    if max_shift < 0:
        raise ValueError(f"ffkernels: max_shift must be >= 0, got {max_shift}")
    n, _, h, w = images.shape
    if max_shift == 0 or n == 0:
        return images.clone()
    m = max_shift
    d = torch.randint(-m, m + 1, (n, 2), generator=generator)
    padded = torch.nn.functional.pad(images, (m, m, m, m))
    out = torch.empty_like(images)
    for dy, dx in torch.unique(d, dim=0).tolist():  # one batched copy per distinct shift
        idx = ((d[:, 0] == dy) & (d[:, 1] == dx)).nonzero().squeeze(1).to(images.device)
        # output pixel (r, c) = input pixel (r - dy, c - dx): the content moves by (dy, dx)
        out[idx] = padded[idx, :, m - dy:m - dy + h, m - dx:m - dx + w]
    return out


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per row of the (N, ...) batch: zero mean, unit standard deviation (unbiased, as torch.std) over the rest."""
    flat = x.reshape(len(x), -1)
    flat = flat - flat.mean(1, keepdim=True)
    return (flat / (flat.std(1, keepdim=True) + eps)).reshape(x.shape)


def scff_pairs(x: torch.Tensor, image_shape, max_shift: int, generator: torch.Generator):
    """(positives, negatives, k) of one batch of B >= 2 flat inputs ``x`` (B, features), as the module docstring
    says: the two views of every image first, then k."""
    b = len(x)
    if b < 2:
        raise ValueError(f"ffkernels: scff pairs need at least 2 images in a batch, got {b}")
    images = x.reshape(b, *image_shape)
    views = [standardize(shift_images(images, max_shift, generator)).reshape(b, -1) for _ in range(2)]
    k = int(torch.randint(1, b, (1,), generator=generator))
    return views[0] + views[1], views[0] + views[1].roll(-k, 0), k  # roll(-k)[i] = row (i + k) mod B


def pair_batches(n: int, batch_size: int):
    """Consecutive index batches of ``batch_size`` over range(n), a last batch of one merged into the one before
    (an scff batch needs two images)."""
    if n < 2:
        raise ValueError(f"ffkernels: scff needs at least 2 images, got {n}")
    batches = list(torch.arange(n).split(batch_size))
    if len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def make_scff_data(x: torch.Tensor, image_shape, batch_size: int, max_shift: int, generator: torch.Generator):
    """(positives, negatives) for all of ``x`` in consecutive batches (``pair_batches``): the fixed pairs the
    pretext accuracy is measured on."""
    pairs = [scff_pairs(x[idx], image_shape, max_shift, generator)[:2] for idx in pair_batches(len(x), batch_size)]
    return torch.cat([p for p, _ in pairs]), torch.cat([q for _, q in pairs])


@dataclass(frozen=True)
class PretextTask:
    name: str
    num_labels: Optional[int]                 # None: the dataset's number of classes (supervised)
    transform: Optional[Callable]             # (images, labels) -> images; None: no transform
    description: str
    kind: str = "label"   # "label": predict a label; "contrast": real vs hybrid; "pairs": scff (both FF only)

    def classes(self, dataset_classes: int) -> int:
        """How many labels the network predicts on this task."""
        return dataset_classes if self.num_labels is None else self.num_labels


PRETEXTS = {
    "supervised": PretextTask("supervised", None, None, "the class itself (no transform)"),
    "rotation": PretextTask("rotation", 4, rotate, "rotation by 0/90/180/270 degrees"),
    "flip": PretextTask("flip", 2, flip, "no flip / left-right flip"),
    "flip-hv": PretextTask("flip-hv", 4, flip_hv, "no flip / left-right / upside-down / both"),
    "jigsaw": PretextTask("jigsaw", len(JIGSAW_PERMUTATIONS), jigsaw, "2x2 patches in one of 24 orders"),
    "hybrid": PretextTask("hybrid", 2, None, "real images vs hybrids of two images (unsupervised FF)",
                          kind="contrast"),
    "scff": PretextTask("scff", 2, None, "two views of one image vs views of two images (self-contrastive FF)",
                        kind="pairs"),
}


def get_pretext(name: str) -> PretextTask:
    if name not in PRETEXTS:
        raise ValueError(f"ffkernels: unknown pretext task {name!r}; expected one of {', '.join(map(repr, PRETEXTS))}")
    return PRETEXTS[name]


def balanced_labels(n: int, num_labels: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels in random order, each of the ``num_labels`` values used n // num_labels or one more times."""
    return (torch.arange(n) % num_labels)[torch.randperm(n, generator=generator)]


def make_pretext_data(task: PretextTask, x: torch.Tensor, y: torch.Tensor, image_shape, generator: torch.Generator):
    """(inputs, labels) of ``task`` for flat inputs ``x`` (n, features) with classes ``y``.

    Supervised: ``x`` and ``y`` unchanged. Otherwise every input gets a transform label drawn so that all
    labels are equally frequent (``balanced_labels``), and is transformed accordingly; returned flat.
    A "contrast" task has no labels: use ``make_hybrid_data``.
    """
    if task.kind != "label":
        raise ValueError(f"ffkernels: the {task.name} task has no labels; its data come from "
                         f"{'make_hybrid_data' if task.kind == 'contrast' else 'scff_pairs'}")
    if task.transform is None:
        return x, y
    labels = balanced_labels(len(x), task.num_labels, generator)
    images = x.reshape(len(x), *image_shape)
    return task.transform(images, labels).reshape(len(x), -1), labels
