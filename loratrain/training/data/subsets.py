"""Where training images come from: `<repeats>_<class tokens>` folders or a sd-scripts dataset TOML."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from loratrain.core.config import parse_resolution, read_toml
from loratrain.core.errors import ConfigError
from loratrain.core.images import IMAGE_EXTENSIONS
from loratrain.core.paths import confine

from ..options.data import DatasetOptions, SubsetOptions, dataset_defaults


class DatasetError(ConfigError):
    """The dataset folders or TOML are wrong; the message names the file."""


def confined(path: str | Path, what: str) -> Path:
    """`path` when this job may read it (a symlinked concept folder or image pointing out of the app's workspace may
    not), as a DatasetError naming it otherwise."""
    try:
        return confine(path, what)
    except DatasetError:
        raise
    except ConfigError as e:
        raise DatasetError(str(e)) from None


#: the most repeats a folder may ask for (each repeat is a sample listed in every epoch)
MAX_REPEATS = 10_000


class Subset(SubsetOptions):
    """One folder of images: where it is, how often it repeats, its class tokens, and its caption and augmentation
    options (declared once, in options/data.SubsetOptions, with TrainConfig's defaults)."""

    model_config = ConfigDict(extra="forbid")

    image_dir: str
    num_repeats: int = Field(1, ge=1, le=MAX_REPEATS)
    class_tokens: str | None = None
    is_reg: bool = False

    def mask_file(self, image: Path) -> Path | None:
        """The mask image of `image` in conditioning_data_dir (same stem, any image type), directly or in a folder
        named like the image's own folder (`10_sks dog/`), as sd-scripts' folder layout has it."""
        root = confined(self.conditioning_data_dir, "conditioning_data_dir")
        for folder in (root / image.parent.name, root):
            for ext in IMAGE_EXTENSIONS:
                for candidate in (folder / (image.stem + ext), folder / (image.stem + ext.upper())):
                    if candidate.is_file():
                        return confined(candidate, f"mask of {image.name}")
        return None

    @property
    def live(self) -> bool:
        """Its pixels change every step, so its latents are encoded every step instead of cached."""
        return self.color_aug or self.random_crop

    def images(self) -> list[Path]:
        root = confined(self.image_dir, "image_dir")
        if not root.is_dir():
            raise DatasetError(f"image_dir not found: {root}")
        return sorted(confined(p, "image") for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class DatasetSpec(DatasetOptions):
    """One dataset: its folders, resolution and batch size, and its bucket and validation options (declared once, in
    options/data.DatasetOptions)."""

    model_config = ConfigDict(extra="forbid")

    subsets: list[Subset]
    resolution: tuple[int, int]
    batch_size: int = Field(ge=1)


SUBSET_KEYS = set(Subset.model_fields)
DATASET_KEYS = set(DatasetSpec.model_fields) - {"subsets"}


def subsets_from_folders(train_data_dir: str, reg_data_dir: str | None, defaults: dict[str, Any],
                         log: Callable[[str], None] = lambda text: None) -> list[Subset]:
    """kohya command-line mode: each `<N>_<tokens>` child folder is a subset with N repeats."""
    out: list[Subset] = []
    defaults = {**dataset_defaults(), **defaults}
    for root, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if not root:
            continue
        root_path = confined(root, f"{'reg' if is_reg else 'train'}_data_dir")
        if not root_path.is_dir():
            raise DatasetError(f"{'reg' if is_reg else 'train'}_data_dir not found: {root_path}")
        for child in sorted(confined(p, "concept folder") for p in root_path.iterdir() if p.is_dir()):
            head, _, tokens = child.name.partition("_")
            try:
                repeats = int(head)
            except ValueError:
                log(f"warning: ignoring folder {child} (name is not <repeats>_<class tokens>)")
                continue
            if repeats < 1:
                log(f"warning: ignoring folder {child} (repeats < 1)")
                continue
            if repeats > MAX_REPEATS:
                raise DatasetError(f"{child}: {repeats:,} repeats; at most {MAX_REPEATS:,} (is the folder name a typo?)")
            out.append(Subset(image_dir=str(child), num_repeats=repeats, class_tokens=tokens or None, is_reg=is_reg,
                              **{k: v for k, v in defaults.items() if k in SUBSET_KEYS}))
    if not any(not s.is_reg for s in out):
        raise DatasetError(f"{train_data_dir}: no training folders named like '10_sks dog' found")
    return out


def _built(cls: type, values: dict[str, Any], where: str) -> Any:
    """A Subset or DatasetSpec from a TOML table, its values checked as the command line's are (same declarations,
    and the same rules between them: the group's problems()); a wrong one is a DatasetError naming the table and key."""
    try:
        built = cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise DatasetError(f"{where}: needs {key}") from None
        raise DatasetError(f"{where}: {key} = {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}") from None
    problems = built.problems()
    if problems:
        raise DatasetError("; ".join(f"{where}: {key} = {values.get(key)!r}: {why}" for key, why in problems))
    return built


def _tables(value: Any, where: str) -> list[dict[str, Any]]:
    """`value` as a TOML array of tables ([[name]]); anything else (a number, a string, one [table]) is a DatasetError
    naming where, instead of a crash further on."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DatasetError(f"{where} must be an array of tables ([[...]] sections), not {type(value).__name__} {value!r:.60}")
    return value


def _path_text(values: dict[str, Any], key: str, where: str) -> str:
    """A path read from the TOML: text, never a number or an array (a path is input like any other)."""
    value = values.get(key)
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise DatasetError(f"{where}: {key} = {value!r}: must be a path (text)")
    return value


def _drop_unimplemented(table: dict[str, Any], where: str) -> dict[str, Any]:
    """sd-scripts keys we do not implement: dropped when off (false, 0), refused with the reason when on."""
    from ..kohya import DATASET_REFUSED, dataset_key_problem

    problems = [p for k, v in table.items() if (p := dataset_key_problem(k, v))]
    if problems:
        raise DatasetError(f"{where}: " + "; ".join(problems))
    return {k: v for k, v in table.items() if k not in DATASET_REFUSED}


def specs_from_toml(path: str | Path, defaults: dict[str, Any]) -> list[DatasetSpec]:
    """sd-scripts dataset config: [general] > [[datasets]] > [[datasets.subsets]], lower levels win."""
    path = Path(path)
    defaults = {**dataset_defaults(), **defaults}
    data = read_toml(path, "dataset config")
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise DatasetError(f"{path}: general must be a table ([general]), not {type(general).__name__} {general!r:.60}")
    unknown = set(data) - {"general", "datasets"}
    if unknown:
        raise DatasetError(f"{path}: unknown top-level keys {sorted(unknown)}")
    general = _drop_unimplemented(general, f"{path} [general]")
    specs = []
    for d_index, ds in enumerate(_tables(data.get("datasets", []), f"{path}: datasets")):
        ds = _drop_unimplemented(ds, f"{path} datasets[{d_index}]")
        ds["subsets"] = [_drop_unimplemented(sub, f"{path} datasets[{d_index}].subsets[{i}]")
                         for i, sub in enumerate(_tables(ds.get("subsets", []), f"{path}: datasets[{d_index}].subsets"))]
        merged_ds = {**defaults, **general, **{k: v for k, v in ds.items() if k != "subsets"}}
        for key in set(general) | set(ds) - {"subsets"}:
            if key not in SUBSET_KEYS | DATASET_KEYS:
                raise DatasetError(f"{path}: unknown key {key!r} in datasets[{d_index}] or [general]")
        subsets = []
        for s_index, sub in enumerate(ds.get("subsets", [])):
            bad = set(sub) - SUBSET_KEYS
            if bad or "resolution" in sub:
                raise DatasetError(f"{path}: datasets[{d_index}].subsets[{s_index}] has unknown key(s) {sorted(bad | ({'resolution'} & set(sub)))}")
            if "image_dir" not in sub:
                raise DatasetError(f"{path}: datasets[{d_index}].subsets[{s_index}] needs image_dir")
            values = {k: v for k, v in {**merged_ds, **sub}.items() if k in SUBSET_KEYS}
            where = f"{path}: datasets[{d_index}].subsets[{s_index}]"
            image_dir = Path(_path_text(values, "image_dir", where))
            if not image_dir.is_absolute():
                values["image_dir"] = str((path.parent / image_dir).resolve()) if not image_dir.exists() else str(image_dir)
            confined(values["image_dir"], f"{where}.image_dir")  # a path read from a file is input like any other
            if values.get("conditioning_data_dir") not in (None, ""):
                confined(_path_text(values, "conditioning_data_dir", where), f"{where}.conditioning_data_dir")
            subsets.append(_built(Subset, values, where))
        if not subsets:
            raise DatasetError(f"{path}: datasets[{d_index}] has no subsets")
        ds_values = {k: v for k, v in merged_ds.items() if k in DATASET_KEYS}
        if "resolution" in ds_values:
            try:
                ds_values["resolution"] = parse_resolution(ds_values["resolution"], f"{path}: resolution")
            except ConfigError as e:
                raise DatasetError(str(e)) from None
        specs.append(_built(DatasetSpec, {"subsets": subsets, **ds_values}, f"{path}: datasets[{d_index}]"))
    if not specs:
        raise DatasetError(f"{path}: no [[datasets]] defined")
    return specs
