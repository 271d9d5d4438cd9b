"""What each library entry point (`compressor.api`) takes and returns: one request and one result dataclass per
`compress` command. A request's fields are the command's options (`--max-steps` is `max_steps`); a result holds
what the command prints: the data of its tables and the paths it wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------- shared option groups

@dataclass(kw_only=True)
class ModelOptions:
    """Which model: MODEL (None: the embedded default), --adapter, --fusion, --setup, --head."""

    model: Optional[PathLike] = None
    adapters: Sequence[PathLike] = ()
    fusion: Optional[PathLike] = None
    setup: Optional[str] = None
    head: Optional[str] = None


@dataclass(kw_only=True)
class DataOptions:
    """--data and its companions; `tokenizer`: a directory or hub name, for a model saved without one."""

    data: Optional[str] = None
    data_dir: Optional[PathLike] = None
    task: Optional[str] = None
    text_columns: Optional[str] = None
    label_column: Optional[str] = None
    max_train_examples: Optional[int] = None
    max_dev_examples: Optional[int] = None
    tokenizer: Optional[str] = None


@dataclass(kw_only=True)
class TrainBudget:
    """The training budget of `train` and of the prune methods that train (a training.TrainConfig)."""

    max_steps: Optional[int] = None
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-4
    max_length: Optional[int] = None  # None: 128, or the model's positions when fewer
    checkpoint_dir: Optional[PathLike] = None
    resume: bool = False


@dataclass(kw_only=True)
class DistillOptions:
    """Distillation from a dense teacher (`prune --recover kd`, `train --teacher`); None: the default of
    training.KDConfig, where the loss and its defaults are described. kd_layers: 'all' or '1,3,5' (0-based)."""

    kd_temperature: Optional[float] = None
    kd_logits_weight: Optional[float] = None
    kd_hidden_weight: Optional[float] = None
    kd_layers: Optional[str] = None


# ----------------------------------------------------------------------------------------------- inspect

@dataclass(kw_only=True)
class InspectRequest(ModelOptions):
    seq_len: int = 128


@dataclass
class InspectResult:
    model_class: str
    setup: Optional[str]
    seq_len: int
    layers: List[dict]  # flops.layer_costs: one dict per layer
    total: dict  # flops.total_cost
    invertible: Optional[dict] = None  # modeling.invertible.summary: the embeddings' invertible adapter


# ----------------------------------------------------------------------------------------------- prune

@dataclass(kw_only=True)
class PruneRequest(ModelOptions, DataOptions, TrainBudget, DistillOptions):
    out: PathLike
    sparsity: Union[Mapping[str, float], Sequence[str]] = ()  # {"heads": 0.5} or ["heads=0.5"]; () for targets
    method: str = "magnitude"
    seed: int = 0
    allow_empty: bool = False
    overwrite: bool = False
    # method options: passed only when not None; a method without the option refuses it
    criterion: Optional[str] = None
    rounds: Optional[int] = None
    rewind_step: Optional[int] = None
    max_drop: Optional[float] = None
    widen: Optional[bool] = None
    objective: Optional[str] = None
    examples: Optional[int] = None
    adapter_width: Optional[int] = None
    target_speedup: Optional[float] = None  # post-training's targets, provider and shape
    target_flops: Optional[float] = None
    target_params: Optional[float] = None
    on: Optional[str] = None
    shape: Optional[str] = None
    options: Union[Mapping[str, Any], Sequence[str]] = ()  # any other: {"rate": 0.2} or ["rate=0.2"]
    # recovery training after the pruning (training/recovery.py RECOVERY: task | kd), with the masks held
    recover: Optional[str] = None
    recover_steps: Optional[int] = None  # None: the training budget (--max-steps / --epochs)
    train: Optional[Union[str, Sequence[str]]] = None  # what recovery trains (as TrainRequest.train); None:
    #                                                    adapters,fusion (and the head)


@dataclass
class PruneResult:
    out: Path
    method: str
    seed: int
    masks: Any  # the MaskSet written
    groups: Dict[str, int]  # unit groups per kind
    counts: Dict[str, dict]  # kind -> {"kept", "total"}
    metrics: List[tuple]  # (name, value) rows of dev metrics, empty without data
    task: Optional[str] = None  # the task reference, with data
    dev_examples: Optional[int] = None
    stopped_early: Optional[str] = None
    warnings: List[str] = field(default_factory=list)  # a method's own doubts about its masks (extra["warnings"])
    trained_model: Optional[Path] = None  # OUT/model when the method (or --recover) trained weights
    recovery: Optional[dict] = None  # with --recover: kind, train, steps, loss, dev metrics (masks.json)
    files: List[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- compact

@dataclass(kw_only=True)
class CompactRequest(ModelOptions):
    out: PathLike
    masks: Optional[PathLike] = None
    adapterhub: bool = False
    overwrite: bool = False
    tokenizer: Optional[str] = None


@dataclass
class CompactResult:
    out: Path
    before: dict  # flops.total_cost of the (masked) model and of the compacted one
    after: dict
    adapterhub: Optional[Path] = None
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- export

@dataclass(kw_only=True)
class ExportRequest(ModelOptions, DataOptions):
    out: PathLike
    masks: Optional[PathLike] = None
    format: Optional[str] = "onnx"  # the CLI's --onnx; the only format
    optimize: bool = True
    quantize: Optional[str] = None  # "int8": the same as "int8" in variants
    sparse: bool = False  # the same as "sparse" in variants
    variants: Sequence[str] = ()  # names registered in exporters/variants.py: int8, int8-static, fp16, sparse
    calibration_examples: int = 128  # int8: training rows the static ranges are calibrated on
    int8_keep_fp32: Optional[int] = None  # int8: most costly units kept fp32; None: as few as meet the bound
    atol: float = 1e-4
    allow_mismatch: bool = False
    seed: Optional[int] = None
    overwrite: bool = False
    max_length: Optional[int] = None  # None: 128, or the model's positions when fewer


@dataclass
class ExportResult:
    out: Path
    export: Any  # exporters.onnx_export.ExportResult: files, sizes, parity, variants
    optimize: bool
    atol: float
    attention: List[tuple] = field(default_factory=list)  # export_summary.attention_rows, when optimised
    notes: List[str] = field(default_factory=list)
    speedup: Optional[dict] = None  # masks with a cpu latency target: measured vs predicted (export_summary)


# ----------------------------------------------------------------------------------------------- train

@dataclass(kw_only=True)
class TrainRequest(ModelOptions, DataOptions, TrainBudget, DistillOptions):
    data: str
    train: Union[str, Sequence[str]]  # adapters | fusion | head | all, comma-separated or a list
    out: PathLike
    teacher: Optional[PathLike] = None  # a model directory: distil from it instead of the task loss
    masks: Optional[PathLike] = None  # train under these masks; OUT is then the compacted trained model
    new_head: bool = False
    overwrite: bool = False
    seed: int = 0


@dataclass
class TrainResult:
    out: Path
    parts: List[str]
    record: dict  # what train.json holds
    task: str
    train_examples: int
    dev_examples: int
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- eval

@dataclass(kw_only=True)
class EvalRequest(ModelOptions, DataOptions):
    data: str
    masks: Optional[PathLike] = None
    json: Optional[PathLike] = None
    overwrite: bool = False
    max_length: Optional[int] = None  # None: 128, or the model's positions when fewer
    batch_size: int = 64
    # the paired comparison (compressor.evaluation): a model directory, an export directory, an .onnx file, or
    # "dense" (the model before its masks); the candidate is `model` (masked), or a graph
    against: Optional[PathLike] = None
    bootstrap: int = 1000  # resamples of the dev examples for the 95% interval of each difference
    seed: int = 0  # of the resamples
    fidelity_examples: int = 5000  # unlabeled texts: the training split's last rows, or fidelity_data's first
    fidelity_data: Optional[PathLike] = None  # .txt (a line per text, a tab between a pair) or CSV / TSV / JSONL
    fidelity_columns: Optional[str] = None  # fidelity_data's text column(s); default text_columns, else "text"


@dataclass
class EvalResult:
    model: Path  # the directory the model came from, or the ONNX graph scored
    masks: Optional[Path]
    masks_method: Optional[str]
    task: str
    main_metric: str
    dev_examples: int
    metrics: Dict[str, float]
    json: Optional[Path] = None
    notes: List[str] = field(default_factory=list)
    # with `against` (compressor.evaluation.compare): difference = candidate - reference
    against: Optional[str] = None
    reference: Optional[str] = None  # what the reference is, as printed
    reference_metrics: Dict[str, float] = field(default_factory=dict)
    differences: List[dict] = field(default_factory=list)  # metric, candidate, reference, difference, low, high,
    #                                                        within_noise (the interval holds 0)
    agreement: Dict[str, float] = field(default_factory=dict)  # dev: agreement + mean_kl, or correlation +
    #                                                            mean_abs_diff (regression); examples
    fidelity: Dict[str, Any] = field(default_factory=dict)  # the same on unlabeled texts, + source
    bootstrap: Optional[dict] = None  # resamples, seed, confidence, interval, examples


# ----------------------------------------------------------------------------------------------- bench

@dataclass(kw_only=True)
class BenchRequest:
    targets: Sequence[PathLike]
    out: PathLike
    providers: Sequence[str] = ("cpu",)
    batch_sizes: Union[str, Sequence[int]] = "1,8"
    seq_lens: Union[str, Sequence[int]] = "32,128"
    threads: Optional[int] = None  # None: os.cpu_count()
    min_time: float = 1.0
    warmup: int = 3
    seed: int = 0
    overwrite: bool = False
    rounds: int = 10  # --min-time is cut into this many slices per target, the targets timed in turn
    device: str = "cpu"  # the torch provider's device: cpu | cuda
    dtype: str = "fp32"  # the torch provider's precision: fp32 | fp16 | bf16


@dataclass
class BenchResult:
    out: Path
    report: dict  # what report.json holds
    threads: int
    failed: int  # cells that failed
    busy: List[str] = field(default_factory=list)  # why the machine counted as busy while timing (bench_report)
    unsteady: List[str] = field(default_factory=list)  # speedups whose per-round spread was wide (bench_report)


# ----------------------------------------------------------------------------------------------- demo

@dataclass(kw_only=True)
class DemoRequest:
    out: PathLike = Path("compress-demo")
    overwrite: bool = False
    data_dir: Optional[PathLike] = None
    target_speedup: float = 1.5
    latency: str = "table"  # table | flops (compressor.demo.DemoConfig)
    min_time: float = 2.0
    threads: Optional[int] = None
    seed: int = 0


@dataclass
class DemoResult:
    out: Path
    config: Any  # demo.DemoConfig
    record: dict  # what demo.json holds
