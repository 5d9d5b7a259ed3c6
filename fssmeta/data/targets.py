"""Cross-domain target sets in the PATNet layouts (docs/protocol.md section 5), each 1-way with binary masks."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fssmeta.data.folds import PASCAL_CLASSES
from fssmeta.data.io import (
    DataError,
    Problems,
    image_size,
    read_gray_mask,
    read_image,
    read_mask,
    read_rgb_mask,
)

TARGET_LAYOUTS = ("deepglobe", "isic", "chest_xray", "fss1000", "suim", "pascal")
FOREGROUND_THRESHOLD = 128  # PATNet reads every target mask as 8-bit grayscale and keeps >= 128

# SUIM's 3-bit colour code (R, G, B) per foreground class, in this order; water (0, 0, 0) is background.
SUIM_CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("HD", (0, 0, 255)),  # human divers
    ("PF", (0, 255, 0)),  # plants / sea-grass
    ("WR", (0, 255, 255)),  # wrecks / ruins
    ("RO", (255, 0, 0)),  # robots
    ("RI", (255, 0, 255)),  # reefs / invertebrates
    ("FV", (255, 255, 0)),  # fish / vertebrates
    ("SR", (255, 255, 255)),  # sea-floor / rocks
)

LAYOUT_HELP = {
    "deepglobe": "<root>/<1..6>/test/origin/*.jpg + <root>/<k>/test/groundtruth/<same stem>.png",
    "isic": "<root>/ISIC2018_Task1-2_Training_Input/<1..3>/*.jpg + "
    "<root>/ISIC2018_Task1_Training_GroundTruth/<ID>_segmentation.png",
    "chest_xray": "<root>/CXR_png/*.png + <root>/masks/<stem>_mask.png (or <stem>.png)",
    "fss1000": "<root>/<class>/<n>.jpg + <root>/<class>/<n>.png, classes from <root>/test.txt or the test split",
    "suim": "<root>/images/*.jpg + <root>/masks/<stem>.bmp (RGB colour-coded)",
    "pascal": "<root>/ImageSets/Segmentation/val.txt + <root>/JPEGImages/<id>.jpg + "
    "<root>/SegmentationClassAug/<id>.png (class ids 1..20, 255 ignored)",
}
PASCAL_TARGET_LIST = "ImageSets/Segmentation/val.txt"
PASCAL_TARGET_MASKS = "SegmentationClassAug"

FSS1000_SPLIT_SIZES = {"train": 520, "val": 240, "test": 240}
_FSS1000_FILES = {"train": "trn", "val": "val", "test": "test"}  # HSNet's data/splits/fss/ file names


@dataclass(frozen=True)
class TargetSample:
    image: Path
    mask: Path
    class_index: int  # into TargetSet.classes


@dataclass(frozen=True)
class TargetSet:
    """One target domain: its classes and every (image, mask, class) sample, sorted by class then path."""

    name: str
    layout: str
    root: Path
    classes: tuple[str, ...]
    samples: tuple[TargetSample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def by_class(self) -> dict[int, list[int]]:
        """Sample indices per class index."""
        groups: dict[int, list[int]] = {index: [] for index in range(len(self.classes))}
        for i, sample in enumerate(self.samples):
            groups[sample.class_index].append(i)
        return groups

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 (H, W, 3) and the sample's binary mask uint8 (H, W) in {0, 1}."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if self.layout == "suim":
            mask = suim_class_mask(read_rgb_mask(sample.mask), sample.class_index)
        elif self.layout == "pascal":  # the class's pixels; VOC's 255 boundary stays ignored, as in HSNet's reader
            ids = read_mask(sample.mask)
            mask = np.where(ids == 255, 255, ids == sample.class_index + 1).astype(np.uint8)
        else:
            mask = (read_gray_mask(sample.mask) >= FOREGROUND_THRESHOLD).astype(np.uint8)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{sample.image} and {sample.mask}: image is {image.shape[0]}x{image.shape[1]} "
                f"but mask is {mask.shape[0]}x{mask.shape[1]}"
            )
        return image, mask


def _suim_bits(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's thresholded colour as a 3-bit code R*4 + G*2 + B, (H, W) uint8.

    Thresholding per channel first makes slightly-off colours (250 for 255) count as their class.
    """
    bits = (rgb >= FOREGROUND_THRESHOLD).astype(np.uint8)
    return bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]


def _suim_code(colour: tuple[int, int, int]) -> int:
    return (colour[0] >= 128) * 4 + (colour[1] >= 128) * 2 + (colour[2] >= 128)


def suim_class_mask(rgb: np.ndarray, class_index: int) -> np.ndarray:
    """uint8 (H, W) in {0, 1}: pixels of an RGB (H, W, 3) SUIM mask whose colour is the class's code."""
    return (_suim_bits(rgb) == _suim_code(SUIM_CLASSES[class_index][1])).astype(np.uint8)


def suim_classes_present(rgb: np.ndarray) -> list[int]:
    """Indices into SUIM_CLASSES of the classes with at least one pixel in an RGB (H, W, 3) mask."""
    present = set(np.unique(_suim_bits(rgb)).tolist())
    return [index for index, (_, colour) in enumerate(SUIM_CLASSES) if _suim_code(colour) in present]


def _parse_names(text: str, source: str | Path) -> list[str]:
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{source}: class list is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{source}: class names listed twice: {', '.join(duplicates)}")
    return names


def fss1000_split(split: str) -> list[str]:
    """FSS-1000 class names of HSNet's split ("train" 520, "val" 240, "test" 240), packaged with fssmeta."""
    if split not in FSS1000_SPLIT_SIZES:
        raise DataError(f"unknown FSS-1000 split {split!r}; expected one of {sorted(FSS1000_SPLIT_SIZES)}")
    stem = _FSS1000_FILES[split]
    resource = resources.files("fssmeta.data").joinpath("splits").joinpath("fss1000").joinpath(f"{stem}.txt")
    if not resource.is_file():
        raise DataError(
            f"{resource}: FSS-1000 {split} split list is not packaged with this fssmeta; place HSNet's "
            f"data/splits/fss/{stem}.txt (github.com/juhongm999/hsnet) there, one class name per line "
            f"({FSS1000_SPLIT_SIZES[split]} names)"
        )
    names = _parse_names(resource.read_text(), resource)
    if len(names) != FSS1000_SPLIT_SIZES[split]:
        raise DataError(f"{resource}: {len(names)} class names, expected {FSS1000_SPLIT_SIZES[split]}")
    return names


def _files(folder: Path, suffix: str) -> list[Path]:
    # dot-files are skipped: macOS archives leave "._name.jpg" resource forks beside the real files
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == suffix and not p.name.startswith("."))


def _folder(path: Path, problems: Problems) -> bool:
    if path.is_dir():
        return True
    problems.add(path, "folder not found")
    return False


def _numbered_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _pair(
    images: list[Path], mask_for: Callable[[Path], Path], class_index: int, problems: Problems
) -> list[TargetSample]:
    samples = []
    for image in images:
        mask = mask_for(image)
        if mask.is_file():
            samples.append(TargetSample(image, mask, class_index))
        else:
            problems.add(image, f"no mask {mask}")
    return samples


def _orphans(masks: list[Path], image_for: Callable[[Path], Path], problems: Problems) -> None:
    for mask in masks:
        if not image_for(mask).is_file():
            problems.add(mask, f"mask without an image (expected {image_for(mask)})")


Reader = Callable[[Path, Problems], tuple[list[str], list[TargetSample], list[Path]]]


def _read_deepglobe(root: Path, problems: Problems) -> tuple[list[str], list[TargetSample], list[Path]]:
    class_dirs = _numbered_dirs(root)
    samples = []
    for index, class_dir in enumerate(class_dirs):
        origin, truth = class_dir / "test" / "origin", class_dir / "test" / "groundtruth"
        if _folder(origin, problems) and _folder(truth, problems):
            samples += _pair(_files(origin, ".jpg"), lambda p, t=truth: t / f"{p.stem}.png", index, problems)
            _orphans(_files(truth, ".png"), lambda p, o=origin: o / f"{p.stem}.jpg", problems)
    return [d.name for d in class_dirs], samples, [d / "test" / "origin" for d in class_dirs]


def _read_isic(root: Path, problems: Problems) -> tuple[list[str], list[TargetSample], list[Path]]:
    inputs, truth = root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth"
    if not (_folder(inputs, problems) and _folder(truth, problems)):
        return [], [], []
    # the ground-truth folder holds the masks of every class together, so an unused mask is not an error
    class_dirs = _numbered_dirs(inputs)
    samples = []
    for index, class_dir in enumerate(class_dirs):
        samples += _pair(_files(class_dir, ".jpg"), lambda p: truth / f"{p.stem}_segmentation.png", index, problems)
    return [d.name for d in class_dirs], samples, class_dirs


def _read_chest_xray(root: Path, problems: Problems) -> tuple[list[str], list[TargetSample], list[Path]]:
    image_dir, mask_dir = root / "CXR_png", root / "masks"
    if not (_folder(image_dir, problems) and _folder(mask_dir, problems)):
        return ["lung"], [], [image_dir]
    images = {p.stem: p for p in _files(image_dir, ".png")}
    masks: dict[str, list[Path]] = defaultdict(list)
    for mask in _files(mask_dir, ".png"):
        # pair by stem minus a trailing "_mask": PATNet's cut of 9 characters mispairs part of the release
        masks[mask.stem.removesuffix("_mask")].append(mask)
    samples = []
    for stem, image in images.items():
        # The release has more images than masks (e.g. Shenzhen 662 / 566); like PATNet, the episodes use
        # the labelled images only. A mask must still pair with exactly one image and vice versa.
        if stem not in masks:
            continue
        if len(masks[stem]) > 1:
            problems.add(image, f"{len(masks[stem])} masks: {', '.join(str(m) for m in masks[stem])}")
        else:
            samples.append(TargetSample(image, masks[stem][0], 0))
    for stem, found in masks.items():
        if stem not in images:
            for mask in found:
                problems.add(mask, f"mask without an image (expected {image_dir / stem}.png)")
    return ["lung"], samples, [image_dir]


def _read_fss1000(root: Path, problems: Problems) -> tuple[list[str], list[TargetSample], list[Path]]:
    listed = root / "test.txt"
    classes = _parse_names(listed.read_text(), listed) if listed.is_file() else fss1000_split("test")
    source = listed if listed.is_file() else "the packaged FSS-1000 test split"
    samples = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            problems.add(folder, f"class folder listed in {source} is missing")
            continue
        samples += _pair(_files(folder, ".jpg"), lambda p: p.with_suffix(".png"), index, problems)
        _orphans(_files(folder, ".png"), lambda p: p.with_suffix(".jpg"), problems)
    return classes, samples, [root / name for name in classes]


def _read_suim(root: Path, problems: Problems) -> tuple[list[str], list[TargetSample], list[Path]]:
    classes = [name for name, _ in SUIM_CLASSES]
    image_dir, mask_dir = root / "images", root / "masks"
    if not (_folder(image_dir, problems) and _folder(mask_dir, problems)):
        return classes, [], [mask_dir] * len(classes)
    samples = []
    for pair in _pair(_files(image_dir, ".jpg"), lambda p: mask_dir / f"{p.stem}.bmp", 0, problems):
        try:
            present = suim_classes_present(read_rgb_mask(pair.mask))
        except DataError as exc:
            problems.add_error(exc)
            continue
        samples += [TargetSample(pair.image, pair.mask, index) for index in present]
    _orphans(_files(mask_dir, ".bmp"), lambda p: image_dir / f"{p.stem}.jpg", problems)
    return classes, samples, [mask_dir] * len(classes)


def _read_pascal(root: Path, problems: Problems) -> tuple[list[str], list[TargetSample], list[Path]]:
    """PASCAL VOC val as a cross-domain target (RMT's COCO-20i -> PASCAL setting): an image is a sample of
    every class id its mask contains."""
    listed, image_dir, mask_dir = root / PASCAL_TARGET_LIST, root / "JPEGImages", root / PASCAL_TARGET_MASKS
    folders = [_folder(image_dir, problems), _folder(mask_dir, problems)]
    if not listed.is_file():
        problems.add(listed, "image list not found")
    if not (listed.is_file() and all(folders)):
        return list(PASCAL_CLASSES), [], []
    samples = []
    for pair in _pair([image_dir / f"{stem}.jpg" for stem in _parse_names(listed.read_text(), listed)],
                      lambda p: mask_dir / f"{p.stem}.png", 0, problems):
        if not pair.image.is_file():
            problems.add(pair.image, f"listed in {listed}, not found")
            continue
        try:
            present = np.unique(read_mask(pair.mask))
        except DataError as exc:
            problems.add_error(exc)
            continue
        samples += [TargetSample(pair.image, pair.mask, int(c) - 1) for c in present if 1 <= c <= len(PASCAL_CLASSES)]
    return list(PASCAL_CLASSES), samples, []


_READERS: dict[str, Reader] = {
    "deepglobe": _read_deepglobe,
    "isic": _read_isic,
    "chest_xray": _read_chest_xray,
    "fss1000": _read_fss1000,
    "suim": _read_suim,
    "pascal": _read_pascal,
}


def _natural_key(path: Path) -> list[int | str]:
    # "2.jpg" before "10.jpg": FSS-1000 numbers its images 1..10
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_target(name: str, layout: str, root: str | Path) -> TargetSet:
    """Index a target set; every missing pair, empty class or unreadable file is reported in one DataError."""
    if layout not in _READERS:
        raise DataError(f"unknown target layout {layout!r}; expected one of {TARGET_LAYOUTS}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {name} root not found; the {layout} layout is {LAYOUT_HELP[layout]}")
    problems = Problems(f"target set {name!r} ({layout} layout: {LAYOUT_HELP[layout]})")
    classes, samples, class_paths = _READERS[layout](root, problems)
    if not classes:
        problems.add(root, f"no classes found; expected {LAYOUT_HELP[layout]}")
    counts = defaultdict(int)
    for sample in samples:
        counts[sample.class_index] += 1
    for index, class_name in enumerate(classes):
        if not counts[index] and index < len(class_paths) and class_paths[index].is_dir():
            problems.add(class_paths[index], f"class {class_name} has no samples")
    # header-only reads: an unreadable file or a size mismatch is found now, not mid-evaluation
    for image, mask in dict.fromkeys((s.image, s.mask) for s in samples):
        try:
            image_hw, mask_hw = image_size(image), image_size(mask)
        except DataError as exc:
            problems.add_error(exc)
            continue
        if image_hw != mask_hw:
            problems.add(image, f"size {image_hw[0]}x{image_hw[1]} differs from mask {mask} "
                         f"({mask_hw[0]}x{mask_hw[1]})")
    problems.raise_if_any()
    ordered = sorted(samples, key=lambda s: (s.class_index, _natural_key(s.image)))
    return TargetSet(name, layout, root, tuple(classes), tuple(ordered))
