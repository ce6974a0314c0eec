"""Decathlon-style JSON datalists: read them into case dicts, write them, and make one for BTCV.

A datalist is ``{"training": [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}, ...],
"validation": [...]}`` with paths relative to the dataset root. ``image`` may also be a list of files, one per
input channel (e.g. CT and PET). An optional ``"id"`` names the case; otherwise the image file name without
``.nii.gz`` does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustseg.errors import DataError

SPLITS = ("training", "validation")
# Synapse split used by TransUNet, UNETR and the VAFA paper: these 12 BTCV cases validate, the other 18 train.
BTCV_VALIDATION_CASES = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)

Case = dict[str, Any]  # {"image": str | list[str] (absolute), "label": str (absolute), "case_id": str}


def _check_entry(entry: Any, where: str) -> None:
    """An entry needs ``image`` (a file name, or a non-empty list of them, one per channel) and ``label`` (a file
    name); ``id``, when present, a non-empty string or number.

    Raises:
        DataError: naming the entry (``datalist X: validation[3]``), the key, its value and what was expected.
    """
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DataError(f"{where} needs 'image' and 'label' keys, got {entry!r}")
    image = entry["image"]
    if isinstance(image, list):
        if not image or not all(isinstance(p, str) and p.strip() for p in image):
            raise DataError(
                f"{where}: 'image'={image!r}: expected a file path, or a non-empty list of file paths (one per channel)"
            )
    elif not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: 'image'={image!r}: expected a file path (a string relative to the dataset root)")
    label = entry["label"]
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"{where}: 'label'={label!r}: expected a file path (a string relative to the dataset root)")
    if "id" in entry and (
        isinstance(entry["id"], bool) or not isinstance(entry["id"], (str, int)) or not str(entry["id"]).strip()
    ):
        raise DataError(f"{where}: 'id'={entry['id']!r}: expected a non-empty case name")


def case_id_of(entry: dict[str, Any]) -> str:
    """The case's name: its ``id`` key, else the (first) image file name without the NIfTI extension."""
    if "id" in entry:
        return str(entry["id"])
    image = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
    return re.sub(r"\.nii(\.gz)?$", "", Path(image).name)


def read_datalist(path: Path, root: Path) -> dict[str, list[Case]]:
    """Read ``path`` and return ``{split: [case, ...]}`` with absolute paths under ``root``.

    Raises:
        DataError: the file is missing or not valid JSON, a split is missing, empty or malformed, an entry's
            image or label is not a file path (a number, null, a mapping, an empty list), or two cases share a name.
    """
    if not path.is_file():
        where = "" if root.is_dir() else f" (the dataset root {root} does not exist either)"
        raise DataError(
            f"datalist not found: {path}{where}. Point data.root at the dataset folder (or set ROBUSTSEG_DATA) "
            f"and data.datalist at its decathlon JSON; see docs/data.md"
        )
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"datalist {path} is not readable JSON: {err}") from err
    if not isinstance(content, dict):
        raise DataError(f"datalist {path}: expected a JSON object with {list(SPLITS)} lists")
    splits: dict[str, list[Case]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        entries = content.get(split)
        if not isinstance(entries, list):
            raise DataError(f"datalist {path}: missing the {split!r} list")
        if not entries:
            raise DataError(f"datalist {path}: the {split!r} split is empty")
        cases = []
        for i, entry in enumerate(entries):
            _check_entry(entry, f"datalist {path}: {split}[{i}]")
            images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            image_paths = [str(root / p) for p in images]
            case = {
                "image": image_paths if isinstance(entry["image"], list) else image_paths[0],
                "label": str(root / entry["label"]),
                "case_id": case_id_of(entry),
            }
            if case["case_id"] in seen:
                raise DataError(
                    f"datalist {path}: case name {case['case_id']!r} appears in {seen[case['case_id']]} and {split}"
                )
            seen[case["case_id"]] = split
            cases.append(case)
        splits[split] = cases
    return splits


def write_datalist(path: Path, training: Sequence[dict[str, Any]], validation: Sequence[dict[str, Any]]) -> None:
    """Write a datalist atomically (temporary file, then rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"training": list(training), "validation": list(validation)}, indent=2))
    os.replace(tmp, path)


def write_btcv_datalist(
    root: Path, datalist: str = "dataset.json", validation_cases: Sequence[int] = BTCV_VALIDATION_CASES
) -> Path:
    """Write the Synapse-split datalist for a BTCV folder holding ``imgXXXX.nii.gz`` / ``labelXXXX.nii.gz``.

    Files are found anywhere under ``root`` (e.g. ``imagesTr/img0001.nii.gz`` and ``labelsTr/label0001.nii.gz``,
    or the original ``RawData/Training/img`` and ``.../label`` folders); an image without a label is skipped.

    Returns:
        The path of the written datalist.
    """
    root = Path(root)
    labels = {int(m.group(1)): p for p in root.rglob("label*.nii*") if (m := re.match(r"label(\d+)\.nii", p.name))}
    images = {int(m.group(1)): p for p in root.rglob("img*.nii*") if (m := re.match(r"img(\d+)\.nii", p.name))}
    numbers = sorted(set(images) & set(labels))
    if not numbers:
        raise DataError(f"no imgXXXX.nii.gz with a matching labelXXXX.nii.gz found under {root}")
    entries = {
        n: {"image": str(images[n].relative_to(root)), "label": str(labels[n].relative_to(root))} for n in numbers
    }
    validation = [entries[n] for n in numbers if n in validation_cases]
    training = [entries[n] for n in numbers if n not in validation_cases]
    path = root / datalist
    write_datalist(path, training, validation)
    return path
