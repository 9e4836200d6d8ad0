"""params.yaml, typed once at the edge: frozen pydantic models, one per section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.paths import Paths
from tlflow.tasks.lib.core.section import _Section

PARAMS_FILE = "params.yaml"


# base.project: lowercase letters, digits and single dashes, as Prefect's artifact keys are
PROJECT_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"


def project_slug(name: str) -> str:
    """A folder's name as a valid base.project: "My Flowers_2" -> "my-flowers-2"."""
    import re

    return "-".join(re.findall(r"[a-z0-9]+", name.lower()))[:60] or "project"


class Base(_Section):
    # names the project's flow runs, tags and artifact keys on a Prefect server shared by many
    project: str = Field(pattern=PROJECT_PATTERN, max_length=60)
    seed: int = Field(0, ge=0)
    paths: Paths

    @field_validator("project", mode="before")
    @classmethod
    def _project_says_what(cls, value: Any) -> Any:
        """The pattern as words, not the regular expression."""
        import re

        if isinstance(value, str) and not re.match(PROJECT_PATTERN, value):
            raise ValueError(f"project: expected lowercase letters, digits and single dashes "
                             f"(e.g. {project_slug(value)!r}), got {value!r}")
        return value


class Ingest(_Section):
    source: Literal["digits", "folder", "csv"] = "digits"
    path: Path | None = None
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    # a symlink in the source, or a path resolving outside its root, is refused unless true
    follow_symlinks: StrictBool = False

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_train(cls, v: float, info) -> float:
        if info.data.get("val_fraction", 0.0) + v >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 (train needs images)")
        return v


class Extract(_Section):
    backbone: str = "timm/tf_efficientnet_lite0"
    weights: str = "packaged"
    layers: tuple[str, ...] = Field(("pooled",), min_length=1)
    # auto: the model's own input size, smaller for tiny images (tasks/lib/data/decode.py
    # input_size_for); null: the model's own; a number: that many pixels
    image_size: Literal["auto"] | int | None = "auto"
    batch_size: int = Field(32, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["float16", "float32"] = "float16"
    # auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, fp32 elsewhere (device.py)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # auto: ONNX Runtime on a CPU with precision auto, torch elsewhere (features/runtime.py)
    runtime: Literal["auto", "torch", "onnxruntime"] = "auto"
    # scaled: a JPEG at least twice the resize target is decoded at the smallest DCT scale
    # (1/2, 1/4, 1/8) that still covers it (Pillow's Image.draft); full: every pixel
    decode: Literal["scaled", "full"] = "scaled"
    num_workers: int | None = Field(None, ge=0)  # decoder processes; null = auto (device.py)
    on_bad_image: Literal["skip", "fail"] = "skip"
    lock_timeout: float = Field(600.0, ge=0)  # seconds to wait for another writer
    # sharded extraction (tasks/lib/scale/sharding.py): local | dask; shards of shard_size images;
    # dask_address null: a LocalCluster of dask_workers processes (null: one per core), else
    # an existing scheduler's address
    executor: Literal["local", "dask"] = "local"
    shard_size: int = Field(4096, ge=1)
    dask_address: str | None = Field(None, pattern=r"^(tcp|tls|ucx)://[^\s:/]+:\d+$")
    dask_workers: int | None = Field(None, ge=1)
    # more backbones to measure on the same images, each <source>/<model> with weights
    # `packaged` where tlflow packages them, else `imagenet` (the library's cache): codes for
    # each in its own store, the same probe on each, the best on val serves (compare.py)
    compare: tuple[str, ...] = ()

    @field_validator("compare")
    @classmethod
    def _compare(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            source, _, model = name.partition("/")
            if not source or not model:
                raise ValueError(f"{name!r} is not <source>/<model>")
        if len(set(v)) != len(v):
            raise ValueError(f"backbones must be unique, got {list(v)}")
        return v

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, int) and not 8 <= v <= 4096:
            raise ValueError(f"image_size must be auto, null or 8..4096 pixels, got {v}")
        return v

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"layers must be unique, got {list(v)}")
        return v


class Train(_Section):
    classifier: Literal["logistic", "linear_svm", "sgd"] = "logistic"
    C_grid: tuple[float, ...] = Field((0.01, 0.1, 1.0, 10.0), min_length=1)
    max_iter: int = Field(1000, ge=1)
    normalize: Literal["standardize", "l2", "none"] = "standardize"
    class_weight: Literal["balanced"] | None = None
    cv: int | None = Field(None, ge=2)  # k folds on train when there is no val split
    loss: Literal["log_loss", "hinge"] = "log_loss"  # sgd only
    epochs: int = Field(5, ge=1)  # sgd only: passes over the streamed codes
    buffer_rows: int = Field(8192, ge=256)  # sgd only: codes held in memory at once
    promote_margin: float | None = Field(0.0, ge=0)  # null: every new probe replaces the last

    @field_validator("C_grid")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(c <= 0 for c in v):
            raise ValueError(f"every C must be > 0, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _cv_needs_memory(self) -> Train:
        if self.cv is not None and self.classifier == "sgd":
            raise ValueError("cv: k-fold CV is for the in-memory classifiers (logistic, "
                             "linear_svm); sgd streams and needs a val split")
        return self


class Finetune(_Section):
    """Fine-tuning the network itself; off by default (the probe is the default model)."""

    enabled: bool = False
    trainable: Literal["head", "last_n_blocks", "all"] = "last_n_blocks"
    n_blocks: int = Field(2, ge=1)  # last_n_blocks: the backbone's last N stages train
    init_head: Literal["probe", "random"] = "probe"
    bn: Literal["frozen", "train"] = "frozen"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)  # the head's learning rate
    backbone_lr_ratio: float = Field(0.1, gt=0, le=1)  # the body's lr = lr * ratio
    layer_decay: float | None = Field(None, gt=0, le=1)  # per block further from the head
    weight_decay: float = Field(0.01, ge=0)  # never on norm parameters or biases
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd
    epochs: int = Field(10, ge=1)
    warmup_epochs: float = Field(1.0, ge=0)
    patience: int = Field(3, ge=1)  # epochs without a better val accuracy before stopping
    batch_size: int = Field(32, ge=1)
    image_size: int | None = Field(None, ge=8, le=4096)  # null: the codes' size (extract)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random resized crop, share of the area
    hflip: float = Field(0.5, ge=0, le=1)  # probability of a horizontal flip
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # training loss only
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # as extract.precision (auto: bf16 where the device computes it in hardware); no fp16:
    # training in it needs loss scaling, which bf16 does not
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    num_workers: int | None = Field(None, ge=0)
    # above one process in all, the stage launches itself under torchrun (torch DDP: gloo on
    # the CPU, nccl on CUDA, one GPU per process); batch_size is per process
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)  # machines; each runs the stage with the same params
    # host:port of the c10d rendezvous when nnodes > 1 (one node: torchrun --standalone)
    rdzv_endpoint: str | None = Field(None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):"
                                                    r"\d{1,5}$")

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _rendezvous(self) -> Finetune:
        """Several machines meet at an endpoint; one machine needs none (--standalone)."""
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"rdzv_endpoint: nnodes is {self.nnodes}: name the rendezvous "
                             "host:port every machine reaches (e.g. node0:29400)")
        if self.nnodes == 1 and self.rdzv_endpoint is not None:
            raise ValueError("rdzv_endpoint: only with nnodes > 1 (one machine rendezvous "
                             "locally: torchrun --standalone)")
        return self


class Advise(_Section):
    """The notes' 2x2 table, measured (tasks/advise.py), and whether its plan is carried out."""

    # manual: train and finetune do as their sections say (the advice is still written);
    # auto: carry out the measured plan; probe | early_probe | finetune_top | finetune_all: force
    strategy: Literal["manual", "auto", "probe", "early_probe", "finetune_top",
                      "finetune_all"] = "manual"
    large_per_class: int = Field(500, ge=1)  # train images per class (median) from which large
    layer_margin: float = Field(0.01, ge=0)  # an earlier layer's val lead that means dissimilar
    max_top10_variance: float = Field(0.5, gt=0, le=1)  # pooled codes' top-10 PCA share
    min_images_for_spread: int = Field(100, ge=11)  # fewer: the spread is not used


class Audit(_Section):
    """The data checks on the cached codes (tasks/audit.py): they inform, never change data."""

    # cosine similarity of pooled codes (centred on the train mean) above which a val or test
    # image is listed as a near-copy of a train image (calibrated on hymenoptera: README)
    duplicate_threshold: float = Field(0.8, gt=0, le=1)
    folds: int = Field(5, ge=2)  # k of the out-of-fold probabilities for label errors
    max_listed: int = Field(100, ge=0)  # images listed per check (the counts are complete)


class Predict(_Section):
    """`tlflow predict`: the reject option (tasks/lib/probe/trust.py)."""

    # an image whose calibrated top probability is below this is labelled unsure; null: never
    min_confidence: float | None = Field(None, gt=0, le=1)


class Export(_Section):
    """The export stage (tasks/export.py): the working tree's model as an ONNX graph, a DVC
    output GTO can register (`tlflow promote --model probe-onnx`); off by default, as its
    packages are tlflow's dependencies (also named by the extra tlflow[zoo])."""

    enabled: StrictBool = False
    model: Literal["probe", "finetuned"] = "probe"  # which model's graph (the other: a marker)
    format: Literal["onnx"] = "onnx"


class Run(_Section):
    """How `tlflow run` and scheduled runs behave."""

    retries: int = Field(1, ge=0)  # per stage, for transient failures (never for bad input)
    retry_delay_seconds: float = Field(10.0, ge=0)


class Params(_Section):
    base: Base
    ingest: Ingest = Ingest()
    extract: Extract = Extract()
    train: Train = Train()
    finetune: Finetune = Finetune()
    advise: Advise = Advise()
    audit: Audit = Audit()
    predict: Predict = Predict()
    export: Export = Export()
    run: Run = Run()


# what a key's pattern (Field(pattern=...)) stands for, said in its errors
PATTERN_HINTS = {
    "device": "auto, cpu, cuda or cuda:N",
    "dask_address": "a scheduler address with its port, e.g. tcp://host:8786",
    "rdzv_endpoint": "host:port, e.g. node0:29400",
}


def _describe(err: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, what was expected, what was given. A key whose
    item already has a line (C_grid.0: not finite) gets no second line for the consequence
    (C_grid: too short after validation)."""
    lines, keys = [], []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        given = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # a check across keys (a model validator): its message starts with its key
            field, _, msg = msg.partition(": ")
            key, given = f"{key}.{field}", ""
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if e["type"] == "string_pattern_mismatch" and e["loc"][-1] in PATTERN_HINTS:
            msg = f"expected {PATTERN_HINTS[e['loc'][-1]]}"  # not the regular expression
        lines.append(f"{source}: {key}: {msg}{given}")
        keys.append(key)
    return "\n".join(line for line, key in zip(lines, keys, strict=True)
                     if not any(k.startswith(key + ".") for k in keys))


def parse_params(raw: object, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise TlflowError naming each bad key."""
    if not isinstance(raw, dict):
        raise TlflowError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise TlflowError(_describe(err, source)) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if path.is_dir():
        raise TlflowError(f"{path}: a folder, not the params file")
    if not path.is_file():
        raise TlflowError(f"{path}: not found (run tlflow from the project root, or "
                          "`tlflow init` to start a project here)")
    try:
        # a SafeLoader subclass: no arbitrary objects
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise TlflowError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise TlflowError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    params = parse_params(raw, str(path))
    _inside_project(params.base.paths, path.resolve().parent, str(path))
    return params


def _inside_project(paths: Paths, root: Path, source: str) -> None:
    """Every path of the project's params lies inside the project (the params file's folder),
    also after symlinks are resolved: DVC versions nothing outside it, and tlflow writes and
    cleans up nothing outside it. Checked before anything is written."""
    for key, value in paths:
        resolved = (root / value).resolve()
        if root not in resolved.parents:
            raise TlflowError(f"{source}: base.paths.{key}: {str(value)!r} lies outside the "
                              f"project ({resolved}); tlflow writes only inside {root}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping, as DVC does (plain
    YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def params_under(root: Path | str, source: Path | str = PARAMS_FILE,
                 **sections: dict) -> Params:
    """The params of `source` for a project rooted elsewhere: every path under `root`, and
    each given section's keys overridden (tests and benchmarks build projects this way)."""
    raw = yaml.safe_load(Path(source).read_text())
    raw["base"]["paths"] = {k: str(Path(root) / v) for k, v in raw["base"]["paths"].items()}
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return parse_params(raw, str(source))
