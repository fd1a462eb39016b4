"""Registry of the standard domain-generalisation datasets (DomainBed layout): expected domains, image counts and
classes, so that ``extract`` can warn when what is on disk does not match (a missing domain, a partial download).
Counts are DomainBed's; see data/README.md for sources."""
from __future__ import annotations

from typing import Optional

OFFICE_HOME_CLASSES = (
    "Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar Candles Chair Clipboards Computer "
    "Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan File_Cabinet Flipflops Flowers Folder Fork Glasses Hammer "
    "Helmet Kettle Keyboard Knives Lamp_Shade Laptop Marker Monitor Mop Mouse Mug Notebook Oven Pan Paper_Clip Pen "
    "Pencil Postit_Notes Printer Push_Pin Radio Refrigerator Ruler Scissors Screwdriver Shelf Sink Sneakers Soda "
    "Speaker Spoon TV Table Telephone ToothBrush Toys Trash_Can Webcam").split()

DATASETS: dict[str, dict] = {
    "PACS": {"domains": {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929},
             "classes": ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"], "num_classes": 7},
    "VLCS": {"domains": {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376},
             "classes": ["bird", "car", "chair", "dog", "person"], "num_classes": 5},
    "OfficeHome": {"domains": {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357},
                   "classes": OFFICE_HOME_CLASSES, "num_classes": 65},
    "DomainNet": {"domains": {"clipart": 48129, "infograph": 51605, "painting": 72266, "quickdraw": 172500,
                              "real": 172947, "sketch": 69128}, "classes": None, "num_classes": 345},
}


def identify(domains: set[str]) -> Optional[str]:
    """The known dataset whose domain names are exactly these, if any.

    Only an exact match counts: two or three domains that happen to share names with a known dataset (``photo``
    and ``sketch`` are PACS's and DomainNet's) are just a folder, not a damaged copy of that dataset. Pass the
    dataset explicitly (``--dataset``) to check a partial download against it."""
    for name, spec in DATASETS.items():
        if set(domains) == set(spec["domains"]):
            return name
    return None


def canonical(name: str) -> Optional[str]:
    """The registry's spelling of a dataset name, case-insensitively (``pacs`` -> ``PACS``); None if unknown."""
    return next((k for k in DATASETS if k.lower() == str(name).lower()), None)


def check(dataset: Optional[str], counts: dict[str, int], classes: set[str]) -> list[str]:
    """Warnings for a dataset on disk versus its expected layout; ``dataset=None`` identifies it by its exact set of
    domain names (see :func:`identify`), an explicit name is checked whatever the domains."""
    name = dataset or identify(set(counts))
    if name is None:
        return []
    if canonical(name) is None:
        return [f"unknown dataset {name!r}; known: {', '.join(DATASETS)}"]
    name = canonical(name)
    spec = DATASETS[name]
    out = []
    for dom, n in spec["domains"].items():
        if dom not in counts:
            out.append(f"{name}: domain {dom!r} is missing (expected {n:,} images)")
        elif counts[dom] != n:
            out.append(f"{name}: domain {dom!r} has {counts[dom]:,} images, expected {n:,}")
    for dom in sorted(set(counts) - set(spec["domains"])):
        out.append(f"{name}: unexpected domain {dom!r}")
    if spec["classes"] is not None and set(spec["classes"]) != classes:
        missing = sorted(set(spec["classes"]) - classes)
        extra = sorted(classes - set(spec["classes"]))
        out.append(f"{name}: classes differ (missing {missing[:5]}, unexpected {extra[:5]})")
    elif len(classes) != spec["num_classes"]:
        out.append(f"{name}: {len(classes)} classes, expected {spec['num_classes']}")
    return out
